"""The README's main command, end to end: recipes/demo.yaml on tiny://arithmetic (slow tier: several minutes on 2
CPU cores). After the RL stages the held-out accuracy must be above the SFT starting point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_safeppo.pipeline.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_recipe(str(REPO / "recipes/demo.yaml"), [f"output_dir={out}"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "completed"
    assert all(s["status"] in ("completed", "stopped") for s in m["stages"])
    by_name = {s["name"]: s for s in m["stages"]}
    sft, grpo = by_name["sft"]["eval"]["accuracy"], by_name["grpo"]["eval"]["accuracy"]
    # "clearly above": at least 10 of the 100 held-out prompts more answered correctly after PPO + GRPO
    assert grpo >= sft + 0.10, (sft, grpo)
    assert (out / "report.md").exists()
    table = capsys.readouterr().out
    assert "held-out accuracy" in table and "07-final-eval" in table
