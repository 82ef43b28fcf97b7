"""This package's state in a checkpoint: one file, and the four files of older checkpoints read into the same keys."""

from __future__ import annotations

import json

import pytest
import torch

from trl_safeppo.trainers.rails_mixin import (
    STATE_MARKER, STATE_VERSION, SafeCheckpointMixin, TrainerRails, last_marked_checkpoint, read_checkpoint_state,
)


def test_the_state_file_is_read_as_written(tmp_path):
    state = {"version": STATE_VERSION, "global_step": 3, "complete": True, "beta": 0.2, "rails": None,
             "tripwires": {"ladder": {"rollbacks": 1}, "initial_beta": 0.1, "n_clean": 2}}
    (tmp_path / STATE_MARKER).write_text(json.dumps(state))
    assert read_checkpoint_state(str(tmp_path)) == state


def test_a_checkpoint_of_an_older_version_is_read_from_its_four_files(tmp_path):
    # before version 3 the marker held only {"global_step", "complete"}; the rails + KL controller, the tripwire
    # ladder (with beta inside) and DPO's beta had files of their own
    (tmp_path / STATE_MARKER).write_text('{"global_step": 3, "complete": true}')
    rails = {"version": 2, "rails": None, "kl": {"type": "fixed", "value": 0.05, "n_updates": 3}}
    torch.save(rails, tmp_path / "safe_rails_state.pt")
    ladder = {"ladder": {"rollbacks": 1}, "beta": 0.2, "initial_beta": 0.1, "n_clean": 4}
    (tmp_path / "tripwire_state.json").write_text(json.dumps(ladder))
    assert read_checkpoint_state(str(tmp_path)) == {"rails": rails, "tripwires": ladder, "beta": 0.2}
    # DPO wrote beta apart too; both are the trainer's beta at the save, DPO's file wins
    (tmp_path / "safe_dpo_state.json").write_text('{"beta": 0.4}')
    assert read_checkpoint_state(str(tmp_path))["beta"] == 0.4


def test_no_state_at_all_is_an_empty_state(tmp_path):
    # a folder with none of the files (a plain transformers checkpoint): nothing to restore, every key None
    assert read_checkpoint_state(str(tmp_path)) == {"rails": None, "tripwires": None, "beta": None}


@pytest.mark.parametrize("text,why", [('{"version": 3, "be', "JSONDecodeError"), ("[1, 2]", "TypeError: a list")])
def test_a_damaged_state_file_names_itself_and_the_fix(tmp_path, text, why):
    (tmp_path / STATE_MARKER).write_text(text)
    with pytest.raises(ValueError, match=rf"{STATE_MARKER} is unreadable \({why}.*resume from an earlier one"):
        read_checkpoint_state(str(tmp_path))


@pytest.mark.parametrize("version", [STATE_VERSION + 1, 0, -1, "3", 3.0, True])
def test_a_state_file_of_a_newer_or_unknown_version_is_refused(tmp_path, version):
    # a newer trl_safeppo's file may hold keys this one would silently drop, and a version below 1 would be read as an
    # older layout (its state dropped): refused, naming the file and the fix
    (tmp_path / STATE_MARKER).write_text(json.dumps({"version": version, "global_step": 1, "complete": True}))
    with pytest.raises(ValueError, match=rf"{STATE_MARKER} has version {version!r}; this trl_safeppo reads versions "
                                         rf"1-{STATE_VERSION}: resume it with the trl_safeppo that wrote it"):
        read_checkpoint_state(str(tmp_path))


class _Transformers:
    """Stands in for transformers' Trainer.train: records the checkpoint it is asked to resume."""

    def train(self, resume_from_checkpoint=None):
        self.resumed = resume_from_checkpoint


class _Trainer(SafeCheckpointMixin, _Transformers):
    """What load_checkpoint_state needs of a trainer: beta and a started TrainerRails (no rails, no KL controller)."""

    def __init__(self, beta, output_dir=""):
        self.beta = beta
        self.args = type("Args", (), {"output_dir": str(output_dir)})()
        self.rails_wiring = TrainerRails()
        self.rails_wiring.start(self)


def _checkpoint(folder, step, marked, beta=0.1):
    (folder / f"checkpoint-{step}").mkdir()
    if marked:
        _save_beta(folder / f"checkpoint-{step}", beta)


def test_resume_true_takes_the_newest_checkpoint_with_the_state_file(tmp_path, caplog):
    # checkpoint-10 was cut short by a kill before its marker; transformers' get_last_checkpoint would take it (the
    # largest N) and the rails would start afresh. checkpoint-9 (newest marked) is taken; 2 < 9 < 10 numerically
    for step, marked in ((2, True), (9, True), (10, False)):
        _checkpoint(tmp_path, step, marked, beta=0.01 * step)
    (tmp_path / "checkpoint-11.tmp").mkdir()  # not a checkpoint name
    assert last_marked_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-9")
    assert "skipping checkpoint-10" in caplog.text
    trainer = _Trainer(beta=0.5, output_dir=tmp_path)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.resumed == str(tmp_path / "checkpoint-9") and trainer.beta == pytest.approx(0.09)  # its state


def test_resume_true_without_a_marked_checkpoint(tmp_path):
    # no checkpoint at all: True goes on to transformers, which raises its own "no valid checkpoint" error
    trainer = _Trainer(beta=0.5, output_dir=tmp_path)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.resumed is True and trainer.beta == 0.5
    assert last_marked_checkpoint(str(tmp_path / "absent")) is None
    # checkpoints, none complete: one error naming them and both ways on
    _checkpoint(tmp_path, 3, marked=False)
    with pytest.raises(ValueError, match=r"no checkpoint of .* is complete \(checkpoint-3 lack trl_safeppo_state\.json"
                                         r": killed while saving\); pass resume_from_checkpoint=<folder>"):
        trainer.train(resume_from_checkpoint=True)


def _save_beta(folder, beta):
    (folder / STATE_MARKER).write_text(json.dumps({"version": STATE_VERSION, "beta": beta, "rails": None}))


def test_without_a_kl_controller_the_checkpoints_beta_wins(tmp_path):
    # a tripwire raised beta 0.1 -> 0.2 before the save; the resumed run starts at 0.2, not at args.beta (0.1)
    _save_beta(tmp_path, 0.2)
    trainer = _Trainer(beta=0.1)
    trainer.load_checkpoint_state(str(tmp_path))
    assert trainer.beta == 0.2


def test_a_kl_penalty_is_not_resumed_into_a_run_without_a_reference_model(tmp_path):
    # beta 0 at construction means GRPO loaded no reference model; turning beta to 0.2 on resume would fail at the
    # first KL computation, so it is refused before training, naming the checkpoint, the value and the fix
    trainer = _Trainer(beta=0.0)
    (tmp_path / STATE_MARKER).write_text(json.dumps({"version": STATE_VERSION, "beta": 0.2, "tripwires": None,
                                                     "rails": TrainerRails().state_dict() | {"version": 99}}))
    with pytest.raises(ValueError, match=r"was saved with beta=0\.2, but this run started with beta=0 and so loaded "
                                         r"no reference model: set beta=0\.2 \(or > 0\) to resume it"):
        trainer.load_checkpoint_state(str(tmp_path))  # refused before the rails state (version 99) is read
    assert trainer.beta == 0.0
    trainer.ref_model = object()  # a trainer with a reference model at beta 0 (DPO loads one whatever beta is)
    _save_beta(tmp_path, 0.2)
    trainer.load_checkpoint_state(str(tmp_path))
    assert trainer.beta == 0.2
    trainer.ref_model, trainer.beta = None, 0.0
    _save_beta(tmp_path, 0.0)  # a checkpoint of a beta-0 run resumes into one
    trainer.load_checkpoint_state(str(tmp_path))
    assert trainer.beta == 0.0


def test_a_legacy_rails_file_is_not_unpickled(tmp_path):
    # safe_rails_state.pt of an older checkpoint holds plain dicts and numbers; anything pickled beyond that (an
    # object whose unpickling would run code) is refused, not executed
    torch.save({"version": 2, "rails": None, "kl": _Evil()}, tmp_path / "safe_rails_state.pt")
    with pytest.raises(ValueError, match=r"safe_rails_state\.pt is unreadable \(UnpicklingError"):
        read_checkpoint_state(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_save_total_limit_1_is_refused_because_transformers_rotates_before_on_save(tmp_path):
    # Why: transformers' _save_checkpoint deletes the checkpoints over save_total_limit before the on_save callbacks,
    # which is where the state file (the completeness marker) is written. Shown on a plain Trainer: at on_save of
    # checkpoint-2 with save_total_limit=1, checkpoint-1 (complete) is already gone.
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trl_safeppo.trainers.grpo_config import SafeGRPOConfig

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(1, 1)

        def forward(self, x, y):
            return {"loss": ((self.w(x) - y) ** 2).mean()}

    seen = {}

    class AtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen[state.global_step] = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))

    data = [{"x": torch.tensor([1.0]), "y": torch.tensor([2.0])}] * 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, save_total_limit=1,
                             per_device_train_batch_size=1, report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=Linear(), args=args, train_dataset=data, callbacks=[AtSave()]).train()
    assert seen == {1: ["checkpoint-1"], 2: ["checkpoint-2"]}

    with pytest.raises(ValueError, match=r"save_total_limit=1: transformers deletes the previous checkpoint before "
                                         r"trl_safeppo_state\.json marks the new one complete.*use save_total_limit=2"):
        SafeGRPOConfig(output_dir=str(tmp_path), save_total_limit=1, report_to="none", use_cpu=True)
    assert SafeGRPOConfig(output_dir=str(tmp_path), save_total_limit=2, report_to="none",
                          use_cpu=True).save_total_limit == 2
