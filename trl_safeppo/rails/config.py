"""`RailsConfig`: every rail's settings in one serializable dataclass, and `RewardRails`, the holder trainers use.

Every reward rail is off unless configured, except the non-finite guard. The chain order is fixed (docs/rails.md):

    non_finite -> length_debias -> length_power -> missing_eos -> length_linear -> overlong
               -> [clip, percentile_clip if clip.position == "before_norm"] -> normalize
               -> [clip, percentile_clip if clip.position == "after_norm"]

Debiasing and length scaling act on the task reward first, so that they do not also rescale or remove the
penalties added after them; clipping comes last by default, bounding what reaches the advantages
(Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", https://arxiv.org/abs/2307.04964,
normalize then clip).

This module imports neither torch nor yaml at import time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..safe_yaml import safe_yaml_load  # size and alias expansion capped, as for a recipe
from .tripwires import TripwireSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .base import RewardBatch, RewardRail
    from .kl import AdaptiveKLController, FixedKLController


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(cond: bool, field_name: str, accepted: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"rails.{field_name} must be {accepted}, got {value!r}")


def _check_number(
    field_name: str, value: Any, *, gt: float | None = None, ge: float | None = None, nullable: bool = False
) -> None:
    """`value` must be a finite number (> gt, >= ge), or None when `nullable`."""
    if nullable and value is None:
        return
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
    bound = f" > {gt:g}" if gt is not None else f" >= {ge:g}" if ge is not None else ""
    _check(ok, field_name, f"{'null or ' if nullable else ''}a finite number{bound}", value)


@dataclass
class NonFiniteConfig:
    """Non-finite guard (always on): NaN / inf / None rewards never reach the loss.

    Args:
        policy: "value" replaces them with `value`; "group_mean" with the mean of the finite rewards of the same
            group (zero group-relative advantage), falling back to `value`.
        value: the replacement for policy "value" (and the fallback).
    """

    policy: str = field(default="value", metadata={"help": 'NaN/inf/None rewards -> "value" or "group_mean".'})
    value: float = field(default=0.0, metadata={"help": "Replacement reward for policy 'value' (and the fallback)."})

    def __post_init__(self) -> None:
        _check(self.policy in ("value", "group_mean"), "non_finite.policy", "'value' or 'group_mean'", self.policy)
        _check_number("non_finite.value", self.value)


@dataclass
class MissingEOSConfig:
    """Missing-EOS rail (off by default): a completion truncated without EOS is penalized.

    Args:
        penalty: subtracted from the reward of a truncated completion (>= 0; TRL's former PPO `missing_eos_penalty`).
        value: the score given to a truncated completion instead. At most one of the two is set.
    """

    penalty: float | None = field(default=None, metadata={"help": "Subtracted from truncated completions (>= 0)."})
    value: float | None = field(default=None, metadata={"help": "Score given to truncated completions instead."})

    def __post_init__(self) -> None:
        _check_number("missing_eos.penalty", self.penalty, ge=0, nullable=True)
        _check_number("missing_eos.value", self.value, nullable=True)
        if self.penalty is not None and self.value is not None:
            raise ValueError("rails.missing_eos: set penalty or value, not both")

    @property
    def enabled(self) -> bool:
        return self.penalty is not None or self.value is not None


@dataclass
class LengthConfig:
    """Length rails (each off by default; applied in the order debias, power, linear, overlong).

    Args:
        debias: "group" or "batch": subtract the least-squares length term `b * (len - mean(len))` within each group
            (GRPO) or the whole batch; null: off.
        alpha: divide the reward by `len**alpha` (>= 0); null: off.
        budget: linear penalty budget in tokens; `penalty_per_token * max(0, len - budget)` is subtracted.
        penalty_per_token: the linear penalty slope (>= 0), used with `budget`.
        overlong_buffer: DAPO soft overlong punishment buffer `L_cache` in tokens; null: off.
        overlong_factor: scale of the DAPO penalty (DAPO: 1.0).
        max_completion_length: `L_max` for the DAPO penalty; null: taken from the batch (the trainer's setting).
    """

    debias: str | None = field(default=None, metadata={"help": "Length debiasing scope: 'group', 'batch' or null."})
    alpha: float | None = field(default=None, metadata={"help": "Divide the reward by len**alpha (>= 0)."})
    budget: int | None = field(default=None, metadata={"help": "Tokens allowed before the linear penalty."})
    penalty_per_token: float = field(default=0.0, metadata={"help": "Linear penalty per token beyond budget."})
    overlong_buffer: int | None = field(default=None, metadata={"help": "DAPO soft overlong buffer L_cache."})
    overlong_factor: float = field(default=1.0, metadata={"help": "Scale of the DAPO overlong penalty (DAPO: 1.0)."})
    max_completion_length: int | None = field(default=None, metadata={"help": "L_max for DAPO; null: the batch's."})

    def __post_init__(self) -> None:
        _check(self.debias in (None, "group", "batch"), "length.debias", "null, 'group' or 'batch'", self.debias)
        _check_number("length.alpha", self.alpha, ge=0, nullable=True)
        _check(
            self.budget is None or (isinstance(self.budget, int) and self.budget >= 0),
            "length.budget", "null or an integer >= 0", self.budget,
        )
        _check_number("length.penalty_per_token", self.penalty_per_token, ge=0)
        if self.budget is None and self.penalty_per_token > 0:
            raise ValueError("rails.length.penalty_per_token needs rails.length.budget (an integer >= 0)")
        _check(
            self.overlong_buffer is None or (isinstance(self.overlong_buffer, int) and self.overlong_buffer >= 1),
            "length.overlong_buffer", "null or an integer >= 1", self.overlong_buffer,
        )
        _check_number("length.overlong_factor", self.overlong_factor, ge=0)
        floor = self.overlong_buffer or 1
        _check(
            self.max_completion_length is None
            or (isinstance(self.max_completion_length, int) and self.max_completion_length >= floor),
            "length.max_completion_length",
            f"null or an integer >= overlong_buffer ({floor})",
            self.max_completion_length,
        )


@dataclass
class ClipConfig:
    """Reward clipping (off by default): fixed range and/or percentile clipping against a running window.

    Args:
        low: lower bound (null: none). high: upper bound (null: none); low <= high.
        percentile_low, percentile_high: winsorize at these percentiles (0-100) of the last `window` rewards.
        window: rewards kept for the percentiles.
        position: "after_norm" (clip the normalized reward; Zheng et al. 2023) or "before_norm" (clip raw rewards).
    """

    low: float | None = field(default=None, metadata={"help": "Lower clip bound (null: none)."})
    high: float | None = field(default=None, metadata={"help": "Upper clip bound (null: none)."})
    percentile_low: float | None = field(default=None, metadata={"help": "Lower winsorizing percentile (0-100)."})
    percentile_high: float | None = field(default=None, metadata={"help": "Upper winsorizing percentile (0-100)."})
    window: int = field(default=4096, metadata={"help": "Running window of rewards for the percentiles."})
    position: str = field(default="after_norm", metadata={"help": "'after_norm' or 'before_norm'."})

    def __post_init__(self) -> None:
        _check_number("clip.low", self.low, nullable=True)
        _check_number("clip.high", self.high, nullable=True)
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"rails.clip.low must be <= rails.clip.high, got low={self.low!r} > high={self.high!r}")
        for name in ("percentile_low", "percentile_high"):
            q = getattr(self, name)
            _check(q is None or (_is_number(q) and 0 <= q <= 100), f"clip.{name}", "null or in [0, 100]", q)
        q_low, q_high = self.percentile_low, self.percentile_high
        if q_low is not None and q_high is not None and q_low > q_high:
            raise ValueError(
                f"rails.clip.percentile_low must be <= rails.clip.percentile_high, got "
                f"{self.percentile_low!r} > {self.percentile_high!r}"
            )
        _check(isinstance(self.window, int) and self.window >= 1, "clip.window", "an integer >= 1", self.window)
        _check(
            self.position in ("after_norm", "before_norm"),
            "clip.position",
            "'after_norm' or 'before_norm'",
            self.position,
        )

    @property
    def fixed_enabled(self) -> bool:
        return self.low is not None or self.high is not None

    @property
    def percentile_enabled(self) -> bool:
        return self.percentile_low is not None or self.percentile_high is not None


@dataclass
class NormalizeConfig:
    """Running reward normalization (off by default): Welford mean / variance over all rewards seen.

    Args:
        enabled: turn it on.
        shift_only: subtract the running mean only (no division by the std).
        eps: added to the variance before the square root.
    """

    enabled: bool = field(default=False, metadata={"help": "Normalize rewards with running mean/std."})
    shift_only: bool = field(default=False, metadata={"help": "Subtract the running mean only."})
    eps: float = field(default=1e-8, metadata={"help": "Added to the variance before the square root."})

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "normalize.enabled", "true or false", self.enabled)
        _check(isinstance(self.shift_only, bool), "normalize.shift_only", "true or false", self.shift_only)
        _check_number("normalize.eps", self.eps, gt=0)


@dataclass
class KLConfig:
    """KL control.

    Args:
        controller: "fixed" (constant beta) or "adaptive" (Ziegler et al. 2019).
        init_kl_coef: initial beta; null: the trainer's own coefficient (PPO `kl_coef`, GRPO `beta`).
        target: adaptive KL target (> 0), in the trainer's KL unit (Ziegler et al. 2019 / TRL's former PPO: 6.0).
        horizon: adaptive horizon in samples (> 0; Ziegler et al. 2019: 10000).
        min_coef: lower bound of the adaptive beta (> 0, so GRPO keeps its reference model).
        max_coef: upper bound of the adaptive beta (>= min_coef).
        hold_until_target: adaptive only: beta is not lowered before the measured KL has reached the target once
            (training starts at KL 0, which Ziegler's rule reads as "too little KL"); false: Ziegler's rule.
        deadband: adaptive only: beta holds while `|KL / target - 1| <= deadband` (>= 0; 0: Ziegler's rule, update
            every time; 0.5 moves beta only when KL leaves [0.5, 1.5] x target).
        proportional: adaptive only: gain k_p of a proportional term, `beta = base * exp(k_p * clip(KL / target - 1,
            -1, 1))` with `base` following the rule above (>= 0; 0: Ziegler's integral rule alone; Stooke et al.
            2020). Reacts to a KL jump at once and lets go once KL is back at the target, which damps overshoot.
        estimator: per-token KL estimator "k1", "k2", "k3"; null: the trainer's default (PPO k1, GRPO k3).
        measure_before_update: set each update's beta from the KL of the batch it trains on, measured before the
            update (GRPO: one more policy forward per rollout batch, without gradient, unless GRPO already computes
            the rollout log-probabilities; PPO: no extra cost, the beta of a rollout's KL penalty follows that
            rollout's KL). False: an update's beta comes from the KL measured in the previous update, a step late.
    """

    controller: str = field(default="fixed", metadata={"help": "'fixed' or 'adaptive' (Ziegler et al. 2019)."})
    init_kl_coef: float | None = field(default=None, metadata={"help": "Initial beta; null: the trainer's own."})
    target: float = field(default=6.0, metadata={"help": "Adaptive KL target (Ziegler et al. 2019: 6.0)."})
    horizon: float = field(default=10000.0, metadata={"help": "Adaptive horizon in samples (Ziegler: 10000)."})
    min_coef: float = field(default=1e-4, metadata={"help": "Lower bound of the adaptive beta (> 0)."})
    max_coef: float = field(default=10.0, metadata={"help": "Upper bound of the adaptive beta."})
    hold_until_target: bool = field(
        default=False,
        metadata={"help": "Adaptive: do not lower beta before KL has reached the target once (false: Ziegler)."},
    )
    deadband: float = field(
        default=0.0, metadata={"help": "Adaptive: beta holds while |KL / target - 1| <= deadband (0: Ziegler)."}
    )
    proportional: float = field(
        default=0.0,
        metadata={"help": "Adaptive: proportional gain k_p, beta = base * exp(k_p * clip(KL/target - 1, -1, 1)) "
                  "(0: Ziegler's integral rule alone; Stooke et al. 2020)."},
    )
    estimator: str | None = field(default=None, metadata={"help": "'k1', 'k2', 'k3'; null: the trainer's default."})
    measure_before_update: bool = field(
        default=False,
        metadata={"help": "Set each update's beta from the KL of the batch it trains on, measured before the update "
                  "(GRPO: one more policy forward per batch); false: from the previous update's KL, a step late."},
    )

    def __post_init__(self) -> None:
        _check(self.controller in ("fixed", "adaptive"), "kl.controller", "'fixed' or 'adaptive'", self.controller)
        _check(self.estimator in (None, "k1", "k2", "k3"), "kl.estimator", "null, 'k1', 'k2' or 'k3'", self.estimator)
        _check_number("kl.init_kl_coef", self.init_kl_coef, ge=0, nullable=True)
        from .kl import validate_adaptive_kl

        validate_adaptive_kl(
            self.init_kl_coef if self.controller == "adaptive" else None, self.target, self.horizon, self.min_coef,
            self.max_coef, self.hold_until_target, self.deadband, self.proportional, where="rails.kl.",
        )
        _check(
            isinstance(self.measure_before_update, bool), "kl.measure_before_update", "true or false",
            self.measure_before_update,
        )


def _default_tripwires() -> list[TripwireSpec]:
    # stop on non-finite values or a guard that repairs most rewards; record reward functions that hang or go silent
    return [TripwireSpec("non_finite", "stop"), TripwireSpec("reward_timeout", "warn"),
            TripwireSpec("silent_reward", "warn")]


_SECTIONS: dict[str, type] = {
    "non_finite": NonFiniteConfig,
    "missing_eos": MissingEOSConfig,
    "length": LengthConfig,
    "clip": ClipConfig,
    "normalize": NormalizeConfig,
    "kl": KLConfig,
}


@dataclass
class RailsConfig:
    """All safety rails of one training stage. Serializable: `to_dict` / `from_dict`, `to_yaml` / `from_yaml`.

    Args:
        non_finite: the non-finite guard (always on).
        missing_eos: penalty for completions without EOS (off).
        length: length rails: debias, power, linear budget, DAPO overlong (each off).
        clip: fixed and percentile clipping, before or after normalization (off).
        normalize: running reward normalization (off).
        kl: KL controller (fixed by default) and estimator.
        tripwires: detectors and actions; default: `non_finite` with action "stop", `reward_timeout` and
            `silent_reward` with action "warn".
        diagnostics: log `rails/diagnostics/*` (raw/shaped reward mean, reward-length correlation).
    """

    non_finite: NonFiniteConfig = field(default_factory=NonFiniteConfig, metadata={"help": "Non-finite guard."})
    missing_eos: MissingEOSConfig = field(default_factory=MissingEOSConfig, metadata={"help": "Missing-EOS rail."})
    length: LengthConfig = field(default_factory=LengthConfig, metadata={"help": "Length rails."})
    clip: ClipConfig = field(default_factory=ClipConfig, metadata={"help": "Reward clipping."})
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig, metadata={"help": "Reward normalization."})
    kl: KLConfig = field(default_factory=KLConfig, metadata={"help": "KL controller and estimator."})
    tripwires: list[TripwireSpec] = field(default_factory=_default_tripwires, metadata={"help": "Tripwires."})
    diagnostics: bool = field(default=True, metadata={"help": "Log rails/diagnostics/* metrics."})

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section_from_dict(cls, value, f"rails.{name}"))
            elif value is None:
                setattr(self, name, cls())
            elif not isinstance(value, cls):
                raise ValueError(f"rails.{name} must be a mapping or {cls.__name__}, got {value!r}")
        if self.tripwires is None:
            self.tripwires = []
        if not isinstance(self.tripwires, list):
            raise ValueError(f"rails.tripwires must be a list of {{detector, action, params}}, got {self.tripwires!r}")
        self.tripwires = [_tripwire_from_any(t, i) for i, t in enumerate(self.tripwires)]
        _check(isinstance(self.diagnostics, bool), "diagnostics", "true or false", self.diagnostics)

    # --- serialization -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        out["tripwires"] = [t.to_dict() for t in self.tripwires]
        out["diagnostics"] = self.diagnostics
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RailsConfig:
        data = dict(data or {})
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(accepted))
        if unknown:
            raise ValueError(f"rails: unknown keys {unknown}; accepted: {accepted}")
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> RailsConfig:
        data = safe_yaml_load(text, what="the rails YAML")  # size and alias expansion capped, as for a recipe
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"rails YAML must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_any(cls, value: RailsConfig | dict[str, Any] | str | os.PathLike | None) -> RailsConfig:
        """Accept a RailsConfig, a dict, a YAML / JSON file path, a YAML string, or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            if os.path.isfile(value):
                with open(value, encoding="utf-8") as f:
                    return cls.from_yaml(f.read())
            return cls.from_yaml(str(value))
        raise ValueError(f"rails must be a RailsConfig, a mapping, a YAML path or null, got {type(value).__name__}")

    # --- builders ----------------------------------------------------------------------------------------------

    def reward_rail_names(self) -> list[str]:
        """The names of the enabled reward rails, in chain order (these are the metric prefixes)."""
        return [name for name, _ in self._reward_rails()]

    def _reward_rails(self) -> list[tuple[str, RewardRail]]:
        from . import reward as R

        guard = R.non_finite_guard(self.non_finite.policy, self.non_finite.value)
        rails: list[tuple[str, RewardRail]] = [("non_finite", guard)]
        length = self.length
        if length.debias is not None:
            rails.append(("length_debias", R.length_debias(length.debias)))
        if length.alpha is not None:
            rails.append(("length_power", R.length_power(length.alpha)))
        if self.missing_eos.enabled:
            rails.append(("missing_eos", R.missing_eos(self.missing_eos.penalty, self.missing_eos.value)))
        if length.budget is not None:
            rails.append(("length_linear", R.length_linear(length.budget, length.penalty_per_token)))
        if length.overlong_buffer is not None:
            rails.append(
                ("overlong", R.overlong(length.overlong_buffer, length.overlong_factor, length.max_completion_length))
            )
        clip = self.clip
        clips: list[tuple[str, RewardRail]] = []
        if clip.fixed_enabled:
            clips.append(("clip", R.clip_rewards(clip.low, clip.high)))
        if clip.percentile_enabled:
            clips.append(("percentile_clip", R.percentile_clip(clip.percentile_low, clip.percentile_high, clip.window)))
        if clip.position == "before_norm":
            rails.extend(clips)
        if self.normalize.enabled:
            rails.append(("normalize", R.normalize_rewards(self.normalize.shift_only, self.normalize.eps)))
        if clip.position == "after_norm":
            rails.extend(clips)
        return rails

    def build_reward_chain(self) -> RewardRail:
        """The reward rails in their declared order, as one chained `RewardRail`."""
        from .base import chain

        return chain(*self._reward_rails())

    def build_kl_controller(self, default_kl_coef: float | None = None) -> AdaptiveKLController | FixedKLController:
        """The KL controller; `default_kl_coef` (the trainer's own beta) is used when `kl.init_kl_coef` is null."""
        from .kl import AdaptiveKLController, FixedKLController

        coef = self.kl.init_kl_coef if self.kl.init_kl_coef is not None else default_kl_coef
        if self.kl.controller == "fixed":
            return FixedKLController(0.0 if coef is None else coef)
        if coef is None:
            raise ValueError("rails.kl.init_kl_coef is needed for the adaptive controller (or pass the trainer's beta)")
        if self.kl.init_kl_coef is None:  # the trainer's beta: checked here, so that the error says where it came from
            from .kl import validate_adaptive_kl

            validate_adaptive_kl(coef, self.kl.target, self.kl.horizon, self.kl.min_coef, self.kl.max_coef,
                                 init_name=f"the trainer's KL coefficient = {coef!r}")
        return AdaptiveKLController(
            coef, self.kl.target, self.kl.horizon, self.kl.min_coef, self.kl.max_coef,
            hold_until_target=self.kl.hold_until_target, deadband=self.kl.deadband,
            proportional=self.kl.proportional,
        )

    def build_tripwires(self) -> list[TripwireSpec]:
        return list(self.tripwires)


# rails.kl fields removed in 0.1.0 (issue 23), each with the option it belonged to: none gave a consistent gain over
# the adaptive controller alone in benchmark 5 (docs/benchmarks.md, section 5), and each cost extra forwards per step
REMOVED_KL_FIELDS = {
    "max_kl": "the KL trust region", "max_kl_backtracks": "the KL trust region",
    "pull_back_above": "the KL pull-back", "pull_back_to": "the KL pull-back", "pull_back_iterations": "the KL pull-back",
    "pull_back_on": "the KL pull-back", "pull_back_redraws": "the KL pull-back",
    "measure_exact": "the exact KL fed to the controller",
}


# their defaults before 0.1.0: a `to_dict()` written then holds every one of them, and at these values they did nothing
REMOVED_KL_DEFAULTS = {"max_kl": None, "max_kl_backtracks": 4, "pull_back_above": None, "pull_back_to": None,
                       "pull_back_iterations": 6, "pull_back_on": "trained_batch", "measure_exact": False}


def _refuse_removed_kl_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` without the removed fields left at their old defaults; any other removed field is refused."""
    inert = [k for k in data if k in REMOVED_KL_DEFAULTS and data[k] == REMOVED_KL_DEFAULTS[k]]
    data = {k: v for k, v in data.items() if k not in inert}
    removed = [k for k in data if k in REMOVED_KL_FIELDS]
    if removed:
        options = list(dict.fromkeys(REMOVED_KL_FIELDS[k] for k in removed))
        raise ValueError(
            f"{', '.join(f'{where}.{k}={data[k]!r}' for k in removed)}: {' and '.join(options)} "
            f"{'was' if len(options) == 1 else 'were'} removed in trl_safeppo 0.1.0 (no consistent gain in benchmark "
            f"5, docs/benchmarks.md); delete {'it' if len(removed) == 1 else 'them'} and hold KL with the adaptive "
            "controller (rails.kl.controller: adaptive, with target, proportional and measure_before_update; "
            "docs/rails.md), and a kl_limit tripwire as the hard stop"
        )
    return data


def _section_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    accepted = [f.name for f in dataclasses.fields(cls)]
    if cls is KLConfig:
        data = _refuse_removed_kl_fields(data, where)
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; accepted: {accepted}")
    return cls(**data)


def _tripwire_from_any(value: Any, index: int) -> TripwireSpec:
    if isinstance(value, TripwireSpec):
        return value
    if isinstance(value, dict):
        accepted = ["detector", "action", "params"]
        unknown = sorted(set(value) - set(accepted))
        if unknown or "detector" not in value:
            raise ValueError(
                f"rails.tripwires[{index}]: keys must be {accepted} with 'detector' required, got {sorted(value)}"
            )
        return TripwireSpec(**value)
    raise ValueError(f"rails.tripwires[{index}] must be a mapping {{detector, action, params}}, got {value!r}")


class RewardRails:
    """The small stateful holder a trainer keeps: the reward chain with its state, the KL controller, the tripwires.

        rails = RewardRails(RailsConfig.from_dict(args.rails), default_kl_coef=args.beta)
        rewards, metrics = rails(reward_batch_from_completions(...))   # (B,) float32, {"rails/...": float}
        rails.kl_controller.update(kl, n_steps)
        json.dumps(rails.state_dict())  # checkpoint; rails.load_state_dict(...) to resume

    Call it on the full (gathered) batch so that every process holds the same state.
    """

    def __init__(self, config: RailsConfig | dict[str, Any] | str | None = None, default_kl_coef: float | None = None):
        self.config = RailsConfig.from_any(config)
        self.chain = self.config.build_reward_chain()
        self.state = self.chain.init()
        self.kl_controller = self.config.build_kl_controller(default_kl_coef)
        self.tripwires = self.config.build_tripwires()
        self.n_calls = 0

    def __call__(self, batch: RewardBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Shape the rewards of `batch`: returns `(rewards (B,) float32, metrics)` and advances the state."""
        shaped, self.state, metrics = self.chain.update(batch, self.state)
        self.n_calls += 1
        if self.config.diagnostics:
            metrics.update(_diagnostics(batch, shaped))
        return shaped.rewards, metrics

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: `{"reward": {rail name: rail state}, "kl": controller state, "n_calls": int}`."""
        reward_state = json.loads(json.dumps(self.state))  # a deep copy, and a check that it is plain JSON
        return {"reward": reward_state, "kl": self.kl_controller.state_dict(), "n_calls": self.n_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(self.state)
        got = set(state["reward"])
        if got != expected:
            raise ValueError(f"rails state holds rails {sorted(got)} but this config builds {sorted(expected)}")
        self.state = state["reward"]
        self.kl_controller.load_state_dict(state["kl"])
        self.n_calls = int(state.get("n_calls", 0))


def _diagnostics(raw: RewardBatch, shaped: RewardBatch) -> dict[str, float]:
    import torch

    finite = torch.isfinite(raw.rewards)
    length = raw.lengths.to(torch.float64)

    def corr(x: torch.Tensor, y: torch.Tensor) -> float:
        if x.numel() < 2:
            return 0.0
        dx, dy = x - x.mean(), y - y.mean()
        denom = float((dx * dx).sum().sqrt() * (dy * dy).sum().sqrt())
        return float((dx * dy).sum()) / denom if denom > 0 else 0.0

    r_raw = raw.rewards[finite].to(torch.float64)
    r_shaped = shaped.rewards.to(torch.float64)
    return {
        "rails/diagnostics/raw_mean": float(r_raw.mean()) if r_raw.numel() else 0.0,
        "rails/diagnostics/shaped_mean": float(r_shaped.mean()) if r_shaped.numel() else 0.0,
        "rails/diagnostics/reward_length_corr": corr(r_raw, length[finite]),
        "rails/diagnostics/shaped_reward_length_corr": corr(r_shaped, length),
    }
