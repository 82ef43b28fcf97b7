"""This package's state in a checkpoint: one file, and the four files of older checkpoints read into the same keys."""

from __future__ import annotations

import json

import pytest
import torch

from trl_safeppo.trainers.rails_mixin import STATE_MARKER, STATE_VERSION, read_checkpoint_state


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


def test_a_legacy_rails_file_is_not_unpickled(tmp_path):
    # safe_rails_state.pt of an older checkpoint holds plain dicts and numbers; anything pickled beyond that (an
    # object whose unpickling would run code) is refused, not executed
    torch.save({"version": 2, "rails": None, "kl": _Evil()}, tmp_path / "safe_rails_state.pt")
    with pytest.raises(ValueError, match=r"safe_rails_state\.pt is unreadable \(UnpicklingError"):
        read_checkpoint_state(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))
