"""math (math-verify) and gsm8k rules: table-driven edge cases."""

from __future__ import annotations

import pickle
import threading

import pytest

from trl_safeppo.rewards.rules.math import gsm8k_reward, math_equal, math_reward

R1 = "<think>\nworking\n</think>\n<answer>{}</answer>"

MATH_CASES = [
    # (gold, completion, expected)
    ("7", R1.format("7"), 1.0),
    ("7", R1.format("8"), 0.0),
    ("7", R1.format(" 7. "), 1.0),                                  # fast path tolerates spaces and a final period
    ("1234", R1.format("1,234"), 1.0),                              # thousands separator
    ("1,000,000", R1.format("1000000"), 1.0),
    ("1/3", R1.format(r"\boxed{\frac{1}{3}}"), 1.0),                # boxed LaTeX fraction
    (r"\frac{1}{3}", R1.format(r"$\frac13$"), 1.0),                 # bare LaTeX gold, short \frac13
    ("0.5", R1.format(r"\boxed{\dfrac{1}{2}}"), 1.0),               # \dfrac variant = 0.5
    ("1.5", R1.format("3/2"), 1.0),
    ("50%", R1.format(r"$50\%$"), 1.0),                             # percentage on both sides
    (r"\sqrt{2}/2", R1.format(r"$\frac{\sqrt 2}{2}$"), 1.0),
    ("(1,2)", R1.format("$(1, 2)$"), 1.0),                         # bare tuple gold, retried inside $...$
    ("-3", R1.format("\u22123"), 1.0),                             # Unicode minus sign
    ("0.5", R1.format(r"\boxed{\frac{1}{3}}"), 0.0),
    ("7", "<think>7 is tempting</think><answer>8</answer>", 0.0),  # the answer block is judged, not the thinking
    ("7", "the answer is \\boxed{7}", 1.0),                        # no tags: whole text
    # Truncated inside <think>: no answer block, no </think>, so the whole text is judged and its last number is 7.
    # Truncation is the format rule's job (format gives 0.5 * 1 / 4 here; gate on it).
    ("7", "<think>3 + 4 = 7", 1.0),
    ("7", R1.format(""), 0.0),                                      # empty answer block
    ("7", "2+5</think><answer>7</answer>", 1.0),                    # pre-filled <think>
    ("not math", R1.format("7"), None),                             # unparseable gold -> cannot judge
    ("", R1.format("7"), None),                                     # empty gold
    (None, R1.format("7"), None),
]


@pytest.mark.parametrize(("gold", "completion", "expected"), MATH_CASES)
def test_math_table(gold, completion, expected):
    assert math_reward()(completions=[completion], answer=[gold]) == [expected]


def test_math_conversational_and_gold_first():
    conv = [[{"role": "assistant", "content": R1.format(r"\boxed{2}")}]]
    assert math_reward()(prompts=[[{"role": "user", "content": "1+1?"}]], completions=conv, answer=["2"]) == [1.0]
    # gold-first call order: an equation gold "x=2" accepts the prediction "2" (math-verify's asymmetric rule).
    assert math_equal("x=2", "$2$") is True


def test_math_max_chars_bounds_the_text():
    # Only the last 5 characters of the answer region reach math-verify: "... 12345" -> "12345".
    rule = math_reward(max_chars=5)
    assert rule(completions=[R1.format("999 12345")], answer=["12345"]) == [1.0]


def test_math_off_main_thread_same_result():
    completions = [R1.format(r"\boxed{\frac{2}{4}}"), R1.format("0.3"), R1.format("1,234")]
    golds = ["1/2", "1/3", "1234"]
    rule = math_reward()
    main = rule(completions=completions, answer=golds)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", rule(completions=completions, answer=golds)))
    t.start()
    t.join()
    assert main == out["r"] == [1.0, 0.0, 1.0]


GSM8K_CASES = [
    # (mode, gold, completion, expected)
    ("strict", "3 + 4 = 7\n#### 7", "so 7\n#### 7", 1.0),
    ("strict", "#### 1000", "#### 1,000", 1.0),                     # commas ignored
    ("strict", "72", "The answer is 72", 0.0),                     # strict needs '#### N'
    ("strict", "72", "#### 70\n... no wait\n#### 72", 1.0),         # the last '####' counts
    ("flexible", "72", "The answer is $72.", 1.0),                  # '$' and the final period stripped
    ("flexible", "72", "72 apples, minus 2 = 70", 0.0),             # last number is 70
    ("flexible", "-3", "it is -3", 1.0),
    ("flexible", "#### 5", "no numbers here", 0.0),
    ("strict", "no number", "#### 5", None),                        # unparseable gold
]


@pytest.mark.parametrize(("mode", "gold", "completion", "expected"), GSM8K_CASES)
def test_gsm8k_table(mode, gold, completion, expected):
    assert gsm8k_reward(mode=mode)(completions=[completion], answer=[gold]) == [expected]


def test_rules_pickle_and_keep_name():
    for rule in (math_reward(column="gold"), gsm8k_reward(mode="flexible")):
        copy = pickle.loads(pickle.dumps(rule))
        assert copy.__name__ == rule.__name__
        assert copy(completions=["#### 5 <answer>5</answer>"], **{rule.column: ["5"]}) == [1.0]
