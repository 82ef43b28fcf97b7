"""benchmarks/gpu_check.sh and gpu_check.py: the argument handling and the plan (no GPU here), and one CPU smoke run
through the shell script with a carried wheel installed the way the H200 run installs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_default_plan_on_a_gpu_is_the_five_cases_of_the_issue(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args(["--device", "cuda"])
    assert args.cases == ["ppo_bf16", "ppo_fsdp2_bf16", "ppo_fp16", "grpo_bf16", "dpo_bf16"]
    assert args.model_size == "0.5b" and args.steps == 3 and args.out is None and args.budget_seconds == 480
    plan = {c["case"]: c for c in gpu_check.plan(args)}
    assert plan["ppo_fsdp2_bf16"]["launcher"] == "fsdp2" and plan["ppo_fp16"]["precision"] == "fp16"
    fsdp = gpu_check.command(plan["ppo_fsdp2_bf16"])
    assert fsdp[1:3] == ["-m", "accelerate.commands.launch"] and "--num_processes" in fsdp
    assert fsdp[fsdp.index("--num_processes") + 1] == "1" and fsdp[-2] == "benchmarks._gpu_check_worker"
    assert gpu_check.command(plan["dpo_bf16"])[1:3] == ["-m", "benchmarks._gpu_check_worker"]


def test_out_defaults_to_the_device_out_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.parse_args(["--device", "cuda"]).out == str(tmp_path / "gpu_check.json")
    assert gpu_check.parse_args(["--device", "cuda", "--out", "x.json"]).out == "x.json"


def test_cpu_defaults_to_the_fp32_smoke_cases():
    args = gpu_check.parse_args(["--device", "cpu", "--only", "ppo_fp32, dpo_fp32"])
    assert args.cases == ["ppo_fp32", "dpo_fp32"]
    assert gpu_check.parse_args(["--device", "cpu"]).cases == ["ppo_fp32", "grpo_fp32", "dpo_fp32"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "ppo_bf16,nope"], "unknown case(s) ['nope']"),
        (["--only", ","], "unknown case(s) []"),
        (["--steps", "1"], "--steps=1: use at least 2"),
        (["--batch", "3"], "--batch=3: use an even number"),
        (["--max-completion-length", "0"], "--max-completion-length=0"),
        (["--device", "cpu", "--only", "ppo_bf16,ppo_fp32"], "--device cpu cannot run ['ppo_bf16']"),
        (["--device", "cpu", "--only", "ppo_fsdp2_bf16"], "accelerate's FSDP need a GPU"),
        (["--model-size", "7b"], "invalid choice: '7b'"),
    ],
)
def test_bad_arguments_get_one_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--device", "cuda", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, **extra}
    env.pop("OUT", None)
    return env


def test_shell_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-0.1-py3-none-any.whl").write_text("not a zip: installing it would fail")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--device", "cuda", "--only", "ppo_bf16,dpo_bf16"],
        capture_output=True, text=True, env=_env(GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site")),
    )
    assert proc.returncode == 0, proc.stderr
    assert "ppo_bf16" in proc.stdout and "dpo_bf16" in proc.stdout and "grpo_bf16" not in proc.stdout
    assert "installing" not in proc.stdout and not (tmp_path / "site").exists()


def test_shell_refuses_bad_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--only", "nope", "--dry-run"], capture_output=True, text=True,
                          env=_env())
    assert proc.returncode == 2 and "unknown case(s) ['nope']" in proc.stderr


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, as `pip download` leaves them in .whl/."""
    path = folder / "gpucheckprobe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("gpucheckprobe/__init__.py", "VALUE = 1\n")
        zf.writestr("gpucheckprobe-0.1.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 0.1\n")
        zf.writestr("gpucheckprobe-0.1.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("gpucheckprobe-0.1.dist-info/RECORD", "")
    return path


def test_cpu_smoke_run_through_the_shell_script(tmp_path, tiny_debug_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--model-size", "tiny", "--device", "cpu", "--only", "ppo_fp32", "--steps", "2",
         "--batch", "2", "--max-completion-length", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env=_env(GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_SITE=str(tmp_path / "site"), OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installing 1 wheels" in proc.stdout
    assert (tmp_path / "site" / "gpucheckprobe" / "__init__.py").exists()
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert case["case"] == "ppo_fp32" and case["status"] == "ok" and case["timed_steps"] == 1
    assert case["tokens_per_s"] > 0 and case["peak_memory_gib"] > 0 and 0 < case["model_share"] <= 1
    assert {"generate", "forward:policy", "forward:critic", "backward"} <= set(case["model_seconds_by_kind"])
