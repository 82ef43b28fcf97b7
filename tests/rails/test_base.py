"""RewardBatch, the convenience constructor, chain."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from trl_safeppo.rails.base import RewardBatch, RewardRail, chain, identity, reward_batch_from_completions
from trl_safeppo.rails.reward import clip_rewards, normalize_rewards


def batch(rewards, lengths=None, truncated=None, group_ids=None, max_len=None):
    n = len(rewards)
    return RewardBatch(
        rewards=torch.tensor(rewards, dtype=torch.float32),
        lengths=torch.tensor(lengths if lengths is not None else [1] * n),
        truncated=torch.tensor(truncated if truncated is not None else [False] * n),
        group_ids=None if group_ids is None else torch.tensor(group_ids),
        max_completion_length=max_len,
    )


def shift(delta: float) -> RewardRail:
    """A toy stateful rail: adds delta, counts calls."""
    def update(b, s):
        return b.replace(rewards=b.rewards + delta), {"calls": s["calls"] + 1}, {}

    return RewardRail(lambda: {"calls": 0}, update)


def test_from_completion_id_lists():
    # TRL's completion_ids_list: padding removed, EOS (id 0) kept when generated.
    ids = [[4, 5, 0], [4, 5, 6, 7], [0], [9, 9]]
    b = reward_batch_from_completions([1.0, None, 0.5, 2.0], ids, eos_token_id=0, group_size=2)
    assert b.lengths.tolist() == [3, 4, 1, 2]
    assert b.truncated.tolist() == [False, True, False, True]
    assert b.group_ids.tolist() == [0, 0, 1, 1]
    assert math.isnan(b.rewards[1]) and b.rewards.dtype == torch.float32


def test_from_padded_tensor_with_mask_where_pad_is_eos():
    # pad id == eos id == 0: only valid (mask == 1) tokens count, so row 1's padding is not an EOS.
    ids = torch.tensor([[5, 0, 0], [5, 6, 0], [5, 6, 7]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    b = reward_batch_from_completions(torch.tensor([1.0, 2.0, 3.0]), ids, completion_mask=mask, eos_token_id=[0, 99])
    assert b.lengths.tolist() == [2, 2, 3]
    assert b.truncated.tolist() == [False, True, True]
    # without EOS ids, truncation = length reached the budget
    b = reward_batch_from_completions([1.0, 2.0, 3.0], completion_mask=mask, max_completion_length=3)
    assert b.truncated.tolist() == [False, False, True] and b.max_completion_length == 3


def test_constructor_errors():
    with pytest.raises(ValueError, match="group_size"):
        reward_batch_from_completions([1.0, 2.0, 3.0], [[0], [0], [0]], eos_token_id=0, group_size=2)
    with pytest.raises(ValueError, match="completion_mask"):
        reward_batch_from_completions([1.0], torch.tensor([[1, 0]]), eos_token_id=0)
    with pytest.raises(ValueError, match="max_completion_length"):
        reward_batch_from_completions([1.0], [[1, 2]])
    with pytest.raises(ValueError, match="shape"):
        RewardBatch(torch.zeros(2), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.bool))


def test_chain_applies_in_declared_order_with_state_by_name():
    b = batch([0.5, 2.0])
    # clip to [-1, 1] then +1: [0.5, 1] + 1 = [1.5, 2]; +1 then clip: [1.5, 3] -> [1, 1]
    clip_then_shift = chain(("clip", clip_rewards(-1.0, 1.0)), ("shift", shift(1.0)))
    shift_then_clip = chain(("shift", shift(1.0)), ("clip", clip_rewards(-1.0, 1.0)))
    out, state, metrics = clip_then_shift.update(b, clip_then_shift.init())
    assert_close(out.rewards, torch.tensor([1.5, 2.0]))
    assert state == {"clip": None, "shift": {"calls": 1}}
    assert metrics == {"rails/clip/low_frac": 0.0, "rails/clip/high_frac": 0.5}
    out, _, _ = shift_then_clip.update(b, shift_then_clip.init())
    assert_close(out.rewards, torch.tensor([1.0, 1.0]))


def test_chain_of_identities_is_identity():
    b = batch([0.1, -3.0, 7.0], lengths=[1, 2, 3])
    rail = chain(("a", identity()), ("b", identity()))
    out, state, metrics = rail.update(b, rail.init())
    assert out == b and metrics == {}
    empty = chain()
    assert empty.update(b, empty.init())[0] == b


def test_chain_is_pure():
    rail = chain(("norm", normalize_rewards()))
    state0 = rail.init()
    _, state1, _ = rail.update(batch([1.0, 3.0]), state0)
    assert state0 == {"norm": {"count": 0, "mean": 0.0, "m2": 0.0}}  # the input state is not mutated
    assert state1["norm"]["count"] == 2
    again, _, _ = rail.update(batch([1.0, 3.0]), state0)  # same inputs, same outputs
    assert_close(again.rewards, rail.update(batch([1.0, 3.0]), state0)[0].rewards)


def test_chain_rejects_duplicate_names():
    with pytest.raises(ValueError, match="unique"):
        chain(("x", identity()), ("x", identity()))
