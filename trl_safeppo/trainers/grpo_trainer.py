"""SafeGRPOTrainer: TRL's GRPOTrainer with reward rails, adaptive KL on beta, and tripwires that act.

All of it is wiring (``rails_mixin.py`` and ``tripwires.py``): GRPO's rewards go through the rails before GRPO
normalizes them per group, beta follows the KL controller, rails and KL state ride along in checkpoints, and the
tripwire callback watches the logs. With ``rails=None`` and ``tripwires=None`` every override is a pass-through.
"""

from __future__ import annotations

from trl import GRPOTrainer

from .grpo_config import SafeGRPOConfig
from .rails_mixin import SafeRailsMixin


class SafeGRPOTrainer(SafeRailsMixin, GRPOTrainer):
    """GRPOTrainer plus rails and tripwires; takes the same arguments, with ``args`` a :class:`SafeGRPOConfig`.

    ``model`` may be a ``tiny://`` identifier, a local path or a Hub id (resolved by
    :func:`trl_safeppo.models.resolve_model_path`), or a model object.

    Attributes added to GRPOTrainer's:
        rails_wiring: the :class:`~trl_safeppo.trainers.rails_mixin.TrainerRails` (reward rails, KL control).
        tripwire_callback: the :class:`~trl_safeppo.trainers.tripwires.TripwireCallback`, or None.
    """

    _tag_names = ["trl", "grpo", "trl_safeppo"]

    def __init__(self, model, reward_funcs=None, args: SafeGRPOConfig | None = None, *, reward_processing_classes=None,
                 **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = SafeGRPOConfig(f"{name.split('/')[-1]}-SafeGRPO")
        model, reward_funcs, args, reward_processing_classes = self._before_grpo_init(
            model, reward_funcs, args, reward_processing_classes)
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, reward_processing_classes=reward_processing_classes,
            **kwargs,
        )
        self._after_grpo_init(args)
