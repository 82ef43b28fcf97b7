"""Tripwire detectors: pure functions over a metric history that return a typed `Verdict`.

`history` is a sequence of logged metric dicts, oldest first (e.g. the trainer's `state.log_history` filtered to
training steps). A detector reads the metric names of docs/architecture.md (`kl`, `reward`, `entropy`,
`completions/mean_length`, `rewards/<func>/mean`, ...), never acts: the trainers decide what to do
(`TripwireSpec.action`). Entries that lack a metric are skipped; too short a history gives "ok".

Windowed detectors compare the two halves of the last `window` values ("before" and "now"); baseline detectors
compare the mean of the last `smooth` values ("now") with the mean of the first `baseline` values ("start").
Every threshold is a parameter; formulas and defaults are in docs/rails.md.

This module imports nothing heavy (no torch), so recipes can be validated without it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "trip"]
History = Sequence[Mapping[str, Any]]
ACTIONS = ("warn", "raise_kl", "rollback", "stop")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one detector on one history.

    Attributes:
        status: "ok", "warn" (log it) or "trip" (the trainer takes the spec's action).
        detector: the detector's name.
        reason: one human sentence with the numbers.
        values: the numbers the decision used (JSON-able floats).
    """

    status: Status
    detector: str
    reason: str
    values: dict[str, float] = field(default_factory=dict)

    @property
    def tripped(self) -> bool:
        return self.status == "trip"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- helpers -----------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(history: History, key: str) -> list[float]:
    """The finite values of `key`, oldest first (entries without it, or with a non-finite value, are skipped)."""
    return [float(h[key]) for h in history if key in h and _finite(h[key])]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _halves(xs: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """The last `window` values split in two halves ("before", "now"); the middle value goes to neither when odd."""
    last = list(xs[-window:])
    h = window // 2
    return last[:h], last[-h:]


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = _mean(xs), _mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def _require(cond: bool, detector: str, name: str, accepted: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"tripwire {detector}: {name} must be {accepted}, got {value!r}")


def _check_window(detector: str, window: Any, minimum: int = 2) -> None:
    _require(isinstance(window, int) and window >= minimum, detector, "window", f"an integer >= {minimum}", window)


def _check_baseline(detector: str, baseline: Any, smooth: Any) -> None:
    _require(isinstance(baseline, int) and baseline >= 1, detector, "baseline", "an integer >= 1", baseline)
    _require(isinstance(smooth, int) and smooth >= 1, detector, "smooth", "an integer >= 1", smooth)


def _start_now(xs: Sequence[float], baseline: int, smooth: int) -> tuple[float, float] | None:
    if len(xs) < baseline + smooth:
        return None
    return _mean(xs[:baseline]), _mean(xs[-smooth:])


def _ok(detector: str, reason: str, values: dict[str, float] | None = None) -> Verdict:
    return Verdict("ok", detector, reason, values or {})


# --- detectors ---------------------------------------------------------------------------------------------------


def kl_limit(history: History, limit: float, warn_fraction: float = 0.8, key: str = "kl") -> Verdict:
    """Trip when the latest KL exceeds the hard `limit`; warn above `warn_fraction * limit`."""
    name = "kl_limit"
    _require(_finite(limit) and limit > 0, name, "limit", "a finite number > 0", limit)
    _require(_finite(warn_fraction) and 0 < warn_fraction <= 1, name, "warn_fraction", "in (0, 1]", warn_fraction)
    kl = _series(history, key)
    if not kl:
        return _ok(name, f"no {key} logged yet")
    values = {"kl": kl[-1], "limit": float(limit)}
    if kl[-1] > limit:
        return Verdict("trip", name, f"{key} = {kl[-1]:.4g} is above the hard limit {limit:.4g}", values)
    if kl[-1] > warn_fraction * limit:
        reason = f"{key} = {kl[-1]:.4g} is above {warn_fraction:.0%} of the limit {limit:.4g}"
        return Verdict("warn", name, reason, values)
    return _ok(name, f"{key} = {kl[-1]:.4g} <= {limit:.4g}", values)


def kl_acceleration(
    history: History,
    window: int = 7,
    factor: float = 3.0,
    warn_factor: float = 1.5,
    min_slope: float = 1e-3,
    key: str = "kl",
) -> Verdict:
    """Trip when KL grows faster and faster: with `d` the step-to-step differences over the last `window` values,
    `s_before` / `s_now` the means of the first / second half of `d`,
    trip if `s_now > factor * max(s_before, min_slope)`, warn if `s_now > warn_factor * max(s_before, min_slope)`.
    `min_slope` (KL units per logging step) keeps a flat KL with tiny noise from looking like acceleration."""
    name = "kl_acceleration"
    _check_window(name, window, minimum=3)
    _require(_finite(factor) and factor >= 1, name, "factor", "a finite number >= 1", factor)
    _require(
        _finite(warn_factor) and 1 <= warn_factor <= factor,
        name,
        "warn_factor",
        f"in [1, factor={factor}]",
        warn_factor,
    )
    _require(_finite(min_slope) and min_slope > 0, name, "min_slope", "a finite number > 0", min_slope)
    kl = _series(history, key)
    if len(kl) < window:
        return _ok(name, f"{len(kl)} {key} values, {window} needed")
    last = kl[-window:]
    d = [b - a for a, b in zip(last[:-1], last[1:])]
    h = len(d) // 2
    s_before, s_now = _mean(d[:h]), _mean(d[-h:])
    ref = max(s_before, min_slope)
    values = {"slope_before": s_before, "slope_now": s_now, "ratio": s_now / ref, "kl": kl[-1]}
    reason = f"{key} slope rose from {s_before:.4g} to {s_now:.4g} per step (x{s_now / ref:.3g})"
    if s_now > factor * ref:
        return Verdict("trip", name, reason, values)
    if s_now > warn_factor * ref:
        return Verdict("warn", name, reason, values)
    return _ok(name, f"{key} slope {s_now:.4g} per step", values)


def non_finite(
    history: History,
    keys: Sequence[str] = ("loss", "reward", "kl", "grad_norm"),
    count_key: str = "rails/non_finite/count",
    max_repaired_share: float = 0.5,
    share_key: str = "rails/non_finite/share",
) -> Verdict:
    """Trip when the latest entry has a NaN / inf / None value for any of `keys`, or when the reward guard repaired
    more than `max_repaired_share` of the step's rewards (`share_key`; 1 turns this check off): a guard that
    replaces every reward keeps the loss finite but leaves nothing to learn from. Warn when the guard replaced some
    rewards in that step (`count_key` > 0)."""
    name = "non_finite"
    _require(
        isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys), name, "keys", "a list of names", keys
    )
    _require(
        _finite(max_repaired_share) and 0 <= max_repaired_share <= 1,
        name, "max_repaired_share", "a number in [0, 1] such as 0.5 (1 turns the share check off)", max_repaired_share,
    )
    if not history:
        return _ok(name, "no history yet")
    last = history[-1]
    bad = [k for k in keys if k in last and not _finite(last[k])]
    if bad:
        values = {k: (float(last[k]) if isinstance(last[k], (int, float)) else float("nan")) for k in bad}
        return Verdict("trip", name, f"non-finite {', '.join(bad)} in the latest step", values)
    share = last.get(share_key)
    if _finite(share) and share > max_repaired_share:
        reason = (f"the guard repaired {share:.0%} of the step's rewards (non-finite or missing), more than "
                  f"max_repaired_share={max_repaired_share:g}")
        return Verdict("trip", name, reason, {"repaired_share": float(share), "max_repaired_share": max_repaired_share})
    count = last.get(count_key)
    if _finite(count) and count > 0:
        reason = f"{count:g} non-finite rewards were replaced by the guard"
        return Verdict("warn", name, reason, {"count": float(count)})
    return _ok(name, "all finite")


def length_hacking(
    history: History,
    window: int = 10,
    min_corr: float = 0.3,
    min_reward_rise: float = 0.0,
    reward_key: str = "reward",
    corr_key: str = "rails/diagnostics/reward_length_corr",
    length_key: str = "completions/mean_length",
) -> Verdict:
    """Reward rising while the reward-length correlation climbs.

    Over the last `window` entries ("before" / "now" halves): `reward_rise = mean(reward_now) - mean(reward_before)`,
    `corr_now`, `corr_rise` likewise from `corr_key` (the within-batch correlation of raw reward and length, logged by
    RewardRails). Trip if `reward_rise > min_reward_rise`, `corr_rise > 0` and `corr_now >= min_corr`; warn if the
    first two hold and `corr_now >= min_corr / 2`. When `corr_key` is not logged, the correlation across steps of
    `reward_key` and `length_key` over the window stands in for `corr_now`, and a rising mean length for `corr_rise`."""
    name = "length_hacking"
    _check_window(name, window, minimum=4)
    _require(_finite(min_corr) and -1 <= min_corr <= 1, name, "min_corr", "in [-1, 1]", min_corr)
    _require(_finite(min_reward_rise), name, "min_reward_rise", "a finite number", min_reward_rise)
    rows = [h for h in history if _finite(h.get(reward_key))]
    if len(rows) < window:
        return _ok(name, f"{len(rows)} {reward_key} values, {window} needed")
    rows = rows[-window:]
    r_before, r_now = _halves([float(h[reward_key]) for h in rows], window)
    reward_rise = _mean(r_now) - _mean(r_before)
    corr = [float(h[corr_key]) for h in rows if _finite(h.get(corr_key))]
    if len(corr) == window:
        c_before, c_now = _halves(corr, window)
        corr_now, corr_rise = _mean(c_now), _mean(c_now) - _mean(c_before)
    else:
        length = [float(h[length_key]) for h in rows if _finite(h.get(length_key))]
        if len(length) < window:
            return _ok(name, f"neither {corr_key} nor {length_key} logged on the last {window} steps")
        rewards = [float(h[reward_key]) for h in rows]
        l_before, l_now = _halves(length, window)
        corr_now, corr_rise = _pearson(rewards, length), _mean(l_now) - _mean(l_before)
    values = {"reward_rise": reward_rise, "corr": corr_now, "corr_rise": corr_rise}
    rising = reward_rise > min_reward_rise and corr_rise > 0
    reason = f"reward rose by {reward_rise:.4g} while reward-length correlation climbed to {corr_now:.3g}"
    if rising and corr_now >= min_corr:
        return Verdict("trip", name, reason, values)
    if rising and corr_now >= min_corr / 2:
        return Verdict("warn", name, reason, values)
    return _ok(name, f"reward-length correlation {corr_now:.3g}", values)


def format_gaming(
    history: History,
    format_key: str,
    accuracy_key: str,
    window: int = 10,
    saturation: float = 0.95,
    min_rise: float = 0.2,
    flat_tol: float = 0.02,
) -> Verdict:
    """A format reward saturating while accuracy stays flat.

    Over the last `window` entries ("before" / "now" halves): `format_now`, `format_rise`, `accuracy_change`.
    Trip if `format_now >= saturation`, `format_rise >= min_rise` and `accuracy_change <= flat_tol`;
    warn if only saturation is missing. `format_key` / `accuracy_key` are `rewards/<func>/mean` names."""
    name = "format_gaming"
    _check_window(name, window)
    _require(_finite(saturation), name, "saturation", "a finite number", saturation)
    _require(_finite(min_rise) and min_rise >= 0, name, "min_rise", "a finite number >= 0", min_rise)
    _require(_finite(flat_tol) and flat_tol >= 0, name, "flat_tol", "a finite number >= 0", flat_tol)
    rows = [h for h in history if _finite(h.get(format_key)) and _finite(h.get(accuracy_key))]
    if len(rows) < window:
        return _ok(name, f"{len(rows)} steps with {format_key} and {accuracy_key}, {window} needed")
    rows = rows[-window:]
    f_before, f_now = _halves([float(h[format_key]) for h in rows], window)
    a_before, a_now = _halves([float(h[accuracy_key]) for h in rows], window)
    format_now, format_rise = _mean(f_now), _mean(f_now) - _mean(f_before)
    accuracy_change = _mean(a_now) - _mean(a_before)
    values = {"format": format_now, "format_rise": format_rise, "accuracy_change": accuracy_change}
    gaming = format_rise >= min_rise and accuracy_change <= flat_tol
    reason = (
        f"{format_key} rose by {format_rise:.3g} to {format_now:.3g} "
        f"while {accuracy_key} changed by {accuracy_change:.3g}"
    )
    if gaming and format_now >= saturation:
        return Verdict("trip", name, reason, values)
    if gaming:
        return Verdict("warn", name, reason, values)
    return _ok(name, reason, values)


def entropy_collapse(
    history: History,
    ratio: float = 0.1,
    warn_ratio: float = 0.3,
    min_entropy: float = 0.01,
    baseline: int = 3,
    smooth: int = 1,
    key: str = "entropy",
) -> Verdict:
    """Trip when `entropy_now < ratio * entropy_start` or `entropy_now < min_entropy` (nats per token);
    warn when `entropy_now < warn_ratio * entropy_start`."""
    name = "entropy_collapse"
    _require(_finite(ratio) and 0 <= ratio <= 1, name, "ratio", "in [0, 1]", ratio)
    _require(_finite(warn_ratio) and ratio <= warn_ratio <= 1, name, "warn_ratio", f"in [ratio={ratio}, 1]", warn_ratio)
    _require(_finite(min_entropy) and min_entropy >= 0, name, "min_entropy", "a finite number >= 0", min_entropy)
    _check_baseline(name, baseline, smooth)
    sn = _start_now(_series(history, key), baseline, smooth)
    if sn is None:
        return _ok(name, f"not enough {key} history")
    start, now = sn
    values = {"start": start, "now": now}
    if now < min_entropy or now < ratio * start:
        return Verdict("trip", name, f"{key} fell from {start:.4g} to {now:.4g}", values)
    if now < warn_ratio * start:
        return Verdict("warn", name, f"{key} fell from {start:.4g} to {now:.4g}", values)
    return _ok(name, f"{key} {now:.4g} (start {start:.4g})", values)


def length_collapse(
    history: History,
    ratio: float = 0.3,
    warn_ratio: float = 0.5,
    min_length: float | None = None,
    baseline: int = 3,
    smooth: int = 1,
    key: str = "completions/mean_length",
) -> Verdict:
    """Trip when `length_now < ratio * length_start` (or below `min_length` tokens when set);
    warn when `length_now < warn_ratio * length_start`."""
    name = "length_collapse"
    _require(_finite(ratio) and 0 <= ratio <= 1, name, "ratio", "in [0, 1]", ratio)
    _require(_finite(warn_ratio) and ratio <= warn_ratio <= 1, name, "warn_ratio", f"in [ratio={ratio}, 1]", warn_ratio)
    _require(
        min_length is None or (_finite(min_length) and min_length >= 0), name, "min_length", "null or >= 0", min_length
    )
    _check_baseline(name, baseline, smooth)
    sn = _start_now(_series(history, key), baseline, smooth)
    if sn is None:
        return _ok(name, f"not enough {key} history")
    start, now = sn
    values = {"start": start, "now": now}
    if now < ratio * start or (min_length is not None and now < min_length):
        return Verdict("trip", name, f"{key} fell from {start:.4g} to {now:.4g} tokens", values)
    if now < warn_ratio * start:
        return Verdict("warn", name, f"{key} fell from {start:.4g} to {now:.4g} tokens", values)
    return _ok(name, f"{key} {now:.4g} (start {start:.4g})", values)


def length_explosion(
    history: History,
    ratio: float = 3.0,
    warn_ratio: float = 2.0,
    max_clipped: float = 0.5,
    warn_clipped: float = 0.25,
    baseline: int = 3,
    smooth: int = 1,
    key: str = "completions/mean_length",
    clipped_key: str = "completions/clipped_ratio",
) -> Verdict:
    """Trip when `length_now > ratio * length_start` or the truncation rate (`clipped_key`, latest value) reaches
    `max_clipped`; warn at `warn_ratio` / `warn_clipped`."""
    name = "length_explosion"
    _require(_finite(ratio) and ratio >= 1, name, "ratio", "a finite number >= 1", ratio)
    _require(_finite(warn_ratio) and 1 <= warn_ratio <= ratio, name, "warn_ratio", f"in [1, ratio={ratio}]", warn_ratio)
    _require(_finite(max_clipped) and 0 < max_clipped <= 1, name, "max_clipped", "in (0, 1]", max_clipped)
    _require(
        _finite(warn_clipped) and 0 < warn_clipped <= max_clipped,
        name,
        "warn_clipped",
        f"in (0, max_clipped={max_clipped}]",
        warn_clipped,
    )
    _check_baseline(name, baseline, smooth)
    clipped = _series(history, clipped_key)
    clip_now = clipped[-1] if clipped else 0.0
    sn = _start_now(_series(history, key), baseline, smooth)
    start, now = sn if sn is not None else (float("nan"), float("nan"))
    values = {"start": start, "now": now, "clipped_ratio": clip_now} if sn is not None else {"clipped_ratio": clip_now}
    grown = sn is not None and now > ratio * start
    if grown or clip_now >= max_clipped:
        return Verdict("trip", name, f"{key} {now:.4g} (start {start:.4g}), truncation rate {clip_now:.3g}", values)
    if (sn is not None and now > warn_ratio * start) or clip_now >= warn_clipped:
        return Verdict("warn", name, f"{key} {now:.4g} (start {start:.4g}), truncation rate {clip_now:.3g}", values)
    return _ok(name, f"{key} {now:.4g} (start {start:.4g}), truncation rate {clip_now:.3g}", values)


def _reward_streaks(history: History, suffix: str, hit: Callable[[float], bool]) -> dict[str, tuple[int, float]]:
    """For every reward function with a `rewards/<func><suffix>` metric in the latest entry: the number of latest
    consecutive entries whose value satisfies `hit` (an entry without the metric ends the run), and the latest value."""
    if not history:
        return {}
    out = {}
    for key, value in history[-1].items():
        if not (key.startswith("rewards/") and key.endswith(suffix)) or not _finite(value):
            continue
        streak = 0
        for entry in reversed(history):
            v = entry.get(key)
            if not (_finite(v) and hit(float(v))):
                break
            streak += 1
        out[key[len("rewards/"):-len(suffix)]] = (streak, float(value))
    return out


def _streak_verdict(name: str, streaks: dict[str, tuple[int, float]], patience: int, what: str) -> Verdict:
    """Trip when some function's run reached `patience` logged steps; warn while a run is shorter."""
    running = {func: sv for func, sv in streaks.items() if sv[0] > 0}
    if not running:
        return _ok(name, f"no reward function {what}")
    values = {f"{func}/steps": float(n) for func, (n, _) in running.items()}
    values.update({f"{func}/share": share for func, (_, share) in running.items()})
    parts = ", ".join(f"{func!r} for {n} logged step(s) (share {share:.0%})" for func, (n, share) in running.items())
    status = "trip" if max(n for n, _ in running.values()) >= patience else "warn"
    return Verdict(status, name, f"reward {what}: {parts}; patience {patience}", values)


def silent_reward(history: History, patience: int = 1, share: float = 1.0, suffix: str = "/none_frac") -> Verdict:
    """A reward function (or a rule of a checker) that contributes nothing: trip when its share of unscored
    completions (`rewards/<func>/none_frac`: None, NaN, or a timed-out call) is `>= share` on the last `patience`
    logged steps in a row; warn on a shorter run. With `logging_steps > 1` a logged value is the mean over the
    interval, so the default `share` 1.0 means "silent on every step of the interval"."""
    name = "silent_reward"
    _require(isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1, name, "patience",
             "an integer >= 1", patience)
    _require(_finite(share) and 0 < share <= 1, name, "share", "a number in (0, 1]", share)
    streaks = _reward_streaks(history, suffix, lambda v: v >= share - 1e-9)
    return _streak_verdict(name, streaks, patience, f"gave no score to >= {share:.0%} of the completions")


def reward_timeout(history: History, patience: int = 1, suffix: str = "/timeout") -> Verdict:
    """A reward function that did not answer within its timeout (`rewards/<func>/timeout` > 0: the share of its
    calls in the logged step that were cut off, their scores None). Trip when that happened on the last `patience`
    logged steps in a row; warn on a shorter run."""
    name = "reward_timeout"
    _require(isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1, name, "patience",
             "an integer >= 1", patience)
    streaks = _reward_streaks(history, suffix, lambda v: v > 0)
    return _streak_verdict(name, streaks, patience, "timed out")


DETECTORS: dict[str, Callable[..., Verdict]] = {
    "kl_limit": kl_limit,
    "kl_acceleration": kl_acceleration,
    "non_finite": non_finite,
    "length_hacking": length_hacking,
    "format_gaming": format_gaming,
    "entropy_collapse": entropy_collapse,
    "length_collapse": length_collapse,
    "length_explosion": length_explosion,
    "silent_reward": silent_reward,
    "reward_timeout": reward_timeout,
}


@dataclass
class TripwireSpec:
    """One configured tripwire: which detector, what the trainer does on a trip, and the detector's parameters.

    Attributes:
        detector: one of `DETECTORS` (kl_limit, kl_acceleration, non_finite, length_hacking, format_gaming,
            entropy_collapse, length_collapse, length_explosion, silent_reward, reward_timeout).
        action: on "trip": "warn" (log only), "raise_kl" (raise the KL coefficient), "rollback" (back to the last
            good checkpoint), "stop" (end training). "warn" verdicts are only logged, whatever the action.
        params: keyword arguments of the detector (thresholds, window, metric names).

    Validated on construction: unknown detector, action or parameter names, missing required parameters and
    out-of-range values raise ValueError listing what is accepted.
    """

    detector: str
    action: str = "warn"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"tripwire detector must be one of {sorted(DETECTORS)}, got {self.detector!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"tripwire {self.detector}: action must be one of {list(ACTIONS)}, got {self.action!r}")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"tripwire {self.detector}: params must be a mapping, got {self.params!r}")
        self.params = dict(self.params)
        signature = inspect.signature(DETECTORS[self.detector])
        accepted = [p for p in signature.parameters if p != "history"]
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise ValueError(f"tripwire {self.detector}: unknown params {unknown}; accepted: {accepted}")
        missing = [
            p for p in accepted if signature.parameters[p].default is inspect.Parameter.empty and p not in self.params
        ]
        if missing:
            raise ValueError(f"tripwire {self.detector}: missing required params {missing}; accepted: {accepted}")
        self.check([])  # runs the detector's own range checks now, at config time

    def check(self, history: History) -> Verdict:
        """Run the detector on `history` (oldest first)."""
        return DETECTORS[self.detector](history, **self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "action": self.action, "params": dict(self.params)}


def parse_tripwires(specs: Any, field: str = "tripwires") -> list[TripwireSpec]:
    """`{detector, action, params}` mappings (or `TripwireSpec`s) -> `TripwireSpec`s; `None` -> `[]`. Bad input
    raises one ValueError naming `<field>[i].<key>`, the value and what is accepted."""
    if specs is None:
        return []
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"{field}={specs!r} must be a list of {{detector, action, params}} entries")
    parsed = []
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if isinstance(spec, TripwireSpec):
            parsed.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}={spec!r} must be a mapping with keys detector, action, params")
        unknown = sorted(set(spec) - {"detector", "action", "params"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; accepted: detector, action, params")
        detector, action = spec.get("detector"), spec.get("action", "warn")
        if detector not in DETECTORS:
            raise ValueError(f"{where}.detector={detector!r} is not a detector; accepted: {sorted(DETECTORS)}")
        if action not in ACTIONS:
            raise ValueError(f"{where}.action={action!r} is not a tripwire action; accepted: {list(ACTIONS)}")
        try:
            parsed.append(TripwireSpec(detector, action, spec.get("params") or {}))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}.params: {err}") from None
    return parsed


def evaluate(specs: Sequence[TripwireSpec], history: History) -> list[tuple[TripwireSpec, Verdict]]:
    """Run every spec on `history`; returns `(spec, verdict)` pairs in the specs' order."""
    return [(spec, spec.check(history)) for spec in specs]


# --- the action ladder -------------------------------------------------------------------------------------------

SEVERITY = {"warn": 0, "raise_kl": 1, "rollback": 2, "stop": 3}


@dataclass(frozen=True)
class Decision:
    """What the trainer does on a trip (the output of `escalate`).

    Attributes:
        action: the action to take ("warn", "raise_kl", "rollback", "stop").
        beta: the new KL coefficient for "raise_kl", else None.
        escalated_from: the action asked for when the ladder moved up ("raise_kl", "rollback"), else None.
        why: one sentence saying why it moved up ("" when it did not).
    """

    action: str
    beta: float | None = None
    escalated_from: str | None = None
    why: str = ""


def init_ladder() -> dict[str, int]:
    """The ladder's state: rollbacks taken so far in the stage (plain JSON)."""
    return {"rollbacks": 0}


def escalate(
    action: str,
    state: Mapping[str, int],
    *,
    beta: float,
    raise_kl_factor: float,
    max_beta: float,
    max_rollbacks: int,
) -> tuple[Decision, dict[str, int]]:
    """The action ladder `raise_kl -> rollback -> stop`, as a pure function: `(action asked, state) -> (decision,
    new state)`; `state` is never mutated.

    - `raise_kl`: `beta' = min(beta * raise_kl_factor, max_beta)` while `beta < max_beta`; a `raise_kl` trip with
      beta already at `max_beta` (or at 0, which no factor raises) is exhausted and moves up to `rollback`.
    - `rollback`: taken while fewer than `max_rollbacks` rollbacks were; then it moves up to `stop`.
    - `warn`, `stop`: unchanged.

    Example (beta 0.1, factor 2, max_beta 0.4, max_rollbacks 1, beta left as the decisions set it): the trips give
    raise_kl (0.2), raise_kl (0.4), rollback (beta at its max), stop (rollbacks used up).
    """
    if action not in SEVERITY:
        raise ValueError(f"tripwire action must be one of {list(SEVERITY)}, got {action!r}")
    rollbacks = int(state.get("rollbacks", 0))
    if action == "raise_kl":
        if beta > 0 and beta < max_beta * (1 - 1e-9):
            return Decision("raise_kl", beta=min(beta * raise_kl_factor, max_beta)), {"rollbacks": rollbacks}
        why = f"beta {beta:.4g} is at its max {max_beta:.4g}, so raise_kl cannot hold the KL"
        decision, new_state = escalate("rollback", state, beta=beta, raise_kl_factor=raise_kl_factor,
                                       max_beta=max_beta, max_rollbacks=max_rollbacks)
        why = f"{why}; {decision.why}" if decision.why else why
        return Decision(decision.action, escalated_from="raise_kl", why=why), new_state
    if action == "rollback":
        if rollbacks < max_rollbacks:
            return Decision("rollback"), {"rollbacks": rollbacks + 1}
        why = f"{rollbacks} rollback(s) taken, tripwire_max_rollbacks={max_rollbacks}"
        return Decision("stop", escalated_from="rollback", why=why), {"rollbacks": rollbacks}
    return Decision(action), {"rollbacks": rollbacks}
