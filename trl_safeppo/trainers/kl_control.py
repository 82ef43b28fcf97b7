"""Where the KL coefficient changes: the one owner of the KL controller, and the KL measurements that feed it.

:class:`KLControl` holds the controller (``rails.kl``: fixed or adaptive, :mod:`trl_safeppo.rails.kl`) and is the
only code that writes ``trainer.beta``, which GRPO reads in its loss (and PPO in its reward). It is fed in one of
three ways, chosen once from the config:

- ``"per_step"`` (GRPO, default): after every optimizer step, the mean of the ``kl`` values GRPO logged during it
  (:class:`KLStepCallback`), so an update's beta comes from the previous update's KL;
- ``"per_batch"`` (GRPO, ``rails.kl.measure_before_update``): the k3 KL of every new rollout batch before any
  update on it (:meth:`KLControl.update_from_batch`);
- ``"per_rollout"`` (PPO): once per rollout, the mean per-sequence KL of the rollout (:meth:`KLControl.update`).

Its state is checkpointed once (:meth:`KLControl.state_dict`); ``beta`` is derived from it, never stored apart.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

FEEDS = ("per_step", "per_batch", "per_rollout")


# ---------------------------------------------------------------------- KL of GRPO batches
def kl_mask(batch: dict):
    """`(B, T)` the completion tokens of a GRPO batch that count towards its KL (tool-call output tokens excluded,
    as in GRPO's own loss)."""
    mask = batch["completion_mask"]
    return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]


def policy_logps(trainer, batch: dict):
    """`(B, T)` log-probabilities of a GRPO batch's completion tokens under the current policy: one forward without
    gradient through GRPO's own `_get_per_token_logps_and_entropies` (chunked by `per_device_train_batch_size`).
    Text-only: a batch with image inputs raises a ValueError naming `rails.kl.measure_before_update`."""
    import torch

    from ..models import activation_checkpointing_off

    images = sorted(k for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
                    if batch.get(k) is not None)
    if images:
        raise ValueError(
            f"rails.kl.measure_before_update measures the KL of text-only batches, but this batch has {images}; "
            "switch rails.kl.measure_before_update off for a vision-language model"
        )
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad(), activation_checkpointing_off(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, batch["completion_ids"].shape[1],
            batch_size=trainer.args.per_device_train_batch_size,
        )
    return logps


# ---------------------------------------------------------------------- the controller's owner
class KLControl:
    """The KL controller of one trainer and the code that moves ``trainer.beta`` with it.

    Args:
        controller: an ``AdaptiveKLController`` / ``FixedKLController`` (``None``: beta stays as configured and
            nothing here acts).
        feed: how the controller is fed (module docstring): ``"per_step"``, ``"per_batch"`` or ``"per_rollout"``.
    """

    def __init__(self, controller=None, *, feed: str = "per_step", before_update: bool = False):
        if feed not in FEEDS:
            raise ValueError(f"feed={feed!r}; use one of {FEEDS}")
        self.controller = controller
        self.feed = feed
        # rails.kl.measure_before_update: an update's beta comes from the KL of the batch it trains on ("per_batch"
        # for GRPO; for PPO, the rollout's KL sets the beta of its own penalty)
        self.before_update = bool(before_update) or feed == "per_batch"
        self.trainer = None
        self._step_kls: list[float] = []  # "per_step": GRPO's `kl` values of the current optimizer step

    @classmethod
    def build(cls, config, controller, *, ppo: bool = False) -> KLControl:
        """For a trainer: ``config`` the parsed ``RailsConfig`` (or ``None``), ``controller`` the one controller (the
        reward rails' when rails are on). A fixed controller at 0 means no KL term (and no reference model), so none
        is kept."""
        from ..rails.kl import FixedKLController

        if isinstance(controller, FixedKLController) and controller.value == 0:
            controller = None
        before = config is not None and config.kl.measure_before_update
        feed = "per_rollout" if ppo else ("per_batch" if before else "per_step")
        return cls(controller, feed=feed, before_update=before)

    @property
    def value(self) -> float | None:
        return None if self.controller is None else float(self.controller.value)

    def start(self, trainer) -> None:
        """Bind to a constructed trainer: ``trainer.beta`` starts at the controller's value."""
        self.trainer = trainer
        if self.controller is None:
            return
        trainer.beta = self.value
        if self.feed != "per_rollout":  # GRPO logs beta once per optimizer step (PPO once per rollout)
            trainer.add_callback(KLStepCallback(self))

    def update(self, kl: float, n_samples: int) -> None:
        """Feed one KL measurement over ``n_samples`` samples; beta follows the controller."""
        if self.controller is None or self.trainer is None:
            return
        self.controller.update(kl, n_samples)
        self.trainer.beta = self.value

    def set_beta(self, value: float) -> None:
        """Set the KL coefficient from outside (the ``raise_kl`` and ``rollback`` tripwire actions)."""
        if self.controller is not None:
            self.controller.set_value(float(value))
        self.trainer.beta = float(value)

    # --- "per_step": GRPO's logged `kl`, averaged over an optimizer step
    def observe_step(self, trainer) -> None:
        """After each ``training_step``: keep GRPO's newest ``kl`` value."""
        values = trainer._metrics["train"].get("kl")
        if self.feed == "per_step" and self.controller is not None and values:
            self._step_kls.append(float(values[-1]))

    def end_step(self) -> None:
        """At the end of every optimizer step (GRPO): log ``beta``; with ``"per_step"``, feed the step's mean KL."""
        trainer = self.trainer
        trainer._metrics["train"]["beta"].append(float(trainer.beta))
        finite = [v for v in self._step_kls if math.isfinite(v)]
        self._step_kls.clear()
        if finite and self.feed == "per_step":
            args = trainer.args
            self.update(sum(finite) / len(finite),
                        args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)

    # --- "per_batch": the KL of each new GRPO batch, before any update on it
    def update_from_batch(self, trainer, output: dict) -> None:
        """Feed the controller the KL of a new GRPO batch (the output of ``_generate_and_score_completions``) before
        any update on it, and set ``trainer.beta`` for those updates.

        The KL is GRPO's own: k3 of the current policy against the reference, averaged over the completion tokens of
        all processes, i.e. what the first update on this batch will log as ``kl``.
        The policy's log-probabilities are GRPO's ``old_per_token_logps`` when it computed them, else one forward
        without gradient.
        """
        import torch

        from ..rails.kl import FixedKLController, kl_per_token

        if self.feed != "per_batch" or self.controller is None or output.get("ref_per_token_logps") is None:
            return
        if isinstance(self.controller, FixedKLController):  # nothing to move: spare the forward
            return
        mask = kl_mask(output)
        logps = output.get("old_per_token_logps")
        if logps is None:
            logps = policy_logps(trainer, output)
        kl = kl_per_token(logps.float(), output["ref_per_token_logps"].float(), "k3", mask)
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

    def sync(self) -> None:
        """``trainer.beta`` <- the controller's value (after its state was loaded)."""
        if self.controller is not None and self.trainer is not None:
            self.trainer.beta = self.value


class KLStepCallback(TrainerCallback):
    """GRPO: runs :meth:`KLControl.end_step` at the end of every optimizer step (before logging)."""

    def __init__(self, kl: KLControl):
        self.kl = kl

    def on_step_end(self, args, state, control, **kwargs):
        self.kl.end_step()
        return control
