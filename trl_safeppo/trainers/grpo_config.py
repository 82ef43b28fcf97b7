"""SafeGRPOConfig: TRL's GRPOConfig plus the rails, the adaptive KL and the tripwires of one GRPO stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .tripwires import (
    TRIPWIRE_HELP, RewardTimeoutFields, TripwireFields, validate_reward_timeout, validate_tripwire_fields,
)


# The tripwire fields' entries in the docstrings of SafeGRPOConfig, SafePPOConfig and SafeDPOConfig (one text, here)
TRIPWIRE_PARAMS = """
        tripwires (`list[dict]`, *optional*):
            {tripwires}
        tripwire_raise_kl_factor (`float`, *optional*, defaults to `2.0`):
            {raise_kl_factor}
        tripwire_rollback_beta_factor (`float`, *optional*, defaults to `2.0`):
            {rollback_beta_factor}
        tripwire_rollback_lr_factor (`float`, *optional*, defaults to `0.5`):
            {rollback_lr_factor}
        tripwire_max_rollbacks (`int`, *optional*, defaults to `2`):
            {max_rollbacks}
        tripwire_snapshot_every (`int`, *optional*, defaults to `1`):
            {snapshot_every}
        tripwire_max_beta (`float`, *optional*):
            {max_beta}
        logging_nan_inf_filter (`bool`, *optional*, defaults to `False`):
            Overrides the TrainingArguments default (`True`), which replaces a NaN/inf loss by the running average in
            the logs and would hide it from the `non_finite` tripwire.
""".format(**TRIPWIRE_HELP)


@dataclass
class SafeGRPOConfig(TripwireFields, RewardTimeoutFields, GRPOConfig):
    r"""
    Configuration class for [`SafeGRPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the fields below. With
    `rails=None` and `tripwires=None` (the defaults) training is exactly GRPOTrainer's.

    Rails use GRPO's own knobs where they exist (`scale_rewards`, `loss_type`, `mask_truncated_completions`,
    `reward_weights`; docs/grpo.md, "GRPO's own knobs first"). The `rails` block adds what GRPO lacks: clipping,
    running normalization, length rails, a missing-EOS penalty and a non-finite guard (on the summed reward, *before*
    GRPO's group normalization), and an adaptive KL coefficient on `beta` (Ziegler et al. 2019,
    https://arxiv.org/abs/1909.08593).

    Parameters:
        > Rails

        rails (`dict` or `RailsConfig`, *optional*):
            The rails of this stage, in the format of `trl_safeppo.RailsConfig.from_dict` (the YAML `rails:` block):
            reward rails in declared order and the KL controller. With an adaptive KL controller, its `init_kl_coef`
            replaces `beta` and its `min_coef` must be > 0 (GRPO loads no reference model when `beta == 0`).
            `None` disables all rails.

        > Tripwires
{tripwire_params}
        > Reward functions

        reward_timeout_s (`float`, *optional*, defaults to `60.0`):
            {reward_timeout_s}
    """

    # Rails
    rails: dict | Any | None = field(
        default=None, metadata={"help": "Reward rails and KL controller: a RailsConfig or its dict (docs/rails.md)."}
    )

    def __post_init__(self):
        super().__post_init__()
        from ..rails.config import RailsConfig

        # The rails block is parsed here, once: a bad block fails now, naming its field. `rails` keeps the dict form
        # (JSON-able args); the trainer builds its rails from `rails_config`.
        self.rails_config = None if self.rails is None else RailsConfig.from_any(self.rails)
        if self.rails_config is not None:
            self.rails = self.rails_config.to_dict()
            kl = self.rails_config.kl
            if kl.estimator not in (None, "k3"):
                raise ValueError(
                    f"rails.kl.estimator={kl.estimator!r}: GRPO's KL term is its own k3 estimator; set "
                    "rails.kl.estimator to null or 'k3' for a GRPO stage"
                )
        validate_tripwire_fields(self)
        validate_reward_timeout(self)


# The docstring is a literal (so it is __doc__); the tripwire fields share their help text with the other configs.
SafeGRPOConfig.__doc__ = SafeGRPOConfig.__doc__.format(tripwire_params=TRIPWIRE_PARAMS, **TRIPWIRE_HELP)
