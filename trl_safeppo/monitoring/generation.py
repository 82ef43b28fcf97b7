"""Greedy, batched generation shared by the held-out evaluation and the probe prompts.

Greedy decoding (``do_sample=False``) makes both deterministic for a given checkpoint, so answers can be compared
across stages. Completion length counts generated tokens up to and including the first EOS, as GRPO's
``completions/mean_length`` does; a completion is *truncated* when no EOS appeared within ``max_new_tokens``
(GRPO's ``completions/clipped_ratio``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Generation:
    text: str  # decoded completion, special tokens removed
    length: int  # generated tokens up to and including the first EOS
    truncated: bool  # no EOS within max_new_tokens
    ids: tuple[int, ...] = ()  # the generated token ids kept (up to and including the first EOS)


def load_policy(model_or_path: Any, tokenizer: Any = None):
    """``(model, tokenizer)`` from a model object (used where it is) or a path / ``tiny://`` name (loaded, on the GPU
    when there is one; the tokenizer is loaded from beside it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_or_path, str):
        from ..models import resolve_model_path

        import torch

        path = resolve_model_path(model_or_path)
        model = AutoModelForCausalLM.from_pretrained(path)
        if torch.cuda.is_available():  # greedy evaluation of a real model on CPU would take far too long
            model = model.to("cuda")
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    else:
        model = model_or_path
        if tokenizer is None:
            name = getattr(getattr(model, "config", None), "name_or_path", None)
            if not name:
                raise ValueError("pass tokenizer= when model_or_path is a model object without a saved path")
            tokenizer = AutoTokenizer.from_pretrained(name)
    return model, tokenizer


def _render(tokenizer, prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def generate_greedy(
    model, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int, batch_size: int = 16
) -> list[Generation]:
    """Greedy completions for ``prompts`` (strings, or conversational lists of ``{"role", "content"}``)."""
    import torch

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[Generation] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [_render(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            new = ids[:, batch["input_ids"].shape[1] :].tolist()
            for row in new:
                cut = row.index(eos_id) + 1 if eos_id in row else None
                kept = row[:cut] if cut is not None else row
                out.append(
                    Generation(
                        text=tokenizer.decode(kept, skip_special_tokens=True),
                        length=len(kept),
                        truncated=cut is None,
                        ids=tuple(kept),
                    )
                )
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out
