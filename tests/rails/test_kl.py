"""KL controllers (Ziegler et al. 2019 step by step), estimators k1/k2/k3, token rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo import AdaptiveKLController, FixedKLController
from trl_safeppo.rails.kl import kl_exact, kl_penalized_token_rewards, kl_per_token, sequence_kl


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
