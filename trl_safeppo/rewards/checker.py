"""The rule checker: several rules combined with weights and gates into one TRL reward function.

For completion ``i`` with rule scores ``s_r`` and weights ``w_r``::

    total_i = gate.value                        if a gate fires (its rule scored below gate.below), first gate wins
            = None                              if a gate's rule gave None, or a `required` rule gave None,
                                                or every rule gave None
            = sum over rules with s_r != None of w_r * s_r      otherwise

None components are left out of the sum, as TRL does across several ``reward_funcs`` (NaN-sum). A completion
*passes* when its total is not None and ``total >= pass_threshold`` (default: full marks, the sum of
``w_r * max_score_r`` over positive weights), so None is never a pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from .base import RewardRuleError


@dataclass(frozen=True)
class Gate:
    """If rule ``on`` scores below ``below``, the checker's total is ``value`` (the other rules are ignored)."""

    on: str
    below: float
    value: float = 0.0


@dataclass(frozen=True)
class Component:
    """One rule inside a checker: its name (unique in the checker), callable, weight, and whether None from it
    makes the total None (``required``)."""

    name: str
    func: Callable[..., list]
    weight: float = 1.0
    required: bool = False

    @property
    def max_score(self) -> float:
        return float(getattr(self.func, "max_score", 1.0))


@dataclass
class RuleScores:
    """Scores of one batch: ``total`` (what the trainer sees), ``breakdown`` (rule name -> scores), ``passed``,
    ``gated`` (True where a gate fixed the total)."""

    total: list[float | None]
    breakdown: dict[str, list[float | None]]
    passed: list[bool]
    gated: list[bool] = field(default_factory=list)

    def rows(self) -> list[dict[str, float | None]]:
        """Per-completion dicts rule -> score (the ``rewards`` column of scored samples)."""
        return [{name: scores[i] for name, scores in self.breakdown.items()} for i in range(len(self.total))]


def _as_score(value: Any, name: str, index: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        value = float(value)
        return None if math.isnan(value) else value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor / numpy scalar
        return _as_score(value.item(), name, index)
    raise RewardRuleError(
        f"reward rule {name!r} returned {type(value).__name__} {value!r:.60} for completion {index}; a reward rule "
        f"must return a float (or None for 'cannot judge') per completion"
    )


def call_rule(name: str, func: Callable, n: int, prompts, completions, completion_ids, kwargs) -> list[float | None]:
    """Call one reward function and check its output: a list of ``n`` floats or None. Errors name the rule."""
    try:
        out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    except RewardRuleError:
        raise
    except Exception as err:
        raise RewardRuleError(f"reward rule {name!r} raised {type(err).__name__}: {err}") from err
    try:
        out = list(out)
    except TypeError:
        raise RewardRuleError(
            f"reward rule {name!r} returned {type(out).__name__}; expected a list with one score per completion"
        ) from None
    if len(out) != n:
        raise RewardRuleError(f"reward rule {name!r} returned {len(out)} scores for {n} completions")
    return [_as_score(v, name, i) for i, v in enumerate(out)]


class RuleChecker:
    """Weighted, gated combination of reward rules, usable directly as a TRL reward function.

    Args:
        components: the rules, each a `Component` (name, callable, weight, required).
        gates: `Gate`s checked in order; the first that fires fixes the total.
        name: ``__name__`` of the checker (TRL logs it as ``rewards/<name>/mean``).
        pass_threshold: total at or above which a completion passes; default full marks.

    Inside a trainer (when ``log_metric`` / ``log_extra`` are passed, as GRPOTrainer does) each call logs
    ``rewards/<rule>/mean`` and ``rewards/<rule>/none_frac`` per rule, ``rewards/<name>/pass_rate``,
    ``rewards/<name>/none_frac`` and, with gates,
    ``rewards/<name>/gated_frac``; and one completions-table column per rule.
    """

    def __init__(
        self,
        components: list[Component],
        gates: list[Gate] | tuple[Gate, ...] = (),
        name: str = "rules",
        pass_threshold: float | None = None,
    ):
        if not components:
            raise ValueError("a rule checker needs at least one rule")
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique in a checker; repeated: {duplicates} (give each an `alias`)")
        for gate in gates:
            if gate.on not in names:
                raise ValueError(f"gate on unknown rule {gate.on!r}; rules: {names}")
        self.components = list(components)
        self.gates = list(gates)
        self.__name__ = name
        self.max_total = sum(c.weight * c.max_score for c in self.components if c.weight > 0)
        self.pass_threshold = self.max_total if pass_threshold is None else float(pass_threshold)

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.name}*{c.weight:g}" for c in self.components)
        gates = "".join(f", gate({g.on}<{g.below:g} -> {g.value:g})" for g in self.gates)
        return f"RuleChecker({self.__name__!r}: {parts}{gates}, pass>={self.pass_threshold:g})"

    @property
    def rule_names(self) -> list[str]:
        return [c.name for c in self.components]

    def score(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> RuleScores:
        """Score a batch: total, per-rule breakdown, pass flags. Same arguments as a TRL reward function."""
        if completions is None or isinstance(completions, (str, bytes)) or not hasattr(completions, "__len__"):
            raise RewardRuleError(
                f"reward checker {self.__name__!r}: `completions` must be a list, got {type(completions).__name__}"
            )
        n = len(completions)
        breakdown = {
            c.name: call_rule(c.name, c.func, n, prompts, completions, completion_ids, kwargs) for c in self.components
        }
        total: list[float | None] = []
        gated: list[bool] = []
        for i in range(n):
            value, fired = self._combine(i, breakdown)
            total.append(value)
            gated.append(fired)
        passed = [t is not None and t >= self.pass_threshold - 1e-9 for t in total]
        return RuleScores(total=total, breakdown=breakdown, passed=passed, gated=gated)

    def _combine(self, i: int, breakdown: dict[str, list[float | None]]) -> tuple[float | None, bool]:
        for gate in self.gates:
            s = breakdown[gate.on][i]
            if s is None:
                return None, False
            if s < gate.below:
                return gate.value, True
        total, seen = 0.0, False
        for c in self.components:
            s = breakdown[c.name][i]
            if s is None:
                if c.required:
                    return None, False
                continue
            total += c.weight * s
            seen = True
        return (total if seen else None), False

    def passed(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[bool]:
        """One bool per completion: total is not None and ``total >= pass_threshold``."""
        return self.score(prompts, completions, completion_ids, **kwargs).passed

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        scores = self.score(prompts, completions, completion_ids, **kwargs)
        self.log(scores, kwargs.get("log_metric"), kwargs.get("log_extra"))
        return scores.total

    def log(self, scores: RuleScores, log_metric, log_extra) -> None:
        """Report ``scores`` through TRL's reward-function hooks: ``rewards/<rule>/mean`` and the checker's
        pass/None/gated rates through ``log_metric``, one completions-table column per rule through ``log_extra``.
        Either hook may be None (outside a trainer). Public so that wrappers (the RL harvester) log exactly as the
        checker does."""
        n = len(scores.total)
        if n == 0:
            return
        if callable(log_metric):
            for name, values in scores.breakdown.items():
                present = [v for v in values if v is not None]
                if name != self.__name__ and present:
                    log_metric(f"rewards/{name}/mean", sum(present) / len(present))
                if name != self.__name__:  # 1.0: the rule contributed nothing (the `silent_reward` tripwire)
                    log_metric(f"rewards/{name}/none_frac", 1 - len(present) / n)
            log_metric(f"rewards/{self.__name__}/pass_rate", sum(scores.passed) / n)
            log_metric(f"rewards/{self.__name__}/none_frac", sum(t is None for t in scores.total) / n)
            if self.gates:
                log_metric(f"rewards/{self.__name__}/gated_frac", sum(scores.gated) / n)
        if callable(log_extra):
            for name, values in scores.breakdown.items():
                if name != self.__name__:
                    log_extra(name, list(values))
