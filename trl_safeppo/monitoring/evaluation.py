"""Held-out evaluation: greedy answers on the held-out split, scored by the recipe's rules.

Definitions (each completion is scored by a rule with TRL's reward signature; a score of ``None`` counts as a
failure):

- ``accuracy``: fraction of held-out prompts whose completion scores at least ``pass_threshold`` (default 1.0)
  under the *correctness* rule (``accuracy_reward``; when not given, the recipe's combined ``reward``).
- ``format_pass_rate``: fraction whose completion scores at least ``pass_threshold`` under the *format* rule
  (``format_reward``); absent when no format rule is given.
- ``mean_length``: mean completion length in tokens, up to and including EOS (as GRPO's
  ``completions/mean_length``).
- ``truncation_rate``: fraction of completions that hit ``max_new_tokens`` without EOS.
- ``reward_mean``: mean of the combined ``reward`` (None scores skipped), when ``reward`` is given.
- ``n``: number of held-out prompts scored.

Rules are callables or specs for ``trl_safeppo.rewards.resolve`` (a built-in name, a dotted path, or a weighted
list), so the evaluation uses exactly the rules the trainers were rewarded with. Generation is greedy, so the
result is a property of the checkpoint. Runs on one process (call it on the main process only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

EVAL_KEYS = ("accuracy", "mean_length", "format_pass_rate", "truncation_rate", "reward_mean", "n")


def _resolve(spec: Any) -> Callable | None:
    if spec is None or callable(spec):
        return spec
    from ..rewards import resolve  # the recipe's rule checker: same rules as in training

    return resolve(spec)


def _score(rule: Callable, prompts, completions, columns: dict[str, list]) -> list[float | None]:
    scores = list(rule(prompts=prompts, completions=completions, **columns))
    if len(scores) != len(completions):
        name = getattr(rule, "__name__", repr(rule))
        raise ValueError(f"reward {name} returned {len(scores)} scores for {len(completions)} completions")
    return scores


def _pass_rate(scores: Sequence[float | None], threshold: float) -> float:
    ok = [s is not None and math.isfinite(s) and s >= threshold for s in scores]
    return sum(ok) / len(ok)


def evaluate_heldout(
    model_or_path: Any,
    dataset: Any,
    reward: Any = None,
    *,
    accuracy_reward: Any = None,
    format_reward: Any = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    pass_threshold: float = 1.0,
    tokenizer: Any = None,
    num_samples: int = 0,
) -> dict[str, Any]:
    """Score ``dataset`` (a ``prompt`` column plus the columns the rules read, e.g. ``answer``).

    Args:
        model_or_path: a causal LM, a local path or a ``tiny://`` name.
        dataset: a ``datasets.Dataset`` or a list of dicts with a ``prompt`` key.
        reward: the recipe's combined reward (spec or callable); gives ``reward_mean`` and, when
            ``accuracy_reward`` is None, ``accuracy``.
        accuracy_reward: the correctness rule (spec or callable).
        format_reward: the format rule (spec or callable); gives ``format_pass_rate``.
        max_new_tokens, batch_size: greedy generation settings.
        pass_threshold: a completion passes a rule when its score is at least this.
        tokenizer: needed only when ``model_or_path`` is a model object without a saved path.
        num_samples: also return the first ``num_samples`` (prompt, completion) pairs under ``samples``.

    Returns:
        ``{"accuracy", "mean_length", "format_pass_rate", "truncation_rate", "reward_mean", "n"}`` (keys whose rule
        was not given are left out), plus ``samples`` when asked.
    """
    from .generation import generate_greedy, load_policy

    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError("evaluate_heldout: the held-out dataset is empty")
    if "prompt" not in rows[0]:
        raise ValueError(f"evaluate_heldout: the dataset needs a 'prompt' column, got {sorted(rows[0])}")
    reward, accuracy_reward, format_reward = map(_resolve, (reward, accuracy_reward, format_reward))
    if reward is None and accuracy_reward is None:
        raise ValueError("evaluate_heldout: pass reward= or accuracy_reward= (the correctness rule)")

    model, tokenizer = load_policy(model_or_path, tokenizer)
    prompts = [r["prompt"] for r in rows]
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": g.text}] if conversational else g.text for g in gens]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}

    result: dict[str, Any] = {}
    if reward is not None:
        scores = _score(reward, prompts, completions, columns)
        finite = [s for s in scores if s is not None and math.isfinite(s)]
        result["reward_mean"] = sum(finite) / len(finite) if finite else None
    correctness = accuracy_reward if accuracy_reward is not None else reward
    result["accuracy"] = _pass_rate(_score(correctness, prompts, completions, columns), pass_threshold)
    if format_reward is not None:
        result["format_pass_rate"] = _pass_rate(_score(format_reward, prompts, completions, columns), pass_threshold)
    result["mean_length"] = sum(g.length for g in gens) / len(gens)
    result["truncation_rate"] = sum(g.truncated for g in gens) / len(gens)
    result["n"] = len(gens)
    if num_samples:
        result["samples"] = [
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": g.text}
            for p, g in zip(prompts[:num_samples], gens[:num_samples])
        ]
    return result
