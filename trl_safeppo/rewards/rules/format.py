"""R1 format: ``<think>...</think><answer>...</answer>`` (DeepSeek-R1, https://huggingface.co/papers/2501.12948)."""

from __future__ import annotations

import re
from typing import Any

from ..base import Rule

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_WELL_FORMED = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_WELL_FORMED_THINK_ONLY = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


class FormatRule(Rule):
    max_score = 1.0

    def __init__(
        self,
        require_answer: bool = True,
        prefilled_think: str | bool = "auto",
        partial: float = 0.5,
        repeat_penalty: float = 0.25,
        empty_answer_score: float = 0.0,
    ):
        if prefilled_think not in ("auto", True, False):
            raise ValueError(
                f"reward rule 'format': prefilled_think must be 'auto', true or false, got {prefilled_think!r}"
            )
        if not 0.0 <= float(partial) < 1.0:
            raise ValueError(f"reward rule 'format': partial must be in [0, 1), got {partial}")
        self.__name__ = "format"
        self.require_answer = bool(require_answer)
        self.prefilled_think = prefilled_think
        self.partial = float(partial)
        self.repeat_penalty = float(repeat_penalty)
        self.empty_answer_score = float(empty_answer_score)

    def _normalise(self, text: str) -> str:
        """Put back the ``<think>`` a chat template pre-filled in the prompt (so the completion starts mid-thought)."""
        if self.prefilled_think is True and not text.lstrip().startswith("<think>"):
            return "<think>" + text
        if self.prefilled_think == "auto" and "<think>" not in text and text.count("</think>") == 1:
            return "<think>" + text
        return text

    def score(self, text: str, row: dict[str, Any]) -> float:
        text = self._normalise(text)
        tags = _TAGS if self.require_answer else _TAGS[:2]
        counts = [text.count(tag) for tag in tags]
        if all(c == 1 for c in counts):
            m = (_WELL_FORMED if self.require_answer else _WELL_FORMED_THINK_ONLY).match(text)
            if m is not None:
                if self.require_answer and not m.group(2).strip():
                    return self.empty_answer_score
                return 1.0
        # Tag counting: partial credit for each tag present exactly once, minus a penalty per repeated answer block.
        ok = sum(c == 1 for c in counts)
        score = self.partial * ok / len(tags)
        if self.require_answer:
            score -= self.repeat_penalty * max(0, counts[2] - 1)
            blocks = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
            if blocks and all(not b.strip() for b in blocks):
                return min(score, self.empty_answer_score)
        return max(score, 0.0)


def format_reward(
    require_answer: bool = True,
    prefilled_think: str | bool = "auto",
    partial: float = 0.5,
    repeat_penalty: float = 0.25,
    empty_answer_score: float = 0.0,
) -> FormatRule:
    """R1 format reward.

    1.0 when the completion is exactly ``<think>R</think><answer>A</answer>`` (whitespace around the blocks allowed,
    each tag once, ``A`` not blank). Otherwise tag counting gives partial credit
    ``partial * (tags present exactly once) / 4``, minus ``repeat_penalty`` for each ``<answer>`` beyond the first,
    floored at 0. A blank answer block scores ``empty_answer_score``. A truncated completion (no ``</answer>``) only
    gets partial credit. With ``require_answer=False`` only ``<think>R</think>`` followed by anything is required.

    Chat templates that pre-fill ``<think>`` in the prompt (DeepSeek-R1, Qwen3) produce completions without the
    opening tag: ``prefilled_think="auto"`` (default) restores it when the completion has one ``</think>`` and no
    ``<think>``; ``true`` always assumes it; ``false`` never does.

    Example:
    ```python
    >>> rule = format_reward()
    >>> rule(completions=["<think>2+2</think>\\n<answer>4</answer>", "2+2</think><answer>4</answer>",
    ...                   "<think>2+2</think><answer> </answer>", "<think>2+2</think><answer>4"])
    [1.0, 1.0, 0.0, 0.375]

    ```
    The last one is truncated: 3 of 4 tags present once, 0.5 * 3 / 4 = 0.375.
    """
    return FormatRule(require_answer, prefilled_think, partial, repeat_penalty, empty_answer_score)
