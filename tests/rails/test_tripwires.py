"""Tripwire detectors on hand-made metric histories, and TripwireSpec validation."""

from __future__ import annotations

import math

import pytest

from trl_safeppo.rails.tripwires import (
    DETECTORS,
    Decision,
    TripwireSpec,
    entropy_collapse,
    escalate,
    evaluate,
    init_ladder,
    format_gaming,
    kl_acceleration,
    kl_limit,
    length_collapse,
    length_explosion,
    length_hacking,
    non_finite,
    reward_timeout,
    silent_reward,
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


def test_non_finite_trips_when_the_guard_repairs_too_much():
    # the guard kept the logged reward finite, but repaired 16 of 16 rewards: share 1.0 > 0.5 -> trip
    repaired_all = {"loss": 0.0, "reward": 0.0, "rails/non_finite/count": 16.0, "rails/non_finite/share": 1.0}
    v = non_finite([repaired_all])
    assert v.status == "trip" and v.values == {"repaired_share": 1.0, "max_repaired_share": 0.5}
    # 4 of 16 = 0.25 <= 0.5: only the warn of a guard that fired
    quarter = {**repaired_all, "rails/non_finite/count": 4.0, "rails/non_finite/share": 0.25}
    assert non_finite([quarter]).status == "warn"
    # exactly at the threshold does not pass it; 1 turns the share check off
    assert non_finite([{**repaired_all, "rails/non_finite/share": 0.5}]).status == "warn"
    assert non_finite([repaired_all], max_repaired_share=1.0).status == "warn"
    assert non_finite([repaired_all], max_repaired_share=0.0).status == "trip"
    with pytest.raises(ValueError, match=r"max_repaired_share must be a number in \[0, 1\].*got 1.5"):
        TripwireSpec("non_finite", "stop", {"max_repaired_share": 1.5})


def test_silent_reward():
    key = "rewards/math/none_frac"
    # latest share 1.0 (nothing scored): trips at the default patience 1
    v = silent_reward([{key: 0.2}, {key: 1.0}])
    assert v.status == "trip" and v.values == {"math/steps": 1.0, "math/share": 1.0}
    # patience 3: silent on the last 2 logged steps -> warn; on the last 3 -> trip; a scored step resets the run
    assert silent_reward(h(key, [1.0, 0.0, 1.0, 1.0]), patience=3).status == "warn"
    assert silent_reward(h(key, [0.0, 1.0, 1.0, 1.0]), patience=3).status == "trip"
    assert silent_reward(h(key, [1.0, 1.0, 1.0, 0.5]), patience=3).status == "ok"
    # share threshold: 0.75 of the completions unscored counts as silent with share=0.7, not with the default 1.0
    assert silent_reward(h(key, [0.75]), share=0.7).status == "trip"
    assert silent_reward(h(key, [0.75])).status == "ok"
    # every rewards/<func>/none_frac counts; other keys do not
    v = silent_reward([{"rewards/a/none_frac": 0.0, "rewards/b/none_frac": 1.0, "rewards/b/mean": 1.0}])
    assert v.status == "trip" and "'b'" in v.reason and "'a'" not in v.reason
    assert silent_reward([{"reward": 1.0}]).status == "ok" and silent_reward([]).status == "ok"
    with pytest.raises(ValueError, match="patience must be an integer >= 1, got 0"):
        TripwireSpec("silent_reward", "stop", {"patience": 0})


def test_reward_timeout():
    key = "rewards/slow/timeout"
    assert reward_timeout(h(key, [0.0, 0.0])).status == "ok"
    # one of the two calls of the logged step was cut off: 0.5 > 0 -> trip at patience 1, warn at patience 2
    v = reward_timeout(h(key, [0.0, 0.5]))
    assert v.status == "trip" and v.values == {"slow/steps": 1.0, "slow/share": 0.5}
    assert reward_timeout(h(key, [0.0, 0.5]), patience=2).status == "warn"
    assert reward_timeout(h(key, [1.0, 0.5]), patience=2).status == "trip"


def test_action_ladder_raise_kl_then_rollback_then_stop():
    # beta 0.1, factor 2, max_beta 0.4, max_rollbacks 1; each trip asks for raise_kl and beta stays where the
    # decisions put it: 0.1 -> 0.2 -> 0.4 (the max), then the raise is exhausted: rollback, then stop.
    state, beta, taken = init_ladder(), 0.1, []
    for _ in range(4):
        decision, new_state = escalate("raise_kl", state, beta=beta, raise_kl_factor=2.0, max_beta=0.4, max_rollbacks=1)
        assert state is not new_state  # pure: a new state every time
        state = new_state
        taken.append((decision.action, decision.beta, decision.escalated_from))
        beta = decision.beta if decision.beta is not None else beta
    assert taken == [
        ("raise_kl", pytest.approx(0.2), None),
        ("raise_kl", pytest.approx(0.4), None),
        ("rollback", None, "raise_kl"),
        ("stop", None, "raise_kl"),
    ]
    assert state == {"rollbacks": 1}
    # the raise is capped at the max: 0.3 * 2 = 0.6 -> 0.4
    assert escalate("raise_kl", init_ladder(), beta=0.3, raise_kl_factor=2.0, max_beta=0.4,
                    max_rollbacks=2)[0] == Decision("raise_kl", beta=pytest.approx(0.4))
    # beta 0 cannot be raised by any factor: straight to rollback
    d, _ = escalate("raise_kl", init_ladder(), beta=0.0, raise_kl_factor=2.0, max_beta=1.0, max_rollbacks=2)
    assert (d.action, d.escalated_from) == ("rollback", "raise_kl") and "at its max" in d.why
    # a configured rollback: two allowed, the third becomes stop
    state = init_ladder()
    actions = []
    for _ in range(3):
        d, state = escalate("rollback", state, beta=0.1, raise_kl_factor=2.0, max_beta=1.0, max_rollbacks=2)
        actions.append(d.action)
    assert actions == ["rollback", "rollback", "stop"] and "tripwire_max_rollbacks=2" in d.why
    # warn and stop are never changed
    for action in ("warn", "stop"):
        assert escalate(action, {"rollbacks": 9}, beta=0.1, raise_kl_factor=2.0, max_beta=1.0,
                        max_rollbacks=0) == (Decision(action), {"rollbacks": 9})


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
        "entropy_collapse", "length_collapse", "length_explosion", "silent_reward", "reward_timeout",
    }
