"""manifest.json helpers: content hashes, last metrics, atomic save."""

from __future__ import annotations

import hashlib
import json

from trl_safeppo.pipeline.manifest import Manifest, final_metrics, hash_json, hash_path, new_stage_entry


def test_hash_path_of_a_directory_is_names_and_contents_and_skips_checkpoints(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"xy")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"z")
    # by hand: sha256 over "a.txt\0" + b"xy" + "sub/b.bin\0" + b"z", in sorted path order
    expected = hashlib.sha256(b"a.txt\0xy" + b"sub/b.bin\0z").hexdigest()[:16]
    assert hash_path(tmp_path) == expected
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "optimizer.pt").write_bytes(b"ignored")
    assert hash_path(tmp_path) == expected  # checkpoints are not part of the output
    (tmp_path / "a.txt").write_bytes(b"xz")
    assert hash_path(tmp_path) != expected
    assert hash_path(tmp_path / "missing") is None  # e.g. a Hub id


def test_hash_json_ignores_key_order():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})


def test_final_metrics_keeps_the_last_numeric_value_of_each_key():
    history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "reward": 0.25, "step": 2}, {"train_runtime": 3.0, "note": "x"}]
    assert final_metrics(history) == {"loss": 1.5, "reward": 0.25, "step": 2, "train_runtime": 3.0}


def test_manifest_round_trip(tmp_path):
    entry = new_stage_entry(1, "sft", "sft", "stages/01-sft", {"args": {}}, "abc")
    m = Manifest.create(tmp_path, "demo", [entry])
    m.save()
    loaded = Manifest.load(tmp_path)
    assert loaded.stages == [entry] and loaded.data["name"] == "demo"
    assert set(loaded.data["versions"]) >= {"python", "torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, then renamed
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"][0]["status"] == "pending"
