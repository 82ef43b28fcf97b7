"""Tripwires that act, on a real (tiny) SafeGRPOTrainer run: a NaN reward and a KL blow-up are injected at a known
step, and the configured action must have happened (rollback restores the exact last good weights)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from trl_safeppo.trainers.grpo_config import SafeGRPOConfig  # noqa: E402
from trl_safeppo.trainers.grpo_trainer import SafeGRPOTrainer  # noqa: E402
from trl_safeppo.trainers.tripwires import TRIPWIRES_FILE, TripwireActions, parse_tripwires  # noqa: E402

NAN_AT = 2  # the reward is NaN for the whole batch of step 3 (scored while global_step == 2)
BLOWUP_AFTER = 2  # the weights are scrambled at the end of step 2, so step 3 measures a huge KL


class LengthReward:
    """Reward = completion length in characters; NaN for every completion when global_step == nan_at."""

    __name__ = "length_reward"

    def __init__(self, nan_at: int | None = None):
        self.nan_at = nan_at

    def __call__(self, prompts, completions, trainer_state=None, **kwargs):
        if self.nan_at is not None and trainer_state is not None and trainer_state.global_step == self.nan_at:
            return [math.nan] * len(completions)
        return [float(len(c[0]["content"])) for c in completions]


class Recorder(TrainerCallback):
    """Copies of the policy weights at each step end and right after each log (after the tripwire acted)."""

    def __init__(self, trainer, blowup_after: int | None = None):
        self.trainer = trainer
        self.blowup_after = blowup_after
        self.at_step_end: dict[int, dict[str, torch.Tensor]] = {}
        self.after_log: dict[int, dict[str, torch.Tensor]] = {}

    def _weights(self):
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def on_step_end(self, args, state, control, **kwargs):
        self.at_step_end[state.global_step] = self._weights()
        if self.blowup_after == state.global_step:
            with torch.no_grad():
                generator = torch.Generator().manual_seed(0)
                for p in self.trainer.model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.5)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.after_log[state.global_step] = self._weights()


def _dataset():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})


def _trainer(tmp_path, tiny_debug_path, tripwires, reward, max_steps=4, blowup_after=None):
    args = SafeGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=max_steps,
        logging_steps=1,
        learning_rate=1e-3,
        beta=0.1,
        seed=0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        tripwires=tripwires,
    )
    trainer = SafeGRPOTrainer(model=tiny_debug_path, reward_funcs=reward, args=args, train_dataset=_dataset())
    recorder = Recorder(trainer, blowup_after=blowup_after)
    trainer.add_callback(recorder)  # after the tripwire callback: sees the weights once it acted
    return trainer, recorder


def _events(tmp_path):
    with open(os.path.join(tmp_path, TRIPWIRES_FILE)) as f:
        return [json.loads(line) for line in f]


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_reward_rolls_back_to_the_exact_last_good_weights(tmp_path, tiny_debug_path):
    tripwires = [{"detector": "non_finite", "action": "rollback"}]
    trainer, rec = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(nan_at=NAN_AT))
    trainer.train()

    events = _events(tmp_path)
    assert [(e["step"], e["detector"], e["status"], e["action"]) for e in events] == [
        (3, "non_finite", "trip", "rollback")
    ]
    details = events[0]["details"]
    # Log 1 was clean -> candidate = weights after step 1; log 2 clean -> promoted to last good. Log 3 trips.
    assert details["restored_step"] == 1
    # the stated change: beta 0.1 * 2 = 0.2, learning rate halved
    assert details["beta_before"] == pytest.approx(0.1) and details["beta_after"] == pytest.approx(0.2)
    assert details["lr_after"] == pytest.approx(0.5 * details["lr_before"])
    assert _same(rec.after_log[3], rec.at_step_end[1])  # exactly the last good weights
    assert not _same(rec.at_step_end[3], rec.at_step_end[1])  # and they had moved before the rollback
    assert trainer.beta == pytest.approx(0.2)
    assert trainer.state.global_step == 4  # training continued after the rollback
    flags = [h.get("tripwire/non_finite") for h in trainer.state.log_history if "loss" in h]
    assert flags == [0.0, 0.0, 2.0, 0.0]


def test_kl_blowup_raises_beta(tmp_path, tiny_debug_path):
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 0.5}}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=3, blowup_after=BLOWUP_AFTER)
    trainer.train()

    kls = [h["kl"] for h in trainer.state.log_history if "loss" in h]
    assert kls[1] < 0.5 < kls[2]  # the injection, not the learning rate, crossed the limit
    events = [e for e in _events(tmp_path) if e["status"] == "trip"]
    assert [(e["step"], e["detector"], e["action"]) for e in events] == [(3, "kl_limit", "raise_kl")]
    assert events[0]["values"]["kl"] == pytest.approx(kls[2])
    # beta 0.1 * raise_kl_factor 2 = 0.2
    assert events[0]["details"] == {"beta_before": pytest.approx(0.1), "beta_after": pytest.approx(0.2)}
    assert trainer.beta == pytest.approx(0.2)


def test_kl_blowup_stops_and_keeps_last_good(tmp_path, tiny_debug_path):
    tripwires = [
        {"detector": "kl_limit", "action": "stop", "params": {"limit": 0.5}},
        {"detector": "entropy_collapse", "action": "warn"},
    ]
    trainer, rec = _trainer(
        tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=6, blowup_after=BLOWUP_AFTER
    )
    trainer.train()

    assert trainer.state.global_step == 3  # ended cleanly at the trip, not at max_steps=6
    events = [e for e in _events(tmp_path) if e["status"] == "trip"]
    assert [(e["detector"], e["action"]) for e in events] == [("kl_limit", "stop")]
    assert events[0]["details"]["stopped"] is True and "kl_limit" in events[0]["details"]["why"]
    assert events[0]["details"]["restored_step"] == 1
    assert _same(rec.after_log[3], rec.at_step_end[1])
    assert trainer.tripwire_callback.stopped_reason.startswith("stopped at step 3")
    assert os.path.exists(os.path.join(tmp_path, "tripwire-last-good", "snapshot.pt"))


@pytest.mark.parametrize(
    ("tripwires", "message"),
    [
        ([{"detector": "kl_lmit", "action": "stop"}], "tripwires[0].detector='kl_lmit'"),
        ([{"detector": "kl_limit", "action": "explode", "params": {"limit": 1}}], "tripwires[0].action='explode'"),
        ([{"detector": "kl_limit", "action": "stop"}], "missing required params ['limit']"),
        ([{"detector": "kl_limit", "params": {"limit": 1}, "when": 3}], "unknown keys ['when']"),
        ({"detector": "kl_limit"}, "must be a list"),
    ],
)
def test_bad_tripwire_config_names_the_field(tripwires, message):
    with pytest.raises(ValueError) as err:
        parse_tripwires(tripwires)
    assert message in str(err.value)


def test_bad_action_knob_names_the_field():
    with pytest.raises(ValueError, match="tripwire_rollback_lr_factor=2"):
        TripwireActions(rollback_lr_factor=2)
    with pytest.raises(ValueError, match="tripwire_raise_kl_factor=1"):
        TripwireActions(raise_kl_factor=1)
