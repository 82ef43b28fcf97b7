"""Tripwires that act: a ``TrainerCallback`` that runs the rails' detectors (:mod:`trl_safeppo.rails.tripwires`) on
the logged history and acts on a trip (``warn``, ``raise_kl``, ``rollback``, ``stop``, moved up the ladder by
``escalate`` when exhausted); the tripwire config fields; the last-good snapshots that ``rollback`` and ``stop``
restore. docs/tripwires.md describes the actions, the snapshots and the events file.

A trainer gives the callback ``beta``, ``optimizer``, ``accelerator``, ``model``, ``state`` and ``rails_wiring`` (a
:class:`~.rails_mixin.TrainerRails`: its ``kl`` writes beta; its KL controller, where there is one, owns it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainerCallback

from ..fileio import atomic_path
from ..rails.tripwires import (
    ACTIONS, DETECTORS, SEVERITY, TripwireSpec, escalate, evaluate, init_ladder, parse_tripwires,
)

STATUS_CODE = {"ok": 0.0, "warn": 1.0, "trip": 2.0}
TRIPWIRES_FILE = "tripwires.jsonl"
SNAPSHOT_FILE = "snapshot.pt"
LAST_GOOD_DIR = "tripwire-last-good"
CANDIDATE_DIR = "tripwire-candidate"

# the test each action knob passes, and the fix its error names
_KNOBS = {
    "raise_kl_factor": (lambda v: v > 1, "a number > 1 such as 2.0"),
    "rollback_beta_factor": (lambda v: v >= 1, "a number >= 1"),
    "rollback_lr_factor": (lambda v: 0 < v <= 1, "a number in (0, 1] such as 0.5"),
    "max_rollbacks": (lambda v: v >= 0, "an integer >= 0"),
    "snapshot_every": (lambda v: v >= 1, "an integer >= 1"),
    "max_beta": (lambda v: v > 0, "a number > 0 such as 1.0, or null (16 x the start beta)"),
}


@dataclass(frozen=True)
class TripwireActions:
    """The knobs of the actions (one set per stage): the ``tripwire_*`` config fields without their prefix."""

    raise_kl_factor: float = 2.0
    rollback_beta_factor: float = 2.0
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 2
    snapshot_every: int = 1
    max_beta: float | None = None

    def __post_init__(self) -> None:
        for name, (ok, fix) in _KNOBS.items():
            value = getattr(self, name)
            if not (_finite(value) and ok(value)) and not (name == "max_beta" and value is None):
                raise ValueError(f"tripwire_{name}={value!r} is invalid; use {fix}")

    @classmethod
    def from_args(cls, args) -> TripwireActions:
        return cls(**{f.name: getattr(args, f"tripwire_{f.name}", f.default) for f in fields(cls)})


def field_docs(cls, names: str | None = None) -> str:
    """Class-docstring entries of a dataclass's fields (all, or the space-separated ``names``), from their ``help``
    (one text for both)."""
    chosen = fields(cls) if names is None else [{f.name: f for f in fields(cls)}[n] for n in names.split()]
    return "".join(f"\n        {f.name} (`{f.type}`, defaults to `{f.default!r}`):\n"
                   + textwrap.fill(f.metadata["help"], 120, initial_indent=" " * 12, subsequent_indent=" " * 12,
                                   break_on_hyphens=False)
                   for f in chosen)


@dataclass
class TripwireFields:
    """The tripwire fields of SafePPOConfig, SafeGRPOConfig and SafeDPOConfig (each lists it before its TRL base,
    and its docstring these entries), with two TrainingArguments fixes and one refusal (``save_total_limit=1``).

    Parameters:"""

    tripwires: list[dict] | None = field(default=None, metadata={"help": (
        "Tripwires of this stage: a list of `{detector, action, params}`. `detector` is one of the rails' detectors "
        f"({', '.join(f'`{d}`' for d in DETECTORS)}), `action` one of {', '.join(f'`{a}`' for a in ACTIONS)}, "
        "`params` the detector's thresholds. Events go to `<output_dir>/tripwires.jsonl`. `None`: the `tripwires` of "
        "the `rails` block when rails are set (default there: `non_finite` -> `stop`, `reward_timeout` and "
        "`silent_reward` -> `warn`), else none; `[]`: none.")})
    tripwire_raise_kl_factor: float = field(
        default=2.0, metadata={"help": "`raise_kl` multiplies beta by this factor (> 1)."})
    tripwire_rollback_beta_factor: float = field(
        default=2.0, metadata={"help": "After a `rollback`, beta is multiplied by this factor (>= 1; 1 keeps beta)."})
    tripwire_rollback_lr_factor: float = field(default=0.5, metadata={
        "help": "After a `rollback`, the learning rate is multiplied by this factor (in (0, 1])."})
    tripwire_max_rollbacks: int = field(default=2, metadata={
        "help": "Rollbacks allowed in one stage; a further `rollback` trip ends the stage like `stop` (>= 0)."})
    tripwire_snapshot_every: int = field(default=1, metadata={"help": (
        "Take the last-good snapshot every this many clean logging steps (>= 1); used by `rollback` and `stop`. "
        "Snapshots hold the policy and the optimizer state, so they cost memory and disk on large models.")})
    tripwire_max_beta: float | None = field(default=None, metadata={"help": (
        "`raise_kl` never raises beta above this; a `raise_kl` trip with beta already there escalates to `rollback` "
        "(then `stop`, once `tripwire_max_rollbacks` are used). `None`: 16 x the beta the stage started with (four "
        "doublings), and never above an adaptive KL controller's `max_coef`.")})
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": (
        "Overrides the TrainingArguments default (`True`), which replaces a NaN/inf loss by the running average in "
        "the logs and would hide it from the `non_finite` tripwire.")})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": (
        "Deprecated alias of `activation_checkpointing` (transformers); unset, that one defaults to TRL's True.")})

    def __post_init__(self):
        if self.save_total_limit == 1:  # transformers deletes the older checkpoints before the on_save callbacks run
            raise ValueError(
                "save_total_limit=1: transformers deletes the previous checkpoint before trl_safeppo_state.json marks "
                "the new one complete, so a kill while saving would leave no checkpoint to resume from; use "
                "save_total_limit=2 or more (or None)")
        # TRL's configs default the deprecated `gradient_checkpointing` to True, which makes transformers warn at every
        # config; the same default goes to the current name instead (an explicit value of either name is kept)
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", False) is None:
            self.activation_checkpointing = True
        super().__post_init__()  # the TRL config's


@dataclass
class RewardTimeoutFields:
    """The reward-function timeout of SafeGRPOConfig and SafePPOConfig (listed before their TRL base).

    Parameters:"""

    reward_timeout_s: float | None = field(default=60.0, metadata={"help": (
        "Seconds each call of a reward function may take (> 0); past it the call is cut off (its worker process "
        "killed), the batch's scores from that function are None, a warning is logged and `rewards/<func>/timeout` "
        "counts it for the `reward_timeout` tripwire. The pre-flight self-test uses the same limit. `None`: no "
        "timeout (functions run in the trainer process). Reward models (`nn.Module`) and async functions are not "
        "timed.")})


TripwireFields.__doc__ += field_docs(TripwireFields)
RewardTimeoutFields.__doc__ += field_docs(RewardTimeoutFields)


def check_tripwire_fields(args) -> None:
    """``__post_init__`` check of the Safe*Config classes: ``tripwires`` (kept as JSON-able dicts), the action knobs
    and, where the config has it, ``reward_timeout_s`` (each error names the field, the value and the fix)."""
    if args.tripwires is not None:
        args.tripwires = [spec.to_dict() for spec in parse_tripwires(args.tripwires)]
    TripwireActions.from_args(args)
    if hasattr(args, "reward_timeout_s"):
        from ..rewards.timeout import check_timeout

        args.reward_timeout_s = check_timeout(args.reward_timeout_s)


# ---------------------------------------------------------------------- helpers
def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _numeric(logs: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a log record; GRPO logs None when every value of a metric was NaN, which stays NaN here."""
    return {k: math.nan if v is None else float(v) for k, v in logs.items() if v is None or _number(v)}


def _beta(trainer) -> float:
    return float(getattr(trainer, "beta", 0.0) or 0.0)


def _controller(trainer):
    """The KL controller that owns beta, or None (beta is then the trainer's alone)."""
    return getattr(getattr(trainer, "rails_wiring", None), "kl_controller", None)


def _shards_weights(trainer) -> bool:
    """FSDP1 or DeepSpeed (any ZeRO stage): no process holds the full trained state (ZeRO-2 partitions the optimizer
    and its fp32 masters, ZeRO-3 the weights too), so no snapshot can be taken; FSDP2 snapshots gather full tensors
    (:func:`save_snapshot`)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return not getattr(getattr(trainer, "accelerator", None), "is_fsdp2", False)
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


class TripwireCallback(TrainerCallback):
    """Runs the ``specs`` (``TripwireSpec``) at every training log and acts on trips on ``trainer``; events and
    snapshots go to ``output_dir``."""

    def __init__(self, trainer, specs: Sequence[TripwireSpec], actions: TripwireActions, output_dir: str,
                 field: str = "tripwires"):
        self.trainer, self.specs, self.actions, self.output_dir = trainer, list(specs), actions, output_dir
        self.events_path = os.path.join(output_dir, TRIPWIRES_FILE)
        self.snapshot_dir = os.path.join(output_dir, LAST_GOOD_DIR)
        self.candidate_dir = os.path.join(output_dir, CANDIDATE_DIR)
        self.history: list[dict[str, float]] = []
        self.ladder = init_ladder()  # the action ladder's state (rails.tripwires.escalate)
        self.initial_beta = _beta(trainer)
        self.n_clean = 0
        self.snapshot_step: int | None = None  # the step of the last good snapshot, and of the candidate
        self.candidate_step: int | None = None
        self.stopped_reason: str | None = None
        # raise_kl too, since an exhausted raise escalates to rollback. Where no snapshot can be taken (DeepSpeed,
        # FSDP1) `stop` and an exhausted raise_kl stop where they are, and `rollback` is refused here
        actions = {spec.action for spec in self.specs}
        self.needs_snapshots = not _shards_weights(trainer) and bool(actions & {"rollback", "stop", "raise_kl"})
        if "rollback" in actions and _shards_weights(trainer):
            i = next(i for i, spec in enumerate(self.specs) if spec.action == "rollback")
            raise ValueError(
                f"{field}[{i}].action='rollback' ({self.specs[i].detector}): a rollback restores a snapshot of the "
                "whole trained state, which DeepSpeed (any ZeRO stage) and FSDP1 keep partitioned across processes; "
                "use action 'raise_kl' or 'stop' (which ends the stage where it is), or FSDP2 (fsdp_version: 2), "
                "where snapshots gather the full tensors")

    @property
    def max_beta(self) -> float:
        """``raise_kl``'s ceiling: ``tripwire_max_beta`` (default 16 x the starting beta), at most an adaptive KL
        controller's ``max_coef``."""
        cap = self.actions.max_beta if self.actions.max_beta is not None else 16.0 * self.initial_beta
        max_coef = getattr(_controller(self.trainer), "max_coef", None)
        return cap if max_coef is None else min(cap, float(max_coef))

    def _write_event(self, event: dict[str, Any]) -> None:
        """Append one line to the events file (main process). A last line torn by a kill is closed first, so the
        event is not glued to it (the readers skip a torn line)."""
        if not self.trainer.accelerator.is_main_process:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.events_path, "ab+") as f:  # reads seek, writes append
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(event, allow_nan=False, default=str) + "\n").encode("utf-8"))

    def _promote(self) -> None:
        """The candidate was followed by a clean log: it becomes the last good snapshot."""
        if self.candidate_step is None:
            return
        if self.trainer.accelerator.is_main_process:
            os.makedirs(self.snapshot_dir, exist_ok=True)
            os.replace(os.path.join(self.candidate_dir, SNAPSHOT_FILE), os.path.join(self.snapshot_dir, SNAPSHOT_FILE))
        self.trainer.accelerator.wait_for_everyone()
        self.snapshot_step, self.candidate_step = self.candidate_step, None

    def _restore(self) -> int | None:
        if self.snapshot_step is None:
            return None
        step = restore_snapshot(self.trainer, self.snapshot_dir)
        self.candidate_step = None  # taken on the abandoned trajectory, like the records logged after the snapshot
        self.history = [h for h in self.history if h.get("step", -1) <= step]
        return step

    # ------------------------------------------------------------------ checkpoint (in trl_safeppo_state.json)
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to stay on the ladder: rollbacks taken and the beta the stage began with
        (``max_beta``'s default is 16 x that one, not 16 x a raised beta; beta itself is the trainer's state)."""
        return {"ladder": dict(self.ladder), "initial_beta": self.initial_beta, "n_clean": self.n_clean}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ladder = state.get("ladder")
        if isinstance(ladder, Mapping) and isinstance(ladder.get("rollbacks"), int):
            self.ladder = {**self.ladder, "rollbacks": int(ladder["rollbacks"])}
        if _finite(state.get("initial_beta")):
            self.initial_beta = float(state["initial_beta"])
        if isinstance(state.get("n_clean"), int):
            self.n_clean = int(state["n_clean"])

    # ------------------------------------------------------------------ callback
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.trainer.accelerator.is_main_process and os.path.exists(self.events_path):
            os.remove(self.events_path)  # a fresh stage starts a fresh event file; a resumed one appends
        if self.needs_snapshots:  # the initial weights are good by definition
            save_snapshot(self.trainer, self.snapshot_dir)
            self.snapshot_step = state.global_step
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or any(key.startswith("eval_") for key in logs):
            return control  # only training logs (not eval, not the final train summary)
        self.history.append({**_numeric(logs), "step": float(state.global_step)})
        verdicts = evaluate(self.specs, self.history)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update({f"tripwire/{s.detector}": STATUS_CODE[v.status] for s, v in verdicts})

        def event(verdict, action: str, details: dict) -> None:
            values = {k: (float(v) if math.isfinite(v) else None) if _number(v) else v
                      for k, v in dict(verdict.values).items()}  # strict JSON: NaN / inf -> null
            self._write_event({"step": int(state.global_step), "detector": verdict.detector, "status": verdict.status,
                               "reason": verdict.reason, "values": values, "action": action, "details": details})

        for _, verdict in verdicts:
            if verdict.status == "warn":
                event(verdict, "warn", {})
        trips = [(spec, v) for spec, v in verdicts if v.status == "trip"]
        if not trips:
            self.n_clean += 1
            if self.needs_snapshots:
                self._promote()
                if self.n_clean % self.actions.snapshot_every == 0:
                    save_snapshot(self.trainer, self.candidate_dir)
                    self.candidate_step = state.global_step
            return control

        # One action per log step: the most severe configured among the tripped detectors, moved up the ladder
        # (raise_kl at max beta -> rollback -> stop) when it is exhausted.
        asked = max((spec.action for spec, _ in trips), key=SEVERITY.__getitem__)
        decision, ladder = escalate(
            asked, self.ladder, beta=_beta(self.trainer), raise_kl_factor=self.actions.raise_kl_factor,
            max_beta=self.max_beta, max_rollbacks=self.actions.max_rollbacks,
        )
        if decision.action == "rollback" and not self.needs_snapshots:  # DeepSpeed, FSDP1: no snapshot to go back to
            decision, ladder = dataclasses.replace(decision, action="stop", escalated_from=decision.escalated_from or
                                                   "rollback", why="no snapshot to roll back to (weights partitioned "
                                                   "across processes); the stage stops where it is"), self.ladder
        self.ladder = ladder
        details = self._act(decision, state, control, trips)
        if decision.escalated_from is not None:
            details = {**details, "escalated_from": decision.escalated_from, "escalation": decision.why}
        for spec, verdict in trips:
            event(verdict, spec.action, details if spec.action == asked else {"superseded_by": decision.action})
        return control

    def _act(self, decision, state, control, trips) -> dict[str, Any]:
        trainer = self.trainer
        if decision.action == "warn":
            return {}
        if decision.action == "raise_kl":
            before = float(trainer.beta)
            trainer.rails_wiring.kl.set_beta(decision.beta)
            return {"beta_before": before, "beta_after": float(trainer.beta), "max_beta": self.max_beta}
        if decision.action == "rollback" and self.snapshot_step is not None:
            restored = self._restore()
            before = float(trainer.beta)
            trainer.rails_wiring.kl.set_beta(before * self.actions.rollback_beta_factor)
            # the learning rates: the optimizers' groups and the schedulers' base rates (PPO: the critic's too)
            factor, groups = self.actions.rollback_lr_factor, trainer.optimizer.param_groups
            lr_before = groups[0]["lr"]
            more = trainer.tripwire_optimizers() if hasattr(trainer, "tripwire_optimizers") else []
            for optimizer, scheduler in [(trainer.optimizer, getattr(trainer, "lr_scheduler", None)), *more]:
                for group in optimizer.param_groups:
                    group["lr"] *= factor
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            return {"restored_step": restored, "rollbacks": self.ladder["rollbacks"], "beta_before": before,
                    "beta_after": float(trainer.beta), "lr_before": lr_before, "lr_after": groups[0]["lr"]}
        # stop (or a rollback with no snapshot to restore)
        restored = self._restore()
        reasons = "; ".join(f"{v.detector}: {v.reason}" for _, v in trips)
        self.stopped_reason = f"stopped at step {state.global_step}: {reasons}"
        control.should_training_stop = True
        return {"restored_step": restored, "stopped": True, "why": self.stopped_reason}


def add_tripwires(trainer, args) -> TripwireCallback | None:
    """Attach a :class:`TripwireCallback` for ``args.tripwires`` (``None``: the rails config's ``tripwires``); sets
    ``trainer.tripwire_callback`` (None when there are no tripwires)."""
    if getattr(args, "tripwires", None) is not None:
        specs, field = parse_tripwires(args.tripwires), "tripwires"
    else:
        specs, field = list(getattr(trainer.rails_wiring.rails, "tripwires", None) or []), "rails.tripwires"
    trainer.tripwire_callback = None
    if specs:
        trainer.tripwire_callback = TripwireCallback(trainer, specs, TripwireActions.from_args(args), args.output_dir,
                                                     field)
        trainer.add_callback(trainer.tripwire_callback)
    return trainer.tripwire_callback


# ---------------------------------------------------------------------- snapshots (rollback, stop)
def save_snapshot(trainer, directory: str) -> str:
    """Save ``trainer``'s trained state to ``directory/snapshot.pt`` (returned): the policy's trainable parameters
    and buffers (frozen ones cannot change: with LoRA only the adapters), the optimizer, the rails' state, beta, and
    ``trainer.tripwire_state_dict()`` where defined (PPO's critic; called on every process, a collective when
    sharded). One process, DDP, or FSDP2 (every process joins the gather of full tensors, :mod:`.sharding`): the
    main process writes, the others wait."""
    import torch

    from . import sharding

    path = os.path.join(directory, SNAPSHOT_FILE)
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    if sharding.is_sharded(model):  # FSDP2: collectives, the full tensors land on the main process
        model_state = sharding.full_model_state(model)
    elif accelerator.is_main_process:
        changing = {id(p) for p in model.parameters() if p.requires_grad} | {id(b) for b in model.buffers()}
        model_state = {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items()
                       if id(v) in changing}
    optimizer_state = sharding.full_optimizer_state(model, optimizer) if optimizer is not None else None
    # hook for trainers with more trained state than the policy (e.g. PPO's critic)
    extra = trainer.tripwire_state_dict() if hasattr(trainer, "tripwire_state_dict") else None
    if accelerator.is_main_process:
        state = {"step": int(trainer.state.global_step), "model": model_state, "optimizer": optimizer_state,
                 "beta": float(trainer.beta), "wiring": trainer.rails_wiring.state_dict(), "extra": extra}
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    accelerator.wait_for_everyone()
    return path


def restore_snapshot(trainer, directory: str) -> int:
    """Load a :func:`save_snapshot` file back into ``trainer``; returns the step it was taken at. The learning rates
    in force are kept (the schedule follows ``global_step``); GRPO's buffered generations are dropped, so the next
    batch is sampled from the restored policy."""
    import torch

    from . import sharding

    state = torch.load(os.path.join(directory, SNAPSHOT_FILE), map_location="cpu", weights_only=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    if sharding.is_sharded(model):  # FSDP2: every process puts the full tensors into its shards
        sharding.load_full_state(model, state["model"])
    else:
        result = model.load_state_dict(state["model"], strict=False)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        own = model.state_dict(keep_vars=True)
        missing = [k for k in result.missing_keys if id(own[k]) in trainable]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"the tripwire snapshot does not match the model: trainable parameters missing {missing[:5]}, "
                f"unexpected keys {list(result.unexpected_keys)[:5]}; it was written for another model or adapter "
                "setup -- delete the tripwire-last-good/ directory of this output_dir and restart")
    if optimizer is not None:
        lrs = [group["lr"] for group in optimizer.param_groups]
        sharding.load_full_state(model, None, optimizer, state["optimizer"])
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
    trainer.rails_wiring.load_state_dict(state["wiring"])
    if _controller(trainer) is None and math.isfinite(state["beta"]):
        trainer.rails_wiring.kl.set_beta(state["beta"])  # no controller: beta is the trainer's alone
    if state.get("extra") is not None and hasattr(trainer, "load_tripwire_state_dict"):
        trainer.load_tripwire_state_dict(state["extra"])
    if hasattr(trainer, "_buffered_inputs"):
        trainer._buffered_inputs = None
    tr_loss = getattr(trainer, "_tr_loss", None)
    if isinstance(tr_loss, torch.Tensor) and not torch.isfinite(tr_loss).all():
        tr_loss.zero_()  # a NaN loss of the abandoned trajectory would stay in the Trainer's running sum
    return int(state["step"])
