"""Offline rejection sampling: generate ``n`` completions per prompt, score them, keep the ones the rules accept,
and write them as a TRL SFT dataset with provenance and a dataset card.

This is the DeepSeek-R1 recipe's data stage (https://arxiv.org/abs/2501.12948, section 2.3.3): after RL, sample many
reasoning traces from the policy, keep only the correct ones, and fine-tune on them. Beside the selected SFT set the
run keeps the table of *every* scored completion (docs/architecture.md, "Scored samples"), from which
:func:`trl_safeppo.pairs.build_pairs` builds DPO pairs without generating again.

The steps, top to bottom (:mod:`.run`):

1. load the prompts, drop prompts that appear in an evaluation set (decontamination by normalized prompt text);
2. for each chunk of ``batch_size`` prompts: generate ``num_completions`` completions (transformers ``generate``,
   or vLLM when asked), score them with the reward spec (:mod:`.generation`), and write the scored chunk to
   ``parts/`` atomically. A rerun after an interruption skips the chunks already written; every chunk draws from its
   own seed, so the result is the same as an uninterrupted run;
3. select per prompt (``all_passing``, ``best_of_n``, ``top_k``, ``threshold``, ``pass_rate_band``), deduplicate,
   cap (:mod:`.selection`), and write the products (:mod:`.output`; layout in :data:`OUTPUT_LAYOUT` and
   docs/rejection_sampling.md).

The modules: :mod:`.config` (settings, Summary), :mod:`.generation`, :mod:`.selection`, :mod:`.output` (products,
resume, loaders), :mod:`.run`, :mod:`.cli`. Python: ``run_rejection_sampling(RejectionSamplingConfig(...)) ->
Summary``. CLI: ``trl-safeppo sample ...``.
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
