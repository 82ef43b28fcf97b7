"""Safety rails: small pure transforms with explicit, checkpointable state (docs/rails.md).

Reward rails (`RewardRail` = `init` + `update`, composed by `chain`), KL controllers and estimators, PPO maths (GAE,
masked whitening) and tripwire detectors. Names are imported lazily so that `import trl_safeppo.rails` (and
`RailsConfig`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # base
    "RewardBatch": ".base",
    "RewardRail": ".base",
    "chain": ".base",
    "identity": ".base",
    "reward_batch_from_completions": ".base",
    # reward rails
    "non_finite_guard": ".reward",
    "length_debias": ".reward",
    "length_power": ".reward",
    "missing_eos": ".reward",
    "length_linear": ".reward",
    "overlong": ".reward",
    "clip_rewards": ".reward",
    "percentile_clip": ".reward",
    "normalize_rewards": ".reward",
    "welford_update": ".reward",
    # KL
    "AdaptiveKLController": ".kl",
    "FixedKLController": ".kl",
    "kl_per_token": ".kl",
    "sequence_kl": ".kl",
    "kl_penalized_token_rewards": ".kl",
    # PPO maths
    "compute_gae": ".gae",
    "masked_mean": ".gae",
    "masked_var": ".gae",
    "masked_whiten": ".gae",
    # tripwires
    "Verdict": ".tripwires",
    "TripwireSpec": ".tripwires",
    "DETECTORS": ".tripwires",
    "evaluate": ".tripwires",
    # config
    "RailsConfig": ".config",
    "RewardRails": ".config",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_safeppo.rails' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
