"""A short recipe (SFT -> PPO -> GRPO -> rejection sampling -> SFT on its samples -> DPO on its pairs -> eval;
tiny://debug, 1-2 steps each) launched with the shipped recipes/accelerate/fsdp2.yaml on 2 CPU processes, every
trainer stage really sharded by accelerate's FSDP2 path (issue 20.1: the shipped configs launch the recipe's stages).

accelerate refuses FSDP without a GPU (MULTI_CPU, the FSDP environment ignored: see test_distributed.py's
test_fsdp2_config_runs_two_processes); tests/pipeline/_fsdp2_run.py applies the test harness
tests/trainers/_fsdp2_cpu.py (that one choice patched) and then runs `trl-safeppo run` unchanged."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.trainers._fsdp2_cpu import REPO, launch

PARITY = (
    "from trl_safeppo.rewards import reward_function\n"
    "@reward_function\n"
    "def parity(prompts, completions, **kwargs):\n"
    "    texts = [c[-1]['content'] if isinstance(c, list) else c for c in completions]\n"
    "    return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]\n"
)
STEP_ARGS = {"logging_steps": 1, "save_steps": 1}


def recipe(out) -> dict:
    return {
        "name": "fsdp2", "model": "tiny://debug", "output_dir": str(out), "imports": ["parity_reward"],
        "reward": "parity_reward.parity", "self_test": False,
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 8, "accuracy_reward": "math"},
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 32},
             "args": {"max_steps": 2, "per_device_train_batch_size": 4, **STEP_ARGS}},
            {"type": "ppo", "dataset": {"path": "task://arithmetic/rl", "n": 16},
             "args": {"max_steps": 2, "per_device_train_batch_size": 2, "max_completion_length": 8, "beta": 0.05,
                      **STEP_ARGS}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 16},
             "args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                      "max_completion_length": 8, **STEP_ARGS}},
            {"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 4},
             "args": {"num_completions": 4, "max_new_tokens": 8}},
            {"type": "sft", "name": "sft-rs", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1}},
            {"type": "dpo", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 1, "logging_steps": 1}},
            {"type": "eval"},
        ],
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_stages_run_sharded_under_the_shipped_fsdp2_config(tmp_path, tiny_debug_path):
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "run"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe(out)))
    (tmp_path / "parity_reward.py").write_text(PARITY)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = launch([REPO / "tests" / "pipeline" / "_fsdp2_run.py", tmp_path / "recipe.yaml"], env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["completed"] * 7
    trainers = ["01-sft", "02-ppo", "03-grpo", "05-sft-rs", "06-dpo"]
    for i in (0, 1, 2, 4, 5):  # the trainers ran sharded on both processes (the manifest reads accelerate's state)
        assert m["stages"][i]["launch"] == {"num_processes": 2, "distributed_type": "FSDP"}

    # every trainer stage's final/ is an ordinary full checkpoint (gathered from the shards), each stage moved the
    # weights it was handed (the previous stage's final/)
    previous = AutoModelForCausalLM.from_pretrained(tiny_debug_path).state_dict()
    for name in trainers:
        model, info = AutoModelForCausalLM.from_pretrained(out / "stages" / name / "final", output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (name, info)
        state = model.state_dict()
        moved = max(float((state[k] - previous[k]).abs().max()) for k in state)
        assert moved > 0, name
        previous = state
    # PPO's checkpoints hold the full critic as an ordinary sequence-classification checkpoint, and its optimizer
    critic = out / "stages" / "02-ppo" / "checkpoint-2"
    _, info = AutoModelForSequenceClassification.from_pretrained(critic / "critic", num_labels=1,
                                                                 output_loading_info=True)
    assert not info["missing_keys"]
    optimizer = torch.load(critic / "critic_optimizer.pt", weights_only=False)
    assert all(type(s["exp_avg"]) is torch.Tensor for s in optimizer["state"].values())
