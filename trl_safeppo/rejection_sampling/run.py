"""The run, top to bottom: load the prompts, generate and score them chunk by chunk (resumable), select,
write (:func:`run_rejection_sampling`)."""

from __future__ import annotations

import json
import logging
import time
import types
import warnings

from .config import RejectionSamplingConfig, Summary, describe
from .generation import (
    Scorer, TransformersGenerator, VLLMGenerator, build_scorer, chunk_seed, load_prompt_dataset, score_completions,
    self_test_reward,
)
from .output import check_output_dir, hash_rows, init_output_dir, read_parts, write_jsonl, write_products
from .selection import prompt_key, select

logger = logging.getLogger(__name__)


def _load_prompts(config: RejectionSamplingConfig) -> tuple[list[dict], int, dict | None]:
    """Rows to sample (each with ``prompt_id`` = row index in the source) after decontamination, prompts seen, and
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
    specs = config.decontaminate
    specs = [] if specs is None else specs if isinstance(specs, (list, tuple)) else [specs]
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
    return [row for row in rows if prompt_key(row[config.prompt_column]) not in banned], len(rows), first


def _provenance(config: RejectionSamplingConfig, scorer: Scorer) -> dict:
    described = describe(config.reward)
    spec_text = described if isinstance(described, str) or described is None else json.dumps(described, sort_keys=True)
    if config.reward_model is not None:
        rm_text = f"{config.reward_model_weight:g} * reward_model({config.reward_model})"
        spec_text = rm_text if spec_text is None else f"{spec_text} + {rm_text}"
    return {
        "source_model": config.model, "stage": config.stage, "step": None, "reward_spec": spec_text,
        "reward_version": scorer.version, "temperature": float(config.temperature), "top_p": float(config.top_p),
        "max_new_tokens": config.max_new_tokens, "num_completions": config.num_completions, "seed": config.seed,
    }


def _record(row: dict, config: RejectionSamplingConfig, index: int, text: str, ids: list, truncated: bool) -> dict:
    """A completion of ``row`` before scoring; conversational prompts get a one-message assistant turn."""
    prompt = row[config.prompt_column]
    return {
        "prompt_id": int(row["prompt_id"]), "sample_index": index, "prompt": prompt,
        "completion": text if isinstance(prompt, str) else [{"role": "assistant", "content": text}],
        "num_tokens": len(ids), "truncated": bool(truncated),
        **{k: v for k, v in row.items() if k not in (config.prompt_column, "prompt_id", "completion")},
    }


def _process_chunk(rows: list[dict], config: RejectionSamplingConfig, generator, scorer: Scorer, seed: int):
    groups = generator([row[config.prompt_column] for row in rows], seed)
    pairs = [(row, i, s) for row, group in zip(rows, groups) for i, s in enumerate(group)]
    records = [_record(row, config, i, s["text"], s["ids"], s["truncated"]) for row, i, s in pairs]
    source = [k for k in rows[0] if k not in (config.prompt_column, "prompt_id", "completion")]
    columns = {k: [r[k] for r in records] for k in source}  # passed to the reward like GRPO's dataset columns
    scores = score_completions(scorer, [r["prompt"] for r in records], [r["completion"] for r in records],
                               [s["ids"] for _, _, s in pairs], columns)
    for record, scored in zip(records, scores):
        record.update(scored)
    return records


def run_rejection_sampling(config: RejectionSamplingConfig, *, distributed: bool = False) -> Summary:
    """Generate, score, select and write. Resumes an interrupted run in the same ``output_dir``; refuses a directory
    holding a different run unless ``config.overwrite``.

    ``distributed=True``: call this on every process of an ``accelerate launch`` (``trl-safeppo sample`` does);
    chunk ``i`` is generated by process ``i % world``, the main process writes the products, and every process
    returns the same summary. With the default ``False`` the calling process does everything alone.
    """
    import torch

    from ..models import resolve_model_path

    if config.model is None:
        raise ValueError("model=None: pass the policy to sample from (tiny://arithmetic, a model directory, a Hub id)")
    if config.output_dir is None:
        raise ValueError("output_dir=None: pass the directory to write the run to")
    if config.reward is None and config.reward_model is None:
        raise ValueError("reward=None and reward_model=None: pass a reward spec (e.g. 'math'), a reward_model, or both")
    model_path = resolve_model_path(config.model)
    if distributed:  # every process runs this function; each generates its share of the chunks
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True lets `accelerate launch` use gloo on CPU
    else:  # the part of PartialState used here, for the calling process alone
        state = types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                      device="cuda" if torch.cuda.is_available() else "cpu",
                                      wait_for_everyone=lambda: None)
    if config.use_vllm and state.num_processes > 1:
        raise ValueError(
            f"use_vllm=True with {state.num_processes} processes: vLLM generation runs in one process here; launch "
            "`trl-safeppo sample` without accelerate (vLLM uses the GPU itself), or set use_vllm=False"
        )
    scorer = build_scorer(config, state.device)
    rows, seen, first_row = _load_prompts(config)
    if config.self_test and scorer.checker is not None and rows:
        self_test_reward(scorer.checker, rows[: config.self_test_rows])
    prompts_hash = hash_rows(rows)
    out, status = check_output_dir(config, prompts_hash)  # every process checks, so all raise the same error
    state.wait_for_everyone()
    if state.is_main_process:
        init_output_dir(out, status, config, prompts_hash)
    state.wait_for_everyone()
    parts_dir = out / "parts"
    summary = Summary(output_dir=str(out), prompts_seen=seen, prompts_contaminated=seen - len(rows),
                      prompts_sampled=len(rows))

    # Generate and score the chunks not yet in parts/, each from its own seed
    chunks = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    todo = [i for i in range(len(chunks)) if not (parts_dir / f"chunk-{i:06d}.jsonl").exists()]
    mine = [i for i in todo if i % state.num_processes == state.process_index]
    summary.chunks_resumed = len(chunks) - len(todo)
    if status == "resume" and summary.chunks_resumed:
        logger.info("resuming %s: %d of %d chunks already done", out, summary.chunks_resumed, len(chunks))
    start = time.perf_counter()
    if mine:
        from tqdm.auto import tqdm

        generator = (VLLMGenerator if config.use_vllm else TransformersGenerator)(model_path, config, state.device)
        done_prompts = len(rows) - sum(len(chunks[i]) for i in todo)
        with tqdm(total=len(rows), initial=done_prompts, unit="prompt", desc="sample+score",
                  disable=not config.progress or not state.is_main_process) as bar:
            for i in mine:
                records = _process_chunk(chunks[i], config, generator, scorer, chunk_seed(config.seed, i))
                write_jsonl(records, parts_dir / f"chunk-{i:06d}.jsonl")
                bar.update(len(chunks[i]) * state.num_processes)
                bar.set_postfix(passed=f"{sum(r['passed'] for r in records)}/{len(records)}")
    state.wait_for_everyone()
    summary.seconds = time.perf_counter() - start
    summary.completions_generated_now = sum(len(chunks[i]) for i in todo) * config.num_completions
    summary.completions_per_second = summary.completions_generated_now / summary.seconds if summary.seconds > 0 else 0.0

    # Select and write (main process); the others read its summary
    if state.is_main_process:
        scored = read_parts(parts_dir)
        groups: dict[int, list[dict]] = {}
        for record in scored:
            groups.setdefault(record["prompt_id"], []).append(record)
        kept, dropped = select(groups, **{k: getattr(config, k) for k in (
            "selection", "top_k", "score_threshold", "pass_rate_band", "dedup", "max_per_prompt")})
        if summary.prompts_contaminated:
            dropped["contaminated"] = summary.prompts_contaminated
        summary.completions_generated, summary.completions_passed = len(scored), sum(r["passed"] for r in scored)
        summary.kept, summary.prompts_with_kept = len(kept), len({r["prompt_id"] for r in kept})
        summary.dropped = dict(sorted(dropped.items()))
        if summary.prompts_sampled == 0:
            summary.warnings.append(
                "no prompts to sample (the dataset is empty, num_prompts=0, or every prompt was decontaminated); the "
                "SFT set is empty"
            )
        elif summary.kept == 0:
            summary.warnings.append(
                f"no completion was kept out of {summary.completions_generated} (passed: "
                f"{summary.completions_passed}); the SFT set is empty. Check the reward spec, sample more "
                "(num_completions), or train the policy first"
            )
        for message in summary.warnings:
            warnings.warn(f"rejection sampling: {message}", UserWarning, stacklevel=2)
        write_products(out, scored=scored, kept=kept, provenance=_provenance(config, scorer),
                       sft_format=config.sft_format, summary=summary, settings=config.to_dict(),
                       title=f"Rejection-sampled SFT data: {config.stage}",
                       template_record=_template_record(first_row, config, scorer) if first_row is not None else None)
    state.wait_for_everyone()
    if not state.is_main_process:
        summary = Summary(**json.loads((out / "summary.json").read_text()))
    return summary


def _template_record(row: dict, config: RejectionSamplingConfig, scorer: Scorer) -> dict:
    """A scored record shaped like the real ones, used only to type the columns of an empty result."""
    names = list(scorer.checker.rule_names) if scorer.checker is not None else []
    names += ["reward_model"] if scorer.reward_model is not None else []
    return {**_record(dict(row, prompt_id=0), config, 0, "", [], False), "score": 0.0, "passed": False,
            "rewards": {name: 0.0 for name in names}, "kept": False, "drop_reason": ""}
