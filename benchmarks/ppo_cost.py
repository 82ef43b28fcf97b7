"""Benchmark 3, PPO cost: SafePPOTrainer vs plain GRPOTrainer on the same batch.

Seconds per step, generated tokens per second and peak memory, side by side; and, profiled, the share of the PPO
step spent inside the models (generate, forward of policy / reference / critic, backward) vs everything else.
Goal: at least 85% of the PPO step inside the models; the rest is overhead to remove.
"""

from __future__ import annotations

from benchmarks._harness import (
    bar_panels, base_config, check_args, common_parser, fmt_stats, interleaved, load_stats, machine, print_table,
    run_worker, save_figure, stats, timed_steps, write_json,
)


def _tokens_per_second(runs: list[dict], warmup: int) -> float:
    """Generated tokens over wall seconds of the timed steps (every step generates its batch here)."""
    toks = [t for r in runs for t in r["generated_tokens_per_step"][warmup:]]
    secs = timed_steps(runs, warmup)
    if len(toks) != len(secs):
        raise RuntimeError(f"{len(toks)} logged generations for {len(secs)} steps: every step must generate")
    return sum(toks) / sum(secs) if secs else float("nan")


def _model_share(r: dict) -> tuple[float, float]:
    """(seconds inside the models, wall seconds) over a run's timed steps (the first step is warm-up)."""
    snaps = r["model_seconds_by_kind_at_step_end"]
    inside = sum(snaps[-1].values()) - sum(snaps[0].values())
    return inside, sum(r["step_seconds"][1:])


def main(argv=None) -> dict:
    parser = common_parser("ppo_cost", __doc__.splitlines()[0], steps=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also run SafePPO once under cProfile (untimed) and print its N heaviest functions")
    args = parser.parse_args(argv)
    check_args(args, min_steps=2)
    if args.cprofile < 0:
        raise SystemExit(f"--cprofile={args.cprofile}: must be >= 0 (0: no profile run)")
    # The same batch for both: `batch` completions per step, 4 per prompt, generated fresh every step (PPO with one
    # epoch per rollout, GRPO's default), so a step is generate + score + one update in both.
    shared = {"batch": args.batch, "num_generations": 4, "max_completion_length": args.max_completion_length,
              "profile": True}
    runs = interleaved(
        {
            "GRPOTrainer": ("benchmarks._worker", base_config(args, "grpo", **shared), {}),
            "SafePPOTrainer": (
                "benchmarks._worker", base_config(args, "safe_ppo", args={"num_iterations": 1}, **shared), {},
            ),
        },
        args.repeats,
    )
    rows, result = [], {"machine": machine(), "load_at_run_start": load_stats(runs), "args": vars(args)}
    for name, rs in runs.items():
        step = stats(timed_steps(rs, warmup=1))
        # share of (all steps' time) spent inside the models; the model timer covers the whole training loop
        # share of the timed steps' wall time spent inside the models (warm-up step excluded), all runs and per run
        share = sum(_model_share(r)[0] for r in rs) / sum(_model_share(r)[1] for r in rs)
        shares = stats([_model_share(r)[0] / _model_share(r)[1] for r in rs])
        peak = stats([r["peak_rss_mb"] for r in rs])
        tps = _tokens_per_second(rs, warmup=1)
        result[name] = {"step_seconds": step, "model_share": share, "model_share_per_run": shares,
                        "peak_rss_mb": peak, "tokens_per_second": tps}
        rows.append((name, fmt_stats(step), f"{tps:.1f}", f"{peak['median']:.0f}",
                     f"{100 * share:.1f}% [{100 * shares['min']:.1f}, {100 * shares['max']:.1f}]"))
    # where the step time goes, timed steps only (the first step of each run is warm-up): outermost model calls by
    # kind, and everything else, as shares of the timed steps' wall time
    def model_share(r: dict, kinds: list[str] | None = None) -> tuple[float, float]:
        snaps = r["model_seconds_by_kind_at_step_end"]
        first, last = snaps[0], snaps[-1]
        keys = kinds if kinds is not None else list(last)
        return sum(last.get(k, 0.0) - first.get(k, 0.0) for k in keys), sum(r["step_seconds"][1:])

    kinds = sorted({k for rs in runs.values() for r in rs for k in r["model_seconds_by_kind_at_step_end"][-1]})
    breakdown = {}
    for name, rs in runs.items():
        total = sum(model_share(r)[1] for r in rs)
        shares = {k: sum(model_share(r, [k])[0] for r in rs) / total for k in kinds}
        shares["outside the models"] = 1.0 - sum(shares.values())
        breakdown[name] = shares
        result[name]["time_shares"] = shares
    print_table("share of step time, timed steps (all runs)",
                [(k, *(f"{100 * breakdown[n][k]:.1f}%" for n in runs)) for k in [*kinds, "outside the models"]],
                ("", *runs))
    ratio = result["SafePPOTrainer"]["step_seconds"]["median"] / result["GRPOTrainer"]["step_seconds"]["median"]
    mem_ratio = result["SafePPOTrainer"]["peak_rss_mb"]["median"] / result["GRPOTrainer"]["peak_rss_mb"]["median"]
    result.update(step_ratio=ratio, peak_memory_ratio=mem_ratio, goal_model_share=0.85)
    print_table("PPO cost", rows, ("trainer", "s/step median [min, max]", "gen tok/s", "peak RSS MiB",
                                   "in models (all runs) [per-run min, max]"))
    print(f"PPO / GRPO: {ratio:.2f}x time per step, {mem_ratio:.2f}x peak memory")
    share = result["SafePPOTrainer"]["model_share"]
    verdict = "met" if share >= 0.85 else "NOT met"
    print(f"goal: >= 85% of the PPO step inside the models -> {100 * share:.1f}% ({verdict})")
    fig = bar_panels(
        [
            ("seconds per step", {n: result[n]["step_seconds"] for n in runs}),
            ("generated tokens per second", {n: stats([result[n]["tokens_per_second"]]) for n in runs}),
            ("share of step time", {n: result[n]["model_share_per_run"] for n in runs}),
        ],
        f"SafePPO vs GRPO on {args.model}: batch {args.batch}, {args.max_completion_length} tokens; PPO step "
        f"{ratio:.2f}x GRPO's, {100 * share:.1f}% inside the models (goal >= 85%)",
    )
    ax = fig.axes[2]  # redrawn as stacked shares: where the step time goes
    ax.clear()
    names = list(runs)
    bottom = [0.0] * len(names)
    palette = {"generate": "tab:blue", "forward:policy": "tab:cyan", "forward:reference": "tab:purple",
               "forward:critic": "tab:green", "backward": "tab:orange", "outside the models": "lightgrey"}
    for k in [*kinds, "outside the models"]:
        vals = [breakdown[n].get(k, 0.0) for n in names]
        ax.bar(range(len(names)), vals, bottom=bottom, label=k, color=palette.get(k))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.axhline(0.85, color="tab:red", ls="--", lw=1, label="goal: 85% inside")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("share of timed step time")
    ax.set_ylim(0, 1.0)
    ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, args.out, "ppo_cost")
    if args.cprofile:
        print("  running SafePPOTrainer under cProfile (untimed) ...", flush=True)
        prof = run_worker("benchmarks._worker", base_config(args, "safe_ppo", args={"num_iterations": 1},
                                                              cprofile=args.cprofile, **shared))
        total = prof["train_seconds"]
        for title, key, col in (("self time", "cprofile", "self_s"),
                                ("cumulative time, trl_safeppo only", "cprofile_ours", "cumulative_s")):
            print_table(f"SafePPO under cProfile: heaviest functions by {title} (train {total:.1f}s)",
                        [(r["function"][-90:], f"{r[col]:.2f}", f"{100 * r[col] / total:.1f}%", r["calls"])
                         for r in prof[key]], ("function", "seconds", "share", "calls"))
        result["cprofile"] = {"train_seconds": total, "self": prof["cprofile"], "ours": prof["cprofile_ours"]}
    write_json(args.out, "ppo_cost", {**result, "runs": runs})
    return result


if __name__ == "__main__":
    main()
