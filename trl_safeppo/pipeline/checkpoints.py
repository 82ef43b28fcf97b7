"""Which ``checkpoint-*`` folder a stage resumes from: the newest COMPLETE one.

The trainer writes a checkpoint file by file, so a kill (or a full disk) in the middle leaves a folder that
``transformers.trainer_utils.get_last_checkpoint`` would still pick, and every rerun would die loading it. A
checkpoint is complete when its ``trainer_state.json`` parses (with a ``global_step``) and its weights are there and
whole: a ``*.safetensors`` file whose header parses and whose size matches the header, a sharded index whose shards
exist, a ``*.bin``, or the folders FSDP (``pytorch_model_fsdp*``) and DeepSpeed (``global_step*``) write. Incomplete
ones are moved aside into ``<stage>/incomplete/`` (never deleted: they may be all that is left of a long run).
``trainer_state.json`` is written before the ``on_save`` callback in which the package's trainers add their own
state (PPO's critic; then, after waiting for every process, :data:`STATE_MARKER`, which holds the rails, KL
controller, beta and tripwire ladder), so a checkpoint of a SafePPO / SafeGRPO / SafeDPO stage is complete only with it
(``require=(STATE_MARKER,)``): a kill between the two is an incomplete checkpoint, never a resume with fresh rails.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

# re-exported: the trainers write the marker, own its name and list the checkpoint folders (newest first)
from ..trainers.rails_mixin import STATE_MARKER  # noqa: F401
from ..trainers.rails_mixin import checkpoint_folders as checkpoints

INCOMPLETE_DIR = "incomplete"


def _safetensors_problem(path: Path) -> str | None:
    """None when the file's header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 << 20:
                return f"{path.name} has a header longer than the file"
            header = json.loads(handle.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{path.name} is unreadable ({type(err).__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is {size} bytes, its header says {8 + n + end}"
    return None


def checkpoint_problem(folder: str | os.PathLike, require: tuple[str, ...] = ()) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is; ``require``: files it must also hold."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError, UnicodeDecodeError):
        return "trainer_state.json is unreadable"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json has no global_step"
    names = {p.name for p in folder.iterdir()}
    missing = [name for name in require if name not in names]
    if missing:
        return f"no {missing[0]} (killed while the trainer added its own state)"
    for index in [n for n in names if n.endswith(".index.json")]:
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return f"{index} is unreadable"
        missing = sorted(shards - names)
        if missing:
            return f"{index} names missing shards {missing[:3]}"
    weights = [n for n in names if n.endswith((".safetensors", ".bin")) and n != "training_args.bin"]
    if not weights and not any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names):
        return "no weights"
    for name in weights:
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(folder / name)
            if problem:
                return problem
    return None


def set_aside_incomplete(stage_dir: str | os.PathLike, require: tuple[str, ...] = ()) -> list[str]:
    """Move every incomplete checkpoint of a stage into ``<stage>/incomplete/<name>-<time>``; one line each."""
    notes = []
    for folder in checkpoints(stage_dir):
        problem = checkpoint_problem(folder, require)
        if problem is None:
            continue
        target = Path(stage_dir) / INCOMPLETE_DIR / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        os.replace(folder, target)
        notes.append(f"{folder.name} is incomplete ({problem}): moved to {target.relative_to(Path(stage_dir))}")
    return notes


def last_complete_checkpoint(stage_dir: str | os.PathLike, require: tuple[str, ...] = ()) -> str | None:
    """The newest complete checkpoint of a stage (its path), or None."""
    for folder in checkpoints(stage_dir):
        if checkpoint_problem(folder, require) is None:
            return str(folder)
    return None
