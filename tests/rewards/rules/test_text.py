"""exact, regex, choice, length and language rules."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards.rules.text import (
    choice_reward,
    exact_reward,
    language_reward,
    length_reward,
    normalize_text,
    regex_reward,
)


@pytest.mark.parametrize(
    ("gold", "completion", "normalize", "expected"),
    [
        ("Paris", "<answer> paris. </answer>", "basic", 1.0),      # case, spaces, final period
        ("Paris", "<answer>\\boxed{Paris}</answer>", "basic", 1.0),
        ("New  York", "<answer>new york</answer>", "basic", 1.0),  # whitespace collapsed
        ("Paris", "<answer>Paris</answer>", "none", 1.0),
        ("Paris", "<answer> Paris</answer>", "none", 0.0),
        ("Paris", "<answer> Paris</answer>", "strip", 1.0),
        ("Paris", "<answer>Lyon</answer>", "basic", 0.0),
        (["Paris", "Paname"], "<answer>paname</answer>", "basic", 1.0),  # list of acceptable golds
        ("", "<answer>x</answer>", "basic", None),                   # empty gold: cannot judge
        ("7", "<think>7</think>8", "basic", 0.0),                    # after </think> is the answer
    ],
)
def test_exact_table(gold, completion, normalize, expected):
    assert exact_reward(normalize=normalize)(completions=[completion], answer=[gold]) == [expected]


def test_normalize_text():
    assert normalize_text(' "Ｐaris." ') == "paris"  # NFKC folds the full-width P


def test_regex_fixed_and_per_row():
    assert regex_reward(pattern=r"\d{3}")(completions=["abc 123", "12"]) == [1.0, 0.0]
    assert regex_reward(pattern=r"\d+", fullmatch=True)(completions=[" 42 ", "42a"]) == [1.0, 0.0]
    rule = regex_reward(column="pattern")
    assert rule(completions=["cat", "dog", "x"], pattern=["c.t", "c.t", "("]) == [1.0, 0.0, None]  # "(": invalid
    with pytest.raises(ValueError, match="exactly one"):
        regex_reward()
    with pytest.raises(ValueError, match="does not compile"):
        regex_reward(pattern="(")


@pytest.mark.parametrize(
    ("gold", "completion", "expected"),
    [
        ("B", "<answer>B</answer>", 1.0),
        ("B", "<answer>(B)</answer>", 1.0),
        ("B", "The answer is (B).", 1.0),
        ("b", "Answer: B", 1.0),
        (1, "\\boxed{B}", 1.0),                         # 0-based index 1 -> B
        ("B", "A) because it is first", 0.0),
        ("B", "A is wrong; the answer is C", 0.0),       # explicit phrase wins over a leading letter
        ("B", "Because I think so", 0.0),                # the article "I"/"A" inside prose is not a choice
        ("Z", "<answer>B</answer>", None),               # gold outside letters
    ],
)
def test_choice_table(gold, completion, expected):
    assert choice_reward(letters="ABCD")(completions=[completion], answer=[gold]) == [expected]


def test_length_chars_tokens():
    assert length_reward(min=2, max=4)(completions=["a", "ab", "abcd", "abcde"]) == [0.0, 1.0, 1.0, 0.0]
    rule = length_reward(max=3, unit="tokens")
    assert rule(completions=["x", "y"], completion_ids=[[1, 2, 3], [1, 2, 3, 4]]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        rule(completions=["x"])
    with pytest.raises(ValueError, match="larger than max"):
        length_reward(min=5, max=1)


def test_language_share_of_target_script():
    rule = language_reward(target="en")
    # "add 加法": Latin a,d,d (3) and Han 加,法 (2) -> 3 / 5 = 0.6; the answer block is outside the scope.
    assert rule(completions=["<think>add 加法</think><answer>数</answer>"]) == [pytest.approx(0.6)]
    assert language_reward(target="zh")(completions=["<think>加法 ok</think>"]) == [pytest.approx(0.5)]  # 2 of 4
    assert rule(completions=["<think>1 + 2 = 3</think>"]) == [None]  # no letters: cannot judge
    assert language_reward(no_letters=1.0)(completions=["<think>1 + 2 = 3</think>"]) == [1.0]
    per_row = language_reward(column="lang", scope="full")
    assert per_row(completions=["привет", "hello"], lang=["ru", "ru"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown target"):
        language_reward(target="klingon")


def test_pickle_every_text_rule():
    rules = [exact_reward(), regex_reward(pattern="a"), choice_reward(), length_reward(max=3), language_reward()]
    for rule in rules:
        copy = pickle.loads(pickle.dumps(rule))
        assert copy.__name__ == rule.__name__
        kwargs = {c: ["A"] for c in rule.columns}
        assert copy(completions=["<think>a</think><answer>A</answer>"], **kwargs) == rule(
            completions=["<think>a</think><answer>A</answer>"], **kwargs)
