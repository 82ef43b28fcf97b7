"""code_compiles and code_tests rules (the sandbox itself is tested in tests/rewards/test_sandbox.py)."""

from __future__ import annotations

import pickle

import pytest

from trl_safeppo.rewards.rules.code import code_compiles_reward, code_tests_reward, extract_code
from trl_safeppo.rewards.sandbox import sandbox_available, sandbox_unavailable_reason

needs_sandbox = pytest.mark.skipif(not sandbox_available(),
                                   reason=f"sandbox unavailable (code_tests fails closed): {sandbox_unavailable_reason()}")

ADD = "<think>easy</think><answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
SUB = "```python\ndef add(a, b):\n    return a - b\n```"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (ADD, 1.0),
        ("def f(x):\n    return x", 1.0),                  # no fence: the answer region itself
        ("```python\ndef f(x) return x\n```", 0.0),         # syntax error
        ("<answer></answer>", 0.0),                          # blank code
        ("```python\nprint('a'\n```", 0.0),                  # truncated completion
        ("```python\nwhile True: pass\n```", 1.0),           # compiles: nothing is executed
    ],
)
def test_code_compiles_table(completion, expected):
    assert code_compiles_reward()(completions=[completion]) == [expected]


def test_extract_code_takes_last_block():
    text = "```python\nx = 1\n```\nthen\n```py\ny = 2\n```"
    assert extract_code(text) == "y = 2"


@needs_sandbox
def test_code_tests_pass_fail_and_unusable_tests():
    rule = code_tests_reward(timeout=10, cpu_seconds=5, workers=2)
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    out = rule(completions=[ADD, SUB, "def add(:", ADD, ADD], tests=[tests, tests, tests, "", "assert ("])
    # correct, wrong, does not compile (no process started), blank tests -> None, broken tests -> None
    assert out == [1.0, 0.0, 0.0, None, None]


@needs_sandbox
def test_code_tests_list_of_asserts_and_pickle():
    rule = pickle.loads(pickle.dumps(code_tests_reward(column="checks", timeout=10)))
    assert rule.__name__ == "code_tests"
    assert rule(completions=[ADD], checks=[["assert add(1, 1) == 2", "assert add(0, 0) == 0"]]) == [1.0]
