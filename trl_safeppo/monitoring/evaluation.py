"""Held-out evaluation: greedy answers on the held-out split, scored by the recipe's rules.

Each completion is scored by the recipe's ``reward`` (normally a rule checker from ``trl_safeppo.rewards.resolve``,
the same object the trainers were rewarded with). A score of ``None`` ("cannot judge") never passes. Recorded:

- ``accuracy``: fraction of held-out prompts answered *correctly*, i.e. whose correctness rule gave full marks
  (score >= the rule's ``max_score``, 1.0 for the built-ins). The correctness rule is, in order: ``accuracy_reward``
  when given; else the checker's first rule named ``math``, ``exact``, ``gsm8k``, ``choice`` or ``regex``; else the
  whole checker (its ``passed``: total at full marks). ``accuracy_rule`` in the result names which one was used.
  An ``accuracy_reward`` that is itself a rule checker (several rules, e.g. a gate requiring the format) counts as
  correct where the checker passes.
- ``answer_accuracy``: when ``accuracy_reward`` is given and ``reward`` has a correctness rule of its own (the first
  named as above, e.g. ``math``) under another name, the fraction that rule gives full marks, whatever else
  ``accuracy_reward`` requires; ``answer_accuracy_rule`` names it. So a strict task accuracy (the right answer *in
  the required format*) is reported beside the answer-only one.
- ``format_pass_rate``: fraction whose *format* rule gave full marks: ``format_reward`` when given, else the
  checker's rule named ``format``; absent when there is neither.
- ``pass_rate``: fraction the whole checker passes (every rule satisfied, gates included).
- ``reward_mean``: mean of the checker's total (None scores left out).
- ``mean_length``: mean completion length in tokens, up to and including EOS (as GRPO's
  ``completions/mean_length``); ``truncation_rate``: fraction that hit ``max_new_tokens`` without EOS.
- ``n``: number of held-out prompts scored.
- with ``kl_reference`` (a second model, e.g. the SFT model): ``kl_to_reference``, the exact KL(policy ||
  reference) over the vocabulary at each token of the policy's greedy answers, averaged over those tokens (nats
  per token), and ``kl_to_reference_seq``, its sum over each answer averaged over the prompts (nats per answer).
  One forward pass of each model over the answers: a cheap, deterministic measure of how far a stage has moved
  the policy from the reference, on prompts it never trained on. (Evaluated along greedy rather than sampled
  answers, so it is not the sampled KL the trainers log as ``kl``.)

Generation is greedy, so the result is a property of the checkpoint. Runs on one process (call it on the main
process only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

CORRECTNESS_RULES = ("math", "exact", "gsm8k", "choice", "regex")
FORMAT_RULE = "format"


def _resolve(spec: Any) -> Callable | None:
    if spec is None or callable(spec):
        return spec
    from ..rewards import resolve  # the recipe's rule checker: same rules as in training

    return resolve(spec)


def _call(rule: Callable, prompts, completions, columns: dict[str, list]) -> list[float | None]:
    scores = list(rule(prompts=prompts, completions=completions, **columns))
    if len(scores) != len(completions):
        name = getattr(rule, "__name__", repr(rule))
        raise ValueError(f"reward {name} returned {len(scores)} scores for {len(completions)} completions")
    return scores


def _full_marks(scores: Sequence[float | None], max_score: float) -> list[bool]:
    return [s is not None and math.isfinite(s) and s >= max_score - 1e-9 for s in scores]


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags)


def score_completions(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: dict[str, list],
    reward: Any = None,
    *,
    accuracy_reward: Any = None,
    format_reward: Any = None,
) -> dict[str, Any]:
    """Accuracy, format-pass rate, pass rate and mean reward of already generated completions (see module doc)."""
    reward, accuracy_reward, format_reward = map(_resolve, (reward, accuracy_reward, format_reward))
    if reward is None and accuracy_reward is None:
        raise ValueError("evaluate_heldout: pass reward= (the recipe's rules) or accuracy_reward= (the correctness rule)")
    result: dict[str, Any] = {}
    breakdown: dict[str, list] = {}
    max_scores: dict[str, float] = {}
    passed: list[bool] = []
    if reward is not None:
        if hasattr(reward, "score") and hasattr(reward, "components"):  # a RuleChecker: per-rule breakdown
            scored = reward.score(prompts=prompts, completions=completions, **columns)
            totals, passed, breakdown = scored.total, scored.passed, scored.breakdown
            max_scores = {c.name: c.max_score for c in reward.components}
        else:
            totals = _call(reward, prompts, completions, columns)
            passed = _full_marks(totals, float(getattr(reward, "max_score", 1.0)))
        finite = [t for t in totals if t is not None and math.isfinite(t)]
        result["reward_mean"] = sum(finite) / len(finite) if finite else None
        result["pass_rate"] = _rate(passed)

    if accuracy_reward is not None:
        name = getattr(accuracy_reward, "__name__", "accuracy_reward")
        if hasattr(accuracy_reward, "score") and hasattr(accuracy_reward, "components"):  # a RuleChecker
            flags = accuracy_reward.score(prompts=prompts, completions=completions, **columns).passed
        else:
            flags = _full_marks(_call(accuracy_reward, prompts, completions, columns),
                                float(getattr(accuracy_reward, "max_score", 1.0)))
        answer_rule = next((r for r in CORRECTNESS_RULES if r in breakdown), None)
        if answer_rule is not None and answer_rule != name:  # the checker's correctness rule, beside a stricter one
            result["answer_accuracy"] = _rate(_full_marks(breakdown[answer_rule], max_scores.get(answer_rule, 1.0)))
            result["answer_accuracy_rule"] = answer_rule
    else:
        name = next((r for r in CORRECTNESS_RULES if r in breakdown), None)
        if name is not None:
            flags = _full_marks(breakdown[name], max_scores.get(name, 1.0))
        else:
            name, flags = getattr(reward, "__name__", "reward"), passed
    result["accuracy"] = _rate(flags)
    result["accuracy_rule"] = name

    if format_reward is not None:
        result["format_pass_rate"] = _rate(_full_marks(_call(format_reward, prompts, completions, columns),
                                                       float(getattr(format_reward, "max_score", 1.0))))
    elif FORMAT_RULE in breakdown:
        result["format_pass_rate"] = _rate(_full_marks(breakdown[FORMAT_RULE], max_scores.get(FORMAT_RULE, 1.0)))
    return result


def evaluate_heldout(
    model_or_path: Any,
    dataset: Any,
    reward: Any = None,
    *,
    accuracy_reward: Any = None,
    format_reward: Any = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    n: int | None = None,
    tokenizer: Any = None,
    num_samples: int = 0,
    kl_reference: Any = None,
) -> dict[str, Any]:
    """Generate greedily for the held-out ``dataset`` and score it (definitions in the module docstring).

    Args:
        model_or_path: a causal LM, a local path or a ``tiny://`` name.
        dataset: a ``datasets.Dataset`` or a list of dicts with a ``prompt`` column plus the columns the rules read
            (e.g. ``answer``). Prompts may be strings or conversational.
        reward: the recipe's rules (spec for ``rewards.resolve``, a RuleChecker, or any TRL reward function).
        accuracy_reward: the correctness rule (spec or callable), overriding the one found in ``reward``.
        format_reward: the format rule (spec or callable), overriding the checker's ``format`` rule.
        max_new_tokens, batch_size: greedy generation settings.
        n: score only the first ``n`` rows (None: all).
        tokenizer: needed only when ``model_or_path`` is a model object without a saved path.
        num_samples: also return the first ``num_samples`` (prompt, completion) pairs under ``samples``.
        kl_reference: a model (object, path or ``tiny://`` name) sharing the policy's tokenizer: also return
            ``kl_to_reference`` and ``kl_to_reference_seq`` (module docstring).

    Returns:
        ``{"accuracy", "accuracy_rule", "format_pass_rate", "pass_rate", "reward_mean", "mean_length",
        "truncation_rate", "n"}`` (keys whose rule is missing are left out), ``answer_accuracy`` and
        ``answer_accuracy_rule`` beside a stricter ``accuracy_reward``, plus ``samples`` when asked.
    """
    from .generation import generate_greedy, load_policy

    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"evaluate_heldout: n must be a positive integer or None, got {n!r}")
        rows = rows[:n]
    if not rows:
        raise ValueError("evaluate_heldout: the held-out dataset is empty")
    if "prompt" not in rows[0]:
        raise ValueError(f"evaluate_heldout: the dataset needs a 'prompt' column, got columns {sorted(rows[0])}")
    if reward is None and accuracy_reward is None:
        raise ValueError("evaluate_heldout: pass reward= (the recipe's rules) or accuracy_reward= (the correctness rule)")

    model, tokenizer = load_policy(model_or_path, tokenizer)
    prompts = [r["prompt"] for r in rows]
    gens = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": g.text}] if conversational else g.text for g in gens]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in ("prompt", "completion")}

    result = score_completions(prompts, completions, columns, reward,
                               accuracy_reward=accuracy_reward, format_reward=format_reward)
    result["mean_length"] = sum(g.length for g in gens) / len(gens)
    result["truncation_rate"] = sum(g.truncated for g in gens) / len(gens)
    result["n"] = len(gens)
    if kl_reference is not None:
        result.update(kl_along_answers(model, tokenizer, kl_reference, prompts, gens))
    if num_samples:
        result["samples"] = [
            {"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": g.text}
            for p, g in zip(prompts[:num_samples], gens[:num_samples])
        ]
    return result


def kl_along_answers(model: Any, tokenizer: Any, reference: Any, prompts: Sequence[Any], gens: Sequence[Any],
                     batch_size: int = 8) -> dict[str, float | None]:
    """Exact KL(model || reference) over the vocabulary at each token of ``gens`` (the model's answers to
    ``prompts``, as returned by ``generation.generate_greedy``): ``{"kl_to_reference": mean per token,
    "kl_to_reference_seq": mean over answers of the sum over the answer}``. None values when the vocabularies
    differ or there is no answer token."""
    import torch

    from .generation import _render, load_policy

    ref, _ = load_policy(reference, tokenizer)
    device = next(model.parameters()).device
    ref = ref.to(device)
    was_training = (model.training, ref.training)
    model.eval(), ref.eval()
    token_sum, n_tokens, seq_sums = 0.0, 0, []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    try:
        for start in range(0, len(prompts), batch_size):
            rows = []
            for p, g in zip(prompts[start : start + batch_size], gens[start : start + batch_size]):
                prompt_ids = tokenizer(_render(tokenizer, p), add_special_tokens=False)["input_ids"]
                rows.append((list(prompt_ids), list(g.ids)))
            width = max(len(a) + len(b) for a, b in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, (a, b) in enumerate(rows):  # right padding: position ids as in an unpadded pass
                ids[i, : len(a) + len(b)] = torch.tensor(a + b)
                mask[i, : len(a) + len(b)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                logq = ref(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            if logp.shape[-1] != logq.shape[-1]:
                return {"kl_to_reference": None, "kl_to_reference_seq": None}
            for i, (a, b) in enumerate(rows):
                if not b:
                    seq_sums.append(0.0)
                    continue
                at = slice(len(a) - 1, len(a) + len(b) - 1)  # the logits at t predict token t + 1
                kl = (logp[i, at].exp() * (logp[i, at] - logq[i, at])).sum(-1).clamp_min(0.0)
                token_sum += float(kl.sum())
                n_tokens += len(b)
                seq_sums.append(float(kl.sum()))
    finally:
        model.train(was_training[0])
        ref.train(was_training[1])
    return {"kl_to_reference": token_sum / n_tokens if n_tokens else None,
            "kl_to_reference_seq": sum(seq_sums) / len(seq_sums) if seq_sums else None}
