"""Pre-flight refuses a `rollback` tripwire that the launch cannot honour (DeepSpeed, any ZeRO stage, or FSDP1: no
process holds the whole trained state, so there is no snapshot to roll back to), naming the stage and the tripwire,
before any stage runs; the launch is read from the environment `accelerate launch` sets, as the trainer reads it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_safeppo.pipeline import preflight as preflight_mod
from trl_safeppo.pipeline.preflight import preflight
from trl_safeppo.pipeline.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_CPU", "LOCAL_RANK",
              "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")
DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true"}  # what `accelerate launch --config_file deepspeed_zero*.yaml` sets
ROLLBACK = {"detector": "kl_limit", "action": "rollback", "params": {"limit": 10.0}}
STOP = {"detector": "non_finite", "action": "stop"}


@pytest.fixture
def launch(monkeypatch):
    """Start from a plain `python` launch (none of accelerate's launch variables); returns a setter for them. Each
    variable is restored after the test, also when the runner set it (setenv first records the original value)."""
    for name in LAUNCH_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield lambda env: [monkeypatch.setenv(k, v) for k, v in env.items()]
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a config built under ACCELERATE_USE_DEEPSPEED registers its DeepSpeed config


def micro(grpo_extra=None, **extra):
    grpo = {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
            "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4}, **(grpo_extra or {})}
    tree = {
        "name": "micro", "model": "tiny://debug", "output_dir": "/tmp/unused",
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 16}, "args": {"max_steps": 1}},
            grpo,
            {"type": "eval", "dataset": {"path": "task://arithmetic/eval", "n": 4}},
        ],
    }
    tree.update(extra)
    return tree


def refused(tree, *, where: str) -> str:
    with pytest.raises(RecipeError) as info:
        preflight(recipe_from_dict(tree, source="r.yaml"), check_hardware=False)
    assert info.value.where == where, str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Under a DeepSpeed launch
def test_a_stage_rollback_tripwire_is_refused_under_deepspeed_naming_stage_and_tripwire(launch):
    launch(DEEPSPEED)
    # the stage's own list: [stop, rollback] -> the first rollback is index 1 of stages[1] (the grpo stage)
    message = refused(micro({"tripwires": [STOP, ROLLBACK]}), where="stages[1] (grpo).tripwires[1]")
    assert message.startswith("r.yaml: stages[1] (grpo).tripwires[1]: action 'rollback' (kl_limit) cannot run: "
                              "this stage trains under DeepSpeed (the launch's ACCELERATE_USE_DEEPSPEED)")
    assert "DeepSpeed (any ZeRO stage) and FSDP1 keep partitioned across processes" in message
    fix = message.split(". Fix: ")[1]
    assert "'raise_kl' or 'stop'" in fix and "`stages.grpo.tripwires.1.action=stop`" in fix and "FSDP2" in fix


def test_a_rollback_in_the_recipe_rails_block_is_refused_naming_the_stage(launch):
    launch(DEEPSPEED)
    # the stage has no tripwires of its own, so the trainer takes the merged rails' list: the recipe's [rollback]
    message = refused(micro(rails={"tripwires": [ROLLBACK]}), where="stages[1] (grpo).rails.tripwires[0]")
    assert "action 'rollback' (kl_limit, from the recipe's `rails:` block) cannot run" in message
    assert "`rails.tripwires.0.action=stop`" in message  # the override that fixes every stage inheriting it


def test_a_rollback_in_the_stage_rails_block_is_refused(launch):
    launch(DEEPSPEED)
    # the stage's rails replace the recipe's tripwire list (deep_merge replaces lists): [stop, rollback] -> index 1
    tree = micro({"rails": {"tripwires": [STOP, ROLLBACK]}}, rails={"tripwires": [STOP]})
    message = refused(tree, where="stages[1] (grpo).rails.tripwires[1]")
    assert "from the recipe's" not in message and "`stages.grpo.rails.tripwires.1.action=stop`" in message


def test_a_rollback_in_the_args_is_refused_under_the_args_path(launch):
    launch(DEEPSPEED)
    tree = micro()
    tree["stages"][1]["args"]["tripwires"] = [ROLLBACK]
    message = refused(tree, where="stages[1] (grpo).args.tripwires[0]")
    assert "`stages.grpo.args.tripwires.0.action=stop`" in message


def test_the_stage_tripwires_replace_the_rails_ones_as_in_the_trainer(launch):
    launch(DEEPSPEED)
    # add_tripwires: the config's `tripwires` when set, else the rails'. The stage's [stop] hides the recipe's rollback
    plan = preflight(recipe_from_dict(micro({"tripwires": [STOP]}, rails={"tripwires": [ROLLBACK]})),
                     check_hardware=False)
    assert plan.stages[1].args["tripwires"] == [STOP]


@pytest.mark.parametrize("action", ["raise_kl", "stop", "warn"])
def test_other_actions_pass_under_deepspeed(launch, action):
    launch(DEEPSPEED)
    tree = micro({"tripwires": [{**ROLLBACK, "action": action}]}, rails={"tripwires": [{**ROLLBACK, "action": action}]})
    plan = preflight(recipe_from_dict(tree), check_hardware=False)
    assert [t["action"] for t in plan.stages[1].args["tripwires"]] == [action]


def test_ppo_and_dpo_stages_are_checked_too(launch):
    launch(DEEPSPEED)
    ppo = {"type": "ppo", "dataset": {"path": "task://arithmetic/rl", "n": 8}, "tripwires": [ROLLBACK],
           "args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_completion_length": 8}}
    tree = micro()
    tree["stages"] = [ppo]
    refused(tree, where="stages[0] (ppo).tripwires[0]")
    tree["stages"] = [
        {"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 4},
         "args": {"num_completions": 4, "max_new_tokens": 8}},
        {"type": "dpo", "dataset": "previous", "tripwires": [STOP, ROLLBACK], "args": {"max_steps": 1}},
    ]
    refused(tree, where="stages[1] (dpo).tripwires[1]")


def test_the_shipped_gsm8k_recipe_is_refused_under_deepspeed(launch):
    # recipes/gsm8k.yaml's rails block: [non_finite -> stop, kl_limit -> rollback]; its first stage (grpo) inherits it
    launch(DEEPSPEED)
    with pytest.raises(RecipeError) as info:
        preflight(load_recipe(REPO / "recipes" / "gsm8k.yaml"), check_hardware=False)
    assert info.value.where == "stages[0] (grpo).rails.tripwires[1]", str(info.value)
    preflight(load_recipe(REPO / "recipes" / "gsm8k.yaml", ["rails.tripwires.1.action=stop"]), check_hardware=False)


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_the_command_in_the_deepspeed_configs_header_passes_preflight(launch, name):
    import shlex

    launch(DEEPSPEED)
    header = "\n".join(line[1:] for line in (REPO / "recipes" / "accelerate" / name).read_text().splitlines()
                       if line.startswith("#"))
    command = header.replace("\\\n", " ").split("accelerate launch", 1)[1].split("\n")[0].split("#")[0]
    words = shlex.split(command)
    recipe = words[words.index("run") + 1]
    overrides = words[words.index("run") + 2:]
    assert recipe == "recipes/gsm8k.yaml" and overrides == ["rails.tripwires.1.action=stop"]
    preflight(load_recipe(REPO / recipe, overrides), check_hardware=False)


# ---------------------------------------------------------------------------------------------------------------
# Launches where a rollback works, or where accelerate turns DeepSpeed / FSDP off
def test_the_same_recipe_passes_without_deepspeed(launch):
    plan = preflight(recipe_from_dict(micro({"tripwires": [ROLLBACK]}, rails={"tripwires": [ROLLBACK]})),
                     check_hardware=False)
    assert [t["action"] for t in plan.stages[1].args["tripwires"]] == ["rollback"]


def test_accelerate_use_cpu_turns_deepspeed_off_so_a_rollback_passes(launch):
    # accelerate's state with ACCELERATE_USE_CPU=1 is a CPU one: no DeepSpeed engine, snapshots work
    launch({**DEEPSPEED, "ACCELERATE_USE_CPU": "1"})
    plan = preflight(recipe_from_dict(micro({"tripwires": [ROLLBACK]})), check_hardware=False)
    assert [t["action"] for t in plan.stages[1].args["tripwires"]] == ["rollback"]


def test_the_runner_decides_cpu_before_preflight_as_the_trainer_will_see_it(launch, monkeypatch, tmp_path):
    import torch

    from trl_safeppo.pipeline import runner

    # 2 launched processes on a machine without a GPU: the runner sets ACCELERATE_USE_CPU=1 before pre-flight
    # (runner._cpu_processes_use_gloo), so pre-flight, like the trainers after it, sees no DeepSpeed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launch({**DEEPSPEED, "WORLD_SIZE": "2"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**micro({"tripwires": [ROLLBACK]}), "output_dir": str(tmp_path / "run")}))
    seen = {}

    class Reached(Exception):
        pass

    def spy(recipe, **kwargs):  # the environment pre-flight runs in, then stop (one process forms no gloo group)
        seen.update(cpu=os.environ.get("ACCELERATE_USE_CPU"), recipe=recipe, **kwargs)
        raise Reached

    monkeypatch.setattr(runner, "preflight", spy)
    with pytest.raises(Reached):
        runner.run_recipe(str(path), check=True)
    assert seen["cpu"] == "1"
    monkeypatch.delenv("WORLD_SIZE")  # the configs built here must not wait for a second process
    preflight(seen["recipe"], check_hardware=False, world_size=2)  # passes: the rollback will work
    # ACCELERATE_USE_CPU=0 keeps DeepSpeed on without a GPU (tests/trainers/test_deepspeed.py runs it so): refused
    launch({"ACCELERATE_USE_CPU": "0", "WORLD_SIZE": "2"})
    seen.clear()
    with pytest.raises(Reached):
        runner.run_recipe(str(path), check=True)
    assert seen["cpu"] == "0"
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RecipeError, match=r"r\.yaml: stages\[1\] \(grpo\)\.tripwires\[0\]: .* under DeepSpeed"):
        preflight(seen["recipe"], check_hardware=False, world_size=2)


def test_fsdp1_refuses_a_rollback_fsdp2_does_not(launch, monkeypatch):
    # accelerate turns FSDP on only in launched processes (LOCAL_RANK) on a GPU-type device: stand in for one (a
    # real LOCAL_RANK would make the configs built here join a process group)
    monkeypatch.setattr(preflight_mod, "_launched_on_device", lambda: True)
    tree = micro({"tripwires": [ROLLBACK]})
    launch({"ACCELERATE_USE_FSDP": "true"})  # FSDP_VERSION unset: accelerate's default, 1
    message = refused(tree, where="stages[1] (grpo).tripwires[0]")
    assert "trains under FSDP1 (the launch's ACCELERATE_USE_FSDP with FSDP_VERSION=1)" in message
    launch({"FSDP_VERSION": "2"})  # recipes/accelerate/fsdp2.yaml
    preflight(recipe_from_dict(tree), check_hardware=False)
    launch({"FSDP_VERSION": "1", "ACCELERATE_USE_CPU": "1"})  # no GPU: the runner's CPU processes run no FSDP
    preflight(recipe_from_dict(tree), check_hardware=False)


def test_fsdp_without_a_device_is_not_fsdp(launch, monkeypatch):
    import torch

    if torch.accelerator.is_available():
        pytest.skip("this machine has a GPU-type device")
    monkeypatch.setenv("LOCAL_RANK", "0")  # a launched process, but no device: accelerate's state has no FSDP
    assert not preflight_mod._launched_on_device()
    monkeypatch.delenv("LOCAL_RANK")
    launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    preflight(recipe_from_dict(micro({"tripwires": [ROLLBACK]})), check_hardware=False)


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight's answer is the trainer's: a real SafeGRPOTrainer built under each launch environment
AGREE_SCRIPT = r'''
import json, sys
from datasets import Dataset
from trl_safeppo.models import resolve_model_path
from trl_safeppo.pipeline.preflight import snapshotless_launch
from trl_safeppo.trainers.grpo_config import SafeGRPOConfig
from trl_safeppo.trainers.grpo_trainer import SafeGRPOTrainer

args = SafeGRPOConfig(output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=4, max_steps=1,
                      max_completion_length=8, report_to="none", bf16=False, use_cpu=sys.argv[2] == "use_cpu",
                      tripwires=[{"detector": "kl_limit", "action": "rollback", "params": {"limit": 10.0}}])
predicted = snapshotless_launch(args)
prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(8)]})
try:
    SafeGRPOTrainer(model=resolve_model_path("tiny://debug"), args=args, train_dataset=prompts,
                    reward_funcs=lambda completions, **kw: [0.0] * len(completions))
    refused = False
except ValueError as err:
    refused = "action='rollback'" in str(err)
print("RESULT " + json.dumps({"predicted": predicted, "refused": refused}))
'''


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("env,flag,expected", [
    ({}, "", None),
    (DEEPSPEED, "", "DeepSpeed"),
    ({**DEEPSPEED, "ACCELERATE_USE_CPU": "1"}, "", None),  # the runner's CPU processes
    (DEEPSPEED, "use_cpu", "DeepSpeed"),  # the stage's use_cpu does not turn DeepSpeed off (accelerate gets no cpu)
], ids=["plain", "deepspeed", "deepspeed+ACCELERATE_USE_CPU", "deepspeed+use_cpu"])
def test_preflight_agrees_with_the_trainer(tmp_path, env, flag, expected):
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    run_env = {**clean, **env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", AGREE_SCRIPT, str(tmp_path), flag], env=run_env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    # the trainer refuses the rollback exactly where pre-flight names DeepSpeed / FSDP1
    assert result == {"predicted": expected, "refused": expected is not None}
