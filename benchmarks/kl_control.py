"""Benchmark 5, KL control: fixed beta vs the adaptive KL controller (Ziegler et al. 2019) with a target.

The pressure: the exploitable reward of benchmark 4 (math + 0.05 per token, capped at 40 tokens) on the SFT warm
start, with a learning rate at which the fixed-beta run drifts steadily away from the reference as it lengthens
its answers. Both runs are identical but for the controller. The adaptive one uses a target a user would set and
a horizon of one rollout batch: `beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon`, i.e. beta can move
by up to 20% per step, the fastest the controller allows. (Ziegler et al.'s horizon of 10000 samples suits runs of
millions of samples; here it would move beta by 0.03% per step and never act within the run.)

The adaptive controller's refinements (rails.kl: hold_until_target, deadband, proportional, measure_before_update,
a floor via min_coef) are flags, off by default: the defaults run Ziegler's rule as published.

Plots KL and beta over steps; reports the share of post-warm-up steps whose KL lies within [0.5, 1.5] x target,
and how the steps outside split: above the band (the penalty failed to restrain the policy) or below it. A step
below the band with beta already at its floor is not one the controller can fix (beta can only restrain; at the
floor the policy is not being held back), so the table also counts the steps where control failed: above the band,
or below it while beta is above its floor (over-restraint). Goal: adaptive keeps KL inside the band after warm-up,
where fixed beta drifts out of it.

The per-step KL is GRPO's logged `kl`, the batch mean of the k3 estimate, one sampled token per position: its
spread includes the sampling of the tokens, heavy-tailed for k3 (one token the policy made unlikely can carry a
batch). SafeGRPO runs here also log `kl/exact`, the KL of the same batch summed over the whole vocabulary at each
position (benchmarks._worker.exact_kl; two extra forwards per step, no effect on training), and the table reports
the share in band by that measure too, and `kl/exact_se`, the standard error of that batch mean over the batch's
prompts (benchmarks._worker.clustered_mean_se): the table's last column counts the steps whose exact KL is within
2 standard errors of the band, i.e. readings a batch of this size cannot tell apart from a policy in band.

The KL trust region, the pull-back and the exact KL fed to the controller (`--max-kl`, `--pull-back-above`,
`--measure-exact`) were removed with their rails.kl options in issue 23 (no consistent gain here; docs/benchmarks.md
section 5 keeps their figures).
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
KL_UNIT = {"safe_ppo": "nats per sequence", "safe_grpo": "per token (k3)"}
# SafeGRPO runs also log the exact KL of each new batch (benchmarks._worker.exact_kl: summed over the vocabulary at
# every completion position, so without k3's token-sampling spread); same unit and expectation as `kl`.
EXACT_KEY = "kl/exact"
EXACT_SE_KEY = "kl/exact_se"  # its standard error over the batch's prompts
PROBE_KEY = "kl/probe"  # with --probe: the same policy's exact KL on fixed probe prompts (and kl/probe_se)
DEFAULT_TARGET = {"safe_ppo": 4.0, "safe_grpo": 0.5}


def main(argv=None) -> dict:
    parser = common_parser("kl_control", __doc__.splitlines()[0], steps=60)
    parser.add_argument("--trainer", default="safe_grpo", choices=["safe_grpo", "safe_ppo"])
    parser.add_argument("--target", type=float, default=None,
                        help="KL target (default: 0.5 per token for GRPO, 4.0 nats per sequence for PPO)")
    parser.add_argument("--beta", type=float, default=0.04, help="fixed / initial KL coefficient (default 0.04)")
    parser.add_argument("--batch", type=int, default=16, help="completions per step (default 16)")
    parser.add_argument("--horizon", type=float, default=None, help="adaptive horizon in samples (default: --batch)")
    parser.add_argument("--hold-until-target", action="store_true",
                        help="adaptive controller: do not lower beta before KL has reached the target once")
    parser.add_argument("--deadband", type=float, default=0.0,
                        help="adaptive controller: beta holds while |KL / target - 1| <= deadband (default 0)")
    parser.add_argument("--proportional", type=float, default=0.0,
                        help="adaptive controller: proportional gain k_p (default 0: Ziegler's integral rule alone)")
    parser.add_argument("--measure-before-update", action="store_true",
                        help="set each update's beta from the KL of its own batch, measured before the update "
                        "(rails.kl.measure_before_update; default: from the previous update's KL)")
    parser.add_argument("--probe", type=int, default=0,
                        help="also read each step's policy KL on this many fixed probe prompts (the eval split, one "
                        "sampled completion each; kl/probe): the policy's KL without the luck of a 16-prompt batch. "
                        "Costs a generation per step (default 0: off)")
    parser.add_argument("--no-fixed", action="store_true",
                        help="run the adaptive configuration only (half the time): the fixed-beta run of a seed does "
                        "not depend on the adaptive flags, so one invocation with it per seed is enough")
    parser.add_argument("--min-coef", type=float, default=1e-3,
                        help="adaptive controller: lower bound of beta (default 1e-3; equal to --beta: never below "
                        "the start)")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--lr-scheduler", default="linear", choices=["linear", "constant"],
                        help="learning-rate schedule (default linear: decays to 0 over --steps, so the pressure "
                        "fades; constant keeps it on for the whole run)")
    parser.add_argument("--adam-beta1", type=float, default=0.9,
                        help="Adam's first-moment decay (default 0.9, the trainers' default): the optimizer's "
                        "momentum, which carries each update's direction into the next ones")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from the band check (steps // 4)")
    args = parser.parse_args(argv)
    check_args(args, min_steps=8)
    target = args.target if args.target is not None else DEFAULT_TARGET[args.trainer]
    if target <= 0:
        raise SystemExit(f"--target={target}: must be > 0")
    horizon = args.horizon if args.horizon is not None else float(args.batch)
    if horizon <= 0:
        raise SystemExit(f"--horizon={horizon}: must be > 0 (samples)")
    if args.batch < 4 or args.batch % 4:
        raise SystemExit(f"--batch={args.batch}: GRPO samples 4 completions per prompt; use a multiple of 4")
    if not 0 < args.min_coef <= args.beta:
        raise SystemExit(f"--min-coef={args.min_coef}: must be > 0 and <= --beta={args.beta} (the start value)")
    if not args.proportional >= 0:
        raise SystemExit(f"--proportional={args.proportional}: must be >= 0 (0: Ziegler's rule alone)")
    if not args.deadband >= 0:
        raise SystemExit(f"--deadband={args.deadband}: must be >= 0 (0.5 holds beta inside [0.5, 1.5] x target)")
    if not 0 <= args.adam_beta1 < 1:
        raise SystemExit(f"--adam-beta1={args.adam_beta1}: must be in [0, 1) (0: no momentum; default 0.9)")
    if args.probe < 0 or args.probe == 1:
        raise SystemExit(f"--probe={args.probe}: use 0 (off) or at least 2 prompts (a standard error needs two)")
    warmup = args.warmup if args.warmup is not None else args.steps // 4
    if not 0 <= warmup < args.steps:
        raise SystemExit(f"--warmup={warmup}: must be in [0, --steps={args.steps})")
    warm = sft_warm_start(args)
    shared = {"model": warm, "reward": "length_exploit", "batch": args.batch,
              "num_generations": 4 if args.trainer == "safe_grpo" else 1,
              "max_completion_length": args.max_completion_length, "learning_rate": args.learning_rate,
              "beta": args.beta}
    shared["args"] = {"lr_scheduler_type": args.lr_scheduler, "adam_beta1": args.adam_beta1}
    if args.trainer == "safe_grpo":  # log `kl/exact` too: the band check without the token-sampling spread
        shared["exact_kl"] = True
        shared["probe_kl"] = args.probe
    elif args.probe:
        raise SystemExit(f"--probe={args.probe}: the probe KL is read for --trainer safe_grpo only")
    if args.trainer == "safe_ppo":
        shared["args"]["num_iterations"] = 1
    fixed = {"kl": {"controller": "fixed", "init_kl_coef": args.beta}}
    adaptive = {"kl": {"controller": "adaptive", "init_kl_coef": args.beta, "target": target,
                       "horizon": horizon, "min_coef": args.min_coef, "max_coef": 10.0,
                       "hold_until_target": args.hold_until_target, "deadband": args.deadband,
                       "proportional": args.proportional, "measure_before_update": args.measure_before_update}}
    configs = {
        "fixed": ("benchmarks._worker", base_config(args, args.trainer, rails=fixed, **shared), {}),
        "adaptive": ("benchmarks._worker", base_config(args, args.trainer, rails=adaptive, **shared), {}),
    }
    if args.no_fixed:
        del configs["fixed"]
    runs = interleaved(configs, args.repeats)
    rows, result = [], {"target": target, "horizon": horizon, "warmup": warmup, "kl_key": KL_KEY[args.trainer],
                        "warm_start": warm, "machine": machine(), "args": vars(args)}
    floors = {"fixed": args.beta, "adaptive": args.min_coef}
    for name, rs in runs.items():
        kls, above, restrained = [], [], []
        for r in rs:
            kl, beta = _series(r, KL_KEY[args.trainer])[warmup:], _series(r, "beta")[warmup:]
            kls += kl
            above += [k > 1.5 * target for k in kl]
            # below the band while the penalty is above its floor: the controller holds the policy back too much
            restrained += [k < 0.5 * target and b > floors[name] * (1 + 1e-9) for k, b in zip(kl, beta)]
        n = max(1, len(kls))
        inside = sum(0.5 * target <= k <= 1.5 * target for k in kls) / n
        exact = [k for r in rs for k in _series(r, EXACT_KEY)[warmup:]]
        inside_exact = sum(0.5 * target <= k <= 1.5 * target for k in exact) / len(exact) if exact else None
        # the exact KL's reading +- 2 standard errors over the batch's prompts still reaches into the band: a step
        # the batch cannot tell apart from one in band (kl/exact_se, benchmarks._worker.clustered_mean_se)
        probe = [k for r in rs for k in _series(r, PROBE_KEY)[warmup:]]
        inside_probe = sum(0.5 * target <= k <= 1.5 * target for k in probe) / len(probe) if probe else None
        se = [x for r in rs for x in _series(r, EXACT_SE_KEY)[warmup:]]
        plausible = None
        if se and len(se) == len(exact):
            plausible = sum(k + 2 * e >= 0.5 * target and k - 2 * e <= 1.5 * target for k, e in zip(exact, se))
            plausible /= len(exact)
        over, over_restrained = sum(above) / n, sum(restrained) / n
        below, failed = max(0.0, 1 - inside - over), over + over_restrained  # max: no "-0%" from rounding
        s = stats(kls)
        result[name] = {"kl_after_warmup": s, "share_in_band": inside, "share_above_band": over,
                        "share_below_band": below, "share_over_restrained": over_restrained,
                        "share_control_failed": failed, "share_in_band_exact": inside_exact,
                        "exact_kl_after_warmup": stats(exact) if exact else None,
                        "share_in_band_within_2se": plausible,
                        "share_in_band_probe": inside_probe,
                        "probe_kl_after_warmup": stats(probe) if probe else None,
                        "probe_kl_se_over_target": stats([e / target for r in rs
                                                          for e in _series(r, PROBE_KEY + "_se")[warmup:]])
                        if probe else None,
                        "exact_kl_se_over_target": stats([e / target for e in se]) if se else None}
        rows.append((name, f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]", f"{s['median'] / target:.2f}",
                     f"{100 * inside:.0f}%", f"{100 * over:.0f}%", f"{100 * below:.0f}%", f"{100 * failed:.0f}%",
                     "-" if inside_exact is None else f"{100 * inside_exact:.0f}%",
                     "-" if plausible is None else f"{100 * plausible:.0f}%",
                     "-" if inside_probe is None else f"{100 * inside_probe:.0f}%"))
    print_table(f"KL control: {KL_KEY[args.trainer]} ({KL_UNIT[args.trainer]}), target {target:g}, steps after "
                f"warm-up ({warmup})", rows,
                ("beta", "KL median [min, max]", "median/target", "in band", "above", "below", "control failed",
                 "in band (exact KL)", "exact within 2 SE of band", "in band (probe KL)"))
    fixed_run = result.get("fixed")
    ok, drift = result["adaptive"]["share_in_band"], fixed_run["share_in_band"] if fixed_run else None
    held = 1 - result["adaptive"]["share_control_failed"]
    # reading of the goal: nearly all adaptive steps in band, fixed mostly out (with --no-fixed: the adaptive side)
    met = ok >= 0.9 and (drift is None or drift < 0.5)
    result["goal_met"] = met
    result["goal_met_where_control_can_act"] = held >= 0.9 and (drift is None or drift < 0.5)
    fixed_text = "fixed beta not run" if drift is None else f"fixed beta: {100 * drift:.0f}%"
    print(f"goal: adaptive KL within [0.5, 1.5] x target after warm-up -> {100 * ok:.0f}% of steps in band "
          f"({fixed_text}); met when >= 90% while fixed < 50% -> {'met' if met else 'NOT met'}")
    print(f"where control can act (not counting steps below the band with beta at its floor): "
          f"{100 * held:.0f}% held -> {'met' if result['goal_met_where_control_can_act'] else 'NOT met'}")

    def fixed_share(key: str) -> str:
        return "fixed beta not run" if not fixed_run else f"fixed beta: {100 * (fixed_run[key] or 0):.0f}%"

    if result["adaptive"]["share_in_band_exact"] is not None:
        print(f"exact KL of each batch (no token-sampling spread): "
              f"{100 * result['adaptive']['share_in_band_exact']:.0f}% of adaptive steps in band "
              f"({fixed_share('share_in_band_exact')})")
    if result["adaptive"]["share_in_band_probe"] is not None:
        probe_se = result["adaptive"]["probe_kl_se_over_target"]["median"]
        print(f"probe KL ({args.probe} fixed prompts, median SE {probe_se:.2f}x target): "
              f"{100 * result['adaptive']['share_in_band_probe']:.0f}% of adaptive steps in band "
              f"({fixed_share('share_in_band_probe')})")
    if result["adaptive"]["share_in_band_within_2se"] is not None:
        se_ratio = result["adaptive"]["exact_kl_se_over_target"]["median"]
        print(f"sampling error of a batch's exact KL over its prompts: median SE {se_ratio:.2f}x target; "
              f"{100 * result['adaptive']['share_in_band_within_2se']:.0f}% of adaptive steps read within 2 SE of "
              f"the band ({fixed_share('share_in_band_within_2se')})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_beta, ax_len) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, color in (("fixed", "tab:grey"), ("adaptive", "tab:blue")):
        if name not in runs:
            continue
        run = runs[name][0]
        kl = _series(run, KL_KEY[args.trainer])
        steps = range(1, len(kl) + 1)
        ax_kl.plot(steps, kl, color=color, label=f"{name} beta", lw=1.4)
        exact = _series(run, EXACT_KEY)
        if exact:
            ax_kl.plot(range(1, len(exact) + 1), exact, color=color, ls="--", lw=0.9,
                       label=f"{name} beta, exact KL (no token sampling)")
        probe = _series(run, PROBE_KEY)
        if probe:
            ax_kl.plot(range(1, len(probe) + 1), probe, color=color, ls=":", lw=1.6,
                       label=f"{name} beta, probe KL ({args.probe} fixed prompts)")
        beta = _series(run, "beta")
        ax_beta.plot(range(1, len(beta) + 1), beta, color=color, label=name, lw=1.4)
        length = _series(run, "completions/mean_length")
        ax_len.plot(range(1, len(length) + 1), length, color=color, label=name, lw=1.4)
    ax_kl.axhline(target, color="tab:green", ls="--", lw=1, label=f"target {target:g}")
    ax_kl.axhspan(0.5 * target, 1.5 * target, color="tab:green", alpha=0.12, label="band 0.5x-1.5x target")
    ax_kl.axvline(warmup + 0.5, color="black", ls=":", lw=1, label=f"end of warm-up (step {warmup})")
    ax_kl.set_ylabel(f"KL to reference, {KL_UNIT[args.trainer]}")
    ax_kl.set_title("KL", fontsize=10)
    ax_beta.set_yscale("log")
    ax_beta.set_ylabel("KL coefficient beta (log scale)")
    ax_beta.set_title("beta", fontsize=10)
    ax_len.set_ylabel("tokens")
    ax_len.set_title("mean completion length", fontsize=10)
    for ax in (ax_kl, ax_beta, ax_len):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.legend(*ax_kl.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=5,
               frameon=False, fontsize=9)
    extras = [f"{k} {v:g}" for k, v in (("deadband", args.deadband), ("k_p", args.proportional)) if v]
    extras += ["hold until target"] if args.hold_until_target else []
    extras += ["KL measured before the update"] if args.measure_before_update else []
    extras += [f"floor {args.min_coef:g}"] if args.min_coef != 1e-3 else []
    extras += [f"Adam beta1 {args.adam_beta1:g}"] if args.adam_beta1 != 0.9 else []
    compared = "adaptive" if args.no_fixed else f"fixed beta {args.beta:g} vs adaptive"
    fig.suptitle(f"{args.trainer} under a length-exploitable reward: {compared} "
                 f"(target {target:g}, horizon {horizon:g} samples{', ' if extras else ''}{', '.join(extras)}), "
                 f"lr {args.learning_rate:g} ({args.lr_scheduler}), {args.batch} completions per step, "
                 f"seed {args.seed}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, args.out, "kl_control")
    write_json(args.out, "kl_control", {**result, "runs": runs})
    return result


if __name__ == "__main__":
    main()
