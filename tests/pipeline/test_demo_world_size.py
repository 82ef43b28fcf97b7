"""The same recipe on 1 and 2 processes (slow tier; docs/recipes.md, "Scaling to several processes").

With `scale_with_world_size: false` the runner divides each stage's per-device batch by the number of processes, so
two processes run the optimisation of one: the same global batch, steps and learning-rate schedule, each process
carrying half of every batch. Two checks:

- the SFT loss curve of a short copy of the demo's SFT stage (60 steps) is the one-process curve: the processes
  differ only in the order of floating-point reductions, so the curves agree closely (measured on the whole demo:
  5.403 / 2.908 / 1.538 / 1.05 / 0.962 at steps 20-100 on one process, 5.403 / 2.908 / 1.538 / 1.05 / 0.961 on two);
- the whole demo (recipes/demo.yaml, as shipped) reaches a final held-out accuracy within 0.05 of one process, as
  the README's multi-process line promises. This one needs a demo whose result does not swing with float noise
  (issue 22): measured on the demo of 9860923, one process 0.317 and two 0.903 after SFT warm starts of 0.16 and
  0.84, whose loss curves had matched to 3 digits for 100 steps and then parted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DDP = str(REPO / "recipes/accelerate/ddp.yaml")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP,
          "--main_process_port", "0"]  # the README's multi-process line (2 processes)


def run(recipe: str, out: Path, *, processes: int, overrides=()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = LAUNCH if processes == 2 else [sys.executable]
    cmd = [*launcher, "-m", "trl_safeppo", "run", recipe, f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "manifest.json").read_text())


def sft_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "stages/01-sft/log_history.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    demo = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    sft = demo["stages"][0]
    assert sft["type"] == "sft" and demo["scale_with_world_size"] is False
    short = {k: demo[k] for k in ("name", "model", "seed", "scale_with_world_size")}
    short["output_dir"] = "unused"
    short["stages"] = [{**sft, "dataset": {"path": "task://arithmetic/sft", "n": 1920},
                        "args": {**sft["args"], "num_train_epochs": 1, "logging_steps": 10, "save_steps": 1000,
                                 # the demo decays over its last 150 of 723 steps; 60 steps here: a constant rate
                                 "lr_scheduler_type": "constant_with_warmup", "lr_scheduler_kwargs": {}}}]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(short))
    run(str(path), tmp_path / "one", processes=1)
    run(str(path), tmp_path / "two", processes=2)
    one, two = sft_losses(tmp_path / "one"), sft_losses(tmp_path / "two")
    # 1920 rows / a global batch of 32 = 60 steps on either (2 x 16 per step on two processes), logged every 10
    assert sorted(one) == sorted(two) == [10, 20, 30, 40, 50, 60]
    for step in one:
        assert abs(one[step] - two[step]) <= 0.02 * one[step], (step, one[step], two[step])
    assert one[60] < 0.5 * one[10]  # it trained: the loss fell (5.4 -> about 1 on the demo's curve)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_demo_on_two_processes_matches_one_process(tmp_path):
    demo = str(REPO / "recipes/demo.yaml")
    one = run(demo, tmp_path / "one", processes=1)
    two = run(demo, tmp_path / "two", processes=2)
    trained = [s["launch"]["num_processes"] for s in two["stages"] if s.get("launch")]
    assert trained and set(trained) == {2}  # the trainers really ran on two processes
    final = {m: next(s for s in r["stages"] if s["type"] == "eval")["eval"]["accuracy"] for m, r in
             (("one", one), ("two", two))}
    assert abs(final["one"] - final["two"]) <= 0.05, final
