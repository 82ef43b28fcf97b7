"""SafeGRPOConfig: TRL's GRPOConfig plus the rails, the adaptive KL and the tripwires of one GRPO stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .tripwires import RewardTimeoutFields, TripwireFields, check_tripwire_fields, field_docs


def parse_rails(config) -> None:
    """``config.rails`` parsed once, at configuration time, into ``config.rails_config`` (a bad block fails now,
    naming its field); ``rails`` keeps the dict form, so the config stays JSON-serializable."""
    from ..rails.config import RailsConfig

    config.rails_config = None if config.rails is None else RailsConfig.from_any(config.rails)
    if config.rails_config is not None:
        config.rails = config.rails_config.to_dict()


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
{rails}

        > Tripwires
{tripwire_params}

        > Reward functions
{reward_timeout_params}
    """

    rails: dict | Any | None = field(default=None, metadata={"help": (
        "The rails of this stage: a `trl_safeppo.RailsConfig`, its dict (the YAML `rails:` block, docs/rails.md) or a "
        "YAML path: reward rails in declared order and the KL controller. With an adaptive KL controller, its "
        "`init_kl_coef` replaces `beta` and its `min_coef` must be > 0 (GRPO loads no reference model at `beta=0`). "
        "`None` disables all rails.")})

    def __post_init__(self):
        super().__post_init__()
        parse_rails(self)
        if self.rails_config is not None and self.rails_config.kl.estimator not in (None, "k3"):
            raise ValueError(
                f"rails.kl.estimator={self.rails_config.kl.estimator!r}: GRPO's KL term is its own k3 estimator; set "
                "rails.kl.estimator to null or 'k3' for a GRPO stage"
            )
        if self.rails_config is not None and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} cannot be combined with rails: the "
                "rails act on the summed reward; use 'sum_then_normalize' or set rails to None")
        check_tripwire_fields(self)


# The docstring is a literal (so it is __doc__); its entries come from the fields' help text.
SafeGRPOConfig.__doc__ = SafeGRPOConfig.__doc__.format(rails=field_docs(SafeGRPOConfig, "rails"),
    tripwire_params=field_docs(TripwireFields), reward_timeout_params=field_docs(RewardTimeoutFields))
