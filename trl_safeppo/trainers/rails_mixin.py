"""The rails of one GRPO-based trainer (SafeGRPOTrainer, SafePPOTrainer), and the checkpoint state of every Safe*
trainer.

- :class:`TrainerRails` (``trainer.rails_wiring``), built once from ``args.rails_config``: ``rewards``
  (:class:`~.reward_rails.RewardStage`) and ``kl`` (:class:`~.kl_control.KLControl`), each the one owner of its
  state; :class:`SafeRailsMixin`: the GRPOTrainer overrides that call them (with no rails, pass-throughs).
- :class:`SafeCheckpointMixin`: this package's files in a checkpoint (``safe_rails_state.pt``, the tripwire ladder,
  DPO's beta), written by one ``on_save`` (:class:`CheckpointStateCallback`, last the marker) and read back in
  ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .. import fileio
from .kl_control import KLControl
from .reward_rails import RewardStage

RAILS_STATE_FILE = "safe_rails_state.pt"
STATE_MARKER = "trl_safeppo_state.json"  # written last into a checkpoint: all of this package's state is there
STATE_VERSION = 2


def checkpoint_folder(args, state) -> str:
    """The folder the Trainer just wrote for ``state.global_step``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class TrainerRails:
    """Reward rails and KL control of one trainer (see the module docstring)."""

    def __init__(self, rewards: RewardStage | None = None, kl: KLControl | None = None):
        self.rewards = rewards or RewardStage()
        self.kl = kl or KLControl()

    @classmethod
    def from_args(cls, args, *, ppo: bool = False) -> TrainerRails:
        """From ``args.rails_config`` (the ``rails`` block parsed once by the config) and ``args.beta``; PPO keeps a
        fixed controller at ``beta`` when no rails are set (its reward penalty reads beta from it)."""
        from ..rails.config import RewardRails
        from ..rails.kl import FixedKLController

        config = getattr(args, "rails_config", None)
        if config is None:
            controller = FixedKLController(args.beta) if ppo and args.beta > 0 else None
            return cls(kl=KLControl(controller, ppo=ppo))
        rails = RewardRails(config, default_kl_coef=args.beta)
        return cls(RewardStage(rails), KLControl(rails.kl_controller, config, ppo=ppo))

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
        self.rewards.start(trainer)
        self.kl.start(trainer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        rails = self.rails.state_dict() if self.rails is not None else None
        return {"version": STATE_VERSION, "rails": rails, "kl": self.kl.state_dict() if rails is None else None}

    def load_state_dict(self, state: dict) -> None:
        """Either format: version 1 also stored the controller inside ``rails`` when reward rails were on (its ``kl``
        entry then repeated it) and ``beta`` apart; version 2 stores the controller once."""
        if state.get("version", 1) not in (1, STATE_VERSION):
            raise ValueError(f"{RAILS_STATE_FILE} has version {state['version']!r}; this trl_safeppo reads versions 1 "
                             "and 2")
        if state.get("rails") is not None:
            if self.rails is not None:
                self.rails.load_state_dict(state["rails"])  # the controller is the rails' own: loaded with them
                self.kl.sync()
        elif state.get("kl") is not None:
            self.kl.load_state_dict(state["kl"])


class CheckpointStateCallback(TrainerCallback):
    """The last of a trainer's ``on_save`` callbacks: ``save_checkpoint_state``, then the marker (``trainer_state.json``
    is written before the callbacks, so it cannot say that all is there). The recipe runner resumes only from a marked
    checkpoint."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        # every process has written its part (the Trainer writes rng_state_<i>.pth on each, with no barrier after
        # it): a process that died before here fails this collective, so the marker is never written without it
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            folder = checkpoint_folder(args, state)
            self.trainer.save_checkpoint_state(folder)
            fileio.write_json(os.path.join(folder, STATE_MARKER), {"global_step": state.global_step, "complete": True})
        return control


def mark_checkpoints_complete(trainer) -> None:
    """Add :class:`CheckpointStateCallback` (call at the end of a trainer's ``__init__``)."""
    trainer.add_callback(CheckpointStateCallback(trainer))


class SafeCheckpointMixin:
    """What this package adds to a trainer's checkpoints, written by :class:`CheckpointStateCallback` (main process)
    and read back in ``train(resume_from_checkpoint=...)``; subclasses add their own files through ``super()``."""

    tripwire_callback = None  # set by tripwires.add_tripwires

    def save_checkpoint_state(self, folder: str) -> None:
        if self.tripwire_callback is not None:
            self.tripwire_callback.save(folder)

    def load_checkpoint_state(self, folder: str) -> None:
        if self.tripwire_callback is not None:
            self.tripwire_callback.load(folder)  # last: the ladder's beta is the one in force

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from ..rewards.timeout import close_workers

        folder = resume_from_checkpoint or None
        if folder is True:  # the last checkpoint of output_dir, if any
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)
        if folder is not None:
            self.load_checkpoint_state(folder)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:  # the reward functions' worker processes end with training, also when it raises
            close_workers(getattr(self, "reward_funcs", None) or [])


class SafeRailsMixin(SafeCheckpointMixin):
    """GRPOTrainer overrides that route through ``self.rails_wiring``: ``class X(SafeRailsMixin, GRPOTrainer)``,
    calling :meth:`_before_grpo_init` before and :meth:`_after_grpo_init` after ``super().__init__``."""

    rails_wiring: TrainerRails | None = None

    def _before_grpo_init(self, model, reward_funcs, args, reward_processing_classes, *, ppo: bool = False):
        """GRPOTrainer's ``(model, reward_funcs, args, reward_processing_classes)`` with this package's conveniences
        (``tiny://`` and local model paths, rule names and specs as rewards, each reward function timed in a worker
        process when ``args.reward_timeout_s`` is set) and the rails' adjustment column and beta."""
        from ..models import quiet_trl_checkpointing_aliases, resolve_model_path
        from ..rewards.timeout import DEFAULT_TIMEOUT_S, with_timeouts
        from .reward_rails import resolve_reward_funcs

        quiet_trl_checkpointing_aliases()
        if isinstance(model, str):
            model = resolve_model_path(model)
        timeout_s = getattr(args, "reward_timeout_s", DEFAULT_TIMEOUT_S)  # a plain GRPOConfig has no such field
        reward_funcs = with_timeouts(resolve_reward_funcs(reward_funcs), timeout_s)
        self.rails_wiring = TrainerRails.from_args(args, ppo=ppo)
        args, reward_funcs, reward_processing_classes = self.rails_wiring.prepare_init(
            args, reward_funcs, reward_processing_classes)
        return model, reward_funcs, args, reward_processing_classes

    def _after_grpo_init(self, args) -> None:
        """Bind the rails, attach the tripwires, and last the checkpoint marker's callback (add any other
        ``on_save`` callback before)."""
        from .tripwires import add_tripwires

        self.rails_wiring.start(self)
        add_tripwires(self, args, self.rails_wiring)  # raise_kl / rollback act on beta through rails_wiring.kl
        mark_checkpoints_complete(self)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.rails_wiring.rewards.apply(self, rewards_per_func, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.rails_wiring.kl.update_from_batch(self, output)  # rails.kl.measure_before_update (GRPO)
        return output

    def save_checkpoint_state(self, folder: str) -> None:
        if self.rails_wiring.active:
            import torch

            with fileio.atomic_path(os.path.join(folder, RAILS_STATE_FILE)) as tmp:
                torch.save(self.rails_wiring.state_dict(), tmp)
        super().save_checkpoint_state(folder)

    def load_checkpoint_state(self, folder: str) -> None:
        path = os.path.join(folder, RAILS_STATE_FILE)
        if self.rails_wiring.active and os.path.exists(path):
            import torch

            self.rails_wiring.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        super().load_checkpoint_state(folder)
