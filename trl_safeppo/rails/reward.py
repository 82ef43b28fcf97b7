"""Reward-shaping rails: each a `RewardRail` (pure `init`/`update`, JSON-able state), opt-in, logging under
`rails/<name>/...`. Formulas, references and defaults: docs/rails.md.

    non_finite_guard   NaN / inf / None -> a stated value (or the group mean of finite rewards); counted
    length_debias      r - b * (len - mean(len)), b the least-squares slope of r on len within the group / batch
    length_power       r / len**alpha
    missing_eos        r - penalty (or r := value) when the completion has no EOS
    length_linear      r - c * max(0, len - budget)
    overlong           r + factor * DAPO soft overlong punishment
    clip_rewards       clip(r, low, high)
    percentile_clip    clip(r, q_low, q_high), quantiles of a running window of past rewards (winsorizing)
    normalize_rewards  (r - mean) / sqrt(var + eps) with running (Welford / Chan) mean and variance

All tensors are CPU `(B,)`; statistics are computed in float64 and rewards returned as float32.
"""

from __future__ import annotations

import math

import torch

from .base import Metrics, RewardBatch, RewardRail, State

NON_FINITE_POLICIES = ("value", "group_mean")


def _groups(batch: RewardBatch) -> list[torch.Tensor]:
    """Index tensors of each group (one group holding the whole batch when `group_ids` is None)."""
    if batch.group_ids is None:
        return [torch.arange(len(batch))]
    return [torch.nonzero(batch.group_ids == g).flatten() for g in torch.unique(batch.group_ids)]


def _mean(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).mean()) if x.numel() else 0.0


# --- non-finite guard --------------------------------------------------------------------------------------------


def non_finite_guard(policy: str = "value", value: float = 0.0, name: str = "non_finite") -> RewardRail:
    """Replace NaN / +-inf / None (NaN in the batch) rewards so that they never reach the loss.

    Policies:
        "value":      r := value.
        "group_mean": r := mean of the finite rewards of the same group (the batch without groups), so that the
                      completion gets a zero group-relative advantage (it is masked out of GRPO's signal); `value`
                      when the group has no finite reward.
    State: `{"total": int}`, the number of rewards replaced since init.
    Metrics: `rails/<name>/count` (replaced in this batch), `rails/<name>/nan`, `rails/<name>/inf`,
    `rails/<name>/total`, `rails/<name>/share` (count / batch size; the `non_finite` tripwire's
    `max_repaired_share` reads it).
    """
    if policy not in NON_FINITE_POLICIES:
        raise ValueError(f"non_finite.policy must be one of {list(NON_FINITE_POLICIES)}, got {policy!r}")
    if not math.isfinite(value):
        raise ValueError(f"non_finite.value must be a finite number, got {value!r}")

    def init() -> State:
        return {"total": 0}

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        r = batch.rewards
        bad = ~torch.isfinite(r)
        n_nan, n_bad = int(torch.isnan(r).sum()), int(bad.sum())
        if n_bad:
            fill = torch.full_like(r, value)
            if policy == "group_mean":
                for idx in _groups(batch):
                    finite = r[idx][torch.isfinite(r[idx])]
                    if finite.numel():
                        fill[idx] = float(finite.to(torch.float64).mean())
            r = torch.where(bad, fill, r)
        total = state["total"] + n_bad
        metrics = {
            f"rails/{name}/count": float(n_bad),
            f"rails/{name}/nan": float(n_nan),
            f"rails/{name}/inf": float(n_bad - n_nan),
            f"rails/{name}/total": float(total),
            f"rails/{name}/share": n_bad / r.numel() if r.numel() else 0.0,
        }
        return batch.replace(rewards=r), {"total": total}, metrics

    return RewardRail(init, update)


# --- length rails ------------------------------------------------------------------------------------------------

DEBIAS_SCOPES = ("group", "batch")


def length_debias(scope: str = "group", name: str = "length_debias") -> RewardRail:
    """Remove the part of the reward explained linearly by length, within each group (or the whole batch).

    For the members of a scope: `b = cov(r, len) / var(len)` (least squares of r on len), then
    `r' = r - b * (len - mean(len))`. The mean reward of each scope is unchanged and `corr(r', len) = 0`.
    Scopes with one member or constant length are left as they are. Stateless.
    Metrics: `rails/<name>/slope` (mean slope b over scopes, reward per token), `rails/<name>/mean_abs_shift`.
    """
    if scope not in DEBIAS_SCOPES:
        raise ValueError(f"length.debias must be one of {list(DEBIAS_SCOPES)} or null, got {scope!r}")

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        r = batch.rewards.to(torch.float64)
        length = batch.lengths.to(torch.float64)
        new_r = r.clone()
        slopes = []
        groups = _groups(batch) if scope == "group" else [torch.arange(len(batch))]
        for idx in groups:
            x, y = length[idx], r[idx]
            dx = x - x.mean()
            var_x = float((dx * dx).sum())
            if idx.numel() < 2 or var_x == 0.0:
                continue
            slope = float((dx * (y - y.mean())).sum()) / var_x
            new_r[idx] = y - slope * dx
            slopes.append(slope)
        metrics = {
            f"rails/{name}/slope": sum(slopes) / len(slopes) if slopes else 0.0,
            f"rails/{name}/mean_abs_shift": _mean((new_r - r).abs()),
        }
        return batch.replace(rewards=new_r.to(torch.float32)), state, metrics

    return RewardRail(init, update)


def length_power(alpha: float, name: str = "length_power") -> RewardRail:
    """`r' = r / max(len, 1)**alpha` (alpha >= 0; 0 is the identity, 1 the per-token mean). Stateless.
    Metrics: `rails/<name>/mean_scale` (mean of 1 / len**alpha)."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"length.alpha must be a finite number >= 0, got {alpha!r}")

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        scale = batch.lengths.clamp(min=1).to(torch.float64) ** (-alpha)
        r = (batch.rewards.to(torch.float64) * scale).to(torch.float32)
        return batch.replace(rewards=r), state, {f"rails/{name}/mean_scale": _mean(scale)}

    return RewardRail(init, update)


def missing_eos(penalty: float | None = None, value: float | None = None, name: str = "missing_eos") -> RewardRail:
    """A truncated completion (no EOS) gets `r - penalty` (TRL's former PPO `missing_eos_penalty`), or `r := value`.
    Exactly one of `penalty` (>= 0) and `value` is set. Stateless.
    Metrics: `rails/<name>/count` (truncated completions), `rails/<name>/rate`."""
    if (penalty is None) == (value is None):
        raise ValueError("missing_eos: set exactly one of penalty (subtracted, >= 0) and value (the score given)")
    if penalty is not None and not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"missing_eos.penalty must be a finite number >= 0 (it is subtracted), got {penalty!r}")
    if value is not None and not math.isfinite(value):
        raise ValueError(f"missing_eos.value must be a finite number, got {value!r}")

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        t = batch.truncated
        r = batch.rewards
        r = torch.where(t, r - penalty, r) if penalty is not None else torch.where(t, torch.full_like(r, value), r)
        n = int(t.sum())
        metrics = {f"rails/{name}/count": float(n), f"rails/{name}/rate": n / max(len(batch), 1)}
        return batch.replace(rewards=r), state, metrics

    return RewardRail(init, update)


def length_linear(budget: int, penalty_per_token: float, name: str = "length_linear") -> RewardRail:
    """`r' = r - c * max(0, len - budget)` (budget >= 0 tokens, c >= 0). Stateless.
    Metrics: `rails/<name>/mean_penalty`, `rails/<name>/over_budget_rate`."""
    if not (isinstance(budget, int) and budget >= 0):
        raise ValueError(f"length.budget must be an integer >= 0 (tokens), got {budget!r}")
    if not (math.isfinite(penalty_per_token) and penalty_per_token >= 0):
        raise ValueError(f"length.penalty_per_token must be a finite number >= 0, got {penalty_per_token!r}")

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        over = (batch.lengths - budget).clamp(min=0).to(torch.float64)
        penalty = penalty_per_token * over
        r = (batch.rewards.to(torch.float64) - penalty).to(torch.float32)
        metrics = {f"rails/{name}/mean_penalty": _mean(penalty), f"rails/{name}/over_budget_rate": _mean(over > 0)}
        return batch.replace(rewards=r), state, metrics

    return RewardRail(init, update)


def overlong(
    buffer: int, factor: float = 1.0, max_completion_length: int | None = None, name: str = "overlong"
) -> RewardRail:
    """DAPO soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13), added to r:

        L_max = max_completion_length, L_cache = buffer
        p(len) = 0                                   if len <= L_max - L_cache
               = ((L_max - L_cache) - len) / L_cache if L_max - L_cache < len <= L_max
               = -1                                  if len > L_max
        r' = r + factor * p(len)

    `max_completion_length` defaults to the batch's. Stateless.
    Metrics: `rails/<name>/mean_penalty` (mean of -factor * p), `rails/<name>/in_buffer_rate`."""
    if not (isinstance(buffer, int) and buffer >= 1):
        raise ValueError(f"length.overlong_buffer must be an integer >= 1 (tokens), got {buffer!r}")
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"length.overlong_factor must be a finite number >= 0, got {factor!r}")
    if max_completion_length is not None and not (
        isinstance(max_completion_length, int) and max_completion_length >= buffer
    ):
        raise ValueError(
            f"length.max_completion_length must be an integer >= overlong_buffer ({buffer}), "
            f"got {max_completion_length!r}"
        )

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        l_max = max_completion_length if max_completion_length is not None else batch.max_completion_length
        if l_max is None:
            raise ValueError("overlong rail: set length.max_completion_length or build the batch with it")
        length = batch.lengths.to(torch.float64)
        expected = l_max - buffer
        p = ((expected - length) / buffer).clamp(min=-1.0, max=0.0)  # 0 below, linear in the buffer, -1 beyond
        r = (batch.rewards.to(torch.float64) + factor * p).to(torch.float32)
        in_buffer = (length > expected) & (length <= l_max)
        metrics = {f"rails/{name}/mean_penalty": _mean(-factor * p), f"rails/{name}/in_buffer_rate": _mean(in_buffer)}
        return batch.replace(rewards=r), state, metrics

    return RewardRail(init, update)


# --- clipping ----------------------------------------------------------------------------------------------------


def clip_rewards(low: float | None = None, high: float | None = None, name: str = "clip") -> RewardRail:
    """`r' = clip(r, low, high)`; either bound may be None (unbounded). Idempotent. Stateless.
    Metrics: `rails/<name>/low_frac`, `rails/<name>/high_frac` (fraction of the batch clipped at each bound)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"clip.low must be <= clip.high, got low={low!r} > high={high!r}")

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        r = batch.rewards
        low_frac = _mean(r < low) if low is not None else 0.0
        high_frac = _mean(r > high) if high is not None else 0.0
        if low is not None or high is not None:
            r = r.clamp(min=low, max=high)
        metrics = {f"rails/{name}/low_frac": low_frac, f"rails/{name}/high_frac": high_frac}
        return batch.replace(rewards=r), state, metrics

    return RewardRail(init, update)


def percentile_clip(
    lower: float | None = None, upper: float | None = None, window: int = 4096, name: str = "percentile_clip"
) -> RewardRail:
    """Winsorize against a running window: append the batch to the window of the last `window` rewards, then
    `r' = clip(r, q_lower, q_upper)` with the window's percentiles (linear interpolation, as `numpy.percentile`).
    Percentiles in [0, 100]; 0 and 100 are the identity.
    State: `{"window": [float, ...]}` (the last `window` rewards seen, oldest first).
    Metrics: `rails/<name>/low`, `rails/<name>/high` (thresholds used), `rails/<name>/clip_frac`."""
    for field, q in (("percentile_low", lower), ("percentile_high", upper)):
        if q is not None and not (0.0 <= q <= 100.0):
            raise ValueError(f"clip.{field} must be in [0, 100], got {q!r}")
    if lower is not None and upper is not None and lower > upper:
        raise ValueError(f"clip.percentile_low must be <= clip.percentile_high, got {lower!r} > {upper!r}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"clip.window must be an integer >= 1, got {window!r}")

    def init() -> State:
        return {"window": []}

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        history = (state["window"] + batch.rewards.tolist())[-window:]
        ref = torch.tensor(history, dtype=torch.float64)
        low = float(torch.quantile(ref, lower / 100.0)) if lower is not None and ref.numel() else None
        high = float(torch.quantile(ref, upper / 100.0)) if upper is not None and ref.numel() else None
        r = batch.rewards
        clipped = r.clamp(min=low, max=high) if (low is not None or high is not None) else r
        metrics = {f"rails/{name}/clip_frac": _mean(clipped != r)}
        if low is not None:
            metrics[f"rails/{name}/low"] = low
        if high is not None:
            metrics[f"rails/{name}/high"] = high
        return batch.replace(rewards=clipped), {"window": history}, metrics

    return RewardRail(init, update)


# --- running normalization ---------------------------------------------------------------------------------------


def welford_update(count: int, mean: float, m2: float, x: torch.Tensor) -> tuple[int, float, float]:
    """Merge a batch into running (count, mean, M2) with Chan et al.'s parallel form of Welford's algorithm
    (https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm):

        delta = mean_b - mean_a;  n = n_a + n_b
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta**2 * n_a * n_b / n          (variance = M2 / n)
    """
    x = x.to(torch.float64).flatten()
    n_b = int(x.numel())
    if n_b == 0:
        return count, mean, m2
    mean_b = float(x.mean())
    m2_b = float(((x - mean_b) ** 2).sum())
    n = count + n_b
    delta = mean_b - mean
    return n, mean + delta * n_b / n, m2 + m2_b + delta * delta * count * n_b / n


def normalize_rewards(shift_only: bool = False, eps: float = 1e-8, name: str = "normalize") -> RewardRail:
    """Running reward normalization: merge the batch into the running statistics, then
    `r' = (r - mean) / sqrt(var + eps)` (or `r - mean` with `shift_only`), var the population variance M2 / n.
    State: `{"count": int, "mean": float, "m2": float}`.
    Metrics: `rails/<name>/mean`, `rails/<name>/std` (running, after the update), `rails/<name>/count`."""
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"normalize.eps must be a finite number > 0, got {eps!r}")

    def init() -> State:
        return {"count": 0, "mean": 0.0, "m2": 0.0}

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        count, mean, m2 = welford_update(state["count"], state["mean"], state["m2"], batch.rewards)
        var = m2 / count if count else 0.0
        r = batch.rewards.to(torch.float64) - mean
        if not shift_only:
            r = r / math.sqrt(var + eps)
        metrics = {f"rails/{name}/mean": mean, f"rails/{name}/std": math.sqrt(var), f"rails/{name}/count": float(count)}
        return batch.replace(rewards=r.to(torch.float32)), {"count": count, "mean": mean, "m2": m2}, metrics

    return RewardRail(init, update)
