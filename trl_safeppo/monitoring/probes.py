"""Probe prompts: a fixed handful of prompts answered greedily by each stage's final policy.

The answers go to ``stages/NN-name/probes.json`` as ``[{"prompt": ..., "completion": ...}]``; the report shows them
side by side (probe rows, stage columns), so a person sees how behaviour moved from stage to stage. Greedy
decoding makes an answer a property of the checkpoint, not of the sampling seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def validate_probes(probes: Any, field_name: str = "probes") -> list[str]:
    """Return ``probes`` as a list of strings, or raise one ValueError naming what is wrong."""
    if isinstance(probes, str) or not isinstance(probes, Sequence):
        raise ValueError(
            f"{field_name}: expected a non-empty list of prompt strings, got {type(probes).__name__} {probes!r}"
        )
    if len(probes) == 0:
        raise ValueError(f"{field_name}: the list is empty; give at least one prompt string or remove the key")
    for i, p in enumerate(probes):
        if not isinstance(p, str):
            raise ValueError(f"{field_name}[{i}]: expected a prompt string, got {type(p).__name__} {p!r}")
        if not p.strip():
            raise ValueError(f"{field_name}[{i}]: the prompt is blank; give some text")
    return list(probes)


def run_probes(
    model_or_path: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    tokenizer: Any = None,
    system_prompt: str | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Greedy answers of a policy to each probe prompt.

    With a chat tokenizer each prompt becomes a user turn (after ``system_prompt`` when given); otherwise it is
    used as plain text. Returns ``[{"prompt", "completion", "length", "truncated"}]`` in the order of ``prompts``.
    """
    from .generation import generate_greedy, load_policy

    prompts = validate_probes(prompts)
    model, tokenizer = load_policy(model_or_path, tokenizer)
    if getattr(tokenizer, "chat_template", None):
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        rendered: list[Any] = [system + [{"role": "user", "content": p}] for p in prompts]
    else:
        rendered = [(system_prompt + "\n" if system_prompt else "") + p for p in prompts]
    gens = generate_greedy(model, tokenizer, rendered, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [
        {"prompt": p, "completion": g.text, "length": g.length, "truncated": g.truncated}
        for p, g in zip(prompts, gens)
    ]
