"""Preference pairs for DPO from scored samples (docs/architecture.md, "Scored samples").

Rejection sampling (and harvesting during RL) keeps every scored completion: several per prompt, each with a
``score`` and a rule-checker verdict ``passed``. :func:`build_pairs` turns that table into a DPO dataset in TRL's
preference format (``prompt``, ``chosen``, ``rejected``), without generating again:

- per prompt (``prompt_id``), completions are ranked by ``(passed, score)``: chosen = passing or highest,
  rejected = failing or lowest;
- a passing-vs-failing pair is a pair by the rule checker's verdict; between completions with the same verdict
  (or without ``passed``) a pair needs ``score(chosen) - score(rejected) >= min_margin``; a failing completion is
  never chosen over a passing one;
- identical completions of one prompt count once (``dedupe``), and no pair is emitted twice;
- optional length balancing (``max_length_ratio``): chosen and rejected must be of similar length, so DPO does not
  learn "longer is better" from the data (Park et al. 2024, "Disentangling Length from Quality in DPO",
  https://arxiv.org/abs/2403.19159);
- at most ``max_pairs_per_prompt`` pairs per prompt, each completion used once (best chosen against worst rejected
  first);
- provenance columns ``source_model``, ``stage``, ``reward_spec``, ``seed`` (from ``provenance=``, else from the
  scored table's own columns).

Prompts that give no pair are skipped and counted by reason in a :class:`PairReport` (``build_pairs_with_report``);
a table that gives no pair at all is an error. :func:`save_pairs` writes atomically (temporary directory, then
rename). Heavy imports (datasets) stay inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .fileio import atomic_dir

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt_id", "prompt", "completion", "score")
PROVENANCE_KEYS = ("source_model", "stage", "reward_spec", "seed")
REPORT_FILE = "pairs_report.json"
SKIP_REASONS = {
    "unscored": "completions whose score is None / NaN / inf (not usable on either side)",
    "duplicate_completions": "completions identical to an earlier one of the same prompt",
    "fewer_than_two": "prompts with fewer than two distinct scored completions",
    "all_equal": "prompts whose completions all have the same (passed, score): no preference",
    "below_margin": "prompts where no chosen/rejected pair reaches min_margin",
    "length_unbalanced": "prompts where every pair reaching the margin fails max_length_ratio",
    "duplicate_pairs": "pairs identical to one already emitted (same prompt, chosen, rejected)",
}


@dataclass
class PairReport:
    """What :func:`build_pairs` did: prompts seen, pairs emitted, and skips counted by reason (see SKIP_REASONS)."""

    prompts: int = 0
    completions: int = 0
    pairs: int = 0
    prompts_with_pairs: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        skips = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        return (
            f"{self.pairs} pairs from {self.prompts_with_pairs}/{self.prompts} prompts "
            f"({self.completions} completions); skipped: {skips}"
        )


def _text(value: Any) -> str:
    """The text of a completion: a string, or the contents of a conversational list of messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(m.get("content", "")) if isinstance(m, Mapping) else str(m) for m in value)
    return str(value)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_number(name: str, value: Any, ok: bool, fix: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ValueError(f"build_pairs: {name}={value!r} is invalid; {fix}")


def build_pairs_with_report(
    scored,
    *,
    min_margin: float = 0.0,
    max_pairs_per_prompt: int = 1,
    max_length_ratio: float | None = None,
    dedupe: bool = True,
    length_fn: Callable[[Any], int] | None = None,
    provenance: Mapping[str, Any] | None = None,
):
    """Build DPO pairs from a scored-samples ``datasets.Dataset``; returns ``(Dataset, PairReport)``.

    Args:
        scored: the "Scored samples" table: ``prompt_id``, ``prompt``, ``completion``, ``score`` (float or None),
            optionally ``passed`` (bool; without it only the score ranks) and provenance columns.
        min_margin: smallest ``score(chosen) - score(rejected)`` of a pair whose two completions have the same
            verdict (>= 0; 0 still needs chosen to score strictly higher). Pass-vs-fail pairs need no margin.
        max_pairs_per_prompt: cap of pairs per prompt (>= 1).
        max_length_ratio: when set (>= 1), ``max(len) / min(len)`` of chosen and rejected must not exceed it.
        dedupe: count identical completions of a prompt once (compared on their text, stripped).
        length_fn: length of a completion; default: characters of its text (pass a tokenizer-based one for tokens).
        provenance: ``source_model``, ``stage``, ``reward_spec``, ``seed`` for the provenance columns; keys not given
            are taken from the scored table's columns of the same name when present, else None.

    Output columns: ``prompt``, ``chosen``, ``rejected`` (TRL's preference format; conversational when the scored
    completions are), ``prompt_id``, ``score_chosen``, ``score_rejected``, and the provenance columns.
    """
    import datasets

    _check_number("min_margin", min_margin, _finite(min_margin) and min_margin >= 0, "pass a finite number >= 0")
    _check_number(
        "max_pairs_per_prompt", max_pairs_per_prompt,
        isinstance(max_pairs_per_prompt, int) and max_pairs_per_prompt >= 1, "pass an integer >= 1",
    )
    _check_number(
        "max_length_ratio", max_length_ratio,
        max_length_ratio is None or (_finite(max_length_ratio) and max_length_ratio >= 1), "pass null or a number >= 1",
    )
    unknown = sorted(set(provenance or {}) - set(PROVENANCE_KEYS))
    if unknown:
        raise ValueError(f"build_pairs: provenance has unknown keys {unknown}; accepted: {list(PROVENANCE_KEYS)}")
    if not isinstance(scored, datasets.Dataset):
        raise ValueError(
            f"build_pairs: scored must be a datasets.Dataset (the scored-samples table), got {type(scored).__name__}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in scored.column_names]
    if missing:
        raise ValueError(
            f"build_pairs: the scored table is missing the column(s) {missing} (columns found: {scored.column_names}); "
            f"it needs {list(REQUIRED_COLUMNS)} and optionally 'passed' (docs/architecture.md, 'Scored samples')"
        )
    length_fn = length_fn or (lambda completion: len(_text(completion)))
    has_passed = "passed" in scored.column_names
    report = PairReport(
        settings={
            "min_margin": min_margin, "max_pairs_per_prompt": max_pairs_per_prompt,
            "max_length_ratio": max_length_ratio, "dedupe": dedupe,
        }
    )

    # Group rows by prompt, in first-seen order.
    groups: dict[Any, list[dict]] = {}
    for row in scored:
        groups.setdefault(row["prompt_id"], []).append(row)
    report.prompts, report.completions = len(groups), len(scored)

    rows_out: list[dict] = []
    seen_pairs: set[tuple[str, str, str]] = set()
    for prompt_id, rows in groups.items():
        candidates, texts = [], set()
        for row in rows:
            if not _finite(row["score"]):
                report.skipped["unscored"] += 1
                continue
            text = _text(row["completion"]).strip()
            if dedupe and text in texts:
                report.skipped["duplicate_completions"] += 1
                continue
            texts.add(text)
            passed = bool(row["passed"]) if has_passed and row["passed"] is not None else None
            candidates.append({"row": row, "text": text, "score": float(row["score"]), "passed": passed,
                               "length": length_fn(row["completion"])})
        if len(candidates) < 2:
            report.skipped["fewer_than_two"] += 1
            continue

        def rank(c):
            return (1 if c["passed"] else 0) if has_passed else 0, c["score"]

        if len({rank(c) for c in candidates}) == 1:
            report.skipped["all_equal"] += 1
            continue
        best_first = sorted(candidates, key=rank, reverse=True)  # stable: ties keep table order
        worst_first = sorted(candidates, key=rank)
        used: set[int] = set()
        emitted, margin_ok = 0, False
        for chosen in best_first:
            if emitted >= max_pairs_per_prompt:
                break
            if id(chosen) in used:
                continue
            for rejected in worst_first:
                if id(rejected) in used or rejected is chosen:
                    continue
                if has_passed and (chosen["passed"] is False and rejected["passed"] is True):
                    continue  # never prefer a failing completion over a passing one
                if not rank(chosen) > rank(rejected):
                    continue
                by_verdict = has_passed and chosen["passed"] is True and rejected["passed"] is not True
                if not by_verdict and chosen["score"] - rejected["score"] < min_margin:
                    continue
                margin_ok = True
                if max_length_ratio is not None:
                    short, long = sorted((max(chosen["length"], 1), max(rejected["length"], 1)))
                    if long / short > max_length_ratio:
                        continue
                prompt_text = json.dumps(chosen["row"]["prompt"], sort_keys=True, default=str)
                key = (prompt_text, chosen["text"], rejected["text"])
                if key in seen_pairs:
                    report.skipped["duplicate_pairs"] += 1
                    continue
                seen_pairs.add(key)
                used.update((id(chosen), id(rejected)))
                rows_out.append(_pair_row(prompt_id, chosen, rejected, provenance or {}))
                emitted += 1
                break
        if emitted:
            report.prompts_with_pairs += 1
        elif margin_ok:
            report.skipped["length_unbalanced"] += 1
        else:
            report.skipped["below_margin"] += 1

    report.pairs = len(rows_out)
    if not rows_out:
        raise ValueError(
            f"build_pairs: no preference pair could be built ({report.summary()}). Typical causes: every prompt has "
            "fewer than two scored completions, all completions of a prompt score the same (sample more, or at a "
            "higher temperature), or min_margin / max_length_ratio are too strict."
        )
    logger.info("build_pairs: %s", report.summary())
    return datasets.Dataset.from_list(rows_out), report


def build_pairs(scored, **kwargs):
    """:func:`build_pairs_with_report` without the report (it is logged); returns the pairs ``datasets.Dataset``."""
    pairs, _ = build_pairs_with_report(scored, **kwargs)
    return pairs


def _pair_row(prompt_id: Any, chosen: dict, rejected: dict, provenance: Mapping[str, Any]) -> dict:
    source = chosen["row"]
    row = {
        "prompt": source["prompt"],
        "chosen": source["completion"],
        "rejected": rejected["row"]["completion"],
        "prompt_id": prompt_id,
        "score_chosen": chosen["score"],
        "score_rejected": rejected["score"],
    }
    for key in PROVENANCE_KEYS:
        value = provenance[key] if key in provenance else source.get(key)
        row[key] = None if value is None else str(value) if key != "seed" else int(value)
    return row


def save_pairs(pairs, path: str | os.PathLike, report: PairReport | None = None) -> str:
    """Save the pairs dataset (and ``pairs_report.json`` when a report is given) to ``path``, atomically.

    The dataset is written to a temporary directory beside ``path`` and renamed into place; an existing ``path`` is
    replaced only once the new one is complete. Returns ``path``.
    """
    path = os.fspath(path)
    with atomic_dir(path) as tmp:
        pairs.save_to_disk(tmp)
        if report is not None:
            with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
                json.dump(report.to_dict(), f, indent=2)
    return path
