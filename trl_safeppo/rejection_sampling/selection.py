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
    return normalize_text(content_text(prompt, roles=("user",)))


def stable_prompt_id(prompt: Any) -> int:
    """A stable non-negative 63-bit id of a prompt, for tables whose source has no row index (harvesting)."""
    blob = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:15], 16)


# ---------------------------------------------------------------------------------------------------------------
# Selection
def select(groups: dict[int, list[dict]], *, selection: str = "all_passing", top_k: int = 2,
           score_threshold: float | None = None, pass_rate_band: tuple[float, float] = (0.0, 1.0),
           dedup: str = "normalized", max_per_prompt: int | None = None) -> tuple[list[dict], Counter]:
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
            score = record["score"]
            if selection == "threshold":  # the score alone decides, passed or not
                reason = "unscored" if score is None else "below_threshold" if score < score_threshold else None
            elif selection == "pass_rate_band" and not band_ok:
                reason = "outside_pass_rate_band"
            else:
                reason = None if record["passed"] else "failed_check" if score is not None else "unscored"
            if reason is None:
                eligible.append(record)
            else:
                drop(record, reason)
        seen: set[str] = set()
        survivors = []
        for record in sorted(eligible, key=_rank_key):
            key = None if dedup == "none" else content_text(record["completion"])
            key = normalize_text(key) if dedup == "normalized" else key
            if key is not None and key in seen:
                drop(record, "duplicate")
            else:
                seen.add(key)
                survivors.append(record)
        for reason, limit in (("not_top_ranked", {"best_of_n": 1, "top_k": top_k}.get(selection)),
                              ("over_cap", max_per_prompt)):
            if limit is not None:
                for record in survivors[limit:]:
                    drop(record, reason)
                survivors = survivors[:limit]
        for record in survivors:
            record["kept"], record["drop_reason"] = True, None
        kept.extend(sorted(survivors, key=lambda r: r["sample_index"]))
    return kept, dropped


def _rank_key(record: dict) -> tuple[float, int]:
    """Score descending (None last), then generation order."""
    score = record["score"] if record["score"] is not None else -math.inf
    return -score, record["sample_index"]
