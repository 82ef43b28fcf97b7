"""The PPO maths of SafePPOTrainer as pure tensor functions (tested on fixed tensors in tests/trainers/test_ppo_maths.py).

Notation (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593; TRL's former PPOTrainer; cleanrl's ppo.py):
B completions, T response tokens (right-padded), `mask` 1 on the tokens the policy wrote (0 on padding, and on tool
or environment tokens of a multi-turn rollout: holes are allowed, see rails.gae).

    kl_t      = KL estimate of pi vs pi_ref at token t            (rails.kl.kl_per_token)
    r_t       = -beta * kl_t  (+ score on the last response token)  (rails.kl.kl_penalized_token_rewards)
    A_t, R_t  = GAE(r, V; gamma, lam)                              (rails.gae.compute_gae)
    A_t      <- whiten(A_t) over the valid tokens of the batch      (rails.gae.masked_whiten)
    L_V       = 1/2 mean_t max((V'_t - R_t)^2, (clip(V'_t, V_t - c, V_t + c) - R_t)^2)

The policy surrogate `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)` is GRPOTrainer's own loss, fed with `A`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..rails.gae import compute_gae, masked_whiten
from ..rails.kl import kl_penalized_token_rewards, kl_per_token


class RolloutTargets(NamedTuple):
    """What one rollout batch hands to the PPO epochs; every tensor `(B, T)`, 0 outside `mask`."""

    advantages: torch.Tensor
    returns: torch.Tensor
    token_rewards: torch.Tensor
    kl: torch.Tensor
    mask: torch.Tensor  # the response mask with unscorable rows zeroed: the tokens that train policy and critic


def rollout_targets(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, values: torch.Tensor, mask: torch.Tensor,
    kl_coef: float, gamma: float = 1.0, lam: float = 0.95, estimator: str = "k1", whiten_advantages: bool = True,
    whiten_rewards: bool = False, scorable: torch.Tensor | None = None,
) -> RolloutTargets:
    """Token rewards, GAE advantages and returns of one rollout batch.

    Args:
        scores: `(B,)` sequence scores after the reward rails (finite where `scorable`).
        logps / ref_logps: `(B, T)` log-probabilities of the sampled tokens under the rollout policy / the reference;
            `ref_logps=None` means no KL penalty (kl is 0).
        values: `(B, T)` critic values V(s_t) at rollout time.
        mask: `(B, T)` response mask (1 on response tokens, right padding 0).
        kl_coef: beta.
        scorable: `(B,)` bool, False for completions without a usable score: their advantages are 0 and they are left
            out of whitening and of the value loss (`RolloutTargets.mask`). Default: all scorable.
    """
    maskf = mask.to(values.dtype)
    if scorable is None:
        scorable = torch.ones(maskf.shape[0], dtype=torch.bool, device=maskf.device)
    scores = torch.where(scorable, scores.to(maskf.dtype), torch.zeros_like(maskf[:, 0]))
    train_mask = maskf * scorable.to(maskf.dtype).unsqueeze(1)
    if ref_logps is None:
        kl = torch.zeros_like(maskf)
        kl_coef = 0.0
    else:
        kl = kl_per_token(logps.to(maskf.dtype), ref_logps.to(maskf.dtype), estimator, mask=maskf)
    token_rewards = kl_penalized_token_rewards(scores, kl, maskf, kl_coef)
    n_valid = int(train_mask.sum().item())
    if whiten_rewards and n_valid > 1:
        token_rewards = masked_whiten(token_rewards, train_mask, shift_mean=False)
    advantages, returns = compute_gae(token_rewards, values.to(maskf.dtype) * maskf, maskf, gamma, lam)
    if whiten_advantages and n_valid > 1:
        advantages = masked_whiten(advantages, train_mask)
    return RolloutTargets(advantages * train_mask, returns * maskf, token_rewards, kl, train_mask)


def clipped_value_loss(
    vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (TRL PPOTrainer; Huang et al. 2024, https://arxiv.org/abs/2403.17031, detail 9).

    Returns `(loss, clipfrac)`: `loss = 0.5 * masked_mean(max(l1, l2))` with `l1 = (vpred - R)^2` and
    `l2 = (old + clip(vpred - old, -c, c) - R)^2`, and the fraction of valid tokens where the clipped term is larger.
    An empty mask gives a zero loss that still depends on `vpred` (so backward works) and a NaN clipfrac.
    """
    maskf = mask.to(vpred.dtype)
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    losses1 = (vpred - returns).square()
    losses2 = (vpred_clipped - returns).square()
    n = maskf.sum()
    loss = 0.5 * (torch.max(losses1, losses2) * maskf).sum() / n.clamp(min=1.0)
    clipfrac = ((losses2 > losses1).to(maskf.dtype) * maskf).sum() / n if n > 0 else maskf.new_tensor(math.nan)
    return loss, clipfrac.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """`1 - Var[R - V] / Var[R]` over valid tokens (cleanrl's ppo.py); NaN when undefined (< 2 tokens, Var[R] = 0)."""
    maskf = mask.to(values.dtype)
    n = maskf.sum()
    if n < 2:
        return math.nan

    def var(x: torch.Tensor) -> float:
        mean = (x * maskf).sum() / n
        return float((((x - mean) * maskf).square().sum() / n).item())

    var_returns = var(returns)
    if var_returns == 0:
        return math.nan
    return 1.0 - var(returns - values) / var_returns
