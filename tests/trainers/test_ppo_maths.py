"""PPO maths of SafePPOTrainer on fixed tensors; expected values derived by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo.trainers.ppo_maths import clipped_value_loss, explained_variance, rollout_targets


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_token_rewards_kl_and_gae_one_row():
    # k1 KL = logp - ref = [-1 - -1.5, -2 - -2] = [0.5, 0.0]
    # r = -beta * kl + score on the last token = [-0.1 * 0.5, 1.0] = [-0.05, 1.0]
    # GAE with gamma = lam = 1, V = [0.2, 0.4]:
    #   delta_1 = 1.0 + 0 - 0.4 = 0.6                   A_1 = 0.6
    #   delta_0 = -0.05 + 0.4 - 0.2 = 0.15               A_0 = 0.15 + 0.6 = 0.75
    #   R = A + V = [0.95, 1.0]
    out = rollout_targets(
        scores=t([1.0]), logps=t([[-1.0, -2.0]]), ref_logps=t([[-1.5, -2.0]]), values=t([[0.2, 0.4]]),
        mask=t([[1, 1]]), kl_coef=0.1, gamma=1.0, lam=1.0, estimator="k1", whiten_advantages=False,
    )
    assert_close(out.kl, t([[0.5, 0.0]]))
    assert_close(out.token_rewards, t([[-0.05, 1.0]]))
    assert_close(out.advantages, t([[0.75, 0.6]]))
    assert_close(out.returns, t([[0.95, 1.0]]))


def test_gae_with_padding_and_lambda_no_kl():
    # No reference -> no KL. gamma = 1, lam = 0.5.
    # row 0: one token (second is padding, its value 9.0 must not leak): A = 2 - 1 = 1, R = 2
    # row 1: r = [0, -1], V = [0.5, 0.25]:
    #   delta_1 = -1 - 0.25 = -1.25                       A_1 = -1.25
    #   delta_0 = 0 + 0.25 - 0.5 = -0.25                   A_0 = -0.25 + 0.5 * -1.25 = -0.875
    #   R = [-0.875 + 0.5, -1.25 + 0.25] = [-0.375, -1.0]
    out = rollout_targets(
        scores=t([2.0, -1.0]), logps=t([[0.0, 0.0], [0.0, 0.0]]), ref_logps=None,
        values=t([[1.0, 9.0], [0.5, 0.25]]), mask=t([[1, 0], [1, 1]]), kl_coef=0.5, gamma=1.0, lam=0.5,
        whiten_advantages=False,
    )
    assert_close(out.advantages, t([[1.0, 0.0], [-0.875, -1.25]]))
    assert_close(out.returns, t([[2.0, 0.0], [-0.375, -1.0]]))
    assert_close(out.kl, torch.zeros(2, 2))


def test_discount_gamma():
    # gamma = 0.5, lam = 1, one row r = [0, 4], V = [0, 0]: A_1 = 4, A_0 = 0 + 0.5 * 0 - 0 + 0.5 * 4 = 2
    out = rollout_targets(
        scores=t([4.0]), logps=t([[0.0, 0.0]]), ref_logps=None, values=t([[0.0, 0.0]]), mask=t([[1, 1]]),
        kl_coef=0.0, gamma=0.5, lam=1.0, whiten_advantages=False,
    )
    assert_close(out.advantages, t([[2.0, 4.0]]))


def test_whitening_skips_unscorable_rows_and_zeroes_them():
    # Row 0 as in the first test: A = [0.75, 0.6] before whitening; mean 0.675,
    # unbiased var = (0.075^2 + 0.075^2) / (2 - 1) = 0.01125, std = 0.1060660 -> whitened [+0.70711, -0.70711].
    # Row 1 has a NaN score (every reward function returned None): not scorable -> advantages 0, mask 0,
    # and it does not enter the whitening statistics.
    out = rollout_targets(
        scores=t([1.0, math.nan]), logps=t([[-1.0, -2.0], [-1.0, -1.0]]), ref_logps=t([[-1.5, -2.0], [-1.0, -1.0]]),
        values=t([[0.2, 0.4], [0.3, 0.3]]), mask=t([[1, 1], [1, 1]]), kl_coef=0.1, gamma=1.0, lam=1.0,
        whiten_advantages=True, scorable=torch.tensor([True, False]),
    )
    assert_close(out.advantages, t([[0.70711, -0.70711], [0.0, 0.0]]), atol=1e-4, rtol=0)
    assert_close(out.mask, t([[1, 1], [0, 0]]))
    assert torch.isfinite(out.returns).all()


def test_k3_estimator_in_the_reward():
    # logp - ref = 0.5, log r = -0.5, r = e^-0.5 = 0.606531; k3 = (r - 1) - log r = -0.393469 + 0.5 = 0.106531
    # r_0 = -1.0 * 0.106531 + score 0 (the score sits on the last token, which is this one) = -0.106531
    out = rollout_targets(
        scores=t([0.0]), logps=t([[-1.0]]), ref_logps=t([[-1.5]]), values=t([[0.0]]), mask=t([[1]]),
        kl_coef=1.0, estimator="k3", whiten_advantages=False,
    )
    assert_close(out.kl, t([[0.106531]]), atol=1e-6, rtol=0)
    assert_close(out.token_rewards, t([[-0.106531]]), atol=1e-6, rtol=0)


def test_clipped_value_loss():
    # c = 0.2. token 0: vpred 1.0, old 0.5, R 2.0: l1 = (1 - 2)^2 = 1; clipped vpred = 0.5 + 0.2 = 0.7,
    #   l2 = (0.7 - 2)^2 = 1.69 -> max 1.69 (clipped term larger: counts in clipfrac)
    # token 1: vpred 0, old 0, R -1: l1 = l2 = 1 -> max 1 (not counted)
    # token 2: padding. loss = 0.5 * (1.69 + 1) / 2 = 0.6725; clipfrac = 1 / 2
    loss, clipfrac = clipped_value_loss(
        vpred=t([[1.0, 0.0, 5.0]]), old_values=t([[0.5, 0.0, 0.0]]), returns=t([[2.0, -1.0, 0.0]]),
        mask=t([[1, 1, 0]]), cliprange_value=0.2,
    )
    assert_close(loss, torch.tensor(0.6725))
    assert_close(clipfrac, torch.tensor(0.5))


def test_clipped_value_loss_gradient_and_empty_mask():
    vpred = t([[1.0]]).requires_grad_()
    # inside the clip range: loss = 0.5 * (vpred - R)^2, d/dvpred = vpred - R = 1 - 0 = 1
    loss, _ = clipped_value_loss(vpred, t([[1.0]]), t([[0.0]]), t([[1]]), 0.2)
    loss.backward()
    assert_close(vpred.grad, t([[1.0]]))
    empty_loss, empty_clipfrac = clipped_value_loss(t([[1.0]]), t([[0.0]]), t([[0.0]]), t([[0]]), 0.2)
    assert empty_loss.item() == 0.0 and math.isnan(empty_clipfrac.item())


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # perfect critic: Var[R - V] = 0 -> 1
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # constant critic V = 0: Var[R - 0] / Var[R] = 1 -> 0
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)
    # V = R - [1, -1, 0]: Var[R - V] = Var[1, -1, 0] = 2/3, Var[R] = Var[1, 2, 3] = 2/3 -> 0
    assert explained_variance(returns - t([[1.0, -1.0, 0.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(t([[1.0]]), t([[1.0]]), t([[1]])))


def test_mask_with_holes_tool_tokens_are_skipped():
    # A multi-turn rollout: the policy wrote tokens 0, 1, 4, 5; a tool wrote tokens 2, 3 (mask [1,1,0,0,1,1]). Row 1
    # is the same episode without the tool tokens (a prefix mask), so both rows must agree on the policy's tokens.
    # gamma = lam = 0.5, no KL, score 8, V = [1, 2, (100, 100 on the tool tokens: must not leak), 3, 4].
    # The score goes on the last valid token (index 5, not n_tokens - 1 = 3, a tool token):
    #   r = [0, 0, 0, 0, 0, 8]
    # GAE over the valid tokens in order, the bootstrap value of a token is V at the NEXT VALID token:
    #   t5: delta = 8 + 0.5 * 0 - 4 = 4                       A5 = 4
    #   t4: delta = 0 + 0.5 * 4 - 3 = -1                      A4 = -1 + 0.25 * 4 = 0
    #   t1: delta = 0 + 0.5 * V4 - 2 = 0 + 1.5 - 2 = -0.5     A1 = -0.5 + 0.25 * A4 = -0.5
    #   t0: delta = 0 + 0.5 * 2 - 1 = 0                       A0 = 0 + 0.25 * -0.5 = -0.125
    #   A = [-0.125, -0.5, 0, 0, 0, 4] (0 on tool tokens); R = A + V = [0.875, 1.5, 0, 0, 3, 8]
    out = rollout_targets(
        scores=t([8.0, 8.0]), logps=torch.zeros(2, 6), ref_logps=None,
        values=t([[1, 2, 100, 100, 3, 4], [1, 2, 3, 4, 100, 100]]),
        mask=t([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]]), kl_coef=0.0, gamma=0.5, lam=0.5, whiten_advantages=False,
    )
    assert_close(out.token_rewards, t([[0, 0, 0, 0, 0, 8], [0, 0, 0, 8, 0, 0]]))
    assert_close(out.advantages, t([[-0.125, -0.5, 0, 0, 0, 4], [-0.125, -0.5, 0, 4, 0, 0]]))
    assert_close(out.returns, t([[0.875, 1.5, 0, 0, 3, 8], [0.875, 1.5, 3, 8, 0, 0]]))
    assert_close(out.mask, t([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]]))


def test_mask_with_holes_kl_penalty_only_on_policy_tokens():
    # k1 KL = logp - ref = 1 on every token, beta = 0.5: r = -0.5 on the policy's tokens, 0 on the tool's (2, 3),
    # plus the score 2 on the last valid token (4): r = [-0.5, -0.5, 0, 0, 1.5, 0 (padding)].
    # gamma = lam = 1, V = 0: A_t = sum of the rewards of the valid tokens from t on:
    #   A4 = 1.5, A1 = -0.5 + 1.5 = 1, A0 = -0.5 + 1 = 0.5
    out = rollout_targets(
        scores=t([2.0]), logps=torch.zeros(1, 6), ref_logps=-torch.ones(1, 6), values=torch.zeros(1, 6),
        mask=t([[1, 1, 0, 0, 1, 0]]), kl_coef=0.5, gamma=1.0, lam=1.0, whiten_advantages=False,
    )
    assert_close(out.kl, t([[1, 1, 0, 0, 1, 0]]))
    assert_close(out.token_rewards, t([[-0.5, -0.5, 0, 0, 1.5, 0]]))
    assert_close(out.advantages, t([[0.5, 1.0, 0, 0, 1.5, 0]]))
