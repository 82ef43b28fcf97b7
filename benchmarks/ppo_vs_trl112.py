"""Benchmark 2, SafePPOTrainer vs TRL 1.12's PPOTrainer (the last TRL release with PPO).

The same tiny policy, critic initialised from it, a sequence-classification reward model from the same weights,
batch, completion length and PPO epochs; TRL 1.12 runs in its own environment (benchmarks/setup_trl112.sh).
`--steps` counts rollouts (one batch generated, scored, then `--ppo-epochs` optimizer updates on it). Figures: wall
seconds per rollout end to end (generation, scoring, updates, logging; the first rollout of each run is warm-up),
whole-process wall seconds (imports and model loading included; they differ between the two environments), and
peak resident memory of each process, whole and above its level once the libraries are imported (TRL 1.16 and
transformers 5.23 import more than TRL 1.12 and transformers 5.17 before any trainer runs; the difference above
that level is the trainers'). Goal: ours at least 1.5x faster per rollout with no more peak memory.
TRL 1.12's loop calls `gc.collect()` twice per rollout, a fixed cost independent of the model; a third run with
those calls made no-ops shows what the rest of its loop costs, so the speed-up can be read with and without it.
"""

from __future__ import annotations

import os

from benchmarks._harness import (
    REPO, bar_panels, base_config, check_args, common_parser, fmt_stats, load_stats, machine, print_table, run_worker,
    save_figure, stats, write_json,
)


def main(argv=None) -> dict:
    parser = common_parser("ppo_vs_trl112", __doc__.splitlines()[0], steps=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="SafePPO without gradient checkpointing. Its default is on (GRPOConfig's, which "
                        "SafePPOConfig inherits); TRL 1.12's PPOConfig also says on, but its loop never enables it, "
                        "so this flag makes both sides do the same work per update (faster, more memory)")
    parser.add_argument("--no-critic-gradient-checkpointing", dest="critic_gradient_checkpointing",
                        action="store_false",
                        help="SafePPO recomputes the policy's activations but not the critic's "
                        "(critic_gradient_checkpointing=False): between checkpointing on and off in time and memory")
    parser.add_argument("--trl112-python", default=str(REPO / ".venv-trl112" / "bin" / "python"),
                        help="python of the TRL 1.12 environment (create it with benchmarks/setup_trl112.sh)")
    args = parser.parse_args(argv)
    check_args(args, min_steps=2)  # --steps = rollouts; the first is warm-up
    if not os.path.exists(args.trl112_python):
        raise SystemExit(f"--trl112-python={args.trl112_python} does not exist: run benchmarks/setup_trl112.sh first")
    from trl_safeppo.models import resolve_model_path

    path = resolve_model_path(args.model)
    rollouts = args.steps  # --steps counts rollouts here
    legacy_cfg = {"model_path": path, "batch": args.batch, "rollouts": rollouts, "ppo_epochs": args.ppo_epochs,
                  "max_completion_length": args.max_completion_length, "seed": args.seed}
    if args.threads:
        legacy_cfg["threads"] = args.threads
    ours_cfg = base_config(
        args, "safe_ppo", model=path, reward=f"reward_model:{path}", batch=args.batch, num_generations=1,
        max_completion_length=args.max_completion_length, learning_rate=1e-5, beta=0.05,
        # each trainer as shipped by default: SafePPO recomputes activations (GRPOConfig's gradient_checkpointing=True);
        # TRL 1.12's PPOConfig says True as well, but its PPO loop replaces Trainer.train (where transformers turns
        # checkpointing on), so it never does; --no-gradient-checkpointing gives both sides the same work per update
        args={"num_iterations": args.ppo_epochs, "gradient_checkpointing": args.gradient_checkpointing,
              "critic_gradient_checkpointing": args.gradient_checkpointing and args.critic_gradient_checkpointing},
    )
    ours_cfg["steps"] = rollouts * args.ppo_epochs  # one optimizer step per PPO epoch, as TRL 1.12
    # TRL 1.12 as shipped, and (for the record) without the two gc.collect() calls its loop makes per rollout
    legacy_no_gc = {**legacy_cfg, "disable_gc_collect": True}
    results: dict[str, list[dict]] = {"TRL 1.12 PPOTrainer": [], "SafePPOTrainer": [], NO_GC: []}
    for _ in range(args.repeats):  # interleaved: old, ours, old without gc, old, ours, ...
        print("  running TRL 1.12 PPOTrainer ...", flush=True)
        results["TRL 1.12 PPOTrainer"].append(
            run_worker("benchmarks._trl112_ppo_worker", legacy_cfg, python=args.trl112_python))
        print("  running SafePPOTrainer ...", flush=True)
        results["SafePPOTrainer"].append(run_worker("benchmarks._worker", ours_cfg))
        print(f"  running {NO_GC} ...", flush=True)
        results[NO_GC].append(run_worker("benchmarks._trl112_ppo_worker", legacy_no_gc, python=args.trl112_python))
    rows, result = [], {"machine": machine(), "load_at_run_start": load_stats(results), "args": vars(args)}
    for name, rs in results.items():
        per_rollout = [rollout_seconds(r, 1 if name.startswith("TRL") else args.ppo_epochs) for r in rs]
        step = stats([t for times in per_rollout for t in times[1:]])  # first rollout of each run: warm-up
        wall = stats([r["process_wall_seconds"] for r in rs])
        peak = stats([r["peak_rss_mb"] for r in rs])
        imports = stats([r["rss_after_imports_mb"] for r in rs])
        training = stats([r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in rs])
        result[name] = {"seconds_per_rollout": step, "process_wall_seconds": wall, "peak_rss_mb": peak,
                        "rss_after_imports_mb": imports, "peak_above_imports_mb": training}
        rows.append((name, fmt_stats(step), fmt_stats(wall, digits=1), fmt_stats(peak, " MiB", digits=0),
                     fmt_stats(imports, " MiB", digits=0), fmt_stats(training, " MiB", digits=0)))
    old, new = result["TRL 1.12 PPOTrainer"], result["SafePPOTrainer"]
    speed = old["seconds_per_rollout"]["median"] / new["seconds_per_rollout"]["median"]
    speed_wall = old["process_wall_seconds"]["median"] / new["process_wall_seconds"]["median"]
    mem = new["peak_rss_mb"]["median"] / old["peak_rss_mb"]["median"]
    mem_training = new["peak_above_imports_mb"]["median"] / old["peak_above_imports_mb"]["median"]
    imports_delta = new["rss_after_imports_mb"]["median"] - old["rss_after_imports_mb"]["median"]
    speed_no_gc = result[NO_GC]["seconds_per_rollout"]["median"] / new["seconds_per_rollout"]["median"]
    met = speed >= 1.5 and mem_training <= 1.0
    result.update(speedup_per_rollout=speed, speedup_process=speed_wall, peak_memory_ratio=mem,
                  peak_above_imports_ratio=mem_training, imports_delta_mb=imports_delta,
                  speedup_per_rollout_vs_no_gc=speed_no_gc, goal_met=met)
    print_table(
        f"PPO, {rollouts} rollouts of batch {args.batch} x {args.max_completion_length} tokens, "
        f"{args.ppo_epochs} PPO epochs each (median [min, max])",
        rows,
        ("trainer", "s/rollout (after the first)", "whole process s", "peak RSS", "RSS after imports",
         "peak above imports"),
    )
    print(f"SafePPO speed-up: {speed:.2f}x per rollout, {speed_wall:.2f}x whole process; peak memory {mem:.2f}x of "
          f"TRL 1.12's for the whole process ({imports_delta:+.0f} MiB of it before any trainer runs: the libraries' "
          f"imports), {mem_training:.2f}x above the imports")
    print(f"goal: >= 1.5x faster with no more peak memory (the trainers' own: above the imports) -> "
          f"{'met' if met else 'NOT met'}")
    print(f"for the record: against TRL 1.12 without its per-rollout gc.collect() calls, SafePPO is "
          f"{speed_no_gc:.2f}x as fast per rollout")
    names = {"TRL 1.12 PPOTrainer": "TRL 1.12\nPPOTrainer", "SafePPOTrainer": "SafePPOTrainer",
             NO_GC: "TRL 1.12 without\ngc.collect()"}
    fig = bar_panels(
        [
            ("seconds per rollout", {names[n]: result[n]["seconds_per_rollout"] for n in names}),
            ("whole-process seconds", {names[n]: result[n]["process_wall_seconds"] for n in names}),
            ("peak resident memory (MiB)", {names[n]: result[n]["peak_rss_mb"] for n in names}),
            ("peak memory above the imports (MiB)", {names[n]: result[n]["peak_above_imports_mb"] for n in names}),
        ],
        f"PPO on {args.model}: batch {args.batch}, {args.max_completion_length} tokens, {args.ppo_epochs} PPO epochs, "
        f"SafePPO gradient checkpointing {_checkpointing(args)}; "
        f"speed-up {speed:.2f}x per rollout, peak memory {mem:.2f}x ({mem_training:.2f}x above the imports)",
        colors=("tab:grey", "tab:blue", "silver"),
    )
    save_figure(fig, args.out, "ppo_vs_trl112")
    write_json(args.out, "ppo_vs_trl112", {**result, "runs": results})
    return result


NO_GC = "TRL 1.12 PPOTrainer, gc.collect() off"


def _checkpointing(args) -> str:
    if not args.gradient_checkpointing:
        return "off"
    return "on" if args.critic_gradient_checkpointing else "policy only"


def rollout_seconds(run: dict, steps_per_rollout: int) -> list[float]:
    """Seconds per rollout (generation + all PPO epochs on it): TRL 1.12 ends a step per rollout; SafePPO ends one
    per PPO epoch (GRPO's buffered generation), so its `steps_per_rollout` consecutive steps make one rollout."""
    s = run["step_seconds"]
    return [sum(s[i : i + steps_per_rollout]) for i in range(0, len(s) - steps_per_rollout + 1, steps_per_rollout)]


if __name__ == "__main__":
    main()
