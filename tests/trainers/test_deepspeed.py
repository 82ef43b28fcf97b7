"""SafePPOTrainer (its critic's own engine: trl_safeppo/trainers/zero.py), SafeGRPO and SafeDPO under DeepSpeed ZeRO-2
and ZeRO-3 on 2 CPU processes: DeepSpeed's CPU accelerator, gloo (oneccl is not installed), fp32 (transformers
refuses bf16 without a GPU unless use_cpu=True, which turns DeepSpeed off). The trainers are launched with the shipped
recipes/accelerate/deepspeed_zero{2,3}.yaml (`--num_processes 2 --mixed_precision no` on the command line) and
`ddp_backend="gloo"`: without it accelerate finds no backend on a machine without GPUs and counts one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from trl_safeppo.trainers.sharding import check_critic_sharding

ROOT = Path(__file__).resolve().parents[2]
needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'trl-safeppo[deepspeed]')",
)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- config-time refusals (no processes)
def _accelerator(stage=2, fp16=False, offload="none"):
    from accelerate.utils import DistributedType

    config = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": offload}},
              "fp16": {"enabled": fp16}}
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_zero_settings_the_critic_engine_cannot_run_are_refused_with_the_fix():
    import torch

    assert check_critic_sharding(_accelerator(2), None) is None
    check_critic_sharding(_accelerator(3), torch.nn.Linear(2, 1))  # a value_model on the CPU: partitioned when built
    check_critic_sharding(_accelerator(2, fp16="auto"), None)  # "auto" left unresolved is not fp16
    with pytest.raises(ValueError, match=r"zero_stage=1: .*set zero_stage: 2"):
        check_critic_sharding(_accelerator(1), None)
    with pytest.raises(ValueError, match=r"offload_optimizer_device='cpu'.*set offload_optimizer_device: none"):
        check_critic_sharding(_accelerator(3, offload="cpu"), None)
    with pytest.raises(ValueError, match=r"fp16=True under DeepSpeed.*bf16=True"):
        check_critic_sharding(_accelerator(2, fp16=True), None)

    class OnGPU(torch.nn.Module):  # parameters that report an accelerator device (no GPU here)
        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", 0))])

    check_critic_sharding(_accelerator(2), OnGPU())  # ZeRO-2 keeps the full weights on every process anyway
    with pytest.raises(ValueError, match=r"value_model: under ZeRO-3 .*already on \['cuda'\].*critic_model_path"):
        check_critic_sharding(_accelerator(3), OnGPU())


# ---------------------------------------------------------------------- PPO steps: ZeRO against unsharded
def _zero_steps(tmp_path, stage: int, gas: int) -> dict:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.trainers._zero_ppo_worker", str(out), str(stage), str(gas)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.parametrize("stage,gas", [(3, 2), pytest.param(2, 1, marks=pytest.mark.slow),
                                       pytest.param(2, 2, marks=pytest.mark.slow)])
def test_zero_partitions_policy_critic_and_adam_states_and_matches_unsharded_steps(tmp_path, stage, gas,
                                                                                   tiny_debug_path):
    # gas: micro-batches accumulated per optimizer step (the critic engine's boundary follows the Trainer's)
    f = _zero_steps(tmp_path, stage, gas)
    assert f["stage"] == stage
    for name in ("policy", "critic"):
        s = f[name]
        # each process holds half of the Adam moments (ZeRO-2 and 3: optimizer state partitioned over 2 processes);
        # ZeRO-3 also half of the weights (ds_tensor), ZeRO-2 all of them
        assert 0.45 * s["full_numel"] < s["adam_local_numel"] < 0.55 * s["full_numel"]
        if stage == 3:
            assert 0.45 * s["full_numel"] < s["local_numel"] < 0.55 * s["full_numel"]
        else:
            assert s["local_numel"] == s["full_numel"]
    # three PPO steps (AdamW; both models clipped at their global norm 0.5) through the two engines give the unsharded
    # run's weights up to the order of float sums (~1e-6); the steps move the policy by ~6e-3
    assert f["policy_moved"] > 1e-3
    assert f["policy_max_diff"] < 1e-4 and f["critic_max_diff"] < 1e-4
    for (p, c), (p_ref, c_ref) in zip(f["norms"], f["ref_norms"]):
        assert p == pytest.approx(p_ref, rel=1e-4) and c == pytest.approx(c_ref, rel=1e-4, abs=1e-6)
    assert max(p for p, _ in f["ref_norms"]) > 0.5  # the clip acted


# ---------------------------------------------------------------------- the trainers under accelerate + DeepSpeed
TRAINER_SCRIPT = '''
import json, os, sys
import torch
from datasets import Dataset

out, kind = sys.argv[1], sys.argv[2]

class TokenReward:  # varies within a group (a length reward would not: all completions reach the 6-token cap)
    __name__ = "token_reward"
    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [(len(ids) + sum(ids) % 5) / 8.0 for ids in completion_ids]

common = dict(output_dir=out, per_device_train_batch_size=2, logging_steps=1, report_to=[], bf16=False,
              learning_rate=1e-3, ddp_backend="gloo", gradient_checkpointing=False, disable_tqdm=True, seed=0)
prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})

def local_numel(module):  # ZeRO-3: this process's partition
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())

def full_numel(module):
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

def gathered(module):
    import deepspeed
    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().clone() for k, v in params.items()}

if kind == "ppo":
    from trl_safeppo.trainers.ppo_config import SafePPOConfig
    from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer
    def make(steps):
        args = SafePPOConfig(**common, max_completion_length=6, max_steps=steps, num_iterations=1,
                             steps_per_generation=2, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
        return SafePPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts)
elif kind == "grpo":
    from trl_safeppo import SafeGRPOConfig, SafeGRPOTrainer
    def make(steps):
        args = SafeGRPOConfig(**common, num_generations=2, max_completion_length=6, max_steps=steps, beta=0.04,
                              save_strategy="no")
        return SafeGRPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts)
else:
    from trl_safeppo import SafeDPOConfig, SafeDPOTrainer
    pairs = Dataset.from_dict({"prompt": [f"What is {i} + 1? " for i in range(16)],
                               "chosen": [f"The answer is {i + 1}." for i in range(16)],
                               "rejected": [f"Maybe {i + 7} or so, I am not sure at all." for i in range(16)]})
    def make(steps):
        args = SafeDPOConfig(**common, max_steps=steps, save_strategy="no")
        return SafeDPOTrainer(model="tiny://debug", args=args, train_dataset=pairs)

t = make(2)
before = gathered(t.model)
t.train()
after = gathered(t.model)
rank = t.accelerator.process_index
r = {"engine": type(t.model_wrapped).__name__, "steps": t.state.global_step,
     "policy_local": local_numel(t.model), "policy_full": full_numel(t.model),
     "policy_moved": max(float((after[k] - before[k]).abs().max()) for k in after),
     "losses": [h["loss"] for h in t.state.log_history if "loss" in h]}
if kind == "ppo":
    from trl_safeppo.fileio import is_temporary
    from trl_safeppo.trainers.zero import load_engine
    ckpt = os.path.join(out, "checkpoint-2")
    critic = gathered(t.critic.module)  # the weights saved at step 2, the last step
    adam = [s["exp_avg"].clone() for s in t.critic_optimizer.state.values()]
    r.update(critic_engine=type(t.critic).__name__, critic_local=local_numel(t.critic.module),
             critic_full=full_numel(t.critic.module), critic_adam_local=sum(a.numel() for a in adam),
             files=sorted(os.listdir(ckpt)), critic_zero=sorted(os.listdir(os.path.join(ckpt, "critic_zero", "state"))),
             temporaries=[n for n in os.listdir(ckpt) if is_temporary(n)])
    # critic/ is an ordinary transformers checkpoint of the trained critic (read as a file: under ZeRO-3,
    # from_pretrained in this process would partition it again)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(ckpt, "critic", "model.safetensors"))
    r["saved_critic_diff"] = max(float((saved[k[len("model."):]] - v).abs().max()) for k, v in critic.items())
    # critic_zero/ restores the critic engine exactly: weights and this process's Adam partition
    fresh = make(3)
    load_engine(fresh.critic, os.path.join(ckpt, "critic_zero"))
    restored = gathered(fresh.critic.module)
    r["restored_critic_diff"] = max(float((restored[k] - v).abs().max()) for k, v in critic.items())
    r["restored_adam_diff"] = max(float((s["exp_avg"] - a).abs().max())
                                  for s, a in zip(fresh.critic_optimizer.state.values(), adam))
    resumed = make(3)
    resumed.train(resume_from_checkpoint=ckpt)
    r["resumed_steps"] = resumed.state.global_step
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(r, f)
'''


def _launch(tmp_path, kind: str, stage: int) -> list[dict]:
    script, out = tmp_path / "zero_trainer.py", tmp_path / "out"
    script.write_text(TRAINER_SCRIPT)
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(script), str(out), kind]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def _assert_trained_and_partitioned(r0, r1, stage):
    assert r0["engine"] == "DeepSpeedEngine" and r0["steps"] == r1["steps"] == 2
    assert r0["policy_moved"] > 0 and all(map(__import__("math").isfinite, r0["losses"]))
    if stage == 3:  # each process holds half of the policy's weights
        assert 0.45 * r0["policy_full"] < r0["policy_local"] < 0.55 * r0["policy_full"]
    else:
        assert r0["policy_local"] == r0["policy_full"]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_safe_ppo_trainer_under_zero_trains_checkpoints_and_resumes(tmp_path, stage, tiny_debug_path):
    r0, r1 = _launch(tmp_path, "ppo", stage)
    _assert_trained_and_partitioned(r0, r1, stage)
    assert r0["critic_engine"] == "DeepSpeedEngine"
    # the critic's Adam moments are split over the 2 processes (ZeRO-2 and 3), its weights too under ZeRO-3
    assert 0.45 * r0["critic_full"] < r0["critic_adam_local"] < 0.55 * r0["critic_full"]
    assert (r0["critic_local"] < 0.55 * r0["critic_full"]) == (stage == 3)
    # checkpoint: policy (DeepSpeed's global_step2/ and, gathered, model.safetensors), critic/ (ordinary), critic_zero/
    # (every process's partition), nothing left half-written
    assert {"critic", "critic_zero", "critic_scheduler.pt", "global_step2", "model.safetensors"} <= set(r0["files"])
    assert "critic_optimizer.pt" not in r0["files"]  # the optimizer state lives in critic_zero/, partitioned
    assert sum("optim_states" in n for n in r0["critic_zero"]) == 2
    assert r0["temporaries"] == []
    assert r0["saved_critic_diff"] == 0.0
    from transformers import AutoModelForSequenceClassification  # loadable outside DeepSpeed, in full

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-2" / "critic")
    assert sum(p.numel() for p in loaded.parameters()) == r0["critic_full"]
    assert r0["restored_critic_diff"] == r1["restored_critic_diff"] == 0.0
    assert r0["restored_adam_diff"] == r1["restored_adam_diff"] == 0.0
    assert r0["resumed_steps"] == r1["resumed_steps"] == 3


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("kind,stage", [("grpo", 2), ("grpo", 3), ("dpo", 2), ("dpo", 3)])
def test_safe_grpo_and_dpo_train_under_zero(tmp_path, kind, stage, tiny_debug_path):
    r0, r1 = _launch(tmp_path, kind, stage)
    _assert_trained_and_partitioned(r0, r1, stage)


# ---------------------------------------------------------------------- a recipe's stages under deepspeed_zero*.yaml
@needs_deepspeed
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_recipe_stages_run_under_the_shipped_zero_configs(tmp_path, stage):
    # SFT -> PPO -> GRPO -> rejection sampling -> DPO -> eval, 1-2 steps each, through `trl-safeppo run`.
    # ACCELERATE_USE_CPU=0 keeps the runner from turning DeepSpeed off on a machine without a GPU (it sets
    # ACCELERATE_USE_CPU=1 there); ddp_backend: gloo as in the trainer tests above. ZeRO-3 hung before the runner
    # dropped the stage's DeepSpeed config ahead of the main process's held-out evaluation.
    import yaml

    (tmp_path / "parity_reward.py").write_text(
        "from trl_safeppo.rewards import reward_function\n@reward_function\n"
        "def parity(prompts, completions, **kwargs):\n"
        "    texts = [c[-1]['content'] if isinstance(c, list) else c for c in completions]\n"
        "    return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]\n")
    g = {"ddp_backend": "gloo", "logging_steps": 1}
    rl = {"path": "task://arithmetic/rl", "n": 16}
    stages = [
        {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 32},
         "args": {"max_steps": 1, "per_device_train_batch_size": 2, **g}},
        {"type": "ppo", "dataset": rl,
         "args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_completion_length": 8, "save_steps": 1, **g}},
        {"type": "grpo", "dataset": rl, "args": {"max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2,
                                                 "max_completion_length": 8, **g}},
        {"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 4},
         "args": {"num_completions": 4, "max_new_tokens": 8}},
        {"type": "dpo", "dataset": "previous", "args": {"max_steps": 1, "per_device_train_batch_size": 1, **g}},
        {"type": "eval"},
    ]
    out = tmp_path / "run"
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump({
        "name": f"zero{stage}", "model": "tiny://debug", "output_dir": str(out), "imports": ["parity_reward"],
        "reward": "parity_reward.parity", "self_test": False, "stages": stages,
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 8, "accuracy_reward": "math"},
    }))
    env = {**_env(), "ACCELERATE_USE_CPU": "0", "PYTHONPATH": os.pathsep.join([str(tmp_path), _env()["PYTHONPATH"]])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(_free_port()), "-m", "trl_safeppo", "run",
           str(tmp_path / "zero.yaml")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ppo = out / "stages" / "02-ppo"
    # DeepSpeed really ran: its checkpoint layout, the critic's engine checkpoint beside it
    assert (ppo / "checkpoint-2" / "global_step2").is_dir() and (ppo / "checkpoint-2" / "critic_zero").is_dir()
    partitions = sorted((ppo / "checkpoint-2" / "critic_zero" / "state").iterdir())
    assert sum("optim_states" in p.name for p in partitions) == 2  # one per process
    from transformers import AutoModelForCausalLM

    for stage in ("01-sft", "02-ppo", "03-grpo", "05-dpo"):  # every final/ is an ordinary checkpoint
        AutoModelForCausalLM.from_pretrained(out / "stages" / stage / "final")


# ---------------------------------------------------------------------- a rank dies in the middle of the critic's save
RANK_DEATH_SCRIPT = '''
import json, os, sys
import torch
from datasets import Dataset
from trl_safeppo.trainers.ppo_config import SafePPOConfig
from trl_safeppo.trainers.ppo_trainer import SafePPOTrainer

out, phase, step = sys.argv[1], sys.argv[2], int(sys.argv[3])

class TokenReward:
    __name__ = "token_reward"
    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [(len(ids) + sum(ids) % 5) / 8.0 for ids in completion_ids]

prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(32)]})
args = SafePPOConfig(output_dir=os.path.join(out, "run"), per_device_train_batch_size=2, logging_steps=1,
                     report_to=[], bf16=False, learning_rate=1e-3, ddp_backend="gloo", disable_tqdm=True, seed=0,
                     max_completion_length=6, max_steps=3, num_iterations=1, steps_per_generation=1,
                     gradient_accumulation_steps=1, save_strategy="steps", save_steps=1)
t = SafePPOTrainer(model="tiny://debug", reward_funcs=TokenReward(), args=args, train_dataset=prompts)
if phase == "die":
    # process 1 dies (os._exit: no cleanup) inside the critic engine's save_checkpoint at checkpoint-`step`, before
    # writing its partition, while process 0 writes its own and waits for it (zero.save_engine)
    save = t.critic.save_checkpoint
    def dying_save(*a, **k):
        if t.accelerator.process_index == 1 and t.state.global_step == step:
            os._exit(17)
        return save(*a, **k)
    t.critic.save_checkpoint = dying_save
    t.train()
else:
    t.train(resume_from_checkpoint=os.path.join(out, "run", f"checkpoint-{step}"))
with open(os.path.join(out, f"rank{t.accelerator.process_index}.json"), "w") as f:
    json.dump({"steps": t.state.global_step}, f)
'''


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_dying_in_the_zero2_critic_save_leaves_no_checkpoint_a_resume_would_trust(tmp_path, tiny_debug_path):
    from trl_safeppo.fileio import is_temporary
    from trl_safeppo.pipeline.checkpoints import (
        STATE_MARKER, checkpoint_problem, checkpoints, last_complete_checkpoint, set_aside_incomplete,
    )

    script, run = tmp_path / "rank_death.py", tmp_path / "run"
    script.write_text(RANK_DEATH_SCRIPT)

    def launch(phase: str, step: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(script), str(tmp_path),
               phase, str(step)]
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)

    # the job fails, it does not hang (process 0's wait for process 1 fails, the launcher tears the group down)
    died = launch("die", 2)
    assert died.returncode != 0 and "exitcode  : 17" in died.stderr, died.stderr[-4000:]
    assert not (tmp_path / "rank0.json").exists()
    second, first = run / "checkpoint-2", run / "checkpoint-1"
    # checkpoint-2: the Trainer's part (trainer_state.json, the policy's global_step2/) but no marker, no critic/,
    # and no critic_zero/: process 0's partition went into a temporary folder that is never renamed into place
    assert (second / "trainer_state.json").is_file() and (second / "global_step2").is_dir()
    assert not (second / STATE_MARKER).exists()
    assert not (second / "critic").exists() and not (second / "critic_zero").exists()
    assert checkpoint_problem(second, require=(STATE_MARKER,)) == (
        f"no {STATE_MARKER} (killed while the trainer added its own state)")
    assert checkpoint_problem(first, require=(STATE_MARKER,)) is None and (first / "critic_zero").is_dir()
    assert last_complete_checkpoint(run, require=(STATE_MARKER,)) == str(first)
    # a leftover of the atomic write (".tmp-*", if the kill came before its cleanup) is never a checkpoint
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2", "checkpoint-1"]
    assert all(is_temporary(p) for p in second.iterdir() if p.name.endswith("critic_zero"))

    (note,) = set_aside_incomplete(run, require=(STATE_MARKER,))
    assert note.startswith(f"checkpoint-2 is incomplete (no {STATE_MARKER}")
    resumed = launch("resume", 1)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert [json.loads((tmp_path / f"rank{i}.json").read_text())["steps"] for i in range(2)] == [3, 3]
    for step in (2, 3):
        assert checkpoint_problem(run / f"checkpoint-{step}", require=(STATE_MARKER,)) is None
