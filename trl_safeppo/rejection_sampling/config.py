"""The settings of a rejection-sampling run (:class:`RejectionSamplingConfig`, checked at construction) and
what it reports (:class:`Summary`)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

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

# Why a completion was not kept (counted per completion), or a prompt not sampled (`contaminated`, per prompt).
DROP_REASONS = {
    "failed_check": "the rule checker did not pass it",
    "unscored": "every reward returned None",
    "below_threshold": "score below score_threshold",
    "outside_pass_rate_band": "its prompt's pass rate is outside pass_rate_band (always or never solved)",
    "duplicate": "same text as a kept completion of the same prompt (exact or normalized)",
    "not_top_ranked": "not among the best_of_n / top_k highest scores of its prompt",
    "over_cap": "beyond max_per_prompt for its prompt",
    "contaminated": "the prompt appears in a decontamination set (normalized match)",
}


# ---------------------------------------------------------------------------------------------------------------
# Configuration
@dataclass
class RejectionSamplingConfig:
    r"""Settings of one rejection-sampling run (docs/rejection_sampling.md walks through a run).

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
            Completions generated per prompt (the `n` of best-of-n); DeepSeek-R1 keeps only the correct ones of
            several (arXiv:2501.12948, section 2.3.3).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass, in (0, 1].
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Longest completion, in tokens; longer ones are cut and marked `truncated`.
        seed (`int`, *optional*, defaults to `0`):
            Base seed; chunk `i` of prompts draws from a seed derived from `seed` and `i`, so a resumed run
            reproduces an uninterrupted one.
        batch_size (`int`, *optional*, defaults to `8`):
            Prompts per generation batch; also the unit of resume (one file in `parts/` per batch).
        use_vllm (`bool`, *optional*, defaults to `False`):
            Generate with vLLM (`pip install trl-safeppo[vllm]`) instead of transformers.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Share of GPU memory vLLM may take (vLLM's own default); lower it when another model stays resident.

        > Scoring

        reward (`str`, `list`, callable or `None`, *optional*, defaults to `None`):
            Reward spec for `trl_safeppo.rewards.resolve` (built-in name, dotted path, or a list with weights and
            gates). Its pass criterion decides `passed`.
        reward_model (`str` or `None`, *optional*, defaults to `None`):
            A sequence-classification reward model (same identifiers as `model`); its first logit is added to the
            score with weight `reward_model_weight`. At least one of `reward` and `reward_model` is required.
        reward_model_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the reward model in the score.
        self_test (`bool`, *optional*, defaults to `True`):
            Before sampling, run the verifier self-test of `trl-safeppo check-rewards` on the first `self_test_rows`
            prompts (needs the gold `answer` column); a failing spec stops the run before anything is generated.
        self_test_rows (`int`, *optional*, defaults to `16`):
            Prompts the self-test uses.

        > Selection

        selection (`str`, *optional*, defaults to `"all_passing"`):
            `all_passing` (every completion that passes the checker: R1's rejection sampling), `best_of_n`, `top_k`
            (the highest-scoring passing ones), `threshold` (score >= `score_threshold`) or `pass_rate_band` (the
            passing completions of prompts whose pass rate lies strictly inside `pass_rate_band`).
        top_k (`int`, *optional*, defaults to `2`):
            Completions kept per prompt by `selection="top_k"`.
        score_threshold (`float` or `None`, *optional*, defaults to `None`):
            Minimum score for `selection="threshold"` (required by that mode).
        pass_rate_band (`tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`):
            Open interval (low, high) of per-prompt pass rates kept by `selection="pass_rate_band"`.
        dedup (`str`, *optional*, defaults to `"normalized"`):
            Drop repeated completions of a prompt: `exact` text, `normalized` (also case, width and whitespace
            variants), or `none`.
        max_per_prompt (`int` or `None`, *optional*, defaults to `None`):
            Keep at most this many completions per prompt (the highest scores); `None` for no cap.
        decontaminate (`str`, `list` or `None`, *optional*, defaults to `None`):
            Dataset spec(s), as for `dataset`, of evaluation sets: prompts whose normalized text appears there are
            dropped before generation. E.g. `"arithmetic:eval"`.

        > Output

        output_dir (`str`):
            Directory of the run. A rerun with the same settings resumes; a directory holding a different run is
            refused unless `overwrite=True`.
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
    model: str = field(default=None, metadata={"help": "Policy to sample from: tiny://<name>, a local model "
                                                       "directory, or a Hub id."})
    dataset: Any = field(default="arithmetic:rl", metadata={"help": "Prompts: arithmetic:<split>, a save_to_disk "
                                                            "directory, a .jsonl/.json/.parquet file, or a "
                                                            "datasets.Dataset."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first num_prompts prompts (before "
                                                            "decontamination)."})
    # Sampling
    num_completions: int = field(default=8, metadata={"help": "Completions per prompt (DeepSeek-R1, "
                                                      "arXiv:2501.12948, section 2.3.3)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 means greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    seed: int = field(default=0, metadata={"help": "Base seed; each chunk of prompts derives its own seed from it."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch (and per resume chunk)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM instead of transformers."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Share of GPU memory vLLM may take "
                                                                      "(lower it when another model is resident)."})
    # Scoring
    reward: Any = field(default=None, metadata={"help": "Reward spec for trl_safeppo.rewards.resolve: a built-in "
                                                "name, a dotted path, or a YAML/JSON list such as '[format, math]'."})
    reward_model: str | None = field(default=None, metadata={"help": "Sequence-classification reward model added "
                                                             "to the score."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of the reward model in the score."})
    self_test: bool = field(default=True, metadata={"help": "Self-test the reward spec on the first self_test_rows "
                                                    "prompts before sampling."})
    self_test_rows: int = field(default=16, metadata={"help": "Prompts the reward self-test uses."})
    # Selection
    selection: str = field(default="all_passing", metadata={"help": "all_passing, best_of_n, top_k, threshold or "
                                                            "pass_rate_band."})
    top_k: int = field(default=2, metadata={"help": "Completions kept per prompt by selection=top_k."})
    score_threshold: float | None = field(default=None, metadata={"help": "Minimum score for selection=threshold."})
    pass_rate_band: tuple[float, float] = field(default=(0.0, 1.0), metadata={"help": "Open interval (low, high) of "
                                                                              "per-prompt pass rates kept by "
                                                                              "selection=pass_rate_band."})
    dedup: str = field(default="normalized", metadata={"help": "Duplicate removal: none, exact or normalized."})
    max_per_prompt: int | None = field(default=None, metadata={"help": "At most this many completions per prompt."})
    decontaminate: Any = field(default=None, metadata={"help": "Dataset spec(s) of evaluation sets whose prompts "
                                                       "are dropped."})
    # Output
    output_dir: str = field(default=None, metadata={"help": "Directory of the run."})
    sft_format: str = field(default="prompt_completion", metadata={"help": "SFT format: "
                                                                         "prompt_completion or messages."})
    stage: str = field(default="rejection_sampling", metadata={"help": "Stage name in the provenance columns."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a different run found in output_dir."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over prompts."})

    def __post_init__(self):
        def bad(name: str, fix: str):
            raise ValueError(f"{name}={getattr(self, name)!r}: {fix}")

        # model and output_dir may be left for later (the recipe runner fills them in; run_rejection_sampling
        # requires them); when given, they are checked here.
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            bad("model", "pass the policy to sample from (tiny://arithmetic, a model directory or a Hub id)")
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir).strip():
                bad("output_dir", "pass the directory to write the run to")
            self.output_dir = os.fspath(self.output_dir)
        for name in ("num_completions", "max_new_tokens", "batch_size", "top_k", "self_test_rows"):
            if _not_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "pass a positive integer")
        for name, low, none in (("num_prompts", 0, "for every prompt"), ("max_per_prompt", 1, "for no cap")):
            if getattr(self, name) is not None and (_not_int(getattr(self, name)) or getattr(self, name) < low):
                bad(name, f"pass an integer >= {low}, or None {none}")
        if _not_int(self.seed):
            bad("seed", "pass an integer")
        if not _finite(self.temperature) or self.temperature < 0:
            bad("temperature", "pass a finite number >= 0 (0 means greedy)")
        for name in ("top_p", "vllm_gpu_memory_utilization"):
            if not _finite(getattr(self, name)) or not 0 < getattr(self, name) <= 1:
                bad(name, "pass a number in (0, 1]")
        for name, choices in (("selection", SELECTION_MODES), ("dedup", DEDUP_MODES), ("sft_format", SFT_FORMATS)):
            if getattr(self, name) not in choices:
                bad(name, f"pass one of {', '.join(choices)}")
        if self.selection == "threshold" and self.score_threshold is None:
            bad("score_threshold", "selection='threshold' needs a score_threshold (a number)")
        if self.score_threshold is not None and not _finite(self.score_threshold):
            bad("score_threshold", "pass a finite number")
        if not _finite(self.reward_model_weight):  # required: None is refused too
            bad("reward_model_weight", "pass a finite number")
        band = tuple(self.pass_rate_band) if isinstance(self.pass_rate_band, (list, tuple)) else None
        if band is None or len(band) != 2 or not all(_finite(b) for b in band) or not 0 <= band[0] < band[1] <= 1:
            bad("pass_rate_band", "pass two numbers (low, high) with 0 <= low < high <= 1, e.g. (0.0, 1.0)")
        self.pass_rate_band = (float(band[0]), float(band[1]))
        if self.reward is not None:
            from ..rewards import validate_spec

            validate_spec(self.reward, path="reward")  # names, options and dotted paths; the self-test runs later
        if not isinstance(self.stage, str) or not self.stage:
            bad("stage", "pass a non-empty stage name")
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            bad("use_vllm", "vLLM is not installed: `pip install trl-safeppo[vllm]` (needs a GPU), or set "
                "use_vllm=False to generate with transformers")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (datasets and callables described by name and fingerprint)."""
        return {f.name: describe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def fingerprint(self, prompts_hash: str | None = None) -> str:
        """Hash of every setting that changes the output (all but :data:`NOT_FINGERPRINTED`) and of the content of
        the prompts actually sampled (``prompts_hash``)."""
        settings = {k: v for k, v in self.to_dict().items() if k not in NOT_FINGERPRINTED}
        blob = json.dumps({"layout": LAYOUT_VERSION, "settings": settings, "prompts": prompts_hash}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# settings that do not change the output (a rerun that differs only in these resumes)
NOT_FINGERPRINTED = (
    "output_dir", "overwrite", "progress", "self_test", "self_test_rows", "vllm_gpu_memory_utilization",
)


def _not_int(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def describe(value: Any) -> Any:
    """A JSON-able, stable description of a setting (datasets by shape, callables by qualified name)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
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
