"""Tripwire detectors on hand-made metric histories, and TripwireSpec validation."""

from __future__ import annotations

import math

import pytest

from trl_safeppo.rails.tripwires import (
    DETECTORS,
    TripwireSpec,
    entropy_collapse,
    evaluate,
    format_gaming,
    kl_acceleration,
    kl_limit,
    length_collapse,
    length_explosion,
    length_hacking,
    non_finite,
)


def h(key, values):
    return [{key: v} for v in values]


def test_kl_limit():
    assert kl_limit(h("kl", [0.5, 1.2]), limit=1.0).status == "trip"
    v = kl_limit(h("kl", [0.5, 0.9]), limit=1.0)  # 0.9 > 0.8 * 1.0
    assert v.status == "warn" and v.values == {"kl": 0.9, "limit": 1.0} and v.detector == "kl_limit"
    assert kl_limit(h("kl", [0.5]), limit=1.0).status == "ok"
    assert kl_limit([], limit=1.0).status == "ok"


def test_kl_acceleration():
    # diffs [.1, .1, .1, .3, .6, 1.2]: slope before 0.1, now (0.3 + 0.6 + 1.2) / 3 = 0.7 -> x7 > 3: trip
    v = kl_acceleration(h("kl", [1.0, 1.1, 1.2, 1.3, 1.6, 2.2, 3.4]))
    assert v.status == "trip"
    assert v.values["slope_before"] == pytest.approx(0.1) and v.values["slope_now"] == pytest.approx(0.7)
    # diffs [.1, .1, .1, .2, .2, .2]: x2, between warn_factor 1.5 and factor 3: warn
    assert kl_acceleration(h("kl", [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 1.9])).status == "warn"
    # steady growth: x1
    assert kl_acceleration(h("kl", [1.0 + 0.1 * i for i in range(7)])).status == "ok"
    # flat KL with 1e-4 noise: slopes are compared with min_slope = 1e-3, not with ~0
    assert kl_acceleration(h("kl", [1.0, 1.0001, 1.0, 1.0002, 1.0, 1.0005, 1.0])).status == "ok"
    assert kl_acceleration(h("kl", [1.0, 5.0])).status == "ok"  # too short


def test_non_finite():
    assert non_finite([{"loss": 1.0}, {"loss": math.nan, "reward": 0.5}]).status == "trip"
    assert non_finite([{"reward": None}]).status == "trip"
    assert non_finite([{"grad_norm": math.inf}]).values == {"grad_norm": math.inf}
    assert non_finite([{"loss": math.nan}, {"loss": 1.0}]).status == "ok"  # only the latest step counts
    assert non_finite([{"loss": 1.0, "rails/non_finite/count": 2.0}]).status == "warn"
    assert non_finite([]).status == "ok"


def test_length_hacking():
    corr_key = "rails/diagnostics/reward_length_corr"
    rows = lambda rewards, corr: [{"reward": r, corr_key: c} for r, c in zip(rewards, corr)]  # noqa: E731
    # reward rise = 1 - 0 = 1; corr now = 0.55 >= 0.3, corr rise = 0.55 - 0.1 > 0: trip
    v = length_hacking(rows([0, 0, 1, 1], [0.1, 0.1, 0.5, 0.6]), window=4)
    assert v.status == "trip" and v.values == pytest.approx({"reward_rise": 1.0, "corr": 0.55, "corr_rise": 0.45})
    # corr now 0.2 in [0.15, 0.3): warn
    assert length_hacking(rows([0, 0, 1, 1], [0.1, 0.1, 0.2, 0.2]), window=4).status == "warn"
    # reward falling: ok whatever the correlation
    assert length_hacking(rows([1, 1, 0, 0], [0.1, 0.1, 0.9, 0.9]), window=4).status == "ok"
    # fallback without the correlation metric: reward and mean length both rise together (pearson 1)
    fallback = [{"reward": r, "completions/mean_length": n} for r, n in zip([0, 0, 1, 1], [10, 10, 20, 20])]
    assert length_hacking(fallback, window=4).status == "trip"


def test_format_gaming():
    rows = lambda f, a: [{"rewards/format/mean": x, "rewards/acc/mean": y} for x, y in zip(f, a)]  # noqa: E731
    params = {"format_key": "rewards/format/mean", "accuracy_key": "rewards/acc/mean", "window": 4}
    # format now 0.98 >= 0.95, rise 0.98 - 0.55 = 0.43 >= 0.2, accuracy change 0.005 <= 0.02: trip
    v = format_gaming(rows([0.5, 0.6, 0.97, 0.99], [0.3, 0.3, 0.3, 0.31]), **params)
    assert v.status == "trip" and v.values["accuracy_change"] == pytest.approx(0.005)
    assert format_gaming(rows([0.5, 0.6, 0.97, 0.99], [0.3, 0.3, 0.5, 0.5]), **params).status == "ok"  # accuracy rose
    assert format_gaming(rows([0.3, 0.3, 0.6, 0.6], [0.3, 0.3, 0.3, 0.3]), **params).status == "warn"  # not saturated


def test_entropy_and_length_baselines():
    # baseline = first value, now = last value
    assert entropy_collapse(h("entropy", [1.0, 0.5]), baseline=1).status == "ok"
    assert entropy_collapse(h("entropy", [1.0, 0.2]), baseline=1).status == "warn"  # 0.2 < 0.3 * 1.0
    assert entropy_collapse(h("entropy", [1.0, 0.05]), baseline=1).status == "trip"  # 0.05 < 0.1 * 1.0
    floor_only = {"baseline": 1, "ratio": 0.0, "warn_ratio": 0.0}
    assert entropy_collapse(h("entropy", [0.05, 0.02, 0.005]), **floor_only).status == "trip"  # 0.005 < 0.01
    key = "completions/mean_length"
    assert length_collapse(h(key, [100, 40]), baseline=1).status == "warn"  # 40 < 0.5 * 100
    assert length_collapse(h(key, [100, 20]), baseline=1).status == "trip"  # 20 < 0.3 * 100
    assert length_explosion(h(key, [10, 25]), baseline=1).status == "warn"  # 25 > 2 * 10
    assert length_explosion(h(key, [10, 31]), baseline=1).status == "trip"  # 31 > 3 * 10
    assert length_explosion([{"completions/clipped_ratio": 0.6}]).status == "trip"  # truncation rate >= 0.5
    # default baseline: mean of the first 3 = 100; now = 95
    assert length_collapse(h(key, [90, 100, 110, 95])).values == {"start": 100.0, "now": 95.0}


def test_spec_validation_names_what_is_accepted():
    with pytest.raises(ValueError, match="kl_limit"):
        TripwireSpec("kl_blowup")
    with pytest.raises(ValueError, match="rollback"):
        TripwireSpec("non_finite", action="panic")
    with pytest.raises(ValueError, match=r"unknown params \['limt'\].*limit"):
        TripwireSpec("kl_limit", params={"limt": 1.0})
    with pytest.raises(ValueError, match=r"missing required params \['limit'\]"):
        TripwireSpec("kl_limit", action="raise_kl")
    with pytest.raises(ValueError, match="limit must be a finite number > 0"):
        TripwireSpec("kl_limit", params={"limit": -1.0})
    with pytest.raises(ValueError, match="window"):
        TripwireSpec("kl_acceleration", params={"window": 2})


def test_spec_check_and_evaluate():
    specs = [TripwireSpec("kl_limit", "raise_kl", {"limit": 1.0}), TripwireSpec("non_finite", "stop")]
    out = evaluate(specs, [{"kl": 2.0, "loss": 0.1}])
    assert [(s.detector, v.status) for s, v in out] == [("kl_limit", "trip"), ("non_finite", "ok")]
    assert out[0][1].tripped and out[0][1].to_dict()["values"] == {"kl": 2.0, "limit": 1.0}
    assert TripwireSpec(**specs[0].to_dict()) == specs[0]
    assert set(DETECTORS) == {
        "kl_limit", "kl_acceleration", "non_finite", "length_hacking", "format_gaming",
        "entropy_collapse", "length_collapse", "length_explosion",
    }
