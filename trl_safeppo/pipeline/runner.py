"""``trl-safeppo run RECIPE.yaml [key.path=value ...]``: run every stage of a recipe, in one process or under
``accelerate launch``.

The loop, top to bottom:

1. load the recipe (overrides, ``${...}``), pre-flight the whole of it (:mod:`.preflight`);
2. reconcile with an existing ``manifest.json``: completed stages with an unchanged fingerprint are skipped, an
   interrupted one resumes from its last ``checkpoint-*``, a changed one (and every stage after it) starts afresh;
3. for each stage: resolve the init policy (the previous stage's ``final/`` by default), load its data, run it,
   write ``log_history.jsonl``, then the monitoring hooks (held-out ``eval.json``, ``probes.json``,
   ``gates.json``), and record it in the manifest; a failed gate stops the run, or with ``on_fail:
   carry_previous`` hands the stage's input model on instead (:class:`_HandOn`);
4. record the run's final model (the recipe's ``final``), write the run report and print each stage's held-out
   score.

Under ``accelerate launch`` every process runs the trainers; only the main process writes the run directory
(manifest, recipe.yaml, logs, eval, report) and the processes meet at a barrier between stages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .. import fileio
from ..fileio import write_json, write_text
from . import data as data_mod
from .manifest import (FINISHED, Manifest, final_metrics, hash_json, hash_path, library_versions, new_stage_entry, now,
                       output_record, verify_output)
from .preflight import Plan, StagePlan, batch_lines, preflight
from .recipe import RecipeError, dump_recipe, load_recipe
from .schema import accepted_fields
from .stages import StageContext, StageOutcome, stage_run_function


# ---------------------------------------------------------------------------------------------------------------
# CLI
def add_arguments(parser) -> None:
    import argparse

    from .recipe import builtin_recipe_folder

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "shipped recipes run by name, with or without the repository:\n"
        "  trl-safeppo run demo            # the whole chain on the embedded tiny model (2 CPU cores, minutes)\n"
        "  trl-safeppo run demo --check    # pre-flight only: validate, print the plan and batch sizes\n"
        "  trl-safeppo run gsm8k           # Qwen2.5-0.5B-Instruct on GSM8K (GPU; the model must be in the HF cache)\n"
        "  accelerate launch --multi_gpu --num_processes 2 -m trl_safeppo run demo   # 2 processes\n"
        f"their files, commented, and the accelerate launch configs: {builtin_recipe_folder()}\n\n"
        "documentation: docs/recipes.md in the source repository (docs/ is not installed by pip); installed, the\n"
        "recipe keys are documented in `python -m pydoc trl_safeppo.pipeline.recipe` (Recipe, StageSpec)"
    )
    parser.add_argument("recipe", help="recipe YAML file (e.g. recipes/demo.yaml), or a shipped recipe by name "
                        "(`trl-safeppo run demo`, `trl-safeppo run gsm8k`)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override recipe values, e.g. stages.grpo.args.max_steps=5 output_dir=runs/x")
    parser.add_argument("--check", action="store_true",
                        help="validate the recipe (pre-flight) and print the plan; train nothing")
    parser.add_argument("--restart", action="store_true",
                        help="ignore an existing manifest in output_dir and run every stage again")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                        help="with --check: plan the batches for N processes (default: $WORLD_SIZE, set by "
                        "accelerate launch, else 1)")


def run(args) -> int:
    return run_recipe(args.recipe, args.overrides, check=args.check, restart=args.restart,
                      num_processes=getattr(args, "num_processes", None))


# ---------------------------------------------------------------------------------------------------------------
def stage_dir_name(index: int, name: str) -> str:
    return f"{index + 1:02d}-{name}"


def _say(is_main: bool, text: str) -> None:
    if is_main:
        print(f"[trl-safeppo] {text}", flush=True)


def fingerprints(plan: Plan) -> list[str]:
    """Chained hashes of what determines each stage's result (the gate is left out: changing a gate re-checks it
    without retraining)."""
    out, previous = [], hash_json({"model": plan.model, "seed": plan.recipe.seed})
    for sp in plan.stages:
        # (scale_with_world_size acts through the per-device batch in args, hashed there)
        spec = {k: v for k, v in dataclasses.asdict(sp.spec).items() if k not in ("gate", "scale_with_world_size")}
        blob = {"previous": previous, "spec": spec, "args": sp.args, "reward": sp.reward, "rails": sp.rails,
                "dataset": dataclasses.asdict(sp.dataset) if sp.dataset else None, "init": sp.init}
        previous = hash_json(blob)
        out.append(previous)
    return out


def _stage_config(sp: StagePlan) -> dict[str, Any]:
    config = dataclasses.asdict(sp.spec)
    config["args"] = sp.args
    config["reward"] = sp.reward
    config["rails"] = sp.rails
    config["dataset"] = sp.dataset.describe() if sp.dataset else None
    return config


def reconcile(plan: Plan, old: Manifest | None, run_dir: Path) -> Manifest:
    """The manifest for this run: entries of the old one are kept where the stage's fingerprint is unchanged."""
    prints = fingerprints(plan)
    entries = []
    for sp, fp in zip(plan.stages, prints):
        directory = f"stages/{stage_dir_name(sp.index, sp.spec.name)}"
        fresh = new_stage_entry(sp.index + 1, sp.spec.name, sp.spec.type, directory, _stage_config(sp), fp)
        previous = None
        if old is not None and sp.index < len(old.stages):
            candidate = old.stages[sp.index]
            if candidate.get("fingerprint") == fp and candidate.get("name") == sp.spec.name:
                previous = candidate
        if previous is not None:
            previous["config"] = fresh["config"]  # the gate may have changed
            entries.append(previous)
        else:
            entries.append(fresh)
    manifest = Manifest.create(run_dir, plan.recipe.name, entries)
    if old is not None:
        manifest.data["created_at"] = old.data.get("created_at", manifest.data["created_at"])
    return manifest


def log_history_callback(path: Path, is_main: bool):
    """A TrainerCallback appending each log to ``log_history.jsonl`` as it happens. The runner rewrites the file
    from ``trainer.state.log_history`` when the stage ends, which also drops entries repeated by a resume."""
    from transformers import TrainerCallback

    class LogHistoryWriter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if is_main and logs:
                with open(path, "a") as handle:
                    handle.write(json.dumps({**logs, "step": state.global_step}, default=float) + "\n")

    return LogHistoryWriter()


def write_log_history(path: Path, history: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(entry, default=float) + "\n" for entry in history))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; a line cut short by a kill or a full disk (never a whole record) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


# ---------------------------------------------------------------------------------------------------------------
def _cpu_processes_use_gloo() -> None:
    """Under ``accelerate launch`` on a machine without a GPU, accelerate only goes multi-process (gloo) with
    ``ACCELERATE_USE_CPU``; set it before any accelerate state exists, so every process joins one group. A launch
    config's ``mixed_precision: bf16`` (recipes/accelerate/ddp.yaml) is a GPU setting: without a GPU it is turned
    off, as a plain ``trl-safeppo run`` would train (a recipe's ``bf16: true`` still asks for it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "1"
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_MIXED_PRECISION"] = "no"


def run_recipe(recipe_path: str, overrides=(), *, check: bool = False, restart: bool = False,
               num_processes: int | None = None) -> int:
    started = time.time()
    _cpu_processes_use_gloo()
    from ..models import quiet_trl_checkpointing_aliases

    quiet_trl_checkpointing_aliases()  # TRL's own calls of transformers' deprecated names (models.py)
    if os.environ.get("RANK", "0") == "0":
        from ..cli import hub_mode_line

        print(f"[trl-safeppo] {hub_mode_line()}", flush=True)
    recipe = load_recipe(recipe_path, overrides)
    if num_processes is not None and not check:
        raise RecipeError("", "--num-processes only plans a --check",
                          "launch the processes with `accelerate launch --num_processes N -m trl_safeppo run ...`")
    if num_processes is not None and num_processes < 1:
        raise RecipeError("", f"--num-processes {num_processes} is not a number of processes", "pass 1 or more")
    plan = preflight(recipe, check_hardware=not check, world_size=num_processes)
    if check:
        print(describe_plan(plan))
        return 0
    from accelerate import PartialState

    state = PartialState()
    is_main = state.is_main_process
    _say(is_main, f"pre-flight passed: {len(plan.stages)} stages in {time.time() - started:.1f}s "
         f"({state.num_processes} process{'es' if state.num_processes > 1 else ''})")
    for line in batch_lines(plan):
        _say(is_main, line)
    run_dir = Path(recipe.output_dir)
    lock = lock_run_dir(run_dir, state, is_main)  # before anything reads or removes what another run writes
    try:  # released however the run ends (a raised error's traceback would otherwise keep it held in this process)
        return _run_locked(recipe, plan, state, is_main, run_dir, restart, started)
    finally:
        lock.release()


def _run_locked(recipe, plan: Plan, state, is_main: bool, run_dir: Path, restart: bool, started: float) -> int:
    if is_main:  # temporaries of writers killed mid-write (only safe to remove while holding the lock)
        for folder in [run_dir, *sorted((run_dir / "stages").glob("*"))]:
            fileio.remove_temporaries(folder)
    old = None if restart else Manifest.load(run_dir)
    if old is not None and old.data.get("name") != recipe.name:
        raise RecipeError("output_dir", f"{run_dir} holds a run of another recipe ({old.data.get('name')!r})",
                          "choose another output_dir, or pass --restart to replace that run")
    manifest = reconcile(plan, old, run_dir)
    state.wait_for_everyone()  # everyone has read the old manifest before the main process rewrites it
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        manifest.data["status"] = "running"
        manifest.save()
    state.wait_for_everyone()

    from ..monitoring.progress import PipelineProgress

    progress = PipelineProgress(len(plan.stages), enabled=is_main)
    if not progress.interactive:  # a log file: no loading / tokenizing / saving bars from the libraries
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    runner = _Runner(plan, manifest, run_dir, is_main, state, progress)
    try:
        rc = runner.run_all()
    except BaseException:
        if is_main:
            manifest.data["status"] = "failed"
            manifest.save()
        raise
    finally:
        progress.close()
    if is_main:
        manifest.data["status"] = "completed" if rc == 0 else "stopped"
        manifest.data["duration_s"] = round(time.time() - started, 1)
        manifest.save()
        _write_report(run_dir)
        print(summary_table(manifest), flush=True)
        _say(True, f"run directory: {run_dir} ({time.time() - started:.0f}s)")
    state.wait_for_everyone()
    return rc


def lock_run_dir(run_dir: Path, state, is_main: bool):
    """Take ``<run_dir>/.lock`` on the main process (pipeline/lock.py); every process raises the same one-line error
    when another run holds it. Returns the lock (a no-op holder on the other processes)."""
    from .lock import RunDirLocked, RunLock

    lock, error = RunLock(run_dir), None
    if is_main:
        try:
            note = lock.acquire()
            if note:
                _say(True, note)
        except RunDirLocked as err:
            error = str(err)
        except OSError as err:  # decided here, raised on every process below (no process left at a barrier)
            error = f"cannot take the lock {lock.path} ({err.strerror}). Fix: check that output_dir is writable"
    error = _agree(state, error)
    if error:
        raise RecipeError("output_dir", *error.rsplit(". Fix: ", 1))
    return lock


class _Runner:
    def __init__(self, plan: Plan, manifest: Manifest, run_dir: Path, is_main: bool, state, progress):
        self.plan, self.manifest, self.run_dir, self.is_main, self.state = plan, manifest, run_dir, is_main, state
        self.progress = progress  # monitoring.progress.PipelineProgress (bars on a terminal, log lines otherwise)

    def say(self, text: str) -> None:
        if self.is_main:
            self.progress.message(f"[trl-safeppo] {text}")

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def run_all(self) -> int:
        policy, data, previous_eval = self.plan.model, {}, None
        handed = self.handed = _HandOn(self.plan)  # the model handed on, the candidates of the final model
        produced: dict[str, dict] = {}  # "final" or a data kind -> the manifest entry of the stage that wrote it
        for sp in self.plan.stages:
            entry = self.manifest.stage(sp.index)
            stage_dir = self.run_dir / entry["dir"]
            policy, policy_hash = handed.input_for(sp)
            self._previous = (policy, policy_hash)  # what `on_fail: carry_previous` hands on instead
            with self.progress.stage(sp.index + 1, sp.spec.name, sp.spec.type) as end:
                if handed.changed(sp, entry):
                    self.say(f"stage {entry['index']} ({sp.spec.name}): it now starts from another model "
                             f"({policy}), so it runs again")
                    entry["status"] = "pending"
                if entry["status"] in FINISHED and _outputs_exist(entry):
                    end["status"] = f"skipped (already {entry['status']})"
                    ok = True
                elif entry["status"] in ("gated", "carried") and _outputs_exist(entry):
                    ok = self._recheck_gate(sp, entry, stage_dir, previous_eval)
                    end["status"] = f"gate re-checked: {entry['status']}"
                else:
                    self._verify_inputs(sp, produced)
                    ok = self.run_stage(sp, entry, stage_dir, policy, data, previous_eval)
                    # the stage's one end line (progress): its status and held-out scores, after its wall time
                    summary = _eval_line(entry.get("eval"))
                    end["status"] = entry["status"]
                    end["detail"] = f"held-out {summary}" if summary else ""
                    if self.is_main:
                        _write_report(self.run_dir, quiet=True)  # a live report, rebuilt after every stage
            if not ok:
                self._record_final(handed)
                return 1
            handed.after(sp, entry)
            data = {**data, **{k: v["path"] for k, v in entry["outputs"].get("data", {}).items()}}
            if entry["status"] != "carried":  # a carried stage's final/ is not handed on (its input model is)
                produced["final"] = entry
                previous_eval = entry.get("eval") or previous_eval
            produced.update({k: entry for k in entry["outputs"].get("data", {})})
        self._record_final(handed)
        return 0

    def _record_final(self, handed: _HandOn) -> None:
        """manifest["final"]: the run's final model (the recipe's `final`), with why it was chosen."""
        record = handed.final_record()
        self.manifest.data["final"] = record
        self._save()
        if record and record.get("stage"):
            self.say(f"final model ({record['policy']}): {record['stage']}, {record['reason']}")

    # -- one stage ------------------------------------------------------------------------------------------------
    def run_stage(self, sp: StagePlan, entry: dict, stage_dir: Path, policy: str, data: dict[str, str],
                  previous_eval: dict | None) -> bool:
        resume_from = None
        if entry["status"] in ("running", "failed") and stage_dir.is_dir():
            resume_from = self._resume_point(sp, entry, stage_dir)
        elif stage_dir.exists() and self.is_main:  # the stage (or one before it) changed since the last run
            self.say(f"stage {entry['index']} ({sp.spec.name}): changed since the last run, starting afresh")
            shutil.rmtree(stage_dir)
        self.barrier()
        if self.is_main:
            stage_dir.mkdir(parents=True, exist_ok=True)
        self.barrier()

        init = policy if sp.init == "previous" else sp.init
        label = f"stage {entry['index']}/{len(self.plan.stages)} ({sp.spec.name}, {sp.spec.type})"
        self.say(f"{label}: " + (f"resuming from {Path(resume_from).name}" if resume_from else "starting")
             + f" from {init}")
        dataset = self._load_dataset(sp, stage_dir, data)
        ctx = self._context(sp, stage_dir, init, dataset, data, resume_from)

        timings = entry["timings"]
        timings["attempts"] = timings.get("attempts", 0) + 1
        timings["started_at"] = timings.get("started_at") or now()
        timings["resumed_from"] = Path(resume_from).name if resume_from else timings.get("resumed_from")
        entry.update(status="running", error=None, versions=library_versions())
        entry["inputs"] = {
            "model": {"path": init, "hash": hash_path(init)},
            "dataset": None if dataset is None else {
                "spec": sp.dataset.describe(), "rows": len(dataset),
                "fingerprint": getattr(dataset, "_fingerprint", None)},
        }
        self._save()
        t0 = time.time()
        try:
            outcome: StageOutcome = stage_run_function(sp.spec.type)(ctx)
        except BaseException as err:
            entry.update(status="failed", error=f"{type(err).__name__}: {err}")
            timings["duration_s"] = round((timings.get("duration_s") or 0) + time.time() - t0, 1)
            self._save()
            raise
        timings["duration_s"] = round((timings.get("duration_s") or 0) + time.time() - t0, 1)
        timings["finished_at"] = now()
        return self._finish(sp, entry, stage_dir, outcome, previous_eval)

    def _finish(self, sp: StagePlan, entry: dict, stage_dir: Path, outcome: StageOutcome,
                previous_eval: dict | None) -> bool:
        """Monitoring hooks (eval, probes, gates) and the manifest entry; False when a gate failed."""
        self._check_losses(sp, entry, outcome)
        status = "completed"
        gate_failed: list = []
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # the stage's ZeRO-3 config would make the main process's loads below (held-out eval, probes) partition
        # the model under deepspeed.zero.Init, a collective the other processes never join (a hang)
        unset_hf_deepspeed_config()
        if self.is_main:
            history = outcome.log_history
            if sp.stype.trains:
                write_log_history(stage_dir / "log_history.jsonl", history)
            eval_result = outcome.eval if outcome.eval is not None else self._heldout(sp, outcome.final)
            if eval_result is not None and "kl_to_reference" in eval_result:
                reference = self.handed.kl_reference(sp)
                eval_result["kl_reference"] = stage_dir.name if reference[0] == "self" else reference[0]
            if eval_result is not None:
                write_json(stage_dir / "eval.json", eval_result)
            if self.plan.probes and sp.stype.trains:
                write_json(stage_dir / "probes.json", self._probes(outcome.final))
            outcomes = self._gates(sp, stage_dir, history, eval_result, previous_eval, outcome.early_stops)
            gate_failed = [o for o in outcomes if not o["passed"]]
            if any(e and e.get("gate") == "plateau" for e in outcome.early_stops):
                status = "stopped"
            status = self._gate_status(sp, entry, outcomes, status)
            entry.update(
                status=status,
                eval=eval_result,
                gates=outcomes,
                metrics=final_metrics(history),
                launch=outcome.launch,
                outputs={
                    "final": output_record(outcome.final),
                    "data": {k: output_record(p) for k, p in outcome.data.items()},
                },
            )
            self._save()
            for o in gate_failed:
                self.say(f"stage {entry['index']} ({sp.spec.name}): gate {o['gate']} failed: {o['reason']}; "
                         + (f"carried over: the next stage starts from the previous model ({entry['handoff']['model']})"
                            if status == "carried" else
                            "the run stops here (the last good policy is the previous stage's final/)"))
        # every process needs the outcome: broadcast the main process's entry
        self.barrier()
        shared = _broadcast(entry, self.state)
        if shared is not entry:
            entry.clear()
            entry.update(shared)
        return entry["status"] != "gated"

    def _recheck_gate(self, sp: StagePlan, entry: dict, stage_dir: Path, previous_eval: dict | None) -> bool:
        if self.is_main:
            history = read_jsonl(stage_dir / "log_history.jsonl")
            outcomes = self._gates(sp, stage_dir, history, entry.get("eval"), previous_eval, [])
            entry["gates"] = outcomes
            entry["status"] = self._gate_status(sp, entry, outcomes, "completed")
            self._save()
        self.barrier()
        shared = _broadcast(entry, self.state)
        if shared is not entry:
            entry.update(shared)
        return entry["status"] != "gated"

    # -- integrity ----------------------------------------------------------------------------------------------------
    def _verify_inputs(self, sp: StagePlan, produced: dict[str, dict]) -> None:
        """Before a stage reads an earlier stage's output (its policy, its data), check the files against the hashes
        in manifest.json: a changed file stops the run, naming the stage and the file."""
        wanted = []
        if sp.init == "previous" and "final" in produced:
            wanted.append(("final", "final/"))
        kind = sp.stype.consumes
        if sp.dataset is not None and sp.dataset.kind == "previous" and kind:
            source = kind if kind in produced else ("scored" if kind == "pairs" and "scored" in produced else None)
            if source:
                wanted.append((source, f"data/{source}"))
        error = None
        if self.is_main:
            for key, label in wanted:
                producer = produced[key]
                record = producer["outputs"]["final"] if key == "final" else producer["outputs"]["data"][key]
                try:
                    problem = verify_output(record)
                except OSError as err:
                    problem = f"{record.get('path')} cannot be read ({err.strerror})"
                if problem:
                    name = Path(producer["dir"]).name
                    error = (f"{label} of stage {name} changed on disk since that stage finished: {problem}",
                             f"restore the file, or rerun stage {name} (delete {self.run_dir / producer['dir']} or "
                             "pass --restart)")
                    break
        error = _agree(self.state, error)
        if error:
            raise RecipeError(sp.where, *error)

    def _check_losses(self, sp: StagePlan, entry: dict, outcome: StageOutcome) -> None:
        """A stage whose training loss is not finite has failed, whatever its tripwires said."""
        error = None
        if self.is_main and sp.stype.trains:
            bad = nonfinite_loss(outcome.log_history)
            if bad:
                error = (f"the training loss is not finite ({bad}); the stage failed",
                         "lower the learning rate or check the data; the previous stage's final/ is the last good "
                         "policy")
                entry.update(status="failed", error=f"{error[0]}. Fix: {error[1]}")
                self._save()
        error = _agree(self.state, error)
        if error:
            raise RecipeError(sp.where, *error)

    def _gate_status(self, sp: StagePlan, entry: dict, outcomes: list[dict], status: str) -> str:
        """The stage's status after its gates (``on_fail``): ``status`` when they passed, ``gated`` (the run stops)
        or ``carried`` (the previous model is handed on; recorded in ``entry["handoff"]``)."""
        from ..monitoring.gates import gate_decision

        decision = gate_decision((sp.spec.gate or {}).get("on_fail", "stop"), outcomes)
        entry.pop("handoff", None)
        if decision == "passed":
            return status
        if decision == "stop":
            return "gated"
        model, model_hash = self._previous
        entry["handoff"] = {
            "decision": "carry_previous", "model": model, "hash": model_hash,
            "reason": "; ".join(f"{o['gate']}: {o['reason']}" for o in outcomes if not o["passed"]),
        }
        return "carried"

    # -- pieces -----------------------------------------------------------------------------------------------------
    def _resume_point(self, sp: StagePlan, entry: dict, stage_dir: Path) -> str | None:
        """The newest complete checkpoint; incomplete ones (a kill or a full disk while saving) are moved aside."""
        from .checkpoints import STATE_MARKER, last_complete_checkpoint, set_aside_incomplete

        # the package's own trainers add their state after trainer_state.json and mark it complete last
        require = (STATE_MARKER,) if sp.spec.type in ("ppo", "grpo", "dpo") else ()
        if self.is_main:
            for note in set_aside_incomplete(stage_dir, require):
                self.say(f"stage {entry['index']} ({sp.spec.name}): {note}")
        self.barrier()
        return last_complete_checkpoint(stage_dir, require)

    def _save(self) -> None:
        if self.is_main:
            self.manifest.save()

    def _load_dataset(self, sp: StagePlan, stage_dir: Path, data: dict[str, str]):
        if sp.dataset is None:
            return None
        where = f"{sp.where}.dataset"
        if sp.dataset.kind == "previous" and sp.stype.consumes == "pairs" and "pairs" not in data:
            data = dict(data, pairs=self._build_pairs(sp, stage_dir, data))
        ds = data_mod.load(sp.dataset, where=where, seed=self.plan.recipe.seed, previous_data=data,
                           previous_kind=sp.stype.consumes)
        if len(ds) == 0:
            origin = (f"an earlier stage produced no {sp.stype.consumes} data (see its data/summary.json)"
                      if sp.dataset.kind == "previous" else f"{sp.dataset.describe()} has no rows")
            raise RecipeError(where, f"the dataset is empty: {origin}",
                              "train the policy longer before sampling, sample more completions, or name a dataset")
        data_mod.check_columns(ds, sp.stype.columns, where=where, stage_type=sp.spec.type)
        return ds

    def _build_pairs(self, sp: StagePlan, stage_dir: Path, data: dict[str, str]) -> str:
        """DPO pairs from an earlier stage's scored samples (the main process builds them, everyone loads)."""
        target = stage_dir / "data" / "pairs"
        if self.is_main and not target.exists():
            from ..pairs import build_pairs_with_report, save_pairs

            scored = data_mod.load_saved(data["scored"], where=f"{sp.where}.dataset", kind="scored")
            pairs, report = build_pairs_with_report(scored, **sp.dataset.pairs)
            if len(pairs) == 0:
                raise RecipeError(f"{sp.where}.dataset", f"no preference pairs could be built from the "
                                  f"{len(scored)} scored samples ({report.summary()})",
                                  "sample more completions per prompt, or relax `pairs: {min_margin: ...}`")
            save_pairs(pairs, target, report)  # atomic: a crash never leaves a half-written pairs/ to reuse
        self.barrier()
        return str(target)

    def _context(self, sp: StagePlan, stage_dir: Path, init: str, dataset, data, resume_from) -> StageContext:
        args = dict(sp.args)
        callbacks: list = []
        if sp.spec.type == "eval":
            args = {**{k: v for k, v in self.plan.eval_options.items() if k != "reward"}, **args}
            reference = self.handed.kl_reference(sp)
            if reference is not None and reference[0] != "self":
                args.setdefault("kl_reference", reference[1])
        else:
            args["output_dir"] = str(stage_dir)
            plain = self.progress.trainer_callback()  # log lines instead of tqdm when not on a terminal
            if plain is not None and "disable_tqdm" in accepted_fields(sp.config_cls):
                args.setdefault("disable_tqdm", True)
                callbacks.append(plain)
            if "logging_nan_inf_filter" in accepted_fields(sp.config_cls):  # log a NaN loss as NaN (_check_losses)
                args.setdefault("logging_nan_inf_filter", False)
            if "progress" in accepted_fields(sp.config_cls):  # rejection sampling's own bar
                args.setdefault("progress", self.progress.interactive)
            if sp.stype.trains:
                callbacks.append(log_history_callback(stage_dir / "log_history.jsonl", self.is_main))
            callbacks.extend(_gate_callbacks(sp.spec.gate))
            callbacks.extend(data_mod.find_callback_class(d, where=f"{sp.where}.callbacks",
                                                          imports=self.plan.recipe.imports)()
                             for d in sp.spec.callbacks)
        reward = sp.reward if sp.spec.type != "eval" else (sp.spec.reward or self.plan.eval_options.get("reward"))
        return StageContext(
            recipe=self.plan.recipe, index=sp.index, spec=sp.spec, stage_dir=stage_dir, model=init, args=args,
            dataset=dataset, reward=reward, rails=sp.rails, callbacks=callbacks, resume_from=resume_from,
            is_main=self.is_main, previous_data=dict(data),
        )

    def _heldout(self, sp: StagePlan, policy: str) -> dict | None:
        if self.plan.eval_dataset is None or not sp.stype.trains:
            return None
        from ..monitoring.evaluation import evaluate_heldout

        ds = data_mod.load(self.plan.eval_dataset, where="eval.dataset", seed=self.plan.recipe.seed)
        options = dict(self.plan.eval_options)
        reference = self.handed.kl_reference(sp)
        if reference is not None and reference[0] != "self":
            options.setdefault("kl_reference", reference[1])
        result = evaluate_heldout(policy, ds, options.pop("reward"), **options)
        if reference is not None and reference[0] == "self":  # the SFT model itself: KL 0 by definition
            result.update(kl_to_reference=0.0, kl_to_reference_seq=0.0)
        return result

    def _probes(self, policy: str) -> list[dict]:
        from ..monitoring.probes import run_probes

        options = {"max_new_tokens": self.plan.eval_options.get("max_new_tokens", 64), **self.plan.probe_options}
        return run_probes(policy, self.plan.probes, **options)

    def _gates(self, sp, stage_dir, history, eval_result, previous_eval, early_stops) -> list[dict]:
        from ..monitoring.gates import GateConfig, evaluate_gates

        outcomes = evaluate_gates(
            GateConfig.from_dict(sp.spec.gate or {}),
            history=history,
            eval_metrics=eval_result,
            previous_eval=previous_eval,
            tripwire_events=read_jsonl(stage_dir / "tripwires.jsonl"),
            early_stops=early_stops,
        )
        result = [o.to_dict() for o in outcomes]
        write_json(stage_dir / "gates.json", result)
        return result


def nonfinite_loss(history: list[dict[str, Any]]) -> str | None:
    """``"loss=nan at step 3"`` for the first non-finite loss in a log history (``loss``, ``train_loss``, any
    ``*_loss`` / ``*/loss``), or None."""
    import math

    for entry in history:
        for key, value in entry.items():
            if not (key == "loss" or key.endswith(("_loss", "/loss"))) or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return f"{key}={value} at step {entry.get('step', '?')}"
    return None


def _agree(state, value: Any) -> Any:
    """The main process's ``value`` on every process (a decision only the main process makes)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]

_TRAINS_POLICY = ("sft", "ppo", "grpo", "dpo")  # stage types that hand on a new model


class _HandOn:
    """Which model each stage starts from, and which is the run's final model.

    After each stage the model handed on is its ``final/``, except for a stage ``carried`` (its gate failed with
    ``on_fail: carry_previous``), which hands on the model it started from. Every model a training stage handed on
    is a candidate for the run's final model (the recipe's ``final``, :func:`monitoring.gates.select_final`); an
    ``eval`` stage after the last training stage evaluates that final model. The SFT model (the first SFT stage's
    ``final/``; the recipe's ``model`` when the recipe has no SFT stage) is the reference of ``kl_to_reference``.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.policy, self.hash = plan.model, None
        self.candidates: list[dict[str, Any]] = []  # {"stage", "type", "path", "hash", "eval"}, oldest first
        trains = [sp.index for sp in plan.stages if sp.spec.type in _TRAINS_POLICY]
        self.last_training = max(trains, default=-1)
        self.has_sft = any(sp.spec.type == "sft" for sp in plan.stages)
        self.sft: tuple[str, str] | None = None  # (label, path): the model handed on by the first SFT stage
        self.current: tuple[str, str | None] = (self.policy, self.hash)

    def _chosen(self) -> dict[str, Any] | None:
        from ..monitoring.gates import select_final

        return select_final(self.candidates, self.plan.recipe.final)

    def input_for(self, sp: StagePlan) -> tuple[str, str | None]:
        """``(path, hash)`` of the policy handed to ``sp``: the last model handed on, or for an eval stage after
        the last training stage, the run's final model."""
        chosen = self._chosen() if sp.spec.type == "eval" and sp.index > self.last_training else None
        self.current = (chosen["path"], chosen["hash"]) if chosen else (self.policy, self.hash)
        return self.current

    def changed(self, sp: StagePlan, entry: dict) -> bool:
        """Whether a stage recorded in the manifest started from another model than the one handed to it now (a
        gate decision before it changed on a rerun): it must run again."""
        recorded = (entry.get("inputs") or {}).get("model") or {}
        if sp.init != "previous" or sp.index == 0 or entry["status"] == "pending" or not recorded:
            return False
        path, model_hash = self.current
        if recorded.get("path") != path:
            return True
        return bool(model_hash and recorded.get("hash") and recorded["hash"] != model_hash)

    def after(self, sp: StagePlan, entry: dict) -> None:
        if entry["status"] != "carried":  # carried: the stage's model is rejected, the one it started from goes on
            final = entry["outputs"]["final"]
            self.policy, self.hash = final["path"], final.get("hash")
        if sp.spec.type == "sft" and self.sft is None:
            self.sft = (stage_dir_name(sp.index, sp.spec.name), self.policy)
        if sp.spec.type in _TRAINS_POLICY and entry["status"] != "carried":
            self.candidates.append({"stage": stage_dir_name(sp.index, sp.spec.name), "type": sp.spec.type,
                                    "path": self.policy, "hash": self.hash, "eval": entry.get("eval")})

    def kl_reference(self, sp: StagePlan) -> tuple[str, str] | None:
        """``(label, path)`` of the model ``kl_to_reference`` is measured against for ``sp``; ``("self", "")`` for
        the SFT stage itself; None before it."""
        if not self.has_sft:
            return ("model", self.plan.model)
        if self.sft is not None:
            return self.sft
        return ("self", "") if sp.spec.type == "sft" else None

    def final_record(self) -> dict[str, Any]:
        """manifest["final"]: ``{"policy", "stage", "path", "hash", "accuracy", "reason", "candidates"}``."""
        policy = self.plan.recipe.final
        chosen = self._chosen()
        scores = [{"stage": c["stage"], "accuracy": (c["eval"] or {}).get("accuracy")} for c in self.candidates]
        if chosen is None:
            return {"policy": policy, "stage": None, "path": self.policy, "hash": self.hash, "accuracy": None,
                    "reason": "no training stage handed on a model", "candidates": scores}
        accuracy = (chosen["eval"] or {}).get("accuracy")
        if policy == "best_heldout" and accuracy is not None:
            reason = (f"best held-out accuracy ({accuracy:.3f}) of the {len(self.candidates)} models handed on"
                      + (" (the last one)" if chosen is self.candidates[-1] else ""))
        else:
            reason = "the last model handed on"
        return {"policy": policy, "stage": chosen["stage"], "path": chosen["path"], "hash": chosen["hash"],
                "accuracy": accuracy, "reason": reason, "candidates": scores}


def _gate_callbacks(gate: dict) -> list:
    if not gate:
        return []
    from ..monitoring.gates import GateConfig

    return GateConfig.from_dict(gate).callbacks()


def _broadcast(entry: dict, state) -> dict:
    if state.num_processes == 1:
        return entry
    from accelerate.utils import broadcast_object_list

    box = [entry if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _outputs_exist(entry: dict) -> bool:
    path = ((entry.get("outputs") or {}).get("final") or {}).get("path")
    return bool(path) and (Path(path).exists() or _is_hub_id(path))


def _is_hub_id(path: str) -> bool:
    from ..models import looks_like_path

    return not looks_like_path(path) and not Path(path).exists()


def _write_report(run_dir: Path, quiet: bool = False) -> None:
    from ..monitoring.report import write_report

    try:
        path = write_report(run_dir)
        if not quiet:
            _say(True, f"report: {path}")
    except Exception as err:  # the report must never lose a run
        _say(True, f"report not written: {type(err).__name__}: {err}")


def _eval_line(result: dict | None) -> str:
    if not result:
        return ""
    parts = []
    for key in ("accuracy", "answer_accuracy", "format_pass_rate", "mean_length"):
        if result.get(key) is not None:
            parts.append(f"{key} {result[key]:.3f}" if key != "mean_length" else f"{key} {result[key]:.1f}")
    return ", ".join(parts)


def summary_table(manifest: Manifest) -> str:
    # An `answer` column (the answer-only accuracy) only beside a stricter held-out accuracy (evaluate_heldout)
    answer = any("answer_accuracy" in (e.get("eval") or {}) for e in manifest.stages)
    rows = [("stage", "type", "status", "time_s", "held-out accuracy", *(("answer",) if answer else ()), "format",
             "mean_len")]
    for e in manifest.stages:
        ev = e.get("eval") or {}
        fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        rows.append((f"{e['index']:02d}-{e['name']}", e["type"], e["status"],
                     fmt(e["timings"].get("duration_s"), 1), fmt(ev.get("accuracy")),
                     *((fmt(ev.get("answer_accuracy")),) if answer else ()), fmt(ev.get("format_pass_rate")),
                     fmt(ev.get("mean_length"), 1)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_plan(plan: Plan) -> str:
    r = plan.recipe
    lines = [f"recipe {r.name!r}: model {r.model} -> {r.output_dir} (seed {r.seed})"]
    for sp in plan.stages:
        init = sp.init if sp.init != "previous" else (r.model if sp.index == 0 else "previous")
        data = sp.dataset.describe() if sp.dataset else "-"
        peft = f", peft handoff={sp.spec.handoff}" if sp.spec.peft is not None else ""
        lines.append(f"  {stage_dir_name(sp.index, sp.spec.name)}: {sp.spec.type} ({sp.config_cls.__name__}) "
                     f"init={init} data={data}{peft}")
    if plan.eval_dataset is not None:
        lines.append(f"  held-out eval after each training stage: {plan.eval_dataset.describe()}")
    if r.final != "last":
        lines.append(f"  final model: {r.final} (an eval stage after the last training stage evaluates it)")
    lines.extend(f"  {line}" for line in batch_lines(plan))
    lines.append("pre-flight passed")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
