"""Tripwires that act: a TrainerCallback that runs the rails' detectors on the logged history and acts on a trip.

Each configured tripwire names a detector of :mod:`trl_safeppo.rails` (``kl_limit``, ``non_finite``,
``length_hacking``, ...), its parameters, and the action taken when it trips:

- ``warn``: record the event, nothing else.
- ``raise_kl``: multiply the KL coefficient ``beta`` by ``raise_kl_factor`` (the adaptive controller continues from
  the new value), up to ``max_beta``; a ``raise_kl`` trip with beta at ``max_beta`` moves up the ladder to
  ``rollback`` (then ``stop``): :func:`trl_safeppo.rails.tripwires.escalate`.
- ``rollback``: restore the last good snapshot (policy weights, optimizer state, rail state and beta), then continue
  with the stated change: ``beta *= rollback_beta_factor`` and ``learning_rate *= rollback_lr_factor``. After
  ``max_rollbacks`` rollbacks a further rollback trip becomes ``stop``.
- ``stop``: restore the last good snapshot (so what the stage saves is the last good policy), end the stage cleanly
  (``control.should_training_stop``) and record why.

The callback works for every trainer of the package through a small protocol: the trainer has ``beta``,
``optimizer``, ``accelerator``, ``model`` and, optionally, ``rails_wiring`` (a :class:`~.rails_mixin.TrainerRails`, whose
KL controller is kept in step with ``beta``).

Snapshots (only when some tripwire's action is ``raise_kl``, ``rollback`` or ``stop``): the metrics logged at step
``s`` were measured with the weights *before* update ``s``, so a clean log at ``s`` vouches for the weights of step
``s - 1``, not for the weights just produced. The callback therefore saves a *candidate* at each clean log (every
``snapshot_every``-th) in ``<output_dir>/tripwire-candidate/`` and promotes it to ``<output_dir>/tripwire-last-good/``
at the next clean log; the initial weights are good by definition. Rollback and stop restore the last good one.

Every non-ok verdict is one JSON line in ``<output_dir>/tripwires.jsonl``: ``step``, ``detector``, ``status``,
``reason``, ``values``, ``action`` (plus ``details`` saying what was done). The logged record of that step also
gets ``tripwire/<detector>`` (0 ok, 1 warn, 2 trip) for every configured detector.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from ..fileio import atomic_path

ACTIONS = ("warn", "raise_kl", "rollback", "stop")
_SEVERITY = {"warn": 0, "raise_kl": 1, "rollback": 2, "stop": 3}
STATUS_CODE = {"ok": 0.0, "warn": 1.0, "trip": 2.0}
TRIPWIRES_FILE = "tripwires.jsonl"
SNAPSHOT_FILE = "snapshot.pt"
LAST_GOOD_DIR = "tripwire-last-good"
CANDIDATE_DIR = "tripwire-candidate"
STATE_FILE = "tripwire_state.json"  # in each checkpoint: the ladder's position, beta and the beta the stage began with

TRIPWIRE_HELP = {
    "tripwires": "Tripwires of this stage: a list of `{detector, action, params}`. `detector` is one of the rails' "
    "detectors (`kl_limit`, `kl_acceleration`, `non_finite`, `length_hacking`, `format_gaming`, "
    "`entropy_collapse`, `length_collapse`, `length_explosion`, `silent_reward`, `reward_timeout`), `action` one of "
    "`warn`, `raise_kl`, `rollback`, `stop`, `params` the detector's thresholds. Events go to "
    "`<output_dir>/tripwires.jsonl`. `None`: the `tripwires` of the `rails` block when rails are set (default there: "
    "`non_finite` -> `stop`, `reward_timeout` and `silent_reward` -> `warn`), else none; `[]`: none.",
    "raise_kl_factor": "`raise_kl` multiplies beta by this factor (> 1).",
    "rollback_beta_factor": "After a `rollback`, beta is multiplied by this factor (>= 1; 1 keeps beta).",
    "rollback_lr_factor": "After a `rollback`, the learning rate is multiplied by this factor (in (0, 1]).",
    "max_rollbacks": "Rollbacks allowed in one stage; a further `rollback` trip ends the stage like `stop` (>= 0).",
    "max_beta": "`raise_kl` never raises beta above this; a `raise_kl` trip with beta already there escalates to "
    "`rollback` (then `stop`, once `tripwire_max_rollbacks` are used). `None`: 16 x the beta the stage started with "
    "(four doublings), and never above an adaptive KL controller's `max_coef`.",
    "reward_timeout_s": "Seconds each call of a reward function may take (> 0); past it the call is cut off (its "
    "worker process killed), the batch's scores from that function are None, a warning is logged and "
    "`rewards/<func>/timeout` counts it for the `reward_timeout` tripwire. The pre-flight self-test uses the same "
    "limit. `None`: no timeout (functions run in the trainer process). Reward models (`nn.Module`) and async "
    "functions are not timed.",
    "snapshot_every": "Take the last-good snapshot every this many clean logging steps (>= 1); used by `rollback` "
    "and `stop`. Snapshots hold the policy and the optimizer state, so they cost memory and disk on large models.",
}


@dataclass(frozen=True)
class TripwireActions:
    """The knobs of the actions (one set per stage)."""

    raise_kl_factor: float = 2.0
    rollback_beta_factor: float = 2.0
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 2
    snapshot_every: int = 1
    max_beta: float | None = None

    def __post_init__(self) -> None:
        checks = [
            ("tripwire_raise_kl_factor", self.raise_kl_factor, self.raise_kl_factor > 1, "a number > 1 such as 2.0"),
            (
                "tripwire_rollback_beta_factor",
                self.rollback_beta_factor,
                self.rollback_beta_factor >= 1,
                "a number >= 1",
            ),
            (
                "tripwire_rollback_lr_factor",
                self.rollback_lr_factor,
                0 < self.rollback_lr_factor <= 1,
                "a number in (0, 1] such as 0.5",
            ),
            ("tripwire_max_rollbacks", self.max_rollbacks, self.max_rollbacks >= 0, "an integer >= 0"),
            ("tripwire_snapshot_every", self.snapshot_every, self.snapshot_every >= 1, "an integer >= 1"),
        ]
        if self.max_beta is not None:
            ok = isinstance(self.max_beta, (int, float)) and self.max_beta > 0
            fix = "a number > 0 such as 1.0, or null (16 x the start beta)"
            checks.append(("tripwire_max_beta", self.max_beta, ok, fix))
        for name, value, ok, fix in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise ValueError(f"{name}={value!r} is invalid; use {fix}")

    @classmethod
    def from_args(cls, args) -> TripwireActions:
        return cls(
            raise_kl_factor=args.tripwire_raise_kl_factor,
            rollback_beta_factor=args.tripwire_rollback_beta_factor,
            rollback_lr_factor=args.tripwire_rollback_lr_factor,
            max_rollbacks=args.tripwire_max_rollbacks,
            snapshot_every=args.tripwire_snapshot_every,
            max_beta=getattr(args, "tripwire_max_beta", None),
        )


def parse_tripwires(specs: Sequence[Any] | None, *, field: str = "tripwires") -> list:
    """Validate a list of tripwire specs (dicts or ``TripwireSpec``); returns ``TripwireSpec`` objects.

    An unknown detector or action, or bad params, raises one ``ValueError`` naming ``<field>[i].<key>``, the value
    and what is accepted.
    """
    from ..rails.tripwires import DETECTORS, TripwireSpec

    if specs is None:
        return []
    if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"{field}={specs!r} must be a list of {{detector, action, params}} entries")
    parsed = []
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if isinstance(spec, TripwireSpec):
            parsed.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}={spec!r} must be a mapping with keys detector, action, params")
        unknown = sorted(set(spec) - {"detector", "action", "params"})
        if unknown:
            raise ValueError(f"{where} has unknown keys {unknown}; accepted: detector, action, params")
        if "detector" not in spec:
            raise ValueError(f"{where} has no detector; accepted: {sorted(DETECTORS)}")
        if spec["detector"] not in DETECTORS:
            raise ValueError(f"{where}.detector={spec['detector']!r} is not a detector; accepted: {sorted(DETECTORS)}")
        action = spec.get("action", "warn")
        if action not in ACTIONS:
            raise ValueError(f"{where}.action={action!r} is not a tripwire action; accepted: {list(ACTIONS)}")
        try:
            parsed.append(TripwireSpec(detector=spec["detector"], action=action, params=spec.get("params") or {}))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}.params: {err}") from None
    return parsed


@dataclass
class TripwireFields:
    """The tripwire fields shared by SafePPOConfig, SafeGRPOConfig and SafeDPOConfig (each lists it before its TRL
    base, so ``logging_nan_inf_filter`` here overrides TrainingArguments' default). Each config describes the fields
    in its own docstring from ``TRIPWIRE_HELP`` and calls :func:`validate_tripwire_fields` in ``__post_init__``.

    Parameters:
        tripwires (`list[dict]`, *optional*): see ``TRIPWIRE_HELP["tripwires"]``.
        tripwire_raise_kl_factor (`float`, defaults to `2.0`): see ``TRIPWIRE_HELP``.
        tripwire_rollback_beta_factor (`float`, defaults to `2.0`): see ``TRIPWIRE_HELP``.
        tripwire_rollback_lr_factor (`float`, defaults to `0.5`): see ``TRIPWIRE_HELP``.
        tripwire_max_rollbacks (`int`, defaults to `2`): see ``TRIPWIRE_HELP``.
        tripwire_snapshot_every (`int`, defaults to `1`): see ``TRIPWIRE_HELP``.
        tripwire_max_beta (`float`, *optional*): see ``TRIPWIRE_HELP["max_beta"]``.
        logging_nan_inf_filter (`bool`, defaults to `False`): keeps NaN/inf losses visible to the `non_finite`
            tripwire.
        gradient_checkpointing (`bool` or `None`, defaults to `None`): transformers' deprecated alias of
            `activation_checkpointing`. Left unset, `activation_checkpointing` takes TRL's default (`True`) without
            transformers' deprecation warning; set `activation_checkpointing` instead.
    """

    tripwires: list[dict] | None = field(default=None, metadata={"help": TRIPWIRE_HELP["tripwires"]})
    tripwire_raise_kl_factor: float = field(default=2.0, metadata={"help": TRIPWIRE_HELP["raise_kl_factor"]})
    tripwire_rollback_beta_factor: float = field(
        default=2.0, metadata={"help": TRIPWIRE_HELP["rollback_beta_factor"]}
    )
    tripwire_rollback_lr_factor: float = field(default=0.5, metadata={"help": TRIPWIRE_HELP["rollback_lr_factor"]})
    tripwire_max_rollbacks: int = field(default=2, metadata={"help": TRIPWIRE_HELP["max_rollbacks"]})
    tripwire_snapshot_every: int = field(default=1, metadata={"help": TRIPWIRE_HELP["snapshot_every"]})
    tripwire_max_beta: float | None = field(default=None, metadata={"help": TRIPWIRE_HELP["max_beta"]})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Overrides the TrainingArguments default (`True`), which replaces a NaN/inf loss by the running "
            "average in the logs and would hide it from the `non_finite` tripwire."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers); unset, that one defaults to "
                          "TRL's True."},
    )

    def __post_init__(self):
        # TRL's configs default the deprecated `gradient_checkpointing` to True, which makes transformers warn at every
        # config; the same default goes to the current name instead (an explicit value of either name is kept)
        if self.gradient_checkpointing is None and getattr(self, "activation_checkpointing", False) is None:
            self.activation_checkpointing = True
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


@dataclass
class RewardTimeoutFields:
    """The reward-function timeout of SafeGRPOConfig and SafePPOConfig (listed before their TRL base; each describes
    the field in its own docstring from ``TRIPWIRE_HELP["reward_timeout_s"]`` and calls
    :func:`validate_reward_timeout` in ``__post_init__``).

    Parameters:
        reward_timeout_s (`float`, *optional*, defaults to `60.0`): see ``TRIPWIRE_HELP["reward_timeout_s"]``.
    """

    reward_timeout_s: float | None = field(default=60.0, metadata={"help": TRIPWIRE_HELP["reward_timeout_s"]})


def validate_reward_timeout(args) -> None:
    """``reward_timeout_s`` is None or seconds > 0 (one ValueError naming the field, the value and the fix)."""
    from ..rewards.timeout import check_timeout

    args.reward_timeout_s = check_timeout(args.reward_timeout_s)


def validate_tripwire_fields(args) -> None:
    """``__post_init__`` check shared by the Safe*Config classes; keeps ``args.tripwires`` as JSON-able dicts."""
    specs = parse_tripwires(args.tripwires)
    if args.tripwires is not None:
        args.tripwires = [spec.to_dict() for spec in specs]
    TripwireActions.from_args(args)


def _numeric(logs: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in logs.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif value is None:
            out[key] = math.nan  # GRPO logs None when every value of a metric was NaN
    return out


def _json_number(value: Any) -> Any:
    """Strict JSON: a non-finite number becomes null (the event's reason still names it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    return value


def _set_beta(trainer, value: float) -> None:
    wiring = getattr(trainer, "rails_wiring", None)
    if wiring is not None and wiring.trainer is trainer:
        wiring.kl.set_beta(value)
    else:
        trainer.beta = float(value)


def _shards_weights(trainer) -> bool:
    """FSDP1 or DeepSpeed ZeRO-3: no process holds the full weights, so no snapshot can be taken (FSDP2 snapshots
    gather full tensors: :func:`save_snapshot`)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return not getattr(getattr(trainer, "accelerator", None), "is_fsdp2", False)
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3)


class TripwireCallback(TrainerCallback):
    """Evaluates the configured detectors at every training log and acts on trips (see the module docstring).

    Args:
        trainer: the trainer to act on (the protocol of the module docstring).
        specs: validated ``TripwireSpec`` list (see :func:`parse_tripwires`).
        actions: the knobs of the actions.
        output_dir: where ``tripwires.jsonl`` and the last-good snapshot live.
    """

    def __init__(self, trainer, specs: Sequence[Any], actions: TripwireActions, output_dir: str):
        self.trainer = trainer
        self.specs = list(specs)
        self.actions = actions
        self.output_dir = output_dir
        self.events_path = os.path.join(output_dir, TRIPWIRES_FILE)
        self.snapshot_dir = os.path.join(output_dir, LAST_GOOD_DIR)
        self.candidate_dir = os.path.join(output_dir, CANDIDATE_DIR)
        self.candidate_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.events: list[dict[str, Any]] = []
        from ..rails.tripwires import init_ladder

        self.ladder = init_ladder()  # the action ladder's state (rails.tripwires.escalate)
        self.initial_beta = float(getattr(trainer, "beta", 0.0) or 0.0)
        self.n_clean = 0
        self.snapshot_step: int | None = None
        self.stopped_reason: str | None = None
        # raise_kl too, since an exhausted raise escalates to rollback; but not where snapshots cannot be taken
        # (FSDP1, ZeRO-3 shard the weights): there an exhausted raise_kl stops without a restore, as before
        self.needs_snapshots = any(spec.action in ("rollback", "stop") for spec in self.specs) or (
            any(spec.action == "raise_kl" for spec in self.specs) and not _shards_weights(trainer))

    # ------------------------------------------------------------------ helpers
    @property
    def n_rollbacks(self) -> int:
        return self.ladder["rollbacks"]

    @property
    def max_beta(self) -> float:
        """``raise_kl``'s ceiling: ``tripwire_max_beta`` (default 16 x the starting beta), at most an adaptive KL
        controller's ``max_coef``."""
        cap = self.actions.max_beta if self.actions.max_beta is not None else 16.0 * self.initial_beta
        controller = getattr(getattr(self.trainer, "rails_wiring", None), "kl_controller", None)
        max_coef = getattr(controller, "max_coef", None)
        return min(cap, float(max_coef)) if max_coef is not None else cap

    @property
    def _is_main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def _write_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if not self._is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        line = json.dumps(event, allow_nan=False, default=str) + "\n"
        with open(self.events_path, "ab") as f:  # an append-only log (each event is one line, the readers skip a
            if f.tell() > 0:                     # torn last line); a line left without its newline by a kill is
                with open(self.events_path, "rb") as r:  # closed first, so the next event is not glued to it
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        f.write(b"\n")
            f.write(line.encode("utf-8"))
            f.flush()

    def _snapshot(self, step: int, *, good: bool = False) -> None:
        """Save the current weights as the candidate (or straight as the last good one when ``good``)."""
        save_snapshot(self.trainer, self.snapshot_dir if good else self.candidate_dir)
        if good:
            self.snapshot_step = step
        else:
            self.candidate_step = step

    def _promote(self) -> None:
        """The candidate was followed by a clean log: it becomes the last good snapshot."""
        if self.candidate_step is None:
            return
        if self._is_main:
            os.makedirs(self.snapshot_dir, exist_ok=True)
            os.replace(os.path.join(self.candidate_dir, SNAPSHOT_FILE), os.path.join(self.snapshot_dir, SNAPSHOT_FILE))
        self.trainer.accelerator.wait_for_everyone()
        self.snapshot_step, self.candidate_step = self.candidate_step, None

    def _restore(self) -> int | None:
        if self.snapshot_step is None:
            return None
        step = restore_snapshot(self.trainer, self.snapshot_dir)
        self.candidate_step = None  # taken on the abandoned trajectory
        # The records logged after the snapshot belong to the abandoned trajectory.
        self.history = [h for h in self.history if h.get("step", -1) <= step]
        return step

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to stay on the ladder: rollbacks taken, beta now and the beta the stage began with
        (``max_beta``'s default is 16 x that one, not 16 x a raised beta)."""
        return {"ladder": dict(self.ladder), "beta": float(getattr(self.trainer, "beta", 0.0) or 0.0),
                "initial_beta": self.initial_beta, "n_clean": self.n_clean}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ladder, beta, initial = state.get("ladder"), state.get("beta"), state.get("initial_beta")
        if isinstance(ladder, Mapping) and isinstance(ladder.get("rollbacks"), int):
            self.ladder = {**self.ladder, "rollbacks": int(ladder["rollbacks"])}
        if isinstance(initial, (int, float)) and math.isfinite(initial):
            self.initial_beta = float(initial)
        # beta's owner is the KL controller when there is one (its state is in the rails' checkpoint file); the
        # ladder's copy restores a raised beta only where nothing else keeps it (GRPO / PPO without a controller)
        controller = getattr(getattr(self.trainer, "rails_wiring", None), "kl_controller", None)
        finite = isinstance(beta, (int, float)) and math.isfinite(beta)
        if controller is None and finite and hasattr(self.trainer, "beta"):
            _set_beta(self.trainer, float(beta))
        if isinstance(state.get("n_clean"), int):
            self.n_clean = int(state["n_clean"])

    # ------------------------------------------------------------------ callback
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self._is_main and os.path.exists(self.events_path):
            os.remove(self.events_path)  # a fresh stage starts a fresh event file; a resumed one appends
        if self.needs_snapshots:
            self._snapshot(state.global_step, good=True)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or any(key.startswith("eval_") for key in logs):
            return control  # only training logs (not eval, not the final train summary)
        record = _numeric(logs)
        record["step"] = float(state.global_step)
        self.history.append(record)

        verdicts = [(spec, spec.check(self.history)) for spec in self.specs]
        flags = {f"tripwire/{spec.detector}": STATUS_CODE.get(v.status, 0.0) for spec, v in verdicts}
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(flags)

        trips = [(spec, v) for spec, v in verdicts if v.status == "trip"]
        warns = [(spec, v) for spec, v in verdicts if v.status == "warn"]
        for spec, verdict in warns:
            self._write_event(self._event(state, verdict, "warn", {}))
        if not trips:
            self.n_clean += 1
            if self.needs_snapshots:
                self._promote()
                if self.n_clean % self.actions.snapshot_every == 0:
                    self._snapshot(state.global_step)
            return control

        # One action per log step: the most severe configured among the tripped detectors, moved up the ladder
        # (raise_kl at max beta -> rollback -> stop) when it is exhausted.
        from ..rails.tripwires import escalate

        asked = max((spec.action for spec, _ in trips), key=_SEVERITY.__getitem__)
        decision, self.ladder = escalate(
            asked, self.ladder, beta=float(getattr(self.trainer, "beta", 0.0) or 0.0),
            raise_kl_factor=self.actions.raise_kl_factor, max_beta=self.max_beta,
            max_rollbacks=self.actions.max_rollbacks,
        )
        details = self._act(decision, state, control, trips)
        if decision.escalated_from is not None:
            details = {**details, "escalated_from": decision.escalated_from, "escalation": decision.why}
        for spec, verdict in trips:
            self._write_event(self._event(state, verdict, spec.action, details if spec.action == asked else {
                "superseded_by": decision.action}))
        return control

    def _event(self, state, verdict, action: str, details: dict) -> dict[str, Any]:
        return {
            "step": int(state.global_step),
            "detector": verdict.detector,
            "status": verdict.status,
            "reason": verdict.reason,
            "values": {k: _json_number(v) for k, v in dict(verdict.values).items()},
            "action": action,
            "details": details,
        }

    def _act(self, decision, state, control, trips) -> dict[str, Any]:
        trainer = self.trainer
        action = decision.action
        if action == "warn":
            return {}
        if action == "raise_kl":
            before = float(trainer.beta)
            _set_beta(trainer, decision.beta)
            return {"beta_before": before, "beta_after": float(trainer.beta), "max_beta": self.max_beta}
        if action == "rollback":
            restored = self._restore()
            if restored is not None:
                before = float(trainer.beta)
                _set_beta(trainer, before * self.actions.rollback_beta_factor)
                lr_before, lr_after = scale_learning_rate(trainer, self.actions.rollback_lr_factor)
                return {
                    "restored_step": restored,
                    "rollbacks": self.n_rollbacks,
                    "beta_before": before,
                    "beta_after": float(trainer.beta),
                    "lr_before": lr_before,
                    "lr_after": lr_after,
                }
        # stop
        restored = self._restore() if self.snapshot_step is not None else None
        reasons = "; ".join(f"{v.detector}: {v.reason}" for _, v in trips)
        self.stopped_reason = f"stopped at step {state.global_step}: {reasons}"
        control.should_training_stop = True
        return {"restored_step": restored, "stopped": True, "why": self.stopped_reason}


def effective_tripwires(args, wiring=None) -> list:
    """The stage's tripwires: ``args.tripwires`` when set, else those of the rails config (``rails.tripwires``)."""
    if getattr(args, "tripwires", None) is not None:
        return parse_tripwires(args.tripwires)
    rails = getattr(wiring, "rails", None)
    return list(getattr(rails, "tripwires", None) or [])


def save_tripwire_state(trainer, checkpoint: str) -> None:
    """Write the tripwire callback's state into a checkpoint folder (main process; nothing without tripwires)."""
    callback = getattr(trainer, "tripwire_callback", None)
    if callback is not None and trainer.args.should_save:
        from ..fileio import write_json

        write_json(os.path.join(checkpoint, STATE_FILE), callback.state_dict())  # creates the folder if need be


def load_tripwire_state(trainer, checkpoint: str | None) -> None:
    """On resume: back on the ladder where the checkpoint left it (a raised beta, rollbacks already taken)."""
    callback = getattr(trainer, "tripwire_callback", None)
    path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
    if callback is None or path is None or not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); the checkpoint is damaged: resume from an earlier one or "
                         "delete this one") from None
    if isinstance(state, Mapping):
        callback.load_state_dict(state)


def add_tripwires(trainer, args, wiring=None) -> TripwireCallback | None:
    """Attach a :class:`TripwireCallback` for :func:`effective_tripwires` (None when there is none)."""
    specs = effective_tripwires(args, wiring)
    trainer.tripwire_callback = None
    if not specs:
        return None
    callback = TripwireCallback(trainer, specs, TripwireActions.from_args(args), args.output_dir)
    trainer.add_callback(callback)
    trainer.tripwire_callback = callback
    return callback


# ---------------------------------------------------------------------- snapshots (tripwire rollback)
def snapshot_state_dict(model) -> dict:
    """The entries of ``model.state_dict()`` that training can change, copied to CPU: trainable parameters and
    buffers. Frozen parameters (a PEFT base model, frozen layers) cannot change, so a snapshot leaves them out:
    with LoRA it holds the adapters, megabytes instead of the whole base model."""
    changing = {id(p) for p in model.parameters() if p.requires_grad} | {id(b) for b in model.buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) in changing}


def load_snapshot_state_dict(model, state: dict) -> None:
    """Load a :func:`snapshot_state_dict` back; every trainable parameter must be in it (else one ValueError)."""
    result = model.load_state_dict(state, strict=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    own = model.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if id(own[k]) in trainable]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the tripwire snapshot does not match the model: trainable parameters missing {missing[:5]}, unexpected "
            f"keys {list(result.unexpected_keys)[:5]}; it was written for another model or adapter setup -- delete "
            "the tripwire-last-good/ directory of this output_dir and restart"
        )


def save_snapshot(trainer, directory: str) -> str:
    """Save policy weights (those training can change, :func:`snapshot_state_dict`), optimizer state and rail state
    of ``trainer`` to ``directory/snapshot.pt``.

    Works for single-process and DDP training (every rank holds the full weights) and FSDP2 (every process joins the
    gather of full tensors, :mod:`.sharding`); the main process writes and the others wait. A trainer with more
    trained state than the policy (PPO's critic) adds it by defining ``tripwire_state_dict()`` (called on every
    process: a collective when sharded; the main process's result is written) and
    ``load_tripwire_state_dict(state)``. Returns the file path.
    """
    import torch

    from . import sharding

    path = os.path.join(directory, SNAPSHOT_FILE)
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds it
    sharded = sharding.is_sharded(model)
    if sharded:  # FSDP2: collectives, the full tensors land on the main process
        model_state = sharding.full_model_state(model)
        optimizer_state = sharding.full_optimizer_state(model, optimizer) if optimizer is not None else None
    # hook for trainers with more trained state than the policy (e.g. PPO's critic)
    extra = trainer.tripwire_state_dict() if hasattr(trainer, "tripwire_state_dict") else None
    if accelerator.is_main_process:
        state = {
            "step": int(trainer.state.global_step),
            "model": model_state if sharded else snapshot_state_dict(model),
            "optimizer": optimizer_state if sharded else (optimizer.state_dict() if optimizer is not None else None),
            "beta": float(getattr(trainer, "beta", math.nan)),
            "wiring": trainer.rails_wiring.state_dict() if getattr(trainer, "rails_wiring", None) else None,
            "extra": extra,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    accelerator.wait_for_everyone()
    return path


def restore_snapshot(trainer, directory: str) -> int:
    """Load a :func:`save_snapshot` file back into ``trainer`` (weights, optimizer, rail state, beta).

    The learning-rate schedule keeps following ``global_step``; GRPO's buffered generations are dropped so the
    next batch is sampled from the restored policy. Returns the step the snapshot was taken at.
    """
    import torch

    from . import sharding

    state = torch.load(os.path.join(directory, SNAPSHOT_FILE), map_location="cpu", weights_only=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer_state = state["optimizer"] if optimizer is not None else None
    current_lrs = [group["lr"] for group in optimizer.param_groups] if optimizer is not None else []
    if sharding.is_sharded(model):  # FSDP2: every process puts the full tensors into its shards
        sharding.load_full_state(model, state["model"], optimizer, optimizer_state)
    else:
        load_snapshot_state_dict(model, state["model"])
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
    if optimizer_state is not None:
        for group, lr in zip(optimizer.param_groups, current_lrs, strict=True):
            group["lr"] = lr
    wiring = getattr(trainer, "rails_wiring", None)
    if wiring is not None and state.get("wiring") is not None:
        wiring.load_state_dict(state["wiring"])
    if (wiring is None or wiring.kl_controller is None) and math.isfinite(state.get("beta", math.nan)):
        trainer.beta = state["beta"]  # no controller: beta is the trainer's alone
    if state.get("extra") is not None and hasattr(trainer, "load_tripwire_state_dict"):
        trainer.load_tripwire_state_dict(state["extra"])
    if hasattr(trainer, "_buffered_inputs"):
        trainer._buffered_inputs = None
    tr_loss = getattr(trainer, "_tr_loss", None)
    if isinstance(tr_loss, torch.Tensor) and not torch.isfinite(tr_loss).all():
        tr_loss.zero_()
    return int(state["step"])


def scale_learning_rate(trainer, factor: float) -> tuple[float, float]:
    """Multiply the learning rate (optimizer groups and the scheduler's base rates); returns (before, after)."""
    before = trainer.optimizer.param_groups[0]["lr"]
    for group in trainer.optimizer.param_groups:
        group["lr"] *= factor
    scheduler = getattr(trainer, "lr_scheduler", None)
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    return before, trainer.optimizer.param_groups[0]["lr"]
