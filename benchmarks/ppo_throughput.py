"""PPO throughput: SafePPOTrainer next to a plain TRL GRPOTrainer on the same config, in one invocation.

Prints seconds per optimizer step, generated tokens per second and peak memory of both, the PPO / GRPO ratio, and
the cost of one policy forward + backward on the same batch (timed in the PPO run), so the goal "a PPO step costs
at most one extra forward/backward (the critic) over a GRPO step of the same batch" can be read off directly:

    extra = PPO s/step - GRPO s/step,  budget = 1 x (forward + backward of the policy on the batch)

Both trainers see the same prompts, model, batch, completion length and KL setting (GRPO with the same beta, so it
also loads and runs the reference model) and take `--num-iterations` optimizer steps per generated batch (default 1: one step per batch).
PPO additionally runs, per step: the critic's forward at rollout time and its forward + backward in the loss, and,
because GRPO skips it when a batch is used for exactly one step, one no-grad forward of the policy for the
rollout-time log-probabilities of the KL penalty (with `--num-iterations` > 1 GRPO computes those itself, so
that forward is no longer extra).

Each trainer runs in a fresh spawned process (so peak memory belongs to it alone: max RSS on CPU, max allocated
CUDA memory on GPU); the first `--warmup` steps are left out of the timings (mean seconds per optimizer step over the rest; with
`--num-iterations` > 1 every generation is spread over that many steps).

    python benchmarks/ppo_throughput.py                       # tiny://debug, CPU or the visible GPU
    python benchmarks/ppo_throughput.py --model tiny://arithmetic --batch 16 --steps 12 --max-completion-length 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time


def _run(kind: str, opts: dict) -> dict:
    """One training run in this (fresh) process; returns timings and peak memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_safeppo.models import resolve_model_path
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

    cuda = torch.cuda.is_available() and not opts["cpu"]

    class LengthReward:
        __name__ = "length_reward"

        def __call__(self, prompts, completions, completion_ids=None, **kwargs):
            return [len(ids) / opts["max_completion_length"] for ids in completion_ids]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self._t = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._t)

    n_prompts = opts["batch"] // opts["num_generations"]
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"What is {i} + {i % 7}?"}] for i in range(n_prompts * (opts["steps"] + 2))]}
    )
    common = dict(
        output_dir=os.path.join(opts["out"], kind), per_device_train_batch_size=opts["batch"],
        num_generations=opts["num_generations"], max_completion_length=opts["max_completion_length"],
        max_steps=opts["steps"], num_iterations=opts["num_iterations"], steps_per_generation=1, learning_rate=1e-5, beta=opts["beta"],
        logging_steps=1, report_to=[], save_strategy="no", activation_checkpointing=False, disable_tqdm=True, seed=0,
        bf16=cuda, use_cpu=not cuda, disable_dropout=True, loss_type="bnpo",
    )
    model = resolve_model_path(opts["model"])
    timer = StepTimer()
    if kind == "ppo":
        trainer = SafePPOTrainer(model=model, reward_funcs=LengthReward(), args=SafePPOConfig(**common),
                                 train_dataset=dataset, callbacks=[timer])
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=LengthReward(), args=GRPOConfig(**common),
                              train_dataset=dataset, callbacks=[timer])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = {
        "step_seconds": timer.seconds,
        # (optimizer step, tokens generated for it): one entry per generated batch
        "generated_tokens": [
            (h["step"], h["completions/mean_length"] * opts["batch"])
            for h in trainer.state.log_history
            if "completions/mean_length" in h
        ],
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20) if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if kind == "ppo":
        result["fwd_bwd_seconds"] = _policy_forward_backward_seconds(trainer, opts, cuda)
    return result


def _policy_forward_backward_seconds(trainer, opts: dict, cuda: bool) -> float:
    """Median time of one forward + backward of the policy on a batch of the benchmark's shape (the critic's cost)."""
    import torch

    model = trainer.model
    model.train()
    seq = 24 + opts["max_completion_length"]  # chat-templated prompt (~24 tokens here) + completion
    ids = torch.randint(0, model.config.vocab_size, (opts["batch"], seq), device=model.device)
    times = []
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with trainer.accelerator.autocast():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.logits.float().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny://debug")
    parser.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    parser.add_argument("--num-generations", type=int, default=1, help="completions per prompt (GRPO needs >= 2)")
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--num-iterations", type=int, default=1,
                        help="optimizer steps per generated batch (PPO epochs), the same for both trainers")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.05, help="KL coefficient of both (GRPO then loads its reference)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when a GPU is visible")
    parser.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ppo_throughput"))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    opts = vars(args)
    # GRPO needs >= 2 generations per prompt; run it with 2 when PPO uses 1 (the batch, hence the work, is the same).
    grpo_opts = {**opts, "num_generations": max(2, args.num_generations)}
    if args.batch % grpo_opts["num_generations"]:
        parser.error(f"--batch ({args.batch}) must be divisible by {grpo_opts['num_generations']} for GRPO")

    ctx = mp.get_context("spawn")
    results = {}
    for kind, kind_opts in (("grpo", grpo_opts), ("ppo", opts)):
        with ctx.Pool(1) as pool:
            results[kind] = pool.apply(_run, (kind, kind_opts))

    def summary(r: dict) -> dict:
        secs = r["step_seconds"][args.warmup :]
        toks = sum(t for step, t in r["generated_tokens"] if step > args.warmup)  # steps are numbered from 1
        return {"s_per_step": statistics.fmean(secs), "min": min(secs), "max": max(secs),
                "tokens_per_s": toks / sum(secs),
                "peak_memory_mb": r["peak_memory_mb"]}

    grpo, ppo = summary(results["grpo"]), summary(results["ppo"])
    fwd_bwd = results["ppo"]["fwd_bwd_seconds"]
    extra = ppo["s_per_step"] - grpo["s_per_step"]
    device = results["ppo"]["device"]
    mem = "max allocated CUDA MiB" if device != "cpu" else "max RSS MiB"
    print(f"model {args.model}, batch {args.batch}, max_completion_length {args.max_completion_length}, "
          f"{args.steps - args.warmup} timed steps, device {device}")
    print(f"{'trainer':<16}{'s/step mean [min, max]':<30}{'gen tok/s':>10}{mem:>26}")
    for name, s in (("GRPOTrainer", grpo), ("SafePPOTrainer", ppo)):
        span = f"{s['s_per_step']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
        print(f"{name:<16}{span:<30}{s['tokens_per_s']:>10.1f}{s['peak_memory_mb']:>26.0f}")
    print(f"PPO / GRPO: {ppo['s_per_step'] / grpo['s_per_step']:.2f}x time per step, "
          f"{ppo['peak_memory_mb'] / grpo['peak_memory_mb']:.2f}x peak memory")
    print(f"extra time per PPO step {extra:.3f}s = {extra / fwd_bwd:.2f} x one policy forward+backward "
          f"({fwd_bwd:.3f}s); goal <= 1.00 -> {'met' if extra <= fwd_bwd else 'NOT met'}")
    out = {"args": opts, "grpo": grpo, "ppo": ppo, "fwd_bwd_seconds": fwd_bwd, "extra_over_fwd_bwd": extra / fwd_bwd}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
