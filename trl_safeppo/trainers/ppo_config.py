"""Configuration of :class:`~trl_safeppo.trainers.ppo_trainer.SafePPOTrainer`: GRPO's config plus the PPO knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .tripwires import (
    TRIPWIRE_HELP,
    RewardTimeoutFields,
    TripwireFields,
    validate_reward_timeout,
    validate_tripwire_fields,
)

# GRPO loss formulations that are the PPO clipped surrogate with a different token aggregation.
PPO_LOSS_TYPES = ("bnpo", "dapo", "grpo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class SafePPOConfig(TripwireFields, RewardTimeoutFields, GRPOConfig):
    r"""
    Configuration class for [`SafePPOTrainer`]: classic RLHF PPO (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593;
    Ouyang et al. 2022 "InstructGPT", https://arxiv.org/abs/2203.02155) on top of TRL's `GRPOConfig`.

    Every `GRPOConfig` / `TrainingArguments` field is accepted; the fields below are added or get a PPO default.
    Defaults follow TRL's former PPOTrainer (`trl.experimental.ppo`, TRL <= 1.12) and Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO" (https://arxiv.org/abs/2403.17031), unless stated otherwise.

    How GRPO's settings map onto PPO:
        - `num_generations`: completions sampled per prompt; 1 is the classic PPO setup (GRPO requires >= 2).
        - `generation_batch_size` / `steps_per_generation`: the rollout batch (completions generated per update).
        - `per_device_train_batch_size * gradient_accumulation_steps * num_processes`: one PPO minibatch (one optimizer
          step); the number of minibatches per epoch is `steps_per_generation / gradient_accumulation_steps`.
        - `num_iterations`: PPO epochs over each rollout batch.
        - `epsilon`: the policy clip range of the PPO surrogate.
        - `beta`: the *initial* KL coefficient. Unlike GRPO, PPO puts the KL in the reward (`-beta * KL_t` on every
          response token), never in the loss; beta then follows the KL controller (fixed by default,
          adaptive with `rails={{"kl": {{"controller": "adaptive", ...}}}}`).
        - `entropy_coef`: the optional entropy bonus (GRPO's implementation).

    Parameters:
        > KL penalty in the reward

        beta (`float`, *optional*, defaults to `0.05`):
            Initial KL coefficient of the per-token KL penalty in the reward (TRL PPOTrainer `kl_coef=0.05`).
            `0.0` disables the penalty and loads no reference model.
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            Per-token KL estimator in the reward: `"k1"` (log-ratio, unbiased, Ziegler et al. 2019), `"k2"` or `"k3"`
            (Schulman 2020, http://joschu.net/blog/kl-approx.html). The logged `kl` uses the same estimator.
            `rails.kl.estimator`, when set, takes precedence.
        rails (`dict`, `RailsConfig` or `None`, *optional*, defaults to `None`):
            Reward rails (non-finite guard, clipping, normalization, length rails, missing-EOS penalty) and the KL
            controller, as a `trl_safeppo.rails.RailsConfig` or its `to_dict()` form (see docs/rails.md). The
            adaptive controller of Ziegler et al. 2019 is `{{"kl": {{"controller": "adaptive", "target": 6.0}}}}`; its
            target is in nats per sequence, `beta` is its initial value unless `rails.kl.init_kl_coef` is set.
            `None`: no reward rail and a fixed `beta`.

        > Critic (value model)

        critic_model_path (`str` or `None`, *optional*, defaults to `None`):
            Where the critic starts: `None` (copy of the policy's trunk plus a fresh scalar head), `"reward_model"`
            (the first sequence-classification reward model of `reward_funcs`, as TRL's PPOTrainer examples did), or
            a path / `tiny://` id / Hub id of a sequence-classification or causal-LM checkpoint. The critic reads the
            policy's token ids, so it must share the policy's tokenizer.
        critic_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's own optimizer (the `optim` type, like the policy's); `None` uses
            `learning_rate`.
        critic_gradient_checkpointing (`bool` or `None`, *optional*, defaults to `None`):
            Recompute the critic's activations in its backward pass; `None` follows `gradient_checkpointing`. Turn
            it off for a critic much smaller than the policy, whose activations cost little memory: each update is
            then one critic forward cheaper.
        vf_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the value loss in the total loss (TRL PPOTrainer).
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            Clip range of the clipped value loss around the rollout-time values (TRL PPOTrainer; Huang et al. 2024).
        critic_warmup_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps at the start during which only the critic learns (the policy's loss is multiplied by 0).

        > Advantages

        gamma (`float`, *optional*, defaults to `1.0`):
            Discount factor of GAE (Ziegler et al. 2019; TRL PPOTrainer).
        lam (`float`, *optional*, defaults to `0.95`):
            GAE lambda (Schulman et al. 2016; TRL PPOTrainer).
        whiten_advantages (`bool`, *optional*, defaults to `True`):
            Whiten advantages over the response tokens of the whole rollout batch (all processes).
        whiten_rewards (`bool`, *optional*, defaults to `False`):
            Whiten the per-token rewards before GAE (TRL PPOTrainer option, off by default).

        > Tripwires (as in SafeGRPOConfig; `raise_kl` and `rollback` act on the PPO KL controller)

        tripwires (`list[dict]`, *optional*):
            {tripwires}
        tripwire_raise_kl_factor (`float`, *optional*, defaults to `2.0`):
            {raise_kl_factor}
        tripwire_rollback_beta_factor (`float`, *optional*, defaults to `2.0`):
            {rollback_beta_factor}
        tripwire_rollback_lr_factor (`float`, *optional*, defaults to `0.5`):
            {rollback_lr_factor} A rollback restores the policy, its optimizer, the rails and beta; the critic
            keeps learning from where it is.
        tripwire_max_rollbacks (`int`, *optional*, defaults to `2`):
            {max_rollbacks}
        tripwire_snapshot_every (`int`, *optional*, defaults to `1`):
            {snapshot_every}
        tripwire_max_beta (`float`, *optional*):
            {max_beta}
        logging_nan_inf_filter (`bool`, *optional*, defaults to `False`):
            Overrides the TrainingArguments default (`True`), which replaces a NaN/inf loss by the running average in
            the logs and would hide it from the `non_finite` tripwire.

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
    learning_rate: float = field(
        default=3e-6, metadata={"help": "Policy learning rate of AdamW (TRL PPOTrainer: 3e-6)."}
    )
    beta: float = field(
        default=0.05,
        metadata={
            "help": "Initial KL coefficient of the per-token KL penalty in the reward (TRL PPOTrainer kl_coef=0.05). "
            "0.0 disables the penalty and loads no reference model."
        },
    )
    num_generations: int | None = field(
        default=1, metadata={"help": "Completions sampled per prompt; 1 is the classic PPO setup."}
    )
    num_iterations: int = field(
        default=4, metadata={"help": "PPO epochs per rollout batch (TRL PPOTrainer num_ppo_epochs=4)."}
    )
    loss_type: str = field(
        default="bnpo",
        metadata={
            "help": "Token aggregation of the PPO clipped surrogate: 'bnpo' (mean over the minibatch's tokens, as "
            "TRL's PPOTrainer), 'dapo', 'grpo' or 'dr_grpo'."
        },
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout, so the KL and the importance ratio are exact."}
    )

    # --- KL penalty in the reward
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "Per-token KL estimator in the reward: 'k1' (Ziegler et al. 2019), 'k2' or 'k3' (Schulman 2020). "
            "The logged `kl` uses the same estimator; rails.kl.estimator, when set, takes precedence."
        },
    )
    rails: Any = field(
        default=None,
        metadata={
            "help": "Reward rails and KL controller: a trl_safeppo.rails.RailsConfig or its to_dict() form (adaptive KL: "
            "{'kl': {'controller': 'adaptive', 'target': 6.0}}, target in nats per sequence); None: no reward rail, "
            "fixed beta."
        },
    )

    # --- Critic
    critic_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Critic initialisation: None (the policy's trunk + a fresh scalar head), 'reward_model' (the first "
            "sequence-classification reward model of reward_funcs), or a path / tiny:// id / Hub id. It must share "
            "the policy's tokenizer."
        },
    )
    critic_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the critic's own optimizer (`optim`); None uses learning_rate."}
    )
    critic_gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute the critic's activations in its backward pass; None follows gradient_checkpointing."
        },
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (TRL PPOTrainer: 0.1)."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of the clipped value loss (TRL PPOTrainer: 0.2)."}
    )
    critic_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps at the start during which only the critic learns."}
    )

    # --- Advantages
    gamma: float = field(default=1.0, metadata={"help": "GAE discount (Ziegler et al. 2019; TRL PPOTrainer: 1.0)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (Schulman et al. 2016; TRL PPOTrainer: 0.95)."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten advantages over the response tokens of the whole rollout batch."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten per-token rewards before GAE (TRL PPOTrainer option, off)."}
    )

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

        GRPO needs >= 2 completions per prompt for its group baseline; PPO's baseline is the critic. GRPOConfig uses
        `num_generations` only to check that batches hold whole groups (divisibility) and for that minimum, so it
        checks the PPO batch as the same batch with every size doubled and 2 completions per prompt: each
        divisibility check then holds exactly when it holds for the PPO batch with 1 (tests/test_trl_contract.py
        checks this on the installed TRL), the minimum holds, and every other check runs unchanged. The sizes are
        halved back afterwards; `steps_per_generation` is a ratio and comes out the same.
        """
        eval_doubled = self.num_generations_eval is None
        self.num_generations = 2
        self.per_device_train_batch_size *= 2
        if self.generation_batch_size is not None:
            self.generation_batch_size *= 2
        if eval_doubled:
            self.per_device_eval_batch_size *= 2
        try:
            super().__post_init__()
        except ValueError as err:
            raise ValueError(
                f"{err} (num_generations=1: GRPOConfig checked this PPO batch with every batch size doubled and 2 "
                "completions per prompt, so halve the batch sizes it names)"
            ) from err
        finally:
            self.num_generations = 1
            self.per_device_train_batch_size //= 2
            if self.generation_batch_size is not None:
                self.generation_batch_size //= 2
            if eval_doubled:
                self.per_device_eval_batch_size //= 2

    def _check_ppo_fields(self) -> None:
        def bad(name: str, value: Any, fix: str) -> ValueError:
            return ValueError(f"SafePPOConfig.{name}={value!r} is invalid: {fix}")

        if not isinstance(self.num_generations, int) or self.num_generations < 1:
            raise bad("num_generations", self.num_generations, "use an integer >= 1 (1 is classic PPO)")
        if self.loss_type not in PPO_LOSS_TYPES:
            raise bad("loss_type", self.loss_type, f"PPO supports the clipped-surrogate losses {list(PPO_LOSS_TYPES)}")
        if self.importance_sampling_level != "token":
            raise bad("importance_sampling_level", self.importance_sampling_level, "PPO uses per-token ratios: 'token'")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise bad("beta", self.beta, "use a finite KL coefficient >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise bad("kl_estimator", self.kl_estimator, f"use one of {list(KL_ESTIMATORS)}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise bad(
                "multi_objective_aggregation", self.multi_objective_aggregation,
                "PPO's score is the weighted sum of the reward functions (reward_weights): use 'sum_then_normalize'",
            )
        if self.sync_ref_model:
            raise bad("sync_ref_model", self.sync_ref_model, "PPO keeps a frozen reference; set it to False")
        if not 0.0 <= self.gamma <= 1.0:
            raise bad("gamma", self.gamma, "use a discount in [0, 1]")
        if not 0.0 <= self.lam <= 1.0:
            raise bad("lam", self.lam, "use a GAE lambda in [0, 1]")
        if not (math.isfinite(self.vf_coef) and self.vf_coef > 0):
            raise bad("vf_coef", self.vf_coef, "use a positive weight (the critic learns only from this loss)")
        if not (math.isfinite(self.cliprange_value) and self.cliprange_value > 0):
            raise bad("cliprange_value", self.cliprange_value, "use a positive clip range")
        if self.critic_learning_rate is not None and not self.critic_learning_rate > 0:
            raise bad("critic_learning_rate", self.critic_learning_rate, "use a positive learning rate, or None")
        # a bool or None, not 0 / 1 (which `in (None, True, False)` would let through)
        if not (self.critic_gradient_checkpointing is None or isinstance(self.critic_gradient_checkpointing, bool)):
            raise bad(
                "critic_gradient_checkpointing", self.critic_gradient_checkpointing,
                "use true, false, or None (follow gradient_checkpointing)",
            )
        if not isinstance(self.critic_warmup_steps, int) or self.critic_warmup_steps < 0:
            raise bad("critic_warmup_steps", self.critic_warmup_steps, "use an integer >= 0")
        if self.num_iterations < 1:
            raise bad("num_iterations", self.num_iterations, "use at least 1 PPO epoch")
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
SafePPOConfig.__doc__ = SafePPOConfig.__doc__.format(**TRIPWIRE_HELP)
