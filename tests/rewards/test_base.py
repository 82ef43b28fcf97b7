"""Rule plumbing: plain and conversational completions, gold columns, clear errors on bad input."""

from __future__ import annotations

import pytest

from trl_safeppo.rewards import RewardRuleError, answer_region, completion_text
from trl_safeppo.rewards.rules.math import math_reward


def test_completion_formats():
    assert completion_text("plain", "r") == "plain"
    conv = [{"role": "assistant", "content": "a"}, {"role": "tool", "content": "tool output"},
            {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]
    assert completion_text(conv, "r") == "a\nb"  # tool messages are not the model's words


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("<think>x</think><answer>1</answer><answer>2</answer>", "2"),   # last answer block
        ("<think>x</think><answer>3", "3"),                              # unclosed final block
        ("<think>x</think> 4", " 4"),                                    # after </think>
        ("5", "5"),
    ],
)
def test_answer_region(text, region):
    assert answer_region(text) == region


def test_missing_gold_column_names_rule_and_column():
    with pytest.raises(RewardRuleError, match=r"'math' needs the dataset column 'answer'.*\['solution'\]"):
        math_reward()(completions=["1"], solution=["1"], trainer_state=None, log_metric=print)


@pytest.mark.parametrize(
    ("completions", "match"),
    [
        ("just a string", "must be a list"),
        ([42], "completion 0 has type int"),
        ([[{"role": "assistant"}]], "not chat messages"),
        (None, "must be a list"),
    ],
)
def test_wrong_completion_type(completions, match):
    with pytest.raises(RewardRuleError, match=match):
        math_reward()(completions=completions, answer=["1"])


def test_column_length_mismatch():
    with pytest.raises(RewardRuleError, match="one value per completion"):
        math_reward()(completions=["1", "2"], answer=["1"])
