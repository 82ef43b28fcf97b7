"""The rails of one GRPO-based trainer (SafeGRPOTrainer, SafePPOTrainer), and the checkpoint state of every Safe*
trainer.

- :class:`TrainerRails` (``trainer.rails_wiring``), built once from ``args.rails_config``: ``rewards``
  (:class:`~.reward_rails.RewardStage`) and ``kl`` (:class:`~.kl_control.KLControl`, the one writer of ``beta``), each
  the one owner of its state; :class:`SafeRailsMixin`: the GRPOTrainer overrides that call them. SafeDPOTrainer has
  one too, without rails.
- :class:`SafeCheckpointMixin`: this package's state in a checkpoint, one JSON file (:data:`STATE_MARKER`) written
  last by :class:`CheckpointStateCallback` (so its presence marks the checkpoint complete) and read back in
  ``train(resume_from_checkpoint=...)``, older checkpoints' four files included (:func:`read_checkpoint_state`).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from .. import fileio
from .kl_control import KLControl
from .reward_rails import RewardStage

STATE_MARKER = "trl_safeppo_state.json"  # written last into a checkpoint: all of this package's state, in one file
STATE_VERSION = 3  # of STATE_MARKER; versions 1-2 (before 0.1.0's last round) wrote the state beside it:
LEGACY_FILES = ("safe_rails_state.pt", "tripwire_state.json", "safe_dpo_state.json")  # rails + KL, ladder, DPO beta
RAILS_STATE_VERSION = 2  # of TrainerRails.state_dict
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR and the global step


def read_checkpoint_state(folder: str) -> dict:
    """This package's state in checkpoint ``folder``: :data:`STATE_MARKER`'s, or for a checkpoint of an older version
    the :data:`LEGACY_FILES` beside it, read into the same keys (None where absent). A damaged file raises a
    ValueError naming it."""

    def load(name: str) -> dict:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return {}
        try:
            if name.endswith(".pt"):  # plain dicts and numbers: no pickled code is run
                import torch

                state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                with open(path, encoding="utf-8") as f:
                    state = json.load(f)
            if not isinstance(state, dict):
                raise TypeError(f"a {type(state).__name__}, not a dict")
        except Exception as err:  # noqa: BLE001  (torch and json raise many kinds on a damaged file)
            raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}); the checkpoint is damaged: resume "
                             "from an earlier one or delete this one") from None
        return state

    state = load(STATE_MARKER)
    version = state.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATE_VERSION:
        raise ValueError(f"{os.path.join(folder, STATE_MARKER)} has version {version!r}; this trl_safeppo reads "
                         f"versions 1-{STATE_VERSION}: resume it with the trl_safeppo that wrote it, or upgrade")
    if version == STATE_VERSION:
        return state
    rails, ladder, dpo = (load(name) for name in LEGACY_FILES)
    beta = dpo.get("beta", ladder.get("beta"))
    return {"rails": rails or None, "tripwires": ladder or None, "beta": beta}


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (largest N) first; none when it does not exist."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_marked_checkpoint(output_dir: str) -> str | None:
    """``train(resume_from_checkpoint=True)``'s checkpoint: the newest ``checkpoint-N`` of ``output_dir`` that holds
    :data:`STATE_MARKER` (transformers' ``get_last_checkpoint`` takes the newest folder, even one cut short by a kill
    before the marker, and resuming it would start the rails afresh); None when there is no checkpoint at all (the
    Trainer then raises). Newer unmarked folders are skipped with a warning; if every one is unmarked, one error."""
    from transformers.utils import logging

    unmarked = []
    for folder in checkpoint_folders(output_dir):
        if (folder / STATE_MARKER).is_file():
            if unmarked:
                logging.get_logger(__name__).warning(
                    f"resume_from_checkpoint=True: skipping {', '.join(unmarked)} of {output_dir} (no {STATE_MARKER}: "
                    f"killed while saving); resuming {folder.name}")
            return str(folder)
        unmarked.append(folder.name)
    if unmarked:
        raise ValueError(f"resume_from_checkpoint=True: no checkpoint of {output_dir} is complete ({', '.join(unmarked)} "
                         f"lack {STATE_MARKER}: killed while saving); pass resume_from_checkpoint=<folder> to resume "
                         "one anyway (the rails and tripwires start afresh), or remove them to start the run afresh")
    return None


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
        """JSON-able: the rails' state, the KL controller's inside it (or apart when there are no reward rails)."""
        rails = self.rails.state_dict() if self.rails is not None else None
        return {"version": RAILS_STATE_VERSION, "rails": rails, "kl": self.kl.state_dict() if rails is None else None}

    def load_state_dict(self, state: dict) -> None:
        """Either format: version 1 also stored the controller inside ``rails`` when reward rails were on (its ``kl``
        entry then repeated it) and ``beta`` apart; version 2 stores the controller once."""
        if state.get("version", 1) not in (1, RAILS_STATE_VERSION):
            raise ValueError(f"the rails state has version {state['version']!r}; this trl_safeppo reads versions 1 "
                             "and 2")
        if state.get("rails") is not None:
            if self.rails is not None:
                self.rails.load_state_dict(state["rails"])  # the controller is the rails' own: loaded with them
                self.kl.sync()
        elif state.get("kl") is not None:
            self.kl.load_state_dict(state["kl"])


class CheckpointStateCallback(TrainerCallback):
    """A Safe* trainer's one ``on_save`` callback: its own trained state (``save_checkpoint_files``, on every
    process), then :data:`STATE_MARKER` with ``checkpoint_state()``, last (``trainer_state.json`` is written before the
    callbacks, so it cannot say that all is there). The recipe runner resumes only from a checkpoint that has it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")  # the Trainer's
        self.trainer.save_checkpoint_files(folder)
        # every process has written its part (the Trainer writes rng_state_<i>.pth on each, with no barrier after
        # it): a process that died before here fails this collective, so the marker is never written without it
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            fileio.write_json(os.path.join(folder, STATE_MARKER), {
                "version": STATE_VERSION, "global_step": state.global_step, "complete": True,
                **self.trainer.checkpoint_state()})
        return control


class SafeCheckpointMixin:
    """This package's part of a trainer's checkpoints (see the module docstring); ``rails_wiring`` and
    ``tripwire_callback`` are set in the trainer's ``__init__``, which ends by adding a
    :class:`CheckpointStateCallback`."""

    rails_wiring: TrainerRails
    tripwire_callback = None  # set by tripwires.add_tripwires

    def save_checkpoint_files(self, folder: str) -> None:
        """Write trained state of the trainer's own into ``folder``, on every process (PPO: the critic)."""

    def checkpoint_state(self) -> dict:
        """What a resume needs, JSON-able: the rails and the KL controller, beta, the tripwire ladder."""
        ladder = self.tripwire_callback.state_dict() if self.tripwire_callback is not None else None
        return {"rails": self.rails_wiring.state_dict(), "beta": float(self.beta), "tripwires": ladder}

    def load_checkpoint_state(self, folder: str) -> None:
        state = read_checkpoint_state(folder)
        # Without a KL controller the checkpoint's beta (perhaps raised by a tripwire) wins over args.beta; with one,
        # the controller's state (in "rails") is beta. Checked before anything is loaded: GRPO and PPO load no
        # reference model when they start at beta 0, so a KL penalty cannot be resumed there.
        beta = state.get("beta")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta)) or self.rails_wiring.kl_controller is not None:
            beta = None
        if beta and float(self.beta) == 0.0 and getattr(self, "ref_model", None) is None:
            raise ValueError(f"{folder} was saved with beta={beta:g}, but this run started with beta=0 and so loaded "
                             f"no reference model: set beta={beta:g} (or > 0) to resume it, or start the stage afresh")
        if state.get("rails") is not None:
            self.rails_wiring.load_state_dict(state["rails"])
        if beta is not None:
            self.rails_wiring.kl.set_beta(beta)
        if self.tripwire_callback is not None and isinstance(state.get("tripwires"), dict):
            self.tripwire_callback.load_state_dict(state["tripwires"])  # back on the ladder where it was

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        from ..rewards.timeout import close_workers

        folder = resume_from_checkpoint
        if folder is True:  # the last checkpoint of output_dir that has this package's state (none: the Trainer raises)
            folder = last_marked_checkpoint(self.args.output_dir)
            resume_from_checkpoint = folder or True
        if isinstance(folder, (str, os.PathLike)):
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
        """Bind the rails, attach the tripwires and the checkpoint callback."""
        from .tripwires import add_tripwires

        self.rails_wiring.start(self)
        add_tripwires(self, args)  # raise_kl / rollback act on beta through rails_wiring.kl
        self.add_callback(CheckpointStateCallback(self))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self.rails_wiring.rewards.apply(self, rewards_per_func, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.rails_wiring.kl.update_from_batch(self, output)  # rails.kl.measure_before_update (GRPO)
        return output
