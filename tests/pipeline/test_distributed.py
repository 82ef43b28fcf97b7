"""The same short recipe (SFT, GRPO, rejection sampling, SFT on its samples, DPO on its pairs, eval; tiny://debug,
1-2 steps each) under `accelerate launch` with 2 CPU processes (gloo): it completes, the trainers really ran with 2
processes, only the main process wrote the run directory, and the artifacts have the same layout as a
single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PARITY = (
    "from trl_safeppo.rewards import reward_function\n"
    "@reward_function\n"
    "def parity(prompts, completions, **kwargs):\n"
    "    texts = [c[-1]['content'] if isinstance(c, list) else c for c in completions]\n"
    "    return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]\n"
)


def recipe(out: Path) -> dict:
    return {
        "name": "dist",
        "model": "tiny://debug",
        "output_dir": str(out),
        "imports": ["parity_reward"],
        "reward": "parity_reward.parity",  # passes about half of a random model's completions: samples and pairs
        "self_test": False,
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 8, "accuracy_reward": "math"},
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 32},
             "args": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 1}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 16},
             # the KL measured before each update is reduced over the processes (checked on the first beta below)
             "rails": {"kl": {"controller": "adaptive", "init_kl_coef": 0.05, "target": 0.01, "horizon": 8,
                              "min_coef": 0.001, "measure_before_update": True}},
             "args": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4,
                      "max_completion_length": 8, "logging_steps": 1, "save_steps": 1}},
            {"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 4},
             "args": {"num_completions": 4, "max_new_tokens": 8}},
            {"type": "sft", "name": "sft-rs", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1}},
            {"type": "dpo", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 1, "logging_steps": 1}},
            {"type": "eval"},
        ],
    }


def layout(run_dir: Path) -> set[str]:
    """Relative paths of the run directory, checkpoints left out (they hold one RNG file per process)."""
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
            if not any(part.startswith("checkpoint-") for part in p.relative_to(run_dir).parts)}


def launch(tmp_path: Path, name: str, launcher: list[str]) -> Path:
    out = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(out)))
    (tmp_path / "parity_reward.py").write_text(PARITY)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [*launcher, "-m", "trl_safeppo", "run", str(path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_single_process_layout(tmp_path):
    single = launch(tmp_path, "single", [sys.executable])
    multi = launch(tmp_path, "multi", [*ACCELERATE, "--multi_gpu", "--num_processes", "2"])
    m = json.loads((multi / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["completed"] * 6
    for i in (0, 1, 3, 4):  # trainer stages; the runner sets ACCELERATE_USE_CPU so the processes form one gloo group
        assert m["stages"][i]["launch"] == {"num_processes": 2, "distributed_type": "MULTI_CPU"}
    # only the main process appended to the log: steps 1, 2 and the summary, once each
    steps = [json.loads(line)["step"] for line in (multi / "stages/01-sft/log_history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]
    assert layout(single) == layout(multi)
    # GRPO's first beta, set from the KL of its own batch: KL = 0 (policy == reference) -> e = clip(0 / 0.01 - 1,
    # -0.2, 0.2) = -0.2; beta = 0.05 * (1 - 0.2 * n / 8) with n the completions of all processes:
    # one process, n = 4: 0.045; two processes, n = 2 x 4 = 8: 0.04 (0.045 would mean a per-process count)
    for run, expected in ((single, 0.045), (multi, 0.04)):
        grpo = [json.loads(line) for line in (run / "stages/02-grpo/log_history.jsonl").read_text().splitlines()]
        assert grpo[0]["kl"] == 0.0 and grpo[0]["beta"] == pytest.approx(expected)
    s = json.loads((single / "manifest.json").read_text())
    assert [s["stages"][i]["launch"]["num_processes"] for i in (0, 1, 3, 4)] == [1, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_config_runs_two_processes(tmp_path):
    # accelerate 1.15 turns FSDP on only for GPU-type backends; on CPU the FSDP2 config runs as 2-process gloo data
    # parallel (MULTI_CPU). This checks that the shipped config launches the whole recipe; on GPUs the manifest
    # records distributed_type FSDP.
    config = REPO / "recipes/accelerate/fsdp2.yaml"
    out = launch(tmp_path, "fsdp2", [*ACCELERATE, "--config_file", str(config), "--num_processes", "2"])
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["completed"] * 6
    assert {m["stages"][i]["launch"]["num_processes"] for i in (0, 1, 3, 4)} == {2}
    assert (out / "stages/02-grpo/final/config.json").exists()
