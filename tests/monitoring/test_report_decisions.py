"""The report tells the story at a glance: gate decisions, the final model and KL to the SFT model in the overview
and the stage table (trl_safeppo/monitoring/report.py, plots.py), on a synthetic run directory."""

from __future__ import annotations

import json

from trl_safeppo.monitoring.plots import DECISIONS, panel_names, plot_stage
from trl_safeppo.monitoring.report import _overview_point, load_run, write_report

from .synthetic import dpo_history, grpo_history, make_run


def test_carried_stage_final_model_and_kl_to_sft_are_reported(tmp_path):
    run = make_run(tmp_path / "run")  # sft -> grpo -> dpo
    manifest = json.loads((run / "manifest.json").read_text())
    sft, grpo, dpo = manifest["stages"]
    for i, s in enumerate(manifest["stages"], start=1):
        s["outputs"] = {"final": {"path": f"/runs/x/stages/0{i}-{s['name']}/final", "hash": f"h{i}"}}
    grpo["status"] = "carried"
    grpo["handoff"] = {"decision": "carry_previous", "model": "/runs/x/stages/01-sft/final", "hash": "h1",
                       "reason": "heldout_drop: held-out accuracy 0.42 -> 0.1 (drop 0.32 > 0.05)"}
    manifest["final"] = {"policy": "best_heldout", "stage": "03-dpo", "path": "/runs/x/stages/03-dpo/final",
                         "reason": "best held-out accuracy (0.740) of the 2 models handed on (the last one)"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    gates = [{"gate": "heldout_drop", "passed": False, "reason": "held-out accuracy 0.42 -> 0.1 (drop 0.32 > 0.05)"}]
    (run / "stages/02-grpo/gates.json").write_text(json.dumps(gates))
    for name, kl in (("01-sft", 0.0), ("03-dpo", 0.05)):
        path = run / "stages" / name / "eval.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), kl_to_reference=kl)))

    md = write_report(run).read_text()
    assert "- **Status:** completed" in md  # a carried stage does not stop the run
    assert "- **Final model:** 03-dpo (final: best\\_heldout, best held-out accuracy (0.740)" in md
    grpo_row = next(line for line in md.splitlines() if line.startswith("| 2 | grpo | grpo | carried |"))
    assert grpo_row.endswith("| carried over (gate failed: heldout\\_drop: held-out accuracy 0.42 -> 0.1 (drop "
                             "0.32 > 0.05)); the next stage started from the previous model (01-sft) |")
    assert next(line for line in md.splitlines() if line.startswith("| 3 | dpo |")).endswith(
        "| the run's final model (final: best\\_heldout) |")
    assert "| 01-sft | 0.42 | 0.5 | 17.5 | 0.1 | 0 | 64 |" in md  # kl_to_reference column, 0 for the SFT model

    _, stages = load_run(run)
    final = manifest["final"]
    points = [_overview_point(s, final) for s in stages]
    assert [p["decision"] for p in points] == ["passed", "carried", "passed"]
    assert [p["final"] for p in points] == [False, False, True]
    assert [p["kl_to_reference"] for p in points] == [0.0, None, 0.05]
    assert set(DECISIONS) == {"passed", "plateau", "carried", "stopped", "eval"}


def test_stage_grids_have_no_empty_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    drawn = {}
    original = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # count the axes that show something at save time
        drawn["axes"] = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
        drawn["visible"] = [ax for ax in fig.axes if ax.get_visible()]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        # DPO: 2 panels (implicit rewards, entropy) -> one row, no empty cell; PPO: 5 panels -> the fifth spans
        ppo = [dict(e, **{"ppo/val/explained_variance": 0.3}) for e in grpo_history()]
        for history, n in ((dpo_history(), 2), (ppo, 5)):
            assert len(panel_names(history)) == n
            plot_stage(history, tmp_path / f"{n}.png", title="t")
            assert len(drawn["visible"]) == len(drawn["axes"])  # every visible axis (twins included) has data
    finally:
        plt.Figure.savefig = original
