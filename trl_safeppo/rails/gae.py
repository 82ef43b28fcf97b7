"""PPO maths on `(B, T)` response batches: generalized advantage estimation and masked statistics.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
https://arxiv.org/abs/1506.02438), over the valid tokens `t_1 < ... < t_L` of a row, with `V_{t_{L+1}} = 0` (the
episode ends):

    delta_t = r_t + gamma * V_next(t) - V_t          V_next(t): the value at the NEXT VALID token
    A_t     = delta_t + gamma * lam * A_next(t),      A_next(t_L) = 0
    R_t     = A_t + V_t                               (the value target)

A row's valid tokens need not be a prefix: tool-calling and multi-turn rollouts mask the tokens that the environment
wrote (`completion_mask * tool_mask`, holes in the middle). Masked tokens are skipped: they are not steps of the
episode, the recursion passes over them, and their advantages and returns are 0. With a prefix mask this is the
loop of cleanrl's `ppo.py` and of TRL's former PPOTrainer, vectorised over the batch.

Computed in the inputs' floating dtype, at least float32 (never float64 by force: Apple's MPS has no float64), and
returned in the dtype of `values`.
"""

from __future__ import annotations

import torch


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE on a right-padded batch.

    Args:
        token_rewards: `(B, T)` per-token rewards (e.g. `-beta * kl_t`, plus the score on the last token).
        values: `(B, T)` value estimates `V(s_t)`.
        mask: `(B, T)` 1 on valid tokens, 0 on right padding and on tokens written by a tool or environment (holes
            are allowed: they are skipped).
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        `(advantages, returns)`, both `(B, T)`, 0 where `mask` is 0.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if token_rewards.shape != values.shape or values.shape != mask.shape or values.dim() != 2:
        raise ValueError(
            f"token_rewards, values and mask must share one (B, T) shape, got {tuple(token_rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    out_dtype = values.dtype if values.is_floating_point() else torch.float32
    dtype = torch.promote_types(torch.promote_types(values.dtype, token_rewards.dtype), torch.float32)
    valid = mask.bool()
    maskf = valid.to(dtype)
    rewards = token_rewards.to(dtype) * maskf
    values_ = values.to(dtype) * maskf
    gen_len = values.shape[1]

    lastgaelam = torch.zeros(values.shape[0], dtype=dtype, device=values.device)  # A at the next valid token
    nextvalues = torch.zeros_like(lastgaelam)  # V at the next valid token (0 after the last one)
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        delta = rewards[:, t] + gamma * nextvalues - values_[:, t]
        step = valid[:, t]  # a masked token is no step: A and V of the next valid token pass over it unchanged
        lastgaelam = torch.where(step, delta + gamma * lam * lastgaelam, lastgaelam)
        nextvalues = torch.where(step, values_[:, t], nextvalues)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * maskf
    returns = advantages + values_
    return advantages.to(out_dtype), returns.to(out_dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all of them, or along `dim`)."""
    maskf = mask.to(x.dtype)
    if dim is None:
        return (x * maskf).sum() / maskf.sum()
    return (x * maskf).sum(dim=dim) / maskf.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over positions where `mask` is 1; `unbiased` applies Bessel's correction n / (n - 1).

    Raises ValueError on an empty mask; with a single valid position the unbiased variance is returned as 0.
    """
    n = mask.to(x.dtype).sum()
    if n == 0:
        raise ValueError("masked_var: the mask selects no position")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * n / (n - 1) if n > 1 else torch.zeros_like(var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten `x` with mean and (unbiased) variance over valid positions: `(x - mean) / sqrt(var + eps)`.

    With `shift_mean=False` the mean is added back (scale only), as TRL's former PPOTrainer did for rewards.
    Padded positions are 0 in the result.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)
