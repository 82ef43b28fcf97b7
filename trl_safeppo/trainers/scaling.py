"""SafePPOTrainer's critic step under mixed precision and sharding, and the fp16 check (docs/ppo.md, "Mixed
precision"). PPO backpropagates one loss through two models, so both gradients carry the one fp16 loss scale S; each
is divided by S once and the scale updated once per optimizer step:

    critic (inside training_step):  scaler.unscale_(critic_opt); clip; scaler.step(critic_opt)      (no update)
    policy (the Trainer, after it): unscale_(policy_opt); clip; scaler.step(policy_opt); scaler.update()

Hence the critic's optimizer is not registered with accelerate, whose ``clip_grad_norm_`` unscales every registered
optimizer and whose wrapped ``step`` updates the scale after each one (issue 20: the policy's gradient was unscaled
twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to total 2-norm `max_norm` (`math.inf`: measure only); returns the norm before clipping.

    Works on plain tensors and on DTensor gradients (FSDP2), gathering the norm of sharded gradients over their mesh
    (one mesh at a time, as transformers' Trainer does for mixed meshes)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        DTensor = ()  # noqa: N806
    groups: dict[object, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if math.isfinite(max_norm):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def critic_optimizer_step(accelerator, parameters: list, optimizer: torch.optim.Optimizer, max_grad_norm: float):
    """One optimizer step of the critic; returns `(grad_norm, stepped)`.

    `optimizer` is a plain torch optimizer (not registered with accelerate, see the module docstring). Under fp16
    the gradient is unscaled here, for this optimizer only, and `scaler.step` skips the step when it holds an inf or
    NaN; `scaler.update()` is left to the policy's step, which follows in the same Trainer step.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    norm = grad_norm_(parameters, clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped iff the unscaled gradient holds an inf / NaN, i.e. iff the norm is not finite
        stepped = bool(torch.isfinite(norm))
    else:
        optimizer.step()
        stepped = True
    return norm, stepped


def check_fp16_master_weights(fp16: bool, models: dict[str, torch.nn.Module]) -> None:
    """fp16 mixed precision keeps float32 master weights: a GradScaler cannot unscale float16 gradients (torch raises
    "Attempting to unscale FP16 gradients" at the first step). Refuse a trained float16 model at construction.

    `models` maps the field that chose each model (e.g. "model", "critic_model_path") to the model."""
    if not fp16:
        return
    for field, model in models.items():
        half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"{field}: fp16=True trains with a GradScaler, which needs float32 master weights, but this model's "
                f"trainable weights are float16 ({half[0]}, ...); load it in float32 (model_init_kwargs="
                "{'dtype': 'float32'}, or .float() on a model object), or train in bf16 (bf16=True)"
            )
