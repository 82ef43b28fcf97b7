"""The "when to switch from PPO to DPO" rule (gates.PlateauCallback) working in a recipe: a PPO stage whose reward
cannot improve ends early on the plateau, the run goes on, and the report says so."""

from __future__ import annotations

import json

import yaml

from trl_safeppo.pipeline.runner import run_recipe


def test_ppo_stage_ends_early_on_a_reward_plateau_and_the_report_says_so(tmp_path):
    out = tmp_path / "run"
    tree = {
        "name": "ppo-plateau",
        "model": "tiny://debug",
        "output_dir": str(out),
        # a reward that plateaus by construction: the pattern matches every completion, so every rollout's reward
        # is exactly 1.0 (and a self-test, which needs a wrong answer to fail, cannot hold)
        "reward": {"name": "regex", "pattern": "(?s).*"},
        "self_test": False,
        "stages": [
            # one rollout per optimizer step (steps_per_generation 1, num_iterations 1), a log per step: the reward
            # series is 1.0, 1.0, 1.0 -> fitted gain over the window of 3 logs is 0 < 0.01: stop at step 3 of 20
            {"type": "ppo", "dataset": {"path": "task://arithmetic/rl", "n": 16},
             "args": {"max_steps": 20, "per_device_train_batch_size": 4, "steps_per_generation": 1,
                      "num_iterations": 1, "max_completion_length": 6, "logging_steps": 1, "save_steps": 100},
             "gate": {"plateau_window": 3, "plateau_min_gain": 0.01}},
            {"type": "sft", "name": "next", "dataset": {"path": "task://arithmetic/sft", "n": 4},
             "args": {"max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 100}},
        ],
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert run_recipe(str(recipe)) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    ppo, after = manifest["stages"]
    assert ppo["status"] == "stopped" and after["status"] == "completed"  # a success: the run went on
    history = [json.loads(line) for line in (out / "stages/01-ppo/log_history.jsonl").read_text().splitlines()]
    assert [h["reward"] for h in history if "reward" in h] == [1.0, 1.0, 1.0]
    assert max(h["step"] for h in history) == 3
    plateau = next(g for g in ppo["gates"] if g["gate"] == "plateau")
    reason = "reward gain over the last 3 logs was 0 < 0.01: stopped early at step 3"
    assert plateau["passed"] and plateau["reason"] == reason
    assert after["inputs"]["model"]["path"] == ppo["outputs"]["final"]["path"]  # the stopped stage's model goes on

    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 1 | ppo | ppo | stopped |"))
    assert row.endswith(f"| ended early on a plateau: {reason} |")
    # 1-sample PPO: GRPO's frac_reward_zero_std is 1 by construction; the report leaves it out and says why
    assert ppo["metrics"]["frac_reward_zero_std"] == 1.0
    assert "| frac\\_reward\\_zero\\_std |" not in md
    assert "Not shown: `frac_reward_zero_std` (PPO samples one completion per prompt" in md
