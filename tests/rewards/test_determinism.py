"""Every built-in rule gives identical scores in the main thread, in threads, and in spawned worker processes
(which also proves that the rules pickle)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from trl_safeppo.rewards import resolve

SPEC = [
    "math", {"name": "gsm8k", "mode": "flexible"}, "format", "exact", "choice", "language", "json",
    {"name": "regex", "pattern": r"\d"}, {"name": "length", "max": 60}, "code_compiles", "refusal",
    {"name": "code_tests", "timeout": 10},
]
COMPLETIONS = [
    "<think>so 3 + 4</think><answer>7</answer>",
    "<think>halve it</think><answer>\\boxed{\\frac{1}{2}}</answer>",
    "I'm sorry, but I can't help with that.",
    "<answer>B</answer>",
    '<answer>{"a": 1}</answer>',
    "```python\ndef add(a, b):\n    return a + b\n```",
]
COLUMNS = {
    "answer": ["7", "0.5", "x", "B", "1", "3"],
    "unsafe": [False, False, True, False, False, False],
    "tests": ["assert add(1, 2) == 3"] * 6,
}


def score(checker, lo, hi):
    s = checker.score(completions=COMPLETIONS[lo:hi], **{k: v[lo:hi] for k, v in COLUMNS.items()})
    return s.total, s.breakdown


def test_identical_across_threads_and_processes():
    checker = resolve(SPEC)
    reference = score(checker, 0, 6)
    # Spot-check a few values worked out by hand: completion 0 is fully R1-formatted with the right answer.
    assert reference[1]["math"][0] == 1.0 and reference[1]["format"][0] == 1.0
    assert reference[1]["refusal"][2] == 1.0  # refuses an unsafe prompt
    assert reference[1]["code_tests"][5] == 1.0 and reference[1]["code_tests"][0] == 0.0
    halves = [(0, 3), (3, 6)]
    with ThreadPoolExecutor(2) as pool:
        threaded = [pool.submit(score, checker, lo, hi).result() for lo, hi in halves]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        processed = [f.result() for f in [pool.submit(score, checker, lo, hi) for lo, hi in halves]]
    for parts in (threaded, processed):
        total = parts[0][0] + parts[1][0]
        breakdown = {k: parts[0][1][k] + parts[1][1][k] for k in reference[1]}
        assert (total, breakdown) == reference
