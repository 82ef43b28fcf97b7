"""What a run writes and reads back: the SFT and scored products with their dataset card, the output directory
and its resume check (``run.json``, ``parts/``), and the loaders of a finished run. Written through
:mod:`trl_safeppo.fileio`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..fileio import atomic_dir, write_json, write_text
from .config import DROP_REASONS, LAYOUT_VERSION, NOT_FINGERPRINTED, OUTPUT_LAYOUT, RejectionSamplingConfig, Summary

# ---------------------------------------------------------------------------------------------------------------
# Output: SFT rows, scored rows, card
PROVENANCE_COLUMNS = (
    "prompt_id", "sample_index", "score", "source_model", "stage", "step", "reward_spec", "reward_version",
    "temperature", "top_p", "max_new_tokens", "num_completions", "seed",
)
# Columns of the scored table (docs/architecture.md "Scored samples"), then the source columns and provenance.
SCORED_COLUMNS = (
    "prompt_id", "sample_index", "prompt", "completion", "score", "passed", "rewards", "kept", "drop_reason",
)
SCORED_PROVENANCE = ("source_model", "stage", "reward_spec", "reward_version", "seed")


def sft_row(record: dict, provenance: dict, sft_format: str) -> dict:
    """One SFT row in TRL's format plus the provenance columns."""
    prompt, completion = record["prompt"], record["completion"]
    if sft_format == "messages":  # a plain-text prompt / completion becomes a user / assistant turn
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
        row = {"messages": turns + reply}
    else:
        row = {"prompt": prompt, "completion": completion}
    row.update({k: provenance.get(k) for k in PROVENANCE_COLUMNS})
    row.update(prompt_id=record["prompt_id"], sample_index=record["sample_index"], score=record["score"])
    if record.get("step") is not None:
        row["step"] = record["step"]
    return row


_EMPTY_TYPES = {
    "prompt_id": "int64", "sample_index": "int64", "step": "int64", "max_new_tokens": "int64",
    "num_completions": "int64", "seed": "int64", "num_tokens": "int64",
    "score": "float64", "temperature": "float64", "top_p": "float64",
    "passed": "bool", "kept": "bool", "truncated": "bool",
}


def write_jsonl(rows: Iterable[dict], path: Path) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows))


def _json_default(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _write_table(path: Path, rows: list[dict], template_rows: list[dict], columns: Sequence[str]) -> None:
    """``rows`` as a ``save_to_disk`` dataset at ``path`` and as ``<path>.jsonl``. With no rows the dataset is empty
    but typed: the columns of ``template_rows`` when given, else ``columns`` (plain types)."""
    from datasets import Dataset, Features, Value
    from datasets.utils import logging as datasets_logging

    if rows:
        dataset = Dataset.from_list(rows)
    elif template_rows:
        dataset = Dataset.from_list(template_rows[:1]).select([])
    else:
        features = Features({c: Value(_EMPTY_TYPES.get(c, "string")) for c in columns})
        dataset = Dataset.from_dict({c: [] for c in columns}, features=features)
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one "Saving the dataset" bar per product is noise
    try:
        with atomic_dir(path) as tmp:
            # an empty dataset needs one explicit (empty) shard, or load_from_disk cannot read it back
            dataset.save_to_disk(tmp, num_shards=1 if len(dataset) == 0 else None)
    finally:
        if bars:
            datasets_logging.enable_progress_bar()
    write_jsonl(rows, path.with_suffix(".jsonl"))


def write_products(out: Path, *, scored: list[dict], kept: list[dict], provenance: dict, sft_format: str,
                   summary: Summary, settings: dict, title: str, template_record: dict | None = None) -> None:
    """Write sft/, sft.jsonl, scored/, scored.jsonl, README.md, then summary.json (last: it marks completion).
    ``template_record`` types the columns when ``scored`` is empty."""
    template = scored[:1] or ([template_record] if template_record is not None else [])
    sft_columns = [*(["messages"] if sft_format == "messages" else ["prompt", "completion"]), *PROVENANCE_COLUMNS]
    (out / "summary.json").unlink(missing_ok=True)
    _write_table(out / "sft", [sft_row(r, provenance, sft_format) for r in kept],
                 [sft_row(r, provenance, sft_format) for r in template], sft_columns)
    _write_table(out / "scored", [_scored_row(r, provenance) for r in scored],
                 [_scored_row(r, provenance) for r in template], [*SCORED_COLUMNS, *SCORED_PROVENANCE])
    write_text(out / "README.md", dataset_card(summary, provenance, settings, sft_format, title))
    write_json(out / "summary.json", summary.to_dict())


def _scored_row(record: dict, provenance: dict) -> dict:
    return {**record, **{k: provenance.get(k) for k in SCORED_PROVENANCE if k not in record}}


def dataset_card(summary: Summary, provenance: dict, settings: dict, sft_format: str, title: str) -> str:
    """The README.md written beside the data: what it is, counts (kept, dropped and why), provenance, settings."""
    dropped_lines = "\n".join(
        f"| {reason} | {count} | {DROP_REASONS.get(reason, '')} |"
        for reason, count in sorted(summary.dropped.items())
    ) or "| (none) | 0 | |"
    columns = "`messages`" if sft_format == "messages" else "`prompt`, `completion`"
    warn = "".join(f"\n> **Warning:** {w}\n" for w in summary.warnings)
    return f"""---
tags:
- trl
- sft
- rejection-sampling
- trl-safeppo
---
# {title}
{warn}
Supervised fine-tuning data produced by `trl_safeppo` rejection sampling (stage `{provenance.get("stage")}`) from
`{provenance.get("source_model")}`: completions scored with `{provenance.get("reward_spec")}` and selected with
`{settings.get("selection", "all_passing")}`. Format: TRL SFT, {columns} columns, plus provenance columns
({", ".join(f"`{c}`" for c in PROVENANCE_COLUMNS)}).

```python
from datasets import load_from_disk
train_dataset = load_from_disk("{{this directory}}/sft")   # or sft.jsonl; scored/ holds every scored completion
```

## Counts

| | count |
|---|---|
| prompts seen | {summary.prompts_seen} |
| prompts dropped by decontamination | {summary.prompts_contaminated} |
| prompts sampled | {summary.prompts_sampled} |
| completions generated | {summary.completions_generated} |
| completions passing the checker | {summary.completions_passed} |
| completions kept | {summary.kept} |
| prompts with at least one kept completion | {summary.prompts_with_kept} |
| throughput (completions/s, this invocation) | {summary.completions_per_second:.2f} |

## Dropped, and why

| reason | count | meaning |
|---|---|---|
{dropped_lines}

## Provenance

```json
{json.dumps(provenance, indent=2, sort_keys=True, default=str)}
```

## Settings

```json
{json.dumps(settings, indent=2, sort_keys=True, default=str)}
```
"""


# ---------------------------------------------------------------------------------------------------------------
# The run
def hash_rows(rows: list[dict]) -> str:
    """Content hash of the prompt rows a run samples (prompts and every other column, in order)."""
    blob = "".join(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False) for row in rows)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_output_dir(config: RejectionSamplingConfig, prompts_hash: str) -> tuple[Path, str]:
    """Read-only check of ``output_dir``: ``"new"``, ``"resume"`` (same fingerprint) or ``"replace"`` (a different
    run and ``overwrite=True``); raises ``ValueError`` for a different run without overwrite, or foreign content."""
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={config.output_dir!r} is a file; pass a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out, "new"
    run_file = out / "run.json"
    if not run_file.exists():
        raise ValueError(
            f"output_dir={config.output_dir!r} is not empty and holds no rejection-sampling run (no run.json); "
            "pass an empty or new directory (overwrite only replaces a previous run)"
        )
    previous = json.loads(run_file.read_text())
    fingerprint = config.fingerprint(prompts_hash)
    if previous.get("fingerprint") == fingerprint:
        return out, "resume"
    if not config.overwrite:
        changed = sorted(
            k for k, v in config.to_dict().items()
            if k not in NOT_FINGERPRINTED and previous.get("config", {}).get(k) != v
        ) + (["the prompts (their content)"] if previous.get("prompts_hash") != prompts_hash else [])
        raise ValueError(
            f"output_dir={config.output_dir!r} already holds a different run (fingerprint "
            f"{previous.get('fingerprint')} vs {fingerprint}; settings that differ: {', '.join(changed) or '?'}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output_dir"
        )
    return out, "replace"


def init_output_dir(out: Path, status: str, config: RejectionSamplingConfig, prompts_hash: str) -> None:
    """Main process only: remove the replaced run's files (only ours), then write run.json and parts/."""
    if status == "replace":
        for target in (out / name for name in OUTPUT_LAYOUT):  # only our own files
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if status != "resume":
        payload = {"fingerprint": config.fingerprint(prompts_hash), "prompts_hash": prompts_hash,
                   "layout": LAYOUT_VERSION, "config": config.to_dict()}
        write_text(out / "run.json", json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_parts(parts_dir: Path) -> list[dict]:
    lines = (line for path in sorted(parts_dir.glob("*.jsonl")) for line in path.read_text("utf-8").split("\n"))
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Loading results
def _load_product(output_dir: str | os.PathLike, name: str):
    from datasets import load_from_disk

    if not (Path(output_dir) / "summary.json").exists():
        raise ValueError(f"output_dir={os.fspath(output_dir)!r} holds no finished run (no summary.json)")
    return load_from_disk(str(Path(output_dir) / name))


def load_sft_dataset(output_dir: str | os.PathLike, *, provenance: bool = True):
    """The selected SFT set of a finished run (``provenance=False`` keeps only the TRL SFT columns)."""
    dataset = _load_product(output_dir, "sft")
    if not provenance:
        dataset = dataset.remove_columns([c for c in dataset.column_names if c in PROVENANCE_COLUMNS])
    return dataset


def load_scored_samples(output_dir: str | os.PathLike):
    """Every scored completion of a finished run (the "Scored samples" table; input of ``pairs.build_pairs``)."""
    return _load_product(output_dir, "scored")
