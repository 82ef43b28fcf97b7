"""Benchmark 5, KL control: fixed beta vs the adaptive KL controller (Ziegler et al. 2019) with a target.

Both runs use a learning rate high enough that KL to the reference grows. Plots KL and beta over steps; reports the
share of post-warm-up steps whose KL lies within [0.5, 1.5] x target. Goal: adaptive keeps KL inside that band after
warm-up, where fixed beta drifts out of it.
"""

from __future__ import annotations

from benchmarks._harness import (
    base_config, check_args, common_parser, interleaved, machine, print_table, save_figure, sft_warm_start, stats,
    write_json,
)


def _series(run: dict, key: str) -> list[float]:
    return [h[key] for h in run["log_history"] if key in h]


# The KL each controller acts on, in its unit: SafePPO feeds the mean KL per sequence of each rollout (`ppo/kl_seq`,
# nats per sequence; its `kl` is per token), SafeGRPO the per-token `kl` of each step.
KL_KEY = {"safe_ppo": "ppo/kl_seq", "safe_grpo": "kl"}


def main(argv=None) -> dict:
    parser = common_parser("kl_control", __doc__.splitlines()[0], steps=40)
    parser.add_argument("--trainer", default="safe_ppo", choices=["safe_ppo", "safe_grpo"])
    parser.add_argument("--target", type=float, default=None,
                        help="KL target (default: 1.0 nats per sequence for PPO, 0.05 per token for GRPO)")
    parser.add_argument("--beta", type=float, default=0.05, help="initial / fixed KL coefficient")
    parser.add_argument("--horizon", type=float, default=64.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from the band check (steps // 4)")
    args = parser.parse_args(argv)
    check_args(args, min_steps=8)
    target = args.target if args.target is not None else (1.0 if args.trainer == "safe_ppo" else 0.05)
    if target <= 0:
        raise SystemExit(f"--target={target}: must be > 0")
    warmup = args.warmup if args.warmup is not None else args.steps // 4
    warm = sft_warm_start(args)
    shared = {"model": warm, "batch": 8, "num_generations": 4 if args.trainer == "safe_grpo" else 1, "max_completion_length": 16,
              "learning_rate": args.learning_rate, "beta": args.beta}
    if args.trainer == "safe_ppo":
        shared["args"] = {"num_iterations": 1}
    adaptive = {"kl": {"controller": "adaptive", "init_kl_coef": args.beta, "target": target,
                       "horizon": args.horizon, "min_coef": 1e-3, "max_coef": 10.0}}
    runs = interleaved(
        {
            "fixed": ("benchmarks._worker", base_config(args, args.trainer, rails=None, **shared), {}),
            "adaptive": ("benchmarks._worker", base_config(args, args.trainer, rails=adaptive, **shared), {}),
        },
        args.repeats,
    )
    rows, result = [], {"target": target, "warmup": warmup, "machine": machine(), "args": vars(args)}
    for name, rs in runs.items():
        kls = [k for r in rs for k in _series(r, KL_KEY[args.trainer])[warmup:]]
        inside = sum(0.5 * target <= k <= 1.5 * target for k in kls) / max(1, len(kls))
        s = stats(kls)
        result[name] = {"kl_after_warmup": s, "share_in_band": inside}
        rows.append((name, f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]", f"{s['median'] / target:.2f}",
                     f"{100 * inside:.0f}%"))
    print_table(f"KL control (target {target})", rows, ("beta", "KL after warm-up", "median/target", "in band"))
    ok = result["adaptive"]["share_in_band"]
    print(f"goal: adaptive KL within [0.5, 1.5] x target after warm-up -> {100 * ok:.0f}% of steps")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_beta) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, color in (("fixed", "tab:grey"), ("adaptive", "tab:blue")):
        run = runs[name][0]
        kl = _series(run, KL_KEY[args.trainer])
        ax_kl.plot(kl, color=color, label=f"{name} beta")
        ax_beta.plot(_series(run, "beta") or [args.beta] * len(kl), color=color, label=name)
    ax_kl.axhline(target, color="tab:green", ls="--", lw=1, label="target")
    ax_kl.axhspan(0.5 * target, 1.5 * target, color="tab:green", alpha=0.08, label="0.5x-1.5x target")
    ax_kl.axvline(warmup, color="black", ls=":", lw=1)
    ax_kl.set_xlabel("step")
    ax_kl.set_ylabel("KL to reference")
    ax_kl.legend(frameon=False, fontsize=8)
    ax_beta.set_xlabel("step")
    ax_beta.set_ylabel("KL coefficient beta")
    ax_beta.legend(frameon=False, fontsize=8)
    fig.suptitle(f"{args.trainer}: fixed vs adaptive KL control")
    fig.tight_layout()
    save_figure(fig, args.out, "kl_control")
    write_json(args.out, "kl_control", {**result, "runs": runs})
    return result


if __name__ == "__main__":
    main()
