"""The reward rails on GRPO's rewards: where a trainer's rewards are summed and railed, once.

:class:`RewardStage` sits between GRPO's gathering of every reward function's scores (``rewards_per_func``, (B, K))
and their weighted sum: it rails the sum of the user's columns and writes ``railed - raw`` into one extra column,
:class:`RailsAdjustment`, so that GRPO's own weighted sum *is* the railed reward and its group normalization runs
unchanged (docs/grpo.md). Every process sees the global batch, so every process updates identical rail state.
"""

from __future__ import annotations

import copy

ADJUSTMENT_NAME = "rails_adjustment"


class RailsAdjustment:
    """Placeholder reward function (``None`` for every completion) whose column :class:`RewardStage` fills with
    ``railed - raw`` (weight 1)."""

    __name__ = ADJUSTMENT_NAME

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        return [None] * len(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def weighted_reward(rewards_per_func, weights):
    """`(B,)` the weighted sum of `(B, K)` per-function rewards, NaN entries skipped; NaN where every entry is."""
    import torch

    total = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return total


class RewardStage:
    """The reward rails of one trainer (``rails``: a :class:`~trl_safeppo.rails.RewardRails`; with ``None``
    :meth:`apply` changes nothing and only records the summed reward)."""

    def __init__(self, rails=None):
        self.rails = rails
        self.adjustment_index: int | None = None
        # the last scored batch over all processes: the RewardBatch the rails saw, and the railed reward (B,) on the
        # trainer's device, which PPO's score reads
        self.last_batch = None
        self.last_rewards = None

    def prepare_init(self, args, reward_funcs, reward_processing_classes=None):
        """``(args, reward_funcs, reward_processing_classes)`` of GRPOTrainer with the :class:`RailsAdjustment`
        column appended when rails are on (``args`` then a shallow copy)."""
        if self.rails is None:
            return args, reward_funcs, reward_processing_classes
        funcs = [] if reward_funcs is None else reward_funcs
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
        n_user = len(funcs)
        args = copy.copy(args)
        if args.reward_weights is not None:
            args.reward_weights = [*args.reward_weights, 1.0]
        if reward_processing_classes is not None:
            rpc = reward_processing_classes
            rpc = list(rpc) if isinstance(rpc, (list, tuple)) else [rpc]
            reward_processing_classes = [*rpc, *([None] * (n_user - len(rpc))), None]
        return args, [*funcs, RailsAdjustment()], reward_processing_classes

    def start(self, trainer) -> None:
        self.adjustment_index = next(
            (i for i, func in enumerate(getattr(trainer, "reward_funcs", ())) if isinstance(func, RailsAdjustment)), None)

    def reward_batch(self, trainer, raw_rewards, completion_ids_list, mode: str):
        """GRPO's global rewards (B,) + this process's completion ids -> a :class:`RewardBatch` over all processes."""
        import torch

        from ..rails.base import RewardBatch, reward_batch_from_completions

        # this process's lengths and truncation flags (no EOS among the tokens), then gathered like the rewards
        local = reward_batch_from_completions(
            [0.0] * len(completion_ids_list), completion_ids_list, eos_token_id=list(trainer.eos_token_ids),
        )
        device = raw_rewards.device
        gather = trainer.accelerator.gather
        num_generations = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        return RewardBatch(
            rewards=raw_rewards.float().cpu(),
            lengths=gather(local.lengths.to(device)).cpu(),
            truncated=gather(local.truncated.to(device)).bool().cpu(),
            group_ids=torch.arange(raw_rewards.numel()) // num_generations,
            max_completion_length=trainer.max_completion_length,
        )

    def apply(self, trainer, rewards_per_func, completion_ids_list):
        """Rail GRPO's gathered ``rewards_per_func`` (B, K); returns the (B, K) tensor GRPO sums and normalizes.

        Rows whose railed reward is non-finite become all-NaN (GRPO gives them a zero advantage); non-finite
        per-function entries are treated as missing (NaN). In eval mode the rails run on a copy of their state, so
        evaluation never moves a running statistic.
        """
        import torch

        weights = trainer.reward_weights.to(rewards_per_func.device)
        if self.rails is None:
            self.last_rewards = weighted_reward(rewards_per_func, weights).detach()
            return rewards_per_func
        mode = "train" if trainer.model.training else "eval"
        idx = self.adjustment_index
        user = [i for i in range(rewards_per_func.shape[1]) if i != idx]
        raw = weighted_reward(rewards_per_func[:, user], weights[user])

        batch = self.reward_batch(trainer, raw, completion_ids_list, mode)
        saved = self.rails.state_dict() if mode == "eval" else None
        railed, metrics = self.rails(batch)
        if saved is not None:
            self.rails.load_state_dict(saved)
        railed = railed.to(device=rewards_per_func.device, dtype=rewards_per_func.dtype)

        out = rewards_per_func.clone()
        out[:, user] = torch.where(torch.isfinite(out[:, user]), out[:, user], torch.nan)
        drop = ~torch.isfinite(railed)
        out[drop] = torch.nan
        base = (out[:, user] * weights[user].unsqueeze(0)).nansum(dim=1)
        out[:, idx] = torch.where(drop, torch.nan, (railed - base) / weights[idx])

        self.last_batch, self.last_rewards = batch, railed.detach()
        store = trainer._metrics[mode]
        for name, value in metrics.items():
            store[name].append(float(value))
        return out


def resolve_reward_funcs(reward_funcs) -> list:
    """GRPO's ``reward_funcs``, plus the package's conveniences: a ``tiny://`` id or local directory is a reward
    model path; a built-in rule name (``"math"``), a ``"module:function"`` path or a dict spec goes through
    :func:`trl_safeppo.rewards.resolve`; anything else (callables, models, Hub ids) is passed to GRPO unchanged."""
    import os

    from ..models import resolve_model_path
    from ..rewards import resolve
    from ..rewards.spec import BUILTINS

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_funcs is None or not funcs:
        raise ValueError(
            f"reward_funcs={reward_funcs!r}: pass a callable rule checker, a reward model, or a non-empty list of them"
        )
    resolved = []
    for i, func in enumerate(funcs):
        field = f"reward_funcs[{i}]" if isinstance(reward_funcs, (list, tuple)) else "reward_funcs"
        if isinstance(func, str) and (func.startswith("tiny://") or os.path.isdir(os.path.expanduser(func))):
            func = resolve_model_path(func, field=field)  # a reward model's path
        elif isinstance(func, dict) or (isinstance(func, str) and (func in BUILTINS or ":" in func)):
            func = resolve(func)  # a rule
        elif isinstance(func, str):
            func = resolve_model_path(func, field=field)  # a Hub id (a clear error for a missing path)
        resolved.append(func)
    return resolved
