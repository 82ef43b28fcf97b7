"""The one atomic-write helper: a failed write leaves the destination as it was and no temporary behind."""

import doctest
import os

import pytest

from trl_safeppo import fileio


def test_doctests():
    assert doctest.testmod(fileio).failed == 0


def test_failed_write_keeps_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    fileio.write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write('{"step": 2, "half')  # a writer that dies halfway
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "final"
    with fileio.atomic_dir(out) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("1")
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(out) as tmp:
            (open(os.path.join(tmp, "b"), "w")).write("2")
            raise KeyboardInterrupt
    assert os.listdir(out) == ["a"]  # the old folder, untouched
    with fileio.atomic_dir(out) as tmp:
        (open(os.path.join(tmp, "c"), "w")).write("3")
    assert os.listdir(out) == ["c"]  # replaced whole: "a" is gone
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_remove_temporaries_finds_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".tmp-x-manifest.json").write_text("{")
    (tmp_path / ".tmp-old-y").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    assert fileio.remove_temporaries(tmp_path) == [".tmp-old-y", ".tmp-x-manifest.json"]
    assert os.listdir(tmp_path) == ["manifest.json"]
