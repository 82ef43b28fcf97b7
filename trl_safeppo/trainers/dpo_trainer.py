"""SafeDPOTrainer: TRL's DPOTrainer with a chosen-likelihood guard, drift monitoring and tripwires that act.

Everything extends DPOTrainer through ``super()``: the guard is TRL's own ``"sft"`` loss term (configured on a copy
of the arguments), the monitoring reads what DPOTrainer already measured (``rewards/chosen`` = beta * mean chosen
log-ratio, ``rewards/rejected``) right after each ``compute_loss``, and the tripwires are the shared callback.
"""

from __future__ import annotations

import copy

from trl import DPOTrainer

from ..models import quiet_trl_checkpointing_aliases, resolve_model_path
from .dpo_config import SafeDPOConfig
from .rails_mixin import CheckpointStateCallback, SafeCheckpointMixin, TrainerRails
from .tripwires import add_tripwires


def check_preference_dataset(dataset, field: str = "train_dataset") -> None:
    """A preference dataset needs `chosen` and `rejected` columns (and usually `prompt`): fail early, naming them."""
    for ds in dataset.values() if isinstance(dataset, dict) else [dataset]:
        columns = getattr(ds, "column_names", None)  # None: no dataset, or one without known features (TRL checks)
        missing = [c for c in ("chosen", "rejected") if columns is not None and c not in columns]
        if missing:
            raise ValueError(
                f"{field} is missing the column(s) {missing} of TRL's preference format (columns found: {columns}); "
                "a DPO dataset needs `chosen` and `rejected` (and `prompt` unless it is implicit). "
                "trl_safeppo.pairs.build_pairs builds one from scored samples."
            )


class SafeDPOTrainer(SafeCheckpointMixin, DPOTrainer):
    """DPOTrainer plus the chosen-likelihood guard, drift monitoring and tripwires; ``args`` is a
    :class:`SafeDPOConfig`. ``model`` (and a string ``ref_model``) may be a ``tiny://`` identifier, a local path or
    a Hub id.

    Attributes added to DPOTrainer's:
        tripwire_callback: the :class:`~trl_safeppo.trainers.tripwires.TripwireCallback`, or None.
    """

    _tag_names = ["trl", "dpo", "trl_safeppo"]

    def __init__(self, model, ref_model=None, args: SafeDPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 **kwargs):
        quiet_trl_checkpointing_aliases()
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = SafeDPOConfig(f"{name.split('/')[-1]}-SafeDPO")
        if isinstance(model, str):
            model = resolve_model_path(model)
        if isinstance(ref_model, str):
            ref_model = resolve_model_path(ref_model, field="ref_model")
        check_preference_dataset(train_dataset, "train_dataset")
        check_preference_dataset(eval_dataset, "eval_dataset")
        coef = getattr(args, "chosen_nll_coef", 0.0)
        if coef > 0:  # the chosen-likelihood guard is TRL's own "sft" term, weighted
            args = copy.copy(args)
            weights = list(args.loss_weights or [1.0] * len(args.loss_type))
            args.loss_type, args.loss_weights = [*args.loss_type, "sft"], [*weights, float(coef)]
        super().__init__(
            model=model, ref_model=ref_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            **kwargs,
        )
        self.rails_wiring = TrainerRails()  # no rails: its KL control is the one writer of beta (a tripwire's raise_kl)
        self.rails_wiring.start(self)
        add_tripwires(self, args)
        self.add_callback(CheckpointStateCallback(self))  # beta, the tripwire ladder

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        store = self._metrics[mode]
        if store.get("rewards/chosen") and store.get("rewards/rejected") and self.beta > 0:
            # DPOTrainer logged beta * mean(log pi(y|x) - log pi_ref(y|x)) for the chosen and rejected completions.
            chosen = store["rewards/chosen"][-1] / self.beta
            rejected = store["rewards/rejected"][-1] / self.beta
            store["dpo/chosen_logratio"].append(chosen)
            store["dpo/rejected_logratio"].append(rejected)
            store["kl"].append(0.5 * (abs(chosen) + abs(rejected)))
            store["beta"].append(float(self.beta))
        return out
