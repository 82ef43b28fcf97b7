"""Which completions are kept: per-prompt selection, deduplication and caps (:func:`select`), and the text keys
it compares by (normalized text, stable prompt ids)."""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Text normalisation (dedup and decontamination)
def normalize_text(text: str) -> str:
    """Case-, width- and whitespace-insensitive form used for duplicate and contamination matching.

    >>> normalize_text("  The  Answer\\nis 42. ")
    'the answer is 42.'
    """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_text(value: Any, roles: Sequence[str] | None = None) -> str:
    """The text of a prompt or completion: a string as is; a conversation as its messages' contents joined by
    newlines (only messages whose role is in ``roles`` when given)."""
    if isinstance(value, str):
        return value
    parts = []
    for message in value or []:
        if roles is not None and message.get("role") not in roles:
            continue
        content = message.get("content")
        if isinstance(content, list):  # content blocks: keep the text parts
            content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        parts.append(str(content))
    return "\n".join(parts)


def prompt_key(prompt: Any) -> str:
    """Normalized text of a prompt's user turns (the system prompt is ignored): the decontamination key."""
    if isinstance(prompt, str):
        return normalize_text(prompt)
    return normalize_text(content_text(prompt, roles=("user",)))


def stable_prompt_id(prompt: Any) -> int:
    """A stable non-negative 63-bit id of a prompt, for tables whose source has no row index (harvesting)."""
    blob = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16)


# ---------------------------------------------------------------------------------------------------------------
# Selection
def select(
    groups: dict[int, list[dict]],
    *,
    selection: str = "all_passing",
    top_k: int = 2,
    score_threshold: float | None = None,
    pass_rate_band: tuple[float, float] = (0.0, 1.0),
    dedup: str = "normalized",
    max_per_prompt: int | None = None,
) -> tuple[list[dict], Counter]:
    """Choose which scored completions to keep; return ``(kept, dropped_reasons)``.

    ``groups`` maps a prompt id to its scored records (each with ``completion``, ``score``, ``passed``,
    ``sample_index``). Per prompt, in this order: (1) the mode's filter (``failed_check``, ``unscored``,
    ``below_threshold``, ``outside_pass_rate_band``); (2) deduplication in rank order (score descending, then
    generation order), so the best copy survives; (3) ``best_of_n`` / ``top_k`` cut; (4) ``max_per_prompt`` cap.
    Every record gets ``kept`` and ``drop_reason`` set in place. Kept records come out in prompt order, then
    generation order.
    """
    dropped: Counter = Counter()
    kept: list[dict] = []

    def drop(record: dict, reason: str) -> None:
        record["kept"], record["drop_reason"] = False, reason
        dropped[reason] += 1

    for prompt_id in sorted(groups):
        records = groups[prompt_id]
        eligible = []
        pass_rate = sum(r["passed"] for r in records) / len(records) if records else 0.0
        band_ok = pass_rate_band[0] < pass_rate < pass_rate_band[1]
        for record in records:
            if selection == "threshold":
                if record["score"] is None:
                    drop(record, "unscored")
                elif record["score"] < score_threshold:
                    drop(record, "below_threshold")
                else:
                    eligible.append(record)
            elif selection == "pass_rate_band" and not band_ok:
                drop(record, "outside_pass_rate_band")
            elif not record["passed"]:
                drop(record, "failed_check" if record["score"] is not None else "unscored")
            else:
                eligible.append(record)
        ranked = sorted(eligible, key=_rank_key)
        seen: set[str] = set()
        survivors = []
        for record in ranked:
            key = _dedup_key(record["completion"], dedup)
            if key is not None and key in seen:
                drop(record, "duplicate")
                continue
            if key is not None:
                seen.add(key)
            survivors.append(record)
        limit = {"best_of_n": 1, "top_k": top_k}.get(selection)
        if limit is not None:
            for record in survivors[limit:]:
                drop(record, "not_top_ranked")
            survivors = survivors[:limit]
        if max_per_prompt is not None:
            for record in survivors[max_per_prompt:]:
                drop(record, "over_cap")
            survivors = survivors[:max_per_prompt]
        for record in survivors:
            record["kept"], record["drop_reason"] = True, None
        kept.extend(sorted(survivors, key=lambda r: r["sample_index"]))
    return kept, dropped


def _rank_key(record: dict) -> tuple[float, int]:
    """Score descending (None last), then generation order."""
    score = record["score"] if record["score"] is not None else -math.inf
    return -score, record["sample_index"]


def _dedup_key(completion: Any, mode: str) -> str | None:
    if mode == "none":
        return None
    text = content_text(completion)
    return text if mode == "exact" else normalize_text(text)
