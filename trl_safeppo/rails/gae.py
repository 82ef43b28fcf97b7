"""PPO maths on right-padded `(B, T)` batches: generalized advantage estimation and masked statistics.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
https://arxiv.org/abs/1506.02438), for a row with `L` valid tokens and `V_L = 0` (the episode ends):

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1},    A_L = 0
    R_t     = A_t + V_t                                   (the value target)

The loop is the one of cleanrl's `ppo.py` and of TRL's former PPOTrainer, vectorised over the batch; padded
positions have reward and value zeroed, so nothing leaks from padding into valid tokens, and outputs are 0 there.
Computed in float64 and returned in the input dtype.
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
        mask: `(B, T)` 1 on valid (response) tokens, 0 on right padding. Valid tokens must be a prefix of each row.
        gamma: discount, in [0, 1].
        lam: GAE lambda, in [0, 1].

    Returns:
        `(advantages, returns)`, both `(B, T)`, 0 on padding.
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
    maskd = mask.to(torch.float64)
    rewards = token_rewards.to(torch.float64) * maskd
    values64 = values.to(torch.float64) * maskd
    gen_len = values.shape[1]

    lastgaelam = torch.zeros(values.shape[0], dtype=torch.float64, device=values.device)
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        nextvalues = values64[:, t + 1] if t < gen_len - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values64[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * maskd
    returns = advantages + values64
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
