"""Test harness, never part of the package: accelerate's FSDP2 path on CPU processes (gloo).

Launched as `accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 SCRIPT` (see `launch`),
the processes get the environment accelerate's launcher derives from the shipped config (ACCELERATE_USE_FSDP=true,
FSDP_VERSION=2, FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP, FSDP_RESHARD_AFTER_FORWARD, FSDP_STATE_DICT_TYPE,
FSDP_CPU_RAM_EFFICIENT_LOADING, ...). On a machine without a GPU accelerate then picks the MULTI_CPU distributed type
(`PartialState._prepare_backend`), and `AcceleratorState.__init__` only takes its FSDP branch for the GPU-like
distributed types (accelerate 1.15, state.py: `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`), so
the FSDP environment is silently ignored and the run is plain DDP.

`enable()` patches exactly that choice and nothing else: after `AcceleratorState.__init__` has run, a MULTI_CPU state
with FSDP asked for (the environment or an `fsdp_plugin`) gets what the branch would have set, `distributed_type =
FSDP` and the plugin (`fsdp_plugin.set_mixed_precision` included). Everything after it is accelerate's, transformers'
and TRL's own code: the plugin built from the environment, `Accelerator.prepare` -> `fsdp2_prepare_model`
(`fully_shard` per transformer block and the root, rank 0's weights broadcast for cpu_ram_efficient_loading),
the FSDP2 gradient clipping, `save_fsdp_model` / `save_fsdp_optimizer` in checkpoints, `get_state_dict` on
save_model, and TRL's `prepare_fsdp` of the reference model. The scripts call `enable()` before any Trainer exists.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FSDP2_CONFIG = REPO / "recipes" / "accelerate" / "fsdp2.yaml"


def enable() -> None:
    """Let accelerate's state take its FSDP branch on CPU processes (see the module docstring). Idempotent."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin is not None
        if self.distributed_type == DistributedType.MULTI_CPU and wants_fsdp:
            # what state.py's FSDP branch sets for MULTI_GPU
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no" and fsdp_plugin is not None:
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script_args: list[str], *, num_processes: int = 2, timeout: int = 900, config: Path = FSDP2_CONFIG,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> --num_processes N` (the shipped fsdp2.yaml by default) on CPU
    processes, `--mixed_precision no` (bf16 autocast is a GPU setting here). The script must call `enable()` first;
    ACCELERATE_USE_CPU makes accelerate's processes one gloo group, as trl_safeppo's runner does without a GPU."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--num_processes", str(num_processes), "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port()), *map(str, script_args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
