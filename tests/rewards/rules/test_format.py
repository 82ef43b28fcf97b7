"""R1 format rule: tag counting, empty / repeated answer blocks, truncation, pre-filled <think>."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards.rules.format import format_reward

CASES = [
    # (completion, expected)  partial credit = 0.5 * (tags present exactly once) / 4
    ("<think>r</think><answer>7</answer>", 1.0),
    ("  <think>\nr\n</think>\n\n<answer>\n7\n</answer>\n", 1.0),       # whitespace around blocks is fine
    ("<think></think><answer>7</answer>", 1.0),                          # empty reasoning allowed
    ("<think>r</think><answer>  </answer>", 0.0),                        # blank answer -> empty_answer_score
    ("<think>r</think><answer>7</answer> trailing", 0.5),                # 4 tags once, trailing text: 0.5*4/4
    ("<think>r</think><answer>7", 0.375),                                # truncated: 3 tags -> 0.5*3/4
    ("<think>r", 0.125),                                                 # truncated in think: 0.5*1/4
    ("7", 0.0),
    # repeated answer blocks: <think>,</think> once (2 tags) -> 0.25, minus 0.25 per extra <answer> -> 0.0
    ("<think>r</think><answer>7</answer><answer>8</answer>", 0.0),
    ("<think>r</think><think>s</think><answer>7</answer>", 0.25),         # 2 tags once: 0.5*2/4
    ("r</think><answer>7</answer>", 1.0),                                # pre-filled <think> (auto)
    ("r</think>", 0.25),                                                 # pre-filled, no answer: 2 of 4 tags
]


@pytest.mark.parametrize(("completion", "expected"), CASES)
def test_format_table(completion, expected):
    assert format_reward()(completions=[completion]) == [expected]


def test_prefilled_think_modes():
    text = "r</think><answer>7</answer>"
    assert format_reward(prefilled_think=False)(completions=[text]) == [0.375]  # 3 of 4 tags -> 0.5*3/4
    assert format_reward(prefilled_think=True)(completions=[text]) == [1.0]


def test_think_only_mode_and_conversational():
    rule = format_reward(require_answer=False)
    conv = [[{"role": "assistant", "content": "<think>r</think> The answer is 7."}],
            [{"role": "assistant", "content": "The answer is 7."}]]
    assert rule(completions=conv) == [1.0, 0.0]


def test_bad_options_and_pickle():
    with pytest.raises(ValueError, match="prefilled_think"):
        format_reward(prefilled_think="sometimes")
    with pytest.raises(ValueError, match="partial"):
        format_reward(partial=1.0)
    copy = pickle.loads(pickle.dumps(format_reward(partial=0.2)))
    assert copy.__name__ == "format"
    assert copy(completions=["<think>r</think><answer>7"]) == [pytest.approx(0.15)]  # 0.2 * 3 / 4
