"""Run one benchmark by name: ``python -m benchmarks.run NAME [--steps N --seed S --out DIR ...]``.

Every benchmark is also runnable on its own as ``python -m benchmarks.<name>``; ``--help`` lists its flags.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "rails_overhead": "SafeGRPO with all rails vs plain GRPO, seconds per step (goal: ratio <= 1.03)",
    "ppo_vs_trl112": "SafePPO vs TRL 1.12's PPOTrainer per rollout and peak memory (goal: >= 1.5x faster)",
    "ppo_cost": "SafePPO vs GRPO per step, tokens/s, memory, share of time inside the models (goal: >= 85%)",
    "reward_hacking": "length-exploitable reward: plain GRPO vs rails (goal: rails hold length within 1.2x)",
    "kl_control": "fixed vs adaptive KL coefficient (goal: KL within 0.5x-1.5x of target after warm-up)",
    "scaling": "seconds per step as batch size and completion length double",
    "gpu_check": "the prepared GPU check: PPO bf16/FSDP2/fp16, GRPO, DPO on a 0.5B model (run it via gpu_check.sh)",
    "stage_ablation": "the demo chain with each stage removed in turn, 3 seeds: final accuracy, format, length, KL",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        for name, text in BENCHMARKS.items():
            print(f"  {name:<16} {text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; accepted: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    importlib.import_module(f"benchmarks.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
