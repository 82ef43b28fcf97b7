"""Offline rejection sampling: generate ``n`` completions per prompt, score them, keep the ones the rules accept,
and write them as a TRL SFT dataset with provenance and a dataset card.

This is the DeepSeek-R1 recipe's data stage (https://arxiv.org/abs/2501.12948, section 2.3.3): after RL, sample many
reasoning traces from the policy, keep only the correct ones, and fine-tune on them. Beside the selected SFT set the
run keeps the table of *every* scored completion (docs/architecture.md, "Scored samples"), from which
:func:`trl_safeppo.pairs.build_pairs` builds DPO pairs without generating again.

The steps, top to bottom:

1. load the prompts, drop prompts that appear in an evaluation set (decontamination by normalized prompt text);
2. for each chunk of ``batch_size`` prompts: generate ``num_completions`` completions (transformers ``generate``,
   or vLLM when asked), score them with the reward spec, and write the scored chunk to ``parts/`` atomically. A
   rerun after an interruption skips the chunks already written; every chunk draws from its own seed, so the result
   is the same as an uninterrupted run;
3. select per prompt (``all_passing``, ``best_of_n``, ``top_k``, ``threshold``, ``pass_rate_band``), deduplicate,
   cap, and write the products (layout in :data:`OUTPUT_LAYOUT` and docs/rejection_sampling.md).

Python: ``run_rejection_sampling(RejectionSamplingConfig(...)) -> Summary``. CLI: ``trl-safeppo sample ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SELECTION_MODES = ("all_passing", "best_of_n", "top_k", "threshold", "pass_rate_band")
SFT_FORMATS = ("prompt_completion", "messages")
DEDUP_MODES = ("none", "exact", "normalized")
LAYOUT_VERSION = 1

# What a finished output directory holds (the contract the recipe runner, SFT and pair building rely on).
OUTPUT_LAYOUT = {
    "sft": "selected SFT set, datasets.Dataset.save_to_disk (TRL prompt/completion or messages format)",
    "sft.jsonl": "the same rows as JSON lines",
    "scored": "every scored completion (the 'Scored samples' table of docs/architecture.md), save_to_disk",
    "scored.jsonl": "the same rows as JSON lines",
    "README.md": "dataset card: counts, provenance, settings",
    "summary.json": "the Summary as JSON; written last, so its presence marks a finished run",
    "run.json": "the run's configuration and fingerprint (a rerun resumes, a different run is refused)",
    "parts": "one JSON-lines file of scored completions per chunk of prompts (resume)",
}
_PRODUCTS = ("sft", "sft.jsonl", "scored", "scored.jsonl", "README.md", "summary.json")

# Why a completion (or a prompt) was not kept. Completion reasons are counted per completion, prompt reasons per prompt.
DROP_REASONS = {
    "failed_check": "the rule checker did not pass it",
    "unscored": "every reward returned None",
    "below_threshold": "score below score_threshold",
    "outside_pass_rate_band": "its prompt's pass rate is outside pass_rate_band (always or never solved)",
    "duplicate": "same text as a kept completion of the same prompt (exact or normalized)",
    "not_top_ranked": "not among the best_of_n / top_k highest scores of its prompt",
    "over_cap": "beyond max_per_prompt for its prompt",
}
PROMPT_DROP_REASONS = {"contaminated": "the prompt appears in a decontamination set (normalized match)"}


# ---------------------------------------------------------------------------------------------------------------
# Configuration
@dataclass
class RejectionSamplingConfig:
    r"""Settings of one rejection-sampling run.

    Parameters:
        > Model and prompts

        model (`str`):
            Policy to sample from: `tiny://<name>`, a local model directory (e.g. a previous stage's `final/`), or a
            Hub id.
        dataset (`str` or `datasets.Dataset`, *optional*, defaults to `"arithmetic:rl"`):
            Prompts: `arithmetic:<split>` or `task://arithmetic/<split>` (the embedded task), a `save_to_disk`
            directory, a `.jsonl`/`.json`/`.parquet` file, or a `datasets.Dataset`. Other columns (e.g. the gold
            `answer`) are passed to the reward and kept in the scored table.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompt: conversational (a list of `{"role", "content"}`) or a plain string.
        num_prompts (`int` or `None`, *optional*, defaults to `None`):
            Use only the first `num_prompts` prompts of the dataset (before decontamination); `None` for all.

        > Sampling

        num_completions (`int`, *optional*, defaults to `8`):
            Completions generated per prompt (the `n` of best-of-n). DeepSeek-R1 samples several responses per prompt
            and keeps only the correct ones (arXiv:2501.12948, section 2.3.3).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass, in (0, 1].
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Longest completion, in tokens; longer ones are cut and marked `truncated`.
        seed (`int`, *optional*, defaults to `0`):
            Base seed. Each chunk of prompts draws from its own seed derived from `seed` and the chunk index, so a
            resumed run reproduces an uninterrupted one.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per generation batch; also the unit of resume (one file in `parts/` per batch).
        use_vllm (`bool`, *optional*, defaults to `False`):
            Generate with vLLM (`pip install trl-safeppo[vllm]`) instead of transformers.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Share of GPU memory vLLM may take (vLLM's own default); lower it when another model stays resident.

        > Scoring

        reward (`str`, `list`, callable or `None`, *optional*, defaults to `None`):
            Reward spec, turned into one TRL-signature callable by `trl_safeppo.rewards.resolve` (built-in name,
            dotted path, or a list with weights and gates) and self-tested before sampling starts. Its pass
            criterion decides `passed`.
        reward_model (`str` or `None`, *optional*, defaults to `None`):
            A sequence-classification reward model (same identifiers as `model`); its first logit is added to the
            score with weight `reward_model_weight`. At least one of `reward` and `reward_model` is required.
        reward_model_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the reward model in the score.
        self_test (`bool`, *optional*, defaults to `True`):
            Before sampling, run the verifier self-test of `trl-safeppo check-rewards` on the first `self_test_rows`
            prompts: a gold completion built from the `answer` column must pass, a wrong one must not, scores must
            be deterministic. A failing spec stops the run before anything is generated. Turn off only for a reward
            without a gold answer.
        self_test_rows (`int`, *optional*, defaults to `16`):
            Prompts the self-test uses.

        > Selection

        selection (`str`, *optional*, defaults to `"all_passing"`):
            `all_passing` keeps every completion that passes the checker (R1's rejection sampling); `best_of_n` keeps
            the highest-scoring passing completion of each prompt; `top_k` the `top_k` highest-scoring passing ones;
            `threshold` every completion with score >= `score_threshold`; `pass_rate_band` the passing completions
            of prompts whose pass rate lies strictly inside `pass_rate_band` (neither always nor never solved).
        top_k (`int`, *optional*, defaults to `2`):
            Completions kept per prompt by `selection="top_k"`.
        score_threshold (`float` or `None`, *optional*, defaults to `None`):
            Minimum score for `selection="threshold"` (required by that mode).
        pass_rate_band (`tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`):
            Open interval (low, high) of per-prompt pass rates kept by `selection="pass_rate_band"`.
        dedup (`str`, *optional*, defaults to `"normalized"`):
            Drop repeated completions of the same prompt: `exact` text matches, `normalized` also catches case and
            whitespace variants, `none` keeps them.
        max_per_prompt (`int` or `None`, *optional*, defaults to `None`):
            Keep at most this many completions per prompt (the highest scores); `None` for no cap.
        decontaminate (`str`, `list` or `None`, *optional*, defaults to `None`):
            Dataset spec(s), as for `dataset`, of evaluation sets: prompts whose normalized text appears there are
            dropped before generation. E.g. `"arithmetic:eval"`.

        > Output

        output_dir (`str`):
            Directory of the run (layout in docs/rejection_sampling.md). A rerun with the same settings resumes;
            a directory holding a different run is refused unless `overwrite=True`.
        sft_format (`str`, *optional*, defaults to `"prompt_completion"`):
            TRL SFT format of the selected set: `prompt_completion` (SFTTrainer trains on the completion only) or
            `messages` (one conversation per row; a plain-text prompt becomes a user turn).
        stage (`str`, *optional*, defaults to `"rejection_sampling"`):
            Stage name written in the provenance columns.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a different run found in `output_dir`.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over prompts.
    """

    # Model and prompts
    model: str = field(
        default=None,
        metadata={"help": "Policy to sample from: tiny://<name>, a local model directory, or a Hub id."},
    )
    dataset: Any = field(
        default="arithmetic:rl",
        metadata={
            "help": "Prompts: arithmetic:<split>, a save_to_disk directory, a .jsonl/.json/.parquet file, or a "
            "datasets.Dataset."
        },
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    num_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first num_prompts prompts (before decontamination)."}
    )
    # Sampling
    num_completions: int = field(
        default=8,
        metadata={"help": "Completions per prompt (DeepSeek-R1, arXiv:2501.12948, section 2.3.3)."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    seed: int = field(default=0, metadata={"help": "Base seed; each chunk of prompts derives its own seed from it."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch (and per resume chunk)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM instead of transformers."})
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Share of GPU memory vLLM may take (lower it when another model is resident)."}
    )
    # Scoring
    reward: Any = field(
        default=None,
        metadata={
            "help": "Reward spec for trl_safeppo.rewards.resolve: a built-in name, a dotted path, or a YAML/JSON list "
            "such as '[format, math]'."
        },
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Sequence-classification reward model added to the score."}
    )
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model in the score."})
    self_test: bool = field(
        default=True,
        metadata={"help": "Self-test the reward spec on the first self_test_rows prompts before sampling."},
    )
    self_test_rows: int = field(default=16, metadata={"help": "Prompts the reward self-test uses."})
    # Selection
    selection: str = field(
        default="all_passing",
        metadata={"help": "all_passing, best_of_n, top_k, threshold or pass_rate_band."},
    )
    top_k: int = field(default=2, metadata={"help": "Completions kept per prompt by selection=top_k."})
    score_threshold: float | None = field(
        default=None, metadata={"help": "Minimum score for selection=threshold."}
    )
    pass_rate_band: tuple[float, float] = field(
        default=(0.0, 1.0),
        metadata={"help": "Open interval (low, high) of per-prompt pass rates kept by selection=pass_rate_band."},
    )
    dedup: str = field(default="normalized", metadata={"help": "Duplicate removal: none, exact or normalized."})
    max_per_prompt: int | None = field(default=None, metadata={"help": "At most this many completions per prompt."})
    decontaminate: Any = field(
        default=None, metadata={"help": "Dataset spec(s) of evaluation sets whose prompts are dropped."}
    )
    # Output
    output_dir: str = field(default=None, metadata={"help": "Directory of the run."})
    sft_format: str = field(
        default="prompt_completion", metadata={"help": "SFT format: prompt_completion or messages."}
    )
    stage: str = field(default="rejection_sampling", metadata={"help": "Stage name in the provenance columns."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a different run found in output_dir."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over prompts."})

    def __post_init__(self):
        def bad(name: str, fix: str):
            raise ValueError(f"{name}={getattr(self, name)!r}: {fix}")

        # model, reward and output_dir may be left for later (a recipe runner fills them in); run_rejection_sampling
        # requires them. When given, they are checked here.
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            bad("model", "pass the policy to sample from (tiny://arithmetic, a model directory or a Hub id)")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
                bad("output_dir", "pass the directory to write the run to")
            self.output_dir = os.fspath(self.output_dir)
        if self.num_prompts is not None and (_not_int(self.num_prompts) or self.num_prompts < 0):
            bad("num_prompts", "pass a non-negative integer, or None for every prompt")
        for name in ("num_completions", "max_new_tokens", "batch_size", "top_k", "self_test_rows"):
            if _not_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "pass a positive integer")
        if self.max_per_prompt is not None and (_not_int(self.max_per_prompt) or self.max_per_prompt < 1):
            bad("max_per_prompt", "pass a positive integer, or None for no cap")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            bad("temperature", "pass a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "pass a number in (0, 1]")
        if _not_int(self.seed):
            bad("seed", "pass an integer")
        if self.selection not in SELECTION_MODES:
            bad("selection", f"pass one of {', '.join(SELECTION_MODES)}")
        if self.selection == "threshold" and self.score_threshold is None:
            bad("score_threshold", "selection='threshold' needs a score_threshold (a number)")
        if self.score_threshold is not None and not _finite(self.score_threshold):
            bad("score_threshold", "pass a finite number")
        band = tuple(self.pass_rate_band) if isinstance(self.pass_rate_band, (list, tuple)) else None
        if band is None or len(band) != 2 or not all(_finite(b) for b in band) or not 0 <= band[0] < band[1] <= 1:
            bad("pass_rate_band", "pass two numbers (low, high) with 0 <= low < high <= 1, e.g. (0.0, 1.0)")
        self.pass_rate_band = (float(band[0]), float(band[1]))
        if self.dedup not in DEDUP_MODES:
            bad("dedup", f"pass one of {', '.join(DEDUP_MODES)}")
        if self.sft_format not in SFT_FORMATS:
            bad("sft_format", f"pass one of {', '.join(SFT_FORMATS)}")
        if self.reward is not None:
            from .rewards import validate_spec

            validate_spec(self.reward, path="reward")  # names, options and dotted paths; the self-test runs later
        if not _finite(self.vllm_gpu_memory_utilization) or not 0 < self.vllm_gpu_memory_utilization <= 1:
            bad("vllm_gpu_memory_utilization", "pass a number in (0, 1]")
        if not _finite(self.reward_model_weight):
            bad("reward_model_weight", "pass a finite number")
        if not isinstance(self.stage, str) or not self.stage:
            bad("stage", "pass a non-empty stage name")
        if self.use_vllm and not _vllm_available():
            bad(
                "use_vllm",
                "vLLM is not installed: `pip install trl-safeppo[vllm]` (needs a GPU), or set use_vllm=False to "
                "generate with transformers",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (datasets and callables described by name and fingerprint)."""
        return {f.name: _describe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def fingerprint(self, prompts_hash: str | None = None) -> str:
        """Hash of every setting that changes the output (all but output_dir, overwrite, progress, self_test*) and
        of the prompts actually sampled (``prompts_hash``, see :func:`hash_rows`)."""
        settings = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        blob = json.dumps(
            {"layout": LAYOUT_VERSION, "settings": settings, "prompts": prompts_hash}, sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# settings that do not change the output (a rerun that differs only in these resumes)
_NOT_FINGERPRINTED = (
    "output_dir", "overwrite", "progress", "self_test", "self_test_rows", "vllm_gpu_memory_utilization",
)


def _not_int(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _describe(value: Any) -> Any:
    """A JSON-able, stable description of a setting (datasets by shape, callables by qualified name)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if hasattr(value, "column_names") and hasattr(value, "num_rows"):  # a datasets.Dataset: its rows enter the
        return {"dataset": "in memory", "columns": list(value.column_names), "num_rows": value.num_rows}  # hash
    name = getattr(value, "__name__", None) or type(value).__name__
    module = getattr(value, "__module__", None) or type(value).__module__
    return f"{module}.{name}"


# ---------------------------------------------------------------------------------------------------------------
# Summary
@dataclass
class Summary:
    """Counts and throughput of one run (also written to ``summary.json`` and the dataset card)."""

    output_dir: str
    prompts_seen: int = 0
    prompts_contaminated: int = 0
    prompts_sampled: int = 0
    completions_generated: int = 0
    completions_passed: int = 0
    kept: int = 0
    prompts_with_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    chunks_resumed: int = 0
    completions_generated_now: int = 0
    seconds: float = 0.0
    completions_per_second: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"prompts: {self.prompts_seen} seen, {self.prompts_contaminated} contaminated, {self.prompts_sampled} "
            f"sampled; completions: {self.completions_generated} generated, {self.completions_passed} passed, "
            f"{self.kept} kept ({self.prompts_with_kept} prompts); dropped: {dropped}"
            + (f"; throughput {self.completions_per_second:.1f} completions/s ({self.completions_generated_now} "
            f"generated in {self.seconds:.1f} s, {self.chunks_resumed} chunks resumed)" if self.seconds else "")
            + f"; output: {self.output_dir}"
        )


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
# Data loading
def load_prompt_dataset(spec: Any, *, field_name: str = "dataset"):
    """Load a dataset from a spec: a ``datasets.Dataset``, ``arithmetic:<split>``, a ``save_to_disk`` directory, or a
    ``.jsonl``/``.json``/``.parquet`` file."""
    import datasets

    if isinstance(spec, datasets.Dataset):
        return spec
    if isinstance(spec, datasets.DatasetDict):
        raise ValueError(f"{field_name} is a DatasetDict with splits {list(spec)}: pass one split, e.g. ds['train']")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"{field_name}={spec!r} is not a dataset spec; pass arithmetic:<split>, a save_to_disk directory, a "
            ".jsonl/.json/.parquet file, or a datasets.Dataset"
        )
    spec = os.fspath(spec)
    if spec.startswith(("arithmetic", "task://arithmetic")):  # the embedded task, as here or as in recipes
        from .tasks.arithmetic import load_arithmetic

        split = spec.partition("task://arithmetic/")[2] if spec.startswith("task://") else spec.partition(":")[2]
        return load_arithmetic(split or "rl")
    path = Path(spec).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{field_name}={spec!r} holds a DatasetDict {list(loaded)}: point at one split's folder")
        return loaded
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return datasets.Dataset.from_json(str(path))
        if suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        raise ValueError(f"{field_name}={spec!r}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    raise ValueError(
        f"{field_name}={spec!r} does not exist; pass arithmetic:<split>, a save_to_disk directory, a "
        ".jsonl/.json/.parquet file, or a datasets.Dataset"
    )


# ---------------------------------------------------------------------------------------------------------------
# Rewards
@dataclass
class _Scorer:
    """The reward spec resolved to a `RuleChecker` (TRL reward signature), plus an optional reward model."""

    checker: Any = None
    version: str | None = None
    reward_model: Any = None
    reward_tokenizer: Any = None
    reward_model_weight: float = 1.0


def resolve_reward(spec: Any, *, field_name: str = "reward"):
    """Resolve a reward spec with ``trl_safeppo.rewards.resolve``; returns ``(checker, version)``.

    Raises ``ValueError`` naming ``field_name`` when the spec does not resolve.
    """
    from . import __version__, rewards

    try:
        checker = rewards.resolve(spec, path=field_name)
    except ValueError:
        raise
    except Exception as err:  # a dotted path whose factory raised something else
        raise ValueError(f"{field_name}={spec!r:.80} does not resolve: {type(err).__name__}: {err}") from err
    version = getattr(checker, "version", None) or f"trl_safeppo-{__version__}"
    return checker, str(version)


def self_test_reward(checker, rows: list[dict], *, field_name: str = "reward") -> None:
    """Run the verifier self-test (``trl_safeppo.rewards.selftest.check_rewards``, the same as
    ``trl-safeppo check-rewards``) on ``rows``: a gold completion built from each row's ``answer`` must pass, a
    wrong one must fail, scores must be deterministic across threads. Raises ``ValueError`` listing the failures.

    Worker processes are skipped: rejection sampling scores in-process, so the reward does not need to pickle here.
    """
    from .rewards.selftest import check_rewards

    try:
        report = check_rewards(checker, rows, threads=2, processes=0)
    except ValueError as err:
        raise ValueError(
            f"{field_name}={checker!r} cannot be self-tested on these prompts: {err}; give the prompts an `answer` "
            "column, or set self_test=False (--no-self-test) for a reward without a gold answer"
        ) from None
    if not report.ok:
        raise ValueError(
            f"{field_name}={checker!r} fails its self-test on {report.n} prompts: {'; '.join(report.failures)}. "
            "Run `trl-safeppo check-rewards` on the spec and fix it, or set self_test=False (--no-self-test) if the "
            "reward has no gold answer to test against"
        )


# ---------------------------------------------------------------------------------------------------------------
# Generation
def _chunk_seed(seed: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{seed}:{chunk}".encode()).hexdigest()[:8], 16)


class _TransformersGenerator:
    """Batched sampling with ``model.generate``: left padding, ``num_return_sequences=n``."""

    def __init__(self, model_path: str, config: RejectionSamplingConfig, device=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def _generation_config(self, n: int):
        """Exactly the recorded settings: a fresh GenerationConfig, so the model's own defaults (top_k,
        repetition_penalty, a different temperature, ...) never apply unseen. Only the special tokens are kept."""
        from transformers import GenerationConfig

        cfg, own = self.config, self.model.generation_config
        sampling = {"do_sample": True, "temperature": float(cfg.temperature), "top_p": float(cfg.top_p), "top_k": 0}
        return GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=sorted(self.eos_ids),
            bos_token_id=own.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **(sampling if cfg.temperature > 0 else {"do_sample": False}),
        )

    def __call__(self, prompts: list, seed: int) -> list[list[dict]]:
        import torch

        cfg = self.config
        texts = [_prompt_text(self.tokenizer, p) for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        # Greedy decoding gives n identical completions: generate one and repeat it (generate refuses n > 1).
        n_generate = cfg.num_completions if cfg.temperature > 0 else 1
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=self._generation_config(n_generate))
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        if n_generate == 1:
            new_tokens = [ids for ids in new_tokens for _ in range(cfg.num_completions)]
        results: list[list[dict]] = []
        for i in range(len(prompts)):
            group = []
            for ids in new_tokens[i * cfg.num_completions : (i + 1) * cfg.num_completions]:
                end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
                ids = ids if end is None else ids[: end + 1]
                group.append(
                    {
                        "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                        "ids": ids,
                        "truncated": end is None,
                    }
                )
            results.append(group)
        return results


class _VLLMGenerator:
    """Sampling with vLLM (imported lazily; only when ``use_vllm=True``)."""

    def __init__(self, model_path: str, config: RejectionSamplingConfig, device=None):
        try:
            from vllm import LLM
        except ImportError as err:  # config validation already checked; keep one clear message anyway
            raise ValueError(
                "use_vllm=True but vLLM cannot be imported: `pip install trl-safeppo[vllm]`, or set use_vllm=False"
            ) from err
        self.config = config
        self.llm = LLM(model=model_path, seed=config.seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, prompts: list, seed: int) -> list[list[dict]]:
        from vllm import SamplingParams

        cfg = self.config
        params = SamplingParams(
            n=cfg.num_completions,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=seed,
        )
        texts = [_prompt_text(self.tokenizer, p) for p in prompts]
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        return [
            [
                {"text": o.text, "ids": list(o.token_ids), "truncated": o.finish_reason == "length"}
                for o in request.outputs
            ]
            for request in outputs
        ]


def _prompt_text(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
def score_completions(
    scorer: _Scorer, prompts: list, completions: list, completion_ids: list, columns: dict[str, list]
) -> list[dict]:
    """Score flat lists of completions. Returns per completion ``{"score", "passed", "rewards"}``.

    The checker is called with TRL's signature (``prompts=, completions=, completion_ids=, **columns``).
    ``rewards`` is its per-rule breakdown (plus ``reward_model``). ``score`` is the checker's total plus
    ``reward_model_weight`` times the reward model's first logit, leaving out a missing (None) part like GRPO's
    nansum; None when every part is missing. ``passed`` is the checker's pass criterion (total >= its
    pass_threshold), or, with a reward model only, "the score exists".
    """
    n = len(completions)
    totals: list[float | None] = [None] * n
    breakdown: list[dict[str, float | None]] = [{} for _ in range(n)]
    passed: list[bool] = [True] * n
    if scorer.checker is not None:
        scores = scorer.checker.score(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **columns
        )
        totals, passed = list(scores.total), list(scores.passed)
        breakdown = scores.rows()
    rm_scores = _reward_model_scores(scorer, prompts, completions) if scorer.reward_model is not None else None
    results = []
    for i in range(n):
        parts = [totals[i]] if scorer.checker is not None else []
        rewards = dict(breakdown[i])
        if rm_scores is not None:
            rewards["reward_model"] = rm_scores[i]
            parts.append(None if rm_scores[i] is None else scorer.reward_model_weight * rm_scores[i])
        present = [p for p in parts if p is not None]
        score = float(sum(present)) if present else None
        ok = bool(passed[i]) if scorer.checker is not None else score is not None
        results.append({"score": score, "passed": ok, "rewards": rewards})
    return results


def _as_float(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _reward_model_scores(scorer: _Scorer, prompts: list, completions: list) -> list[float | None]:
    import torch

    tok = scorer.reward_tokenizer
    if isinstance(prompts[0], str):
        texts = [p + c for p, c in zip(prompts, completions)]
    else:
        texts = [tok.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    device = next(scorer.reward_model.parameters()).device
    inputs = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        logits = scorer.reward_model(**{k: v.to(device) for k, v in inputs.items()}).logits[:, 0]
    return [_as_float(x) for x in logits.float().tolist()]


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


# ---------------------------------------------------------------------------------------------------------------
# Output: SFT rows, scored rows, card
PROVENANCE_COLUMNS = (
    "prompt_id",
    "sample_index",
    "score",
    "source_model",
    "stage",
    "step",
    "reward_spec",
    "reward_version",
    "temperature",
    "top_p",
    "max_new_tokens",
    "num_completions",
    "seed",
)


# Columns of the scored table (docs/architecture.md "Scored samples"), then the source columns and provenance.
SCORED_COLUMNS = (
    "prompt_id", "sample_index", "prompt", "completion", "score", "passed", "rewards", "kept", "drop_reason",
)


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


def _as_dataset(rows: list[dict], template_rows: list[dict] | None = None, columns: Sequence[str] = ()):
    """A ``datasets.Dataset`` from rows. With no rows it is empty but typed: the columns of ``template_rows`` when
    given, else ``columns`` (plain types), so an empty result is still a valid dataset with the expected columns."""
    from datasets import Dataset, Features, Value

    if rows:
        return Dataset.from_list(rows)
    if template_rows:
        return Dataset.from_list(template_rows[:1]).select([])
    features = Features({c: Value(_EMPTY_TYPES.get(c, "string")) for c in columns})
    return Dataset.from_dict({c: [] for c in columns}, features=features)


def _write_jsonl(rows: Iterable[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_dataset(dataset, path: Path) -> None:
    from datasets.utils import logging as datasets_logging

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    bars = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one "Saving the dataset" bar per product is noise
    try:
        # an empty dataset needs one explicit (empty) shard, or load_from_disk cannot read it back
        dataset.save_to_disk(str(tmp / "data"), num_shards=1 if len(dataset) == 0 else None)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp / "data", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets_logging.enable_progress_bar()


def write_products(
    out: Path,
    *,
    scored: list[dict],
    kept: list[dict],
    provenance: dict,
    sft_format: str,
    summary: Summary,
    settings: dict,
    title: str,
    template_record: dict | None = None,
) -> None:
    """Write sft/, sft.jsonl, scored/, scored.jsonl, README.md, then summary.json (last: it marks completion)."""
    sft_rows = [sft_row(r, provenance, sft_format) for r in kept]
    template = scored[:1] or ([template_record] if template_record is not None else [])
    sft_template = [sft_row(r, provenance, sft_format) for r in template]
    scored_rows = [_scored_row(r, provenance) for r in scored]
    scored_template = [_scored_row(r, provenance) for r in template]
    sft_columns = [*(["messages"] if sft_format == "messages" else ["prompt", "completion"]), *PROVENANCE_COLUMNS]
    scored_columns = [*SCORED_COLUMNS, "source_model", "stage", "reward_spec", "reward_version", "seed"]
    (out / "summary.json").unlink(missing_ok=True)
    _save_dataset(_as_dataset(sft_rows, sft_template, sft_columns), out / "sft")
    _write_jsonl(sft_rows, out / "sft.jsonl")
    _save_dataset(_as_dataset(scored_rows, scored_template, scored_columns), out / "scored")
    _write_jsonl(scored_rows, out / "scored.jsonl")
    _write_text(dataset_card(summary, provenance, settings, sft_format, title), out / "README.md")
    _write_text(json.dumps(summary.to_dict(), indent=2) + "\n", out / "summary.json")


def _scored_row(record: dict, provenance: dict) -> dict:
    row = dict(record)
    for key in ("source_model", "stage", "reward_spec", "reward_version", "seed"):
        row.setdefault(key, provenance.get(key))
    return row


def dataset_card(summary: Summary, provenance: dict, settings: dict, sft_format: str, title: str) -> str:
    """The README.md written beside the data: what it is, counts (kept, dropped and why), provenance, settings."""
    dropped_lines = "\n".join(
        f"| {reason} | {count} | {DROP_REASONS.get(reason, PROMPT_DROP_REASONS.get(reason, ''))} |"
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
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def _check_output_dir(config: RejectionSamplingConfig, prompts_hash: str) -> tuple[Path, str]:
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
            if k not in _NOT_FINGERPRINTED and previous.get("config", {}).get(k) != v
        ) + (["the prompts (their content)"] if previous.get("prompts_hash") != prompts_hash else [])
        raise ValueError(
            f"output_dir={config.output_dir!r} already holds a different run (fingerprint "
            f"{previous.get('fingerprint')} vs {fingerprint}; settings that differ: {', '.join(changed) or '?'}); "
            "pass overwrite=True (--overwrite) to replace it, or choose another output_dir"
        )
    return out, "replace"


def _init_output_dir(out: Path, status: str, config: RejectionSamplingConfig, prompts_hash: str) -> None:
    """Main process only: remove the replaced run's files (only ours), then write run.json and parts/."""
    if status == "replace":
        for name in (*_PRODUCTS, "parts", "run.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    if status != "resume":
        payload = {
            "fingerprint": config.fingerprint(prompts_hash),
            "prompts_hash": prompts_hash,
            "layout": LAYOUT_VERSION,
            "config": config.to_dict(),
        }
        _write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", out / "run.json")


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


def _build_scorer(config: RejectionSamplingConfig, device=None) -> _Scorer:
    scorer = _Scorer(reward_model_weight=config.reward_model_weight)
    if config.reward is not None:
        scorer.checker, scorer.version = resolve_reward(config.reward)
    if config.reward_model is not None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import resolve_model_path

        path = resolve_model_path(config.reward_model, field="reward_model")
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        scorer.reward_tokenizer = AutoTokenizer.from_pretrained(path)
        if scorer.reward_tokenizer.pad_token is None:
            scorer.reward_tokenizer.pad_token = scorer.reward_tokenizer.eos_token
        scorer.reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
        if scorer.reward_model.config.pad_token_id is None:
            scorer.reward_model.config.pad_token_id = scorer.reward_tokenizer.pad_token_id
    return scorer


def _provenance(config: RejectionSamplingConfig, scorer: _Scorer) -> dict:
    spec = config.reward
    described = _describe(spec)
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


def _process_chunk(rows: list[dict], config: RejectionSamplingConfig, generator, scorer: _Scorer, seed: int):
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


def _read_parts(parts_dir: Path) -> list[dict]:
    records = []
    for path in sorted(parts_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
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
    from .models import resolve_model_path

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
    out, status = _check_output_dir(config, prompts_hash)  # every process checks, so all raise the same error
    state.wait_for_everyone()
    if state.is_main_process:
        _init_output_dir(out, status, config, prompts_hash)
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
        generator = (_VLLMGenerator if config.use_vllm else _TransformersGenerator)(model_path, config, state.device)
        from tqdm.auto import tqdm

        done_prompts = sum(len(chunks[i]) for i in range(len(chunks)) if i not in set(todo))
        bar = tqdm(total=len(rows), initial=done_prompts, unit="prompt", desc="sample+score",
                   disable=not config.progress or not state.is_main_process)
        try:
            for i in mine:
                records = _process_chunk(chunks[i], config, generator, scorer, _chunk_seed(config.seed, i))
                _write_jsonl(records, parts_dir / f"chunk-{i:06d}.jsonl")
                bar.update(len(chunks[i]) * state.num_processes)
                bar.set_postfix(passed=f"{sum(r['passed'] for r in records)}/{len(records)}")
        finally:
            bar.close()
    state.wait_for_everyone()
    summary.seconds = time.perf_counter() - start
    summary.completions_generated_now = sum(len(chunks[i]) for i in todo) * config.num_completions
    summary.completions_per_second = summary.completions_generated_now / summary.seconds if summary.seconds > 0 else 0.0

    if state.is_main_process:
        scored = _read_parts(parts_dir)
        template = _template_record(first_row, config, scorer) if first_row is not None else None
        summary = _finish(out, scored, config, provenance, summary, template)
    state.wait_for_everyone()
    if not state.is_main_process:
        summary = Summary(**json.loads((out / "summary.json").read_text()))
    return summary


def _template_record(row: dict, config: RejectionSamplingConfig, scorer: _Scorer) -> dict:
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


# ---------------------------------------------------------------------------------------------------------------
# Loading results
def load_sft_dataset(output_dir: str | os.PathLike, *, provenance: bool = True):
    """The selected SFT set of a finished run (``provenance=False`` keeps only the TRL SFT columns)."""
    from datasets import load_from_disk

    out = Path(output_dir)
    if not (out / "summary.json").exists():
        raise ValueError(f"output_dir={os.fspath(output_dir)!r} holds no finished run (no summary.json)")
    dataset = load_from_disk(str(out / "sft"))
    if not provenance:
        dataset = dataset.remove_columns([c for c in dataset.column_names if c in PROVENANCE_COLUMNS])
    return dataset


def load_scored_samples(output_dir: str | os.PathLike):
    """Every scored completion of a finished run (the "Scored samples" table; input of ``pairs.build_pairs``)."""
    from datasets import load_from_disk

    out = Path(output_dir)
    if not (out / "summary.json").exists():
        raise ValueError(f"output_dir={os.fspath(output_dir)!r} holds no finished run (no summary.json)")
    return load_from_disk(str(out / "scored"))


# ---------------------------------------------------------------------------------------------------------------
# CLI: trl-safeppo sample
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of RejectionSamplingConfig fields (command-line flags override)")
    for f in dataclasses.fields(RejectionSamplingConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "pass_rate_band":
            parser.add_argument(flag, dest=f.name, nargs=2, type=float, metavar=("LOW", "HIGH"), help=help_text)
        elif f.name == "decontaminate":
            parser.add_argument(flag, dest=f.name, nargs="+", help=help_text)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("num_prompts", "max_per_prompt"):
                kind = int
            elif f.name in ("score_threshold",):
                kind = float
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> RejectionSamplingConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        from .pipeline.recipe import safe_yaml_load  # size and alias expansion capped, as for a recipe

        loaded = safe_yaml_load(Path(args.config).read_text(), what=f"--config={args.config!r}") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config={args.config!r} must hold a mapping of RejectionSamplingConfig fields")
        names = {f.name for f in dataclasses.fields(RejectionSamplingConfig)}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ValueError(f"--config={args.config!r}: unknown fields {unknown}; known: {', '.join(sorted(names))}")
        values.update(loaded)
    for f in dataclasses.fields(RejectionSamplingConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    reward = values.get("reward")
    if isinstance(reward, str) and reward.strip().startswith(("[", "{")):  # --reward '[{name: format}, math]'
        import yaml

        from .pipeline.recipe import safe_yaml_load

        try:
            values["reward"] = safe_yaml_load(reward, what="--reward")
        except yaml.YAMLError as err:
            raise ValueError(f"--reward={reward!r} is not valid YAML/JSON: {err}") from None
    return RejectionSamplingConfig(**values)


def run(args: argparse.Namespace) -> int:
    summary = run_rejection_sampling(config_from_args(args), distributed=True)  # also right for one process
    print(summary)
    return 0
