"""Matplotlib figures of the run report, drawn from the trainers' logged history (``log_history.jsonl``).

The numbers are exactly those ``report_to`` sends to TensorBoard / W&B: the trainer's ``state.log_history``.
Each stage gets one figure with a panel per quantity that the stage logged:

- reward mean with a +-1 std band (``reward``, ``reward_std``); for DPO the implicit rewards
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``); for SFT the ``loss``;
- ``kl`` and the KL coefficient ``beta`` on twin axes;
- completion length mean with the min-max band, and the truncation rate (``completions/clipped_ratio``) on a
  twin axis;
- ``entropy``;
- for PPO, the policy and value clip fractions and the critic's explained variance.

Steps where a tripwire tripped are marked with a purple dotted vertical line in every panel.
Uses the Agg backend (no display needed); figures are written atomically (:mod:`trl_safeppo.fileio`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_path

C_MAIN, C_SECOND, C_THIRD, C_TRIP = "#1f77b4", "#d62728", "#2ca02c", "#9467bd"


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the history, skipping entries without a finite value."""
    xs, ys = [], []
    for i, entry in enumerate(history):
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(entry.get("step", i)))
            ys.append(float(v))
    return xs, ys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path, mode=0o644) as tmp:  # a report is meant to be shared
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _legend(ax, *others):
    handles, labels = ax.get_legend_handles_labels()
    for other in others:
        h, lab = other.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:  # below the x label, so it never hides data (twin axes would otherwise draw over it)
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=min(len(handles), 3),
                  fontsize=8, frameon=False)


def _dots(x: Sequence[float]) -> str | None:
    """A marker on each point of a short series: a rollout metric logged a few times is not mistaken for a line."""
    return "." if len(x) < 30 else None


def _panel_reward(ax, h) -> bool:
    x, y = series(h, "reward")
    if x:
        # PPO logs its rollout metrics once per rollout (every steps_per_generation * num_iterations optimizer steps),
        # its optimization metrics at every step: say so where the reward has fewer points than the steps
        sparse = len(x) < max(len(series(h, "loss")[0]), len(series(h, "entropy")[0]))
        ax.plot(x, y, color=C_MAIN, label="reward (mean of each rollout)" if sparse else "reward (mean)",
                marker="." if len(x) < 30 else None)
        sx, sd = series(h, "reward_std")
        if sx == x:
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=C_MAIN, alpha=0.2, label="± 1 std")
        ax.set_title("Reward")
        ax.set_ylabel("reward")
        _legend(ax)
        return True
    drawn = False
    for key, color in (("rewards/chosen", C_THIRD), ("rewards/rejected", C_SECOND), ("rewards/margins", C_MAIN)):
        x, y = series(h, key)
        if x:
            ax.plot(x, y, color=color, label=key, marker=_dots(x))
            drawn = True
    if drawn:
        ax.set_title("DPO implicit rewards")
        ax.set_ylabel("β · log-ratio")
        _legend(ax)
        return True
    x, y = series(h, "loss")
    if x:
        ax.plot(x, y, color=C_MAIN, label="loss", marker=_dots(x))
        ax.set_title("Training loss")
        ax.set_ylabel("loss")
        x2, y2 = series(h, "mean_token_accuracy")
        if x2:
            ax2 = ax.twinx()
            ax2.plot(x2, y2, color=C_THIRD, linestyle="--", label="token accuracy", marker=_dots(x2))
            ax2.set_ylabel("token accuracy", color=C_THIRD)
            _legend(ax, ax2)
        else:
            _legend(ax)
        return True
    return False


def _panel_kl(ax, h) -> bool:
    xk, yk = series(h, "kl")
    xb, yb = series(h, "beta")
    if not xk and not xb:
        return False
    ax.set_title("KL to reference and KL coefficient β" if xk and xb else "KL to reference" if xk else
                 "KL coefficient β")
    others = []
    if xk:
        ax.plot(xk, yk, color=C_MAIN, label="kl", marker=_dots(xk))
        ax.set_ylabel("kl", color=C_MAIN)
    if xb:
        target = ax.twinx() if xk else ax
        target.plot(xb, yb, color=C_SECOND, linestyle="--", label="β (kl coef)", marker=_dots(xb))
        target.set_ylabel("β", color=C_SECOND)
        if max(yb) - min(yb) <= 1e-9 * max(1.0, abs(max(yb))):  # constant β: show it as a flat line, not noise
            target.set_ylim(min(0.0, 2 * yb[0]), max(0.0, 2 * yb[0]) or 1.0)
        if target is not ax:
            others.append(target)
    _legend(ax, *others)
    return True


def _panel_length(ax, h) -> bool:
    x, y = series(h, "completions/mean_length")
    if not x:
        return False
    ax.plot(x, y, color=C_MAIN, label="mean length", marker=_dots(x))
    xl, lo = series(h, "completions/min_length")
    xh, hi = series(h, "completions/max_length")
    if xl == x and xh == x:
        ax.fill_between(x, lo, hi, color=C_MAIN, alpha=0.15, label="min – max")
    ax.set_title("Completion length and truncation")
    ax.set_ylabel("tokens")
    others = []
    xc, yc = series(h, "completions/clipped_ratio")
    if xc:
        ax2 = ax.twinx()
        ax2.plot(xc, yc, color=C_SECOND, linestyle="--", label="truncation rate", marker=_dots(xc))
        ax2.set_ylabel("truncation rate", color=C_SECOND)
        ax2.set_ylim(-0.02, 1.02)
        others.append(ax2)
    _legend(ax, *others)
    return True


def _panel_entropy(ax, h) -> bool:
    x, y = series(h, "entropy")
    if not x:
        return False
    ax.plot(x, y, color=C_MAIN, label="entropy", marker=_dots(x))
    ax.set_title("Policy entropy")
    ax.set_ylabel("nats / token")
    _legend(ax)
    return True


def _panel_ppo(ax, h) -> bool:
    drawn = False
    for key, label, color, style in (
        ("ppo/policy/clipfrac", "policy clip fraction", C_MAIN, "-"),
        ("ppo/val/clipfrac", "value clip fraction", C_SECOND, "--"),
    ):
        x, y = series(h, key)
        if x:
            ax.plot(x, y, color=color, linestyle=style, label=label, marker=_dots(x))
            drawn = True
    if drawn:
        ax.set_ylabel("clip fraction")
    others = []
    x, y = series(h, "ppo/val/explained_variance")
    if x:
        ax2 = ax.twinx() if drawn else ax  # no clip fractions logged: no empty left axis
        ax2.plot(x, y, color=C_THIRD, label="value explained variance", marker=_dots(x))
        ax2.axhline(0.0, color=C_THIRD, linewidth=0.8, linestyle=":")
        ax2.set_ylabel("explained variance", color=C_THIRD)
        if ax2 is not ax:
            others.append(ax2)
        drawn = True
    if drawn:
        ax.set_title("PPO: clipping and critic quality")
        _legend(ax, *others)
    return drawn


# panel -> the keys any of which makes it worth drawing
PANELS = {
    _panel_reward: ("reward", "rewards/chosen", "rewards/rejected", "rewards/margins", "loss"),
    _panel_kl: ("kl", "beta"),
    _panel_length: ("completions/mean_length",),
    _panel_entropy: ("entropy",),
    _panel_ppo: ("ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/val/explained_variance"),
}


def _present_panels(history: Sequence[Mapping[str, Any]]) -> list:
    history = [e for e in history if not any(str(k).startswith("eval_") for k in e)]
    return [p for p, keys in PANELS.items() if any(series(history, k)[0] for k in keys)]


def panel_names(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the panels ``plot_stage`` draws for this history, in order (reward, kl, length, entropy, ppo)."""
    return [p.__name__.removeprefix("_panel_") for p in _present_panels(history)]


def plot_stage(history: Sequence[Mapping[str, Any]], path: Path, *, title: str,
               trip_steps: Sequence[float] = ()) -> Path | None:
    """One figure for a stage (a panel per logged quantity); None when the stage logged none of them."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    history = [e for e in history if not any(str(k).startswith("eval_") for k in e)]
    present = _present_panels(history)
    if not present:
        return None
    cols = 2 if len(present) > 1 else 1
    rows = math.ceil(len(present) / cols)
    fig = plt.figure(figsize=(6.0 * cols, 3.9 * rows + 0.5))
    grid = fig.add_gridspec(rows, cols)
    axes = []
    for k in range(len(present)):  # an odd last panel spans the row: no empty cell in the grid
        r, c = divmod(k, cols)
        wide = cols == 2 and k == len(present) - 1 and len(present) % 2 == 1
        axes.append(fig.add_subplot(grid[r, :] if wide else grid[r, c]))
    for ax, panel in zip(axes, present):
        panel(ax, history)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for s in trip_steps:
            ax.axvline(s, color=C_TRIP, linestyle=":", linewidth=1.2)
    for ax in fig.axes:  # plain tick labels: no "+6.239" offset above the axis
        formatter = ax.yaxis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):
            formatter.set_useOffset(False)
    fig.suptitle(title + ("   (purple dotted line: tripwire trip)" if trip_steps else ""), fontsize=12)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


OVERVIEW_KEYS = (
    ("kl", "kl (training)"),
    ("reward", "reward"),
    ("reward_std", "reward std"),
    ("completions/mean_length", "mean length (tokens)"),
    ("entropy", "entropy"),
)
# Gate decision of a stage -> (marker, colour, legend label) in the overview's held-out row
DECISIONS = {
    "passed": ("o", C_THIRD, "gates passed"),
    "plateau": ("v", C_THIRD, "gates passed, ended early on a plateau"),
    "carried": ("X", "#ff7f0e", "gate failed: carried over (previous model handed on)"),
    "stopped": ("s", C_SECOND, "gate failed: run stopped"),
    "eval": ("D", "#7f7f7f", "eval stage"),
}


def plot_overview(stages: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path, *,
                  heldout: Sequence[Mapping[str, Any]] | None = None) -> Path | None:
    """The whole run at a glance, one column per stage.

    With ``heldout`` (one dict per stage, in the same order: ``accuracy``, ``kl_to_reference``, ``decision`` (a
    key of :data:`DECISIONS`, or None), ``final`` (the run's final model)), the first rows show the held-out
    accuracy of each stage's model with its gate decision and the KL of each stage's model to the SFT model on the
    held-out prompts; a dashed line follows the accuracy of the model handed on. Then the training curves: KL,
    reward, reward std, length and entropy; each stage gets the same width whatever its number of steps (its steps
    are scaled into it), so a 15-step PPO stage is as visible as a 125-step SFT stage.
    """
    stages = [(label, [e for e in h if not any(str(k).startswith("eval_") for k in e)]) for label, h in stages]
    keys = [(k, lab) for k, lab in OVERVIEW_KEYS if any(series(h, k)[0] for _, h in stages)]
    heldout = list(heldout or [])
    has_acc = any(_finite(h.get("accuracy")) for h in heldout)
    has_kl = any(_finite(h.get("kl_to_reference")) for h in heldout)
    n_rows = len(keys) + has_acc + has_kl
    if not n_rows or not stages:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    n = len(stages)
    fig, axes = plt.subplots(n_rows, 1, figsize=(max(8.0, 1.6 * n + 2), 1.75 * n_rows + 1.4), sharex=True,
                             squeeze=False)
    rows = list(axes[:, 0])
    used: dict[str, tuple] = {}
    if has_acc:
        ax = rows.pop(0)
        handed_x, handed_y, kept = [], [], None
        for i, h in enumerate(heldout[:n]):
            acc, decision = h.get("accuracy"), h.get("decision")
            if decision not in ("carried", "stopped", "eval") and _finite(acc):
                kept = acc
            if kept is not None and decision != "eval":
                handed_x.append(i + 0.5)
                handed_y.append(kept)
            if not _finite(acc):
                continue
            marker, color, label = DECISIONS.get(decision or "passed", DECISIONS["passed"])
            used.setdefault(decision or "passed", (marker, color, label))
            ax.plot([i + 0.5], [acc], marker=marker, color=color, markersize=9, linestyle="none", zorder=3)
            if h.get("final"):
                ax.plot([i + 0.5], [acc], marker="*", color="gold", markersize=20, markeredgecolor="black",
                        linestyle="none", zorder=2)
                used["final"] = ("*", "gold", "the run's final model")
            ax.annotate(f"{acc:.2f}", (i + 0.5, acc), textcoords="offset points", xytext=(11, -3), fontsize=8)
        if len(handed_x) > 1:
            ax.plot(handed_x, handed_y, color="#7f7f7f", linestyle="--", linewidth=1, zorder=1)
            used["handed"] = (None, "#7f7f7f", "accuracy of the model handed on")
        ax.set_ylim(-0.05, 1.1)
        ax.set_ylabel("held-out\naccuracy")
    if has_kl:
        ax = rows.pop(0)
        xs = [i + 0.5 for i, h in enumerate(heldout[:n]) if _finite(h.get("kl_to_reference"))]
        ys = [h["kl_to_reference"] for h in heldout[:n] if _finite(h.get("kl_to_reference"))]
        ax.plot(xs, ys, color=C_SECOND, marker="o", linestyle=":")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.3f}" if abs(y) >= 0.01 else f"{y:.2g}", (x, y), textcoords="offset points",
                        xytext=(8, 2), fontsize=8)
        ax.set_ylabel("KL to SFT\n(held-out)")
        ax.set_ylim(bottom=min(0.0, min(ys)), top=max(ys) * 1.25 if max(ys) > 0 else 1.0)
    for ax, (key, label) in zip(rows, keys):
        for i, (_, history) in enumerate(stages):
            xs, ys = series(history, key)
            if not xs:
                continue
            lo, hi = min(xs), max(xs)
            span = hi - lo
            xs = [i + 0.05 + 0.9 * ((x - lo) / span if span else 0.5) for x in xs]
            ax.plot(xs, ys, color=C_MAIN, marker="." if len(xs) < 30 else None)
        ax.set_ylabel(label)
    for ax in axes[:, 0]:
        for i in range(1, n):
            ax.axvline(i, color="#7f7f7f", linewidth=0.8, linestyle="--")
        ax.grid(axis="y", alpha=0.3)
        formatter = ax.yaxis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):
            formatter.set_useOffset(False)
    bottom = axes[-1, 0]
    bottom.set_xlim(0, n)
    bottom.set_xticks([i + 0.5 for i in range(n)], [label for label, _ in stages],
                      rotation=20 if n > 4 else 0, ha="right" if n > 4 else "center")
    bottom.set_xlabel("stage (each stage's steps scaled to its column)")
    fig.suptitle("The run at a glance", fontsize=12)
    if used:
        handles = [Line2D([], [], marker=m, color=c, linestyle="none" if m else "--", markersize=9 if m != "*" else 14,
                          markeredgecolor="black" if m == "*" else c, label=lab) for m, c, lab in used.values()]
        height = fig.get_figheight()  # the title takes ~0.45 in at the top, each legend row ~0.22 in under it
        legend_rows = math.ceil(len(handles) / 3)
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.42 / height),
                   ncols=min(3, len(handles)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 + 0.2 * legend_rows) / height))
    else:
        fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_heldout(stages: Sequence[tuple[str, Mapping[str, Any]]], path: Path) -> Path | None:
    """Bar chart across stages: held-out accuracy and format-pass rate (left), mean length (right)."""
    stages = [(name, ev) for name, ev in stages if ev]
    if not stages:
        return None
    plt = _pyplot()
    names = [name for name, _ in stages]
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(names) + 5), 3.8),
                                  gridspec_kw={"width_ratios": [2, 1.4]})
    rates = [("accuracy", C_MAIN), ("format_pass_rate", C_THIRD)]
    rates = [(k, c) for k, c in rates if any(isinstance(ev.get(k), (int, float)) for _, ev in stages)]
    width = 0.8 / max(1, len(rates))
    for j, (key, color) in enumerate(rates):
        xs = [i + (j - (len(rates) - 1) / 2) * width for i in range(len(names))]
        vals = [ev.get(key) if isinstance(ev.get(key), (int, float)) else 0.0 for _, ev in stages]
        bars = ax.bar(xs, vals, width=width, color=color, label=key.replace("_", " "))
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.3)  # room above the bars' labels for the legend, so it never hides a label at 1.00
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("fraction of held-out prompts")
    ax.set_title("Held-out accuracy and format-pass rate")
    ax.legend(loc="upper center", fontsize=8, ncols=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)

    lengths = [ev.get("mean_length") if isinstance(ev.get("mean_length"), (int, float)) else 0.0 for _, ev in stages]
    bars = axl.bar(range(len(names)), lengths, color="#7f7f7f", width=0.6)
    axl.bar_label(bars, labels=[f"{v:.1f}" for v in lengths], fontsize=8, padding=2)
    axl.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    axl.set_ylim(0, max(lengths + [1.0]) * 1.2)
    axl.set_ylabel("tokens")
    axl.set_title("Held-out mean completion length")
    axl.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
