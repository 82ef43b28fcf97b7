"""No float64 tensor is made on the device by the PPO rails (GAE, KL, whitening, value loss), nor by SafePPOTrainer's
rollout targets and loss (issue 20.4): Apple's MPS has no float64, and on a GPU it is slow.

A TorchDispatchMode sees every op's outputs; it records the ops that return a float64 tensor. The reward rails
(clip, normalize, length rails: `rails/reward.py`) keep their float64 statistics on the CPU by design (the wiring
moves the (B,) rewards there first), so they are outside this check; python floats for logging are not tensors.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trl_safeppo.rails.gae import compute_gae, masked_whiten
from trl_safeppo.rails.kl import kl_per_token, kl_penalized_token_rewards, sequence_kl
from trl_safeppo.trainers.ppo_maths import clipped_value_loss, explained_variance, rollout_targets


class Float64Ops(TorchDispatchMode):
    """Records the name of every op that returns a float64 tensor while the mode is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in outs):
            self.ops.append(str(func))
        return out


def test_the_recorder_sees_float64():
    x = torch.ones(3)
    with Float64Ops() as mode:
        x.to(torch.float64).sum()
    assert mode.ops, "the check itself must catch a float64 tensor"


def test_ppo_maths_make_no_float64():
    torch.manual_seed(0)
    B, T = 3, 6
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    logps, ref, values = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    scores = torch.tensor([1.0, -1.0, float("nan")])
    for dtype in (torch.float32, torch.bfloat16):
        with Float64Ops() as mode:
            for estimator in ("k1", "k2", "k3"):
                out = rollout_targets(
                    scores, logps.to(dtype), ref.to(dtype), values.to(dtype), mask, kl_coef=0.1, gamma=0.99,
                    lam=0.95, estimator=estimator, whiten_advantages=True, whiten_rewards=True,
                    scorable=torch.tensor([True, True, False]),
                )
            compute_gae(out.token_rewards, values.to(dtype), mask, 0.9, 0.8)
            masked_whiten(values.to(dtype), mask)
            kl = kl_per_token(logps.to(dtype), ref.to(dtype), "k1", mask=mask)
            sequence_kl(kl, mask)
            kl_penalized_token_rewards(scores.nan_to_num(), kl, mask, 0.1)
            loss, _ = clipped_value_loss(values.to(dtype), values.to(dtype), out.returns, out.mask, 0.2)
            explained_variance(values, out.returns.float(), out.mask)
        assert mode.ops == [], f"{dtype}: float64 made by {sorted(set(mode.ops))}"


def test_safe_ppo_rollout_and_loss_make_no_float64(tmp_path, tiny_debug_path, monkeypatch):
    from tests.trainers.test_ppo_trainer import LengthReward, config, prompts
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

    args = config(tmp_path, max_steps=1, rails={"kl": {"controller": "adaptive", "target": 1.0}, "normalize": {}})
    trainer = SafePPOTrainer(model="tiny://debug", reward_funcs=LengthReward(), args=args, train_dataset=prompts())
    recorded: dict[str, list[str]] = {}

    def watched(name, method):
        def run(*a, **kw):
            with Float64Ops() as mode:
                out = method(*a, **kw)
            recorded.setdefault(name, []).extend(mode.ops)
            return out

        return run

    monkeypatch.setattr(trainer, "_ppo_rollout", watched("rollout", trainer._ppo_rollout))
    monkeypatch.setattr(trainer, "_compute_loss", watched("loss", trainer._compute_loss))
    trainer.train()
    assert set(recorded) == {"rollout", "loss"}
    assert recorded == {"rollout": [], "loss": []}
