"""Test-wide settings: offline, no telemetry, a private tiny-model cache, and a guard that fails any test whose
code path tries to open a network connection (loopback stays allowed for torch.distributed / gloo)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

# Set before transformers / huggingface_hub / datasets are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DISABLE_TELEMETRY"] = "1"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["WANDB_DISABLED"] = "true"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_SAFEPPO_CACHE", os.path.join(tempfile.gettempdir(), "trl_safeppo_test_cache"))

import pytest  # noqa: E402

_LOOPBACK_PREFIXES = ("127.", "::1", "localhost", "0.0.0.0")


class NetworkAccessError(RuntimeError):
    """Raised when code under test tries to reach the network."""


# Every blocked attempt, in order, even when the code under test catches the error (tests/test_offline.py reads it).
BLOCKED_ATTEMPTS: list[str] = []


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_create_connection = socket.create_connection


def _host_of(address) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address)  # AF_UNIX path


def _is_allowed(address) -> bool:
    host = _host_of(address)
    return not isinstance(address, tuple) or host.startswith(_LOOPBACK_PREFIXES)


def _block(address):
    BLOCKED_ATTEMPTS.append(repr(address))
    raise NetworkAccessError(f"test tried to open a network connection to {address!r}")


def _guarded_connect(self, address):
    if not _is_allowed(address):
        _block(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_allowed(address):
        _block(address)
    return _real_connect_ex(self, address)


def _guarded_create_connection(address, *args, **kwargs):
    if not _is_allowed(address):
        _block(address)
    return _real_create_connection(address, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Every test runs with outbound connections blocked; see tests/test_offline.py."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.create_connection = _guarded_create_connection
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex
    socket.create_connection = _real_create_connection


@pytest.fixture(scope="session")
def tiny_debug_path() -> str:
    """Local directory of tiny://debug (built once per cache)."""
    from trl_safeppo.models import resolve_model_path

    return resolve_model_path("tiny://debug")


@pytest.fixture(scope="session")
def tiny_arithmetic_path() -> str:
    from trl_safeppo.models import resolve_model_path

    return resolve_model_path("tiny://arithmetic")


@pytest.fixture
def two_process_results(tmp_path):
    """A function that runs a Python script under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)
    with its output directory as the only argument, and returns the JSON files `rank0.json` and `rank1.json` it
    wrote there (one per process). The distributed trainer tests share it."""
    import json
    import subprocess
    import sys

    def run(source: str) -> list[dict]:
        script = tmp_path / "two_processes.py"
        script.write_text(source)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        # the script runs from tmp_path: the repository root on PYTHONPATH lets it import tests.* helpers
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            str(script), str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]

    run.out = tmp_path / "out"
    return run
