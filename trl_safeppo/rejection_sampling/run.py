"""The run, top to bottom: load the prompts, generate and score them chunk by chunk (resumable), select,
write (:func:`run_rejection_sampling`)."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from .config import RejectionSamplingConfig, Summary, describe
from .generation import (
    Scorer, TransformersGenerator, VLLMGenerator, chunk_seed, load_prompt_dataset, resolve_reward, score_completions,
    self_test_reward,
)
from .output import check_output_dir, hash_rows, init_output_dir, read_parts, write_jsonl, write_products
from .selection import prompt_key, select

logger = logging.getLogger(__name__)

def _load_prompts(config: RejectionSamplingConfig) -> tuple[list[dict], int, int, dict | None]:
    """Rows to sample (each with ``prompt_id`` = row index in the source), prompts seen, prompts contaminated, and
    the source's first row (None for an empty source)."""
    dataset = load_prompt_dataset(config.dataset)
    if len(dataset) and config.prompt_column not in dataset.column_names:
        raise ValueError(
            f"prompt_column={config.prompt_column!r} is not a column of the dataset (columns: "
            f"{', '.join(dataset.column_names)}); pass the column that holds the prompts"
        )
    first = dict(dataset[0]) if len(dataset) else None  # types an empty result's columns
    if config.num_prompts is not None:
        dataset = dataset.select(range(min(config.num_prompts, len(dataset))))
    rows = [dict(row, prompt_id=i) if "prompt_id" not in row else dict(row) for i, row in enumerate(dataset)]
    seen = len(rows)
    specs = config.decontaminate
    if specs is None:
        return rows, seen, 0, first
    specs = specs if isinstance(specs, (list, tuple)) else [specs]
    banned: set[str] = set()
    for spec in specs:
        eval_set = load_prompt_dataset(spec, field_name="decontaminate")
        column = config.prompt_column if config.prompt_column in eval_set.column_names else "prompt"
        if column not in eval_set.column_names:
            raise ValueError(
                f"decontaminate={spec!r} has no {config.prompt_column!r} or 'prompt' column (columns: "
                f"{', '.join(eval_set.column_names)})"
            )
        banned.update(prompt_key(p) for p in eval_set[column])
    clean = [row for row in rows if prompt_key(row[config.prompt_column]) not in banned]
    return clean, seen, seen - len(clean), first


def _build_scorer(config: RejectionSamplingConfig, device=None) -> Scorer:
    scorer = Scorer(reward_model_weight=config.reward_model_weight)
    if config.reward is not None:
        scorer.checker, scorer.version = resolve_reward(config.reward)
    if config.reward_model is not None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import resolve_model_path

        path = resolve_model_path(config.reward_model, field="reward_model")
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        scorer.reward_tokenizer = AutoTokenizer.from_pretrained(path)
        if scorer.reward_tokenizer.pad_token is None:
            scorer.reward_tokenizer.pad_token = scorer.reward_tokenizer.eos_token
        scorer.reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
        if scorer.reward_model.config.pad_token_id is None:
            scorer.reward_model.config.pad_token_id = scorer.reward_tokenizer.pad_token_id
    return scorer


def _provenance(config: RejectionSamplingConfig, scorer: Scorer) -> dict:
    spec = config.reward
    described = describe(spec)
    spec_text = described if isinstance(described, str) or described is None else json.dumps(described, sort_keys=True)
    if config.reward_model is not None:
        rm_text = f"{config.reward_model_weight:g} * reward_model({config.reward_model})"
        spec_text = rm_text if spec_text is None else f"{spec_text} + {rm_text}"
    return {
        "source_model": config.model,
        "stage": config.stage,
        "step": None,
        "reward_spec": spec_text,
        "reward_version": scorer.version,
        "temperature": float(config.temperature),
        "top_p": float(config.top_p),
        "max_new_tokens": config.max_new_tokens,
        "num_completions": config.num_completions,
        "seed": config.seed,
    }


def _completion_value(prompt: Any, text: str) -> Any:
    """Completion in the prompt's format: a one-message assistant turn for conversational prompts, else a string."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _process_chunk(rows: list[dict], config: RejectionSamplingConfig, generator, scorer: Scorer, seed: int):
    prompts = [row[config.prompt_column] for row in rows]
    groups = generator(prompts, seed)
    flat_prompts, flat_completions, flat_ids, records = [], [], [], []
    columns = {k: [] for k in rows[0] if k not in (config.prompt_column, "prompt_id", "completion")}
    for row, group in zip(rows, groups):
        for index, sample in enumerate(group):
            completion = _completion_value(row[config.prompt_column], sample["text"])
            flat_prompts.append(row[config.prompt_column])
            flat_completions.append(completion)
            flat_ids.append(sample["ids"])
            for k in columns:
                columns[k].append(row[k])
            records.append(
                {
                    "prompt_id": int(row["prompt_id"]),
                    "sample_index": index,
                    "prompt": row[config.prompt_column],
                    "completion": completion,
                    "num_tokens": len(sample["ids"]),
                    "truncated": bool(sample["truncated"]),
                    **{k: row[k] for k in columns},
                }
            )
    scores = score_completions(scorer, flat_prompts, flat_completions, flat_ids, columns)
    for record, scored in zip(records, scores):
        record.update(scored)
    return records


class _OneProcess:
    """The part of accelerate's ``PartialState`` used here, for a run confined to the calling process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def __init__(self):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def wait_for_everyone(self) -> None:
        pass


def run_rejection_sampling(config: RejectionSamplingConfig, *, distributed: bool = False) -> Summary:
    """Generate, score, select and write (see the module docstring). Resumes an interrupted run in the same
    ``output_dir``; refuses a directory holding a different run unless ``config.overwrite``.

    ``distributed=True``: call this on every process of an ``accelerate launch`` (``trl-safeppo sample`` does);
    chunk ``i`` is generated by process ``i % world`` on its own device, the main process writes the products, and
    every process returns the same summary. With the default ``False`` the calling process does everything alone
    (e.g. the main process of a multi-process job while the others wait).
    """
    from ..models import resolve_model_path

    if config.model is None:
        raise ValueError("model=None: pass the policy to sample from (tiny://arithmetic, a model directory, a Hub id)")
    if config.output_dir is None:
        raise ValueError("output_dir=None: pass the directory to write the run to")
    if config.reward is None and config.reward_model is None:
        raise ValueError("reward=None and reward_model=None: pass a reward spec (e.g. 'math'), a reward_model, or both")
    model_path = resolve_model_path(config.model)
    if distributed:  # every process runs this function; each generates its share of the chunks
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True lets `accelerate launch` use gloo on CPU
    else:
        state = _OneProcess()
    if config.use_vllm and state.num_processes > 1:
        raise ValueError(
            f"use_vllm=True with {state.num_processes} processes: vLLM generation runs in one process here; launch "
            "`trl-safeppo sample` without accelerate (vLLM uses the GPU itself), or set use_vllm=False"
        )
    scorer = _build_scorer(config, state.device)
    rows, seen, contaminated, first_row = _load_prompts(config)
    if config.self_test and scorer.checker is not None and rows:
        self_test_reward(scorer.checker, rows[: config.self_test_rows])
    prompts_hash = hash_rows(rows)
    out, status = check_output_dir(config, prompts_hash)  # every process checks, so all raise the same error
    state.wait_for_everyone()
    if state.is_main_process:
        init_output_dir(out, status, config, prompts_hash)
    state.wait_for_everyone()
    resuming = status == "resume"
    parts_dir = out / "parts"
    provenance = _provenance(config, scorer)
    summary = Summary(output_dir=str(out), prompts_seen=seen, prompts_contaminated=contaminated)
    summary.prompts_sampled = len(rows)

    chunks = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    todo = [i for i in range(len(chunks)) if not (parts_dir / f"chunk-{i:06d}.jsonl").exists()]
    mine = [i for i in todo if i % state.num_processes == state.process_index]
    summary.chunks_resumed = len(chunks) - len(todo)
    if resuming and summary.chunks_resumed:
        logger.info("resuming %s: %d of %d chunks already done", out, summary.chunks_resumed, len(chunks))

    start = time.perf_counter()
    if mine:
        generator = (VLLMGenerator if config.use_vllm else TransformersGenerator)(model_path, config, state.device)
        from tqdm.auto import tqdm

        done_prompts = sum(len(chunks[i]) for i in range(len(chunks)) if i not in set(todo))
        bar = tqdm(total=len(rows), initial=done_prompts, unit="prompt", desc="sample+score",
                   disable=not config.progress or not state.is_main_process)
        try:
            for i in mine:
                records = _process_chunk(chunks[i], config, generator, scorer, chunk_seed(config.seed, i))
                write_jsonl(records, parts_dir / f"chunk-{i:06d}.jsonl")
                bar.update(len(chunks[i]) * state.num_processes)
                bar.set_postfix(passed=f"{sum(r['passed'] for r in records)}/{len(records)}")
        finally:
            bar.close()
    state.wait_for_everyone()
    summary.seconds = time.perf_counter() - start
    summary.completions_generated_now = sum(len(chunks[i]) for i in todo) * config.num_completions
    summary.completions_per_second = summary.completions_generated_now / summary.seconds if summary.seconds > 0 else 0.0

    if state.is_main_process:
        scored = read_parts(parts_dir)
        template = _template_record(first_row, config, scorer) if first_row is not None else None
        summary = _finish(out, scored, config, provenance, summary, template)
    state.wait_for_everyone()
    if not state.is_main_process:
        summary = Summary(**json.loads((out / "summary.json").read_text()))
    return summary


def _template_record(row: dict, config: RejectionSamplingConfig, scorer: Scorer) -> dict:
    """A scored record shaped like the real ones, used only to type the columns of an empty result."""
    prompt = row[config.prompt_column]
    names = list(scorer.checker.rule_names) if scorer.checker is not None else []
    names += ["reward_model"] if scorer.reward_model is not None else []
    return {
        "prompt_id": 0, "sample_index": 0, "prompt": prompt, "completion": _completion_value(prompt, ""),
        "num_tokens": 0, "truncated": False,
        **{k: v for k, v in row.items() if k not in (config.prompt_column, "prompt_id", "completion")},
        "score": 0.0, "passed": False, "rewards": {name: 0.0 for name in names}, "kept": False, "drop_reason": "",
    }


def _finish(
    out: Path,
    scored: list[dict],
    config: RejectionSamplingConfig,
    provenance: dict,
    summary: Summary,
    template: dict | None = None,
) -> Summary:
    groups: dict[int, list[dict]] = {}
    for record in scored:
        groups.setdefault(record["prompt_id"], []).append(record)
    kept, dropped = select(
        groups,
        selection=config.selection,
        top_k=config.top_k,
        score_threshold=config.score_threshold,
        pass_rate_band=config.pass_rate_band,
        dedup=config.dedup,
        max_per_prompt=config.max_per_prompt,
    )
    if summary.prompts_contaminated:
        dropped["contaminated"] = summary.prompts_contaminated
    summary.completions_generated = len(scored)
    summary.completions_passed = sum(r["passed"] for r in scored)
    summary.kept = len(kept)
    summary.prompts_with_kept = len({r["prompt_id"] for r in kept})
    summary.dropped = dict(sorted(dropped.items()))
    if summary.prompts_sampled == 0:
        summary.warnings.append(
            "no prompts to sample (the dataset is empty, num_prompts=0, or every prompt was decontaminated); the SFT "
            "set is empty"
        )
    elif summary.kept == 0:
        summary.warnings.append(
            f"no completion was kept out of {summary.completions_generated} (passed: {summary.completions_passed}); "
            "the SFT set is empty. Check the reward spec, sample more (num_completions), or train the policy first"
        )
    for message in summary.warnings:
        warnings.warn(f"rejection sampling: {message}", UserWarning, stacklevel=3)
    write_products(
        out,
        scored=scored,
        kept=kept,
        provenance=provenance,
        sft_format=config.sft_format,
        summary=summary,
        settings=config.to_dict(),
        title=f"Rejection-sampled SFT data: {config.stage}",
        template_record=template,
    )
    return summary
