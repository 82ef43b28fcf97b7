"""The shipped demo recipe, shrunk to a few steps per stage, end to end: its report has every figure, the probe
table across all training stages, the sampling summary, and `trl-safeppo report` rebuilds it identically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from trl_safeppo.cli import main
from trl_safeppo.pipeline.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]

SHRINK = [
    "data.sft={path: task://arithmetic/sft, n: 64}", "stages.0.args.num_train_epochs=1",
    "stages.0.args.per_device_train_batch_size=16", "stages.1.args.max_steps=2",
    "stages.2.args.max_steps=2", "stages.3.dataset.n=16",
    # keep every sample: a policy this short-trained rarely passes, and the later SFT and DPO stages need data
    "stages.3.args.selection=threshold", "stages.3.args.score_threshold=-1.0",
    "stages.5.args.max_steps=2", "eval.dataset.n=8", "stages.6.dataset.n=8",
]


@pytest.mark.slow
def test_demo_recipe_report(tmp_path):
    out = tmp_path / "demo"
    assert run_recipe(str(REPO / "recipes" / "demo.yaml"), [f"output_dir={out}", *SHRINK]) == 0
    recipe = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    md = (out / "report.md").read_text()

    labels = [p.name for p in sorted((out / "stages").iterdir())]
    training = [label for label in labels if not label.endswith(("rejection_sampling", "eval"))]
    for name in ["overview", "heldout", *training]:
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"(plots/{name}.png)" in md
    assert f"| probe | {' | '.join(training)} |" in md  # stage columns
    probes = recipe["probes"]["prompts"] if isinstance(recipe["probes"], dict) else recipe["probes"]
    assert probes
    for probe in probes:  # probe rows
        assert f"| {probe} |" in md
    assert "Sampling:" in md and "- **Status:** completed" in md

    def stable(text):
        return re.sub(r"- \*\*Report written:\*\* .*\n", "", text)

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert stable((out / "report.md").read_text()) == stable(md)
