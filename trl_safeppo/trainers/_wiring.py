"""Shared wiring of the rails into TRL's GRPOTrainer (used by SafeGRPOTrainer and SafePPOTrainer).

Everything here extends GRPOTrainer through ``super()`` and post-processes what it returns; no TRL private method
is copied. The pieces:

- :class:`RailsAdjustment`: a placeholder reward function appended to ``reward_funcs`` when reward rails are on.
  GRPO sums the weighted per-function rewards and then normalizes them per group; the rails act on that sum, and
  the adjustment column carries ``railed - raw`` so that GRPO's own sum *is* the railed reward. GRPO's group
  normalization (``scale_rewards``), ``loss_type`` and ``mask_truncated_completions`` then run unchanged on it,
  the per-function metrics ``rewards/<func>/mean`` stay the raw scores, and ``rewards/rails_adjustment/mean``
  shows what the rails changed.
- :class:`RailsWiring`: the state holder (reward rails, KL controller), ``apply`` (rewards -> :class:`RewardBatch`
  -> rails -> rewards_per_func), the per-optimizer-step KL update of ``trainer.beta``, checkpoint save / load, and
  the rollback snapshot used by the tripwires.
- :class:`KLTrustRegion` (``rails.kl.max_kl``): around every optimizer step, scales the update back until the KL
  of the batch it trained on is within the cap (a backtracking line search, :func:`rails.kl.kl_line_search`).
- :class:`SafeRailsMixin`: the GRPOTrainer method overrides that call the wiring. ``class X(SafeRailsMixin,
  GRPOTrainer)`` gets rails, adaptive KL and checkpointed rail state; with no rails configured every override is a
  pass-through, so training is exactly GRPOTrainer's.

The multi-process story: GRPO gathers ``rewards_per_func`` over all processes before normalizing, so
:meth:`RailsWiring.apply` sees the global batch on every rank, gathers lengths the same way, and every rank updates
identical rail state. Only the main process writes files.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from transformers import TrainerCallback

RAILS_STATE_FILE = "safe_rails_state.pt"
SNAPSHOT_FILE = "snapshot.pt"
ADJUSTMENT_NAME = "rails_adjustment"


class RailsAdjustment:
    """Placeholder reward function whose column :class:`RailsWiring` fills with ``railed - raw`` (weight 1).

    Returns ``None`` for every completion when called by GRPO; picklable, stable ``__name__``.
    """

    __name__ = ADJUSTMENT_NAME

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        return [None] * len(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_rails_config(value: Any):
    """``None`` | dict | RailsConfig -> RailsConfig or None."""
    if value is None:
        return None
    from ..rails.config import RailsConfig

    if isinstance(value, RailsConfig):
        return value
    if isinstance(value, dict):
        return RailsConfig.from_dict(value)
    raise ValueError(
        f"rails={value!r} is not a rails configuration; pass a dict (the YAML `rails:` block) or a "
        "trl_safeppo.RailsConfig"
    )


def _atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RailsWiring:
    """Reward rails + KL controller of one trainer, with the glue to GRPO's tensors and checkpoints.

    Args:
        rails: a :class:`trl_safeppo.rails.RewardRails` (``None``: rewards pass through untouched).
        kl_controller: an ``AdaptiveKLController`` / ``FixedKLController`` (``None``: ``beta`` stays as configured).
    """

    def __init__(self, rails=None, kl_controller=None, kl_before_update: bool = False, trust_region=None,
                 kl_exact: bool = False):
        self.rails = rails
        self.kl_controller = kl_controller
        # rails.kl.measure_exact: update_kl_from_batch feeds the exact KL over the vocabulary instead of k3
        self.kl_exact = bool(kl_exact)
        # rails.kl.max_kl: a KLTrustRegion run around every optimizer step, or None
        self.trust_region = trust_region
        # rails.kl.measure_before_update: the controller is fed from each new batch (update_kl_from_batch) instead of
        # from the KL logged by the previous update (step_kl)
        self.kl_before_update = bool(kl_before_update)
        self.trainer = None
        self.adjustment_index: int | None = None
        # The last scored batch over all processes: the RewardBatch the rails saw (raw rewards, lengths, truncated,
        # groups), and the rewards before / after the rails, (B,) float32 on the trainer's device.
        self.last_batch = None
        self.last_raw_rewards = None
        self.last_rewards = None
        self._kl_values: list[float] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, rails_config: Any, default_kl_coef: float | None = None) -> RailsWiring:
        """Build from a ``RailsConfig`` (or its dict); ``None`` gives the pass-through wiring.

        ``default_kl_coef`` (the trainer's own ``beta``) is the KL coefficient when ``rails.kl.init_kl_coef`` is
        null. A fixed controller at 0 means no KL term (and no reference model), so no controller is kept.
        """
        config = _as_rails_config(rails_config)
        if config is None:
            return cls()
        from ..rails.config import RewardRails
        from ..rails.kl import FixedKLController

        rails = RewardRails(config, default_kl_coef=default_kl_coef)
        controller = rails.kl_controller
        if isinstance(controller, FixedKLController) and controller.value == 0:
            controller = None
        trust_region = None
        kl = config.kl
        if kl.max_kl is not None or kl.pull_back_above is not None:
            trust_region = KLTrustRegion(
                kl.max_kl, kl.max_kl_backtracks, pull_back_above=kl.pull_back_above, pull_back_to=kl.pull_back_to,
                pull_back_iterations=kl.pull_back_iterations, pull_back_on=kl.pull_back_on,
                pull_back_redraws=kl.pull_back_redraws,
            )
            if controller is None:
                raise ValueError(
                    f"{trust_region.setting} bounds the KL to the reference model, but the KL coefficient is 0, so "
                    f"GRPO loads no reference model; set rails.kl.init_kl_coef (or the trainer's beta) > 0, or "
                    f"rails.kl.{trust_region.field} to null"
                )
        return cls(rails=rails, kl_controller=controller, kl_before_update=config.kl.measure_before_update,
                   trust_region=trust_region, kl_exact=config.kl.measure_exact)

    @property
    def active(self) -> bool:
        return self.rails is not None or self.kl_controller is not None

    def prepare_init(self, args, reward_funcs, reward_processing_classes=None):
        """Adjust GRPOTrainer's constructor arguments before ``super().__init__``.

        Returns ``(args, reward_funcs, reward_processing_classes)``; ``args`` is a shallow copy when changed (the
        caller's config is never mutated). With reward rails, the :class:`RailsAdjustment` column is appended (weight
        1). With a KL controller, ``args.beta`` starts at the controller's value, which must be > 0: GRPO loads no
        reference model when ``beta == 0``.
        """
        import copy

        if self.kl_controller is not None:
            beta0 = float(self.kl_controller.value)
            adaptive = hasattr(self.kl_controller, "min_coef")
            if adaptive and not beta0 > 0:
                raise ValueError(
                    f"rails.kl init_kl_coef={beta0!r}: the KL coefficient must start above 0, because GRPO loads no "
                    "reference model when beta == 0; set init_kl_coef (and min_coef) > 0"
                )
            min_coef = getattr(self.kl_controller, "min_coef", None)
            if adaptive and not min_coef > 0:
                raise ValueError(
                    f"rails.kl min_coef={min_coef!r}: the adaptive KL floor must be > 0, because GRPO loads no "
                    "reference model when beta == 0; set min_coef to a small positive value such as 1e-3"
                )
            args = copy.copy(args)
            args.beta = beta0
        if self.rails is None:
            return args, reward_funcs, reward_processing_classes
        if getattr(args, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={args.multi_objective_aggregation!r} cannot be combined with reward "
                "rails: the rails act on the summed reward; use 'sum_then_normalize' or switch the reward rails off"
            )
        if reward_funcs is None:
            reward_funcs = []
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        n_user = len(funcs)
        funcs.append(RailsAdjustment())
        args = copy.copy(args)
        if args.reward_weights is not None:
            args.reward_weights = [*args.reward_weights, 1.0]
        if reward_processing_classes is not None:
            rpc = list(reward_processing_classes) if isinstance(reward_processing_classes, (list, tuple)) else [
                reward_processing_classes
            ]
            reward_processing_classes = [*rpc, *([None] * (n_user - len(rpc))), None]
        return args, funcs, reward_processing_classes

    def attach(self, trainer) -> None:
        """Bind to a constructed trainer: find the adjustment column, register the KL callback."""
        self.trainer = trainer
        if self.rails is not None:
            for i, func in enumerate(trainer.reward_funcs):
                if isinstance(func, RailsAdjustment):
                    self.adjustment_index = i
        if self.kl_controller is not None:
            trainer.beta = float(self.kl_controller.value)
            trainer.add_callback(_KLStepCallback(self))
        if self.trust_region is not None:
            setting = self.trust_region.setting
            if getattr(trainer, "is_deepspeed_enabled", False):
                raise ValueError(
                    f"{setting} cannot run under DeepSpeed: DeepSpeed steps the optimizer inside backward, so there is "
                    f"no point between the step and the next batch to move the weights back; use DDP or FSDP, or set "
                    f"rails.kl.{self.trust_region.field} to null"
                )
            self.trust_region.check_reference(trainer)
            if self.trust_region.checks_new_batch:
                sources = {"tools": "tools", "environment_factory": "environment_factories",
                           "rollout_func": "rollout_func"}
                repeated = [name for name, attr in sources.items() if getattr(trainer, attr, None)]
                if repeated:
                    raise ValueError(
                        f"rails.kl.pull_back_on='new_batch' draws a rollout batch again after a pull-back, which would "
                        f"repeat the side effects of this trainer's {' and '.join(repeated)}; set "
                        f"rails.kl.pull_back_on to 'trained_batch'"
                    )
            trainer.add_callback(_KLTrustRegionCallback(self))

    # ------------------------------------------------------------------ rewards
    def reward_batch(self, trainer, raw_rewards, completion_ids_list, mode: str):
        """GRPO's global rewards (B,) + this process's completion ids -> a :class:`RewardBatch` over all processes."""
        import torch

        from ..rails.base import RewardBatch

        device = raw_rewards.device
        eos_and_pad = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}
        lengths = torch.tensor([len(ids) for ids in completion_ids_list], dtype=torch.long, device=device)
        truncated = torch.tensor(
            [len(ids) == 0 or int(ids[-1]) not in eos_and_pad for ids in completion_ids_list], device=device
        )
        lengths = trainer.accelerator.gather(lengths)
        truncated = trainer.accelerator.gather(truncated)
        num_generations = trainer.num_generations if mode == "train" else trainer.num_generations_eval
        group_ids = torch.arange(raw_rewards.numel(), device=device) // num_generations
        return RewardBatch(
            rewards=raw_rewards.float().cpu(),
            lengths=lengths.cpu(),
            truncated=truncated.bool().cpu(),
            group_ids=group_ids.cpu(),
            max_completion_length=trainer.max_completion_length,
        )

    def apply(self, trainer, rewards_per_func, completion_ids_list):
        """Rail GRPO's gathered ``rewards_per_func`` (B, K); returns the (B, K) tensor GRPO normalizes next.

        Rows whose railed reward is non-finite become all-NaN (GRPO gives them a zero advantage); non-finite
        per-function entries are treated as missing (NaN). In eval mode the rails run on a copy of their state, so
        evaluation never moves a running statistic.
        """
        import torch

        if self.rails is None:
            return rewards_per_func
        mode = "train" if trainer.model.training else "eval"
        idx = self.adjustment_index
        device = rewards_per_func.device
        weights = trainer.reward_weights.to(device)
        user = [i for i in range(rewards_per_func.shape[1]) if i != idx]
        values = rewards_per_func[:, user] * weights[user].unsqueeze(0)
        raw = values.nansum(dim=1)
        raw[torch.isnan(rewards_per_func[:, user]).all(dim=1)] = torch.nan

        batch = self.reward_batch(trainer, raw, completion_ids_list, mode)
        saved = self.rails.state_dict() if mode == "eval" else None
        railed, metrics = self.rails(batch)
        if saved is not None:
            self.rails.load_state_dict(saved)
        railed = railed.to(device=device, dtype=rewards_per_func.dtype)

        out = rewards_per_func.clone()
        out[:, user] = torch.where(torch.isfinite(out[:, user]), out[:, user], torch.nan)
        drop = ~torch.isfinite(railed)
        out[drop] = torch.nan
        base = (out[:, user] * weights[user].unsqueeze(0)).nansum(dim=1)
        out[:, idx] = torch.where(drop, torch.nan, (railed - base) / weights[idx])

        self.last_batch, self.last_raw_rewards, self.last_rewards = batch, raw.detach(), railed.detach()
        store = trainer._metrics[mode]
        for name, value in metrics.items():
            store[name].append(float(value))
        return out

    # ------------------------------------------------------------------ KL
    def observe_kl(self, trainer) -> None:
        """Collect GRPO's newest ``kl`` value (call after each ``training_step``)."""
        values = trainer._metrics["train"].get("kl")
        if values:
            self._kl_values.append(float(values[-1]))

    def step_kl(self) -> None:
        """Once per optimizer step: log ``beta``, feed the mean KL of the step to the controller, set the new beta."""
        if self.kl_controller is None or self.trainer is None:
            return
        trainer = self.trainer
        trainer._metrics["train"]["beta"].append(float(trainer.beta))
        finite = [v for v in self._kl_values if math.isfinite(v)]
        self._kl_values.clear()
        if not finite or self.kl_before_update:  # then the controller is fed in update_kl_from_batch
            return
        args = trainer.args
        n_steps = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.kl_controller.update(sum(finite) / len(finite), n_steps)
        trainer.beta = float(self.kl_controller.value)

    def update_kl_from_batch(self, trainer, output: dict, logps=None) -> None:
        """``rails.kl.measure_before_update``: feed the controller the KL of a new GRPO batch (the output of
        ``_generate_and_score_completions``) before any update on it, and set ``trainer.beta`` for those updates.

        The KL is GRPO's own: k3 of the current policy against the reference, averaged over the completion tokens of
        all processes, i.e. what the first update on this batch will log as ``kl``. The policy's log-probabilities
        are ``logps`` when given (measured already, on the same weights), else GRPO's ``old_per_token_logps`` when it
        computed them, else one forward without gradient.
        """
        from ..rails.kl import FixedKLController, kl_per_token

        if self.kl_controller is None or output.get("ref_per_token_logps") is None:
            return
        if isinstance(self.kl_controller, FixedKLController):  # nothing to move: spare the forward
            return
        import torch

        mask = kl_mask(output)
        if self.kl_exact:
            kl = exact_kl(trainer, output) * mask.to(torch.float32)
        else:
            if logps is None:
                logps = output.get("old_per_token_logps")
            if logps is None:
                logps = policy_logps(trainer, output, "measure_before_update")
            kl = kl_per_token(logps.float(), output["ref_per_token_logps"].float(), "k3", mask)
        totals = torch.stack([kl.sum(), mask.sum().to(kl.dtype), torch.tensor(float(len(mask)), device=kl.device)])
        kl_sum, n_tokens, n_samples = trainer.accelerator.reduce(totals, reduction="sum").tolist()
        if n_tokens > 0:
            self.kl_controller.update(kl_sum / n_tokens, int(n_samples))
            trainer.beta = float(self.kl_controller.value)

    def set_beta(self, value: float) -> None:
        """Set the KL coefficient everywhere it lives (trainer and controller), e.g. for ``raise_kl``."""
        value = float(value)
        self.trainer.beta = value
        if self.kl_controller is not None:
            self.kl_controller.set_value(value)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "rails": self.rails.state_dict() if self.rails is not None else None,
            "kl": self.kl_controller.state_dict() if self.kl_controller is not None else None,
            "beta": float(self.trainer.beta) if self.trainer is not None and hasattr(self.trainer, "beta") else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.rails is not None and state.get("rails") is not None:
            self.rails.load_state_dict(state["rails"])
        if self.kl_controller is not None and state.get("kl") is not None:
            self.kl_controller.load_state_dict(state["kl"])
        if self.trainer is not None and state.get("beta") is not None:
            self.trainer.beta = float(state["beta"])

    def save(self, directory: str) -> None:
        """Write the rail state into a checkpoint directory (atomically)."""
        _atomic_torch_save(self.state_dict(), os.path.join(directory, RAILS_STATE_FILE))

    def load(self, directory: str) -> bool:
        """Load the rail state from a checkpoint directory; False when the checkpoint has none."""
        import torch

        path = os.path.join(directory, RAILS_STATE_FILE)
        if not os.path.exists(path):
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return True


# ---------------------------------------------------------------------- KL of GRPO batches
def kl_mask(batch: dict):
    """`(B, T)` the completion tokens of a GRPO batch that count towards its KL (tool-call output tokens excluded,
    as in GRPO's own loss)."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def _require_text_only(batch: dict, setting: str) -> None:
    extra = sorted(k for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
                   if batch.get(k) is not None)
    if extra:
        raise ValueError(
            f"rails.kl.{setting} measures the KL of text-only batches, but this batch has {extra}; switch "
            f"rails.kl.{setting} off for a vision-language model"
        )


def policy_logps(trainer, batch: dict, setting: str):
    """`(B, T)` log-probabilities of a GRPO batch's completion tokens under the current policy: one forward without
    gradient through GRPO's own `_get_per_token_logps_and_entropies` (chunked by `per_device_train_batch_size`).
    Text-only: a batch with image inputs raises a ValueError naming `rails.kl.<setting>`."""
    import torch

    from trl.models.utils import disable_gradient_checkpointing

    _require_text_only(batch, setting)
    completion_ids = batch["completion_ids"]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, completion_ids.shape[1],
            batch_size=trainer.args.per_device_train_batch_size,
        )
    return logps


def exact_kl(trainer, batch: dict):
    """`(B, T)` exact KL of the current policy to the reference at each completion position of a GRPO batch
    (:func:`trl_safeppo.rails.kl.kl_exact`; 0 is not forced off the mask, the caller masks). Forwards without
    gradient, `per_device_train_batch_size` rows at a time, keeping only the completion positions' logits
    (`logits_to_keep`), divided by the sampling temperature as GRPO does. The reference is `trainer.ref_model`, or,
    for a PEFT policy, the policy with its adapter switched off as GRPO does (TRL's `use_adapter`). Text-only."""
    import torch

    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    from ..rails.kl import kl_exact

    _require_text_only(batch, "measure_exact")
    completion_ids = batch["completion_ids"]
    n = completion_ids.shape[1]
    input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)

    def logits(model, rows):
        out = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], logits_to_keep=n + 1)
        return out.logits[:, :-1] / trainer.temperature  # the last position predicts past the completion

    chunk = trainer.args.per_device_train_batch_size
    parts = []
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        for start in range(0, len(input_ids), chunk):
            rows = slice(start, start + chunk)
            policy = logits(trainer.model, rows)
            if trainer.ref_model is not None:
                ref = logits(trainer.ref_model, rows)
            else:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref = logits(trainer.model, rows)
            parts.append(kl_exact(policy, ref))
    return torch.cat(parts)


class KLTrustRegion:
    """``rails.kl.max_kl`` and ``rails.kl.pull_back_above``: limits on the KL to the reference, applied around every
    optimizer step.

    Before the optimizer step (``before_step``) it measures the policy's log-probabilities on the micro-batches the
    step trains on (``batches``, collected by :meth:`SafeRailsMixin._prepare_inputs`) and, with ``max_kl``, copies
    the trainable parameters. After it (``after_step``):

    1. with ``max_kl``, :func:`trl_safeppo.rails.kl.kl_line_search`: the KL of those batches at
       ``theta_old + s * (theta_new - theta_old)``, s = 1, 1/2, ...; the parameters are left at the accepted s.
    2. with ``pull_back_above``, :func:`trl_safeppo.rails.kl.kl_pull_back_search`: if the KL is still above
       ``pull_back_above``, the parameters move to ``theta_ref + alpha * (theta - theta_ref)``, the largest alpha
       (bisection) whose KL is at most ``pull_back_to``. ``theta_ref`` is ``trainer.ref_model``'s parameter of the
       same name.

    Every KL is estimated as GRPO's k3 with the importance weight ``pi_theta / pi_old`` per token (the tokens were
    sampled before the update; GRPO's ``use_bias_correction_kl`` uses the same weight), summed over all processes,
    so every rank picks the same s and alpha. The optimizer's moments keep the full step's gradient; only the
    parameters move.

    Cost: ``max_kl``: one copy of the trainable parameters while the step runs (held as ``theta_old - theta_new``,
    so each trial scale is one in-place add) and ``2 + backtracks`` forwards without gradient. ``pull_back_above``
    alone: 2 forwards a step, ``2 + pull_back_iterations`` and one copy of the trainable parameters on a step that
    pulls back. Logs, per optimizer step, ``kl/trust_region/{scale,kl_before,kl_after,backtracks}`` (with
    ``max_kl``) and ``kl/pull_back/{alpha,kl_after}`` (with ``pull_back_above``; docs/metrics.md).
    """

    def __init__(self, max_kl: float | None, max_backtracks: int, *, pull_back_above: float | None = None,
                 pull_back_to: float | None = None, pull_back_iterations: int = 6, pull_back_on: str = "trained_batch",
                 pull_back_redraws: int = 2):
        self.max_kl = None if max_kl is None else float(max_kl)
        self.max_backtracks = int(max_backtracks)
        self.pull_back_above = None if pull_back_above is None else float(pull_back_above)
        self.pull_back_to = self.pull_back_above if pull_back_to is None else float(pull_back_to)
        self.pull_back_iterations = int(pull_back_iterations)
        self.pull_back_on = pull_back_on
        self.pull_back_redraws = int(pull_back_redraws)
        self.batches: list[dict] = []  # this process's micro-batches of the current optimizer step
        self._params: list | None = None
        self._diff: list | None = None  # theta_old (before the step), then theta_old - theta_new
        self._old_logps: list | None = None

    @property
    def checks_new_batch(self) -> bool:
        """The pull-back checks each new rollout batch (:meth:`check_new_batch`) instead of each update."""
        return self.pull_back_above is not None and self.pull_back_on == "new_batch"

    @property
    def field(self) -> str:
        """The `rails.kl` field that switched this on (`max_kl` when both are on), for error messages."""
        return "max_kl" if self.max_kl is not None else "pull_back_above"

    @property
    def setting(self) -> str:
        """`rails.kl.<field>=<value>`, for error messages."""
        return f"rails.kl.{self.field}={getattr(self, self.field)!r}"

    def check_reference(self, trainer) -> None:
        """The pull-back moves the weights towards ``trainer.ref_model``'s: refuse, naming the setting, a trainer
        whose reference is not a separate model with the same trainable parameters (PEFT uses the policy with its
        adapter switched off). `sync_ref_model` is refused by SafeGRPOConfig."""
        if self.pull_back_above is None:
            return
        setting = f"rails.kl.pull_back_above={self.pull_back_above!r}"
        if trainer.ref_model is None:
            raise ValueError(
                f"{setting} moves the weights towards the reference model's, but this trainer has no separate "
                "reference model (a PEFT policy is its own reference with the adapter off); train without PEFT, or "
                "set rails.kl.pull_back_above to null"
            )
        reference = dict(_unwrap(trainer, trainer.ref_model).named_parameters())
        missing = [n for n, p in _unwrap(trainer, trainer.model).named_parameters()
                   if p.requires_grad and (n not in reference or reference[n].shape != p.shape)]
        if missing:
            raise ValueError(
                f"{setting}: the reference model has no parameter of the same name and shape for {missing[:3]} "
                "(it must be the policy's architecture with every trainable parameter); set "
                "rails.kl.pull_back_above to null"
            )

    def before_step(self, trainer) -> None:
        import torch

        if self.max_kl is None and self.checks_new_batch:  # nothing to do around the optimizer step
            self.batches.clear()
            return
        batches = [b for b in self.batches if b.get("ref_per_token_logps") is not None]
        if not batches:  # no reference log-probs (beta == 0): nothing to measure against
            self.batches.clear()
            return
        self.batches = batches
        self._params = [p for p in trainer.model.parameters() if p.requires_grad]
        if self.max_kl is not None:
            with torch.no_grad():
                self._diff = [p.detach().clone() for p in self._params]
        self._old_logps = [policy_logps(trainer, b, self.field).float() for b in batches]

    def _kl(self, trainer, logps_list, prefix_weighted: bool = False) -> float:
        """Importance-weighted k3 mean over the completion tokens of all processes: each token weighted by its own
        probability ratio (:func:`~trl_safeppo.rails.kl.kl_per_token_after_update`), or with ``prefix_weighted`` by
        its prefix's too (:func:`~trl_safeppo.rails.kl.kl_sums_after_update`)."""
        import torch

        from ..rails.kl import kl_per_token_after_update, kl_sums_after_update

        device = logps_list[0].device
        totals = torch.zeros(2, dtype=torch.float32, device=device)
        for batch, logps, old in zip(self.batches, logps_list, self._old_logps, strict=True):
            mask = kl_mask(batch)
            ref = batch["ref_per_token_logps"].float()
            if prefix_weighted:
                totals += torch.stack(kl_sums_after_update(logps, old, ref, mask))
            else:
                kl = kl_per_token_after_update(logps, old, ref, mask)
                totals += torch.stack([kl.sum(), mask.sum().float()])
        kl_sum, n_tokens = trainer.accelerator.reduce(totals, reduction="sum").tolist()
        return kl_sum / n_tokens if n_tokens > 0 else float("nan")

    def _kl_now(self, trainer, prefix_weighted: bool = False) -> float:
        return self._kl(trainer, [policy_logps(trainer, b, self.field).float() for b in self.batches], prefix_weighted)

    def after_step(self, trainer) -> None:
        if self._params is None:
            return
        metrics = trainer._metrics["train"]
        kl_now = None
        if self.max_kl is not None:
            scale, kl_now, evaluations, kl_before = self._line_search(trainer)
            metrics["kl/trust_region/scale"].append(scale)
            metrics["kl/trust_region/kl_before"].append(kl_before)
            metrics["kl/trust_region/kl_after"].append(kl_now)
            metrics["kl/trust_region/backtracks"].append(float(evaluations - 1 + (scale == 0.0)))
        if self.pull_back_above is not None and not self.checks_new_batch:
            alpha, kl_after = self._pull_back(trainer, self._kl_now(trainer) if kl_now is None else kl_now)
            metrics["kl/pull_back/alpha"].append(alpha)
            metrics["kl/pull_back/kl_after"].append(kl_after)
        self.batches, self._params, self._diff, self._old_logps = [], None, None, None

    def _line_search(self, trainer) -> tuple[float, float, int, float]:
        import torch

        from ..rails.kl import kl_line_search

        params, diff = self._params, self._diff
        position = 1.0
        with torch.no_grad():
            for d, p in zip(diff, params, strict=True):
                d.sub_(p.detach())  # theta_old - theta_new

            def kl_at(scale: float) -> float:
                nonlocal position
                if scale != position:  # theta_s = theta_position + (position - s) * (theta_old - theta_new)
                    for d, p in zip(diff, params, strict=True):
                        p.add_(d, alpha=position - scale)
                    position = scale
                return self._kl_now(trainer)

            kl_before = self._kl(trainer, self._old_logps)
            scale, kl_after, evaluations = kl_line_search(kl_at, self.max_kl, kl_before, self.max_backtracks)
            if scale != position:
                for d, p in zip(diff, params, strict=True):
                    p.add_(d, alpha=position - scale)
        return scale, kl_after, evaluations, kl_before

    def _pull_back(self, trainer, kl_now: float, prefix_weighted: bool = False) -> tuple[float, float]:
        import torch

        from ..rails.kl import kl_pull_back_search

        if math.isfinite(kl_now) and kl_now <= self.pull_back_above:  # the search's own check, made here so that
            return 1.0, kl_now  # a step that needs no pull-back builds no copy of the weights
        reference = dict(_unwrap(trainer, trainer.ref_model).named_parameters())
        names = {id(p): n for n, p in _unwrap(trainer, trainer.model).named_parameters()}
        params = self._params
        position = 1.0
        with torch.no_grad():
            # theta - theta_ref: theta_alpha = theta_position + (alpha - position) * (theta - theta_ref)
            away = [p.detach() - reference[names[id(p)]].detach().to(p) for p in params]

            def move_to(alpha: float) -> None:
                nonlocal position
                if alpha != position:
                    for d, p in zip(away, params, strict=True):
                        p.add_(d, alpha=alpha - position)
                    position = alpha

            def kl_at(alpha: float) -> float:
                move_to(alpha)
                return self._kl_now(trainer, prefix_weighted)

            alpha, kl_after, _ = kl_pull_back_search(
                kl_at, self.pull_back_above, self.pull_back_to, kl_now, self.pull_back_iterations
            )
            move_to(alpha)
        return alpha, kl_after

    def check_new_batch(self, trainer, draw, rails=None):
        """``rails.kl.pull_back_on="new_batch"``: draw a rollout batch (``draw()``, GRPO's
        ``_generate_and_score_completions``) and check its KL before any update on it.

        The KL is k3 on the policy's own samples, averaged over the completion tokens of all processes (what GRPO's
        first update on the batch logs as ``kl``). Above ``pull_back_above``, the weights are pulled back as after an
        update (:meth:`_pull_back`), but with each token weighted by its prefix's probability ratio too
        (:func:`~trl_safeppo.rails.kl.kl_sums_after_update`: a pull-back moves the policy far, and the completions
        it then draws are shorter than the checked ones); everything the draw logged or accumulated is put back as it
        was (:class:`_DrawState`, with ``rails``' state), and the batch is drawn again from the pulled-back policy
        and checked again, at most ``pull_back_redraws`` times (the last draw is trained on whatever its KL).
        Every process decides on the same reduced KL, so all draw again together. Logs
        ``kl/pull_back/{kl_checked,alpha,kl_after,redraws}`` once per rollout batch; ``alpha`` is the product of
        the pull-backs' alphas, the position of the final weights on the line from the reference to those that drew
        the first batch (``theta_ref + a2 * (theta_ref + a1 * (theta - theta_ref) - theta_ref)``).

        Returns ``(output, logps)``: the batch trained on and its ``(B, T)`` policy log-probabilities under the
        weights that drew it.
        """
        saved = _DrawState(trainer, rails)
        kept = self.batches
        kl_checked, alpha, kl_after, redraws = None, 1.0, None, 0
        output = draw()
        try:
            while True:
                logps = output.get("old_per_token_logps")
                logps = policy_logps(trainer, output, "pull_back_above") if logps is None else logps
                self.batches, self._old_logps = [output], [logps.float()]
                kl = self._kl(trainer, self._old_logps)  # importance weight 1: the policy drew these tokens
                kl_checked = kl if kl_checked is None else kl_checked
                if (math.isfinite(kl) and kl <= self.pull_back_above) or redraws == self.pull_back_redraws:
                    kl_after = kl if kl_after is None else kl_after
                    break
                self._params = [p for p in trainer.model.parameters() if p.requires_grad]
                step_alpha, kl_after = self._pull_back(trainer, kl, prefix_weighted=True)
                if step_alpha >= 1.0:  # nothing moved (a non-finite KL the search cannot lower): keep this draw
                    break
                alpha *= step_alpha
                saved.restore(trainer)
                if getattr(trainer, "use_vllm", False):
                    trainer._last_loaded_step = -1  # the weights moved within this step: vLLM must load them again
                output = draw()
                redraws += 1
        finally:
            self.batches, self._params, self._old_logps = kept, None, None
        metrics = trainer._metrics["train"]
        metrics["kl/pull_back/kl_checked"].append(kl_checked)
        metrics["kl/pull_back/alpha"].append(alpha)
        metrics["kl/pull_back/kl_after"].append(kl_after)
        metrics["kl/pull_back/redraws"].append(float(redraws))
        return output, logps


class _DrawState:
    """What one call of GRPO's ``_generate_and_score_completions`` adds to the trainer (metrics, the completions
    table, the pending reward-function logs, the token count) and the reward rails' running state, saved so that a
    discarded draw leaves no trace (:meth:`KLTrustRegion.check_new_batch`)."""

    def __init__(self, trainer, rails=None):
        import copy

        self.metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
        self.logs = copy.deepcopy(trainer._logs)
        self.pending = (copy.deepcopy(trainer._pending_extra_logs), copy.deepcopy(trainer._pending_metrics))
        self.tokens = trainer.state.num_input_tokens_seen
        self.rails, self.rails_state = rails, None if rails is None else rails.state_dict()

    def restore(self, trainer) -> None:
        """Put the trainer back as saved; copies again, so that it can be restored more than once."""
        import copy

        metrics = trainer._metrics["train"]
        metrics.clear()
        metrics.update({k: list(v) for k, v in self.metrics.items()})
        trainer._logs.update(copy.deepcopy(self.logs))
        for live, saved in zip((trainer._pending_extra_logs, trainer._pending_metrics), self.pending, strict=True):
            live.clear()
            live.update(copy.deepcopy(saved))
        trainer.state.num_input_tokens_seen = self.tokens
        if self.rails is not None:
            self.rails.load_state_dict(self.rails_state)


def _unwrap(trainer, model):
    return trainer.accelerator.unwrap_model(model)


class _KLTrustRegionCallback(TrainerCallback):
    """Runs :class:`KLTrustRegion` around every optimizer step."""

    def __init__(self, wiring: RailsWiring):
        self.wiring = wiring

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.wiring.trust_region.before_step(self.wiring.trainer)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.wiring.trust_region.after_step(self.wiring.trainer)
        return control


# ---------------------------------------------------------------------- snapshots (tripwire rollback)
def snapshot_state_dict(model) -> dict:
    """The entries of ``model.state_dict()`` that training can change, copied to CPU: trainable parameters and
    buffers. Frozen parameters (a PEFT base model, frozen layers) cannot change, so a snapshot leaves them out:
    with LoRA it holds the adapters, megabytes instead of the whole base model."""
    changing = {id(p) for p in model.parameters() if p.requires_grad} | {id(b) for b in model.buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) in changing}


def load_snapshot_state_dict(model, state: dict) -> None:
    """Load a :func:`snapshot_state_dict` back; every trainable parameter must be in it (else one ValueError)."""
    result = model.load_state_dict(state, strict=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    own = model.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if id(own[k]) in trainable]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the tripwire snapshot does not match the model: trainable parameters missing {missing[:5]}, unexpected "
            f"keys {list(result.unexpected_keys)[:5]}; it was written for another model or adapter setup -- delete "
            "the tripwire-last-good/ directory of this output_dir and restart"
        )


def save_snapshot(trainer, directory: str) -> str:
    """Save policy weights (those training can change, :func:`snapshot_state_dict`), optimizer state and rail state
    of ``trainer`` to ``directory/snapshot.pt``.

    Works for single-process and DDP training (every rank holds the full weights); the main process writes and the
    others wait. A trainer with more trained state than the policy (PPO's critic) adds it by defining
    ``tripwire_state_dict()`` and ``load_tripwire_state_dict(state)``. Returns the file path.
    """
    path = os.path.join(directory, SNAPSHOT_FILE)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        state = {
            "step": int(trainer.state.global_step),
            "model": snapshot_state_dict(model),
            "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else None,
            "beta": float(getattr(trainer, "beta", math.nan)),
            "wiring": trainer.rails_wiring.state_dict() if getattr(trainer, "rails_wiring", None) else None,
            # hook for trainers with more trained state than the policy (e.g. PPO's critic)
            "extra": trainer.tripwire_state_dict() if hasattr(trainer, "tripwire_state_dict") else None,
        }
        _atomic_torch_save(state, path)
    accelerator.wait_for_everyone()
    return path


def restore_snapshot(trainer, directory: str) -> int:
    """Load a :func:`save_snapshot` file back into ``trainer`` (weights, optimizer, rail state, beta).

    The learning-rate schedule keeps following ``global_step``; GRPO's buffered generations are dropped so the
    next batch is sampled from the restored policy. Returns the step the snapshot was taken at.
    """
    import torch

    state = torch.load(os.path.join(directory, SNAPSHOT_FILE), map_location="cpu", weights_only=False)
    load_snapshot_state_dict(trainer.accelerator.unwrap_model(trainer.model), state["model"])
    if trainer.optimizer is not None and state["optimizer"] is not None:
        current_lrs = [group["lr"] for group in trainer.optimizer.param_groups]
        trainer.optimizer.load_state_dict(state["optimizer"])
        for group, lr in zip(trainer.optimizer.param_groups, current_lrs, strict=True):
            group["lr"] = lr
    wiring = getattr(trainer, "rails_wiring", None)
    if wiring is not None and state.get("wiring") is not None:
        wiring.load_state_dict(state["wiring"])
    elif hasattr(trainer, "beta") and math.isfinite(state.get("beta", math.nan)):
        trainer.beta = state["beta"]
    if state.get("extra") is not None and hasattr(trainer, "load_tripwire_state_dict"):
        trainer.load_tripwire_state_dict(state["extra"])
    if hasattr(trainer, "_buffered_inputs"):
        trainer._buffered_inputs = None
    tr_loss = getattr(trainer, "_tr_loss", None)
    if isinstance(tr_loss, torch.Tensor) and not torch.isfinite(tr_loss).all():
        tr_loss.zero_()
    return int(state["step"])


def scale_learning_rate(trainer, factor: float) -> tuple[float, float]:
    """Multiply the learning rate (optimizer groups and the scheduler's base rates); returns (before, after)."""
    before = trainer.optimizer.param_groups[0]["lr"]
    for group in trainer.optimizer.param_groups:
        group["lr"] *= factor
    scheduler = getattr(trainer, "lr_scheduler", None)
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    return before, trainer.optimizer.param_groups[0]["lr"]


class _KLStepCallback(TrainerCallback):
    """Runs :meth:`RailsWiring.step_kl` at the end of every optimizer step (before logging)."""

    def __init__(self, wiring: RailsWiring):
        self.wiring = wiring

    def on_step_end(self, args, state, control, **kwargs):
        self.wiring.step_kl()
        return control


class SafeRailsMixin:
    """GRPOTrainer overrides that route through ``self.rails_wiring`` (a :class:`RailsWiring`).

    Use as ``class MyTrainer(SafeRailsMixin, GRPOTrainer)``; build the wiring, call
    ``rails_wiring.prepare_init`` before and ``rails_wiring.attach(self)`` after ``super().__init__``.
    """

    rails_wiring: RailsWiring | None = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the reward functions' worker processes end with training, also when it raises
            from ..rewards.timeout import close_workers

            close_workers(getattr(self, "reward_funcs", None) or [])

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        wiring = self.rails_wiring
        if wiring is not None and wiring.trust_region is not None and self.model.training:
            wiring.trust_region.batches.append(inputs)  # the micro-batches of the coming optimizer step
        return inputs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        wiring = self.rails_wiring
        if wiring is None or wiring.rails is None:
            return rewards_per_func
        return wiring.apply(self, rewards_per_func, completion_ids_list)

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.rails_wiring is not None and self.rails_wiring.kl_controller is not None:
            self.rails_wiring.observe_kl(self)
        return loss

    def _save_checkpoint(self, model, trial):
        # Our state goes in first: trainer_state.json, written last by super(), marks the checkpoint complete
        # (pipeline/checkpoints.py), so a kill in between never leaves a "complete" checkpoint without it.
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from .tripwires import save_tripwire_state

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.rails_wiring is not None and self.rails_wiring.active and self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            self.rails_wiring.save(folder)
        save_tripwire_state(self, folder)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.rails_wiring is not None and self.rails_wiring.active and checkpoint is not None:
            self.rails_wiring.load(checkpoint)
        from .tripwires import load_tripwire_state

        load_tripwire_state(self, checkpoint)  # after the rails: the ladder's beta is the one in force
