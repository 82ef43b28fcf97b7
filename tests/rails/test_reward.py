"""Reward-shaping rails: hand-derived values and properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from trl_safeppo.rails.base import chain
from trl_safeppo.rails.reward import (
    clip_rewards,
    length_debias,
    length_linear,
    length_power,
    missing_eos,
    non_finite_guard,
    normalize_rewards,
    overlong,
    percentile_clip,
    welford_update,
)

from .test_base import batch


def run(rail, b, state=None):
    return rail.update(b, rail.init() if state is None else state)


# --- non-finite guard -------------------------------------------------------------------------------------------


def test_non_finite_value_policy_counts_and_replaces():
    rail = non_finite_guard("value", 0.0)
    out, state, m = run(rail, batch([1.0, float("nan"), float("inf"), float("-inf")]))
    assert_close(out.rewards, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert m["rails/non_finite/count"] == 3 and m["rails/non_finite/nan"] == 1 and m["rails/non_finite/inf"] == 2
    assert m["rails/non_finite/share"] == 0.75  # 3 of 4 repaired, read by the non_finite tripwire
    _, state, m = run(rail, batch([float("nan")]), state)
    assert state == {"total": 4} and m["rails/non_finite/total"] == 4


def test_non_finite_group_mean_policy():
    # group 0: finite 1 and 3 -> NaN becomes 2; group 1: nothing finite -> fallback value -1
    rail = non_finite_guard("group_mean", -1.0)
    out, _, _ = run(rail, batch([1.0, 3.0, float("nan"), float("nan"), float("inf")], group_ids=[0, 0, 0, 1, 1]))
    assert_close(out.rewards, torch.tensor([1.0, 3.0, 2.0, -1.0, -1.0]))


def test_non_finite_bad_policy():
    with pytest.raises(ValueError, match="policy"):
        non_finite_guard("drop")


# --- length rails -----------------------------------------------------------------------------------------------


def test_length_debias_hand_values():
    # group 0: r = [1, 2, 3], len = [1, 2, 3]: slope b = cov/var = 1, r' = r - 1 * (len - 2) = [2, 2, 2]
    # group 1: r = [0, 1, 0], len = [1, 2, 3]: cov = (-1)(-1/3) + 0 + (1)(-1/3) = 0 -> unchanged
    # group 2: constant length -> unchanged
    b = batch([1, 2, 3, 0, 1, 0, 5, 6], lengths=[1, 2, 3, 1, 2, 3, 4, 4], group_ids=[0, 0, 0, 1, 1, 1, 2, 2])
    out, _, m = run(length_debias("group"), b)
    assert_close(out.rewards, torch.tensor([2.0, 2.0, 2.0, 0.0, 1.0, 0.0, 5.0, 6.0]))
    assert m["rails/length_debias/slope"] == pytest.approx(0.5)  # mean of slopes 1 and 0


def test_length_debias_properties_random():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 50, (32,), generator=gen)
    rewards = 0.1 * lengths + torch.randn(32, generator=gen)
    groups = torch.arange(32) // 8
    b = batch(rewards.tolist(), lengths=lengths.tolist(), group_ids=groups.tolist())
    out, _, _ = run(length_debias("group"), b)
    for g in range(4):
        idx = groups == g
        assert_close(out.rewards[idx].double().mean(), rewards[idx].double().mean(), atol=1e-5, rtol=0)  # mean kept
        corr = np.corrcoef(out.rewards[idx].numpy(), lengths[idx].numpy())[0, 1]
        assert abs(corr) < 1e-4  # nothing left that length explains linearly
    out_b, _, _ = run(length_debias("batch"), b)
    assert abs(np.corrcoef(out_b.rewards.numpy(), lengths.numpy())[0, 1]) < 1e-4


def test_length_power():
    # alpha = 1: [2 / 4, 3 / max(0, 1)] = [0.5, 3]; alpha = 0.5: 2 / sqrt(4) = 1; alpha = 0 is the identity
    b = batch([2.0, 3.0], lengths=[4, 0])
    assert_close(run(length_power(1.0), b)[0].rewards, torch.tensor([0.5, 3.0]))
    assert_close(run(length_power(0.5), b)[0].rewards[:1], torch.tensor([1.0]))
    assert_close(run(length_power(0.0), b)[0].rewards, b.rewards)
    with pytest.raises(ValueError, match="alpha"):
        length_power(-0.5)


def test_missing_eos():
    b = batch([1.0, 1.0], truncated=[False, True])
    out, _, m = run(missing_eos(penalty=0.5), b)
    assert_close(out.rewards, torch.tensor([1.0, 0.5]))  # 1 - 0.5 on the truncated one
    assert m == {"rails/missing_eos/count": 1.0, "rails/missing_eos/rate": 0.5}
    assert_close(run(missing_eos(value=-1.0), b)[0].rewards, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="exactly one"):
        missing_eos()
    with pytest.raises(ValueError, match="penalty"):
        missing_eos(penalty=-1.0)


def test_length_linear():
    # budget 3, 0.1 per token beyond: len 2 -> 0, len 3 -> 0, len 5 -> 0.2
    out, _, m = run(length_linear(3, 0.1), batch([1.0, 1.0, 1.0], lengths=[2, 3, 5]))
    assert_close(out.rewards, torch.tensor([1.0, 1.0, 0.8]))
    assert m["rails/length_linear/over_budget_rate"] == pytest.approx(1 / 3)


def test_overlong_dapo():
    # L_max = 10, L_cache = 4 -> free up to 6; p(8) = (6 - 8) / 4 = -0.5; p(10) = -1; beyond -> -1
    b = batch([1.0, 1.0, 1.0, 1.0, 1.0], lengths=[3, 6, 8, 10, 12], max_len=10)
    out, _, m = run(overlong(4), b)
    assert_close(out.rewards, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    assert m["rails/overlong/in_buffer_rate"] == pytest.approx(2 / 5)  # 8 and 10
    out, _, _ = run(overlong(4, factor=2.0, max_completion_length=10), b.replace(max_completion_length=None))
    assert_close(out.rewards, torch.tensor([1.0, 1.0, 0.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="max_completion_length"):
        run(overlong(4), b.replace(max_completion_length=None))


# --- clipping ---------------------------------------------------------------------------------------------------


def test_clip_hand_values_and_idempotence():
    b = batch([-3.0, -0.5, 0.0, 2.5])
    rail = clip_rewards(-1.0, 1.0)
    once, _, m = run(rail, b)
    assert_close(once.rewards, torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    assert m == {"rails/clip/low_frac": 0.25, "rails/clip/high_frac": 0.25}
    twice, _, _ = run(rail, once)
    assert_close(twice.rewards, once.rewards)  # clipping twice = once
    assert_close(run(clip_rewards(high=0.0), b)[0].rewards, torch.tensor([-3.0, -0.5, 0.0, 0.0]))


def test_clip_huge_range_is_identity():
    b = batch(torch.randn(64, generator=torch.Generator().manual_seed(2)).mul(100).tolist())
    assert_close(run(clip_rewards(-1e30, 1e30), b)[0].rewards, b.rewards)
    assert_close(run(percentile_clip(0.0, 100.0), b)[0].rewards, b.rewards)
    with pytest.raises(ValueError, match="low"):
        clip_rewards(1.0, -1.0)


def test_percentile_clip_running_window():
    rail = percentile_clip(25.0, 75.0, window=5)
    # window [1..5] (the first batch): q25 = 2, q75 = 4 (linear interpolation, numpy's default)
    out, state, m = run(rail, batch([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert_close(out.rewards, torch.tensor([2.0, 2.0, 3.0, 4.0, 4.0]))
    assert state == {"window": [1.0, 2.0, 3.0, 4.0, 5.0]} and m["rails/percentile_clip/clip_frac"] == pytest.approx(0.4)
    # next batch [10]: window = last 5 raw rewards [2, 3, 4, 5, 10]; q25 = 3, q75 = 5 -> 10 is clipped to 5
    out, state, m = run(rail, batch([10.0]), state)
    assert_close(out.rewards, torch.tensor([5.0]))
    assert m["rails/percentile_clip/low"] == pytest.approx(3.0)
    assert m["rails/percentile_clip/high"] == pytest.approx(5.0)
    assert state == {"window": [2.0, 3.0, 4.0, 5.0, 10.0]}
    # a window of 3 keeps only the last 3 of the batch: [3, 4, 5] -> q25 = 3.5, q75 = 4.5
    out, _, _ = run(percentile_clip(25.0, 75.0, window=3), batch([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert_close(out.rewards, torch.tensor([3.5, 3.5, 3.5, 4.0, 4.5]))
    with pytest.raises(ValueError, match="percentile_high"):
        percentile_clip(0.0, 101.0)


# --- normalization ----------------------------------------------------------------------------------------------


def test_normalize_hand_values():
    rail = normalize_rewards()
    # batch [1, 3]: mean 2, population var 1 -> [-1, 1] / sqrt(1 + 1e-8)
    out, state, _ = run(rail, batch([1.0, 3.0]))
    assert_close(out.rewards, torch.tensor([-1.0, 1.0]))
    assert state == {"count": 2, "mean": 2.0, "m2": 2.0}
    # batch [5]: all seen = [1, 3, 5], mean 3, var 8/3 -> (5 - 3) / sqrt(8/3) = 1.2247449
    out, state, m = run(rail, batch([5.0]), state)
    assert_close(out.rewards, torch.tensor([1.2247449]))
    assert m["rails/normalize/std"] == pytest.approx((8 / 3) ** 0.5)
    # shift only: 5 - 3 = 2
    out, _, _ = run(normalize_rewards(shift_only=True), batch([5.0]), {"count": 2, "mean": 2.0, "m2": 2.0})
    assert_close(out.rewards, torch.tensor([2.0]))


def test_welford_batched_equals_numpy_over_concatenation():
    rng = np.random.default_rng(3)
    count, mean, m2 = 0, 0.0, 0.0
    seen = []
    for size in (1, 7, 64, 3, 500, 2):
        x = rng.normal(loc=1e4, scale=3.0, size=size)  # large offset: a naive sum-of-squares would lose digits
        seen.append(x)
        count, mean, m2 = welford_update(count, mean, m2, torch.from_numpy(x))
        allx = np.concatenate(seen)
        assert count == allx.size
        assert mean == pytest.approx(allx.mean(), rel=1e-12)
        assert m2 / count == pytest.approx(allx.var(), rel=1e-9)


def test_chain_state_round_trips_through_json():
    rail = chain(
        ("guard", non_finite_guard()), ("pclip", percentile_clip(5.0, 95.0, window=16)), ("norm", normalize_rewards())
    )
    gen = torch.Generator().manual_seed(4)
    b1, b2 = (batch(torch.randn(10, generator=gen).tolist()) for _ in range(2))
    _, state, _ = rail.update(b1, rail.init())
    restored = json.loads(json.dumps(state))
    a, sa, ma = rail.update(b2, state)
    b, sb, mb = rail.update(b2, restored)
    assert_close(a.rewards, b.rewards)
    assert sa == sb and ma == mb


@pytest.mark.parametrize(
    "rail",
    [
        clip_rewards(-1e30, 1e30),
        clip_rewards(None, None),
        percentile_clip(0.0, 100.0),
        length_power(0.0),
        length_linear(10**9, 5.0),  # budget never reached
        length_linear(0, 0.0),  # zero slope
        missing_eos(penalty=0.0),
        overlong(4, max_completion_length=10**9),  # buffer zone never reached
        overlong(4, factor=0.0),
        non_finite_guard(),  # all rewards finite
    ],
    ids=lambda r: "",
)
def test_extreme_thresholds_are_the_identity(rail):
    gen = torch.Generator().manual_seed(6)
    b = batch(
        torch.randn(16, generator=gen).mul(10).tolist(),
        lengths=torch.randint(1, 30, (16,), generator=gen).tolist(),
        truncated=(torch.rand(16, generator=gen) < 0.5).tolist(),
        max_len=32,
    )
    out, _, _ = run(rail, b)
    assert torch.equal(out.rewards, b.rewards)
