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


def test_output_record_hashes_each_file_and_verify_names_what_changed(tmp_path):
    from trl_safeppo.pipeline.manifest import output_record, verify_output

    out = tmp_path / "final"
    out.mkdir()
    (out / "a.txt").write_bytes(b"xy")
    (out / "w.bin").write_bytes(b"z")
    record = output_record(out)
    # the overall hash is hash_path's (names + contents); each file also gets its own sha256
    assert record == {"path": str(out), "hash": hash_path(out),
                      "files": {"a.txt": hashlib.sha256(b"xy").hexdigest()[:16],
                                "w.bin": hashlib.sha256(b"z").hexdigest()[:16]}}
    assert verify_output(record) is None
    (out / "cache-123.arrow").write_bytes(b"datasets cache")  # what a reader may add: not part of the output
    assert verify_output(record) is None
    (out / "w.bin").write_bytes(b"Z")
    assert verify_output(record) == (f"{out / 'w.bin'} changed (sha256 {hashlib.sha256(b'Z').hexdigest()[:16]}..., "
                                     f"recorded {hashlib.sha256(b'z').hexdigest()[:16]}...)")
    (out / "a.txt").unlink()
    assert verify_output(record).endswith(f"; {out / 'a.txt'} is missing")
    old_style = {"path": str(out), "hash": hash_path(out)}  # a manifest from before per-file hashes
    assert verify_output(old_style) is None
    assert verify_output({"path": "org/model", "hash": None}) is None  # a Hub id has nothing to verify
