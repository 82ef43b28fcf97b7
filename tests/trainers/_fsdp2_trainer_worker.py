"""Worker of test_fsdp2_trainers.py: the package's real trainers under accelerate's FSDP2 path on CPU processes.

`python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 THIS KIND OUT`
(`_fsdp2_cpu.launch`) runs KIND (`ppo`, `grpo`, `dpo`) sharded; `python THIS ppo OUT` runs the same PPO unsharded in
one process, for the comparison. `_fsdp2_cpu.enable()` (the test harness: accelerate's CPU refusal of FSDP patched)
is applied when the environment asks for FSDP. Each process writes `rank{i}.json`; process 0 writes the full
weights it gathered as `*.pt`. KIND `ppo_die OUT 2` kills process 1 inside the critic's save at checkpoint-2;
`ppo_resume OUT 1` resumes from checkpoint-1. Not collected by pytest (the name starts with an underscore).
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    from tests.trainers._fsdp2_cpu import enable

    enable()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

T = 6  # completion tokens: every completion has exactly T (min_new_tokens), so every process has as many tokens


class TokenReward:
    """A deterministic score that differs between completions: the completion's token ids summed, mod 7, / 7."""

    __name__ = "token_reward"

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [float(sum(ids) % 7) / 7.0 for ids in completion_ids]


def prompts(n=32):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]})


def shard_figures(module, optimizer=None) -> dict:
    """DTensor placement of a module's parameters and of its Adam moments (this process's view)."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    figures = {
        "all_dtensor": bool(params) and all(isinstance(p, DTensor) for p in params),
        "placements": sorted({str(p.placements) for p in params if isinstance(p, DTensor)}),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        moments = [s["exp_avg"] for s in inner.state.values() if "exp_avg" in s]
        figures["adam_all_dtensor"] = bool(moments) and all(isinstance(m, DTensor) for m in moments)
        figures["adam_local_numel"] = sum(m.to_local().numel() if isinstance(m, DTensor) else m.numel()
                                          for m in moments)
    return figures


def full_policy(trainer) -> dict:
    """The policy's full state dict on process 0 (a collective under FSDP; accelerate's own gather)."""
    return {k: v.detach().cpu().clone() for k, v in trainer.accelerator.get_state_dict(trainer.model).items()}


def write(out: str, rank: int, result: dict, tensors: dict | None = None) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if tensors and rank == 0:
        for name, state in tensors.items():
            torch.save(state, os.path.join(out, f"{name}.pt"))


# ---------------------------------------------------------------------- PPO
def ppo(out: str, accumulation: int = 1, precision: int = 0) -> None:
    """precision: 0 fp32, 1 bf16, 2 fp16 (accelerate's mixed precision)."""
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer
    from trl_safeppo.trainers.sharding import full_model_state

    world = int(os.environ.get("WORLD_SIZE", "1"))

    def trainer(output_dir: str, max_steps: int, tripwires=None) -> SafePPOTrainer:
        # the same 4 x `accumulation` prompts per step in both runs: 4 per device and micro-batch unsharded, 2 on
        # each of 2 processes (accelerate hands process i the i-th consecutive batch of the sampler); one optimizer
        # step per rollout, of `accumulation` micro-batches (the critic's gradient sync deferred as the policy's)
        args = SafePPOConfig(
            output_dir=output_dir, per_device_train_batch_size=4 // world, max_completion_length=T,
            max_steps=max_steps, num_iterations=1, steps_per_generation=accumulation,
            gradient_accumulation_steps=accumulation,
            logging_steps=1, report_to=[], bf16=precision == 1, fp16=precision == 2, use_cpu=True, learning_rate=1e-3,
            beta=0.05, save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0,
            gradient_checkpointing=True,  # policy and critic recompute their blocks (the critic follows the policy)
            # greedy and exactly T tokens: the rollouts do not depend on the processes' sampling streams
            generation_kwargs={"do_sample": False, "min_new_tokens": T}, tripwires=tripwires,
        )
        torch.manual_seed(0)  # the critic's fresh value head (FSDP: process 0's is broadcast at sharding)
        return SafePPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts())

    t = trainer(os.path.join(out, "run"), 3)
    rank = t.accelerator.process_index
    result = {"world": t.accelerator.num_processes, "distributed_type": str(t.accelerator.distributed_type)}
    plugin = getattr(t.accelerator.state, "fsdp_plugin", None)
    policy_mp = getattr(plugin, "mixed_precision_policy", None)
    result["fsdp_param_dtype"] = str(getattr(policy_mp, "param_dtype", None))
    result["fsdp_reduce_dtype"] = str(getattr(policy_mp, "reduce_dtype", None))
    at_2 = {}

    class Capture:  # the weights at step 2, where the checkpoint is written (for the resume comparison)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                at_2["policy"] = full_policy(t)
                at_2["critic"] = {k: v.clone() for k, v in full_model_state(t.critic).items()}

    from transformers import TrainerCallback

    t.add_callback(type("CaptureStep2", (Capture, TrainerCallback), {})())
    t.train()
    result["policy"] = shard_figures(t.model, t.optimizer)
    result["critic"] = shard_figures(t.critic, t.critic_optimizer)
    result["master_dtypes"] = sorted({str(p.dtype) for m in (t.model, t.critic) for p in m.parameters()})
    result["recomputes"] = [bool(getattr(m, "is_gradient_checkpointing", False))
                            for m in (t.accelerator.unwrap_model(t.model), t.accelerator.unwrap_model(t.critic).model)]
    scaler = t.accelerator.scaler  # fp16: the GradScaler whose scale multiplies both losses
    result["loss_scale"] = float(scaler.get_scale()) if scaler is not None else None
    result["reference_all_dtensor"] = t.ref_model is not None and shard_figures(t.ref_model)["all_dtensor"]
    result["logs"] = [{k: h[k] for k in ("loss", "grad_norm", "ppo/val/grad_norm", "ppo/val/loss", "reward")
                       if k in h} for h in t.state.log_history if "loss" in h]
    policy, critic = full_policy(t), {k: v.clone() for k, v in full_model_state(t.critic).items()}
    tensors = {"policy": policy, "critic": critic, "policy_step2": at_2["policy"], "critic_step2": at_2["critic"]}

    if world > 1:
        # Resume from checkpoint-2 in a second trainer (a fresh sharding), one more step: as the uninterrupted run
        resumed = trainer(os.path.join(out, "run"), 3)
        resumed.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))
        result["resumed_steps"] = resumed.state.global_step
        result["resumed_policy_sharded"] = shard_figures(resumed.model)["all_dtensor"]
        result["resumed_critic_sharded"] = shard_figures(resumed.critic)["all_dtensor"]
        tensors["resumed_policy"], tensors["resumed_critic"] = full_policy(resumed), full_model_state(resumed.critic)
        # final/: what a pipeline stage saves (every process calls save_model; FSDP gathers, process 0 writes)
        resumed.save_model(os.path.join(out, "final"))

        # Rollback: the value loss (> 0 at every step) trips a rollback at steps 1 and 2, each back to the
        # initial snapshot: policy, critic and both optimizers gathered in full when taken, put back into the shards
        value_loss = [{"detector": "kl_limit", "action": "rollback",
                       "params": {"limit": 1e-9, "warn_fraction": 1.0, "key": "ppo/val/loss"}}]
        rolled = trainer(os.path.join(out, "rollback"), 2, value_loss)
        tensors["rollback_policy_initial"] = full_policy(rolled)
        tensors["rollback_critic_initial"] = {k: v.clone() for k, v in full_model_state(rolled.critic).items()}
        rolled.train()
        tensors["rollback_policy_after"] = full_policy(rolled)
        tensors["rollback_critic_after"] = {k: v.clone() for k, v in full_model_state(rolled.critic).items()}
    write(out, rank, result, tensors)



# ---------------------------------------------------------------------- GRPO and DPO: rails, tripwires, resume
RAILS = {"kl": {"controller": "adaptive", "init_kl_coef": 0.05, "target": 0.01, "horizon": 8, "min_coef": 0.001},
         "normalize": {"enabled": True}}
# trips at every step whose KL is above 0 (all but the first): raise_kl doubles beta through the KL controller
RAISE_KL = [{"detector": "kl_limit", "action": "raise_kl", "params": {"limit": 1e-9, "warn_fraction": 1.0}}]
ROLLBACK = [{"detector": "kl_limit", "action": "rollback", "params": {"limit": 1e-9, "warn_fraction": 1.0}}]


def rails_state(trainer) -> str:
    """The rails' (GRPO: reward rails, KL controller), beta's and the tripwire ladder's state as one string."""
    wiring = trainer.rails_wiring.state_dict() if getattr(trainer, "rails_wiring", None) is not None else None
    ladder = trainer.tripwire_callback.state_dict()
    return json.dumps({"wiring": wiring, "ladder": ladder, "beta": float(trainer.beta)}, sort_keys=True,
                      default=repr)


def train_resume_and_save(make, out: str, name: str, result: dict, tensors: dict) -> None:
    """Train 3 steps (checkpoint at 2), then resume a fresh trainer from checkpoint-2 and save final/."""
    from transformers import TrainerCallback

    t = make(os.path.join(out, name), 3, RAISE_KL)
    at_2 = {}

    class AtSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                at_2["rails"] = rails_state(t)

    t.add_callback(AtSave())
    t.train()
    optimizer = getattr(t.optimizer, "optimizer", t.optimizer)
    result[name] = {"policy": shard_figures(t.model, t.optimizer), "rails_at_2": at_2["rails"],
                    "adam_steps": sorted({int(s["step"]) for s in optimizer.state.values() if "step" in s}),
                    "betas": [h["beta"] for h in t.state.log_history if "beta" in h and "loss" in h],
                    "reference_all_dtensor": getattr(t, "ref_model", None) is not None
                    and shard_figures(t.ref_model)["all_dtensor"]}
    tensors[f"{name}_policy"] = full_policy(t)
    resumed = make(os.path.join(out, name), 3, RAISE_KL)

    class AtBegin(TrainerCallback):  # the checkpoint's rails and ladder are loaded before training starts
        def on_train_begin(self, args, state, control, **kwargs):
            result[name]["rails_resumed"] = rails_state(resumed)

    resumed.add_callback(AtBegin())
    resumed.train(resume_from_checkpoint=os.path.join(out, name, "checkpoint-2"))
    result[name]["resumed_steps"] = resumed.state.global_step
    result[name]["resumed_sharded"] = shard_figures(resumed.model)["all_dtensor"]
    tensors[f"{name}_resumed_policy"] = full_policy(resumed)
    resumed.save_model(os.path.join(out, name, "final"))


def grpo(out: str) -> None:
    from trl_safeppo.trainers.grpo_config import SafeGRPOConfig
    from trl_safeppo.trainers.grpo_trainer import SafeGRPOTrainer

    def make(output_dir, max_steps, tripwires):
        args = SafeGRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=2, num_generations=2, max_completion_length=T,
            max_steps=max_steps, steps_per_generation=1, gradient_accumulation_steps=1, logging_steps=1,
            report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="steps", save_steps=2, disable_tqdm=True,
            seed=0, beta=0.05, tripwires=tripwires, tripwire_snapshot_every=1, rails=RAILS,
        )
        return SafeGRPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts())

    result, tensors = {}, {}
    train_resume_and_save(make, out, "grpo", result, tensors)

    # Rollback: the KL of step 2 trips; the last good snapshot is the initial one (step 1's candidate is only
    # promoted by a clean step 2), so the policy goes back to the initial weights
    t = make(os.path.join(out, "rollback"), 2, ROLLBACK)
    tensors["rollback_initial"] = full_policy(t)
    t.train()
    result["rollback_sharded"] = shard_figures(t.model)["all_dtensor"]
    tensors["rollback_after"] = full_policy(t)
    write(out, t.accelerator.process_index, result, tensors)


def dpo(out: str) -> None:
    from trl_safeppo import SafeDPOConfig, SafeDPOTrainer

    n = 16
    pairs = Dataset.from_dict({
        "prompt": [f"What is {i} + 1? " for i in range(n)],
        "chosen": [f"The answer is {i + 1}." for i in range(n)],
        "rejected": [f"Maybe {i + 7} or so, I am not sure at all." for i in range(n)],
    })

    def make(output_dir, max_steps, tripwires):
        args = SafeDPOConfig(
            output_dir=output_dir, per_device_train_batch_size=2, max_steps=max_steps, logging_steps=1,
            learning_rate=5e-3, beta=0.1, seed=0, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
            disable_tqdm=True, tripwires=tripwires,
        )
        return SafeDPOTrainer(model="tiny://debug", args=args, train_dataset=pairs)

    result, tensors = {}, {}
    train_resume_and_save(make, out, "dpo", result, tensors)
    write(out, int(os.environ.get("RANK", "0")), result, tensors)


# ---------------------------------------------------------------------- a rank dies in the middle of a sharded save
def _ppo_trainer(output_dir: str, max_steps: int):
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

    args = SafePPOConfig(
        output_dir=output_dir, per_device_train_batch_size=2, max_completion_length=T, max_steps=max_steps,
        num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1, logging_steps=1, report_to=[],
        use_cpu=True, learning_rate=1e-3, beta=0.05, save_strategy="steps", save_steps=1, disable_tqdm=True, seed=0,
        generation_kwargs={"do_sample": False, "min_new_tokens": T},
    )
    torch.manual_seed(0)
    return SafePPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts())


def ppo_die(out: str, die_at: int) -> None:
    """Checkpoints at every step; at step `die_at` process 1 dies (os._exit, no cleanup, as a SIGKILL or an OOM
    kill would) inside save_checkpoint_files, between the critic's two gathers: after the weights' all-gather, at the Adam
    moments' (`sharding.full_optimizer_state`), while process 0 waits in the same collective."""
    from trl_safeppo.trainers import ppo_trainer, sharding

    gather = sharding.full_optimizer_state

    def dying_gather(module, optimizer):
        if int(os.environ["RANK"]) == 1 and t.state.global_step == die_at:
            with open(os.path.join(out, "rank1_died_at.txt"), "w") as f:
                f.write(str(t.state.global_step))
            os._exit(17)
        return gather(module, optimizer)

    ppo_trainer.sharding.full_optimizer_state = dying_gather  # the module object save_checkpoint_files reads it from
    t = _ppo_trainer(os.path.join(out, "run"), 3)
    t.train()
    write(out, t.accelerator.process_index, {"finished": True})  # never reached: the test asserts it is absent


def grpo_die(out: str, die_at: int) -> None:
    """SafeGRPO (no collective in its own on_save), checkpoints at every step; at step `die_at` process 1 dies
    after the Trainer's files and before the package's callbacks, its `rng_state_1.pth` cut in half (a kill in the
    middle of writing it), while process 0 goes on to its callbacks and the marker."""
    from transformers import TrainerCallback

    from trl_safeppo.trainers.grpo_config import SafeGRPOConfig
    from trl_safeppo.trainers.grpo_trainer import SafeGRPOTrainer

    args = SafeGRPOConfig(
        output_dir=os.path.join(out, "run"), per_device_train_batch_size=2, num_generations=2,
        max_completion_length=T, max_steps=3, steps_per_generation=1, gradient_accumulation_steps=1,
        logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="steps", save_steps=1,
        disable_tqdm=True, seed=0, beta=0.05,
    )
    t = SafeGRPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts())

    class Die(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if int(os.environ["RANK"]) == 1 and state.global_step == die_at:
                rng = os.path.join(args.output_dir, f"checkpoint-{die_at}", "rng_state_1.pth")
                os.truncate(rng, os.path.getsize(rng) // 2)
                os._exit(17)

    t.callback_handler.callbacks.insert(0, Die())  # first of the on_save callbacks
    t.train()
    write(out, t.accelerator.process_index, {"finished": True})


def ppo_resume(out: str, step: int) -> None:
    """A fresh 2-process run resumes from run/checkpoint-`step` and trains on to step 3."""
    t = _ppo_trainer(os.path.join(out, "run"), 3)
    t.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{step}"))
    write(out, t.accelerator.process_index, {"resumed_steps": t.state.global_step,
                                             "critic_sharded": shard_figures(t.critic)["all_dtensor"]})


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    kinds = {"ppo": ppo, "grpo": grpo, "dpo": dpo, "ppo_die": ppo_die, "ppo_resume": ppo_resume,
             "grpo_die": grpo_die}
    kinds[kind](out, *map(int, sys.argv[3:]))
