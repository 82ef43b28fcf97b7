"""Stage gates: conditions that must hold before the next stage starts, and early stops inside a stage.

Between stages, ``evaluate_gates`` checks a finished stage against its ``GateConfig`` and returns one
``GateOutcome`` per configured gate (written to ``stages/NN-name/gates.json``). What a failed gate does is the
gate's ``on_fail`` (``gate_decision``): ``stop`` ends the pipeline, the last good checkpoint (the previous stage's
``final/``) is kept; ``carry_previous`` rejects the stage's model and hands the previous stage's on to the next
stage. ``select_final`` picks the run's final model (``final: best_heldout | last``).

Inside a stage, two TRL/transformers callbacks end training early by setting ``control.should_training_stop``:

- ``PlateauCallback``: the reward gain over the last ``plateau_window`` logged steps fell below
  ``plateau_min_gain``. This is the "PPO's gains have flattened, move on to DPO" judgement; the stage then ends
  *successfully* and the pipeline continues.
- ``KLBudgetCallback``: the logged ``kl`` to the stage's reference exceeded ``kl_budget``. The stage stops and its
  ``kl_budget`` gate fails, so the pipeline stops.

Both record why in ``callback.event`` (a dict), which ``evaluate_gates(early_stops=...)`` turns into outcomes.
They decide on the logged values, which the trainers gather over all processes before logging, so under
``accelerate launch`` every process takes the same decision at the same step and all ranks stop together.

Gain over a window is the least-squares slope of the last K values times the span (K - 1):
``gain = slope * (K - 1)``, i.e. how much the fitted line rose across the window. It is less noisy than
``last - first`` and needs no smoothing parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Shared training metric names (docs/architecture.md) plus common TRL/transformers ones.
TRAIN_METRICS: tuple[str, ...] = (
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "beta",
    "loss",
    "grad_norm",
    "learning_rate",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "frac_reward_zero_std",
    "mean_token_accuracy",
)
# Metrics of the held-out evaluation (eval.json), see evaluation.evaluate_heldout.
EVAL_METRICS: tuple[str, ...] = (
    "accuracy", "mean_length", "format_pass_rate", "pass_rate", "truncation_rate", "reward_mean", "answer_accuracy"
)
# Families of names: any name starting with one of these is accepted (e.g. rewards/accuracy/mean, rails/clip/frac).
METRIC_PREFIXES: tuple[str, ...] = (
    "rewards/", "rails/", "ppo/", "dpo/", "tripwire/", "logps/", "logits/", "completions/", "clip_ratio/"
)

KNOWN_METRICS: tuple[str, ...] = TRAIN_METRICS + EVAL_METRICS

# What a failed gate does (GateConfig.on_fail) and how the run's final model is chosen (the recipe's `final`).
ON_FAIL = ("stop", "carry_previous")
FINAL_POLICIES = ("last", "best_heldout")


def check_metric_name(name: Any, field_name: str) -> str:
    """Return ``name`` if it is a known metric, else raise one ValueError listing the known names."""
    if isinstance(name, str) and (name in KNOWN_METRICS or name.startswith(METRIC_PREFIXES)):
        return name
    raise ValueError(
        f"gates.{field_name}: unknown metric {name!r}. Known metrics: {', '.join(KNOWN_METRICS)}; "
        f"or a name starting with {', '.join(METRIC_PREFIXES)} (see docs/metrics.md)"
    )


@dataclass
class GateConfig:
    """Per-stage gates (all optional; an empty config checks only that no tripwire stopped the stage).

    Thresholds (checked after the stage):
        min_metrics (`dict[str, float]`, defaults to `{}`):
            Each metric must be at least this value at the end of the stage, e.g. `{accuracy: 0.6}`. Held-out
            metrics (`accuracy`, `mean_length`, `format_pass_rate`) come from the stage's eval; training metrics
            are the last logged value.
        max_metrics (`dict[str, float]`, defaults to `{}`):
            Each metric must be at most this value at the end of the stage, e.g. `{completions/clipped_ratio: 0.2}`.

    Regression:
        max_heldout_drop (`float` or `None`, defaults to `None`):
            The held-out `heldout_metric` may fall below the previous stage's by at most this margin (absolute).
            `None` disables the check.
        heldout_metric (`str`, defaults to `"accuracy"`):
            Held-out metric compared by `max_heldout_drop`.

    KL budget:
        kl_budget (`float` or `None`, defaults to `None`):
            The logged `kl` to the stage's reference must stay at or below this value. Checked on every log inside
            the stage (`KLBudgetCallback` stops training) and on the last logged value after it. `None` disables.

    Plateau (early stop inside the stage, a success):
        plateau_window (`int` or `None`, defaults to `None`):
            K, the number of most recent logged values of `plateau_metric` to fit. `None` disables the check.
        plateau_min_gain (`float`, defaults to `0.01`):
            The stage ends early when the fitted gain over the last K logs (slope * (K - 1)) is below this.
        plateau_metric (`str`, defaults to `"reward"`):
            Metric watched for a plateau (`rewards/margins` suits DPO).
        plateau_mode (`str`, defaults to `"max"`):
            `"max"`: improving means rising (reward, margins); `"min"`: improving means falling (loss), and the gain
            is the fitted fall.

    Tripwires:
        no_tripwire_stop (`bool`, defaults to `True`):
            The stage fails its gate if a tripwire stopped (or rolled back and then stopped) training.

    On failure:
        on_fail (`str`, defaults to `"stop"`):
            What a failed gate of this stage does. `"stop"`: the pipeline stops here (status `gated`).
            `"carry_previous"`: the stage's model is rejected, the previous stage's model is handed to the next
            stage and the pipeline continues (status `carried`).
    """

    # Thresholds
    min_metrics: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Each metric must be at least this value at the end of the stage."},
    )
    max_metrics: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Each metric must be at most this value at the end of the stage."},
    )
    # Regression
    max_heldout_drop: float | None = field(
        default=None,
        metadata={"help": "Largest allowed drop of the held-out metric below the previous stage's; None disables."},
    )
    heldout_metric: str = field(
        default="accuracy", metadata={"help": "Held-out metric compared by max_heldout_drop."}
    )
    # KL budget
    kl_budget: float | None = field(
        default=None,
        metadata={"help": "The logged kl to the stage's reference must stay at or below this value; None disables."},
    )
    # Plateau
    plateau_window: int | None = field(
        default=None,
        metadata={"help": "Number K of recent logged values fitted for the plateau check; None disables it."},
    )
    plateau_min_gain: float = field(
        default=0.01,
        metadata={"help": "The stage ends early when the fitted gain over the last K logs is below this."},
    )
    plateau_metric: str = field(default="reward", metadata={"help": "Metric watched for a plateau."})
    plateau_mode: str = field(
        default="max",
        metadata={"help": "'max': improving means rising (reward, margins); 'min': falling (loss)."},
    )
    # Tripwires
    no_tripwire_stop: bool = field(
        default=True, metadata={"help": "Fail the gate if a tripwire stopped training during the stage."}
    )
    # On failure
    on_fail: str = field(
        default="stop",
        metadata={"help": "What a failed gate does: 'stop' the pipeline, or 'carry_previous' (hand the previous "
                          "stage's model to the next stage and continue)."},
    )

    def __post_init__(self):
        for name in ("min_metrics", "max_metrics"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"gates.{name}: expected a mapping metric -> number, got {value!r}")
            for metric, bound in value.items():
                check_metric_name(metric, f"{name}")
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                    raise ValueError(f"gates.{name}.{metric}: expected a finite number, got {bound!r}")
            setattr(self, name, {k: float(v) for k, v in value.items()})
        check_metric_name(self.heldout_metric, "heldout_metric")
        if self.heldout_metric not in EVAL_METRICS:
            raise ValueError(
                f"gates.heldout_metric: {self.heldout_metric!r} is not a held-out metric; use one of "
                f"{', '.join(EVAL_METRICS)}"
            )
        check_metric_name(self.plateau_metric, "plateau_metric")
        if self.plateau_mode not in ("max", "min"):
            raise ValueError(f"gates.plateau_mode: expected 'max' or 'min', got {self.plateau_mode!r}")
        for name in ("max_heldout_drop", "kl_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"gates.{name}: expected a number >= 0 or null, got {value!r}")
        if self.plateau_window is not None and (
            isinstance(self.plateau_window, bool) or not isinstance(self.plateau_window, int) or self.plateau_window < 3
        ):
            raise ValueError(
                f"gates.plateau_window: expected an integer >= 3 (logged steps to fit) or null, "
                f"got {self.plateau_window!r}"
            )
        if not isinstance(self.no_tripwire_stop, bool):
            raise ValueError(f"gates.no_tripwire_stop: expected true or false, got {self.no_tripwire_stop!r}")
        if self.on_fail not in ON_FAIL:
            raise ValueError(f"gates.on_fail: unknown value {self.on_fail!r}; accepted values: {', '.join(ON_FAIL)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GateConfig:
        """Build from a recipe's ``gates:`` mapping; unknown keys are an error listing the accepted ones."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"gates: expected a mapping, got {data!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"gates: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(names)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def callbacks(self) -> list:
        """The in-stage early-stop callbacks this config asks for (add them to the stage's trainer)."""
        out: list = []
        if self.plateau_window is not None:
            out.append(PlateauCallback(self.plateau_window, self.plateau_min_gain, self.plateau_metric,
                                       self.plateau_mode))
        if self.kl_budget is not None:
            out.append(KLBudgetCallback(self.kl_budget))
        return out


@dataclass
class GateOutcome:
    """One gate's verdict, as written to gates.json: ``{"gate", "passed", "reason", "values"}``."""

    gate: str
    passed: bool
    reason: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_gain(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` (x = 0..K-1) times (K - 1): the rise of the fitted line over the window.

    >>> round(window_gain([0.0, 0.1, 0.2, 0.3]), 6)  # slope 0.1, span 3 -> 0.3
    0.3
    """
    k = len(values)
    if k < 2:
        raise ValueError(f"window_gain needs at least 2 values, got {k}")
    x_mean = (k - 1) / 2
    y_mean = sum(values) / k
    sxx = sum((i - x_mean) ** 2 for i in range(k))
    sxy = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
    return sxy / sxx * (k - 1)


def metric_series(history: Iterable[Mapping[str, Any]], name: str) -> list[float]:
    """Finite values of ``name`` across log-history entries, oldest first (eval entries ``eval_*`` excluded)."""
    out = []
    for entry in history:
        value = entry.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append(float(value))
    return out


class _EarlyStop:
    """Shared part of the early-stop callbacks: watch ``on_log`` and stop with a recorded reason."""

    gate = ""

    def __init__(self):
        self.event: dict[str, Any] | None = None

    def _stop(self, control, step: int, reason: str, values: dict[str, Any]):
        self.event = {"gate": self.gate, "step": step, "reason": reason, "values": values}
        control.should_training_stop = True

    # TrainerCallback protocol (duck-typed, so this module imports no transformers)
    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class PlateauCallback(_EarlyStop):
    """End the stage when ``metric``'s fitted gain over the last ``window`` logged steps is below ``min_gain``.

    The stage ends successfully: the pipeline moves on (e.g. from PPO/GRPO to DPO).
    """

    gate = "plateau"

    def __init__(self, window: int, min_gain: float, metric: str = "reward", mode: str = "max"):
        super().__init__()
        self.window, self.min_gain, self.metric, self.mode = int(window), float(min_gain), metric, mode
        self.values: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, state.log_history is restored from the checkpoint: refit from it.
        self.values = metric_series(state.log_history, self.metric)

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or self.event is not None:
            return
        self.values.append(float(value))
        if len(self.values) >= self.window:
            gain = window_gain(self.values[-self.window :]) * (1.0 if self.mode == "max" else -1.0)
            if gain < self.min_gain:
                self._stop(
                    control,
                    state.global_step,
                    f"{self.metric} {'gain' if self.mode == 'max' else 'fall'} over the last {self.window} logs was "
                    f"{gain:.4g} < {self.min_gain:g}: "
                    f"stopped early at step {state.global_step}",
                    {"gain": gain, "min_gain": self.min_gain, "window": self.window, "metric": self.metric},
                )


class KLBudgetCallback(_EarlyStop):
    """Stop the stage as soon as the logged ``kl`` exceeds ``budget`` (its kl_budget gate then fails)."""

    gate = "kl_budget"

    def __init__(self, budget: float):
        super().__init__()
        self.budget = float(budget)

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get("kl")
        if not isinstance(value, (int, float)) or self.event is not None:
            return
        if not math.isfinite(value) or value > self.budget:
            self._stop(
                control,
                state.global_step,
                f"kl {value:.4g} exceeded the budget {self.budget:g} at step {state.global_step}",
                {"kl": float(value), "budget": self.budget},
            )


def _stage_value(name: str, history: Sequence[Mapping[str, Any]], eval_metrics: Mapping[str, Any] | None):
    if name in EVAL_METRICS:
        return (eval_metrics or {}).get(name)
    series = metric_series(history, name)
    return series[-1] if series else None


def evaluate_gates(
    config: GateConfig,
    *,
    history: Sequence[Mapping[str, Any]] = (),
    eval_metrics: Mapping[str, Any] | None = None,
    previous_eval: Mapping[str, Any] | None = None,
    tripwire_events: Iterable[Mapping[str, Any]] = (),
    early_stops: Iterable[Mapping[str, Any] | None] = (),
) -> list[GateOutcome]:
    """Check a finished stage. Returns one outcome per configured gate; the pipeline continues iff all passed.

    Args:
        history: the stage's log history (list of dicts, oldest first).
        eval_metrics: the stage's held-out evaluation (eval.json), or None if it had none.
        previous_eval: the previous evaluated stage's eval.json, for ``max_heldout_drop``.
        tripwire_events: the stage's tripwires.jsonl entries (``action`` of ``stop`` fails ``no_tripwire_stop``).
        early_stops: ``callback.event`` of the stage's early-stop callbacks (None entries are ignored).
    """
    outcomes: list[GateOutcome] = []
    early = {e["gate"]: e for e in early_stops if e}

    for metric, bound in config.min_metrics.items():
        value = _stage_value(metric, history, eval_metrics)
        if value is None:
            outcomes.append(GateOutcome(f"min:{metric}", False, f"{metric} was not measured in this stage", {}))
        else:
            ok = value >= bound
            rel = ">=" if ok else "<"
            outcomes.append(
                GateOutcome(f"min:{metric}", ok, f"{metric} = {value:.4g} {rel} {bound:g}", {metric: value, "min": bound})
            )
    for metric, bound in config.max_metrics.items():
        value = _stage_value(metric, history, eval_metrics)
        if value is None:
            outcomes.append(GateOutcome(f"max:{metric}", False, f"{metric} was not measured in this stage", {}))
        else:
            ok = value <= bound
            rel = "<=" if ok else ">"
            outcomes.append(
                GateOutcome(f"max:{metric}", ok, f"{metric} = {value:.4g} {rel} {bound:g}", {metric: value, "max": bound})
            )

    if config.max_heldout_drop is not None:
        name, margin = config.heldout_metric, config.max_heldout_drop
        now = (eval_metrics or {}).get(name)
        before = (previous_eval or {}).get(name)
        if now is None:
            outcomes.append(GateOutcome("heldout_drop", False, f"held-out {name} was not measured in this stage", {}))
        elif before is None:
            outcomes.append(
                GateOutcome("heldout_drop", True, f"no previous held-out {name} to compare with", {name: now})
            )
        else:
            drop = before - now
            ok = drop <= margin + 1e-12
            reason = f"held-out {name} {before:.4g} -> {now:.4g} (drop {drop:.4g} {'<=' if ok else '>'} {margin:g})"
            outcomes.append(
                GateOutcome("heldout_drop", ok, reason, {"previous": before, "current": now, "margin": margin})
            )

    if config.kl_budget is not None:
        budget = config.kl_budget
        series = metric_series(history, "kl")
        if "kl_budget" in early:
            e = early["kl_budget"]
            outcomes.append(GateOutcome("kl_budget", False, e["reason"], dict(e.get("values", {}), step=e["step"])))
        elif not series:
            outcomes.append(GateOutcome("kl_budget", True, "no kl logged in this stage (no reference model)", {}))
        else:
            last = series[-1]
            ok = last <= budget
            outcomes.append(
                GateOutcome(
                    "kl_budget", ok, f"final kl {last:.4g} {'<=' if ok else '>'} budget {budget:g}",
                    {"kl": last, "budget": budget},
                )
            )

    if config.plateau_window is not None:
        if "plateau" in early:
            e = early["plateau"]
            outcomes.append(GateOutcome("plateau", True, e["reason"], dict(e.get("values", {}), step=e["step"])))
        else:
            outcomes.append(GateOutcome("plateau", True, f"{config.plateau_metric} still improving: ran to the end", {}))

    if config.no_tripwire_stop:
        stops = [e for e in tripwire_events if tripwire_stopped(e)]
        if stops:
            first = stops[0]
            reason = f"tripwire {first.get('detector')} stopped training at step {first.get('step')}: {first.get('reason')}"
            outcomes.append(GateOutcome("no_tripwire_stop", False, reason, {"events": len(stops)}))
        else:
            outcomes.append(GateOutcome("no_tripwire_stop", True, "no tripwire stopped the stage", {}))
    return outcomes


def tripwire_stopped(event: Mapping[str, Any]) -> bool:
    """Whether a tripwires.jsonl event ended training (action ``stop``, or a rollback turned into a stop)."""
    details = event.get("details") if isinstance(event.get("details"), Mapping) else {}
    return event.get("status") == "trip" and (event.get("action") == "stop" or bool(details.get("stopped")))


def failed(outcomes: Iterable[GateOutcome]) -> list[GateOutcome]:
    """The outcomes that did not pass (empty: the pipeline may continue)."""
    return [o for o in outcomes if not o.passed]


# ---------------------------------------------------------------- what a failed gate does, and the final model


def gate_decision(on_fail: str, outcomes: Iterable[GateOutcome | Mapping[str, Any]]) -> str:
    """``"passed"`` when every outcome passed; otherwise the gate's ``on_fail`` (``"stop"`` or
    ``"carry_previous"``). Outcomes may be ``GateOutcome`` objects or their dicts (gates.json)."""
    if on_fail not in ON_FAIL:
        raise ValueError(f"gates.on_fail: unknown value {on_fail!r}; accepted values: {', '.join(ON_FAIL)}")
    ok = all((o.passed if isinstance(o, GateOutcome) else bool(o.get("passed"))) for o in outcomes)
    return "passed" if ok else on_fail


def select_final(candidates: Sequence[Mapping[str, Any]], policy: str, metric: str = "accuracy"
                 ) -> Mapping[str, Any] | None:
    """The run's final model among ``candidates`` (oldest first): dicts with at least ``label`` and ``eval``.

    ``"last"``: the last candidate. ``"best_heldout"``: the candidate with the highest held-out ``metric``; on a tie
    the later one (it had more training at no held-out cost); candidates without that metric are skipped, and with
    none measured it falls back to the last. ``None`` when there are no candidates. Callers pass only the models
    that were handed on (a stage whose gate failed is not a candidate).
    """
    if policy not in FINAL_POLICIES:
        raise ValueError(f"final: unknown value {policy!r}; accepted values: {', '.join(FINAL_POLICIES)}")
    if not candidates:
        return None
    if policy == "last":
        return candidates[-1]
    best, best_value = None, -math.inf
    for c in candidates:
        value = (c.get("eval") or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= best_value:
            best, best_value = c, float(value)
    return best if best is not None else candidates[-1]
