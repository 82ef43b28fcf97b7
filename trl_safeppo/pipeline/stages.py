"""The stage types of a recipe: one row of :data:`STAGE_TYPES` each, plus a short ``run_<type>`` function.

A row says which config dataclass validates the stage's ``args`` (the first dotted path that imports wins, so a
stage can fall back to TRL's own config until ours exists), which dataset columns the stage needs, what
``dataset: previous`` means for it, and what data it leaves in ``stages/NN-name/data/``. Adding a stage type is a row
here and a ``run_<type>(ctx) -> StageOutcome`` function.

Every run function receives a :class:`StageContext` built by the runner (resolved init model, validated args with
``output_dir`` pointing at the stage directory, the loaded dataset, the reward spec, the merged rails, callbacks and
the checkpoint to resume from) and returns a :class:`StageOutcome` (the final model directory handed to the next
stage, the data it produced, its log history). Run functions are called on every process under ``accelerate``;
anything that only the main process may do checks ``ctx.is_main``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..fileio import install_dir
from .data import import_object
from .recipe import Recipe, RecipeError, StageSpec


@dataclass(frozen=True)
class StageType:
    """How the runner treats one stage type."""

    config: str                                  # dotted path of the `args` dataclass (or function)
    run: str                                     # dotted path of run_<type>(ctx) -> StageOutcome
    columns: tuple[tuple[str, ...], ...] = ()   # accepted column sets of the training data (any one of them)
    consumes: str | None = None                  # what `dataset: previous` reads from the previous stage's data
    produces: tuple[str, ...] = ()               # data kinds written under data/ (sft, scored, pairs)
    trains: bool = True                          # produces a new policy (False: eval)
    needs_reward: bool = False
    needs_dataset: bool = True
    default_dataset: str | None = None           # used when the stage names no dataset


STAGE_TYPES: dict[str, StageType] = {
    "sft": StageType(
        config="trl:SFTConfig",
        run="trl_safeppo.pipeline.stages:run_sft",
        columns=(("prompt", "completion"), ("messages",), ("text",)),
        consumes="sft",
    ),
    "grpo": StageType(
        config="trl_safeppo.trainers.grpo_config:SafeGRPOConfig",
        run="trl_safeppo.pipeline.stages:run_grpo",
        columns=(("prompt",),),
        needs_reward=True,
    ),
    "ppo": StageType(
        config="trl_safeppo.trainers.ppo_config:SafePPOConfig",
        run="trl_safeppo.pipeline.stages:run_ppo",
        columns=(("prompt",),),
        needs_reward=True,
    ),
    "rejection_sampling": StageType(
        config="trl_safeppo.rejection_sampling:RejectionSamplingConfig",
        run="trl_safeppo.pipeline.stages:run_rejection_sampling",
        columns=(("prompt",),),
        produces=("sft", "scored"),
        trains=False,
        needs_reward=True,
    ),
    "dpo": StageType(
        config="trl_safeppo.trainers.dpo_config:SafeDPOConfig",
        run="trl_safeppo.pipeline.stages:run_dpo",
        columns=(("prompt", "chosen", "rejected"), ("chosen", "rejected")),
        consumes="pairs",
    ),
    "eval": StageType(
        config="trl_safeppo.monitoring.evaluation:evaluate_heldout",
        run="trl_safeppo.pipeline.stages:run_eval",
        columns=(("prompt",),),
        trains=False,
        needs_dataset=False,
    ),
}

# args the runner sets itself -> the fix shown when a recipe sets them
RESERVED_ARGS = {
    "output_dir": "remove it: each stage writes to <output_dir>/stages/NN-<name>; set the recipe's top-level output_dir",
}
# extra args the runner fills for a rejection_sampling stage
SAMPLING_RESERVED = {
    "model": "use the stage's `init` (default: the previous stage's policy)",
    "dataset": "use the stage's `dataset`",
    "reward": "use the stage's `reward` (or the recipe's shared reward)",
}
# args of the eval stage / the recipe's `eval` block that the runner fills in
EVAL_RESERVED = {
    "model_or_path": "remove it: the eval stage evaluates the current policy",
    "tokenizer": "remove it: the tokenizer is loaded with the policy",
}


def config_class(stage_type: str, where: str) -> Any:
    """The config dataclass (or function) of a stage type; one RecipeError if it does not import."""
    return import_object(STAGE_TYPES[stage_type].config, where=f"{where}.type", what=f"{stage_type!r} stage config")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StageContext:
    recipe: Recipe
    index: int                      # 0-based
    spec: StageSpec
    stage_dir: Path
    model: str                      # the resolved init policy (a directory or a Hub id)
    args: dict[str, Any]            # validated args + runner defaults (output_dir, seed, report_to, ...)
    dataset: Any = None             # datasets.Dataset, or None
    reward: Any = None              # reward spec for trl_safeppo.rewards.resolve
    rails: dict[str, Any] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    resume_from: str | None = None
    is_main: bool = True
    previous_data: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"stages[{self.index}] ({self.spec.name})"


@dataclass
class StageOutcome:
    final: str                                   # the policy handed to the next stage
    data: dict[str, str] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None           # set by stages that evaluate (eval)
    early_stops: list[dict[str, Any]] = field(default_factory=list)
    launch: dict[str, Any] = field(default_factory=dict)  # processes and distributed type the trainer ran with


def stage_run_function(stage_type: str) -> Callable[[StageContext], StageOutcome]:
    return import_object(STAGE_TYPES[stage_type].run.replace(":", "."), where=stage_type, what="stage runner")


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
def _barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def is_adapter_dir(path: str) -> bool:
    return Path(path, "adapter_config.json").exists() and not Path(path, "config.json").exists()


def load_model_arg(ctx: StageContext):
    """What to pass as ``model=`` to a TRL trainer: the path (TRL loads it), or a trainable PeftModel when the
    previous stage kept its LoRA adapter (``handoff: keep``)."""
    if is_adapter_dir(ctx.model):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(ctx.model, is_trainable=True)
    return ctx.model


def peft_config(ctx: StageContext):
    if ctx.spec.peft is None:
        return None
    from peft import LoraConfig

    options = {k: v for k, v in ctx.spec.peft.items() if k != "handoff"}
    options.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**options)


def build_config(ctx: StageContext):
    return config_class(ctx.spec.type, ctx.where)(**ctx.args)


def train_and_save(ctx: StageContext, trainer) -> StageOutcome:
    """Train (resuming from ``ctx.resume_from``), then write ``final/`` atomically.

    With a LoRA block, ``handoff: merge`` saves the adapter, then (main process) reloads base + adapter on the CPU,
    merges and saves full weights as ``final/``; ``handoff: keep`` saves the adapter itself as ``final/``.
    """
    if getattr(trainer.args, "disable_tqdm", False):  # plain log lines come from the runner's progress callback
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=ctx.resume_from)
    final = ctx.stage_dir / "final"
    partial = ctx.stage_dir / "final.partial"
    if ctx.is_main and partial.exists():
        shutil.rmtree(partial)
    _barrier()
    merge = ctx.spec.peft is not None and ctx.spec.handoff == "merge"
    target = ctx.stage_dir / "adapter" if merge else partial
    trainer.save_model(str(target))  # every process calls it (FSDP gathers); only the main process writes
    _barrier()
    if ctx.is_main:
        if merge:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(target))
            model.merge_and_unload().save_pretrained(str(partial))
        processing = getattr(trainer, "processing_class", None)
        if processing is not None and not (partial / "tokenizer_config.json").exists():
            processing.save_pretrained(str(partial))
        install_dir(partial, final)
    _barrier()
    accelerator = trainer.accelerator
    return StageOutcome(final=str(final), log_history=list(trainer.state.log_history),
                        early_stops=[getattr(cb, "event", None) for cb in ctx.callbacks if hasattr(cb, "event")],
                        launch={"num_processes": accelerator.num_processes,
                                "distributed_type": str(accelerator.distributed_type).split(".")[-1]})


def resolve_reward(ctx: StageContext):
    from ..rewards import resolve

    return resolve(ctx.reward)


# ---------------------------------------------------------------------------------------------------------------
# Stage types
def _run_trainer(ctx: StageContext, trainer_path: str, *, rewarded: bool) -> StageOutcome:
    """Build the stage's trainer (``module:Class``) on the current policy, train, and hand off its final policy."""
    trainer_cls = import_object(trainer_path, where=ctx.where, what="trainer")
    kwargs = {"reward_funcs": resolve_reward(ctx)} if rewarded else {}
    trainer = trainer_cls(
        model=load_model_arg(ctx),
        args=build_config(ctx),
        train_dataset=ctx.dataset,
        peft_config=peft_config(ctx),
        callbacks=ctx.callbacks,
        **kwargs,
    )
    return train_and_save(ctx, trainer)


def run_sft(ctx: StageContext) -> StageOutcome:
    return _run_trainer(ctx, "trl:SFTTrainer", rewarded=False)


def run_grpo(ctx: StageContext) -> StageOutcome:
    return _run_trainer(ctx, "trl_safeppo.trainers.grpo_trainer:SafeGRPOTrainer", rewarded=True)


def run_ppo(ctx: StageContext) -> StageOutcome:
    return _run_trainer(ctx, "trl_safeppo.trainers.ppo_trainer:SafePPOTrainer", rewarded=True)


def run_dpo(ctx: StageContext) -> StageOutcome:
    return _run_trainer(ctx, "trl_safeppo.trainers.dpo_trainer:SafeDPOTrainer", rewarded=False)


def run_rejection_sampling(ctx: StageContext) -> StageOutcome:
    """Sample from the current policy, score with the stage's reward, keep what passes (main process only; it
    resumes itself from its ``parts/`` chunks). The policy passes through; ``data/sft`` feeds a following SFT stage,
    ``data/scored`` a following DPO stage (pairs)."""
    from ..rejection_sampling import RejectionSamplingConfig, run_rejection_sampling

    out = ctx.stage_dir / "data"
    if ctx.is_main:
        args = {k: v for k, v in ctx.args.items() if k != "output_dir"}  # its output_dir is the stage's data/
        config = RejectionSamplingConfig(model=ctx.model, dataset=ctx.dataset, reward=ctx.reward,
                                         output_dir=str(out), **args)
        run_rejection_sampling(config)
    _barrier()
    return StageOutcome(final=ctx.model, data={"sft": str(out / "sft"), "scored": str(out / "scored")})


def run_eval(ctx: StageContext) -> StageOutcome:
    """Held-out evaluation of the current policy; the policy passes through unchanged."""
    result = None
    if ctx.is_main:
        from ..monitoring.evaluation import evaluate_heldout

        result = evaluate_heldout(ctx.model, ctx.dataset, ctx.reward, **ctx.args)
    return StageOutcome(final=ctx.model, eval=result)


