"""Benchmark 2, SafePPOTrainer vs TRL 1.12's PPOTrainer (the last TRL release with PPO).

The same tiny policy, critic initialised from it, a sequence-classification reward model from the same weights,
batch, completion length and PPO epochs; TRL 1.12 runs in its own environment (benchmarks/setup_trl112.sh).
Figures per rollout (one batch generated, then `--ppo-epochs` optimizer updates on it): training-loop seconds and
whole-process wall seconds, and peak memory of each process. Goal: ours at least 1.5x faster per step with no
more peak memory.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks._harness import REPO, base_config, check_args, common_parser, machine, print_table, run_worker, stats, write_json


def main(argv=None) -> dict:
    parser = common_parser("ppo_vs_trl112", __doc__.splitlines()[0], steps=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--trl112-python", default=str(REPO / ".venv-trl112" / "bin" / "python"),
                        help="python of the TRL 1.12 environment (create it with benchmarks/setup_trl112.sh)")
    args = parser.parse_args(argv)
    check_args(args, min_steps=2)
    if not os.path.exists(args.trl112_python):
        raise SystemExit(f"--trl112-python={args.trl112_python} does not exist: run benchmarks/setup_trl112.sh first")
    from trl_safeppo.models import resolve_model_path

    path = resolve_model_path(args.model)
    rollouts = args.steps  # --steps counts rollouts here
    legacy_cfg = {"model_path": path, "batch": args.batch, "rollouts": rollouts, "ppo_epochs": args.ppo_epochs,
                  "max_completion_length": args.max_completion_length, "seed": args.seed,
                  "output_dir": str(Path("/tmp/trl_safeppo_bench/trl112"))}
    if args.threads:
        legacy_cfg["threads"] = args.threads
    ours_cfg = base_config(
        args, "safe_ppo", model=path, reward=f"reward_model:{path}", batch=args.batch, num_generations=1,
        max_completion_length=args.max_completion_length, learning_rate=1e-5, beta=0.05,
        args={"num_iterations": args.ppo_epochs},
    )
    ours_cfg["steps"] = rollouts * args.ppo_epochs  # one optimizer step per PPO epoch, as TRL 1.12
    results: dict[str, list[dict]] = {"TRL 1.12 PPOTrainer": [], "SafePPOTrainer": []}
    for _ in range(args.repeats):
        print("  running TRL 1.12 PPOTrainer ...", flush=True)
        results["TRL 1.12 PPOTrainer"].append(
            run_worker("benchmarks._trl112_ppo_worker", legacy_cfg, python=args.trl112_python))
        print("  running SafePPOTrainer ...", flush=True)
        results["SafePPOTrainer"].append(run_worker("benchmarks._worker", ours_cfg))
    rows, result = [], {"machine": machine(), "args": vars(args)}
    for name, rs in results.items():
        loop = stats([r["train_seconds"] / rollouts for r in rs])
        wall = stats([r["process_wall_seconds"] / rollouts for r in rs])
        peak = stats([r["peak_rss_mb"] for r in rs])
        result[name] = {"loop_seconds_per_rollout": loop, "process_seconds_per_rollout": wall, "peak_rss_mb": peak}
        rows.append((name, f"{loop['median']:.2f}", f"{wall['median']:.2f}", f"{peak['median']:.0f}"))
    old, new = result["TRL 1.12 PPOTrainer"], result["SafePPOTrainer"]
    speed = old["loop_seconds_per_rollout"]["median"] / new["loop_seconds_per_rollout"]["median"]
    speed_wall = old["process_seconds_per_rollout"]["median"] / new["process_seconds_per_rollout"]["median"]
    mem = new["peak_rss_mb"]["median"] / old["peak_rss_mb"]["median"]
    result.update(speedup_loop=speed, speedup_process=speed_wall, peak_memory_ratio=mem)
    print_table("PPO per rollout", rows, ("trainer", "loop s/rollout", "process s/rollout", "peak RSS MiB"))
    print(f"SafePPO speed-up: {speed:.2f}x (training loop), {speed_wall:.2f}x (whole process); "
          f"peak memory {mem:.2f}x of TRL 1.12's")
    print(f"goal: >= 1.5x faster with no more peak memory -> {'met' if speed >= 1.5 and mem <= 1.0 else 'NOT met'}")
    write_json(args.out, "ppo_vs_trl112", {**result, "runs": results})
    return result


if __name__ == "__main__":
    main()
