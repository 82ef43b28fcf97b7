"""Math answers: ``math`` (math-verify equivalence) and ``gsm8k`` (``#### N`` strict / last-number flexible).

math-verify is always called with its signal.alarm timeouts disabled (``parsing_timeout=None``,
``timeout_seconds=None``): those timeouts raise off the main thread and, in worker processes, can silently turn a
correct answer into 0. Instead the text handed to math-verify is bounded (``max_chars``), which keeps the sympy work
small, and results are identical in any thread or process.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction
from typing import Any

from ..base import Rule, answer_region, check_extract

# Plain decimal numbers, optionally with thousands separators: fast path that never needs sympy.
_PLAIN_NUMBER = re.compile(r"^\s*\$?\s*([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*\.?\s*$")


def _plain_number(text: str) -> Fraction | None:
    m = _PLAIN_NUMBER.match(text)
    if m is None:
        return None
    return Fraction(m.group(1).replace(",", ""))


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are disabled; we disable them on purpose (see module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutWarning())
    pred_config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    return math_verify, pred_config


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """Parse a gold answer with math-verify; ``()`` when unparseable. Bare LaTeX or tuples (``\\frac{1}{3}``,
    ``(1,2)``: a backslash or a digit) are retried inside ``$...$``, because math-verify's LaTeX extractor needs an
    anchor; plain words are not (they would parse as products of symbols)."""
    mv, _ = _math_verify()
    parsed = mv.parse(gold, parsing_timeout=None)
    if not parsed and "$" not in gold and re.search(r"[\\\d]", gold):
        parsed = mv.parse(f"${gold}$", parsing_timeout=None)
    return tuple(parsed)


def math_equal(gold: str, answer: str) -> bool | None:
    """True/False when ``answer`` is / is not equivalent to ``gold``; None when ``gold`` cannot be parsed.

    Gold first (math-verify's ``verify`` is not symmetric). Plain decimal numbers on both sides are compared exactly
    with ``fractions.Fraction`` (same verdict as math-verify, without sympy).
    """
    g = _plain_number(gold)
    if g is not None:
        a = _plain_number(answer)
        if a is not None:
            return a == g
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return None
    mv, pred_config = _math_verify()
    pred = mv.parse(answer, extraction_config=pred_config, parsing_timeout=None)
    if not pred:
        return False
    return bool(mv.verify(list(gold_parsed), pred, timeout_seconds=None))


def _gold_string(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value.strip() else None
    return None


class MathRule(Rule):
    max_score = 1.0

    def __init__(self, column: str = "answer", extract: str = "answer", max_chars: int = 1000):
        self.__name__ = "math"
        self.column = column
        self.columns = (column,)
        self.extract = check_extract("math", extract)
        if int(max_chars) <= 0:
            raise ValueError(f"reward rule 'math': max_chars must be positive, got {max_chars}")
        self.max_chars = int(max_chars)

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        gold = _gold_string(row[self.column])
        if gold is None:
            return None
        region = answer_region(text, self.extract).strip().replace("\u2212", "-")  # Unicode minus sign
        # Bound the sympy work: the tail holds the final answer (math-verify extracts the last boxed/anchored value).
        region = region[-self.max_chars :]
        verdict = math_equal(gold, region)
        return None if verdict is None else float(verdict)


def math_reward(column: str = "answer", extract: str = "answer", max_chars: int = 1000) -> MathRule:
    r"""Math answer equivalence via math-verify: 1.0 if the completion's final answer equals the gold, else 0.0.

    The answer is read from the last ``<answer>...</answer>`` block (else after ``</think>``, else the whole text; set
    ``extract="full"`` to always use the whole text). math-verify handles ``\boxed{}``, fractions, thousands
    separators, percentages and LaTeX variants; plain numbers take an exact fast path. An empty or unparseable gold
    gives ``None`` (cannot judge), never a pass.

    Args:
        column: dataset column with the gold answer.
        extract: ``"answer"`` or ``"full"``.
        max_chars: only the last ``max_chars`` characters of the answer region go to math-verify.

    Example:
    ```python
    >>> rule = math_reward()
    >>> rule(completions=[r"<think>1/3</think><answer>\boxed{\frac{1}{3}}</answer>", "<answer>0.5</answer>",
    ...                   "<answer>1,234</answer>"], answer=["1/3", "1/3", "1234"])
    [1.0, 0.0, 1.0]
    >>> rule(completions=["42"], answer=["not math"])
    [None]

    ```
    """
    return MathRule(column=column, extract=extract, max_chars=max_chars)


# --- GSM8K -------------------------------------------------------------------------------------------------------

_STRICT = re.compile(r"#### ?(\-?[0-9\.\,]+)")
# lm-evaluation-harness "flexible-extract": the last number in the text.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _clean_number(s: str) -> Fraction | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_gold(value: Any) -> Fraction | None:
    """Gold number of a GSM8K answer: the number after ``####`` if present, else the value itself if numeric."""
    s = _gold_string(value)
    if s is None:
        return None
    m = _STRICT.search(s)
    return _clean_number(m.group(1) if m else s)


class GSM8KRule(Rule):
    max_score = 1.0

    def __init__(self, column: str = "answer", mode: str = "strict"):
        if mode not in ("strict", "flexible"):
            raise ValueError(f"reward rule 'gsm8k': mode must be 'strict' or 'flexible', got {mode!r}")
        self.__name__ = "gsm8k"
        self.column = column
        self.columns = (column,)
        self.mode = mode

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        gold = gsm8k_gold(row[self.column])
        if gold is None:
            return None
        if self.mode == "strict":
            matches = _STRICT.findall(text)
            candidate = matches[-1] if matches else None
        else:
            matches = [a or b for a, b in _FLEXIBLE.findall(text)]
            candidate = matches[-1] if matches else None
        if candidate is None:
            return 0.0
        value = _clean_number(candidate)
        return float(value is not None and value == gold)


def gsm8k_reward(column: str = "answer", mode: str = "strict") -> GSM8KRule:
    """GSM8K answer check, as in lm-evaluation-harness: 1.0 if the completion's number equals the gold, else 0.0.

    ``mode="strict"``: the number after the last ``#### `` in the completion. ``mode="flexible"``: the last number in
    the completion. The gold column may hold a full GSM8K solution (``... #### 72``) or the bare number. Commas, ``$``
    and a trailing period are ignored. Unparseable gold gives ``None``.

    Example:
    ```python
    >>> strict, flexible = gsm8k_reward(), gsm8k_reward(mode="flexible")
    >>> completions = ["so 3 + 4 = 7\\n#### 7", "the answer is 1,000.", "#### 8"]
    >>> golds = ["3 + 4 = 7\\n#### 7", "1000", "#### 7"]
    >>> strict(completions=completions, answer=golds), flexible(completions=completions, answer=golds)
    ([1.0, 0.0, 0.0], [1.0, 1.0, 0.0])

    ```
    """
    return GSM8KRule(column=column, mode=mode)
