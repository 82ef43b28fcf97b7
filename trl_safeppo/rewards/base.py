"""Shared plumbing for rule-based rewards: the `Rule` base class, completion text extraction and gold-column access.

A rule is a small callable object with TRL's reward signature
``(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]`` and a stable ``__name__``. Subclasses
implement ``score(text, row)`` for one completion; this class handles batching, conversational completions, dataset
columns passed as keyword arguments, and clear errors. Instances hold only plain attributes, so they pickle for
worker processes and are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

# Keyword arguments that TRL trainers pass to every reward function and that are not dataset columns.
TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


class RewardRuleError(ValueError):
    """A rule could not run on the inputs it was given (missing column, wrong type, failing user rule)."""


def message_text(message: Any, rule: str, index: int) -> str:
    """Text of one chat message; ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts."""
    if not isinstance(message, Mapping) or "content" not in message:
        raise RewardRuleError(
            f"reward rule {rule!r}: completion {index} is a list but its items are not chat messages "
            f"(dicts with a 'content' key); got {type(message).__name__}: {message!r:.80}"
        )
    content = message["content"]
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise RewardRuleError(f"reward rule {rule!r}: completion {index} has content of type {type(content).__name__}")


def completion_text(completion: Any, rule: str, index: int = 0) -> str:
    """Plain text of one completion.

    A plain-text completion is returned as is. A conversational completion (a list of messages) gives the concatenated
    content of its assistant messages (messages without a role count as assistant), so that tool-calling turns whose
    final answer is in the last message are handled.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        parts = [
            message_text(m, rule, index)
            for m in completion
            if not (isinstance(m, Mapping) and m.get("role", "assistant") not in ("assistant",))
        ]
        return "\n".join(parts)
    raise RewardRuleError(
        f"reward rule {rule!r}: completion {index} has type {type(completion).__name__}; expected a string "
        f"(standard format) or a list of chat messages (conversational format), e.g. "
        f"[{{'role': 'assistant', 'content': '...'}}]"
    )


def completion_texts(completions: Any, rule: str) -> list[str]:
    if completions is None or isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise RewardRuleError(
            f"reward rule {rule!r}: `completions` must be a list (one item per completion), got "
            f"{type(completions).__name__}"
        )
    return [completion_text(c, rule, i) for i, c in enumerate(completions)]


def prompt_text(prompt: Any) -> str:
    """Plain text of a prompt (conversational prompts: the content of every message, joined by newlines)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return "\n".join(
            message_text(m, "prompt", 0) if isinstance(m, Mapping) else str(m) for m in prompt
        )
    return str(prompt)


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def answer_region(text: str, extract: str = "answer") -> str:
    """The part of a completion that holds the final answer.

    ``extract="answer"``: the content of the last ``<answer>...</answer>`` block if any (an unclosed final block runs
    to the end), else the text after the last ``</think>``, else the whole text. ``extract="full"``: the whole text.
    """
    if extract == "full":
        return text
    if extract != "answer":
        raise ValueError(f"extract must be 'answer' or 'full', got {extract!r}")
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1]
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return text


def check_extract(rule: str, extract: str) -> str:
    if extract not in ("answer", "full"):
        raise ValueError(f"reward rule {rule!r}: extract={extract!r} is not supported; use 'answer' or 'full'")
    return extract


class Rule:
    """Base class of the built-in rules.

    Subclasses set ``__name__``, list the dataset columns they read in ``columns`` (set in ``__init__`` from options)
    and implement ``score(text, row)``, where ``row`` holds ``prompt``, ``completion_ids`` (or None) and the value of
    each column for this completion. ``max_score`` is the best score the rule can give (used for pass thresholds).
    """

    __name__ = "rule"
    columns: tuple[str, ...] = ()
    max_score: float = 1.0

    def score(self, text: str, row: dict[str, Any]) -> float | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        texts = completion_texts(completions, self.__name__)
        n = len(texts)
        columns = {}
        for col in self.columns:
            if col not in kwargs or kwargs[col] is None:
                available = sorted(k for k in kwargs if k not in TRAINER_KWARGS)
                raise RewardRuleError(
                    f"reward rule {self.__name__!r} needs the dataset column {col!r} (passed by the trainer as a "
                    f"keyword argument), but it is missing; columns given: {available}. Add the column to the dataset "
                    f"or point the rule at another one with its `column` option."
                )
            values = kwargs[col]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
                raise RewardRuleError(
                    f"reward rule {self.__name__!r}: column {col!r} must be a list with one value per completion "
                    f"({n}), got {type(values).__name__}"
                    + (f" of length {len(values)}" if isinstance(values, Sequence) else "")
                )
            columns[col] = values
        if prompts is not None and (isinstance(prompts, str) or len(prompts) != n):
            raise RewardRuleError(
                f"reward rule {self.__name__!r}: `prompts` must be a list with one prompt per completion ({n})"
            )
        if completion_ids is not None and len(completion_ids) != n:
            raise RewardRuleError(
                f"reward rule {self.__name__!r}: `completion_ids` has {len(completion_ids)} items for {n} completions"
            )
        rows = []
        for i in range(n):
            row = {col: values[i] for col, values in columns.items()}
            row["prompt"] = prompts[i] if prompts is not None else None
            row["completion_ids"] = completion_ids[i] if completion_ids is not None else None
            rows.append(row)
        workers = getattr(self, "workers", 1)
        if workers > 1 and n > 1:  # for rules that wait on subprocesses (code_tests); order is kept
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, n)) as pool:
                values = list(pool.map(self.score, texts, rows))
        else:
            values = [self.score(text, row) for text, row in zip(texts, rows)]
        return [None if v is None else float(v) for v in values]
