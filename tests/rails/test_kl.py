"""KL controllers (Ziegler et al. 2019 step by step), estimators k1/k2/k3, token rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo import AdaptiveKLController, FixedKLController
from trl_safeppo.rails.kl import (
    kl_exact, kl_line_search, kl_penalized_token_rewards, kl_pull_back_search, kl_per_token, kl_per_token_after_update, sequence_kl,
)


def test_ziegler_update_step_by_step():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL = 9: e = clip(9/6 - 1, -0.2, 0.2) = clip(0.5) = 0.2; beta = 0.2 * (1 + 0.2 * 256/10000) = 0.2 * 1.00512
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.201024, abs=1e-12)
    # KL = 3: e = clip(-0.5) = -0.2; beta = 0.201024 * (1 - 0.00512) = 0.201024 - 0.00102924288 = 0.19999475712
    assert ctl.update(3.0, n_steps=256) == pytest.approx(0.19999475712, abs=1e-12)
    # KL = 6.6: e = 0.1 (inside the clip); beta = 0.19999475712 * (1 + 0.1 * 0.0256) = 0.19999475712 * 1.00256
    #         = 0.19999475712 + 0.000511986578 = 0.200506743698
    assert ctl.update(6.6, n_steps=256) == pytest.approx(0.19999475712 * 1.00256, abs=1e-12)
    assert ctl.value == pytest.approx(0.2005067437, abs=1e-10)
    # KL = target: e = 0, beta unchanged
    before = ctl.value
    assert ctl.update(6.0, n_steps=256) == before
    assert ctl.n_updates == 4


def test_adaptive_bounds_keep_beta_positive():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=1, min_coef=0.01, max_coef=0.5)
    # e = +0.2, mult = 1 + 0.2 * 10 / 1 = 3 -> 0.6, capped at max_coef 0.5
    assert ctl.update(100.0, n_steps=10) == 0.5
    # e = -0.2, mult = 1 - 2 = -1 -> -0.5, floored at min_coef 0.01 (beta never reaches 0: GRPO keeps its ref model)
    assert ctl.update(0.0, n_steps=10) == 0.01
    # a non-finite KL leaves beta unchanged
    assert ctl.update(float("nan"), n_steps=10) == 0.01


def test_hold_until_target_blocks_only_the_early_cuts():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10, hold_until_target=True)
    # KL 0 and 0.5 are below a target never reached yet: Ziegler would cut beta by 20% each (e = -0.2, K = 10/10);
    # held at 0.1 instead
    assert ctl.update(0.0, n_steps=10) == 0.1
    assert ctl.update(0.5, n_steps=10) == 0.1 and not ctl.reached_target
    # KL 2.0 >= target: e = clip(1.0) = 0.2 -> beta = 0.1 * 1.2 = 0.12; the target is now reached
    assert ctl.update(2.0, n_steps=10) == pytest.approx(0.12, abs=1e-15)
    assert ctl.reached_target
    # from now on Ziegler's rule both ways: KL 0.5 -> e = -0.2 -> 0.12 * 0.8 = 0.096
    assert ctl.update(0.5, n_steps=10) == pytest.approx(0.096, abs=1e-15)
    # the flag travels with the state (a resumed run does not go back to holding)
    resumed = AdaptiveKLController(0.1, target=1.0, horizon=10, hold_until_target=True)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert resumed.reached_target and resumed.update(0.5, n_steps=10) == pytest.approx(0.096 * 0.8, abs=1e-15)


def test_deadband_holds_beta_inside_the_band():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=10, deadband=0.5)
    # band: |KL / 2 - 1| <= 0.5  <=>  KL in [1, 3]; inside it beta holds, edges included
    for kl in (1.0, 1.9, 2.5, 3.0):
        assert ctl.update(kl, n_steps=10) == 0.1
    # KL 3.2: e = 0.6 -> clipped to 0.2 -> 0.1 * 1.2 = 0.12
    assert ctl.update(3.2, n_steps=10) == pytest.approx(0.12, abs=1e-15)
    # KL 0.9: e = -0.55 -> -0.2 -> 0.12 * 0.8 = 0.096
    assert ctl.update(0.9, n_steps=10) == pytest.approx(0.096, abs=1e-15)
    assert ctl.n_updates == 6


def test_proportional_term_by_hand():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10, proportional=2.0)
    # KL 2: base (Ziegler) e = clip(1.0, -0.2, 0.2) = 0.2 -> 0.1 * 1.2 = 0.12;
    # P: clip(1.0, -1, 1) = 1 -> beta = 0.12 * e^2 = 0.12 * 7.389056 = 0.8866867
    assert ctl.update(2.0, n_steps=10) == pytest.approx(0.12 * math.exp(2.0), abs=1e-12)
    assert ctl.base == pytest.approx(0.12, abs=1e-15)
    # KL back at the target: base unchanged (e = 0), P factor e^0 = 1 -> beta = 0.12 at once
    assert ctl.update(1.0, n_steps=10) == pytest.approx(0.12, abs=1e-15)
    # KL 0.5: base 0.12 * (1 - 0.2) = 0.096; P: e^(2 * -0.5) = 0.3678794 -> 0.0353164
    assert ctl.update(0.5, n_steps=10) == pytest.approx(0.096 * math.exp(-1.0), abs=1e-12)
    # a non-finite KL changes nothing
    before = (ctl.value, ctl.base)
    assert ctl.update(float("nan"), n_steps=10) == before[0] and ctl.base == before[1]
    # KL 100: the P error is clipped at 1, and beta at max_coef
    capped = AdaptiveKLController(1.0, target=1.0, horizon=10, max_coef=5.0, proportional=2.0)
    assert capped.update(100.0, n_steps=10) == 5.0  # 1.2 * e^2 = 8.87 > 5
    assert capped.base == pytest.approx(1.2, abs=1e-15)


def test_set_value_moves_the_base_too():
    # raise_kl sets beta from outside: the next update must continue from the new value, not snap back
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10, proportional=1.0)
    ctl.set_value(0.4)
    assert ctl.value == ctl.base == 0.4
    assert ctl.update(1.0, n_steps=10) == pytest.approx(0.4, abs=1e-15)  # e = 0: base and P factor unchanged
    state = json.loads(json.dumps(ctl.state_dict()))
    assert state["base"] == 0.4
    fixed = FixedKLController(0.05)
    fixed.set_value(0.1)
    assert fixed.update(3.0, 10) == 0.1


def test_refinements_off_is_exactly_ziegler():
    plain = AdaptiveKLController(0.2, target=6.0, horizon=500)
    explicit = AdaptiveKLController(
        0.2, target=6.0, horizon=500, hold_until_target=False, deadband=0.0, proportional=0.0
    )
    for kl in (0.0, 1.0, 5.9, 6.0, 7.0, 30.0, float("nan"), 2.0):
        assert explicit.update(kl, 64) == plain.update(kl, 64)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    assert ctl.update(123.0, n_steps=64) == 0.05
    assert ctl.value == 0.05 and ctl.n_updates == 1


def test_controller_state_round_trip_through_json():
    a = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    a.update(9.0, 100)
    state = json.loads(json.dumps(a.state_dict()))
    b = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    b.load_state_dict(state)
    assert b.value == a.value and b.n_updates == 1 and b.last_kl == 9.0
    assert b.update(3.0, 100) == a.update(3.0, 100)
    f = FixedKLController(0.1)
    g = FixedKLController(0.0)
    g.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert g.value == 0.1
    with pytest.raises(ValueError, match="adaptive"):
        g.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target": -1.0}, "target"),
        ({"target": 0.0}, "target"),
        ({"horizon": 0}, "horizon"),
        ({"min_coef": 0.0}, "min_coef"),
        ({"min_coef": -1e-3}, "min_coef"),
        ({"max_coef": 1e-5}, "max_coef"),
        ({"init_kl_coef": 20.0}, "init_kl_coef"),
        ({"deadband": -0.1}, "deadband"),
        ({"deadband": float("inf")}, "deadband"),
        ({"hold_until_target": "yes"}, "hold_until_target"),
        ({"proportional": -1.0}, "proportional"),
        ({"proportional": float("nan")}, "proportional"),
    ],
)
def test_adaptive_bad_settings_name_the_field(kwargs, field):
    args = {"init_kl_coef": 0.1, "target": 6.0, "horizon": 10000, **kwargs}
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**args)


def test_fixed_bad_setting():
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-0.1)


def test_estimators_hand_values():
    # pi = 0.5, pi_ref = 0.25 -> log(pi/pi_ref) = ln 2 = 0.693147
    # k1 = ln 2; k2 = (ln 2)^2 / 2 = 0.240227; k3 = (r - 1) - ln r with r = 0.5: -0.5 + ln 2 = 0.193147
    logp = torch.tensor([[math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), -5.0]])
    mask = torch.tensor([[1, 0]])
    ln2 = math.log(2.0)
    assert_close(kl_per_token(logp, ref, "k1", mask), torch.tensor([[ln2, 0.0]]))
    assert_close(kl_per_token(logp, ref, "k2", mask), torch.tensor([[ln2**2 / 2, 0.0]]))
    assert_close(kl_per_token(logp, ref, "k3", mask), torch.tensor([[ln2 - 0.5, 0.0]]))
    assert_close(sequence_kl(torch.tensor([[0.5, 0.25, 9.0]]), torch.tensor([[1, 1, 0]])), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, ref, "k4")


def test_estimators_are_nonnegative_and_k1_k3_unbiased():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, generator=gen), 0)
    q = torch.softmax(torch.randn(8, generator=gen), 0)
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[x][None], q.log()[x][None]
    k1, k2, k3 = (kl_per_token(logp, logq, e) for e in ("k1", "k2", "k3"))
    assert (k2 >= 0).all() and (k3 >= -1e-7).all()
    # unbiased estimators: Monte-Carlo mean within a few standard errors of the exact KL
    for k in (k1, k3):
        stderr = float(k.std()) / math.sqrt(k.numel())
        assert abs(float(k.mean()) - true_kl) < 5 * stderr + 1e-4


def test_kl_penalized_token_rewards():
    # beta = 0.5: r_t = -0.5 * kl_t on response tokens, + score on the last one; padding 0.
    # row 0: [-0.05, -0.1, -0.15 + 1] ; row 1 (one token): [-0.25 + 2, 0, 0]
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = kl_penalized_token_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(out, torch.tensor([[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0]]))


def test_kl_after_update_by_hand():
    # one token; pi_old = 1/4, pi = 1/2, pi_ref = 1/4: weight pi / pi_old = 2, r = pi_ref / pi = 1/2,
    # k3 = r - 1 - ln r = -1/2 + ln 2 = 0.193147, weighted 0.386294; a masked-out token gives 0
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    mask = torch.tensor([[1, 0]])
    assert_close(kl_per_token_after_update(logp, old, ref, mask), torch.tensor([[2 * (math.log(2) - 0.5), 0.0]]))
    # not moved (pi == pi_old): exactly GRPO's k3
    assert_close(kl_per_token_after_update(logp, logp, ref, mask), kl_per_token(logp, ref, "k3", mask))


def test_kl_after_update_is_unbiased_for_the_moved_policy():
    # tokens sampled from pi_old = (0.7, 0.2, 0.1); the policy has moved to pi = (0.2, 0.3, 0.5); pi_ref = (0.5, 0.3,
    # 0.2). KL(pi || pi_ref) = 0.2 ln 0.4 + 0.3 ln 1 + 0.5 ln 2.5 = -0.183258 + 0.458145 = 0.274887
    torch.manual_seed(0)
    pi_old, pi, ref = (torch.tensor(p) for p in ([0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]))
    tokens = torch.multinomial(pi_old, 400_000, replacement=True).unsqueeze(0)
    value = kl_per_token_after_update(pi.log()[tokens], pi_old.log()[tokens], ref.log()[tokens]).mean()
    expected = 0.2 * math.log(0.4) + 0.5 * math.log(2.5)
    assert value.item() == pytest.approx(expected, abs=0.005)
    # without the weight, k3 on pi_old's tokens is biased: r = pi_ref / pi = (2.5, 1, 0.4),
    # 0.7 (1.5 - ln 2.5) + 0.1 (-0.6 - ln 0.4) = 0.408599 + 0.031629 = 0.440228
    plain = kl_per_token(pi.log()[tokens], ref.log()[tokens], "k3").mean()
    assert plain.item() == pytest.approx(0.7 * (1.5 - math.log(2.5)) + 0.1 * (-0.6 - math.log(0.4)), abs=0.005)


def test_kl_line_search_halves_until_within_the_cap():
    calls = []

    def kl_at(scale):  # KL grows with the step: 0.4 before, 1.4 after the whole step
        calls.append(scale)
        return 0.4 + scale

    # s = 1: 1.4 > 0.75; s = 1/2: 0.9 > 0.75; s = 1/4: 0.65 <= 0.75 -> accepted after 3 evaluations
    assert kl_line_search(kl_at, max_kl=0.75, kl_before=0.4, max_backtracks=4) == (0.25, 0.65, 3)
    assert calls == [1.0, 0.5, 0.25]


def test_kl_line_search_whole_step_passes_and_undo_after_the_last_halving():
    assert kl_line_search(lambda s: 0.7, max_kl=0.75, kl_before=0.6, max_backtracks=4) == (1.0, 0.7, 1)
    calls = []

    def rising(scale):
        calls.append(scale)
        return 1.0 + scale

    # nothing within 0.75: s = 1, 1/2 tried (max_backtracks = 1), then the update is undone: KL stays at kl_before
    assert kl_line_search(rising, max_kl=0.75, kl_before=0.6, max_backtracks=1) == (0.0, 0.6, 2)
    assert calls == [1.0, 0.5]
    # 0 backtracks: the whole step or nothing
    assert kl_line_search(rising, max_kl=0.75, kl_before=0.6, max_backtracks=0) == (0.0, 0.6, 1)


def test_kl_line_search_above_the_cap_only_lowering_passes():
    # already at 2.0 > cap 0.75 (an earlier jump): a step to 1.5 lowers KL and passes; a step to 2.5 does not,
    # its half (2.25) neither, its quarter (2.125) neither: undone
    assert kl_line_search(lambda s: 2.0 - 0.5 * s, max_kl=0.75, kl_before=2.0, max_backtracks=4)[0] == 1.0
    assert kl_line_search(lambda s: 2.0 + 0.5 * s, max_kl=0.75, kl_before=2.0, max_backtracks=2) == (0.0, 2.0, 3)


def test_kl_line_search_non_finite_kl_fails_the_scale():
    # s = 1 gives NaN (a blown-up step), s = 1/2 is fine
    values = {1.0: math.nan, 0.5: 0.5}
    assert kl_line_search(values.__getitem__, max_kl=0.75, kl_before=0.4, max_backtracks=4) == (0.5, 0.5, 2)


def test_kl_pull_back_search_bisects_to_the_landing_kl():
    calls = []

    def kl_at(alpha):  # KL quadratic in the distance to the reference: 2.0 at the policy, 0 at the reference
        calls.append(alpha)
        return 2.0 * alpha * alpha

    # above 0.6, land on <= 0.5: 2 a^2 <= 0.5 <=> a <= 1/2. Bisection keeps lo (KL <= 0.5) and hi (KL > 0.5):
    # 1/2 -> 0.5 in (lo = 1/2); 3/4 -> 1.125 out; 5/8 -> 0.78125 out; 9/16 -> 0.6328 out -> alpha 1/2, KL 0.5
    assert kl_pull_back_search(kl_at, above=0.6, to=0.5, kl_now=2.0, iterations=4) == (0.5, 0.5, 4)
    assert calls == [0.5, 0.75, 0.625, 0.5625]
    # landing on 0.3 instead: a <= sqrt(0.15) = 0.3873: 1/2 -> 0.5 out; 1/4 -> 0.125 in; 3/8 -> 0.28125 in;
    # 7/16 -> 0.3828 out -> alpha 3/8, KL 0.28125 (within 2**-4 of the exact 0.3873)
    assert kl_pull_back_search(kl_at, above=0.6, to=0.3, kl_now=2.0, iterations=4) == (0.375, 0.28125, 4)


def test_kl_pull_back_search_leaves_a_policy_under_the_trigger_alone():
    def never(alpha):  # must not be called
        raise AssertionError(alpha)

    # 0.55 <= above 0.6: no pull-back even though it is above `to` (the margin between the two is the hysteresis)
    assert kl_pull_back_search(never, above=0.6, to=0.5, kl_now=0.55, iterations=6) == (1.0, 0.55, 0)
    assert kl_pull_back_search(never, above=0.6, to=0.5, kl_now=0.6, iterations=6) == (1.0, 0.6, 0)


def test_kl_pull_back_search_non_finite_counts_as_too_far():
    # a NaN KL now (a blown-up step) is pulled back; NaN at a trial alpha is treated as above `to`:
    # 1/2 -> NaN out; 1/4 -> 0.1 in; 3/8 -> 0.3 in -> alpha 3/8
    values = {0.5: math.nan, 0.25: 0.1, 0.375: 0.3}
    assert kl_pull_back_search(values.__getitem__, above=0.6, to=0.5, kl_now=math.nan, iterations=3) == (
        0.375, 0.3, 3)
    # nothing but the reference itself is within `to`: alpha 0 (the reference weights), KL 0
    assert kl_pull_back_search(lambda a: 9.0, above=0.6, to=0.5, kl_now=9.0, iterations=3) == (0.0, 0.0, 3)


def test_kl_exact_by_hand():
    # position 0: pi = softmax(0, 0) = (1/2, 1/2), pi_ref = softmax(0, ln 3) = (1/4, 3/4):
    #   KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841; position 1: pi == pi_ref, KL = 0
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    ref = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    assert_close(kl_exact(logits, ref), torch.tensor([[0.5 * math.log(4 / 3), 0.0]]))
    # it is the expectation k3 estimates: the mean of k3 over tokens drawn from pi (here exactly, by weights)
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    k3 = kl_per_token(p.log()[None], q.log()[None], "k3")
    assert (p * k3[0]).sum().item() == pytest.approx(0.5 * math.log(4 / 3))


def test_docstring_examples_run():
    # the worked examples in rails.kl's docstrings (kl_line_search, kl_pull_back_search) are checked here
    import doctest

    import trl_safeppo.rails.kl as kl_module

    result = doctest.testmod(kl_module)
    assert result.attempted >= 2 and result.failed == 0
