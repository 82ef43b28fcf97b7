"""Batch semantics under several processes (docs/recipes.md, "Scaling to several processes"): with
`scale_with_world_size: false` the args describe one process and pre-flight divides `per_device_train_batch_size`
by the world size, so the global batch and the steps stay those of one process; a batch that cannot be shared is
refused at pre-flight; with the default (`true`) the global batch grows and pre-flight says so."""

from __future__ import annotations

import pytest

from trl_safeppo.pipeline.preflight import batch_lines, preflight
from trl_safeppo.pipeline.recipe import RecipeError, recipe_from_dict


def recipe(**extra):
    tree = {
        "name": "ws",
        "model": "tiny://debug",
        "output_dir": "/tmp/unused",
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 40},
             "args": {"num_train_epochs": 2, "per_device_train_batch_size": 8}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
             "args": {"max_steps": 3, "per_device_train_batch_size": 8, "num_generations": 4}},
        ],
    }
    tree.update(extra)
    return recipe_from_dict(tree)


def test_fixed_global_batch_divides_the_per_device_batch():
    one = preflight(recipe(scale_with_world_size=False), world_size=1)
    two = preflight(recipe(scale_with_world_size=False), world_size=2)
    sft1, grpo1 = one.stages[0], one.stages[1]
    sft2, grpo2 = two.stages[0], two.stages[1]
    assert sft1.args["per_device_train_batch_size"] == 8 and sft2.args["per_device_train_batch_size"] == 4
    assert grpo2.args["per_device_train_batch_size"] == 4
    # global batch: 8 x 1 x 1 = 4 x 1 x 2 = 8 rows; SFT steps over 40 rows, 2 epochs:
    # one process: ceil(40 / 8) = 5 batches per epoch -> 10 steps; two: ceil(ceil(40 / 4) / 2) = 5 -> 10 steps
    assert (sft1.batch["global_batch"], sft1.batch["steps"]) == (8, 10)
    assert (sft2.batch["global_batch"], sft2.batch["steps"]) == (8, 10)
    # GRPO: 8 completions per optimizer step either way = 2 prompts x 4 generations, 3 steps
    assert (grpo2.batch["global_batch"], grpo2.batch["steps"], grpo2.batch["num_generations"]) == (8, 3, 4)
    lines = batch_lines(two)
    assert lines[0] == "sft: global batch 8 rows = 4 per device x 1 accumulation x 2 processes; 10 optimizer steps"
    assert lines[1] == ("grpo: global batch 8 completions = 4 per device x 1 accumulation x 2 processes "
                        "(2 prompts x 4); 3 optimizer steps")
    assert not any("warning" in line for line in lines)


def test_default_per_device_batch_grows_with_the_world_size_and_warns():
    plan = preflight(recipe(), world_size=2)
    sft = plan.stages[0]
    # per-device 8 kept: global 8 x 2 = 16; steps ceil(ceil(40 / 8) / 2) = 3 per epoch -> 6 (10 at one process)
    assert sft.args["per_device_train_batch_size"] == 8
    assert (sft.batch["global_batch"], sft.batch["steps"]) == (16, 6)
    line = batch_lines(plan)[0]
    assert line.startswith("sft: global batch 16 rows = 8 per device x 1 accumulation x 2 processes; 6 optimizer steps")
    assert "warning: 2 processes make the global batch 2x the one-process 8 and the epochs' steps fewer" in line
    assert "scale_with_world_size: false" in line
    assert "warning" in batch_lines(plan)[1] and "steps fewer" not in batch_lines(plan)[1]  # max_steps: same steps


def test_one_process_plan_has_no_warning():
    assert not any("warning" in line for line in batch_lines(preflight(recipe(), world_size=1)))


def test_a_batch_the_processes_cannot_share_is_refused_at_preflight():
    with pytest.raises(RecipeError) as info:
        preflight(recipe(scale_with_world_size=False), world_size=3)
    message = str(info.value)
    assert "\n" not in message
    assert "stages[0] (sft).args.per_device_train_batch_size" in message
    assert "per_device_train_batch_size=8" in message and "3 processes" in message
    assert "make it a multiple of 3" in message and "scale_with_world_size: true" in message


def test_a_stage_overrides_the_recipe_setting():
    tree = recipe(scale_with_world_size=False)
    tree.stages[1].scale_with_world_size = True  # GRPO keeps its per-device batch
    plan = preflight(tree, world_size=2)
    assert plan.stages[0].args["per_device_train_batch_size"] == 4
    assert plan.stages[1].args["per_device_train_batch_size"] == 8


@pytest.mark.parametrize("where,tree_update", [
    ("scale_with_world_size", {"scale_with_world_size": "no"}),
])
def test_scale_with_world_size_must_be_a_bool(where, tree_update):
    with pytest.raises(RecipeError, match=r"scale_with_world_size must be true or false, got str 'no'"):
        recipe(**tree_update)


def test_stage_scale_with_world_size_must_be_a_bool():
    tree = {"name": "x", "model": "tiny://debug", "output_dir": "/tmp/u",
            "stages": [{"type": "sft", "dataset": "task://arithmetic/sft", "scale_with_world_size": 2}]}
    with pytest.raises(RecipeError, match=r"stages\[0\] \(sft\)\.scale_with_world_size: scale_with_world_size must "):
        recipe_from_dict(tree)


def test_the_demo_keeps_its_one_process_batches():
    from pathlib import Path

    from trl_safeppo.pipeline.recipe import load_recipe

    demo = load_recipe(Path(__file__).resolve().parents[2] / "recipes/demo.yaml")
    assert demo.scale_with_world_size is False
    one, two = (preflight(demo, check_hardware=False, world_size=n) for n in (1, 2))
    for a, b in zip(one.stages, two.stages):
        if a.batch is not None:
            assert (a.batch["global_batch"], a.batch["steps"]) == (b.batch["global_batch"], b.batch["steps"]), a.where
            assert b.args["per_device_train_batch_size"] * 2 == a.args["per_device_train_batch_size"]
