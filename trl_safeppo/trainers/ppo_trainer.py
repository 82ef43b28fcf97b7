"""SafePPOTrainer: classic RLHF PPO (Ziegler et al. 2019; InstructGPT) as a thin subclass of TRL's GRPOTrainer.

GRPOTrainer already samples completions (transformers or vLLM), scores them with `reward_funcs`, handles PEFT and
the reference model, and its loss accepts per-token `(B, T)` advantages. PPO adds, by extending it through `super()`:

1. Rollout (`_generate_and_score_completions`): after GRPO has generated, scored and computed the reference
   log-probabilities, we gather the per-token tensors of all processes and compute
   score (after the reward rails) -> token rewards `-beta * KL_t` (+ score on the last token) -> values of the
   critic -> GAE advantages and returns -> whitening. GRPO's group advantages `(B,)` are replaced by the GAE
   advantages `(B, T)`; the rollout-time values and returns travel with the batch (GRPO shuffles and splits every
   tensor of the batch along dim 0, so they stay aligned with their rows).
2. Loss (`_compute_loss`): GRPO's clipped surrogate on our advantages, with `beta` set to 0 for the call, so the KL
   stays in the reward and out of the loss; plus `vf_coef *` the clipped value loss of the critic.
3. The critic: a separate sequence-classification model read per token, prepared by accelerate (DDP when
   distributed), with its own optimizer (built from `optim` like the policy's), scheduler, gradient clipping and
   checkpoint files.

Notation follows TRL's former PPOTrainer and cleanrl's ppo.py. Shapes: B completions, T response tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..models import resolve_model_path
from ..rails.kl import kl_per_token, sequence_kl
from ._wiring import RailsWiring, SafeRailsMixin
from .tripwires import add_tripwires
from .ppo_config import SafePPOConfig
from .ppo_maths import clipped_value_loss, explained_variance, rollout_targets
from .scaling import check_fp16_master_weights, critic_optimizer_step
from .sharding import (
    check_critic_sharding,
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_state,
    prepare_critic,
)

CRITIC_DIR = "critic"
CRITIC_OPTIMIZER_FILE = "critic_optimizer.pt"
CRITIC_SCHEDULER_FILE = "critic_scheduler.pt"


class ValueModel(nn.Module):
    """Per-token values from a sequence-classification model: its trunk, then its scalar head on every position.

    `forward(input_ids, attention_mask) -> (B, L)` float values (the head of TRL's former PPOTrainer, `get_reward`).
    Wrapping the two calls in one module lets accelerate prepare (DDP-wrap) the critic as a whole.
    """

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


class PPOWiring(RailsWiring):
    """The shared rails wiring, with the KL controller driven once per rollout by the per-sequence KL (PPO)
    instead of once per optimizer step by GRPO's per-token `kl` metric."""

    def observe_kl(self, trainer) -> None:  # GRPO's `kl` metric is not PPO's measure
        return None

    def step_kl(self) -> None:  # updated in SafePPOTrainer._ppo_rollout, once per rollout
        return None

    def update_kl(self, sequence_kl: float, n_samples: int) -> None:
        if self.kl_controller is None or self.trainer is None:
            return
        self.kl_controller.update(sequence_kl, n_samples)
        self.trainer.beta = float(self.kl_controller.value)


class SafePPOTrainer(SafeRailsMixin, GRPOTrainer):
    """PPO with a critic, the KL penalty in the reward, GAE, and the reward rails; used like `GRPOTrainer`.

    Args:
        model: a path, `tiny://` id, Hub id or a `PreTrainedModel` (the policy).
        reward_funcs: callables with TRL's reward signature, sequence-classification reward models (objects or
            paths), or a list mixing them, exactly as `GRPOTrainer` takes them.
        args: a `SafePPOConfig`.
        train_dataset / eval_dataset / processing_class / reward_processing_classes / callbacks / optimizers /
            peft_config: as in `GRPOTrainer`.
        value_model: an optional critic object (a sequence-classification `PreTrainedModel`); overrides
            `args.critic_model_path`.
    """

    _tag_names = ["trl", "ppo", "trl-safeppo"]
    _name = "SafePPO"

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: Any = None,
        args: SafePPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        value_model: PreTrainedModel | None = None,
        **kwargs,
    ):
        if args is None:
            raise ValueError("SafePPOTrainer needs args=SafePPOConfig(output_dir=...)")
        if not isinstance(args, SafePPOConfig):
            raise TypeError(f"args must be a SafePPOConfig, got {type(args).__name__}; build one with SafePPOConfig(...)")
        if isinstance(model, str):
            model = resolve_model_path(model)
        reward_funcs = _resolve_reward_funcs(reward_funcs)
        _check_dataset(train_dataset, args)

        wiring = _build_wiring(args)
        args, reward_funcs, reward_processing_classes = wiring.prepare_init(
            args, reward_funcs, reward_processing_classes
        )
        self.rails_wiring = wiring
        # Built before GRPO wraps the policy (PEFT injects its layers into the model object in place), and checked
        # before the policy and reference load.
        critic_field = "value_model" if value_model is not None else "critic_model_path"
        critic = value_model if value_model is not None else _load_critic(args, model, reward_funcs)
        _check_critic(critic, None, critic_field)

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        wiring.attach(self)
        self.tripwire_callback = None
        add_tripwires(self, args, wiring)  # raise_kl / rollback act on wiring.kl_controller through wiring.set_beta
        if self._is_vlm:
            raise ValueError(
                f"processing_class={type(self.processing_class).__name__} is a multimodal processor; SafePPOTrainer's "
                "critic and rollout forwards are text-only. Use a text-only model (or SafeGRPOTrainer for VLMs)."
            )
        check_critic_sharding(self.accelerator, value_model)  # DeepSpeed, FSDP1, an on-device value_model: refused
        check_fp16_master_weights(args.fp16, {"model": self.model, critic_field: critic})

        _check_critic(critic, self.processing_class, critic_field)
        critic.config.pad_token_id = self._tokenizer.pad_token_id
        if args.disable_dropout:
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(critic)
        critic_checkpointing = args.critic_gradient_checkpointing
        if critic_checkpointing is None:
            critic_checkpointing = args.gradient_checkpointing
        if critic_checkpointing:
            _enable_checkpointing(critic, args.gradient_checkpointing_kwargs)
        critic_lr = args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate
        self.critic = prepare_critic(self.accelerator, ValueModel(critic))  # DDP-wrapped, or FSDP2-sharded
        # a plain optimizer, not registered with accelerate: fp16 unscales it once, in _critic_optimizer_step
        self.critic_optimizer = self._create_critic_optimizer(self.accelerator.unwrap_model(self.critic), critic_lr)
        self.critic_lr_scheduler = None
        self._ppo_capture = False
        self._ppo_captured_logps: torch.Tensor | None = None
        self._ppo_rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------ critic optimisation
    def _create_critic_optimizer(self, value_module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The critic's optimizer, built as the Trainer builds the policy's: the class and settings of `args.optim`
        (e.g. fused AdamW, 8-bit Adam) and weight decay on the same parameters (not biases, not norms)."""
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, value_module)
        if "params" in kwargs or "model" in kwargs:  # GaLore, Apollo, LOMO: built around one model's layers
            optim = getattr(self.args.optim, "value", self.args.optim)  # an OptimizerNames enum after post-init
            raise ValueError(
                f"optim={optim!r} builds its optimizer around the policy's own layers and cannot also train "
                "SafePPOTrainer's critic; use an AdamW-type optimizer (e.g. optim='adamw_torch_fused')"
            )
        decay = set(self.get_decay_parameter_names(value_module))
        named = [(n, p) for n, p in value_module.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return optimizer_cls([g for g in groups if g["params"]], **{**kwargs, "lr": lr})

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps=num_training_steps, optimizer=optimizer)
        if self.critic_lr_scheduler is None:
            from transformers import get_scheduler

            self.critic_lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.critic_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
            )
        return scheduler

    def training_step(self, model, inputs, num_items_in_batch):
        self.critic.train()
        # sync_gradients is the Trainer's optimizer-step boundary (the last micro-batch of gradient accumulation):
        # before it, the critic's DDP gradient all-reduce is deferred exactly as the Trainer defers the policy's.
        sync = self.accelerator.sync_gradients
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.critic):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if sync:
            self._critic_optimizer_step()
        return loss

    def _critic_optimizer_step(self) -> None:
        norm, stepped = critic_optimizer_step(
            self.accelerator, list(self.critic.parameters()), self.critic_optimizer, self.args.max_grad_norm
        )
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self._metrics["train"]["ppo/val/grad_norm"].append(float(norm))
        if stepped and self.critic_lr_scheduler is not None:
            self.critic_lr_scheduler.step()
        self.critic_optimizer.zero_grad(set_to_none=True)

    def _prepare_inputs(self, generation_batch):
        # PPO draws fresh minibatches in every epoch (cleanrl's ppo.py; TRL's former PPOTrainer). GRPO shuffles a
        # rollout once and walks the same slices in every iteration, so at each later epoch's first step the
        # buffered slices are re-pooled, shuffled and split again (each process its own rows) before GRPO serves one.
        spg = self.args.steps_per_generation
        if (
            self.model.training
            and self._buffered_inputs is not None
            and self._step % (spg * self.num_iterations) != 0
            and self._step % spg == 0
            and spg > 1
        ):
            self._buffered_inputs = _reshuffle(self._buffered_inputs)
        return super()._prepare_inputs(generation_batch)

    def _critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
        """`(B, T)` values V(s_t) of the states before each response token (hidden state of the previous position)."""
        with self.accelerator.autocast():
            values = self.critic(input_ids=input_ids, attention_mask=attention_mask)
        return values[:, -logits_to_keep - 1 : -1]

    # ------------------------------------------------------------------ rollout
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ppo_rewards_per_func = rewards_per_func  # global (all processes), after the rails' adjustment column
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._ppo_capture:
            self._ppo_captured_logps = out[0].detach()
        return out

    def _generate_and_score_completions(self, inputs):
        self._ppo_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        return self._ppo_rollout(output)

    @torch.no_grad()
    def _ppo_rollout(self, output: dict[str, Any]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        store = self._metrics[mode]
        accelerator = self.accelerator
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        n_local, t_local = completion_ids.shape
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            old_logps = output.get("old_per_token_logps")
            if old_logps is None:  # GRPO skips it when the batch is used for exactly one optimizer step
                old_logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, t_local, batch_size=batch_size
                )
            was_training = self.critic.training
            self.critic.eval()
            values = torch.cat(
                [
                    self._critic_values(input_ids[i : i + batch_size], attention_mask[i : i + batch_size], t_local)
                    for i in range(0, n_local, batch_size)
                ]
            )
            self.critic.train(was_training)
        ref_logps = output.get("ref_per_token_logps")

        # Everything below runs on the global batch (all processes), identically on every rank, then each rank keeps
        # its rows: rows are gathered in process order, as GRPO gathers the rewards (process_slice).
        def gather_bt(x: torch.Tensor) -> torch.Tensor:
            return accelerator.gather(accelerator.pad_across_processes(x.contiguous(), dim=1, pad_index=0))

        mask_g = gather_bt(mask.float())
        old_g = gather_bt(old_logps.float())
        values_g = gather_bt(values.float())
        ref_g = gather_bt(ref_logps.float()) if ref_logps is not None else None
        rpf = self._ppo_rewards_per_func
        score = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1).to(mask_g.device)
        unscorable = (torch.isnan(rpf).all(dim=1).to(mask_g.device)) | ~torch.isfinite(score)
        empty = mask_g.sum(dim=1) == 0
        before_update = self.rails_wiring.kl_before_update
        if before_update and mode == "train" and ref_g is not None and (~empty).any():
            # rails.kl.measure_before_update: this rollout's KL sets the beta of its own penalty
            maskf = mask_g.to(old_g.dtype)
            rollout_kl = sequence_kl(kl_per_token(old_g, ref_g, kl_estimator(self.args), maskf), maskf)[~empty]
            self.rails_wiring.update_kl(rollout_kl.mean().item(), len(rollout_kl))
        beta = float(self.beta) if ref_g is not None else 0.0
        targets = rollout_targets(
            score,
            old_g,
            ref_g,
            values_g,
            mask_g,
            beta,
            gamma=self.args.gamma,
            lam=self.args.lam,
            estimator=kl_estimator(self.args),
            whiten_advantages=self.args.whiten_advantages,
            whiten_rewards=self.args.whiten_rewards,
            scorable=~unscorable & ~empty,
        )
        score = torch.where(unscorable, torch.zeros_like(score), score)

        # Metrics (global batch, identical on every rank)
        seq_kl = targets.kl.sum(dim=1)
        non_score = -beta * seq_kl
        scored = ~unscorable & ~empty
        store["beta"].append(beta)
        store["kl"].append(_masked_mean(targets.kl, mask_g))
        store["ppo/kl_seq"].append(seq_kl[~empty].mean().item() if (~empty).any() else math.nan)
        store["ppo/score/mean"].append(score[scored].mean().item() if scored.any() else math.nan)
        store["ppo/score/std"].append(score[scored].std().item() if int(scored.sum()) > 1 else math.nan)
        store["ppo/non_score_reward"].append(non_score[~empty].mean().item() if (~empty).any() else math.nan)
        store["ppo/rlhf_reward"].append((score + non_score)[scored].mean().item() if scored.any() else math.nan)
        store["ppo/unscorable"].append(float(unscorable.sum().item()))
        store["ppo/empty_completions"].append(float(empty.sum().item()))
        store["ppo/val/mean"].append(_masked_mean(values_g, targets.mask))
        store["ppo/returns/mean"].append(_masked_mean(targets.returns, targets.mask))
        store["ppo/val/explained_variance"].append(explained_variance(values_g, targets.returns, targets.mask))

        if mode == "train" and ref_logps is not None and not before_update:
            finite = ~empty
            if finite.any():
                self.rails_wiring.update_kl(seq_kl[finite].mean().item(), int(finite.sum().item()))

        rank = accelerator.process_index
        rows = slice(rank * n_local, (rank + 1) * n_local)
        dtype = torch.float32  # advantages, values and returns stay in full precision under bf16 autocast
        output["advantages"] = targets.advantages[rows, :t_local].to(dtype)
        output["ppo_values"] = values_g[rows, :t_local].to(dtype)
        output["ppo_returns"] = targets.returns[rows, :t_local].to(dtype)
        output["ppo_mask"] = targets.mask[rows, :t_local].to(dtype)
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        store = self._metrics[mode]
        beta, self.beta = self.beta, 0.0  # the KL is in the reward: GRPO must not add it to the loss
        self._ppo_capture = True
        try:
            policy_loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
            self._ppo_capture = False
        logps, self._ppo_captured_logps = self._ppo_captured_logps, None

        mask = inputs["ppo_mask"]
        maskf = mask.float()
        # Value loss, clipped around the rollout-time values (TRL PPOTrainer; Huang et al. 2024, detail 9)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        vpred = self._critic_values(input_ids, attention_mask, completion_ids.size(1))
        vf_loss, vf_clipfrac = clipped_value_loss(
            vpred, inputs["ppo_values"].float(), inputs["ppo_returns"].float(), mask, self.args.cliprange_value
        )

        # Every ppo/* figure of this micro-batch as a token-weighted mean over all processes: sums over response
        # tokens, one all-reduce, one division (one sync per micro-step instead of one per figure)
        n_tokens = maskf.sum()
        sums = {
            "ppo/val/loss": vf_loss.detach() * n_tokens,
            "ppo/val/clipfrac": torch.nan_to_num(vf_clipfrac) * n_tokens,
            "ppo/val/vpred": (vpred.detach().float() * maskf).sum(),
        }
        old_logps = inputs.get("old_per_token_logps")
        if logps is not None:
            log_ratio = logps - (logps if old_logps is None else old_logps)  # captured detached
            ratio = torch.exp(log_ratio)
            clipped = ((ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)).float()
            sums["ppo/policy/approxkl"] = (0.5 * log_ratio.square() * maskf).sum()
            sums["ppo/policy/clipfrac"] = (clipped * maskf).sum()
            sums["ppo/policy/ratio_mean"] = (ratio * maskf).sum()
        totals = self.accelerator.reduce(torch.stack([n_tokens, *sums.values()]).float(), reduction="sum")
        # this process's policy loss rides along in the same host transfer (it is logged per process, not reduced)
        n_total, *sum_values, local_policy_loss = torch.cat([totals, policy_loss.detach().float().reshape(1)]).tolist()
        if n_total > 0:
            for name, total in zip(sums, sum_values):
                store[name].append(total / n_total)

        scale = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        policy_weight = 1.0
        if mode == "train" and self.state.global_step < self.args.critic_warmup_steps:
            policy_weight = 0.0  # critic warm-up: the policy's gradient is zero, only the critic learns
        store["ppo/policy_trained"].append(policy_weight)
        store["ppo/loss/policy"].append(local_policy_loss * scale)
        return policy_weight * policy_loss + self.args.vf_coef * vf_loss / scale

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # policy, its optimizer, rails + KL controller state
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.accelerator.wait_for_everyone()
        # FSDP2: every rank joins the gather of full tensors to process 0, which writes an ordinary checkpoint
        sharded = is_sharded(self.critic)
        critic_state = full_model_state(self.critic) if sharded else None
        critic_optim_state = full_optimizer_state(self.critic, self.critic_optimizer)
        if self.args.should_save:
            critic = self.accelerator.unwrap_model(self.critic).model
            tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-critic-")
            try:
                if sharded:  # the ValueModel's keys are "model." + the critic's own
                    critic.save_pretrained(tmp, state_dict={k[6:]: v for k, v in critic_state.items()})
                else:
                    critic.save_pretrained(tmp)
                final = os.path.join(folder, CRITIC_DIR)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
            _atomic_save(critic_optim_state, os.path.join(folder, CRITIC_OPTIMIZER_FILE))
            if self.critic_lr_scheduler is not None:
                _atomic_save(self.critic_lr_scheduler.state_dict(), os.path.join(folder, CRITIC_SCHEDULER_FILE))

    # --- tripwire rollback: the critic is trained state too (hook of trainers._wiring.save_snapshot)
    def tripwire_state_dict(self) -> dict[str, Any]:
        """The critic's weights and optimizer state, saved with every tripwire snapshot, so a rollback restores the
        critic together with the policy instead of pairing old policy weights with a critic trained past them."""
        critic = self.accelerator.unwrap_model(self.critic)
        return {
            "critic": {k: v.detach().cpu().clone() for k, v in critic.state_dict().items()},
            "critic_optimizer": copy.deepcopy(self.critic_optimizer.state_dict()),
        }

    def load_tripwire_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.unwrap_model(self.critic).load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        critic_dir = os.path.join(checkpoint, CRITIC_DIR)
        if not os.path.isdir(critic_dir):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} has no {CRITIC_DIR}/ directory: it was not written by "
                "SafePPOTrainer, so the critic cannot be restored; resume from a SafePPOTrainer checkpoint"
            )
        critic = self.accelerator.unwrap_model(self.critic).model
        loaded = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1, dtype=critic.dtype)
        sharded = is_sharded(self.critic)
        device = "cpu" if sharded else self.accelerator.device
        state = torch.load(os.path.join(checkpoint, CRITIC_OPTIMIZER_FILE), map_location=device, weights_only=False)
        if sharded:  # full tensors into the FSDP2 shards (sharding.load_full_state)
            load_full_state(self.critic, {"model." + k: v for k, v in loaded.state_dict().items()},
                            self.critic_optimizer, state)
        else:
            critic.load_state_dict(loaded.state_dict())
            self.critic_optimizer.load_state_dict(state)
        del loaded
        sched_path = os.path.join(checkpoint, CRITIC_SCHEDULER_FILE)
        if self.critic_lr_scheduler is not None and os.path.exists(sched_path):
            self.critic_lr_scheduler.load_state_dict(torch.load(sched_path, weights_only=False))


# ---------------------------------------------------------------------- helpers
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return ((x * mask).sum() / n).item() if n > 0 else math.nan


def _reshuffle(slices: list[dict]) -> list[dict]:
    """Pool the minibatch slices of one rollout, shuffle the rows, split again into as many slices.

    Only for text batches whose values are all tensors (or None); anything else (multimodal lists) is left as is.
    """
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    keys = slices[0].keys()
    if not all(v is None or isinstance(v, torch.Tensor) for sl in slices for v in sl.values()):
        return slices
    pooled = {}
    for key in keys:
        values = [sl[key] for sl in slices]
        if values[0] is None or values[0].ndim == 0:
            pooled[key] = values[0]
        else:
            pooled[key] = torch.cat(values, dim=0)
    return split_tensor_dict(shuffle_sequence_dict(pooled), len(slices))


def _atomic_save(obj: Any, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _enable_checkpointing(model: PreTrainedModel, kwargs: dict | None) -> None:
    """Turn on activation recomputation as the transformers Trainer does for the policy: `every_n_layers` and
    `offload` are arguments of the enable call (transformers >= 5.23), the other keys go to torch's checkpoint."""
    kwargs = dict(kwargs or {"use_reentrant": False})
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23; the old name is deprecated there
        layer_args = {k: kwargs.pop(k) for k in ("every_n_layers", "offload") if k in kwargs}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, **layer_args)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _build_wiring(args: SafePPOConfig) -> PPOWiring:
    """Reward rails and KL controller from `args.rails` (None: no reward rail, `FixedKLController(args.beta)`)."""
    from ..rails.kl import FixedKLController

    wiring = PPOWiring.from_config(args.rails, default_kl_coef=args.beta)
    if args.rails is None and args.beta > 0:
        wiring.kl_controller = FixedKLController(args.beta)
    return wiring


def kl_estimator(args: SafePPOConfig) -> str:
    """`rails.kl.estimator` when set, else `args.kl_estimator`."""
    rails_estimator = ((args.rails or {}).get("kl") or {}).get("estimator")
    return rails_estimator or args.kl_estimator


def _resolve_reward_funcs(reward_funcs: Any) -> list:
    """GRPO's reward_funcs, plus the package's conveniences: a `tiny://` id or local directory is a reward model path;
    a built-in rule name (`"math"`), a `"module:function"` path or a dict spec goes through
    `trl_safeppo.rewards.resolve`; anything else (callables, models, Hub ids) is passed to GRPO unchanged."""
    if reward_funcs is None:
        raise ValueError("reward_funcs is required: pass a callable rule checker, a reward model, or a list of them")
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is an empty list: pass at least one reward function or reward model")
    return [_resolve_reward_func(f) for f in funcs]


def _resolve_reward_func(func: Any) -> Any:
    if isinstance(func, dict):
        from ..rewards import resolve

        return resolve(func)
    if not isinstance(func, str):
        return func
    if func.startswith("tiny://") or os.path.isdir(os.path.expanduser(func)):
        return resolve_model_path(func)
    from ..rewards.spec import BUILTINS

    if func in BUILTINS or ":" in func:
        from ..rewards import resolve

        return resolve(func)
    return resolve_model_path(func)  # a Hub id of a reward model (or a clear error for a missing path)


def _check_dataset(train_dataset, args: SafePPOConfig) -> None:
    if train_dataset is None:
        raise ValueError("train_dataset is required: a datasets.Dataset with a 'prompt' column")
    try:
        n = len(train_dataset)
    except TypeError:  # IterableDataset
        return
    if n == 0:
        raise ValueError("train_dataset is empty (0 rows), e.g. after filtering; PPO needs prompts to sample from")
    per_rollout = args.generation_batch_size // args.num_generations
    if n < per_rollout:
        raise ValueError(
            f"train_dataset has {n} prompts but one rollout needs {per_rollout} (generation_batch_size="
            f"{args.generation_batch_size} / num_generations={args.num_generations}); add prompts or lower "
            "per_device_train_batch_size / steps_per_generation"
        )
    if "prompt" not in getattr(train_dataset, "column_names", ["prompt"]):
        raise ValueError(f"train_dataset has no 'prompt' column (columns: {train_dataset.column_names})")


def _model_init_kwargs(args: SafePPOConfig) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    kwargs.pop("device_map", None)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return kwargs


def _load_critic(args: SafePPOConfig, model: Any, reward_funcs: list) -> PreTrainedModel:
    """The critic's starting point, per `args.critic_model_path` (see SafePPOConfig)."""
    import copy

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
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_model_init_kwargs(args))
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"{what}: cannot load {path!r} as a critic (AutoModelForSequenceClassification, num_labels=1): {err}. "
            "Pass a sequence-classification or causal-LM checkpoint whose weights match its config, that shares the "
            "policy's tokenizer"
        ) from err


def _check_critic(critic: Any, processing_class: Any, field_name: str) -> None:
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
