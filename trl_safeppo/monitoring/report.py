"""The run report: ``report.md`` and ``plots/*.png`` in a run directory (see docs/architecture.md, "Run directory").

``write_report(run_dir)`` reads only what the run left on disk: ``manifest.json``, and per stage
``log_history.jsonl`` (the trainer's ``state.log_history``, i.e. the numbers ``report_to`` sent to TensorBoard / W&B),
``tripwires.jsonl``, ``eval.json``, ``probes.json`` and ``gates.json``. Every piece is optional except the manifest,
so the report of an interrupted run (a truncated last log line, a stage with no eval, a DPO stage with no KL)
still builds. The runner calls it after every stage and at the end; ``trl-safeppo report RUN_DIR`` rebuilds it.

Everything is written atomically (:mod:`trl_safeppo.fileio`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..fileio import write_text

# Columns of the summary table: (header, where, key). where = "train" (last logged value) or "eval" (eval.json).
SUMMARY_COLUMNS = (
    ("steps", "train", "step"),
    ("reward", "train", "reward"),
    ("reward std", "train", "reward_std"),
    ("kl", "train", "kl"),
    ("β", "train", "beta"),
    ("entropy", "train", "entropy"),
    ("length", "train", "completions/mean_length"),
    ("trunc.", "train", "completions/clipped_ratio"),
    ("DPO margin", "train", "rewards/margins"),
    ("loss", "train", "loss"),
    ("held-out acc.", "eval", "accuracy"),
    ("format pass", "eval", "format_pass_rate"),
    ("held-out len.", "eval", "mean_length"),
)
BAD_STATUSES = ("failed", "gated")  # the run stopped at this stage
# stopped: ended early by the plateau gate, a success; carried: a gate failed with on_fail: carry_previous (the
# previous model was handed on and the run went on)
FINISHED_STATUSES = ("completed", "stopped", "carried")
# A metric that means nothing for a stage type, left out of its table with the reason: PPO draws one completion
# per prompt, so GRPO's fraction of groups with zero reward spread is 1 by construction.
HIDDEN_METRICS = {
    ("ppo", "frac_reward_zero_std"): "PPO samples one completion per prompt, so every group of one has zero "
                                     "reward spread by construction (its baseline is the critic, not the group)",
}


@dataclass
class StageRecord:
    """Everything the report knows about one stage."""

    index: int
    name: str
    type: str = "?"
    status: str = "pending"
    dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tripwires: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    probes: list[dict[str, Any]] | None = None
    gates: list[dict[str, Any]] | None = None
    sampling: dict[str, Any] | None = None  # data/summary.json of a rejection-sampling stage

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.name}"

    def final(self, key: str) -> float | None:
        """Last finite logged value of ``key`` (training entries; ``step`` is the last logged step)."""
        meta_final = self.meta.get("final_metrics") or self.meta.get("metrics") or {}
        for entry in reversed(self.history):
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        value = meta_final.get(key) if isinstance(meta_final, Mapping) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def final_metrics(self) -> dict[str, float]:
        """Last logged value of every numeric training metric (what the report lists per stage)."""
        out: dict[str, float] = {}
        for entry in self.history:
            if any(str(k).startswith("eval_") for k in entry):
                continue
            for k, v in entry.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[k] = float(v)
        meta_final = self.meta.get("final_metrics") or self.meta.get("metrics") or {}
        if isinstance(meta_final, Mapping):
            for k, v in meta_final.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.setdefault(k, float(v))
        return out


# ---------------------------------------------------------------- reading the run directory


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # half-written by an interrupted run: treat as missing


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of an interrupted run may be cut short
        if isinstance(obj, dict):
            out.append(obj)
    return out


_STAGE_DIR = re.compile(r"^(\d+)-(.+)$")


def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[StageRecord]]:
    """``(manifest, stages)`` of a run directory; ValueError when ``run_dir`` is not one."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run directory {str(run)!r} does not exist (pass the output_dir of `trl-safeppo run`)")
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(
            f"{str(run)!r} is not a run directory: it has no manifest.json (pass the output_dir of `trl-safeppo run`, "
            "which holds manifest.json and stages/)"
        )
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(manifest_path)!r} is not a JSON object; the run directory is damaged")

    metas = manifest.get("stages") or []
    if isinstance(metas, Mapping):
        metas = [dict(v, name=v.get("name", k)) for k, v in metas.items()]
    stages: dict[str, StageRecord] = {}
    for i, meta in enumerate(m for m in metas if isinstance(m, Mapping)):
        index = int(meta.get("index", i + 1))
        rec = StageRecord(index=index, name=str(meta.get("name", f"stage{index}")),
                          type=str(meta.get("type", "?")), status=str(meta.get("status", "pending")), meta=dict(meta))
        for key in ("dir", "output_dir", "stage_dir"):
            if isinstance(meta.get(key), str):
                d = Path(meta[key])
                rec.dir = d if d.is_absolute() else run / d
                break
        else:
            rec.dir = run / "stages" / rec.label
        stages[rec.label] = rec
    # Stage directories the manifest does not list (e.g. the run died before updating it).
    known_dirs = {r.dir.resolve() for r in stages.values() if r.dir is not None}
    for d in sorted((run / "stages").glob("*")) if (run / "stages").is_dir() else []:
        m = _STAGE_DIR.match(d.name)
        if d.is_dir() and m and d.resolve() not in known_dirs:
            stages[d.name] = StageRecord(index=int(m.group(1)), name=m.group(2), status="unknown", dir=d)

    records = sorted(stages.values(), key=lambda r: r.index)
    for rec in records:
        d = rec.dir
        if d is None or not d.is_dir():
            continue
        rec.history = _read_jsonl(d / "log_history.jsonl")
        rec.tripwires = _read_jsonl(d / "tripwires.jsonl")
        ev = _read_json(d / "eval.json")
        rec.eval = ev if isinstance(ev, dict) else None
        pr = _read_json(d / "probes.json")
        rec.probes = pr if isinstance(pr, list) else None
        gates = _read_json(d / "gates.json")
        if gates is None and isinstance(rec.meta.get("gates"), list):
            gates = rec.meta["gates"]
        rec.gates = gates if isinstance(gates, list) else None
        summary = _read_json(d / "data" / "summary.json")
        rec.sampling = summary if isinstance(summary, dict) else None
    return manifest, records


# ---------------------------------------------------------------- markdown helpers


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return _cell(str(value))


def _cell(text: str, limit: int | None = None) -> str:
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    # only what markdown would read as HTML: `<` opening a tag or comment, `&` opening an entity ("0.4 < 0.5" and
    # "a & b" stay as written, so the raw report reads as well as the rendered one)
    text = re.sub(r"&(?=#?\w+;)", "&amp;", text)
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    text = re.sub(r"([\\`*_\[\]|#])", r"\\\1", text)  # markdown specials, and | which would split the cell
    return text.replace("\r", "").replace("\n", "<br>")


def _code(text: str, limit: int | None = None) -> str:
    """Model output in a table cell, as a code span: it reads as written (``<think>`` stays ``<think>``, no HTML
    entities). Only what markdown needs is changed: ``|`` is escaped (it would split the cell), a line break is
    shown as ``⏎``, and the span's fence is one backtick longer than any run of backticks inside."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("\r", "").replace("\n", " ⏎ ").replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _plateau(s: StageRecord) -> Mapping[str, Any] | None:
    """The plateau gate's outcome of a stage that ended early on a plateau (status ``stopped``), else None."""
    if s.status != "stopped":
        return None
    return next((g for g in s.gates or [] if isinstance(g, Mapping) and g.get("gate") == "plateau"), None)


def _failed_gates(s: StageRecord) -> str:
    return "; ".join(f"{g.get('gate')}: {g.get('reason')}" for g in s.gates or []
                     if isinstance(g, Mapping) and not g.get("passed", True))


def _stage_note(s: StageRecord, final: Mapping[str, Any], finals: Mapping[str, str] | None = None) -> str:
    """The stage table's note: a gate decision, an early stop on a plateau, the run's final model. ``finals`` maps
    a stage's final/ path to its label (to name the model a carried stage handed on)."""
    notes = []
    if s.status == "carried":
        handoff = s.meta.get("handoff") if isinstance(s.meta.get("handoff"), Mapping) else {}
        model = handoff.get("model")
        model = (finals or {}).get(str(model), model)
        notes.append(f"carried over (gate failed: {_failed_gates(s) or handoff.get('reason', '?')}); the next stage "
                     f"started from the previous model{f' ({model})' if model else ''}")
    elif s.status == "gated":
        notes.append(f"gate failed, the run stopped here: {_failed_gates(s)}")
    plateau = _plateau(s)
    if plateau is not None:
        notes.append(f"ended early on a plateau: {plateau.get('reason')}")
    if final.get("stage") == s.label:
        notes.append(f"the run's final model (final: {final.get('policy')})")
    return "; ".join(notes)


def _overview_point(s: StageRecord, final: Mapping[str, Any]) -> dict[str, Any]:
    """One stage's point in the overview's held-out rows (plots.plot_overview(heldout=...))."""
    ev = s.eval or {}
    if s.type == "eval":
        decision = "eval"
    elif s.status in ("carried", "gated"):
        decision = "carried" if s.status == "carried" else "stopped"
    elif s.status == "stopped" and _plateau(s) is not None:
        decision = "plateau"
    else:
        decision = "passed"
    return {"accuracy": ev.get("accuracy"), "kl_to_reference": ev.get("kl_to_reference"), "decision": decision,
            "final": final.get("stage") == s.label}


def _run_status(manifest: Mapping[str, Any], stages: list[StageRecord]) -> tuple[str, str | None]:
    """Run status line and stop reason. A stage ``gated`` (a gate failed) or ``failed`` (an error) stopped the run;
    ``stopped`` is a stage ended early by its plateau gate, a success."""
    status = manifest.get("status")
    reason = manifest.get("stop_reason") or manifest.get("reason") or manifest.get("error")
    bad = next((s for s in stages if s.status in BAD_STATUSES), None)
    if bad is not None:
        if reason is None:
            failed_gates = [g for g in (bad.gates or []) if isinstance(g, Mapping) and not g.get("passed", True)]
            reason = bad.meta.get("error") or bad.meta.get("reason") or (
                "; ".join(f"gate {g.get('gate')}: {g.get('reason')}" for g in failed_gates) or None
            )
        what = "a gate failed" if bad.status == "gated" else "the stage failed"
        status = f"stopped at stage {bad.label} ({what})"
        if bad.status == "gated":
            status += "; the last good policy is the previous stage's final/"
    if status is None:
        if stages and all(s.status in FINISHED_STATUSES for s in stages):
            status = "completed"
        elif any(s.status == "running" for s in stages):
            status = "interrupted or still running"
        else:
            status = "incomplete"
    return str(status), (str(reason) if reason else None)


# ---------------------------------------------------------------- the report


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; return the report's path."""
    from .plots import plot_heldout, plot_overview, plot_stage

    run = Path(run_dir)
    manifest, stages = load_run(run)
    plots_dir = run / "plots"
    status, reason = _run_status(manifest, stages)
    title = manifest.get("name") or manifest.get("recipe_name") or run.name
    md: list[str] = [f"# Run report: {_cell(str(title))}", ""]
    md += [f"- **Run directory:** `{run}`", f"- **Status:** {_cell(status)}"]
    if reason:
        md.append(f"- **Stop reason:** {_cell(reason)}")
    final = manifest.get("final") if isinstance(manifest.get("final"), Mapping) else {}
    if final.get("stage"):
        md.append(f"- **Final model:** {_cell(str(final['stage']))} (final: {_cell(str(final.get('policy')))}, "
                  f"{_cell(str(final.get('reason', '')))})")
    md += [f"- **Stages:** {len(stages)} ({', '.join(s.label for s in stages) or 'none yet'})",
           f"- **Report written:** {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}", ""]
    md += ["How to read this report: docs/monitoring.md.", ""]

    overview_png = plot_overview([(s.label, s.history) for s in stages], plots_dir / "overview.png",
                                 heldout=[_overview_point(s, final) for s in stages])
    if overview_png is not None:
        md += ["![the run at a glance](plots/overview.png)", ""]

    # Summary table: each stage's final metrics.
    md += ["## Final metrics per stage", ""]
    cols = [c for c in SUMMARY_COLUMNS if any(
        (s.final(c[2]) if c[1] == "train" else (s.eval or {}).get(c[2])) is not None for s in stages)]
    rows = []
    for s in stages:
        timings = s.meta.get("timings") if isinstance(s.meta.get("timings"), Mapping) else {}
        row = [str(s.index), _cell(s.name), _cell(s.type), _cell(s.status), _fmt(timings.get("duration_s"))]
        for _, where, key in cols:
            row.append(_fmt(s.final(key) if where == "train" else (s.eval or {}).get(key)))
        rows.append(row)
    headers = ["#", "stage", "type", "status", "time (s)"] + [c[0] for c in cols]
    finals: dict[str, str] = {}  # final/ path -> the stage that wrote it (the first: later ones pass it through)
    for s in stages:
        outputs = s.meta.get("outputs") if isinstance(s.meta.get("outputs"), Mapping) else {}
        path = (outputs.get("final") or {}).get("path") if isinstance(outputs.get("final"), Mapping) else None
        if path:
            finals.setdefault(str(path), s.label)
    notes = [_stage_note(s, final, finals) for s in stages]
    if any(notes):
        headers.append("note")
        rows = [row + [_cell(note)] for row, note in zip(rows, notes)]
    md += _table(headers, rows) if stages else ["No stages yet.", ""]

    # Gates.
    md += ["## Gate outcomes", ""]
    gate_rows = []
    for s in stages:
        for g in s.gates or []:
            if isinstance(g, Mapping):
                gate_rows.append([s.label, _cell(g.get("gate", "?")), "✅ pass" if g.get("passed") else "❌ FAIL",
                                  _cell(g.get("reason", ""))])
    md += _table(["stage", "gate", "result", "reason"], gate_rows) if gate_rows else ["No gates were evaluated.", ""]

    # Tripwires.
    md += ["## Tripwire events", ""]
    trip_rows = []
    for s in stages:
        for e in s.tripwires:
            trip_rows.append([s.label, _fmt(e.get("step")), _cell(e.get("detector", "?")), _cell(e.get("status", "?")),
                              _cell(e.get("action", "")), _cell(e.get("reason", ""), 200)])
    md += (_table(["stage", "step", "detector", "status", "action", "reason"], trip_rows) if trip_rows
           else ["No tripwire events.", ""])

    # Held-out evaluation across stages.
    md += ["## Held-out evaluation", ""]
    evaluated = [(s.label, s.eval) for s in stages if s.eval]
    heldout_png = plot_heldout(evaluated, plots_dir / "heldout.png")
    referenced: set[str] = {overview_png.name} if overview_png is not None else set()
    if heldout_png is not None:
        referenced.add(heldout_png.name)
        md += ["![held-out evaluation per stage](plots/heldout.png)", ""]
        keys = ("accuracy", "answer_accuracy", "format_pass_rate", "mean_length", "truncation_rate", "reward_mean", "kl_to_reference",
                "kl_to_reference_seq", "n")
        keys = [k for k in keys if any(k in ev for _, ev in evaluated)]
        md += _table(["stage"] + keys, [[label] + [_fmt(ev.get(k)) for k in keys] for label, ev in evaluated])
    else:
        md += ["No held-out evaluation was recorded.", ""]

    # Probe prompts: probe rows, stage columns.
    md += ["## Probe prompts (greedy answers after each stage)", ""]
    probed = [s for s in stages if s.probes]
    if probed:
        prompts: list[str] = []
        for s in probed:
            for p in s.probes:
                if isinstance(p, Mapping) and p.get("prompt") not in prompts:
                    prompts.append(str(p.get("prompt")))
        rows = []
        for prompt in prompts:
            row = [_cell(prompt, 120)]
            for s in probed:
                answer = next((p.get("completion") for p in s.probes
                               if isinstance(p, Mapping) and str(p.get("prompt")) == prompt), None)
                row.append("–" if answer is None else (_code(str(answer), 300) if str(answer).strip() else "*(empty)*"))
            rows.append(row)
        md += _table(["probe"] + [s.label for s in probed], rows)
    else:
        md += ["No probe prompts were recorded.", ""]

    # Per-stage detail.
    md += ["## Stages", ""]
    for s in stages:
        md += [f"### {s.index}. {_cell(s.name)} ({_cell(s.type)}): {_cell(s.status)}", ""]
        trips = [float(e["step"]) for e in s.tripwires
                 if e.get("status") == "trip" and isinstance(e.get("step"), (int, float))]
        png = plot_stage(s.history, plots_dir / f"{s.label}.png", title=f"Stage {s.label} ({s.type})",
                         trip_steps=trips)
        if png is not None:
            referenced.add(png.name)
            md += [f"![stage {s.label}](plots/{png.name})", ""]
        elif s.history:
            md += ["This stage logged none of the plotted quantities (reward, kl, length, entropy, loss).", ""]
        elif s.type not in ("eval", "rejection_sampling"):  # those do not train: no history expected
            md += ["No logged history (the stage has not trained yet).", ""]
        if s.sampling:
            keys = ("prompts_sampled", "completions_generated", "completions_passed", "kept", "prompts_with_kept",
                    "seconds")
            shown = [k for k in keys if isinstance(s.sampling.get(k), (int, float))]
            if shown:
                md += ["Sampling:", ""]
                md += _table(shown, [[_fmt(s.sampling[k]) for k in shown]])
            dropped = s.sampling.get("dropped")
            if isinstance(dropped, Mapping) and dropped:
                md += ["Dropped: " + ", ".join(f"{_cell(str(k))} {_fmt(v)}" for k, v in dropped.items()), ""]
            for warning in s.sampling.get("warnings") or []:
                md += [f"> ⚠️ {_cell(str(warning))}", ""]
        samples = [x for x in (s.eval or {}).get("samples") or [] if isinstance(x, Mapping)]
        if samples:
            md += ["Held-out samples (greedy):", ""]
            md += _table(["prompt", "completion"], [[_cell(x.get("prompt", ""), 200), _code(x.get("completion", ""), 300)]
                                                   for x in samples])
        metrics = s.final_metrics()
        hidden = {k: why for (kind, k), why in HIDDEN_METRICS.items() if kind == s.type and k in metrics}
        metrics = {k: v for k, v in metrics.items() if k not in hidden}
        if metrics:
            md += ["<details><summary>All final logged metrics</summary>", ""]
            md += _table(["metric", "value"], [[_cell(k), _fmt(v)] for k, v in sorted(metrics.items())])
            md += [f"Not shown: `{k}` ({why})." for k, why in hidden.items()]
            md += ["</details>", ""]

    # Figures of an earlier report that this one did not draw (a stage renamed, or without data now) would mislead.
    if plots_dir.is_dir():
        for path in plots_dir.glob("*.png"):
            if path.name not in referenced and (path.name in ("heldout.png", "overview.png") or _STAGE_DIR.match(path.stem)):
                path.unlink(missing_ok=True)

    report = run / "report.md"
    write_text(report, "\n".join(md).rstrip() + "\n", mode=0o644)  # a report is meant to be shared
    return report


# ---------------------------------------------------------------- CLI: trl-safeppo report RUN_DIR


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output directory of a finished or interrupted run")


def run(args) -> int:
    path = write_report(args.run_dir)
    print(f"wrote {path} and {path.parent / 'plots'}/")
    return 0
