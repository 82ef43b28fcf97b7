"""compute_gae against a plain textbook loop, and the masked statistics."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo import compute_gae
from trl_safeppo.rails.gae import masked_mean, masked_var, masked_whiten


def textbook_gae(rewards, values, length, gamma, lam):
    """Schulman et al. 2016, one row of `length` valid steps, V after the end = 0, plain python floats."""
    advantages = [0.0] * length
    next_advantage = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t] = next_advantage
    returns = [a + v for a, v in zip(advantages, values[:length])]
    return advantages, returns


def test_gae_hand_computed():
    # rewards r = [0, 0, 1], values V = [0.5, 0.5, 0.5], gamma = 0.9, lam = 0.5; V_3 = 0.
    # delta_2 = 1 + 0 - 0.5 = 0.5                       A_2 = 0.5
    # delta_1 = 0 + 0.9 * 0.5 - 0.5 = -0.05             A_1 = -0.05 + 0.45 * 0.5 = 0.175
    # delta_0 = -0.05                                   A_0 = -0.05 + 0.45 * 0.175 = 0.02875
    # returns = A + V = [0.52875, 0.675, 1.0]; the padded 4th position stays 0.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert_close(adv, torch.tensor([[0.02875, 0.175, 0.5, 0.0]]))
    assert_close(ret, torch.tensor([[0.52875, 0.675, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_textbook_on_random_ragged_batches(gamma, lam):
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    batch, width = 6, 11
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[0] = width  # one full row
    rewards = torch.randn(batch, width, generator=gen)
    values = torch.randn(batch, width, generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    for i in range(batch):
        n = int(lengths[i])
        a, r = textbook_gae(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
        assert_close(adv[i, :n], torch.tensor(a), atol=1e-6, rtol=1e-6)
        assert_close(ret[i, :n], torch.tensor(r), atol=1e-6, rtol=1e-6)
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)  # nothing on padding


def test_gae_limits():
    # gamma = 0: A_t = r_t - V_t (one-step TD error). gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo).
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    mask = torch.ones(1, 3)
    adv, _ = compute_gae(rewards, values, mask, gamma=0.0, lam=0.7)
    assert_close(adv, torch.tensor([[0.5, 1.75, 2.0]]))
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(adv, torch.tensor([[6.0 - 0.5, 5.0 - 0.25, 3.0 - 1.0]]))
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))


def test_gae_rejects_bad_settings():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, x, gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(x, x, x, gamma=0.9, lam=-0.1)
    with pytest.raises(ValueError, match="shape"):
        compute_gae(x, torch.zeros(1, 3), x, gamma=0.9, lam=0.9)


def test_masked_statistics():
    # valid values 1, 2, 3, 6: mean 3; squared deviations 4, 1, 0, 9 -> biased var 14/4 = 3.5, unbiased 14/3.
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(masked_mean(x, mask), torch.tensor(3.0))
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5]))
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(3.5))
    assert_close(masked_var(x, mask), torch.tensor(14.0 / 3.0))
    # whiten: (x - 3) / sqrt(14/3 + 1e-8); padding -> 0; shift_mean=False adds the mean 3 back.
    scale = (14.0 / 3.0 + 1e-8) ** -0.5
    expected = torch.tensor([[-2 * scale, -1 * scale, 0.0], [0.0, 3 * scale, 0.0]])
    assert_close(masked_whiten(x, mask), expected)
    assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 3.0) * mask)
    white = masked_whiten(torch.randn(4, 5), torch.ones(4, 5))
    assert_close(masked_mean(white, torch.ones(4, 5)), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(white, torch.ones(4, 5)), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_masked_var_edge_cases():
    x = torch.tensor([[5.0, 1.0]])
    assert_close(masked_var(x, torch.tensor([[1, 0]])), torch.tensor(0.0))  # one value: unbiased var taken as 0
    with pytest.raises(ValueError, match="no position"):
        masked_var(x, torch.zeros(1, 2))
