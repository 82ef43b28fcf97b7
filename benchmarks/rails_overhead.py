"""Benchmark 1, rails overhead: SafeGRPOTrainer with every reward rail and adaptive KL on, vs plain GRPOTrainer.

Same model, data, seed and batch; median seconds per optimizer step, end to end (generation, update, logging and
callbacks; first step of each run dropped as warm-up) and the ratio safe / plain. The safe run also has every
task-independent tripwire on (warn-only), as a real run would. Goal: ratio <= 1.03. The untrained tiny model
rarely emits EOS, so both runs generate the same number of tokens per step (printed, to check) and the ratio
measures the rails, not a change in completion length.
"""

from __future__ import annotations

from benchmarks._harness import (
    bar_panels, base_config, check_args, common_parser, fmt_stats, interleaved, load_stats, machine, print_table,
    save_figure, stats, timed_steps, write_json,
)

ALL_RAILS = {
    "non_finite": {"policy": "value", "value": 0.0},
    "missing_eos": {"penalty": 0.5},
    "length": {"debias": "group", "budget": 12, "penalty_per_token": 0.01, "overlong_buffer": 4},
    "clip": {"low": -5.0, "high": 5.0, "percentile_low": 1.0, "percentile_high": 99.0, "position": "after_norm"},
    "normalize": {"enabled": True},
    "kl": {"controller": "adaptive", "init_kl_coef": 0.04, "target": 0.1, "horizon": 1000, "min_coef": 0.001},
    # not reward rails, but on in any real run: every detector that needs no task-specific keys, warn-only
    "tripwires": [
        {"detector": "non_finite", "action": "stop"},
        {"detector": "kl_limit", "action": "warn", "params": {"limit": 10.0}},
        {"detector": "kl_acceleration", "action": "warn"},
        {"detector": "length_hacking", "action": "warn"},
        {"detector": "entropy_collapse", "action": "warn"},
        {"detector": "length_collapse", "action": "warn"},
        {"detector": "length_explosion", "action": "warn"},
    ],
}


def main(argv=None) -> dict:
    parser = common_parser("rails_overhead", __doc__.splitlines()[0], steps=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    args = parser.parse_args(argv)
    check_args(args, min_steps=2)
    shared = {"batch": args.batch, "num_generations": 4, "max_completion_length": args.max_completion_length}
    runs = interleaved(
        {
            "GRPOTrainer": ("benchmarks._worker", base_config(args, "grpo", **shared), {}),
            "SafeGRPOTrainer+rails": (
                "benchmarks._worker", base_config(args, "safe_grpo", rails=ALL_RAILS, **shared), {},
            ),
        },
        args.repeats,
    )
    plain = stats(timed_steps(runs["GRPOTrainer"], warmup=1))
    safe = stats(timed_steps(runs["SafeGRPOTrainer+rails"], warmup=1))
    ratio = safe["median"] / plain["median"]
    # the ratio compares equal work only if both generate as many tokens: check it rather than assume it
    tokens = {name: stats([t for r in rs for t in r["generated_tokens_per_step"][1:]]) for name, rs in runs.items()}
    # per-run ratios of medians (run i of each side ran back to back), to show the spread of the ratio itself
    per_run = [stats(a["step_seconds"][1:])["median"] / stats(b["step_seconds"][1:])["median"]
               for a, b in zip(runs["SafeGRPOTrainer+rails"], runs["GRPOTrainer"])]
    print_table(
        "rails overhead (seconds per step: median [min, max])",
        [("GRPOTrainer", fmt_stats(plain), f"{tokens['GRPOTrainer']['median']:.0f}", "1.000"),
         ("SafeGRPOTrainer + all rails", fmt_stats(safe), f"{tokens['SafeGRPOTrainer+rails']['median']:.0f}",
          f"{ratio:.3f}")],
        ("trainer", "s/step", "generated tokens/step", "ratio"),
    )
    print(f"ratio of each interleaved pair's medians: {', '.join(f'{x:.3f}' for x in per_run)}")
    print(f"goal: ratio <= 1.03 -> {'met' if ratio <= 1.03 else 'NOT met'}")
    result = {"plain": plain, "safe": safe, "ratio": ratio, "per_pair_ratios": per_run, "generated_tokens": tokens,
              "goal": 1.03, "load_at_run_start": load_stats(runs), "machine": machine(), "args": vars(args),
              "rails": ALL_RAILS}
    fig = bar_panels(
        [("seconds per step (median, [min, max])", {"GRPOTrainer": plain, "SafeGRPOTrainer\n+ all rails": safe})],
        f"rails overhead on {args.model}: ratio {ratio:.3f} (goal <= 1.03)\nbatch {args.batch}, "
        f"{args.max_completion_length} tokens, {args.steps} steps x {args.repeats} run(s) each, interleaved",
    )
    save_figure(fig, args.out, "rails_overhead")
    write_json(args.out, "rails_overhead", {**result, "runs": runs})
    return result


if __name__ == "__main__":
    main()
