"""Harvesting during RL: keep the completions a PPO / GRPO stage already generated and the rule checker passed, as
an SFT dataset in the same format and with the same provenance as offline rejection sampling. No extra generation.

Two small pieces, both attached in one place::

    harvest = HarvestCallback("runs/harvest", stage="grpo")
    trainer = GRPOTrainer(
        model=...,
        reward_funcs=[harvest.watch(checker), other_reward],   # same __name__, same metrics, still picklable
        callbacks=[harvest],
        ...
    )

Why this hook (docs/rejection_sampling.md has the longer comparison): GRPOTrainer hands every reward function the
prompts, the completions, the dataset columns (e.g. the gold ``answer``) and ``trainer_state`` for each generation
batch, on every process, once. :meth:`HarvestCallback.watch` returns :class:`HarvestingReward`, a thin picklable
object that calls the checker exactly as the trainer would, records what the checker saw and returned, and returns
the same rewards: the trainer's metrics (``rewards/<name>/mean`` ...) keep their names and values, and nothing new
is generated or scored. The alternatives lose data: the trainer's ``_logs`` buffer is private, holds only the last
generation batch and no dataset columns, and the ``completions/*.parquet`` files are only written at logging steps.

The callback turns the records into data, following the training loop:

- the wrapper appends each batch to ``staging/rank<R>.jsonl`` (one file per process);
- ``on_step_end`` moves the staging file to ``parts/step-<S>-rank<R>.jsonl`` with ``os.replace`` (atomic, one part
  per optimizer step and process); ``on_evaluate`` discards the staging file, so evaluation prompts are never
  harvested;
- ``on_train_begin`` removes staging leftovers and parts newer than the step training resumes from, so a resumed
  run appends after its checkpoint without duplicates;
- ``on_train_end`` (main process, after a barrier) calls :func:`finalize_harvest`, which writes ``sft/``,
  ``sft.jsonl``, ``scored/``, ``scored.jsonl``, ``README.md`` and ``summary.json`` exactly like
  :func:`trl_safeppo.rejection_sampling.run_rejection_sampling` (passing completions, deduplicated per prompt).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .fileio import write_text
from .rejection_sampling import DEDUP_MODES, SFT_FORMATS, Summary, describe, select, stable_prompt_id, write_products

# kwargs GRPOTrainer passes to reward functions that are not dataset columns
_TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")
_PART = re.compile(r"^step-(\d+)-rank(\d+)\.jsonl$")


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", 0))


def _staging_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / "staging" / f"rank{rank}.jsonl"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class HarvestingReward:
    """A reward function that records what it scores. Returns exactly what the wrapped reward returns.

    Args:
        reward_func: the checker, a TRL reward function (usually ``trl_safeppo.rewards.resolve(spec)``).
        directory: the harvest directory (the wrapper appends to ``staging/rank<R>.jsonl`` there).
        pass_threshold: a completion passes when its reward is not None and ``>= pass_threshold``; default the
            checker's own ``pass_threshold`` (a `RuleChecker`: full marks), else 1.0.

    ``__name__`` is the wrapped function's, so GRPOTrainer logs ``rewards/<name>/mean`` as before. Plain attributes
    only, so it pickles whenever the wrapped function does.
    """

    def __init__(self, reward_func, directory: str | os.PathLike, pass_threshold: float | None = None):
        if not callable(reward_func):
            raise ValueError(f"reward_func={reward_func!r}: pass a callable reward function (or a reward spec)")
        from trl.trainer.utils import is_async_callable

        if is_async_callable(reward_func):
            raise ValueError(
                f"reward_func={reward_func!r} is async; the harvester records synchronous reward functions only: "
                "watch a synchronous checker (e.g. trl_safeppo.rewards.resolve(spec)) and pass the async one unwatched"
            )
        self.reward_func = reward_func
        self.directory = os.fspath(directory)
        threshold = pass_threshold if pass_threshold is not None else getattr(reward_func, "pass_threshold", 1.0)
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"pass_threshold={threshold!r}: pass a finite number")
        self.pass_threshold = float(threshold)
        from trl.trainer.utils import get_callable_name

        self.__name__ = get_callable_name(reward_func)

    def __repr__(self) -> str:
        return f"HarvestingReward({self.reward_func!r}, directory={self.directory!r})"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        from .rewards import RuleChecker

        if isinstance(self.reward_func, RuleChecker):  # keep its per-rule breakdown and pass flags; log as it does
            scores = self.reward_func.score(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                            **kwargs)
            self.reward_func.log(scores, kwargs.get("log_metric"), kwargs.get("log_extra"))
            returned = scores.total
            totals, passed, rewards = list(scores.total), list(scores.passed), scores.rows()
        else:
            returned = list(self.reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                             **kwargs))
            totals = [None if t is None or math.isnan(float(t)) else float(t) for t in returned]
            passed = [t is not None and t >= self.pass_threshold for t in totals]
            rewards = [{self.__name__: t} for t in totals]
        self._record(prompts, completions, totals, passed, rewards, kwargs)
        return returned  # the checker's own values

    def _record(self, prompts, completions, totals, passed, rewards, kwargs) -> None:
        if prompts is None or completions is None:
            return
        state = kwargs.get("trainer_state")
        step = getattr(state, "global_step", None)
        columns = {
            k: v for k, v in kwargs.items()
            if k not in _TRAINER_KWARGS and isinstance(v, list) and len(v) == len(completions) and _jsonable(v)
        }
        path = _staging_path(self.directory, _rank())
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = {k: v[i] for k, v in columns.items()}
            prompt_id = row.pop("prompt_id", None)
            lines.append(json.dumps({
                "prompt_id": int(prompt_id) if prompt_id is not None else stable_prompt_id(prompt),
                "step": step,
                "prompt": prompt,
                "completion": completion,
                "score": totals[i],
                "passed": bool(passed[i]),
                "rewards": rewards[i],
                **row,
            }, ensure_ascii=False))
        with open(path, "a", encoding="utf-8") as f:  # one write per batch; a crash mid-write only hits staging
            f.write("\n".join(lines) + "\n")
            f.flush()


class HarvestCallback(TrainerCallback):
    """Collect, during a PPO / GRPO stage, the completions the rule checker passes, as an SFT dataset.

    Args:
        output_dir: the harvest directory (same products as offline rejection sampling, plus ``parts/``).
        stage: stage name written in the provenance columns.
        source_model: model name in the provenance; default the trained model's ``name_or_path``.
        reward_spec: reward spec text in the provenance; default the watched checker's ``repr``.
        dedup: ``none``, ``exact`` or ``normalized`` duplicate removal per prompt (across all steps).
        max_per_prompt: keep at most this many completions per prompt (highest scores first); None for no cap.
        sft_format: ``prompt_completion`` or ``messages``.

    Attach with ``reward_funcs=[harvest.watch(checker), ...]`` and ``callbacks=[harvest]``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        stage: str = "rl",
        source_model: str | None = None,
        reward_spec: Any = None,
        dedup: str = "normalized",
        max_per_prompt: int | None = None,
        sft_format: str = "prompt_completion",
    ):
        if dedup not in DEDUP_MODES:
            raise ValueError(f"dedup={dedup!r}: pass one of {', '.join(DEDUP_MODES)}")
        if sft_format not in SFT_FORMATS:
            raise ValueError(f"sft_format={sft_format!r}: pass one of {', '.join(SFT_FORMATS)}")
        if max_per_prompt is not None and (not isinstance(max_per_prompt, int) or max_per_prompt < 1):
            raise ValueError(f"max_per_prompt={max_per_prompt!r}: pass a positive integer, or None for no cap")
        self.output_dir = os.fspath(output_dir)
        self.stage = stage
        self.source_model = source_model
        self.reward_spec = reward_spec
        self.dedup = dedup
        self.max_per_prompt = max_per_prompt
        self.sft_format = sft_format
        self.watched: list[HarvestingReward] = []
        self.summary: Summary | None = None

    def watch(self, reward, pass_threshold: float | None = None) -> HarvestingReward:
        """Wrap the checker (a callable or a reward spec for ``trl_safeppo.rewards.resolve``) so it records."""
        if not callable(reward):
            from .rewards import resolve

            if self.reward_spec is None:
                self.reward_spec = reward
            reward = resolve(reward)
        wrapped = HarvestingReward(reward, self.output_dir, pass_threshold=pass_threshold)
        self.watched.append(wrapped)
        return wrapped

    # -- training events -------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        root = Path(self.output_dir)
        rank = args.process_index
        _staging_path(root, rank).unlink(missing_ok=True)
        parts = root / "parts"
        for path in parts.glob(f"step-*-rank{rank}.jsonl") if parts.is_dir() else ():
            match = _PART.match(path.name)
            if match and int(match.group(1)) > state.global_step:  # after the checkpoint we resume from
                path.unlink()
        if state.is_world_process_zero:
            root.mkdir(parents=True, exist_ok=True)
            provenance = self._provenance(args, model)
            write_text(root / "harvest.json", json.dumps(provenance, indent=2, sort_keys=True) + "\n")

    def on_step_end(self, args, state, control, **kwargs):
        self._commit(args.process_index, state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        _staging_path(self.output_dir, args.process_index).unlink(missing_ok=True)  # never harvest eval prompts

    def on_train_end(self, args, state, control, **kwargs):
        self._commit(args.process_index, state.global_step)
        _barrier()
        if state.is_world_process_zero:
            self.summary = finalize_harvest(self.output_dir, dedup=self.dedup, max_per_prompt=self.max_per_prompt,
                                            sft_format=self.sft_format)

    def _commit(self, rank: int, step: int) -> None:
        staging = _staging_path(self.output_dir, rank)
        if staging.exists():
            parts = Path(self.output_dir) / "parts"
            parts.mkdir(parents=True, exist_ok=True)
            os.replace(staging, parts / f"step-{step:08d}-rank{rank}.jsonl")

    def _provenance(self, args, model) -> dict:
        source = self.source_model
        if source is None and model is not None:
            config = getattr(model, "config", None)
            source = getattr(config, "name_or_path", None) or getattr(model, "name_or_path", None)
        spec = self.reward_spec
        if spec is None and self.watched:
            from .rewards import RuleChecker

            spec = "; ".join(
                repr(w.reward_func) if isinstance(w.reward_func, RuleChecker) else str(describe(w.reward_func))
                for w in self.watched
            )
        described = describe(spec)
        from . import __version__

        versions = {getattr(w.reward_func, "version", None) for w in self.watched} - {None}
        return {
            "source_model": source,
            "stage": self.stage,
            "step": None,
            "reward_spec": described if isinstance(described, str) or described is None else json.dumps(described),
            "reward_version": (sorted(versions)[0] if versions else f"trl_safeppo-{__version__}"),
            "temperature": float(getattr(args, "temperature", float("nan"))),
            "top_p": float(getattr(args, "top_p", 1.0)),
            "max_new_tokens": getattr(args, "max_completion_length", None),
            "num_completions": getattr(args, "num_generations", None),
            "seed": getattr(args, "seed", None),
        }


def _barrier() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except ImportError:  # pragma: no cover
        pass


def finalize_harvest(
    output_dir: str | os.PathLike,
    *,
    dedup: str = "normalized",
    max_per_prompt: int | None = None,
    sft_format: str = "prompt_completion",
) -> Summary:
    """Merge the committed parts of a harvest directory into the SFT set, the scored table and the card.

    Safe to call again at any time (e.g. after a crash): it only reads ``parts/`` and ``harvest.json`` and rewrites
    the products. Keeps every passing completion, deduplicated per prompt across steps, capped by ``max_per_prompt``.
    """
    out = Path(output_dir)
    provenance_file = out / "harvest.json"
    if not provenance_file.exists():
        raise ValueError(f"output_dir={os.fspath(output_dir)!r} is not a harvest directory (no harvest.json)")
    provenance = json.loads(provenance_file.read_text())
    records: list[dict] = []
    parts = sorted(
        (int(m.group(1)), int(m.group(2)), p)
        for p in (out / "parts").glob("step-*.jsonl") if (m := _PART.match(p.name))
    ) if (out / "parts").is_dir() else []
    for _, _, path in parts:
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    counters: dict[int, int] = {}
    groups: dict[int, list[dict]] = {}
    for record in records:
        record["sample_index"] = counters.get(record["prompt_id"], 0)
        counters[record["prompt_id"]] = record["sample_index"] + 1
        groups.setdefault(record["prompt_id"], []).append(record)
    kept, dropped = select(groups, selection="all_passing", dedup=dedup, max_per_prompt=max_per_prompt)
    summary = Summary(
        output_dir=str(out),
        prompts_seen=len(groups),
        prompts_sampled=len(groups),
        completions_generated=len(records),
        completions_passed=sum(r["passed"] for r in records),
        kept=len(kept),
        prompts_with_kept=len({r["prompt_id"] for r in kept}),
        dropped=dict(sorted(dropped.items())),
    )
    if not kept:
        summary.warnings.append(
            f"no completion passed the checker during training ({len(records)} recorded); the SFT set is empty"
            + ("" if records else ": nothing was recorded; is the checker wrapped with HarvestCallback.watch()?")
        )
        import warnings

        warnings.warn(f"harvest: {summary.warnings[-1]}", UserWarning, stacklevel=2)
    settings = {"selection": "all_passing", "dedup": dedup, "max_per_prompt": max_per_prompt,
                "sft_format": sft_format, "parts": len(parts)}
    write_products(out, scored=records, kept=kept, provenance=provenance, sft_format=sft_format, summary=summary,
                   settings=settings, title=f"Completions harvested during RL: {provenance.get('stage')}")
    return summary
