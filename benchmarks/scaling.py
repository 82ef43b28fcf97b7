"""Benchmark 6, scaling: SafePPOTrainer seconds per step as batch size and completion length double.

Three points each, starting from (batch, length) = (4, 8); every figure is also printed as a ratio to the first
point, so the growth is read off directly (2.0 = cost doubles with the setting).
"""

from __future__ import annotations

from benchmarks._harness import (
    base_config, check_args, common_parser, fmt_stats, interleaved, load_stats, machine, print_table, save_figure,
    stats, timed_steps, write_json,
)


def main(argv=None) -> dict:
    parser = common_parser("scaling", __doc__.splitlines()[0], steps=5)
    parser.add_argument("--trainer", default="safe_ppo", choices=["safe_ppo", "safe_grpo", "grpo"])
    args = parser.parse_args(argv)
    check_args(args, min_steps=2)
    points = {f"batch={b} len=8": (b, 8) for b in (4, 8, 16)}
    points.update({f"batch=4 len={n}": (4, n) for n in (16, 32)})
    # one PPO epoch per rollout, so that every step generates (as GRPO's default): a step is always generate + update
    extra = {"args": {"num_iterations": 1}} if args.trainer == "safe_ppo" else {}
    configs = {
        name: ("benchmarks._worker", base_config(args, args.trainer, batch=b, num_generations=4,
                                                 max_completion_length=n, **extra), {})
        for name, (b, n) in points.items()
    }
    runs = interleaved(configs, args.repeats)
    base = stats(timed_steps(runs["batch=4 len=8"], warmup=1))["median"]
    rows, table = [], {}
    for name, rs in runs.items():
        s = stats(timed_steps(rs, warmup=1))
        tokens = stats([t for r in rs for t in r["generated_tokens_per_step"][1:]])
        table[name] = {"step_seconds": s, "ratio_to_first": s["median"] / base, "point": points[name],
                       "generated_tokens_per_step": tokens}
        rows.append((name, fmt_stats(s), f"{s['median'] / base:.2f}", f"{tokens['median']:.0f}"))
    print_table(f"scaling of {args.trainer} (seconds per step)", rows,
                ("setting", "s/step median [min, max]", "ratio to first", "generated tokens/step"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, values, label in (
        (axes[0], "batch", (4, 8, 16), "batch size (completions per step; max completion length 8)"),
        (axes[1], "len", (8, 16, 32), "max completion length (batch 4)"),
    ):
        names = [f"batch={v} len=8" if key == "batch" else f"batch=4 len={v}" for v in values]
        ys = [table[n]["ratio_to_first"] for n in names]
        lo = [y - table[n]["step_seconds"]["min"] / base for y, n in zip(ys, names)]
        hi = [table[n]["step_seconds"]["max"] / base - y for y, n in zip(ys, names)]
        ax.errorbar(values, ys, yerr=[lo, hi], marker="o", capsize=3, label="measured: median [min, max]")
        ax.plot(values, [v / values[0] for v in values], "--", color="grey", label="proportional (2x per doubling)")
        for v, y, n in zip(values, ys, names):
            ax.annotate(f"{table[n]['step_seconds']['median']:.2f}s", (v, y), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per step / first point")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8, loc="upper left")
    fig.suptitle(f"{args.trainer} on {args.model}: cost per step as the batch and the completion length double "
                 f"(seed {args.seed}, {args.repeats} run(s) per point)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, args.out, "scaling")
    result = {"points": table, "load_at_run_start": load_stats(runs), "machine": machine(), "args": vars(args)}
    write_json(args.out, "scaling", {**result, "runs": runs})
    return result


if __name__ == "__main__":
    main()
