"""``manifest.json``: what happened to each stage of a run, and what lets a rerun resume.

Per stage: ``index`` (1-based, as in ``stages/NN-name``), ``name``, ``type``, ``dir``, ``status``
(``pending | running | completed | failed | stopped | gated | carried``; ``carried``: a gate failed with
``on_fail: carry_previous`` and ``handoff`` names the model handed on instead), ``config`` (the stage as resolved),
``fingerprint``
(hash of everything that determines the stage's result, chained with the previous stage's fingerprint), ``inputs``
and ``outputs`` with content hashes, ``versions`` of the libraries, ``timings`` (``started_at``, ``finished_at``,
``duration_s``, ``attempts``, ``resumed_from``), ``metrics`` (last logged value of each metric), ``eval``,
``gates`` and ``error``. At the top level, ``final`` records the run's final model (the recipe's ``final``).

A rerun of the same recipe skips stages whose status is ``completed`` and whose fingerprint is unchanged, and
resumes a ``running`` / ``failed`` stage with the same fingerprint from its last ``checkpoint-*``. The file is
written atomically after every change of status, so a killed run leaves a readable manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from ..fileio import write_json

STATUSES = ("pending", "running", "completed", "failed", "stopped", "gated", "carried")
FINISHED = ("completed", "stopped")  # a later rerun skips these (stopped = ended early by a plateau: a success)
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "trl_safeppo")
_SKIP_DIRS = ("checkpoint-", "final.partial")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        dist = "trl-safeppo" if name == "trl_safeppo" else name
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def hash_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_path(path: str | os.PathLike) -> str | None:
    """sha256 over a file, or over a directory's files (relative names + contents, sorted; checkpoints skipped).

    ``None`` for something that is not on disk (a Hub id)."""
    root = Path(path)
    if not root.exists():
        return None
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(root).as_posix() if root.is_dir() else file.name
        if any(part.startswith(_SKIP_DIRS) for part in Path(rel).parts):
            continue
        digest.update(rel.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _derived(name: str) -> bool:
    # files that readers add beside an output without changing it: datasets' cache files, atomic-write temporaries
    return (name.startswith("cache-") and name.endswith(".arrow")) or name.startswith(".tmp-")


def hash_tree(path: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """``(hash_path(path), {relative file name: sha256[:16]})`` in one read of every file; ``(None, {})`` when the
    path is not on disk. The per-file hashes let a later stage name the file that changed (``verify_files``)."""
    root = Path(path)
    if not root.exists():
        return None, {}
    total, files = hashlib.sha256(), {}
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in paths:
        rel = file.relative_to(root).as_posix() if root.is_dir() else file.name
        if any(part.startswith(_SKIP_DIRS) for part in Path(rel).parts) or _derived(file.name):
            continue
        one = hashlib.sha256()
        total.update(rel.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                total.update(chunk)
                one.update(chunk)
        files[rel] = one.hexdigest()[:16]
    return total.hexdigest()[:16], files


def output_record(path: str | os.PathLike) -> dict[str, Any]:
    """What the manifest records of a stage output: ``path``, ``hash`` (as :func:`hash_path`) and per-file ``files``."""
    digest, files = hash_tree(path)
    return {"path": str(path), "hash": digest, "files": files}


def verify_output(record: dict[str, Any]) -> str | None:
    """None when the output on disk still matches its manifest record; else what changed, naming the files.
    A record without ``files`` (an older manifest) is checked by its overall hash; a Hub id (no hash) passes."""
    if not record or record.get("hash") is None:
        return None
    path = Path(record["path"])
    if not path.exists():
        return f"{path} is missing"
    digest, files = hash_tree(path)
    if digest == record["hash"]:
        return None
    recorded = record.get("files")
    if not recorded:  # a manifest written before per-file hashes: its hash counted every file
        if hash_path(path) == record["hash"]:
            return None
        return f"the files in {path} changed (hash {digest}, recorded {record['hash']})"
    changed = sorted(k for k in recorded if k in files and files[k] != recorded[k])
    missing = sorted(k for k in recorded if k not in files)
    added = sorted(k for k in files if k not in recorded)
    parts = [f"{path / k} changed (sha256 {files[k]}..., recorded {recorded[k]}...)" for k in changed]
    parts += [f"{path / k} is missing" for k in missing] + [f"{path / k} was added" for k in added]
    return "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Manifest:
    """The run's manifest.json, kept in memory and written atomically by :meth:`save` (main process only)."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load(cls, run_dir: Path) -> Manifest | None:
        path = Path(run_dir) / "manifest.json"
        if not path.exists():
            return None
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: the manifest is unreadable ({err}); move it away to start the run afresh")

    @classmethod
    def create(cls, run_dir: Path, recipe_name: str, stages: list[dict[str, Any]]) -> Manifest:
        data = {
            "name": recipe_name,
            "created_at": now(),
            "updated_at": now(),
            "status": "pending",
            "versions": library_versions(),
            "stages": stages,
        }
        return cls(Path(run_dir) / "manifest.json", data)

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.data["stages"]

    def stage(self, index: int) -> dict[str, Any]:
        return self.stages[index]

    def save(self) -> None:
        self.data["updated_at"] = now()
        write_json(self.path, self.data)


def new_stage_entry(index: int, name: str, stype: str, directory: str, config: dict, fingerprint: str) -> dict:
    return {
        "index": index,
        "name": name,
        "type": stype,
        "dir": directory,
        "status": "pending",
        "fingerprint": fingerprint,
        "config": config,
        "inputs": {},
        "outputs": {},
        "versions": {},
        "timings": {"started_at": None, "finished_at": None, "duration_s": None, "attempts": 0, "resumed_from": None},
        "metrics": {},
        "eval": None,
        "gates": [],
        "error": None,
    }


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The last logged value of every metric (the end-of-training summary included)."""
    out: dict[str, Any] = {}
    for entry in log_history:
        out.update({k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out
