"""The rail protocol: a reward batch, a rail as a pair of pure functions, and `chain`.

A rail is written like an optax gradient transformation (https://github.com/google-deepmind/optax):

    rail = clip_rewards(-1.0, 1.0)
    state = rail.init()
    batch, state, metrics = rail.update(batch, state)

`init()` returns a fresh state; `update(batch, state)` returns the batch with its rewards replaced, the new state and
a dict of metrics named `rails/<rail>/<counter>`. `update` never mutates its inputs, and every state is plain
JSON-able python (floats, ints, lists, dicts), so `json.dumps(state)` is the checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

State = Any  # plain python: None, float, int, str, list, dict (JSON-able)
Metrics = dict[str, float]


@dataclass(frozen=True)
class RewardBatch:
    """One batch of sequence-level rewards and what the rails need to know about each completion.

    Attributes:
        rewards: `(B,)` float32. NaN marks a missing (`None`) reward; the non-finite guard replaces it.
        lengths: `(B,)` int64, completion length in tokens (EOS included when present).
        truncated: `(B,)` bool, True when the completion ended without EOS (cut at `max_completion_length`).
        group_ids: `(B,)` int64 or None; completions of one prompt share an id (GRPO groups). None: one group.
        max_completion_length: the generation budget in tokens, or None when unknown.
    """

    rewards: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    group_ids: torch.Tensor | None = None
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        n = self.rewards.shape
        if self.rewards.dim() != 1:
            raise ValueError(f"RewardBatch.rewards must have shape (B,), got {tuple(n)}")
        for name in ("lengths", "truncated", "group_ids"):
            value = getattr(self, name)
            if value is not None and value.shape != n:
                raise ValueError(
                    f"RewardBatch.{name} must have shape {tuple(n)} like rewards, got {tuple(value.shape)}"
                )

    def replace(self, **changes: Any) -> RewardBatch:
        """A copy with some fields replaced (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


class RewardRail(NamedTuple):
    """A reward rail: `init() -> state` and `update(batch, state) -> (batch, new_state, metrics)`, both pure."""

    init: Callable[[], State]
    update: Callable[[RewardBatch, State], tuple[RewardBatch, State, Metrics]]


def identity() -> RewardRail:
    """The rail that changes nothing (stateless, no metrics)."""

    def init() -> State:
        return None

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        return batch, state, {}

    return RewardRail(init, update)


def chain(*rails: tuple[str, RewardRail]) -> RewardRail:
    """Compose named rails, applied in the declared order; the state is a dict `{name: rail state}`.

    >>> rail = chain(("guard", non_finite_guard()), ("clip", clip_rewards(-1.0, 1.0)))  # doctest: +SKIP
    """
    names = [name for name, _ in rails]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"chain: rail names must be unique, got {duplicated} more than once")

    def init() -> State:
        return {name: rail.init() for name, rail in rails}

    def update(batch: RewardBatch, state: State) -> tuple[RewardBatch, State, Metrics]:
        new_state: dict[str, State] = {}
        metrics: Metrics = {}
        for name, rail in rails:
            batch, new_state[name], rail_metrics = rail.update(batch, state[name])
            metrics.update(rail_metrics)
        return batch, new_state, metrics

    return RewardRail(init, update)


def _as_reward_tensor(rewards: Sequence[float | None] | torch.Tensor) -> torch.Tensor:
    import torch

    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(torch.float32).reshape(-1)
    return torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float32)


def reward_batch_from_completions(
    rewards: Sequence[float | None] | torch.Tensor,
    completion_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    completion_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    group_size: int | None = None,
    max_completion_length: int | None = None,
) -> RewardBatch:
    """Build a `RewardBatch` from what a TRL trainer has after generation.

    Args:
        rewards: `(B,)` sequence-level rewards; `None` entries become NaN (the non-finite guard handles them).
        completion_ids: `(B, T)` right-padded tensor (then `completion_mask` is required), or a list of `B` token
            id lists with padding already removed (TRL's `completion_ids_list`).
        completion_mask: `(B, T)` 1 on completion tokens (up to and including EOS), 0 on padding.
        eos_token_id: id (or ids) that end a completion. A completion is truncated when none of its valid tokens
            is an EOS. Without it, a completion is truncated when its length reaches `max_completion_length`.
        group_size: completions per prompt (GRPO's `num_generations`): rows `[k*G, (k+1)*G)` form group `k`.
        max_completion_length: the generation budget, stored on the batch for the length rails.
    """
    import torch

    r = _as_reward_tensor(rewards)
    batch_size = r.shape[0]
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))

    if completion_mask is not None:
        mask = completion_mask.to(torch.bool)
        lengths = mask.sum(dim=1).to(torch.int64)
        if completion_ids is not None and eos_ids:
            ids = completion_ids if isinstance(completion_ids, torch.Tensor) else None
            if ids is None:
                raise ValueError("completion_ids must be a (B, T) tensor when completion_mask is given")
            has_eos = (torch.isin(ids, torch.tensor(eos_ids, device=ids.device)) & mask).any(dim=1)
            truncated = ~has_eos.cpu()
        else:
            truncated = None
    elif completion_ids is not None:
        if isinstance(completion_ids, torch.Tensor):
            raise ValueError("a (B, T) completion_ids tensor needs completion_mask (its padding is ambiguous)")
        lists = [list(map(int, ids)) for ids in completion_ids]
        lengths = torch.tensor([len(ids) for ids in lists], dtype=torch.int64)
        truncated = torch.tensor([not any(t in eos_ids for t in ids) for ids in lists]) if eos_ids else None
    else:
        raise ValueError("reward_batch_from_completions needs completion_mask or completion_ids to know lengths")

    lengths = lengths.cpu()
    if truncated is None:
        if max_completion_length is None:
            raise ValueError(
                "reward_batch_from_completions: pass eos_token_id (with completion_ids) or max_completion_length "
                "so that truncated completions can be told apart"
            )
        truncated = lengths >= max_completion_length
    if lengths.shape[0] != batch_size:
        raise ValueError(f"got {batch_size} rewards but {lengths.shape[0]} completions")

    group_ids = None
    if group_size is not None:
        if group_size < 1 or batch_size % group_size != 0:
            raise ValueError(f"group_size must be a positive divisor of the batch size {batch_size}, got {group_size}")
        group_ids = torch.arange(batch_size, dtype=torch.int64) // group_size
    return RewardBatch(
        rewards=r.cpu(),
        lengths=lengths,
        truncated=truncated.to(torch.bool),
        group_ids=group_ids,
        max_completion_length=max_completion_length,
    )
