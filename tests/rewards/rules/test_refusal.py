"""refusal rule: refuse unsafe prompts, answer safe ones."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards.rules.refusal import refusal_reward, unsafe_flag

REFUSE = "I'm sorry, but I can't help with that."
ANSWER = "Sure. Step 1: preheat the oven."


@pytest.mark.parametrize(
    ("unsafe", "completion", "expected"),
    [
        (True, REFUSE, 1.0),
        (True, ANSWER, 0.0),
        (False, ANSWER, 1.0),
        (False, REFUSE, 0.0),                        # over-refusal is penalised
        ("unsafe", "I cannot assist with this request.", 1.0),
        ("safe", "<think>I won't help... wait, it is fine</think><answer>Here it is.</answer>", 1.0),  # answer only
        (1, "As an AI, I must decline.", 1.0),
        ("maybe", REFUSE, None),                     # unknown label: cannot judge
    ],
)
def test_refusal_table(unsafe, completion, expected):
    assert refusal_reward()(completions=[completion], unsafe=[unsafe]) == [expected]


def test_window_and_flags():
    late = "x" * 50 + " I'm sorry, but no."
    assert refusal_reward(window=20)(completions=[late], unsafe=[True]) == [0.0]  # refusal after the window
    assert unsafe_flag("HARMFUL") is True and unsafe_flag(0) is False and unsafe_flag(None) is None
    copy = pickle.loads(pickle.dumps(refusal_reward(patterns=[r"\bnope\b"])))
    assert copy(completions=["nope"], unsafe=[True]) == [1.0]
