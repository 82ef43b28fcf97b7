"""Configuration of :class:`~trl_safeppo.trainers.ppo_trainer.SafePPOTrainer`: GRPO's config plus the PPO knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from ..rails.kl import KL_ESTIMATORS
from .grpo_config import TRIPWIRE_PARAMS
from .tripwires import (
    TRIPWIRE_HELP, RewardTimeoutFields, TripwireFields, validate_reward_timeout, validate_tripwire_fields,
)

# GRPO loss formulations that are the PPO clipped surrogate with a different token aggregation.
PPO_LOSS_TYPES = ("bnpo", "dapo", "grpo", "dr_grpo")


@dataclass
class SafePPOConfig(TripwireFields, RewardTimeoutFields, GRPOConfig):
    r"""
    Configuration class for [`SafePPOTrainer`]: classic RLHF PPO (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593;
    Ouyang et al. 2022 "InstructGPT", https://arxiv.org/abs/2203.02155) on top of TRL's `GRPOConfig`.

    Every `GRPOConfig` / `TrainingArguments` field is accepted; the fields below are added or get a PPO default.
    Defaults follow TRL's former PPOTrainer (`trl.experimental.ppo`, TRL <= 1.12) and Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031), unless stated otherwise. How GRPO's
    batch settings make PPO's rollout, minibatches and epochs: docs/ppo.md, "How it works". `epsilon` is the policy
    clip range, `entropy_coef` the entropy bonus (GRPO's).

    Parameters:
        > KL penalty in the reward

        beta (`float`, *optional*, defaults to `0.05`):
            Initial KL coefficient of the per-token penalty `-beta * KL_t` in the reward (never in the loss; TRL
            PPOTrainer `kl_coef=0.05`); then it follows the KL controller. `0.0` disables the penalty and loads no
            reference model.
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            Per-token KL estimator in the reward and the logged `kl`: `"k1"` (log-ratio, Ziegler et al. 2019), `"k2"`
            or `"k3"` (Schulman 2020, http://joschu.net/blog/kl-approx.html). `rails.kl.estimator`, when set, wins.
        rails (`dict`, `RailsConfig` or `None`, *optional*, defaults to `None`):
            Reward rails and the KL controller, a `trl_safeppo.rails.RailsConfig` or its `to_dict()` form
            (docs/rails.md). Ziegler's adaptive controller: `{{"kl": {{"controller": "adaptive", "target": 6.0}}}}`,
            target in nats per sequence. `None`: no reward rail and a fixed `beta`.

        > Critic (value model)

        critic_model_path (`str` or `None`, *optional*, defaults to `None`):
            Where the critic starts: `None` (the policy's trunk plus a fresh scalar head), `"reward_model"` (the first
            sequence-classification reward model of `reward_funcs`), or a path / `tiny://` id / Hub id of a
            sequence-classification or causal-LM checkpoint. It must share the policy's tokenizer.
        critic_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's own optimizer (of the `optim` type); `None` uses `learning_rate`.
        critic_gradient_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            Recompute the critic's activations in its backward pass; `None` follows `gradient_checkpointing`. Off
            suits a critic much smaller than the policy: one critic forward less per update.
        vf_coef (`float`, *optional*, defaults to `0.1`): weight of the value loss in the total loss (TRL PPOTrainer).
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            Clip range of the clipped value loss around the rollout-time values (TRL PPOTrainer; Huang et al. 2024).
        critic_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps at the start during which only the critic learns (the policy's loss is multiplied by 0).

        > Advantages

        gamma (`float`, *optional*, defaults to `1.0`): discount factor of GAE (Ziegler et al. 2019; TRL PPOTrainer).
        lam (`float`, *optional*, defaults to `0.95`): GAE lambda (Schulman et al. 2016; TRL PPOTrainer).
        whiten_advantages (`bool`, *optional*, defaults to `True`):
            Whiten advantages over the response tokens of the whole rollout batch (all processes).
        whiten_rewards (`bool`, *optional*, defaults to `False`): whiten the per-token rewards before GAE (TRL option).

        > Tripwires (as in SafeGRPOConfig; `raise_kl` and `rollback` act on the PPO KL controller)
{tripwire_params}
        > Reward functions

        reward_timeout_s (`float`, *optional*, defaults to `60.0`):
            {reward_timeout_s}

        > GRPO fields with a PPO default

        num_generations (`int`, *optional*, defaults to `1`): completions per prompt (classic PPO).
        num_iterations (`int`, *optional*, defaults to `4`): PPO epochs per rollout batch (TRL `num_ppo_epochs=4`).
        loss_type (`str`, *optional*, defaults to `"bnpo"`): token-level mean over each minibatch, as TRL's
            PPOTrainer; one of `"bnpo"`, `"dapo"`, `"grpo"`, `"dr_grpo"`.
        learning_rate (`float`, *optional*, defaults to `3e-6`): policy learning rate (TRL PPOTrainer).
        disable_dropout (`bool`, *optional*, defaults to `True`): dropout off, so the KL and the ratio are exact.
    """

    # --- GRPO fields with PPO defaults
    learning_rate: float = field(default=3e-6, metadata={"help": "Policy learning rate (TRL PPOTrainer: 3e-6)."})
    beta: float = field(default=0.05, metadata={"help": "Initial KL coefficient in the reward; 0: no penalty."})
    num_generations: int | None = field(default=1, metadata={"help": "Completions per prompt; 1 is classic PPO."})
    num_iterations: int = field(default=4, metadata={"help": "PPO epochs per rollout batch (TRL PPOTrainer: 4)."})
    loss_type: str = field(
        default="bnpo", metadata={"help": "Token aggregation of the PPO loss: 'bnpo', 'dapo', 'grpo' or 'dr_grpo'."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Dropout off, so the KL and the ratio are exact."})

    # --- KL penalty in the reward
    kl_estimator: str = field(
        default="k1", metadata={"help": "Per-token KL estimator: 'k1', 'k2' or 'k3' (rails.kl.estimator wins)."}
    )
    rails: Any = field(
        default=None, metadata={"help": "Reward rails and KL controller: a RailsConfig or its dict (docs/rails.md)."}
    )

    # --- Critic
    critic_model_path: str | None = field(
        default=None, metadata={"help": "Critic start: None (policy's trunk), 'reward_model', or a model path / id."}
    )
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Critic learning rate; None: policy's."})
    critic_gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute the critic's activations; None follows gradient_checkpointing."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (TRL PPOTrainer: 0.1)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value loss (TRL PPOTrainer)."})
    critic_warmup_steps: int = field(default=0, metadata={"help": "First optimizer steps that train only the critic."})

    # --- Advantages
    gamma: float = field(default=1.0, metadata={"help": "GAE discount (Ziegler et al. 2019; TRL PPOTrainer: 1.0)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (Schulman et al. 2016; TRL PPOTrainer: 0.95)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the rollout's tokens."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE (TRL option)."})

    def __post_init__(self) -> None:
        self._check_ppo_fields()
        validate_tripwire_fields(self)
        validate_reward_timeout(self)
        if self.bf16 is None and not self.fp16 and not self.use_cpu:
            # TRL turns bf16 on whenever fp16 is off, which TrainingArguments rejects on a machine without a bf16
            # accelerator; there, default to fp32 instead so that SafePPOConfig(output_dir=...) works everywhere.
            from transformers.utils import is_torch_bf16_gpu_available

            self.bf16 = bool(is_torch_bf16_gpu_available())
        if self.num_generations == 1:
            self._grpo_post_init_with_one_generation()
        else:
            super().__post_init__()
        if self.gradient_accumulation_steps and self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) so that every PPO minibatch (one optimizer step) lies inside one "
                "rollout batch; set steps_per_generation (or generation_batch_size) accordingly."
            )

    def _grpo_post_init_with_one_generation(self) -> None:
        """GRPOConfig's own checks and batch sizes for one completion per prompt (classic PPO).

        GRPOConfig needs >= 2 completions per prompt and otherwise uses `num_generations` only in divisibility checks,
        so it checks the same batch with every size doubled and 2 completions per prompt: each check then holds
        exactly when it holds with 1 (tests/test_trl_contract.py checks this on the installed TRL). The sizes are
        halved back afterwards; `steps_per_generation` is a ratio and comes out the same.
        """
        sizes = ["per_device_train_batch_size", "generation_batch_size"]
        if self.num_generations_eval is None:
            sizes.append("per_device_eval_batch_size")
        self.num_generations = 2
        for name in sizes:  # generation_batch_size may be None: GRPO then derives it from the doubled sizes
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) * 2)
        try:
            super().__post_init__()
        except ValueError as err:
            raise ValueError(
                f"{err} (num_generations=1: GRPOConfig checked this PPO batch with every batch size doubled and 2 "
                "completions per prompt, so halve the batch sizes it names)"
            ) from err
        finally:
            self.num_generations = 1
            for name in sizes:
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name) // 2)

    def _check_ppo_fields(self) -> None:
        def bad(name: str, value: Any, fix: str) -> ValueError:
            return ValueError(f"SafePPOConfig.{name}={value!r} is invalid: {fix}")

        checks = (  # (field, is the value valid, the fix)
            ("num_generations", lambda v: isinstance(v, int) and v >= 1, "use an integer >= 1 (1 is classic PPO)"),
            ("loss_type", lambda v: v in PPO_LOSS_TYPES,
             f"PPO supports the clipped-surrogate losses {list(PPO_LOSS_TYPES)}"),
            ("importance_sampling_level", lambda v: v == "token", "PPO uses per-token ratios: 'token'"),
            ("beta", lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
             "use a finite KL coefficient >= 0"),
            ("kl_estimator", lambda v: v in KL_ESTIMATORS, f"use one of {list(KL_ESTIMATORS)}"),
            ("multi_objective_aggregation", lambda v: v == "sum_then_normalize",
             "PPO's score is the weighted sum of the reward functions (reward_weights): use 'sum_then_normalize'"),
            ("sync_ref_model", lambda v: not v, "PPO keeps a frozen reference; set it to False"),
            ("gamma", lambda v: 0.0 <= v <= 1.0, "use a discount in [0, 1]"),
            ("lam", lambda v: 0.0 <= v <= 1.0, "use a GAE lambda in [0, 1]"),
            ("vf_coef", lambda v: math.isfinite(v) and v > 0,
             "use a positive weight (the critic learns only from this loss)"),
            ("cliprange_value", lambda v: math.isfinite(v) and v > 0, "use a positive clip range"),
            ("critic_learning_rate", lambda v: v is None or v > 0, "use a positive learning rate, or None"),
            # a bool or None, not 0 / 1 (which `in (None, True, False)` would let through)
            ("critic_gradient_checkpointing", lambda v: v is None or isinstance(v, bool),
             "use true, false, or None (follow gradient_checkpointing)"),
            ("critic_warmup_steps", lambda v: isinstance(v, int) and v >= 0, "use an integer >= 0"),
            ("num_iterations", lambda v: v >= 1, "use at least 1 PPO epoch"),
        )
        for name, valid, fix in checks:
            if not valid(getattr(self, name)):
                raise bad(name, getattr(self, name), fix)
        self.rails_config = None
        if self.rails is not None:
            from ..rails.config import RailsConfig

            if not isinstance(self.rails, (dict, RailsConfig)):
                raise bad("rails", type(self.rails).__name__, "pass a trl_safeppo.RailsConfig, a dict, or None")
            # Parsed here, once, at configuration time; `rails` keeps the plain dict form so that the config stays
            # JSON-serializable (TrainingArguments.to_json_string, loggers, checkpoints).
            self.rails_config = RailsConfig.from_any(self.rails)
            self.rails = self.rails_config.to_dict()


# The tripwire fields share their help text with SafeGRPOConfig; the docstring is a literal (so it is __doc__) and
# the shared text is filled in here.
SafePPOConfig.__doc__ = SafePPOConfig.__doc__.format(tripwire_params=TRIPWIRE_PARAMS, **TRIPWIRE_HELP)
