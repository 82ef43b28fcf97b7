"""The README's main command, end to end: recipes/demo.yaml on tiny://arithmetic (slow tier: several minutes on 2
CPU cores), and its SFT warm start across CPU kernels and thread counts (issue 22)."""

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
    stages = ("sft", "ppo", "grpo", "sft-rs", "dpo", "final-eval")
    acc = {name: by_name[name]["eval"]["accuracy"] for name in stages}
    answer = {name: by_name[name]["eval"]["answer_accuracy"] for name in stages}
    fmt = {name: by_name[name]["eval"]["format_pass_rate"] for name in ("sft", "ppo")}
    # Held-out accuracy is the demo's `strict` rule (the right sum in the required format) on all 300 eval prompts;
    # the answer-only `math` rule is reported beside it, and credits a superset of what `strict` credits.
    assert all(by_name[name]["eval"]["accuracy_rule"] == "strict" for name in stages)
    assert all(answer[name] >= acc[name] for name in stages), (acc, answer)
    # The lines of issue 22 on the default seed 0 (docs/embedded_default.md, "The demo chain, three seeds":
    # measured 0.450 / 0.870 / 0.883 / 0.887 / 0.887, final 0.887, DPO kl 0.064): SFT answers the `Add` phrasing in
    # plain text (format-pass 0.507, so strict 0.450 against 0.887 answer-only); PPO moves it to the tagged format
    # (1.00) and so gains at least 0.10; no later stage ends more than 0.02 below the one before (6 of 300 prompts;
    # GRPO adds 0.013 here and 0.024 on seed 2, and is one prompt below PPO on seed 1); DPO stays close to its
    # reference; the final eval is at least 0.80.
    assert fmt["sft"] <= 0.7 and fmt["ppo"] >= 0.95, fmt
    assert acc["ppo"] >= acc["sft"] + 0.10, acc
    for before, after in (("ppo", "grpo"), ("grpo", "sft-rs"), ("sft-rs", "dpo")):
        assert acc[after] >= acc[before] - 0.02 - 1e-9, (before, after, acc)
    assert by_name["dpo"]["metrics"]["kl"] <= 0.1, by_name["dpo"]["metrics"]
    assert acc["final-eval"] >= 0.80, acc
    # `final: best_heldout`: the run's final model is the best of the models handed on, and the final eval scores it
    final = m["final"]
    assert final["policy"] == "best_heldout"
    assert final["accuracy"] == max(c["accuracy"] for c in final["candidates"]), final
    assert acc["final-eval"] == pytest.approx(final["accuracy"]), (acc, final)  # the same 300 prompts
    assert (out / "report.md").exists()
    table = capsys.readouterr().out
    assert "held-out accuracy" in table and "07-final-eval" in table


def _sft_only_run(tmp_path, name: str, env: dict, overrides=()) -> dict:
    """The demo's first stage (SFT) alone, seed 0, run by the CLI in a fresh process with ``env`` added; its
    manifest entry (``eval`` is the runner's held-out evaluation after it)."""
    import os
    import subprocess
    import sys

    import yaml

    tree = yaml.safe_load((REPO / "recipes/demo.yaml").read_text())
    tree["stages"] = tree["stages"][:1]
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    out = tmp_path / name
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **env}
    proc = subprocess.run([sys.executable, "-m", "trl_safeppo", "run", str(recipe), "seed=0", f"output_dir={out}",
                           *overrides], env=full_env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stage,) = json.loads((out / "manifest.json").read_text())["stages"]
    return stage


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.slow
def test_demo_warm_start_does_not_swing_with_cpu_kernels(tmp_path):
    # issue 22.2: the old SFT (2 epochs at a constant 1e-3) stopped half-way up a steep climb of held-out accuracy,
    # so float rounding alone moved it from 0.16 (AVX-512 kernels) to 0.56 (AVX2 kernels) on seed 0, as on two
    # machines. The demo's SFT now ends past the climb: with the default kernels and with AVX2 ones (what another
    # machine computes) it must land within 0.05 (15 of the 300 held-out prompts), on the held-out accuracy (the
    # demo's `strict` rule: the right sum in the required format) and on the answer-only accuracy (the `math` rule).
    # docs/embedded_default.md has the measured curves.
    default = _sft_only_run(tmp_path, "default", {"OMP_NUM_THREADS": "1"})["eval"]
    avx2 = _sft_only_run(tmp_path, "avx2", {"OMP_NUM_THREADS": "1", **AVX2})["eval"]
    for key in ("accuracy", "answer_accuracy"):
        assert abs(default[key] - avx2[key]) <= 0.05, (key, default, avx2)


@pytest.mark.slow
def test_demo_warm_start_does_not_depend_on_the_thread_count(tmp_path):
    # The other suspect of issue 22.2: one or two OpenMP threads. 40 steps of the demo's SFT give the same training
    # loss to float precision (measured: bit-identical, the matrices are too small for a second thread to split).
    cap = ["stages.sft.args.max_steps=40", "stages.sft.args.lr_scheduler_kwargs.num_decay_steps=10"]
    one = _sft_only_run(tmp_path, "threads1", {"OMP_NUM_THREADS": "1"}, cap)["metrics"]["train_loss"]
    two = _sft_only_run(tmp_path, "threads2", {"OMP_NUM_THREADS": "2"}, cap)["metrics"]["train_loss"]
    assert one == pytest.approx(two, rel=1e-5), (one, two)
