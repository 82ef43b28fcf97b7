"""The trust region on the KL to the reference: ``rails.kl.max_kl`` (scale an update back) and
``rails.kl.pull_back_above`` (pull the weights towards the reference), both around every optimizer step.

:class:`KLTrustRegion` holds the settings and the per-step scratch (the micro-batches of the step, the weights before
it); :class:`KLTrustRegionCallback` runs it through the Trainer's public optimizer-step callbacks. The micro-batches
are collected by :meth:`~trl_safeppo.trainers.rails_mixin.SafeRailsMixin._prepare_inputs`. The searches themselves
are pure functions of :mod:`trl_safeppo.rails.kl` (``kl_line_search``, ``kl_pull_back_search``).
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from .kl_control import kl_mask, policy_logps


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
                 pull_back_to: float | None = None, pull_back_iterations: int = 6):
        self.max_kl = None if max_kl is None else float(max_kl)
        self.max_backtracks = int(max_backtracks)
        self.pull_back_above = None if pull_back_above is None else float(pull_back_above)
        self.pull_back_to = self.pull_back_above if pull_back_to is None else float(pull_back_to)
        self.pull_back_iterations = int(pull_back_iterations)
        self.batches: list[dict] = []  # this process's micro-batches of the current optimizer step
        self._params: list | None = None
        self._diff: list | None = None  # theta_old (before the step), then theta_old - theta_new
        self._old_logps: list | None = None

    @classmethod
    def from_config(cls, kl) -> KLTrustRegion | None:
        """From ``rails.kl`` (a ``KLConfig``); ``None`` when neither ``max_kl`` nor ``pull_back_above`` is set. The
        config checked that the KL coefficient is above 0 (else GRPO loads no reference model)."""
        if kl.max_kl is None and kl.pull_back_above is None:
            return None
        return cls(kl.max_kl, kl.max_kl_backtracks, pull_back_above=kl.pull_back_above, pull_back_to=kl.pull_back_to,
                   pull_back_iterations=kl.pull_back_iterations)

    def start(self, trainer) -> None:
        """Check the trainer can run the trust region, and hook it around every optimizer step."""
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                f"{self.setting} cannot run under DeepSpeed: DeepSpeed steps the optimizer inside backward, so there "
                f"is no point between the step and the next batch to move the weights back; use DDP or FSDP, or set "
                f"rails.kl.{self.field} to null"
            )
        self.check_reference(trainer)
        trainer.add_callback(KLTrustRegionCallback(self, trainer))

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

    def _kl(self, trainer, logps_list) -> float:
        """Importance-weighted k3 mean over the completion tokens of all processes: each token weighted by its own
        probability ratio (:func:`~trl_safeppo.rails.kl.kl_per_token_after_update`)."""
        import torch

        from ..rails.kl import kl_per_token_after_update

        device = logps_list[0].device
        totals = torch.zeros(2, dtype=torch.float32, device=device)
        for batch, logps, old in zip(self.batches, logps_list, self._old_logps, strict=True):
            mask = kl_mask(batch)
            ref = batch["ref_per_token_logps"].float()
            kl = kl_per_token_after_update(logps, old, ref, mask)
            totals += torch.stack([kl.sum(), mask.sum().float()])
        kl_sum, n_tokens = trainer.accelerator.reduce(totals, reduction="sum").tolist()
        return kl_sum / n_tokens if n_tokens > 0 else float("nan")

    def _kl_now(self, trainer) -> float:
        return self._kl(trainer, [policy_logps(trainer, b, self.field).float() for b in self.batches])

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
        if self.pull_back_above is not None:
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

    def _pull_back(self, trainer, kl_now: float) -> tuple[float, float]:
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
                return self._kl_now(trainer)

            alpha, kl_after, _ = kl_pull_back_search(
                kl_at, self.pull_back_above, self.pull_back_to, kl_now, self.pull_back_iterations
            )
            move_to(alpha)
        return alpha, kl_after


def _unwrap(trainer, model):
    return trainer.accelerator.unwrap_model(model)


class KLTrustRegionCallback(TrainerCallback):
    """Runs :class:`KLTrustRegion` around every optimizer step."""

    def __init__(self, region: KLTrustRegion, trainer):
        self.region, self.trainer = region, trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.region.before_step(self.trainer)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.region.after_step(self.trainer)
        return control
