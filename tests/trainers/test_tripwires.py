"""Tripwires that act, on a real (tiny) SafeGRPOTrainer run: a NaN reward and a KL blow-up are injected at a known
step, and the configured action must have happened (rollback restores the exact last good weights)."""

from __future__ import annotations

import json
import math
import os
import time

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
    """Reward = completion length in characters; NaN for every completion when global_step == nan_at, or from
    global_step == nan_from on."""

    __name__ = "length_reward"

    def __init__(self, nan_at: int | None = None, nan_from: int | None = None):
        self.nan_at = nan_at
        self.nan_from = nan_from

    def __call__(self, prompts, completions, trainer_state=None, **kwargs):
        step = trainer_state.global_step if trainer_state is not None else None
        if step is not None and (step == self.nan_at or (self.nan_from is not None and step >= self.nan_from)):
            return [math.nan] * len(completions)
        return [float(len(c[0]["content"])) for c in completions]


class HangsAt:
    """Reward 1.0 for every completion, except that the call made while global_step == hang_at sleeps 60 s."""

    __name__ = "hangs"

    def __init__(self, hang_at: int):
        self.hang_at = hang_at

    def __call__(self, prompts, completions, trainer_state=None, **kwargs):
        if trainer_state is not None and trainer_state.global_step == self.hang_at:
            time.sleep(60)
        return [1.0] * len(completions)


class NoScore:
    """Gives no score at all (None for every completion)."""

    __name__ = "no_score"

    def __call__(self, prompts, completions, **kwargs):
        return [None] * len(completions)


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


def _trainer(tmp_path, tiny_debug_path, tripwires, reward, max_steps=4, blowup_after=None, **overrides):
    args = SafeGRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=max_steps,
        logging_steps=1,
        learning_rate=overrides.pop("learning_rate", 1e-3),
        beta=0.1,
        seed=0,
        save_strategy=overrides.pop("save_strategy", "no"),
        report_to="none",
        use_cpu=True,
        tripwires=tripwires,
        **overrides,
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
    # beta 0.1 * raise_kl_factor 2 = 0.2, below the default ceiling 16 * 0.1 = 1.6
    assert events[0]["details"] == {"beta_before": pytest.approx(0.1), "beta_after": pytest.approx(0.2),
                                    "max_beta": pytest.approx(1.6)}
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


def test_guard_repairing_every_reward_from_step_4_on_stops(tmp_path, tiny_debug_path):
    # The reward is NaN for every completion from step 4 on (scored while global_step == 3). The rails' guard
    # replaces each by 0.0, so reward and loss stay finite; the guard's repaired share 16/16 = 1.0 > 0.5 trips.
    tripwires = [{"detector": "non_finite", "action": "stop"}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(nan_from=3), max_steps=6, rails={})
    trainer.train()

    assert trainer.state.global_step == 4  # stopped at the first repaired step, not at max_steps=6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(logs[-1]["reward"]) and math.isfinite(logs[-1]["loss"])  # what used to hide it
    assert [h["rails/non_finite/share"] for h in logs] == [0.0, 0.0, 0.0, 1.0]
    events = [e for e in _events(tmp_path) if e["status"] == "trip"]
    assert [(e["step"], e["detector"], e["action"]) for e in events] == [(4, "non_finite", "stop")]
    assert events[0]["values"] == {"repaired_share": 1.0, "max_repaired_share": 0.5}
    assert events[0]["details"]["stopped"] is True


def test_raise_kl_exhausted_escalates_to_rollback_then_stop(tmp_path, tiny_debug_path):
    # Every update moves the policy (lr 1e-2), so KL > 1e-6 at each log but the first (KL 0: policy == reference)
    # and the one right after a rollback to the initial weights. beta 0.1, max 0.2, one rollback allowed:
    #   log 1: ok (candidate snapshot); log 2: raise_kl 0.1 -> 0.2 (the max);
    #   log 3: beta at its max -> rollback to the last good = the initial weights (step 0; log 2 tripped, so the
    #          candidate was never promoted); beta = snapshot's 0.1 * 2 = 0.2, learning rate halved;
    #   log 4: KL 0 again (initial weights): ok;  log 5: beta 0.2 at its max, rollbacks used up -> stop.
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e-6}}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=8, learning_rate=1e-2,
                          tripwire_max_beta=0.2, tripwire_max_rollbacks=1)
    trainer.train()

    kls = [h["kl"] for h in trainer.state.log_history if "loss" in h]
    assert kls[0] == 0.0 and kls[3] == 0.0 and min(kls[1], kls[2], kls[4]) > 1e-6
    events = [e for e in _events(tmp_path) if e["status"] == "trip"]
    assert [(e["step"], e["action"]) for e in events] == [(2, "raise_kl"), (3, "raise_kl"), (5, "raise_kl")]
    d2, d3, d5 = (e["details"] for e in events)
    assert d2 == {"beta_before": pytest.approx(0.1), "beta_after": pytest.approx(0.2), "max_beta": 0.2}
    assert d3["escalated_from"] == "raise_kl" and "at its max 0.2" in d3["escalation"]
    assert d3["restored_step"] == 0 and d3["rollbacks"] == 1 and d3["beta_after"] == pytest.approx(0.2)
    assert d3["lr_after"] == pytest.approx(0.5 * d3["lr_before"])
    assert d5["escalated_from"] == "raise_kl" and d5["stopped"] is True
    assert "tripwire_max_rollbacks=1" in d5["escalation"]
    assert trainer.state.global_step == 5  # stopped, not "completed" at max_steps=8


def test_resume_keeps_the_ladder_position(tmp_path, tiny_debug_path):
    # The ladder of test_raise_kl_exhausted_escalates_to_rollback_then_stop, cut after step 3 by a checkpoint:
    #   run A (3 steps): log 2 raise_kl 0.1 -> 0.2 (the max); log 3 rollback (1 of 1 allowed), beta 0.2; checkpoint-3.
    #   run B resumes it (5 steps): beta is 0.2 again and 1 rollback is used; log 4 KL 0 (rolled-back weights): ok;
    #   log 5: beta at its max, rollbacks used up -> stop. Starting afresh would instead raise beta 0.1 -> 0.2 at log 5.
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e-6}}]
    common = dict(learning_rate=1e-2, lr_scheduler_type="constant", tripwire_max_beta=0.2, tripwire_max_rollbacks=1,
                  save_strategy="steps", save_steps=3)  # constant: a linear schedule of 3 steps ends at lr 0
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=3, **common)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-3" / "trl_safeppo_state.json").read_text())
    assert saved["tripwires"]["ladder"] == {"rollbacks": 1} and saved["beta"] == pytest.approx(0.2)
    assert saved["tripwires"]["initial_beta"] == pytest.approx(0.1)

    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=5, **common)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    events = [e for e in _events(tmp_path) if e["status"] == "trip"]
    assert [(e["step"], e["action"]) for e in events] == [(2, "raise_kl"), (3, "raise_kl"), (5, "raise_kl")]
    d5 = events[-1]["details"]
    assert d5["escalated_from"] == "raise_kl" and d5["stopped"] is True
    assert "tripwire_max_rollbacks=1" in d5["escalation"]


def test_checkpoint_state_marker_is_written_after_all_of_the_packages_state(tmp_path, tiny_debug_path, monkeypatch):
    # trainer_state.json is written before the on_save callback that adds the package's state (rails, beta, the
    # ladder), so it cannot mark a checkpoint complete; trl_safeppo_state.json, which holds that state, does
    # (pipeline/checkpoints.py): when it is written, everything else is on disk already.
    from trl_safeppo import fileio
    from trl_safeppo.pipeline.checkpoints import STATE_MARKER

    present: list[set] = []
    original = fileio.write_json

    def spy(path, obj, **kwargs):
        if os.path.basename(path) == STATE_MARKER:
            present.append(set(os.listdir(os.path.dirname(path))))
            assert obj["rails"]["rails"]["reward"] and obj["tripwires"]["ladder"] == {"rollbacks": 0}
        return original(path, obj, **kwargs)

    monkeypatch.setattr(fileio, "write_json", spy)
    tripwires = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e3}}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, LengthReward(), max_steps=1, save_strategy="steps",
                          save_steps=1, rails={"normalize": {"enabled": True}})
    trainer.train()
    assert len(present) == 1, present
    assert {"trainer_state.json", "model.safetensors", "optimizer.pt"} <= present[0], present
    assert STATE_MARKER in os.listdir(tmp_path / "checkpoint-1")


def test_an_event_line_torn_by_a_kill_does_not_swallow_the_next(tmp_path):
    # kill -9 (or a full disk) in the middle of an append leaves half a line; the resumed stage appends after it.
    # The stop event must still be read, and the stage's gates must not die on the torn line.
    from types import SimpleNamespace

    from trl_safeppo.pipeline.runner import read_jsonl
    from trl_safeppo.trainers.tripwires import TripwireCallback

    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(is_main_process=True))
    callback = TripwireCallback(trainer, [], TripwireActions(), str(tmp_path))
    (tmp_path / TRIPWIRES_FILE).write_text('{"step": 1, "action": "warn"}\n{"step": 2, "act')
    callback._write_event({"step": 3, "action": "stop"})
    assert read_jsonl(tmp_path / TRIPWIRES_FILE) == [{"step": 1, "action": "warn"}, {"step": 3, "action": "stop"}]


def test_hanging_reward_is_cut_off_and_counted(tmp_path, tiny_debug_path):
    # The second reward hangs (60 s) on the batch of step 2; with reward_timeout_s=2 its 4 scores are None, the
    # step is scored by the first reward alone, and both detectors see it. Step 3 gets a fresh worker.
    tripwires = [{"detector": "reward_timeout", "action": "warn"}, {"detector": "silent_reward", "action": "warn"}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, [LengthReward(), HangsAt(1)], max_steps=3,
                          reward_timeout_s=2)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["rewards/hangs/timeout"] for h in logs] == [0.0, 1.0, 0.0]
    assert [h["rewards/hangs/none_frac"] for h in logs] == [0.0, 1.0, 0.0]
    assert [h["rewards/length_reward/none_frac"] for h in logs] == [0.0, 0.0, 0.0]
    assert logs[1]["rewards/hangs/mean"] is None and logs[2]["rewards/hangs/mean"] == 1.0
    events = [(e["step"], e["detector"], e["status"]) for e in _events(tmp_path)]
    assert events == [(2, "reward_timeout", "trip"), (2, "silent_reward", "trip")]
    assert [h["tripwire/reward_timeout"] for h in logs] == [0.0, 2.0, 0.0]


def _reward_workers() -> list:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == "reward-worker"]


class RaisesAt:
    """1.0 per completion, but raises on the call made while global_step == at."""

    __name__ = "raises_at"

    def __init__(self, at: int):
        self.at = at

    def __call__(self, prompts, completions, trainer_state=None, **kwargs):
        if trainer_state is not None and trainer_state.global_step == self.at:
            raise ValueError("broken rule")
        return [1.0] * len(completions)


class CountWorkers(TrainerCallback):
    def __init__(self):
        self.during: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.during.append(len(_reward_workers()))


def test_reward_workers_end_with_training_even_when_it_raises(tmp_path, tiny_debug_path):
    # One worker process per wrapped reward function while training; none left once train() returns or raises,
    # while the trainer is still referenced (not left to garbage collection).
    from trl_safeppo.rewards import RewardRuleError

    assert _reward_workers() == []
    trainer, _ = _trainer(tmp_path / "a", tiny_debug_path, None, [LengthReward(), RaisesAt(99)], max_steps=1)
    counter = CountWorkers()
    trainer.add_callback(counter)
    trainer.train()
    assert counter.during == [2] and _reward_workers() == []
    trainer, _ = _trainer(tmp_path / "b", tiny_debug_path, None, [LengthReward(), RaisesAt(1)], max_steps=3)
    with pytest.raises(RewardRuleError, match="broken rule"):
        trainer.train()
    assert trainer.state.global_step == 1 and _reward_workers() == []


def test_silent_reward_stops_after_its_patience(tmp_path, tiny_debug_path):
    # no_score gives None to every completion of every step: log 1 warns (1 < patience 2), log 2 trips and stops.
    tripwires = [{"detector": "silent_reward", "action": "stop", "params": {"patience": 2}}]
    trainer, _ = _trainer(tmp_path, tiny_debug_path, tripwires, [LengthReward(), NoScore()], max_steps=4)
    trainer.train()

    assert trainer.state.global_step == 2
    events = [(e["step"], e["status"], e["action"]) for e in _events(tmp_path)]
    assert events == [(1, "warn", "warn"), (2, "trip", "stop")]


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


def test_bad_timeout_and_max_beta_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"reward_timeout_s=0 is invalid; use a number of seconds > 0 .* or null"):
        SafeGRPOConfig(output_dir=str(tmp_path), reward_timeout_s=0, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="tripwire_max_beta=-1.0 is invalid; use a number > 0"):
        TripwireActions(max_beta=-1.0)
    assert SafeGRPOConfig(output_dir=str(tmp_path), reward_timeout_s=None, report_to="none",
                          use_cpu=True).reward_timeout_s is None


def test_raise_kl_keeps_snapshots_only_where_weights_are_whole(tmp_path):
    from types import SimpleNamespace

    from trl_safeppo.trainers.tripwires import TripwireCallback

    specs = parse_tripwires([{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1.0}}])
    whole = SimpleNamespace(beta=0.1, is_fsdp_enabled=False, is_deepspeed_enabled=False)
    fsdp = SimpleNamespace(beta=0.1, is_fsdp_enabled=True, is_deepspeed_enabled=False)
    zero3 = SimpleNamespace(beta=0.1, is_fsdp_enabled=False, is_deepspeed_enabled=True,
                            accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(
                                zero_stage=3))))
    fsdp2 = SimpleNamespace(beta=0.1, is_fsdp_enabled=True, is_deepspeed_enabled=False,
                            accelerator=SimpleNamespace(is_fsdp2=True))
    needs = [TripwireCallback(t, specs, TripwireActions(), str(tmp_path)).needs_snapshots
             for t in (whole, fsdp, zero3, fsdp2)]
    # FSDP1 / ZeRO-3: an exhausted raise_kl stops without a restore; FSDP2 snapshots gather full tensors
    assert needs == [True, False, False, True]
    # the default ceiling: 16 x the starting beta 0.1 = 1.6
    assert TripwireCallback(whole, specs, TripwireActions(), str(tmp_path)).max_beta == pytest.approx(1.6)


def _sharded_trainer(**flags):
    from types import SimpleNamespace

    # what TripwireCallback reads of a trainer: the sharding flags, beta and (for max_beta) no controller
    return SimpleNamespace(beta=0.1, rails_wiring=None, accelerator=SimpleNamespace(is_fsdp2=flags.pop("fsdp2", False)),
                           is_fsdp_enabled=flags.pop("fsdp", False), is_deepspeed_enabled=flags.pop("deepspeed", False))


@pytest.mark.parametrize("flags,snapshots", [
    ({}, True),                              # one process / DDP: full weights on every rank
    ({"fsdp": True, "fsdp2": True}, True),   # FSDP2: snapshots gather the full tensors
    ({"fsdp": True}, False),                 # FSDP1
    ({"deepspeed": True}, False),            # any ZeRO stage: ZeRO-2 partitions the optimizer and its fp32 masters
])
def test_snapshots_only_where_the_whole_trained_state_can_be_gathered(tmp_path, flags, snapshots):
    from trl_safeppo.rails.tripwires import TripwireSpec
    from trl_safeppo.trainers.tripwires import TripwireActions, TripwireCallback

    stop = [TripwireSpec(detector="non_finite", action="stop"), TripwireSpec(detector="kl_limit", action="raise_kl", params={"limit": 1.0})]
    callback = TripwireCallback(_sharded_trainer(**flags), stop, TripwireActions(), str(tmp_path))
    assert callback.needs_snapshots is snapshots  # without: stop and an exhausted raise_kl stop where they are
    rollback = [TripwireSpec(detector="non_finite", action="warn"), TripwireSpec(detector="kl_limit", action="rollback", params={"limit": 1.0})]
    if snapshots:
        assert TripwireCallback(_sharded_trainer(**flags), rollback, TripwireActions(), str(tmp_path)).needs_snapshots
    else:
        with pytest.raises(ValueError, match=r"^tripwires\[1\]\.action='rollback' \(kl_limit\): a rollback restores .*"
                                             r"use action 'raise_kl' or 'stop'"):
            TripwireCallback(_sharded_trainer(**flags), rollback, TripwireActions(), str(tmp_path))


def test_an_exhausted_raise_kl_without_snapshots_stops_and_says_so(tmp_path):
    # DeepSpeed: beta 0.1 already at tripwire_max_beta 0.1, so the KL trip (5.0 > limit 1.0) escalates past raise_kl;
    # with no snapshot to roll back to, the stage stops where it is, the ladder counts no rollback and the event says
    # why (before: it read as a rollback that never happened)
    from types import SimpleNamespace

    from trl_safeppo.rails.tripwires import TripwireSpec
    from trl_safeppo.trainers.tripwires import TripwireActions, TripwireCallback

    trainer = _sharded_trainer(deepspeed=True)
    trainer.accelerator.is_main_process = True
    spec = TripwireSpec(detector="kl_limit", action="raise_kl", params={"limit": 1.0})
    callback = TripwireCallback(trainer, [spec], TripwireActions(max_beta=0.1), str(tmp_path))
    state, control = SimpleNamespace(global_step=1, log_history=[]), SimpleNamespace(should_training_stop=False)
    callback.on_log(None, state, control, logs={"loss": 0.1, "kl": 5.0})
    assert control.should_training_stop and callback.ladder["rollbacks"] == 0
    event = json.loads((tmp_path / "tripwires.jsonl").read_text().splitlines()[-1])
    assert event["action"] == "raise_kl" and event["details"]["stopped"] and event["details"]["restored_step"] is None
    assert event["details"]["escalated_from"] == "raise_kl" and "no snapshot to roll back to" in event["details"]["escalation"]
