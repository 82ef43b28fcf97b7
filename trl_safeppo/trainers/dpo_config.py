"""SafeDPOConfig: TRL's DPOConfig plus the chosen-likelihood guard and the tripwires of one DPO stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import DPOConfig

from .grpo_config import TRIPWIRE_PARAMS
from .tripwires import TRIPWIRE_HELP, TripwireFields, validate_tripwire_fields


@dataclass
class SafeDPOConfig(TripwireFields, DPOConfig):
    r"""
    Configuration class for [`SafeDPOTrainer`]: every [`~trl.DPOConfig`] field, plus the fields below. With
    `chosen_nll_coef=0` and `tripwires=None` (the defaults) training is exactly DPOTrainer's.

    The DPO rails use TRL's own options where they exist: length-normalized log-probabilities are
    `loss_type=["sigmoid_norm"]` (per-token average, as in SimPO / R-DPO), length-desensitized ones are `ld_alpha`
    (LD-DPO, Liu et al. 2024, https://huggingface.co/papers/2409.06411). The monitoring of the implicit
    reward margin (`rewards/margins`) and of the drift from the reference (`dpo/chosen_logratio`,
    `dpo/rejected_logratio`, `kl`) is always on; see docs/metrics.md.

    Parameters:
        > Chosen-likelihood guard

        chosen_nll_coef (`float`, *optional*, defaults to `0.0`):
            Weight of an NLL term on the chosen completion added to the DPO loss (TRL's `"sft"` loss type appended
            to `loss_type`), which keeps the chosen log-probability from collapsing while the margin grows
            (RPO, Pang et al. 2024, https://huggingface.co/papers/2404.19733, use 1.0). 0 disables it.

        > Tripwires
{tripwire_params}
    """

    # Chosen-likelihood guard
    chosen_nll_coef: float = field(
        default=0.0, metadata={"help": "Weight of an NLL term on the chosen completion (RPO uses 1.0); 0: off."}
    )

    def __post_init__(self):
        super().__post_init__()
        coef = self.chosen_nll_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
            raise ValueError(
                f"chosen_nll_coef={coef!r} is invalid; use a finite number >= 0 (0 disables the guard, RPO uses 1.0)"
            )
        if coef > 0 and "sft" in self.loss_type:
            raise ValueError(
                f"chosen_nll_coef={coef!r} together with loss_type={self.loss_type!r}: both add the NLL term on the "
                "chosen completion; keep one of them"
            )
        validate_tripwire_fields(self)


# The docstring is a literal (so it is __doc__); the tripwire fields share their help text with the other configs.
SafeDPOConfig.__doc__ = SafeDPOConfig.__doc__.format(tripwire_params=TRIPWIRE_PARAMS, **TRIPWIRE_HELP)
