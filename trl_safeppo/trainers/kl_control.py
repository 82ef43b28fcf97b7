"""Where the KL coefficient changes: :class:`KLControl`, the one owner of the KL controller (``rails.kl``) and the
only code that writes ``trainer.beta`` (read by GRPO's loss and PPO's reward), and the KL measurements that feed it,
one way chosen once from the config:

- ``"per_step"`` (GRPO, default): after each optimizer step, the mean ``kl`` GRPO logged in it
  (:meth:`KLControl.on_step_end`), so an update's beta comes from the previous update's KL;
- ``"per_batch"`` (GRPO, ``rails.kl.measure_before_update``): the k3 KL of each new rollout batch, before any update
  on it (:meth:`KLControl.update_from_batch`);
- ``"per_rollout"`` (PPO): once per rollout, its mean per-sequence KL (:meth:`KLControl.update`).

Its state is checkpointed once (:meth:`KLControl.state_dict`); ``beta`` is derived from it, never stored apart.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


# ---------------------------------------------------------------------- KL of GRPO batches
def policy_logps(trainer, batch: dict):
    """`(B, T)` log-probabilities of a GRPO batch's completion tokens under the current policy: GRPO's
    `old_per_token_logps` when it computed them (it skips them when a batch serves exactly one optimizer step), else
    one forward without gradient through GRPO's own `_get_per_token_logps_and_entropies`, chunked by the mode's
    per-device batch size. Text-only: a batch with image inputs raises a ValueError."""
    import torch

    from ..models import activation_checkpointing_off

    if batch.get("old_per_token_logps") is not None:
        return batch["old_per_token_logps"]
    images = sorted(k for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
                    if batch.get(k) is not None)
    if images:
        raise ValueError(
            f"rails.kl.measure_before_update measures the KL of text-only batches, but this batch has {images}; "
            "switch rails.kl.measure_before_update off for a vision-language model"
        )
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    args = trainer.args
    batch_size = args.per_device_train_batch_size if trainer.model.training else args.per_device_eval_batch_size
    with torch.no_grad(), activation_checkpointing_off(trainer.model, args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, batch["completion_ids"].shape[1], batch_size=batch_size)
    return logps


# ---------------------------------------------------------------------- the controller's owner
class KLControl(TrainerCallback):
    """The KL controller of one trainer (the reward rails' when rails are on; ``None`` or a fixed one at 0, i.e. no KL
    term: beta stays as configured and nothing here acts) and the code that moves ``trainer.beta`` with it. ``config``
    is the parsed ``RailsConfig`` or ``None``. As a GRPO callback it logs ``beta`` after every optimizer step."""

    def __init__(self, controller=None, config=None, *, ppo: bool = False):
        from ..rails.kl import FixedKLController

        self.controller = None if isinstance(controller, FixedKLController) and controller.value == 0 else controller
        # rails.kl.measure_before_update: an update's beta comes from the KL of the batch it trains on ("per_batch"
        # for GRPO; for PPO, the rollout's KL sets the beta of its own penalty)
        self.before_update = config is not None and config.kl.measure_before_update
        self.feed = "per_rollout" if ppo else "per_batch" if self.before_update else "per_step"
        self.trainer = None
        self._kl_seen = 0  # GRPO's `kl` values logged before the current optimizer step

    @property
    def value(self) -> float | None:
        return None if self.controller is None else float(self.controller.value)

    def start(self, trainer) -> None:
        """Bind to a constructed trainer: ``trainer.beta`` starts at the controller's value."""
        self.trainer = trainer
        self.sync()
        if self.controller is not None and self.feed != "per_rollout":  # PPO logs beta once per rollout
            trainer.add_callback(self)

    def sync(self) -> None:
        """``trainer.beta`` <- the controller's value."""
        if self.controller is not None and self.trainer is not None:
            self.trainer.beta = self.value

    def update(self, kl: float, n_samples: int) -> None:
        """Feed one KL measurement over ``n_samples`` samples; beta follows the controller."""
        if self.controller is not None and self.trainer is not None:
            self.controller.update(kl, n_samples)
            self.sync()

    def set_beta(self, value: float) -> None:
        """Set the KL coefficient from outside (the ``raise_kl`` and ``rollback`` tripwire actions)."""
        if self.controller is not None:
            self.controller.set_value(float(value))
        self.trainer.beta = float(value)

    # --- GRPO, every optimizer step: log `beta`; "per_step": feed the mean of the `kl` values GRPO logged in the step
    def on_step_begin(self, args, state, control, **kwargs):
        self._kl_seen = len(self.trainer._metrics["train"].get("kl", ()))
        return control

    def on_step_end(self, args, state, control, **kwargs):
        store = self.trainer._metrics["train"]  # GRPO's log clears it, after on_step_end only
        store["beta"].append(float(self.trainer.beta))
        finite = [float(v) for v in store.get("kl", [])[self._kl_seen:] if math.isfinite(v)]
        if finite and self.feed == "per_step":
            self.update(sum(finite) / len(finite),
                        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        return control

    # --- "per_batch": the KL of each new GRPO batch, before any update on it
    def update_from_batch(self, trainer, output: dict) -> None:
        """Feed the controller the KL of a new GRPO batch (the output of ``_generate_and_score_completions``) before
        any update on it: GRPO's own k3 of the current policy against the reference, averaged over the completion
        tokens of all processes (tool-call output excluded, as in GRPO's loss), i.e. what the first update on it will
        log as ``kl``. The policy's log-probabilities are GRPO's ``old_per_token_logps`` when it computed them, else
        one forward without gradient."""
        import torch

        from ..rails.kl import FixedKLController, kl_per_token

        if (self.feed != "per_batch" or output.get("ref_per_token_logps") is None or self.controller is None
                or isinstance(self.controller, FixedKLController)):  # a fixed beta does not move: spare the forward
            return
        mask = output["completion_mask"] * (1 if output.get("tool_mask") is None else output["tool_mask"])
        kl = kl_per_token(policy_logps(trainer, output).float(), output["ref_per_token_logps"].float(), "k3", mask)
        totals = torch.stack([kl.sum(), mask.sum().to(kl.dtype), torch.tensor(float(len(mask)), device=kl.device)])
        kl_sum, n_tokens, n_samples = trainer.accelerator.reduce(totals, reduction="sum").tolist()
        if n_tokens > 0:
            self.update(kl_sum / n_tokens, int(n_samples))

    # --- checkpoint
    def state_dict(self) -> dict | None:
        return None if self.controller is None else self.controller.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.controller is not None and state is not None:
            self.controller.load_state_dict(state)
            self.sync()
