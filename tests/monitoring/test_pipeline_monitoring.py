"""Monitoring through the real recipe runner on tiny://debug: a plateau gate ends a stage early (and the run goes
on), an impossible accuracy threshold stops the pipeline with the reason, the report has every plot and the probe
table, and `trl-safeppo report` rebuilds the same report."""

from __future__ import annotations

import json
import re

import yaml

from trl_safeppo.cli import main
from trl_safeppo.pipeline.runner import run_recipe


def test_plateau_and_failing_gate_through_the_runner(tmp_path):
    out = tmp_path / "run"
    sft_data = {"path": "task://arithmetic/sft", "n": 8}
    tree = {
        "name": "gates",
        "model": "tiny://debug",
        "output_dir": str(out),
        "reward": [{"name": "format", "weight": 0.5}, {"name": "math"}],
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 6},
        "probes": ["What is 1 + 1?", "Write a poem about the sea."],
        "stages": [
            # The 8 examples make one batch, so every step sees the same batch; with learning rate 0 the loss is the
            # same at every step: the fitted fall over 3 logs is 0 < 0.001 and the stage ends at step 3 of 20.
            {"type": "sft", "name": "flat", "dataset": sft_data,
             "args": {"max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 0.0, "logging_steps": 1,
                      "save_steps": 100},
             "gate": {"plateau_window": 3, "plateau_min_gain": 0.001, "plateau_metric": "loss",
                      "plateau_mode": "min"}},
            # Accuracy can never reach 1.01: this gate must fail and stop the run here.
            {"type": "sft", "name": "impossible", "dataset": sft_data,
             "args": {"max_steps": 1, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 100},
             "gate": {"min_metrics": {"accuracy": 1.01}}},
            {"type": "eval"},
        ],
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert run_recipe(str(recipe)) == 1

    manifest = json.loads((out / "manifest.json").read_text())
    flat, impossible, final_eval = manifest["stages"]
    assert flat["status"] == "stopped"  # ended early by the plateau: a success, the run went on
    history = [json.loads(line) for line in (out / "stages/01-flat/log_history.jsonl").read_text().splitlines()]
    assert max(h["step"] for h in history) == 3
    plateau = next(g for g in flat["gates"] if g["gate"] == "plateau")
    assert plateau["passed"] and "stopped early at step 3" in plateau["reason"]

    assert impossible["status"] == "gated" and final_eval["status"] == "pending"
    failed = [g for g in impossible["gates"] if not g["passed"]]
    assert [g["gate"] for g in failed] == ["min:accuracy"]
    accuracy = impossible["eval"]["accuracy"]
    assert failed[0]["reason"] == f"accuracy = {accuracy:.4g} < 1.01"
    assert (out / "stages/01-flat/final/config.json").exists()  # the last good policy is kept

    md = (out / "report.md").read_text()
    assert "- **Status:** stopped at stage 02-impossible (a gate failed)" in md
    assert f"| 02-impossible | min:accuracy | ❌ FAIL | accuracy = {accuracy:.4g} < 1.01 |" in md
    for png in ("01-flat", "02-impossible", "heldout"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG" and f"(plots/{png}.png)" in md
    assert "| probe | 01-flat | 02-impossible |" in md
    assert "| What is 1 + 1? |" in md and "| Write a poem about the sea. |" in md

    def stable(text):
        return re.sub(r"- \*\*Report written:\*\* .*\n", "", text)

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert stable((out / "report.md").read_text()) == stable(md)
