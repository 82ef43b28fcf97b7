"""The command line as a new user meets it: overrides after an option, `run --help`, the Hub mode line, and one
clear line (no traceback) for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_safeppo.cli import main

REPO = Path(__file__).resolve().parents[1]


def small_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own", "model": "tiny://debug", "output_dir": str(tmp_path / "runs"),
        "stages": [{"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 8}, "args": {"max_steps": 1}}],
    }))
    return path


@pytest.mark.parametrize("order", ["overrides_first", "check_first", "check_between"])
def test_check_works_with_overrides_on_either_side(tmp_path, capsys, order):
    recipe = str(small_recipe(tmp_path))
    argv = {
        "overrides_first": ["run", recipe, "output_dir=x", "seed=3", "--check"],
        "check_first": ["run", "--check", recipe, "output_dir=x", "seed=3"],
        "check_between": ["run", recipe, "output_dir=x", "--check", "seed=3"],  # argparse alone rejects this one
    }[order]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recipe 'own': model tiny://debug -> x (seed 3)" in out and "pre-flight passed" in out


def test_an_unknown_option_is_still_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", str(small_recipe(tmp_path)), "--check", "--chek"])
    assert info.value.code == 2
    assert "unrecognized arguments: --chek" in capsys.readouterr().err


def test_run_help_names_the_shipped_recipes_and_the_docs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "trl-safeppo run demo" in text and "trl-safeppo run gsm8k" in text
    assert "docs/recipes.md in the source repository" in text and "python -m pydoc trl_safeppo.pipeline.recipe" in text


def test_num_processes_plans_the_batches_of_a_check(tmp_path, capsys):
    recipe = str(small_recipe(tmp_path))
    assert main(["run", recipe, "--check", "--num-processes", "2", "scale_with_world_size=false"]) == 0
    # per_device_train_batch_size defaults to 8 (TrainingArguments): 4 per device x 2 processes = 8 rows
    assert "sft: global batch 8 rows = 4 per device x 1 accumulation x 2 processes; 1 optimizer steps" in \
        capsys.readouterr().out


def test_num_processes_without_check_is_one_clear_error(tmp_path, capsys):
    assert main(["run", str(small_recipe(tmp_path)), "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--num-processes only plans a --check" in err and "accelerate launch --num_processes N" in err


def test_a_hub_id_offline_is_one_line_without_traceback(tmp_path, capsys):
    assert main(["run", str(small_recipe(tmp_path)), "model=nobody-here/no-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "not in the local Hugging Face cache" in err and "hf download nobody-here/no-model" in err


def _cli(env_update: dict, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(env_update, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "trl_safeppo", "run", str(small_recipe(tmp_path)), "--check"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()[0]


def test_the_cli_defaults_to_offline_and_says_so(tmp_path):
    assert _cli({}, tmp_path) == (
        "[trl-safeppo] Hugging Face Hub: offline (trl-safeppo's default; export HF_HUB_OFFLINE=0 to download): models "
        "come from tiny://, local directories and the local cache")


def test_a_users_setting_is_kept_and_named(tmp_path):
    assert "online (HF_HUB_OFFLINE is not 1)" in _cli({"HF_HUB_OFFLINE": "0"}, tmp_path)
    assert "offline (HF_HUB_OFFLINE=1 is set)" in _cli({"HF_HUB_OFFLINE": "1"}, tmp_path)


def test_num_processes_below_one_is_one_clear_error(tmp_path, capsys):
    assert main(["run", str(small_recipe(tmp_path)), "--check", "--num-processes", "0"]) == 2
    err = capsys.readouterr().err
    assert "--num-processes 0 is not a number of processes. Fix: pass 1 or more" in err and "Traceback" not in err
