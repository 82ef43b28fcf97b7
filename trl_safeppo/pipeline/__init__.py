"""Recipes: one YAML file runs a whole chain of stages (SFT -> PPO -> GRPO -> rejection-sampled SFT -> DPO).

- :mod:`.recipe`: the format (dataclasses), ``key.path=value`` overrides, ``${...}`` references;
- :mod:`.schema`: stage ``args`` checked against the fields of the stage's config dataclass;
- :mod:`.data`: dataset forms, loading and column checks;
- :mod:`.stages`: the stage-type table and one run function per type;
- :mod:`.preflight`: the whole recipe validated before anything trains;
- :mod:`.manifest`: ``manifest.json`` (status, hashes, versions, timings, metrics) and resume;
- :mod:`.runner`: ``trl-safeppo run RECIPE.yaml [overrides]``.

See docs/recipes.md for the format reference.
"""

from .recipe import Recipe, RecipeError, StageSpec, load_recipe

__all__ = ["Recipe", "RecipeError", "StageSpec", "load_recipe"]
