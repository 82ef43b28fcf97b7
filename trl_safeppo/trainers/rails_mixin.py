"""The rails of one GRPO-based trainer (SafeGRPOTrainer, SafePPOTrainer): what they hold, and the hooks that run them.

- :class:`TrainerRails` (``trainer.rails_wiring``), built once from ``args.rails_config``, holds two pieces, each
  the one owner of its state: ``rewards`` (:class:`~.reward_rails.RewardStage`) and ``kl``
  (:class:`~.kl_control.KLControl`: the controller and ``beta``). They are checkpointed in one file,
  ``safe_rails_state.pt``, written in ``on_save`` and read back by :meth:`SafeRailsMixin.train` on resume.
- :class:`SafeRailsMixin` holds the GRPOTrainer overrides that call them; with no rails every one is a pass-through.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .. import fileio
from .kl_control import KLControl
from .reward_rails import RewardStage
from .tripwires import load_tripwire_state, save_tripwire_state

RAILS_STATE_FILE = "safe_rails_state.pt"
STATE_MARKER = "trl_safeppo_state.json"  # written last into a checkpoint: all of this package's state is there
STATE_VERSION = 2


def checkpoint_folder(args, state) -> str:
    """The folder the Trainer just wrote for ``state.global_step``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def resume_folder(args, resume_from_checkpoint) -> str | None:
    """``train(resume_from_checkpoint=...)``'s folder (``True``: the last of ``output_dir``, None if none)."""
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(args.output_dir)
    return resume_from_checkpoint or None


def upgrade_state(state: dict) -> dict:
    """A rails state file of either format, as version 2. Version 1 stored the KL controller twice (inside ``rails``
    and as ``kl``) and ``beta`` apart; version 2 stores it once (in ``rails`` with reward rails, else as ``kl``)."""
    version = state.get("version", 1)
    if version == STATE_VERSION:
        return state
    if version != 1:
        raise ValueError(f"{RAILS_STATE_FILE} has version {version!r}; this trl_safeppo reads versions 1 and 2")
    rails = state.get("rails")
    return {"version": STATE_VERSION, "rails": rails, "kl": state.get("kl") if rails is None else None}


class TrainerRails:
    """Reward rails and KL control of one trainer (see the module docstring)."""

    def __init__(self, rewards: RewardStage | None = None, kl: KLControl | None = None):
        self.rewards = rewards or RewardStage()
        self.kl = kl or KLControl()
        self.trainer = None

    @classmethod
    def from_args(cls, args, *, ppo: bool = False) -> TrainerRails:
        """From ``args.rails_config`` (the ``rails`` block parsed once by the config) and ``args.beta``; PPO keeps a
        fixed controller at ``beta`` when no rails are set (its reward penalty reads beta from it)."""
        from ..rails.config import RewardRails
        from ..rails.kl import FixedKLController

        config = getattr(args, "rails_config", None)
        if config is None:
            controller = FixedKLController(args.beta) if ppo and args.beta > 0 else None
            return cls(kl=KLControl.build(None, controller, ppo=ppo))
        rails = RewardRails(config, default_kl_coef=args.beta)
        return cls(RewardStage(rails), KLControl.build(config, rails.kl_controller, ppo=ppo))

    @property
    def rails(self):
        """The :class:`~trl_safeppo.rails.RewardRails` (reward chain and its state), or ``None``."""
        return self.rewards.rails

    @property
    def kl_controller(self):
        return self.kl.controller

    @property
    def active(self) -> bool:
        """Whether there is state to checkpoint."""
        return self.rails is not None or self.kl.controller is not None

    def prepare_init(self, args, reward_funcs, reward_processing_classes=None):
        """GRPOTrainer's constructor arguments with the rails' adjustment column and ``beta`` at the controller's
        value (``args`` copied when changed)."""
        import copy

        if self.kl.controller is not None:
            args = copy.copy(args)
            args.beta = self.kl.value
        return self.rewards.prepare_init(args, reward_funcs, reward_processing_classes)

    def start(self, trainer) -> None:
        """Bind to the constructed trainer."""
        self.trainer = trainer
        self.rewards.start(trainer)
        self.kl.start(trainer)
        if self.active:
            trainer.add_callback(RailsCheckpointCallback(self))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rails = self.rails.state_dict() if self.rails is not None else None
        return {"version": STATE_VERSION, "rails": rails, "kl": self.kl.state_dict() if rails is None else None}

    def load_state_dict(self, state: dict) -> None:
        state = upgrade_state(state)
        if self.rails is not None and state.get("rails") is not None:
            self.rails.load_state_dict(state["rails"])  # the controller is the rails' own: loaded with them
            self.kl.sync()
        elif state.get("kl") is not None:
            self.kl.load_state_dict(state["kl"])


class RailsCheckpointCallback(TrainerCallback):
    """Writes the rails state into every checkpoint folder, right after the Trainer wrote it."""

    def __init__(self, rails: TrainerRails):
        self.rails = rails

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            import torch

            with fileio.atomic_path(os.path.join(checkpoint_folder(args, state), RAILS_STATE_FILE)) as tmp:
                torch.save(self.rails.state_dict(), tmp)
        return control


class CheckpointStateCallback(TrainerCallback):
    """The last of a trainer's ``on_save`` callbacks: writes the tripwire ladder's state, then the marker
    ``trl_safeppo_state.json`` (all of this package's state is in the checkpoint; ``trainer_state.json`` is written
    before the callbacks, so it cannot say so). The recipe runner resumes only from a marked checkpoint."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_folder(args, state)
        save_tripwire_state(self.trainer, folder)
        if args.should_save:
            fileio.write_json(os.path.join(folder, STATE_MARKER), {"global_step": state.global_step, "complete": True})
        return control


def mark_checkpoints_complete(trainer) -> None:
    """Add :class:`CheckpointStateCallback` (call at the end of a trainer's ``__init__``)."""
    trainer.add_callback(CheckpointStateCallback(trainer))


class SafeRailsMixin:
    """GRPOTrainer overrides that route through ``self.rails_wiring``: ``class X(SafeRailsMixin, GRPOTrainer)``,
    calling ``TrainerRails.prepare_init`` before and ``start(self)`` after ``super().__init__``."""

    rails_wiring: TrainerRails | None = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.rails_wiring.rewards.apply(self, rewards_per_func, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.rails_wiring.kl.update_from_batch(self, output)  # rails.kl.measure_before_update (GRPO)
        return output

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.rails_wiring.kl.observe_step(self)
        return loss

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from ..rewards.timeout import close_workers

        folder = resume_folder(self.args, resume_from_checkpoint)
        if folder is not None:
            self.load_checkpoint_state(folder)
            load_tripwire_state(self, folder)  # after the rails: the ladder's beta is the one in force
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # the reward functions' worker processes end with training, also when it raises
            close_workers(getattr(self, "reward_funcs", None) or [])

    def load_checkpoint_state(self, folder: str) -> None:
        """What this package adds to a checkpoint folder, read back before the Trainer resumes from it."""
        path = os.path.join(folder, RAILS_STATE_FILE)
        if self.rails_wiring.active and os.path.exists(path):
            import torch

            self.rails_wiring.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
