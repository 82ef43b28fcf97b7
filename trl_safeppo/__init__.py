"""trl_safeppo: PPO back on current TRL, with safety rails, rule-based rewards and one-YAML recipes.

Public names are imported lazily, so ``import trl_safeppo`` stays fast and pulls in neither torch nor TRL
until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_LAZY: dict[str, str] = {
    # rails
    "AdaptiveKLController": ".rails.kl",
    "FixedKLController": ".rails.kl",
    "compute_gae": ".rails.gae",
    "RailsConfig": ".rails.config",
    "RewardRails": ".rails.config",
    # trainers
    "SafePPOConfig": ".trainers.ppo_config",
    "SafePPOTrainer": ".trainers.ppo_trainer",
    "SafeGRPOConfig": ".trainers.grpo_config",
    "SafeGRPOTrainer": ".trainers.grpo_trainer",
    "SafeDPOConfig": ".trainers.dpo_config",
    "SafeDPOTrainer": ".trainers.dpo_trainer",
    # rejection sampling and harvesting
    "RejectionSamplingConfig": ".rejection_sampling",
    "run_rejection_sampling": ".rejection_sampling",
    "HarvestCallback": ".harvest",
    # recipes
    "load_recipe": ".pipeline.recipe",
    "run_recipe": ".pipeline.runner",
    # models and data
    "resolve_model_path": ".models",
    "load_arithmetic": ".tasks.arithmetic",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trl_safeppo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .harvest import HarvestCallback
    from .models import resolve_model_path
    from .pipeline.recipe import load_recipe
    from .pipeline.runner import run_recipe
    from .rails.config import RailsConfig, RewardRails
    from .rails.gae import compute_gae
    from .rails.kl import AdaptiveKLController, FixedKLController
    from .rejection_sampling import RejectionSamplingConfig, run_rejection_sampling
    from .tasks.arithmetic import load_arithmetic
    from .trainers.dpo_config import SafeDPOConfig
    from .trainers.dpo_trainer import SafeDPOTrainer
    from .trainers.grpo_config import SafeGRPOConfig
    from .trainers.grpo_trainer import SafeGRPOTrainer
    from .trainers.ppo_config import SafePPOConfig
    from .trainers.ppo_trainer import SafePPOTrainer
