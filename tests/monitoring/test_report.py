"""The run report (trl_safeppo/monitoring/report.py, plots.py) on synthetic run directories shaped like the runner's."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from trl_safeppo.cli import main
from trl_safeppo.monitoring.plots import panel_names, series
from trl_safeppo.monitoring.report import load_run, write_report

from .synthetic import PROBES, dpo_history, grpo_history, make_run, sft_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _without_timestamp(text: str) -> str:
    return re.sub(r"- \*\*Report written:\*\* .*\n", "", text)


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start:] if end < 0 else md[start:end]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo-like run with its report written once (shared: writing the figures is the slow part)."""
    run = make_run(tmp_path_factory.mktemp("demo") / "run")
    write_report(run)
    return run


def test_demo_report_has_every_plot_and_the_probe_table(demo_run):
    run = demo_run
    md = (run / "report.md").read_text()

    for name in ("overview", "01-sft", "02-grpo", "03-dpo", "heldout"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name}.png)" in md

    probes = _section(md, "Probe prompts").splitlines()
    assert probes[2] == "| probe | 01-sft | 02-grpo | 03-dpo |"  # stage columns
    rows = [line for line in probes if line.startswith("| ") and not line.startswith("| probe")]
    assert [r.split(" | ")[0][2:] for r in rows] == PROBES  # probe rows, in recipe order
    # "What is 57 + 68?" moved from 115 (right) to 125 (wrong) between stage 1 and 2: visible side by side
    # answers are code spans: they read as the model wrote them, no HTML entities (&lt;think&gt;)
    assert "<answer>115</answer>` | `<think>57 + 68 = 125" in rows[1] and "&lt;" not in rows[1]

    summary = _section(md, "Final metrics per stage")
    assert "| 2 | grpo | grpo | completed | 21 | 30 |" in summary  # duration 10.5 * 2 s, 30 logged steps
    assert "| 0.71 | 0.97 | 13.2 |" in summary  # grpo's held-out accuracy, format pass, length from eval.json
    assert "| 02-grpo | 22 | length\\_collapse | warn | warn |" in _section(md, "Tripwire events")
    assert "| 01-sft | no\\_tripwire\\_stop | ✅ pass |" in _section(md, "Gate outcomes")
    assert "- **Status:** completed" in md
    grpo_section = md[md.index("### 2. grpo"):md.index("### 3. dpo")]
    assert "| What is 3 + 4? | `<think>2 + 2 = 4</think><answer>4</answer>` |" in grpo_section


def test_summary_reads_the_last_logged_value(demo_run):
    _, stages = load_run(demo_run)
    grpo = stages[1]
    # the last training entry of grpo_history() (the summary entry after it has no reward)
    assert grpo.final("reward") == grpo_history()[-2]["reward"]
    assert grpo.final("kl") == pytest.approx(0.002 * 30 * (1 + (1 - 2.718281828 ** -3)), rel=1e-6)
    assert stages[0].final("kl") is None  # SFT logs no KL


def test_cli_rebuilds_the_same_report(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    first = (run / "report.md").read_text().replace(str(demo_run), str(run))  # the header names the directory
    for path in [run / "report.md", *(run / "plots").glob("*.png")]:
        path.unlink()
    assert main(["report", str(run)]) == 0
    assert _without_timestamp((run / "report.md").read_text()) == _without_timestamp(first)
    assert all((run / "plots" / f"{n}.png").read_bytes()[:8] == PNG_MAGIC for n in ("01-sft", "02-grpo", "heldout"))


def test_interrupted_run_still_reports(tmp_path):
    run = make_run(tmp_path / "run", interrupted=True)
    md = write_report(run).read_text()
    assert "- **Status:** running" in md
    assert "| 3 | dpo | dpo | running | – | 6 |" in md  # six good lines, the cut-off seventh is skipped
    assert (run / "plots" / "03-dpo.png").is_file()
    assert "| probe | 01-sft | 02-grpo |" in md  # no probes for the unfinished stage: no column


def test_failed_gate_shows_in_status_and_gate_table(tmp_path):
    run = make_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("status")
    manifest["stages"][1]["status"] = "gated"
    manifest["stages"][2]["status"] = "pending"
    (run / "manifest.json").write_text(json.dumps(manifest))
    gate = {"gate": "min:accuracy", "passed": False, "reason": "accuracy = 0.71 < 1.01", "values": {}}
    (run / "stages" / "02-grpo" / "gates.json").write_text(json.dumps([gate]))
    md = write_report(run).read_text()
    assert "- **Status:** stopped at stage 02-grpo (a gate failed); the last good policy is the previous" in md
    assert "- **Stop reason:** gate min:accuracy: accuracy = 0.71 < 1.01" in md
    assert "| 02-grpo | min:accuracy | ❌ FAIL | accuracy = 0.71 < 1.01 |" in md


def test_markdown_cells_are_escaped(tmp_path):
    run = make_run(tmp_path / "run", n_stages=1)
    probes = [{"prompt": p, "completion": "a | b\n*c* `x`"} for p in PROBES]
    (run / "stages" / "01-sft" / "probes.json").write_text(json.dumps(probes))
    md = write_report(run).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| What is 2 + 2?"))
    # a code span: * stays *, the pipe is escaped (it would split the cell), the line break is shown as ⏎, and the
    # fence is two backticks because the answer holds a single one
    assert "| `` a \\| b ⏎ *c* `x` `` |" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # 2 columns -> 3 unescaped pipes


def test_text_cells_escape_only_what_markdown_would_read_as_html(tmp_path):
    run = make_run(tmp_path / "run", n_stages=1)
    gate = {"gate": "g", "passed": True, "reason": "<b>x</b> 0.4 < 0.5 & more &amp;", "values": {}}
    (run / "stages" / "01-sft" / "gates.json").write_text(json.dumps([gate]))
    md = write_report(run).read_text()
    # a tag and an entity are neutralised; a comparison and a lone ampersand read as written
    assert "| 01-sft | g | ✅ pass | &lt;b>x&lt;/b> 0.4 < 0.5 & more &amp;amp; |" in md


def test_sampling_stage_summary_is_shown(tmp_path):
    run = make_run(tmp_path / "run", n_stages=1)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"].append({"index": 4, "name": "rs", "type": "rejection_sampling", "status": "completed"})
    (run / "manifest.json").write_text(json.dumps(manifest))
    data = run / "stages" / "04-rs" / "data"
    data.mkdir(parents=True)
    summary = {"prompts_sampled": 8, "completions_generated": 32, "completions_passed": 5, "kept": 5,
               "dropped": {"failed_check": 27}, "warnings": ["only 5 kept"]}
    (data / "summary.json").write_text(json.dumps(summary))
    md = write_report(run).read_text()
    section = md[md.index("### 4. rs"):]
    assert "| 8 | 32 | 5 | 5 |" in section and "Dropped: failed\_check 27" in section
    assert "> ⚠️ only 5 kept" in section


def test_stale_figures_of_an_earlier_report_are_removed(tmp_path):
    run = make_run(tmp_path / "run", n_stages=1)
    (run / "plots").mkdir()
    (run / "plots" / "07-old.png").write_bytes(PNG_MAGIC)  # from a stage the manifest no longer has
    (run / "plots" / "mine.png").write_bytes(PNG_MAGIC)  # not a report figure: kept
    write_report(run)
    assert not (run / "plots" / "07-old.png").exists() and (run / "plots" / "mine.png").exists()


def test_stage_dirs_missing_from_the_manifest_are_reported(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "manifest.json").write_text(json.dumps({"name": "demo", "stages": []}))
    _, stages = load_run(run)
    assert [(s.index, s.name, s.status) for s in stages] == [(1, "sft", "unknown"), (2, "grpo", "unknown"),
                                                              (3, "dpo", "unknown")]


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="is not a run directory: it has no manifest.json"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        write_report(tmp_path)


def test_series_reads_logged_history_and_skips_missing_and_nan():
    history = [{"reward": 0.1, "step": 1}, {"loss": 1.0, "step": 2}, {"reward": float("nan"), "step": 3},
               {"reward": 0.4, "step": 4}]
    assert series(history, "reward") == ([1.0, 4.0], [0.1, 0.4])


def test_each_stage_type_gets_the_panels_it_logged():
    assert panel_names(sft_history()) == ["reward", "entropy"]  # the first panel shows the SFT loss; no KL, no length
    assert panel_names(grpo_history()) == ["reward", "kl", "length", "entropy"]
    assert panel_names(dpo_history()) == ["reward", "entropy"]  # implicit rewards/chosen, rejected, margins
    ppo = [dict(e, **{"ppo/val/explained_variance": 0.3}) for e in grpo_history()]
    assert panel_names(ppo) == ["reward", "kl", "length", "entropy", "ppo"]
    assert panel_names([{"learning_rate": 1e-3, "step": 1}, {"eval_loss": 1.0, "step": 1}]) == []
