"""SafeGRPOTrainer: TRL's GRPOTrainer with reward rails, adaptive KL on beta, and tripwires that act.

All of it is wiring (see ``_wiring.py`` and ``tripwires.py``): GRPO's rewards go through the rails before GRPO
normalizes them per group, beta follows the KL controller, rails and KL state ride along in checkpoints, and the
tripwire callback watches the logs. With ``rails=None`` and ``tripwires=None`` every override is a pass-through.
"""

from __future__ import annotations

import functools

from trl import GRPOTrainer

from ..models import quiet_trl_checkpointing_aliases, resolve_model_path
from ._wiring import RailsWiring, SafeRailsMixin
from .grpo_config import SafeGRPOConfig
from .tripwires import add_tripwires


class SafeGRPOTrainer(SafeRailsMixin, GRPOTrainer):
    """GRPOTrainer plus rails and tripwires; takes the same arguments, with ``args`` a :class:`SafeGRPOConfig`.

    ``model`` may be a ``tiny://`` identifier, a local path or a Hub id (resolved by
    :func:`trl_safeppo.models.resolve_model_path`), or a model object.

    Attributes added to GRPOTrainer's:
        rails_wiring: the :class:`~trl_safeppo.trainers._wiring.RailsWiring` (rails state, KL controller).
        tripwire_callback: the :class:`~trl_safeppo.trainers.tripwires.TripwireCallback`, or None.
    """

    _tag_names = ["trl", "grpo", "trl_safeppo"]

    def __init__(self, model, reward_funcs=None, args: SafeGRPOConfig | None = None, *, reward_processing_classes=None,
                 **kwargs):
        quiet_trl_checkpointing_aliases()
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SafeGRPOConfig(f"{name.split('/')[-1]}-SafeGRPO")
        if isinstance(model, str):
            model = resolve_model_path(model)
        wiring = RailsWiring.from_config(getattr(args, "rails", None), default_kl_coef=args.beta)
        estimator = getattr(getattr(wiring.rails, "config", None), "kl", None)
        estimator = getattr(estimator, "estimator", None)
        if estimator not in (None, "k3"):
            raise ValueError(
                f"rails.kl.estimator={estimator!r}: GRPO's KL term is its own k3 estimator; set rails.kl.estimator "
                "to null or 'k3' for a GRPO stage"
            )
        args, reward_funcs, reward_processing_classes = wiring.prepare_init(
            args, reward_funcs, reward_processing_classes
        )
        self.rails_wiring = wiring
        self.tripwire_callback = None
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, reward_processing_classes=reward_processing_classes,
            **kwargs,
        )
        wiring.attach(self)
        add_tripwires(self, args, wiring)

    def _generate_and_score_completions(self, inputs):
        wiring = self.rails_wiring
        region = None if wiring is None else wiring.trust_region
        logps = None
        if region is not None and region.checks_new_batch and self.model.training:
            draw = functools.partial(super()._generate_and_score_completions, inputs)
            output, logps = region.check_new_batch(self, draw, wiring.rails)
        else:
            output = super()._generate_and_score_completions(inputs)
        if wiring is not None and wiring.kl_before_update and self.model.training:
            wiring.update_kl_from_batch(self, output, logps)
        return output
