"""RuleChecker: weights, gates, None handling, pass criterion, logging through TRL's hooks, errors naming rules."""

from __future__ import annotations

import pickle
from collections import defaultdict

import pytest

from trl_safeppo.rewards import Component, Gate, RewardRuleError, RuleChecker, resolve
from trl_safeppo.rewards.rules.format import format_reward
from trl_safeppo.rewards.rules.math import math_reward

from . import user_rules

GOOD = "<think>3+4</think><answer>7</answer>"
WRONG = "<think>3+4</think><answer>8</answer>"
NOTAGS = "7"


def checker(**kwargs):
    return RuleChecker([Component("format", format_reward(), 0.5), Component("math", math_reward(), 1.0)], **kwargs)


def test_weighted_sum_and_pass():
    scores = checker().score(completions=[GOOD, WRONG, NOTAGS], answer=["7", "7", "7"])
    # GOOD: 0.5*1 + 1*1 = 1.5; WRONG: 0.5*1 + 0 = 0.5; NOTAGS: format 0 (no tags), math 1 -> 1.0
    assert scores.total == [1.5, 0.5, 1.0]
    assert scores.breakdown == {"format": [1.0, 1.0, 0.0], "math": [1.0, 0.0, 1.0]}
    assert scores.passed == [True, False, False]  # full marks = 0.5 + 1.0 = 1.5
    assert scores.rows()[1] == {"format": 1.0, "math": 0.0}


def test_gate_fixes_the_total():
    gated = checker(gates=[Gate(on="format", below=1.0, value=-1.0)])
    scores = gated.score(completions=[GOOD, NOTAGS], answer=["7", "7"])
    assert scores.total == [1.5, -1.0] and scores.gated == [False, True]


def test_none_is_never_a_pass():
    # Unparseable gold: math gives None. Not required -> left out of the sum (TRL's NaN-sum): total 0.5 < 1.5.
    scores = checker().score(completions=[GOOD], answer=["not math"])
    assert scores.total == [0.5] and scores.passed == [False]
    required = RuleChecker([Component("format", format_reward(), 0.5),
                            Component("math", math_reward(), 1.0, required=True)])
    assert required.score(completions=[GOOD], answer=["not math"]).total == [None]
    gate_on_none = RuleChecker([Component("math", math_reward())], gates=[Gate("math", 1.0, 0.0)])
    assert gate_on_none.score(completions=[GOOD], answer=["not math"]).total == [None]  # gate cannot judge
    lenient = checker(pass_threshold=0.0)
    assert lenient.passed(completions=[GOOD], answer=["not math"]) == [True]  # 0.5 >= 0 is a real score


def test_logging_through_trl_hooks():
    metrics, extra = defaultdict(list), {}
    total = checker()(completions=[GOOD, WRONG], answer=["7", "7"], log_metric=lambda k, v: metrics[k].append(v),
                      log_extra=lambda k, v: extra.__setitem__(k, v), trainer_state=None)
    assert total == [1.5, 0.5]
    assert metrics["rewards/math/mean"] == [0.5]       # (1 + 0) / 2
    assert metrics["rewards/format/mean"] == [1.0]
    assert metrics["rewards/rules/pass_rate"] == [0.5]
    assert metrics["rewards/rules/none_frac"] == [0.0]
    assert metrics["rewards/math/none_frac"] == [0.0] and metrics["rewards/format/none_frac"] == [0.0]
    assert extra == {"format": [1.0, 1.0], "math": [1.0, 0.0]}


def test_a_rule_that_judges_nothing_is_logged_as_silent():
    # the gold answer does not parse as math, so `math` gives None to both completions (none_frac 2/2 = 1.0) and
    # logs no mean; `format` still scores, so the checker's total is not None (its none_frac stays 0).
    metrics = defaultdict(list)
    checker()(completions=[GOOD, WRONG], answer=["not math", "not math"], log_metric=lambda k, v: metrics[k].append(v))
    assert metrics["rewards/math/none_frac"] == [1.0] and "rewards/math/mean" not in metrics
    assert metrics["rewards/format/none_frac"] == [0.0] and metrics["rewards/rules/none_frac"] == [0.0]


def test_single_rule_does_not_double_log():
    metrics = defaultdict(list)
    resolve("math")(completions=[GOOD], answer=["7"], log_metric=lambda k, v: metrics[k].append(v))
    assert "rewards/math/mean" not in metrics  # TRL itself logs rewards/math/mean for a func named "math"
    assert metrics["rewards/math/pass_rate"] == [1.0]


@pytest.mark.parametrize(
    ("func", "match"),
    [
        (user_rules.raises, r"reward rule 'raises' raised KeyError"),
        (user_rules.wrong_length, r"reward rule 'wrong_length' returned 1 scores for 2 completions"),
        (user_rules.wrong_type, r"reward rule 'wrong_type' returned str 'high' for completion 0"),
    ],
)
def test_user_rule_errors_name_the_rule(func, match):
    bad = RuleChecker([Component(func.__name__, func)])
    with pytest.raises(RewardRuleError, match=match):
        bad(completions=["a", "b"])


def test_nan_is_none_and_pickle():
    c = RuleChecker([Component("nan", _nan_rule)])
    assert c(completions=["a"]) == [None]
    copy = pickle.loads(pickle.dumps(checker(gates=[Gate("format", 1.0, 0.0)])))
    assert copy.__name__ == "rules" and copy(completions=[GOOD, NOTAGS], answer=["7", "7"]) == [1.5, 0.0]


def _nan_rule(completions=None, **kwargs):
    return [float("nan")] * len(completions)


def test_checker_construction_errors():
    with pytest.raises(ValueError, match="unique"):
        RuleChecker([Component("a", _nan_rule), Component("a", _nan_rule)])
    with pytest.raises(ValueError, match="unknown rule 'b'"):
        RuleChecker([Component("a", _nan_rule)], gates=[Gate("b", 1.0)])
