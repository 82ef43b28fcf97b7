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

_SPECS = "pass arithmetic:<split>, a save_to_disk directory, a .jsonl/.json/.parquet file, or a datasets.Dataset"


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
        raise ValueError(f"{field_name}={spec!r} is not a dataset spec; {_SPECS}")
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
    if not path.is_file():
        raise ValueError(f"{field_name}={spec!r} does not exist; {_SPECS}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    raise ValueError(f"{field_name}={spec!r}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


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


def build_scorer(config: RejectionSamplingConfig, device: str) -> Scorer:
    """Resolve ``config.reward`` (``trl_safeppo.rewards.resolve``) and load ``config.reward_model`` on ``device``."""
    from .. import __version__, rewards
    from ..models import resolve_model_path

    scorer = Scorer(reward_model_weight=config.reward_model_weight)
    if config.reward is not None:
        try:
            scorer.checker = rewards.resolve(config.reward, path="reward")
        except ValueError:
            raise
        except Exception as err:  # a dotted path whose factory raised something else
            raise ValueError(f"reward={config.reward!r:.80} does not resolve: {type(err).__name__}: {err}") from err
        scorer.version = str(getattr(scorer.checker, "version", None) or f"trl_safeppo-{__version__}")
    if config.reward_model is not None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(config.reward_model, field="reward_model")
        tokenizer = scorer.reward_tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        scorer.reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
        if scorer.reward_model.config.pad_token_id is None:
            scorer.reward_model.config.pad_token_id = tokenizer.pad_token_id
    return scorer


def self_test_reward(checker, rows: list[dict]) -> None:
    """The verifier self-test of ``trl-safeppo check-rewards`` on ``rows`` (in-process: nothing needs to pickle);
    raises ``ValueError`` listing the failures."""
    from ..rewards.selftest import check_rewards

    try:
        report = check_rewards(checker, rows, threads=2, processes=0)
    except ValueError as err:
        raise ValueError(
            f"reward={checker!r} cannot be self-tested on these prompts: {err}; give the prompts an `answer` "
            "column, or set self_test=False (--no-self-test) for a reward without a gold answer"
        ) from None
    if not report.ok:
        raise ValueError(
            f"reward={checker!r} fails its self-test on {report.n} prompts: {'; '.join(report.failures)}. "
            "Run `trl-safeppo check-rewards` on the spec and fix it, or set self_test=False (--no-self-test) if the "
            "reward has no gold answer to test against"
        )


# ---------------------------------------------------------------------------------------------------------------
# Generation: each returns, per prompt, its completions as {"text", "ids", "truncated"}
def chunk_seed(seed: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{seed}:{chunk}".encode()).hexdigest()[:8], 16)


class TransformersGenerator:
    """Batched sampling with ``model.generate``: left padding, ``num_return_sequences=n``."""

    def __init__(self, model_path: str, config: RejectionSamplingConfig, device: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.device = config, device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def __call__(self, prompts: list, seed: int) -> list[list[dict]]:
        import torch
        from transformers import GenerationConfig

        cfg, n = self.config, self.config.num_completions
        texts = [_prompt_text(self.tokenizer, p) for p in prompts]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        # Exactly the recorded settings: a fresh GenerationConfig, so the model's own defaults (top_k,
        # repetition_penalty, another temperature, ...) never apply unseen; only its special tokens are kept.
        # Greedy decoding gives n identical completions: generate one and repeat it (generate refuses n > 1).
        sampling = {"do_sample": True, "temperature": float(cfg.temperature), "top_p": float(cfg.top_p), "top_k": 0}
        generation_config = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens, num_return_sequences=n if cfg.temperature > 0 else 1,
            eos_token_id=sorted(self.eos_ids), bos_token_id=self.model.generation_config.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, **(sampling if cfg.temperature > 0 else {"do_sample": False}),
        )
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=generation_config)
        new_tokens = out[:, inputs["input_ids"].shape[1] :].tolist()
        if cfg.temperature == 0:
            new_tokens = [ids for ids in new_tokens for _ in range(n)]
        samples = []
        for ids in new_tokens:
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            ids = ids if end is None else ids[: end + 1]
            samples.append({"text": self.tokenizer.decode(ids, skip_special_tokens=True), "ids": ids,
                            "truncated": end is None})
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]


class VLLMGenerator:
    """Sampling with vLLM (imported lazily; the config has checked that it is installed)."""

    def __init__(self, model_path: str, config: RejectionSamplingConfig, device: str):
        from vllm import LLM

        self.config = config
        self.llm = LLM(model=model_path, seed=config.seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, prompts: list, seed: int) -> list[list[dict]]:
        from vllm import SamplingParams

        cfg = self.config
        params = SamplingParams(n=cfg.num_completions, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=cfg.max_new_tokens, seed=seed)
        outputs = self.llm.generate([_prompt_text(self.tokenizer, p) for p in prompts], params, use_tqdm=False)
        return [[{"text": o.text, "ids": list(o.token_ids), "truncated": o.finish_reason == "length"}
                 for o in request.outputs] for request in outputs]


def _prompt_text(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# Scoring
def score_completions(scorer: Scorer, prompts: list, completions: list, completion_ids: list,
                      columns: dict[str, list]) -> list[dict]:
    """Per completion ``{"score", "passed", "rewards"}``: the checker called with TRL's reward signature, plus the
    weighted reward model, a missing (None) part left out like GRPO's nansum (docs/rejection_sampling.md, Scores)."""
    n = len(completions)
    totals, passed, breakdown = [None] * n, [None] * n, [{} for _ in range(n)]
    if scorer.checker is not None:
        scores = scorer.checker.score(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                      **columns)
        totals, passed, breakdown = list(scores.total), list(scores.passed), scores.rows()
    rm_scores = _reward_model_scores(scorer, prompts, completions) if scorer.reward_model is not None else [None] * n
    results = []
    for total, ok, rewards, rm in zip(totals, passed, breakdown, rm_scores):
        rewards = dict(rewards)
        if scorer.reward_model is not None:
            rewards["reward_model"] = rm
        parts = [p for p in (total, None if rm is None else scorer.reward_model_weight * rm) if p is not None]
        score = float(sum(parts)) if parts else None
        results.append({"score": score, "passed": bool(ok) if scorer.checker is not None else score is not None,
                        "rewards": rewards})
    return results


def _reward_model_scores(scorer: Scorer, prompts: list, completions: list) -> list[float | None]:
    """``reward_model``'s first logit per completion (None for NaN)."""
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
    return [None if math.isnan(x) else x for x in logits.float().tolist()]
