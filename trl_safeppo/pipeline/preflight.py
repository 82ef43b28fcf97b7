"""Pre-flight: validate the whole recipe before anything trains, so a typo in stage 4 fails in the first second.

Checks, in order, each failing with one :class:`~trl_safeppo.pipeline.recipe.RecipeError` that names the stage
index, the key path and the fix:

- ``output_dir`` (:func:`check_output_dir`) and the ``imports:`` modules (:func:`import_recipe_modules`), the only code
  a recipe runs; every dotted path must point into them and be declared for its job (:mod:`trl_safeppo.dotted`);
- the model and every explicit ``init`` resolve (``tiny://`` models are built; Hub ids are checked for form only);
- every stage's ``args`` against its config dataclass (unknown keys with "did you mean", value types), then the
  config is instantiated so its ``__post_init__`` checks run too, and its numbers must be finite and in range
  (:func:`check_numbers`);
- the PEFT block against ``peft.LoraConfig``, and hand-off consistency (a kept adapter is continued, not re-wrapped);
- every dataset: its form, that local files exist and are readable, the columns the stage needs (embedded tasks and
  local files are loaded; Hub datasets are checked when their stage starts, since nothing is downloaded here),
  ``dataset: previous`` only after a stage that produces such data; a ``map`` is a function of a listed module;
- the rewards: ``trl_safeppo.rewards.validate_spec`` plus its self-test on a handful of known completions;
- rails (``RailsConfig.from_dict``, per stage with its overrides and tripwires), gates, probes and the ``eval`` block;
- a ``rollback`` tripwire of a stage that will train under DeepSpeed or FSDP1, read from the environment of the launch
  as the trainer will read it (:func:`snapshotless_launch`); the trainer would refuse it only when its stage starts.

The result is a :class:`Plan` the runner executes. ``check_hardware=False`` (``trl-safeppo run --check``, tests)
validates a GPU recipe on a CPU machine: precision flags are masked when instantiating the configs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as data_mod
from .recipe import Recipe, RecipeError
from .schema import accepted_fields, check_args
from .stages import EVAL_RESERVED, RESERVED_ARGS, SAMPLING_RESERVED, STAGE_TYPES, StageType, config_class

HARDWARE_MASK = {"bf16": False, "fp16": False, "tf32": None, "use_vllm": False}
EVAL_STAGE_RESERVED = {**EVAL_RESERVED,
                       "dataset": "set the stage's `dataset` (or the recipe's eval.dataset) instead",
                       "reward": "set the stage's `reward` (or the recipe's reward) instead"}


@dataclass
class StagePlan:
    index: int
    spec: Any                       # StageSpec
    stype: StageType
    config_cls: Any
    args: dict[str, Any]            # validated user args merged over the runner defaults (no output_dir yet)
    dataset: data_mod.DatasetSpec | None
    reward: Any
    rails: dict[str, Any]
    init: str                       # "previous" or a resolved model
    where: str
    batch: dict[str, Any] | None = None  # global batch and steps at this world size (training stages; _batch_plan)


@dataclass
class Plan:
    recipe: Recipe
    model: str                      # the resolved starting model
    stages: list[StagePlan]
    eval_dataset: data_mod.DatasetSpec | None = None
    eval_options: dict[str, Any] = field(default_factory=dict)
    probes: list[str] = field(default_factory=list)
    probe_options: dict[str, Any] = field(default_factory=dict)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_args(recipe: Recipe, config_cls: Any, cuda: bool) -> dict[str, Any]:
    """Runner defaults for a stage's config: the recipe's seed, no experiment trackers, bf16 and pinned loader
    memory only on a GPU, and (rejection sampling) the recipe's reward self-test switch."""
    known = accepted_fields(config_cls)
    defaults = {"seed": recipe.seed, "report_to": "none", "bf16": cuda, "dataloader_pin_memory": cuda,
                "self_test": recipe.self_test}
    return {k: v for k, v in defaults.items() if k in known}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _resolve_model(value: str, where: str, *, local: bool = False) -> str:
    """The model's identifier as the trainers take it. With ``local`` (a real run), a Hub id must also be in the local
    Hugging Face cache when offline (``models.require_local_model``), so a missing model fails here in one line
    instead of after the network retries of its stage; ``--check`` checks the id's form only."""
    from ..models import require_local_model, resolve_model_path

    try:
        resolved = resolve_model_path(value, field=where)
        if local:
            require_local_model(resolved, field=where)
        return resolved
    except ValueError as err:
        message = str(err)
        prefix = f"{where}={value!r}"
        if local and " is a Hub id that is not in the local" in message:
            problem, _, fix = message.partition("; ")
            raise RecipeError(where, f"model {value!r}{problem[len(prefix):]}", fix) from None
        message = str(err)
        prefix = f"{where}={value!r}"
        if message.startswith(prefix):
            message = f"model {value!r}{message[len(prefix):]}"
        problem, _, accepted = message.partition("; accepted: ")
        raise RecipeError(where, problem, f"use {accepted}" if accepted else "fix the model identifier") from None


def _check_reward(spec: Any, where: str, imports: list = ()) -> None:
    """``rewards.validate_spec``: names, options, dotted paths (the self-test runs on each stage's data). A dotted
    path must name a marked reward in a module of the recipe's ``imports:``."""
    from .. import rewards
    from ..dotted import DottedPathError

    try:
        rewards.validate_spec(spec, path=where, imports=list(imports))
    except DottedPathError as err:
        raise RecipeError(err.where, err.problem, err.fix) from None
    except (ValueError, ImportError, TypeError, AttributeError) as err:
        message = str(err)
        message = message[len(where) + 2:] if message.startswith(where + ": ") else message
        raise RecipeError(where, message,
                          "use built-in rule names or dotted paths to callables (see docs/rewards.md)") from None


def _check_rails(rails: dict, where: str) -> None:
    try:
        from ..rails.config import RailsConfig
    except ImportError:
        return
    try:
        RailsConfig.from_dict(rails)
    except (ValueError, TypeError) as err:
        raise RecipeError(where, f"invalid rails: {err}", "see docs/rails.md for the accepted keys") from None


def _instantiate(config_cls: Any, args: dict, where: str, check_hardware: bool) -> None:
    trial = dict(args, output_dir="/tmp/trl_safeppo_preflight") if "output_dir" in accepted_fields(config_cls) else dict(args)
    if not check_hardware:
        trial.update({k: v for k, v in HARDWARE_MASK.items() if k in accepted_fields(config_cls)})
    try:
        return config_cls(**trial)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = "set `bf16: false` on a machine without a GPU" if "bf16" in message else "fix the value named above"
        raise RecipeError(where, f"{config_cls.__name__} rejects these args: {message}", fix) from None


# ---------------------------------------------------------------------------------------------------------------
# Tripwire rollbacks and the launch: under DeepSpeed and FSDP1 no process holds the whole trained state
def snapshotless_launch(config: Any) -> str | None:
    """``"DeepSpeed"`` or ``"FSDP1"`` when the trainer built from ``config`` (a stage's instantiated config) will
    train under it, else ``None``. Under either, no process holds the whole trained state, so the trainer takes no
    tripwire snapshot and refuses a ``rollback`` tripwire (:mod:`trl_safeppo.trainers.tripwires`).

    Read as the trainer will find it: ``accelerate launch --config_file recipes/accelerate/X.yaml`` sets the
    processes' environment, which TrainingArguments (when ``config`` was built) and accelerate read:

    - ``ACCELERATE_USE_CPU`` (accelerate's ``parse_flag_from_env``; the runner sets it on a machine without a GPU
      before pre-flight runs, docs/recipes.md "Multi-process"): accelerate's state is then a CPU one, which turns
      neither DeepSpeed nor FSDP on;
    - DeepSpeed, any ZeRO stage: the config's ``deepspeed_plugin``, which TrainingArguments builds from
      ``ACCELERATE_USE_DEEPSPEED`` or from the stage's ``deepspeed`` arg (the trainer hands it to accelerate; the
      stage's ``use_cpu`` does not turn it off);
    - FSDP: the plugin arguments of the stage's ``fsdp`` arg (``fsdp_version``), else ``ACCELERATE_USE_FSDP=true``
      with ``FSDP_VERSION`` (``1`` when unset, as accelerate's ``FullyShardedDataParallelPlugin`` reads it).
      accelerate turns FSDP on only in launched processes (``LOCAL_RANK`` set) on a GPU-type device, and not with
      the stage's ``use_cpu``."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return None
    if getattr(config, "deepspeed_plugin", None) is not None:
        return "DeepSpeed"
    if getattr(config, "use_cpu", False):
        return None
    fsdp = getattr(config, "fsdp_plugin_args", None)
    if fsdp is not None:
        version = int(fsdp.get("fsdp_version", 1))
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # as accelerate.Accelerator reads it
        version = int(os.environ.get("FSDP_VERSION", "1"))
    else:
        return None
    return "FSDP1" if version == 1 and _launched_on_device() else None


def _launched_on_device() -> bool:
    """A process of ``accelerate launch`` / torchrun (``LOCAL_RANK``) with a GPU-type device (Apple's MPS runs no
    distributed training in accelerate)."""
    import torch

    if int(os.environ.get("LOCAL_RANK", "-1")) == -1 or not torch.accelerator.is_available():
        return False
    return torch.accelerator.current_accelerator().type != "mps"


def _check_rollbacks(spec: Any, user: dict, config: Any, where: str) -> None:
    """A ``rollback`` tripwire of a stage that will train under DeepSpeed or FSDP1 (:func:`snapshotless_launch`) is
    refused now, naming it, instead of when the stage's trainer is built (after the stages before it ran). The
    stage's tripwires are those the trainer picks (``trainers.tripwires.add_tripwires``): the config's ``tripwires``
    when set, else its rails' (the stage's ``rails`` merged over the recipe's)."""
    if getattr(config, "tripwires", None) is not None:
        tripwires = list(config.tripwires)
        key = "tripwires" if "tripwires" not in user else "args.tripwires"
    else:
        rails = getattr(config, "rails_config", None)
        tripwires = [t.to_dict() for t in rails.tripwires] if rails is not None else []
        key = "args.rails.tripwires" if "rails" in user else "rails.tripwires"
    rollbacks = [j for j, t in enumerate(tripwires) if t.get("action") == "rollback"]
    if not rollbacks:
        return
    launch = snapshotless_launch(config)  # (a malformed ACCELERATE_USE_CPU already failed the config's build)
    if launch is None:
        return
    j = rollbacks[0]
    inherited = key == "rails.tripwires" and "tripwires" not in (spec.rails or {})
    override = f"rails.tripwires.{j}.action" if inherited else f"stages.{spec.name}.{key}.{j}.action"
    if launch == "DeepSpeed":
        via = ("the stage's `deepspeed` arg" if getattr(config, "deepspeed", None)
               else "the launch's ACCELERATE_USE_DEEPSPEED")
    else:
        via = ("the stage's `fsdp` args" if getattr(config, "fsdp_plugin_args", None) is not None
               else "the launch's ACCELERATE_USE_FSDP with FSDP_VERSION=1")
    raise RecipeError(
        f"{where}.{key}[{j}]",
        f"action 'rollback' ({tripwires[j]['detector']}"
        + (", from the recipe's `rails:` block" if inherited else "")
        + f") cannot run: this stage trains under {launch} ({via}), and a rollback restores a snapshot of the "
        "whole trained state, which DeepSpeed (any ZeRO stage) and FSDP1 keep partitioned across processes (the "
        "stage's trainer would refuse it when the stage starts)",
        f"use action 'raise_kl' or 'stop' (which ends the stage where it is), e.g. the override `{override}=stop`, "
        "or FSDP2 (fsdp_version: 2, recipes/accelerate/fsdp2.yaml), where snapshots gather the full tensors")


def _dataset_for(plan_so_far: list[StagePlan], recipe: Recipe, index: int, stype: StageType, where: str):
    spec_value = recipe.stages[index].dataset
    if spec_value is None:
        spec_value = stype.default_dataset
    if spec_value is None:
        if stype.needs_dataset:
            raise RecipeError(f"{where}.dataset", f"a {recipe.stages[index].type} stage needs a dataset",
                              "add `dataset:` (a data key, task://arithmetic/<split>, a file, a Hub id or `previous`)")
        return None
    spec = data_mod.normalize(spec_value, where=f"{where}.dataset", shared=recipe.data)
    if spec.kind == "previous":
        if index == 0:
            raise RecipeError(f"{where}.dataset", "`dataset: previous` on the first stage: there is no previous stage",
                              "name a dataset")
        wanted = stype.consumes
        producer = next((p for p in reversed(plan_so_far) if wanted is not None and (
            wanted in p.stype.produces or (wanted == "pairs" and "scored" in p.stype.produces))), None)
        if producer is None:
            prev = plan_so_far[index - 1]
            raise RecipeError(f"{where}.dataset", f"`dataset: previous` but no earlier stage produces "
                              f"{wanted or 'usable'} data for a {recipe.stages[index].type} stage (the previous "
                              f"stage is {prev.where})",
                              "put a rejection_sampling stage before it, or name a dataset")
    return spec


def _check_columns(spec: data_mod.DatasetSpec, stype: StageType, stage_type: str, where: str, seed: int):
    """Load a task / local dataset and check its columns; returns it (None for Hub and `previous` data, which are
    checked when their stage starts: nothing is downloaded in pre-flight)."""
    if spec.kind not in ("task", "file"):
        return None
    try:
        ds = data_mod.load(spec, where=where, seed=seed)
    except RecipeError:
        raise
    except Exception as err:  # unreadable or malformed file
        raise RecipeError(where, f"cannot load the dataset {spec.describe()}: {type(err).__name__}: {err}",
                          "check the file's format and contents") from None
    data_mod.check_columns(ds, stype.columns, where=where, stage_type=stage_type)
    return ds


SELF_TEST_ROWS = 16


def _self_test(reward: Any, ds, where: str, done: set, timeout_s: float | None) -> None:
    """The reward's verifier self-test on the first rows of the stage's data: gold answers pass, wrong ones fail;
    each rule within the stage's ``reward_timeout_s`` (``timeout_s``)."""
    from ..rewards.selftest import check_rewards

    key = (json.dumps(reward, sort_keys=True, default=str), getattr(ds, "_fingerprint", id(ds)), timeout_s)
    if key in done:
        return
    done.add(key)
    rows = ds.select(range(min(SELF_TEST_ROWS, len(ds))))
    fix = ("fix the reward spec (try `trl-safeppo check-rewards`), or set `self_test: false` at the top of the "
           "recipe for a reward without a gold answer")
    try:
        report = check_rewards(reward, rows, threads=2, processes=0, timeout_s=timeout_s)
    except ValueError as err:
        raise RecipeError(where, f"the reward cannot be self-tested on this stage's data: {err}", fix) from None
    if not report.ok:
        raise RecipeError(where, f"the reward fails its self-test on {report.n} rows of this stage's data: "
                          f"{'; '.join(report.failures)}", fix)


def preflight(recipe: Recipe, *, check_hardware: bool = True, world_size: int | None = None) -> Plan:
    """Validate everything; return the plan. Raises one RecipeError (with the recipe file as source).

    ``world_size`` is the number of processes the stages will train with (default: ``$WORLD_SIZE``, set by
    ``accelerate launch``, else 1); with ``scale_with_world_size: false`` it divides the per-device batches."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        return _preflight(recipe, check_hardware, max(int(world_size), 1))
    except RecipeError as err:
        raise err.with_source(recipe.source) if recipe.source and not err.source else err


# ---------------------------------------------------------------------------------------------------------------
# Batch semantics under several processes (docs/recipes.md, "Scaling to several processes")
def _field_default(config_cls: Any, name: str) -> Any:
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else None
    return None


def _batch_plan(config_cls: Any, args: dict, *, scale: bool, world_size: int, where: str) -> dict[str, Any] | None:
    """The stage's global batch and optimizer steps at ``world_size`` processes. With ``scale=False`` the args
    describe one process: ``per_device_train_batch_size`` is divided by the world size here (in ``args``), so that
    ``per_device x accumulation x processes`` stays the one-process batch; a batch the processes cannot share
    evenly is refused. Epoch-based steps are filled in by :func:`_epoch_steps` once the data's size is known."""
    if not dataclasses.is_dataclass(config_cls) or "per_device_train_batch_size" not in accepted_fields(config_cls):
        return None

    def get(name: str) -> Any:
        return args[name] if name in args else _field_default(config_cls, name)

    per_device, accumulation = int(get("per_device_train_batch_size")), int(get("gradient_accumulation_steps") or 1)
    if not scale and world_size > 1:
        if per_device % world_size:
            raise RecipeError(
                f"{where}.args.per_device_train_batch_size",
                f"per_device_train_batch_size={per_device} is this stage's batch at one process "
                f"(scale_with_world_size: false), and {world_size} processes cannot share it evenly",
                f"make it a multiple of {world_size}, launch with a --num_processes that divides {per_device}, or set "
                "`scale_with_world_size: true` on the stage (the global batch then grows with the processes)",
            )
        per_device //= world_size
        args["per_device_train_batch_size"] = per_device
    global_batch = per_device * accumulation * world_size
    max_steps = get("max_steps")
    steps = int(max_steps) if max_steps is not None and max_steps > 0 else None
    generations = get("num_generations") if "num_generations" in accepted_fields(config_cls) else None
    return {"world_size": world_size, "scale_with_world_size": scale, "per_device": per_device,
            "accumulation": accumulation, "global_batch": global_batch, "steps": steps,
            "num_generations": generations, "one_process_batch": global_batch // world_size if scale else global_batch}


def _epoch_steps(config_cls: Any, args: dict, batch: dict[str, Any], rows: int) -> int | None:
    """Optimizer steps of an epoch-based (no ``max_steps``) SFT / DPO stage over ``rows`` training rows, counted as
    accelerate and transformers count them: the batches are sharded over the processes, and a partial gradient
    accumulation at the end of an epoch is one more step. None for RL stages (their steps follow generation)."""
    if batch["steps"] is not None or batch["num_generations"] is not None:
        return batch["steps"]
    epochs = float(args.get("num_train_epochs", _field_default(config_cls, "num_train_epochs")))
    batches = math.ceil(math.ceil(rows / batch["per_device"]) / batch["world_size"])
    return math.ceil(epochs * max(math.ceil(batches / batch["accumulation"]), 1))


def batch_lines(plan: Plan) -> list[str]:
    """One line per training stage: its global batch and optimizer steps at this world size, with a warning where
    the world size changes them (stages with ``scale_with_world_size: true`` under several processes)."""
    lines = []
    for sp in plan.stages:
        b = sp.batch
        if not b:
            continue
        n = b["world_size"]
        what = f"{b['global_batch']} completions" if b["num_generations"] else f"{b['global_batch']} rows"
        line = (f"{sp.spec.name}: global batch {what} = {b['per_device']} per device x {b['accumulation']} "
                f"accumulation x {n} process{'es' if n > 1 else ''}")
        if b["num_generations"]:
            line += f" ({b['global_batch'] // b['num_generations']} prompts x {b['num_generations']})"
        line += f"; {b['steps']} optimizer steps" if b["steps"] is not None else "; steps set by the data at run time"
        if n > 1 and b["scale_with_world_size"]:
            line += (f". warning: {n} processes make the global batch {n}x the one-process {b['one_process_batch']}"
                     + (" and the epochs' steps fewer" if b["steps"] is not None and not b["num_generations"]
                        and "max_steps" not in (sp.spec.args or {}) else "")
                     + "; set `scale_with_world_size: false` to keep the one-process optimisation")
        lines.append(line)
    return lines


# args naming a model the stage loads (besides its policy): checked like `model`
MODEL_ARGS = {"ppo": ("critic_model_path",), "rejection_sampling": ("reward_model",)}
MODEL_ARG_WORDS = ("reward_model",)  # values of those args that are not models (critic_model_path: reward_model)


def _preflight(recipe: Recipe, check_hardware: bool, world_size: int = 1) -> Plan:
    check_output_dir(recipe.output_dir)
    check_numbers({"seed": recipe.seed}, "")
    import_recipe_modules(recipe)  # the only code a recipe runs at check time (docs/recipes.md)
    cuda = _cuda()
    model = _resolve_model(recipe.model, "model", local=check_hardware)
    if recipe.reward is not None:
        _check_reward(recipe.reward, "reward", recipe.imports)
    if recipe.rails:
        _check_rails(recipe.rails, "rails")

    stages: list[StagePlan] = []
    self_tested: set = set()
    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}] ({spec.name})"
        stype = STAGE_TYPES[spec.type]
        config_cls = config_class(spec.type, where)

        # init
        if spec.init is None or spec.init == "previous":
            init = "previous"
        else:
            init = _resolve_model(spec.init, f"{where}.init", local=check_hardware)

        # args (the stage's rails and tripwires go into its config's `rails` / `tripwires` fields)
        batch = None
        fields = accepted_fields(config_cls)
        rails = deep_merge(recipe.rails, spec.rails) if "rails" in fields else {}  # (so SFT's fingerprint ignores them)
        if spec.type == "eval":
            args = check_args(spec.args, config_cls, where=f"{where}.args", what="evaluate_heldout",
                              reserved=EVAL_STAGE_RESERVED)
            check_numbers(args, f"{where}.args")
        else:
            reserved = {**RESERVED_ARGS, **(SAMPLING_RESERVED if spec.type == "rejection_sampling" else {})}
            user = check_args(spec.args, config_cls, where=f"{where}.args", what=config_cls.__name__,
                              reserved=reserved)
            args = {**default_args(recipe, config_cls, cuda), **user}
            named = {"activation_checkpointing", "gradient_checkpointing"} & set(user)
            if "activation_checkpointing" in fields and not named:
                # TRL's SFTConfig defaults transformers' deprecated `gradient_checkpointing` (True), which warns at
                # every config: its default goes to the current name instead
                checkpointing = _field_default(config_cls, "gradient_checkpointing")
                if checkpointing is not None:
                    args["activation_checkpointing"] = checkpointing
            for key, value in (("rails", spec.rails), ("tripwires", spec.tripwires)):
                if value and key not in fields:
                    raise RecipeError(f"{where}.{key}", f"a {spec.type} stage ({config_cls.__name__}) takes no {key}",
                                      f"remove `{key}` from this stage")
                if value and key in user:
                    raise RecipeError(f"{where}.args.{key}", f"{key} is set both in the stage and in its args",
                                      f"keep the stage's `{key}:` and remove args.{key}")
            if "rails" in fields and rails and "rails" not in user:
                _check_rails(rails, f"{where}.rails" if spec.rails else "rails")
                args["rails"] = rails
            if "tripwires" in fields and spec.tripwires:
                args["tripwires"] = list(spec.tripwires)
            scale = recipe.scale_with_world_size if spec.scale_with_world_size is None else spec.scale_with_world_size
            if stype.trains and spec.type != "rejection_sampling":
                batch = _batch_plan(config_cls, args, scale=scale, world_size=world_size, where=where)
            config = _instantiate(config_cls, args, f"{where}.args", check_hardware)
            check_numbers({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, f"{where}.args")
            _check_rollbacks(spec, user, config, where)
            for key in MODEL_ARGS.get(spec.type, ()):
                if isinstance(args.get(key), str) and args[key] not in MODEL_ARG_WORDS:
                    _resolve_model(args[key], f"{where}.args.{key}", local=check_hardware)

        # PEFT and hand-off
        if spec.peft is not None:
            from peft import LoraConfig

            lora = {k: v for k, v in spec.peft.items() if k != "handoff"}
            lora = check_args(lora, LoraConfig, where=f"{where}.peft", what="peft.LoraConfig")
            try:
                LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
            except (ValueError, TypeError) as err:
                raise RecipeError(f"{where}.peft", f"peft.LoraConfig rejects these settings: {err}",
                                  "fix the value named above") from None
            if not stype.trains or spec.type == "rejection_sampling":
                raise RecipeError(f"{where}.peft", f"a {spec.type} stage trains nothing, so it takes no `peft` block",
                                  "remove `peft`")
        if init == "previous" and i > 0:
            kept = _kept_adapter(recipe, i)
            if kept and spec.peft is not None:
                raise RecipeError(f"{where}.peft", f"the policy arrives as a LoRA adapter ({kept} has "
                                  "`handoff: keep`), and this stage would wrap it in a second adapter",
                                  f"remove this stage's `peft` (it continues training the adapter) or set "
                                  f"`handoff: merge` on {kept}")

        # data
        dataset = _dataset_for(stages, recipe, i, stype, where)
        loaded = None
        if dataset is not None:
            _check_map(dataset, f"{where}.dataset", recipe.imports)
            loaded = _check_columns(dataset, stype, spec.type, f"{where}.dataset", recipe.seed)
        if batch is not None and loaded is not None:
            batch["steps"] = _epoch_steps(config_cls, args, batch, len(loaded))

        # reward
        reward = spec.reward if spec.reward is not None else recipe.reward
        if spec.reward is not None:
            _check_reward(spec.reward, f"{where}.reward", recipe.imports)
        if stype.needs_reward and reward is None:
            raise RecipeError(f"{where}.reward", f"a {spec.type} stage needs a reward and the recipe has none",
                              "add a top-level `reward:` (e.g. [{name: math}]) or a stage `reward:`")
        if stype.needs_reward and recipe.self_test and loaded is not None:
            from ..rewards.timeout import DEFAULT_TIMEOUT_S

            # the stage's reward timeout (its config's default when not set), as the trainer will use it
            timeout_s = args.get("reward_timeout_s", getattr(config_cls, "reward_timeout_s", DEFAULT_TIMEOUT_S))
            _self_test(reward, loaded, f"{where}.reward" if spec.reward is not None else "reward", self_tested,
                       timeout_s)

        if spec.gate:
            _check_gate(spec.gate, f"{where}.gate")
        if spec.callbacks and not stype.trains:
            raise RecipeError(f"{where}.callbacks", f"a {spec.type} stage runs no trainer", "remove `callbacks`")
        for j, dotted in enumerate(spec.callbacks):
            _user_object(data_mod.find_callback_class, dotted, f"{where}.callbacks[{j}]", recipe.imports)

        uses_reward = stype.needs_reward or spec.type == "eval"  # SFT / DPO ignore it (and so do their fingerprints)
        stages.append(StagePlan(i, spec, stype, config_cls, args, dataset, reward if uses_reward else None, rails,
                                init, where, batch))

    plan = Plan(recipe=recipe, model=model, stages=stages)
    _check_eval_block(recipe, plan)
    if recipe.probes:
        from ..monitoring.probes import run_probes, validate_probes

        prompts, where = recipe.probes, "probes"
        if isinstance(recipe.probes, dict):
            options = dict(recipe.probes)
            prompts, where = options.pop("prompts", None), "probes.prompts"
            plan.probe_options = check_args(options, run_probes, where="probes", what="run_probes",
                                            reserved={"model_or_path": "the runner probes each stage's policy",
                                                      "tokenizer": "loaded with the policy"})
            check_numbers(plan.probe_options, "probes")
        try:
            plan.probes = validate_probes(prompts, where)
        except ValueError as err:
            raise RecipeError(where, str(err).removeprefix(f"{where}: "), "write a list of prompt strings") from None
    return plan


def _kept_adapter(recipe: Recipe, index: int) -> str | None:
    """The stage whose kept LoRA adapter reaches stage ``index`` through `init: previous`, if any."""
    j = index - 1
    while j >= 0:
        s = recipe.stages[j]
        if STAGE_TYPES[s.type].trains and s.type != "rejection_sampling":
            return f"stages[{j}] ({s.name})" if s.peft is not None and s.handoff == "keep" else None
        if s.init not in (None, "previous"):
            return None
        j -= 1
    return None


def _check_gate(gate: dict, where: str) -> None:
    try:
        from ..monitoring.gates import GateConfig
    except ImportError:  # pragma: no cover
        return
    try:
        GateConfig.from_dict(gate)
    except (ValueError, TypeError) as err:
        message = str(err)
        raise RecipeError(where, message.removeprefix("gates: ").removeprefix("gates."),
                          "see docs/recipes.md (gate) for the accepted keys") from None


def _check_eval_block(recipe: Recipe, plan: Plan) -> None:
    options = dict(recipe.eval)
    if not options:
        if any(s.spec.type == "eval" and s.dataset is None for s in plan.stages):
            raise RecipeError("eval", "an eval stage without a dataset needs the recipe's `eval.dataset`",
                              "add `eval: {dataset: task://arithmetic/eval}` or give the eval stage a `dataset`")
        return
    from ..monitoring.evaluation import evaluate_heldout

    dataset_value = options.pop("dataset", None)
    reward = options.pop("reward", None)
    options = check_args(options, evaluate_heldout, where="eval", what="evaluate_heldout",
                         reserved={**EVAL_RESERVED, "dataset": "", "reward": ""})
    check_numbers(options, "eval")
    if dataset_value is None:
        raise RecipeError("eval.dataset", "the held-out evaluation needs a dataset",
                          "add `dataset: task://arithmetic/eval` (or a file / Hub dataset with a prompt column)")
    spec = data_mod.normalize(dataset_value, where="eval.dataset", shared=recipe.data)
    if spec.kind == "previous":
        raise RecipeError("eval.dataset", "the held-out set cannot be `previous`", "name a fixed held-out dataset")
    _check_map(spec, "eval.dataset", recipe.imports)
    _check_columns(spec, STAGE_TYPES["eval"], "eval", "eval.dataset", recipe.seed)
    if reward is not None:
        _check_reward(reward, "eval.reward", recipe.imports)
    reward = reward if reward is not None else recipe.reward
    for key in ("accuracy_reward", "format_reward"):
        if options.get(key) is not None:
            _check_reward(options[key], f"eval.{key}", recipe.imports)
    if reward is None and options.get("accuracy_reward") is None:
        raise RecipeError("eval", "the held-out evaluation has no rule to score with",
                          "add a top-level `reward:` or `eval.accuracy_reward:`")
    plan.eval_dataset = spec
    for stage in plan.stages:  # an eval stage without its own dataset uses the held-out set
        if stage.spec.type == "eval" and stage.dataset is None:
            stage.dataset = spec
    plan.eval_options = {"reward": reward, **options}


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: code a recipe may name, numbers, and where it may write
def import_recipe_modules(recipe: Recipe) -> None:
    """Import the modules of the recipe's ``imports:`` (searched in the installed packages, then the recipe's folder,
    then the working directory). The only code a recipe runs before its rewards are called."""
    if not recipe.imports:
        return
    from ..dotted import DottedPathError, add_search_folders, import_listed

    folders = [Path(recipe.source).resolve().parent] if recipe.source else []
    folders = list(dict.fromkeys([*folders, Path.cwd().resolve()]))
    add_search_folders(folders, recipe.imports)
    for j, module in enumerate(recipe.imports):
        try:
            import_listed(module, recipe.imports, folders, where=f"imports[{j}]")
        except DottedPathError as err:
            raise RecipeError(err.where, err.problem, err.fix) from None


def _user_object(finder, dotted: str, where: str, imports: list) -> Any:
    from ..dotted import DottedPathError

    try:
        return finder(dotted, where=where, imports=imports)
    except DottedPathError as err:
        raise RecipeError(err.where, err.problem, err.fix) from None


def _check_map(spec: data_mod.DatasetSpec, where: str, imports: list) -> None:
    """A dataset's ``map:`` must be a Python function defined in a module of ``imports:`` (or trl_safeppo's own
    formats), checked before the dataset is loaded, since loading calls it."""
    if spec.map:
        _user_object(data_mod.find_map_function, spec.map, f"{where}.map", imports)


# Accepted ranges of numeric config fields, by name (any config, TRL's included). Every float of a stage's config
# must be finite in any case; TRL's own __post_init__ checks run first (_instantiate).
MAX_STEPS_CAP = 10_000_000
_POSITIVE = ("a finite number > 0", lambda v: v > 0)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: v >= 0)
_AT_LEAST_ONE = ("an integer >= 1", lambda v: v >= 1)
# Counts multiplied into a batch, and token lengths, have a ceiling: a typo (1e9) would otherwise reach the first
# allocation or spin for days. 2**20 = 1,048,576 per device or step; 2**24 = 16,777,216 tokens, past any model's context.
COUNT_CAP, LENGTH_CAP = 2**20, 2**24
_COUNT = (f"an integer from 1 to {COUNT_CAP}", lambda v: 1 <= v <= COUNT_CAP)
_LENGTH = (f"an integer from 1 to {LENGTH_CAP}", lambda v: 1 <= v <= LENGTH_CAP)
NUMBER_RANGES: dict[str, tuple[str, Any]] = {
    "max_steps": (f"-1 (train by epochs) or an integer from 1 to {MAX_STEPS_CAP}",
                  lambda v: v == -1 or 1 <= v <= MAX_STEPS_CAP),
    "num_train_epochs": ("a number > 0 and at most 100000", lambda v: 0 < v <= 100_000),
    "learning_rate": ("a finite number >= 0", lambda v: v >= 0),  # 0 freezes the weights: a dry run of a pipeline
    "per_device_train_batch_size": _COUNT,
    "per_device_eval_batch_size": _COUNT,
    "gradient_accumulation_steps": _COUNT,
    "batch_size": _COUNT,
    "generation_batch_size": _COUNT,
    "num_generations": _COUNT,
    "num_completions": _COUNT,
    "num_iterations": _COUNT,
    "max_completion_length": _LENGTH,
    "max_prompt_length": _LENGTH,
    "max_length": _LENGTH,
    "max_new_tokens": _LENGTH,
    "n": _AT_LEAST_ONE,
    "logging_steps": _POSITIVE,
    "save_steps": _POSITIVE,
    "eval_steps": _POSITIVE,
    "warmup_steps": _NON_NEGATIVE,
    "warmup_ratio": ("a number from 0 to 1", lambda v: 0 <= v <= 1),
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "beta": _NON_NEGATIVE,
    "epsilon": _NON_NEGATIVE,
    "temperature": _NON_NEGATIVE,
    "top_p": ("a number > 0 and at most 1", lambda v: 0 < v <= 1),
    "seed": ("an integer from 0 to 2**32 - 1", lambda v: 0 <= v < 2**32),
}


def check_numbers(values: dict[str, Any], where: str) -> None:
    """Every number in ``values`` (a config's fields, or a function's arguments) is finite, and the known fields are
    in range (:data:`NUMBER_RANGES`); one RecipeError naming the field, the value and the accepted range."""
    import math
    import numbers

    for key, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, numbers.Real):
                continue
            accepted, ok = NUMBER_RANGES.get(key, ("a finite number", lambda v: True))
            if not math.isfinite(item) or not ok(item):
                path = f"{where}.{key}" if where else key
                raise RecipeError(path, f"{key}={item!r} is out of range (accepted: {accepted})",
                                  f"set `{key}` to {accepted}")


# Folders a run must never write into, even when named by an absolute path.
SYSTEM_FOLDERS = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/proc", "/sys",
                  "/dev", "/run", "/var/lib", "/var/run", "/var/log", "/var/spool", "/var/cache", "/snap")


# Folders a run may write below, but never be: shared top-level folders.
SHARED_FOLDERS = ("/home", "/opt", "/var", "/srv", "/mnt", "/media", "/tmp", "/var/tmp")


def check_output_dir(value: str, where: str = "output_dir") -> Path:
    """The run directory, refused when it is outside the working directory without being written as an absolute
    path (``../../etc``), or when it is (inside) a system folder, ``/``, a shared top-level folder itself (``/tmp``,
    ``/home``, ``/opt``, ...), a home folder itself (``/home/<anyone>``, ``/root``, ``~``) or a home dotfile
    (``~/.ssh``), wherever it is written. Symlinks are followed for the system-folder test."""
    import os

    raw = Path(os.path.expanduser(value))
    cwd = Path.cwd().resolve()
    fix = "use a folder below the working directory (e.g. runs/my-run), or an absolute path outside system folders"
    if not raw.is_absolute():
        lexical = Path(os.path.normpath(cwd / raw))
        if lexical == cwd or cwd not in lexical.parents:
            raise RecipeError(where, f"output_dir {value!r} is {lexical}, "
                              + ("the working directory itself" if lexical == cwd else
                                 f"outside the working directory {cwd}"),
                              "use a folder below the working directory (e.g. runs/my-run), or write the absolute "
                              "path if you mean it")
    target = (raw if raw.is_absolute() else cwd / raw).resolve()
    for folder in ("/", *SYSTEM_FOLDERS):
        base = Path(folder)
        if target == base or (folder != "/" and base in target.parents):
            raise RecipeError(where, f"output_dir {value!r} is {target}, "
                              + ("the root folder" if folder == "/" else f"inside the system folder {folder}"), fix)
    if str(target) in SHARED_FOLDERS:
        raise RecipeError(where, f"output_dir {value!r} is {target}, a shared top-level folder itself (the run would "
                          "write its manifest and stages among everything else there)", fix)
    homes = {Path.home().resolve(), Path("/root")}
    if target.parent == Path("/home") or (len(target.parts) > 2 and target.parts[1] == "home"):
        homes.add(Path("/home", target.parts[2]))  # another user's home (the run may be root)
    for home in homes:
        if target == home or (home in target.parents and target.relative_to(home).parts[0].startswith(".")):
            raise RecipeError(where, f"output_dir {value!r} is {target}, "
                              + ("a home folder itself" if target == home else "inside a hidden folder of a home"),
                              fix)
    return target
