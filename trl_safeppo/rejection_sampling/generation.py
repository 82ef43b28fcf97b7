"""Prompts in, scored completions out: loading prompt datasets, the two generators (transformers ``generate``
and vLLM, one seed per chunk) and the scorer (reward rules and an optional reward model)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RejectionSamplingConfig

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
        from ..tasks.arithmetic import load_arithmetic

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
class Scorer:
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
    from .. import __version__, rewards

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
    from ..rewards.selftest import check_rewards

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
def chunk_seed(seed: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{seed}:{chunk}".encode()).hexdigest()[:8], 16)


class TransformersGenerator:
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


class VLLMGenerator:
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
    scorer: Scorer, prompts: list, completions: list, completion_ids: list, columns: dict[str, list]
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


def _reward_model_scores(scorer: Scorer, prompts: list, completions: list) -> list[float | None]:
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
