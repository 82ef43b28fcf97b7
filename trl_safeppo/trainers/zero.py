"""SafePPOTrainer's critic under DeepSpeed ZeRO-2/3 (docs/ppo.md, "Scaling"): an engine of its own from
``deepspeed.initialize``, with the policy's config around the critic's own optimizer; the one PPO backward, run by the
Trainer through the policy's engine, reduces the critic's gradients through DeepSpeed's hooks on this engine, and the
trainer steps it at each optimizer step. Checkpoints: ``critic/`` an ordinary transformers checkpoint, and the engine's
own (``critic_zero/``: every rank's partitions), which restores weights, fp32 masters and Adam states exactly.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..fileio import atomic_dir

CHECKPOINT_TAG = "state"


def stage(accelerator) -> int:
    """The ZeRO stage of the accelerator's DeepSpeed config (filled by the Trainer's `__init__`)."""
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def check(accelerator) -> int:
    """Refuse, with the fix, the DeepSpeed settings the critic's engine does not support; returns the ZeRO stage.
    Call after the Trainer's `__init__` (the plugin's `auto` values are filled by then)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = config.get("zero_optimization", {})
    zero_stage = stage(accelerator)
    if zero_stage not in (2, 3):
        raise ValueError(
            f"zero_stage={zero_stage}: SafePPOTrainer runs under DeepSpeed ZeRO-2 and ZeRO-3 only (its critic's engine "
            "needs ZeRO's backward hooks); set zero_stage: 2 (recipes/accelerate/deepspeed_zero2.yaml) or 3, or use DDP"
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"{key}_device={device!r}: SafePPOTrainer's critic engine has not been run with ZeRO offload; set "
                f"{key}_device: none in the accelerate config, or use FSDP2 (recipes/accelerate/fsdp2.yaml)"
            )
    if str((config.get("fp16") or {}).get("enabled", False)).lower() == "true":
        raise ValueError(
            "fp16=True under DeepSpeed: PPO's one backward runs through the policy's engine, which scales the loss by "
            "its own fp16 loss scale, so the critic's engine would unscale its gradients by the wrong scale; train in "
            "bf16 (bf16=True, mixed_precision: bf16), or fp16 under DDP or FSDP2"
        )
    return zero_stage


def critic_engine(accelerator, value_module: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The critic's DeepSpeed engine around `optimizer` (built over `value_module`'s parameters), configured as the
    policy's engine; its learning-rate schedule stays with the trainer (`create_scheduler`)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)  # the critic's own optimizer is passed in
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:  # bucket sizes the Trainer fills at train time
        del zero[key]
    if zero.get("stage") == 3:  # critic/ is always written whole (critic_state_dict)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    engine, *_ = deepspeed.initialize(model=value_module, optimizer=optimizer, config=config)
    return engine


def save_engine(accelerator, engine, path: str) -> None:
    """DeepSpeed's own checkpoint of `engine` in folder `path`, written atomically: every rank writes its partitions
    into process 0's temporary folder, which is renamed into place only after all of them finished (a collective)."""
    import torch.distributed as dist

    with atomic_dir(path) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        engine.save_checkpoint(box[0], tag=CHECKPOINT_TAG, save_latest=False)
        accelerator.wait_for_everyone()


def load_engine(engine, path: str) -> None:
    """Restore `engine` (weights, fp32 masters, optimizer partitions) from `save_engine`'s folder."""
    loaded, _ = engine.load_checkpoint(path, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise ValueError(f"{path!r} holds no DeepSpeed checkpoint of the critic (tag {CHECKPOINT_TAG!r})")
