"""PPO's critic: a sequence-classification model read per token (:class:`ValueModel`), where it starts from
(:func:`load_critic`, ``critic_model_path``), and the checks and settings it gets before training
(:func:`prepare_critic`). The critic's optimizer, scheduler and checkpoints live with the trainer."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from ..models import enable_activation_checkpointing, load_value_model, resolve_model_path
from .ppo_config import SafePPOConfig


class ValueModel(nn.Module):
    """Per-token values from a sequence-classification model: its trunk, then its scalar head on every position
    (`forward(input_ids, attention_mask) -> (B, L)` float; TRL's former PPOTrainer `get_reward`). One module, so that
    accelerate prepares (DDP-wraps) the critic as a whole."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        value_head(model)  # checked here; not registered a second time (one name per parameter, as FSDP2 needs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        trunk = getattr(self.model, self.model.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return value_head(self.model)(hidden).squeeze(-1).float()


def value_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (`score` in decoder models, `classifier` in encoders)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(
        f"critic {type(model).__name__} has no linear `score` / `classifier` head; use a checkpoint that "
        "AutoModelForSequenceClassification loads as a decoder with a `score` head (Llama, Qwen2, Mistral, GPT-2, ...)"
    )


def prepare_critic(critic: PreTrainedModel, args: SafePPOConfig, processing_class: Any, field_name: str) -> ValueModel:
    """Check the critic against the policy's tokenizer, then set it up as the policy is (pad token, dropout off,
    activation checkpointing); returns the per-token :class:`ValueModel` around it."""
    check_critic(critic, processing_class, field_name)
    critic.config.pad_token_id = getattr(processing_class, "tokenizer", processing_class).pad_token_id
    if args.disable_dropout:
        from trl.trainer.utils import disable_dropout_in_model

        disable_dropout_in_model(critic)
    checkpointing = args.critic_gradient_checkpointing
    if args.gradient_checkpointing if checkpointing is None else checkpointing:
        enable_activation_checkpointing(critic, args.gradient_checkpointing_kwargs or {"use_reentrant": False})
    return ValueModel(critic)


def load_critic(args: SafePPOConfig, model: Any, reward_funcs: list) -> PreTrainedModel:
    """The critic's starting point, per `args.critic_model_path` (see SafePPOConfig)."""
    spec = args.critic_model_path
    if spec == "reward_model":
        for func in reward_funcs:
            if isinstance(func, str):
                return _from_pretrained(func, args, "critic_model_path='reward_model'")
            if isinstance(func, PreTrainedModel):
                return copy.deepcopy(func)
        raise ValueError(
            "critic_model_path='reward_model' needs a sequence-classification reward model in reward_funcs, but all "
            "of them are callables; set critic_model_path=None (start from the policy) or a critic path"
        )
    if spec is not None:
        try:
            path = resolve_model_path(spec)
        except ValueError as err:
            raise ValueError(f"critic_model_path={spec!r}: {err}") from err
        return _from_pretrained(path, args, f"critic_model_path={spec!r}")
    if isinstance(model, str):
        return _from_pretrained(model, args, "critic_model_path=None (the policy)")
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise ValueError(
            "the policy is a PeftModel object, so the critic cannot be copied from it; pass the base model with "
            "peft_config, or set critic_model_path"
        )
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(config)
    trunk = getattr(critic, critic.base_model_prefix)
    trunk.load_state_dict(getattr(model, model.base_model_prefix).state_dict())
    return critic.to(dtype=model.dtype)


def _from_pretrained(path: str, args: SafePPOConfig, what: str) -> PreTrainedModel:
    kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
    kwargs.pop("device_map", None)  # the critic is placed by accelerate
    try:
        return load_value_model(path, what=what, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{what}: cannot load {path!r} as a critic (AutoModelForSequenceClassification, num_labels=1): {err}. "
            "Pass a sequence-classification or causal-LM checkpoint whose weights match its config, that shares the "
            "policy's tokenizer"
        ) from err


def check_critic(critic: Any, processing_class: Any, field_name: str) -> None:
    if not isinstance(critic, PreTrainedModel):
        raise ValueError(f"{field_name}: the critic must be a transformers PreTrainedModel, got {type(critic).__name__}")
    head = value_head(critic)
    hidden = critic.config.get_text_config().hidden_size
    if head.in_features != hidden or head.out_features != 1:
        raise ValueError(
            f"{field_name}: the critic's value head maps {head.in_features} -> {head.out_features} but its hidden size "
            f"is {hidden} and a value is one number; use a checkpoint whose head is Linear({hidden}, 1)"
        )
    if processing_class is None:
        return
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    vocab = critic.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"{field_name}: the critic's vocabulary has {vocab} embeddings but the policy's tokenizer has "
            f"{len(tokenizer)} tokens; the critic reads the policy's token ids, so it must share its tokenizer"
        )
