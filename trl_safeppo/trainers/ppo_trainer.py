"""SafePPOTrainer: classic RLHF PPO (Ziegler et al. 2019; InstructGPT) as a thin subclass of TRL's GRPOTrainer.

GRPOTrainer already samples completions (transformers or vLLM), scores them with `reward_funcs`, handles PEFT and
the reference model, and its loss accepts per-token `(B, T)` advantages. One PPO iteration, in the order of this file
(cleanrl's ppo.py reads the same way):

1. Rollout (`_generate_and_score_completions`): GRPO generates, scores (through the reward rails,
   `reward_rails.py`) and computes the reference log-probabilities; we add the policy's log-probabilities and the
   critic's values.
2. Targets (`_rollout_targets`), on the global batch: score -> per-token KL -> token rewards `-beta * KL_t` (+ score
   on the last token) -> GAE advantages and returns -> whitening (the maths: `ppo_maths.py`). GRPO's group
   advantages `(B,)` are replaced by the GAE advantages `(B, T)`; values and returns travel with the batch.
3. Epochs of minibatch updates (`_prepare_inputs`, `compute_loss`, `training_step`): each epoch reshuffles the
   rollout into minibatches; each minibatch trains the policy (GRPO's clipped surrogate on our advantages, with
   `beta` 0 for the call so the KL stays in the reward) and the critic (`vf_coef *` the clipped value loss, its own
   optimizer, scheduler and gradient clipping).

The critic is a separate sequence-classification model read per token, prepared by accelerate (DDP when
distributed), saved in every checkpoint. Notation follows TRL's former PPOTrainer and cleanrl's ppo.py. Shapes: B
completions, T response tokens.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, ProcessorMixin
from trl import GRPOTrainer

from ..fileio import atomic_dir, atomic_path
from ..rails.kl import kl_per_token, sequence_kl
from .critic import check_critic, load_critic, prepare_critic
from .kl_control import policy_logps
from .ppo_config import SafePPOConfig
from .ppo_maths import clipped_value_loss, explained_variance, rollout_targets
from . import sharding, zero
from .rails_mixin import SafeRailsMixin
from .scaling import check_fp16_master_weights, critic_optimizer_step

CRITIC_DIR = "critic"
CRITIC_ZERO_DIR = "critic_zero"  # DeepSpeed: the critic engine's own checkpoint (zero.py)
CRITIC_OPTIMIZER_FILE = "critic_optimizer.pt"
CRITIC_SCHEDULER_FILE = "critic_scheduler.pt"


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
        _check_dataset(train_dataset, args)
        model, reward_funcs, args, reward_processing_classes = self._before_grpo_init(
            model, reward_funcs, args, reward_processing_classes, ppo=True)
        # Built before GRPO wraps the policy (PEFT injects its layers into the model object in place), and checked
        # before the policy and reference load.
        critic_field = "value_model" if value_model is not None else "critic_model_path"
        critic = value_model if value_model is not None else load_critic(args, model, reward_funcs)
        check_critic(critic, None, critic_field)

        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs,
        )
        self._after_grpo_init(args)
        if isinstance(self.processing_class, ProcessorMixin):
            raise ValueError(
                f"processing_class={type(self.processing_class).__name__} is a multimodal processor; SafePPOTrainer's "
                "critic and rollout forwards are text-only. Use a text-only model (or SafeGRPOTrainer for VLMs)."
            )
        # ZeRO settings, FSDP1, an on-device value_model, a sharded critic saved on each node
        sharding.check_critic_sharding(self.accelerator, value_model, args.save_on_each_node)
        check_fp16_master_weights(args.fp16, {"model": self.model, critic_field: critic})

        value_module = prepare_critic(critic, args, self.processing_class, critic_field)
        critic_lr = args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate
        self.critic = sharding.prepare_critic(self.accelerator, value_module)  # DDP-wrapped, or FSDP2-sharded
        # a plain optimizer, not registered with accelerate: fp16 unscales it once, in _critic_optimizer_step
        self.critic_optimizer = self._create_critic_optimizer(self.accelerator.unwrap_model(self.critic), critic_lr)
        if self.is_deepspeed_enabled:  # ZeRO-2/3: an engine of its own partitions the critic and its Adam states
            self.critic = zero.critic_engine(self.accelerator, self.critic, self.critic_optimizer)
        self.critic_lr_scheduler = None
        self.critic_resume_folder: str | None = None  # the checkpoint whose critic scheduler create_scheduler loads
        # minibatches of the current rollout, and the micro-steps served from it (_prepare_inputs)
        self._ppo_minibatches: list[dict] = []
        self._ppo_steps = 0
        self._ppo_capture = False
        self._ppo_captured_logps: torch.Tensor | None = None

    # ================================================================== 1. Rollout
    def _generate_and_score_completions(self, inputs):
        # GRPO generates, scores through the reward rails and computes the reference log-probs; PPO adds the rest
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._ppo_minibatches, self._ppo_steps = [], 0  # a new rollout: its epochs start (_prepare_inputs)
        return self._ppo_rollout(output)

    @torch.no_grad()
    def _ppo_rollout(self, output: dict[str, Any]) -> dict[str, Any]:
        """GRPO's batch plus this process's rows of the `(B, T)` targets: `advantages` (GAE, replacing GRPO's `(B,)`
        ones), `ppo_values`, `ppo_returns`, `ppo_mask`."""
        mode = "train" if self.model.training else "eval"
        accelerator = self.accelerator
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        mask = completion_mask * output["tool_mask"] if "tool_mask" in output else completion_mask
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)
        n_local, t_local = completion_ids.shape
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

        # Policy log-probs (GRPO's when it computed them) and the critic's values V(s_t)
        old_logps = policy_logps(self, output)
        was_training = self.critic.training
        self.critic.eval()
        values = torch.cat([
            self._critic_values(input_ids[i : i + batch_size], attention_mask[i : i + batch_size], t_local)
            for i in range(0, n_local, batch_size)
        ])
        self.critic.train(was_training)
        ref_logps = output.get("ref_per_token_logps")

        # Everything below runs on the global batch (all processes), identically on every rank, then each rank keeps
        # its rows: rows are gathered in process order, as GRPO gathers the rewards (process_slice).
        def gather_bt(x: torch.Tensor) -> torch.Tensor:
            return accelerator.gather(accelerator.pad_across_processes(x.float().contiguous(), dim=1, pad_index=0))

        values_g = gather_bt(values)
        ref_g = gather_bt(ref_logps) if ref_logps is not None else None
        targets = self._rollout_targets(mode, gather_bt(mask), gather_bt(old_logps), ref_g, values_g)
        rows = slice(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
        # float32: advantages, values and returns stay in full precision under bf16 autocast
        output["advantages"] = targets.advantages[rows, :t_local].float()
        output["ppo_values"] = values_g[rows, :t_local].float()
        output["ppo_returns"] = targets.returns[rows, :t_local].float()
        output["ppo_mask"] = targets.mask[rows, :t_local].float()
        return output

    # ================================================================== 2. Targets: score, KL, GAE, whitening
    def _rollout_targets(self, mode, mask_g, old_g, ref_g, values_g):
        """The PPO targets of one rollout from its global `(B, T)` tensors (`ppo_maths.rollout_targets`), with the
        KL controller fed once per rollout and the rollout's metrics logged."""
        store, kl, args = self._metrics[mode], self.rails_wiring.kl, self.args
        estimator = (args.rails_config.kl.estimator if args.rails_config is not None else None) or args.kl_estimator

        # Score: the reward functions' weighted sum after the reward rails (reward_rails.py), one number per row
        score = self.rails_wiring.rewards.last_rewards.to(mask_g.device)
        unscorable, filled = ~torch.isfinite(score), mask_g.sum(dim=1) > 0
        scored = ~unscorable & filled
        feed_kl = mode == "train" and ref_g is not None and bool(filled.any())  # training rollouts move beta

        # KL coefficient: rails.kl.measure_before_update lets this rollout's KL set the beta of its own penalty
        if feed_kl and kl.before_update:
            rollout_kl = sequence_kl(kl_per_token(old_g, ref_g, estimator, mask_g), mask_g)[filled]
            kl.update(rollout_kl.mean().item(), len(rollout_kl))
        beta = float(self.beta) if ref_g is not None else 0.0

        # Token rewards -beta * KL_t (+ score on the last token), GAE advantages and returns, whitening
        targets = rollout_targets(
            score, old_g, ref_g, values_g, mask_g, beta, gamma=args.gamma, lam=args.lam, estimator=estimator,
            whiten_advantages=args.whiten_advantages, whiten_rewards=args.whiten_rewards, scorable=scored,
        )
        score = torch.where(unscorable, torch.zeros_like(score), score)

        # Metrics (global batch, identical on every rank)
        seq_kl = targets.kl.sum(dim=1)
        non_score = -beta * seq_kl
        store["beta"].append(beta)
        store["kl"].append(_masked_mean(targets.kl, mask_g))
        store["ppo/kl_seq"].append(_masked_mean(seq_kl, filled))
        store["ppo/score/mean"].append(_masked_mean(score, scored))
        store["ppo/score/std"].append(score[scored].std().item() if int(scored.sum()) > 1 else math.nan)
        store["ppo/non_score_reward"].append(_masked_mean(non_score, filled))
        store["ppo/rlhf_reward"].append(_masked_mean(score + non_score, scored))
        store["ppo/unscorable"].append(float(unscorable.sum().item()))
        store["ppo/empty_completions"].append(float((~filled).sum().item()))
        store["ppo/val/mean"].append(_masked_mean(values_g, targets.mask))
        store["ppo/returns/mean"].append(_masked_mean(targets.returns, targets.mask))
        store["ppo/val/explained_variance"].append(explained_variance(values_g, targets.returns, targets.mask))

        # KL coefficient, by default: the rollout's KL moves beta for the next rollout (Ziegler et al. 2019)
        if feed_kl and not kl.before_update:
            kl.update(seq_kl[filled].mean().item(), int(filled.sum().item()))
        return targets

    # ================================================================== 3. Epochs of minibatch updates
    def _prepare_inputs(self, generation_batch):
        # PPO draws fresh minibatches in every epoch (cleanrl's ppo.py; TRL's former PPOTrainer). GRPO shuffles a
        # rollout once and serves the same slices in every epoch, so the first epoch takes GRPO's slices and every
        # later epoch pools them, shuffles the rows and splits them again (each process its own rows).
        inputs = super()._prepare_inputs(generation_batch)
        if not self.model.training:
            return inputs
        spg = self.args.steps_per_generation
        step, self._ppo_steps = self._ppo_steps, self._ppo_steps + 1
        if step < spg:  # epoch 0
            self._ppo_minibatches.append(inputs)
            return inputs
        if step % spg == 0 and spg > 1:  # a later epoch starts
            self._ppo_minibatches = _reshuffle(self._ppo_minibatches)
        return self._ppo_minibatches[step % spg]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        store = self._metrics[mode]

        # Policy loss: GRPO's clipped surrogate on the GAE advantages; beta 0 for the call, the KL is in the reward
        beta, self.beta = self.beta, 0.0
        self._ppo_capture = True
        try:
            policy_loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self.beta = beta
            self._ppo_capture = False
        logps, self._ppo_captured_logps = self._ppo_captured_logps, None

        # Value loss, clipped around the rollout-time values (TRL PPOTrainer; Huang et al. 2024, detail 9)
        maskf = inputs["ppo_mask"]  # float32, 0 outside the tokens that train (_ppo_rollout)
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        vpred = self._critic_values(input_ids, attention_mask, completion_ids.size(1))
        vf_loss, vf_clipfrac = clipped_value_loss(
            vpred, inputs["ppo_values"].float(), inputs["ppo_returns"].float(), maskf, self.args.cliprange_value
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
        # critic warm-up: the policy's gradient is zero, only the critic learns
        policy_weight = 0.0 if mode == "train" and self.state.global_step < self.args.critic_warmup_steps else 1.0
        store["ppo/policy_trained"].append(policy_weight)
        store["ppo/loss/policy"].append(local_policy_loss * scale)
        return policy_weight * policy_loss + self.args.vf_coef * vf_loss / scale

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._ppo_capture:  # the loss's own log-probs, for approxkl / clipfrac / ratio_mean
            self._ppo_captured_logps = out[0].detach()
        return out

    def training_step(self, model, inputs, num_items_in_batch):
        self.critic.train()
        # sync_gradients is the Trainer's optimizer-step boundary (the last micro-batch of gradient accumulation):
        # before it, the critic's DDP gradient all-reduce is deferred exactly as the Trainer defers the policy's.
        sync = self.accelerator.sync_gradients
        if self.is_deepspeed_enabled:  # the policy engine's backward reduces the critic's gradients at the boundary
            self.critic.set_gradient_accumulation_boundary(sync)
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.critic):
            loss = super().training_step(model, inputs, num_items_in_batch)  # policy step: the Trainer's
        if sync:
            self._critic_optimizer_step()
        return loss

    # ------------------------------------------------------------------ the critic
    def _critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
        """`(B, T)` values V(s_t) of the states before each response token (hidden state of the previous position)."""
        with self.accelerator.autocast():
            values = self.critic(input_ids=input_ids, attention_mask=attention_mask)
        return values[:, -logits_to_keep - 1 : -1]

    def _critic_optimizer_step(self) -> None:
        if self.is_deepspeed_enabled:  # the engine clips at gradient_clipping (= max_grad_norm), steps, zeroes
            self.critic.step()
            norm, stepped = self.critic.get_global_grad_norm(), self.critic.was_step_applied()
        else:  # the critic's gradient alone is unscaled (fp16), clipped, stepped; the policy's step updates the scale
            norm, stepped = critic_optimizer_step(
                self.accelerator, list(self.critic.parameters()), self.critic_optimizer, self.args.max_grad_norm
            )
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self._metrics["train"]["ppo/val/grad_norm"].append(float(norm))
        if stepped and self.critic_lr_scheduler is not None:
            self.critic_lr_scheduler.step()
        self.critic_optimizer.zero_grad(set_to_none=True)

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
            path = os.path.join(self.critic_resume_folder or "", CRITIC_SCHEDULER_FILE)
            if self.critic_resume_folder is not None and os.path.exists(path):
                self.critic_lr_scheduler.load_state_dict(torch.load(path, weights_only=False))
                # building the scheduler reset the optimizer's rates to the schedule's start, and loading its
                # state does not set them back: the critic continues at the checkpoint's rate
                for group, lr in zip(self.critic_optimizer.param_groups, self.critic_lr_scheduler.get_last_lr()):
                    group["lr"] = lr
        return scheduler

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint_files(self, folder: str) -> None:
        """Write the critic, its optimizer and scheduler into a checkpoint folder (after the policy's; every process
        calls it: FSDP2 / ZeRO-3 gather the full tensors to process 0, which writes an ordinary checkpoint)."""
        self.accelerator.wait_for_everyone()
        critic = self.accelerator.unwrap_model(self.critic)
        if self.is_deepspeed_enabled:  # ZeRO: the engine's own checkpoint holds the partitioned optimizer state
            gather = self.args.should_save or zero.stage(self.accelerator) == 3  # ZeRO-3: the gather is a collective
            weights = self.accelerator.get_state_dict(self.critic) if gather else None
            optimizer_state = None
            zero.save_engine(self.accelerator, self.critic, os.path.join(folder, CRITIC_ZERO_DIR))
        elif self.args.should_save or sharding.is_sharded(critic):  # FSDP2: the gathers are collectives
            weights = sharding.full_model_state(critic)
            optimizer_state = sharding.full_optimizer_state(critic, self.critic_optimizer)
        if not self.args.should_save:
            return
        with atomic_dir(os.path.join(folder, CRITIC_DIR)) as tmp:  # the ValueModel's keys: "model." + the critic's
            critic.model.save_pretrained(tmp, state_dict={k.removeprefix("model."): v for k, v in weights.items()})
        if optimizer_state is not None:
            with atomic_path(os.path.join(folder, CRITIC_OPTIMIZER_FILE)) as tmp:
                torch.save(optimizer_state, tmp)
        if self.critic_lr_scheduler is not None:
            with atomic_path(os.path.join(folder, CRITIC_SCHEDULER_FILE)) as tmp:
                torch.save(self.critic_lr_scheduler.state_dict(), tmp)

    def load_checkpoint_state(self, folder: str) -> None:
        super().load_checkpoint_state(folder)  # rails + KL controller, beta, tripwire ladder
        critic_dir = os.path.join(folder, CRITIC_DIR)
        if not os.path.isdir(critic_dir):
            raise ValueError(
                f"resume_from_checkpoint={folder!r} has no {CRITIC_DIR}/ directory: it was not written by "
                "SafePPOTrainer, so the critic cannot be restored; resume from a SafePPOTrainer checkpoint"
            )
        # a DeepSpeed checkpoint holds the critic's optimizer in critic_zero/, any other one in critic_optimizer.pt
        needed = CRITIC_ZERO_DIR if self.is_deepspeed_enabled else CRITIC_OPTIMIZER_FILE
        if not os.path.exists(os.path.join(folder, needed)):
            written = "without" if self.is_deepspeed_enabled else "under"
            raise ValueError(
                f"resume_from_checkpoint={folder!r} has no {needed}: it was written {written} DeepSpeed, so the "
                "critic's optimizer state cannot be restored here; resume under the launcher that wrote it")
        self.critic_resume_folder = folder  # its scheduler is loaded once create_scheduler has built it
        if self.is_deepspeed_enabled:  # weights, fp32 masters and Adam partitions, exactly
            zero.load_engine(self.critic, os.path.join(folder, CRITIC_ZERO_DIR))
            return
        critic = self.accelerator.unwrap_model(self.critic)
        loaded = AutoModelForSequenceClassification.from_pretrained(critic_dir, num_labels=1, dtype=critic.model.dtype)
        optimizer_state = torch.load(os.path.join(folder, CRITIC_OPTIMIZER_FILE), map_location="cpu",
                                     weights_only=False)
        # sharded: every process puts the full tensors into its shards
        sharding.load_full_state(critic, {"model." + k: v for k, v in loaded.state_dict().items()},
                                 self.critic_optimizer, optimizer_state)

    # --- tripwire rollback: the critic is trained state too (hook of trainers.tripwires.save_snapshot)
    def tripwire_state_dict(self) -> dict[str, Any] | None:
        """The critic's weights and optimizer state, saved with every tripwire snapshot, so a rollback restores the
        critic together with the policy instead of pairing old policy weights with a critic trained past them.
        Called on every process (save_snapshot, which writes it at once): sharded, a collective whose full tensors
        land on the main process; unsharded, only the main process (the writer) reads it."""
        if not (self.accelerator.is_main_process or sharding.is_sharded(self.critic)):
            return None
        critic = self.accelerator.unwrap_model(self.critic)
        return {"critic": sharding.full_model_state(critic),
                "critic_optimizer": sharding.full_optimizer_state(critic, self.critic_optimizer)}

    def load_tripwire_state_dict(self, state: dict[str, Any]) -> None:
        """Every process loads the main process's snapshot (sharded: the full tensors into its shards); the critic's
        learning rates in force are kept, as the policy's are (the schedule follows ``global_step``)."""
        lrs = [group["lr"] for group in self.critic_optimizer.param_groups]
        sharding.load_full_state(self.accelerator.unwrap_model(self.critic), state["critic"], self.critic_optimizer,
                                 state["critic_optimizer"])
        for group, lr in zip(self.critic_optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def tripwire_optimizers(self) -> list:
        """The (optimizer, scheduler) pairs besides the policy's whose rates a rollback scales: the critic's."""
        return [(self.critic_optimizer, self.critic_lr_scheduler)]


# ---------------------------------------------------------------------- helpers
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `x` where `mask` (bool or 0/1, same shape) is set; NaN where it is set nowhere."""
    mask = mask.bool()
    return x[mask].mean().item() if mask.any() else math.nan


def _reshuffle(slices: list[dict]) -> list[dict]:
    """Pool the minibatch slices of one rollout, shuffle the rows, split again into as many slices. Only for text
    batches, whose values are all tensors (or None); anything else (multimodal lists) is returned as is."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    if not all(v is None or isinstance(v, torch.Tensor) for sl in slices for v in sl.values()):
        return slices
    pooled = {
        key: v if v is None or v.ndim == 0 else torch.cat([sl[key] for sl in slices]) for key, v in slices[0].items()
    }
    return split_tensor_dict(shuffle_sequence_dict(pooled), len(slices))


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
