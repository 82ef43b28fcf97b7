"""Offline rejection sampling (DeepSeek-R1, https://arxiv.org/abs/2501.12948, section 2.3.3): generate ``n``
completions per prompt, score them, keep the ones the rules accept, and write them as a TRL SFT dataset with
provenance and a dataset card, beside the table of every scored completion (input of
:func:`trl_safeppo.pairs.build_pairs`). docs/rejection_sampling.md describes a run.

Modules, in the order of a run (:mod:`.run`): :mod:`.config` (settings, Summary), :mod:`.generation` (prompts,
generators, scoring), :mod:`.selection`, :mod:`.output` (products, resume, loaders), :mod:`.cli`
(``trl-safeppo sample``).
"""

from __future__ import annotations

from .config import (
    DEDUP_MODES, DROP_REASONS, OUTPUT_LAYOUT, SELECTION_MODES, SFT_FORMATS, RejectionSamplingConfig, Summary, describe,
)
from .output import load_scored_samples, load_sft_dataset, sft_row, write_products
from .run import run_rejection_sampling
from .selection import normalize_text, select, stable_prompt_id

__all__ = [
    "DEDUP_MODES", "DROP_REASONS", "OUTPUT_LAYOUT", "SELECTION_MODES", "SFT_FORMATS", "RejectionSamplingConfig",
    "Summary", "describe", "load_scored_samples", "load_sft_dataset", "normalize_text", "run_rejection_sampling",
    "select", "sft_row", "stable_prompt_id", "write_products",
]
