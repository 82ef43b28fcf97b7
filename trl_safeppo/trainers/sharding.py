"""SafePPOTrainer's critic under FSDP2 (docs/ppo.md, "Scaling"): what can be sharded (:func:`check_critic_sharding`),
the critic sharded as the policy is, by accelerate's own ``fsdp2_prepare_model`` (:func:`prepare_critic`; its
optimizer is built afterwards, over the DTensor parameters), and the state of a possibly sharded module as ordinary
full tensors (:func:`full_model_state`, :func:`full_optimizer_state`, :func:`load_full_state`; collectives when
sharded, which tripwire snapshots use too). Pure functions of the accelerator and modules passed in; ZeRO: zero.py.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch


def check_critic_sharding(accelerator, value_model: Any, save_on_each_node: bool = False) -> None:
    """Refuse, with the fix, what SafePPOTrainer cannot shard. Call after the Accelerator exists."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    zero3 = False
    if kind == DistributedType.DEEPSPEED:
        from .zero import check

        zero3 = check(accelerator) == 3  # ZeRO-2/3: the critic's own engine (zero.py)
    if kind == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "SafePPOTrainer under FSDP1 (fsdp_version: 1): the critic is sharded with FSDP2 only; set "
            "fsdp_version: 2 in the accelerate config (recipes/accelerate/fsdp2.yaml)"
        )
    sharded = kind == DistributedType.FSDP or zero3
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or getattr(accelerator, "num_processes", 1)
    if sharded and save_on_each_node and getattr(accelerator, "num_processes", 1) > per_node:
        raise ValueError(
            "save_on_each_node=True on several nodes: the sharded critic is gathered to the main process only, so the "
            "other nodes' checkpoints would hold an empty critic/; set save_on_each_node=False and give output_dir on "
            "a filesystem every node sees")
    if sharded and value_model is not None:
        devices = {p.device.type for p in value_model.parameters()}
        if devices - {"cpu", "meta"}:
            raise ValueError(
                f"value_model: under {'ZeRO-3' if zero3 else 'FSDP2'} the critic is sharded as it is prepared, but the "
                f"value_model object is already on {sorted(devices - {'cpu', 'meta'})} (a full copy per process, on one "
                "device); pass it on the CPU (value_model=model.to('cpu')) or give its path as "
                "SafePPOConfig.critic_model_path"
            )


def prepare_critic(accelerator, value_module: torch.nn.Module) -> torch.nn.Module:
    """The critic prepared like the policy: FSDP2-sharded by accelerate's own `fsdp2_prepare_model` under FSDP2
    (its transformer blocks are found through the wrapped model's `_no_split_modules`), else `prepare_model` (DDP
    wrapping, device placement). Build the critic's optimizer after this call, over the returned module's
    parameters."""
    if not getattr(accelerator, "is_fsdp2", False):
        return accelerator.prepare_model(value_module)
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    inner = getattr(value_module, "model", value_module)
    if getattr(value_module, "_no_split_modules", None) is None:
        value_module._no_split_modules = getattr(inner, "_no_split_modules", None)
    return fsdp2_prepare_model(accelerator, value_module)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as full CPU tensors. Sharded, this is a collective (call it on every rank) and only
    process 0 receives the tensors (the others get an empty dict): process 0 writes checkpoints."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with full CPU tensors, keyed by parameter name (sharded: a collective, and only
    process 0 receives the tensors); unsharded it is `optimizer.state_dict()` itself, so checkpoints written without
    sharding keep their format."""
    if not is_sharded(module):
        return optimizer.state_dict()
    if not optimizer.state:  # no step yet: None (torch's getter would create the state by a zero step, counting it)
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    module: torch.nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full tensors (from `full_model_state` / `full_optimizer_state`, read back from a checkpoint) into a
    sharded or plain module and its optimizer; every rank passes the same full state. An `optimizer_state` of None
    (taken before the first step) empties the optimizer's state."""
    if optimizer is not None and optimizer_state is None:
        optimizer.state.clear()
    if not is_sharded(module):
        if model_state is not None:
            module.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    # torch replaces the dicts' tensors with the sharded ones in place: hand it copies, the caller's stay full
    if model_state is not None:
        set_model_state_dict(module, dict(model_state), options=options)
    if optimizer is not None and optimizer_state is not None:
        # torch maps the saved groups onto the live ones key by key: a key the live groups lack yet (`initial_lr`,
        # which a learning-rate scheduler adds once it is built, after a resume loads this state) is taken over
        for live, saved in zip(optimizer.param_groups, optimizer_state.get("param_groups", [])):
            for key, value in saved.items():
                if key != "params":
                    live.setdefault(key, value)
        set_optimizer_state_dict(module, optimizer, copy.deepcopy(optimizer_state), options=options)
