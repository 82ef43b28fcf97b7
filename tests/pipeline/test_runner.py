"""The runner end to end on tiny://debug with 1-2 steps per stage: run-directory layout, hand-off, manifest, skip on
rerun, partial rerun after a recipe change, and resume after a hard kill in the middle of a stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from trl_safeppo.pipeline.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]


PARITY = textwrap.dedent(
    """
    from trl_safeppo.rewards import reward_function

    @reward_function
    def parity(prompts, completions, **kwargs):
        # 1.0 for a completion with an even number of characters: a random tiny model passes about half the time,
        # so rejection sampling keeps some samples and pairs can be built.
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if len(t) % 2 == 0 else 0.0 for t in texts]
    """
)


def micro_recipe(out: Path) -> dict:
    """Every stage type but PPO, 1-2 steps each, on tiny://debug."""
    return {
        "name": "micro",
        "model": "tiny://debug",
        "output_dir": str(out),
        "imports": ["parity_reward"],
        "reward": "parity_reward.parity",
        "self_test": False,  # parity has no gold answer to test against
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 4}, "max_new_tokens": 8,
                 "accuracy_reward": "math", "format_reward": "format"},
        "probes": ["What is 1 + 1?"],
        "stages": [
            {"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 16},
             "args": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 1}},
            {"type": "grpo", "dataset": {"path": "task://arithmetic/rl", "n": 8},
             "args": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4,
                      "max_completion_length": 8, "logging_steps": 1}},
            {"type": "rejection_sampling", "dataset": {"path": "task://arithmetic/rl", "n": 4},
             "args": {"num_completions": 4, "max_new_tokens": 8, "progress": False}},
            {"type": "sft", "name": "sft-rs", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1}},
            {"type": "dpo", "dataset": "previous",
             "args": {"max_steps": 1, "per_device_train_batch_size": 2, "logging_steps": 1}},
            {"type": "eval"},
        ],
    }


@pytest.fixture
def parity_module(tmp_path, monkeypatch):
    (tmp_path / "parity_reward.py").write_text(PARITY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write(tmp_path: Path, tree: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_micro_recipe_runs_and_reruns(tmp_path, parity_module, capsys):
    out = tmp_path / "run"
    recipe = write(tmp_path, micro_recipe(out))
    assert run_recipe(str(recipe)) == 0

    m = manifest(out)
    assert m["status"] == "completed"
    assert [s["status"] for s in m["stages"]] == ["completed"] * 6
    sft, grpo, rs, sft_rs, dpo, ev = m["stages"]
    # run-directory contract (docs/architecture.md)
    assert (out / "recipe.yaml").exists() and (out / "report.md").exists()
    for name in ("final/config.json", "final/tokenizer_config.json", "log_history.jsonl", "eval.json", "gates.json",
                 "probes.json"):
        assert (out / "stages/01-sft" / name).exists(), name
    # hand-off: each stage starts from the previous final/; rejection sampling and eval pass the policy through
    assert grpo["inputs"]["model"]["path"] == sft["outputs"]["final"]["path"] == str(out / "stages/01-sft/final")
    assert grpo["inputs"]["model"]["hash"] == sft["outputs"]["final"]["hash"]
    assert rs["inputs"]["model"]["path"] == rs["outputs"]["final"]["path"] == grpo["outputs"]["final"]["path"]
    assert sft_rs["inputs"]["model"]["path"] == grpo["outputs"]["final"]["path"]
    assert dpo["inputs"]["model"]["path"] == sft_rs["outputs"]["final"]["path"]
    assert ev["outputs"]["final"]["path"] == dpo["outputs"]["final"]["path"]
    # data hand-off: the SFT set of rejection sampling trains sft-rs; DPO pairs come from its scored samples
    kept = json.loads((out / "stages/03-rejection_sampling/data/summary.json").read_text())["kept"]
    assert sft_rs["inputs"]["dataset"]["rows"] == kept > 0
    assert (out / "stages/05-dpo/data/pairs").is_dir() and dpo["inputs"]["dataset"]["rows"] >= 1
    assert set(rs["outputs"]["data"]) == {"sft", "scored"}
    # SFT logged at steps 1 and 2, then the end-of-training summary: 3 lines, as trainer.state.log_history
    history = [json.loads(line) for line in (out / "stages/01-sft/log_history.jsonl").read_text().splitlines()]
    assert [h.get("step") for h in history] == [1, 2, 2] and "train_runtime" in history[-1]
    assert sft["metrics"]["train_runtime"] == history[-1]["train_runtime"]
    assert sft["inputs"]["dataset"]["rows"] == 16 and sft["versions"]["trl"]
    assert ev["eval"]["n"] == 4 and set(json.loads((out / "stages/01-sft/eval.json").read_text())) >= {"accuracy", "n"}
    assert "held-out accuracy" in capsys.readouterr().out  # the end-of-run table

    # rerun: everything skipped
    assert run_recipe(str(recipe)) == 0
    again = manifest(out)
    assert [s["timings"]["attempts"] for s in again["stages"]] == [1] * 6
    assert [s["timings"]["started_at"] for s in again["stages"]] == [s["timings"]["started_at"] for s in m["stages"]]

    # a changed stage (and every stage after it: fingerprints are chained) runs again; the stages before it are kept
    assert run_recipe(str(recipe), ["stages.dpo.args.learning_rate=2.0e-6"]) == 0
    changed = manifest(out)
    before, after = m["stages"], changed["stages"]
    assert [s["fingerprint"] for s in after[:4]] == [s["fingerprint"] for s in before[:4]]
    assert [s["timings"]["started_at"] for s in after[:4]] == [s["timings"]["started_at"] for s in before[:4]]
    assert after[4]["fingerprint"] != before[4]["fingerprint"] and after[5]["fingerprint"] != before[5]["fingerprint"]
    assert after[4]["config"]["args"]["learning_rate"] == 2.0e-6


KILLER = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path
    from transformers import TrainerCallback

    class KillOnce(TrainerCallback):
        '''SIGKILL this process at step 5 of the first attempt (a hard kill: no cleanup, no exception).'''
        def on_step_end(self, args, state, control, **kwargs):
            marker = Path(os.environ["KILL_MARKER"])
            if state.global_step == 5 and not marker.exists():
                marker.write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_resume_after_kill_mid_stage(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (tmp_path / "killer_cb.py").write_text(KILLER)
    tree = micro_recipe(out)
    del tree["eval"], tree["probes"], tree["reward"]
    tree["imports"] = ["killer_cb"]
    tree["stages"] = [
        tree["stages"][0],
        {"type": "sft", "name": "sft-long", "dataset": {"path": "task://arithmetic/sft", "n": 64},
         "args": {"max_steps": 8, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 2},
         "callbacks": ["killer_cb.KillOnce"]},
    ]
    recipe = write(tmp_path, tree)
    env = dict(os.environ, KILL_MARKER=str(tmp_path / "killed"), OMP_NUM_THREADS="1",
               PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    first = subprocess.run([sys.executable, "-m", "trl_safeppo", "run", str(recipe)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == -9, first.stderr[-2000:]  # killed by SIGKILL
    m = manifest(out)
    assert [s["status"] for s in m["stages"]] == ["completed", "running"]
    assert sorted(p.name for p in (out / "stages/02-sft-long").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "stages/02-sft-long/final").exists()

    # the same command again (in-process here, to spare a second start-up): the marker exists, so no kill
    monkeypatch.setenv("KILL_MARKER", env["KILL_MARKER"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert run_recipe(str(recipe)) == 0
    m = manifest(out)
    sft, long = m["stages"]
    assert [s["status"] for s in m["stages"]] == ["completed", "completed"] and m["status"] == "completed"
    assert sft["timings"]["attempts"] == 1  # not repeated
    assert long["timings"]["attempts"] == 2 and long["timings"]["resumed_from"] == "checkpoint-4"
    assert long["outputs"]["final"]["hash"] and (out / "stages/02-sft-long/final/config.json").exists()
    state = json.loads((out / "stages/02-sft-long/checkpoint-8/trainer_state.json").read_text())
    assert state["global_step"] == 8
    # the rewritten log history has each step once, although steps 5 were logged before the kill too
    steps = [json.loads(line).get("step") for line in (out / "stages/02-sft-long/log_history.jsonl").read_text().splitlines()]
    assert steps[:-1] == list(range(1, 9))


@pytest.mark.slow
def test_peft_handoff_merge_then_keep(tmp_path, tiny_debug_path):
    import torch

    out = tmp_path / "run"
    sft = {"dataset": {"path": "task://arithmetic/sft", "n": 8},
           "args": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1.0e-2}}
    tree = {
        "name": "peft",
        "model": "tiny://debug",
        "output_dir": str(out),
        "stages": [
            {"type": "sft", "name": "merged", **sft, "peft": {"r": 2, "lora_alpha": 4, "handoff": "merge"}},
            {"type": "sft", "name": "kept", **sft, "peft": {"r": 2, "lora_alpha": 4, "handoff": "keep"}},
            {"type": "sft", "name": "continued", **sft},  # continues training the kept adapter
        ],
    }
    assert run_recipe(str(write(tmp_path, tree))) == 0
    stages = out / "stages"
    # merge: the adapter is kept beside; final/ is an ordinary model whose LoRA-targeted weights moved
    assert (stages / "01-merged/adapter/adapter_config.json").exists()
    assert (stages / "01-merged/final/config.json").exists()
    assert not (stages / "01-merged/final/adapter_config.json").exists()
    from safetensors.torch import load_file

    base = load_file(str(Path(tiny_debug_path) / "model.safetensors"))
    merged = load_file(str(stages / "01-merged/final/model.safetensors"))
    assert base.keys() == merged.keys()  # no lora_A / lora_B left: merged into the linear weights
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith(".weight") and "proj" in k for k in changed)  # only LoRA-targeted layers
    # keep: final/ is the adapter, whose base is stage 1's merged model
    kept = json.loads((stages / "02-kept/final/adapter_config.json").read_text())
    assert kept["base_model_name_or_path"] == str(stages / "01-merged/final")
    assert not (stages / "02-kept/final/config.json").exists()
    # the next stage trained that same adapter (no second one) and hands it on
    continued = json.loads((stages / "03-continued/final/adapter_config.json").read_text())
    assert continued["base_model_name_or_path"] == str(stages / "01-merged/final")
    m = manifest(out)
    assert m["stages"][2]["inputs"]["model"]["path"] == str(stages / "02-kept/final")
    assert m["stages"][2]["outputs"]["final"]["hash"] != m["stages"][1]["outputs"]["final"]["hash"]


@pytest.mark.slow
def test_failed_gate_stops_the_run_and_a_relaxed_gate_is_rechecked_without_retraining(tmp_path):
    out = tmp_path / "run"
    sft = {"dataset": {"path": "task://arithmetic/sft", "n": 8}, "args": {"max_steps": 1, "per_device_train_batch_size": 4}}
    tree = {
        "name": "gated",
        "model": "tiny://debug",
        "output_dir": str(out),
        "reward": "math",
        "eval": {"dataset": {"path": "task://arithmetic/eval", "n": 2}, "max_new_tokens": 4},
        "stages": [
            {"type": "sft", "name": "first", **sft, "gate": {"min_metrics": {"accuracy": 0.99}}},
            {"type": "sft", "name": "second", **sft},
        ],
    }
    recipe = write(tmp_path, tree)
    assert run_recipe(str(recipe)) == 1  # a random tiny model answers no sum: accuracy 0.0 < 0.99
    m = manifest(out)
    assert [s["status"] for s in m["stages"]] == ["gated", "pending"] and m["status"] == "stopped"
    gates = json.loads((out / "stages/01-first/gates.json").read_text())
    assert {"gate": "min:accuracy", "passed": False} == {k: gates[0][k] for k in ("gate", "passed")}
    assert not (out / "stages/02-second").exists()

    assert run_recipe(str(recipe), ["stages.first.gate.min_metrics.accuracy=0.0"]) == 0
    m = manifest(out)
    assert [s["status"] for s in m["stages"]] == ["completed", "completed"]
    assert m["stages"][0]["timings"]["attempts"] == 1  # re-checked, not retrained


def test_output_dir_of_another_recipe_is_refused(tmp_path):
    from trl_safeppo.pipeline.manifest import Manifest
    from trl_safeppo.pipeline.recipe import RecipeError

    out = tmp_path / "run"
    Manifest.create(out, "someone-else", []).save()
    tree = {"name": "mine", "model": "tiny://debug", "output_dir": str(out),
            "stages": [{"type": "sft", "dataset": {"path": "task://arithmetic/sft", "n": 4}, "args": {"max_steps": 1}}]}
    with pytest.raises(RecipeError, match=r"holds a run of another recipe \('someone-else'\).*--restart"):
        run_recipe(str(write(tmp_path, tree)))
    assert not (out / "stages").exists()  # nothing trained, nothing written
