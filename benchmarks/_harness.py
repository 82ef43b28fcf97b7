"""Shared machinery of the benchmarks: run one training configuration in a fresh subprocess, time every optimizer
step, record peak memory, and summarize as medians with min/max and ratios measured in the same invocation.

Each configuration runs in its own process so that peak memory (``ru_maxrss``) belongs to that configuration alone
and one run's warm caches do not flatter the next. Configurations of one comparison are interleaved
(A, B, A, B, ...) when ``--repeats`` > 1, so a load change on the machine hits both sides alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


# ---------------------------------------------------------------------------------------------------------------
# Inside the worker process
def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_RSS_AFTER_IMPORTS: list[float] = []


def mark_imports_done() -> None:
    """Worker side: record the peak resident memory once the training libraries are imported and before any model
    is loaded. `emit` reports it, so a comparison across environments can tell the libraries' import footprint
    (which differs between TRL / transformers versions, whatever the trainer) from what training adds on top."""
    _RSS_AFTER_IMPORTS[:] = [peak_rss_mb()]


def step_timer():
    """A TrainerCallback recording the wall time of every optimizer step, end to end: from the end of the previous
    step (the start of training for the first) to the end of this one, so generation, the update, logging and every
    callback (tripwires included) are inside. Works for any loop that calls ``on_train_begin`` and ``on_step_end``
    (transformers' Trainer, and TRL 1.12's own PPO loop, whose step is one rollout)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds: list[float] = []
            self._last: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self._last is not None:
                self.step_seconds.append(now - self._last)
            self._last = now

    return StepTimer()


class ModelTimer:
    """Accumulates the wall time spent inside the models (generate, forward, backward) during training.

    Nested calls count once (a forward inside generate is not added twice): a depth counter opens the clock on the
    outermost entry and closes it on the matching exit. Install with :meth:`install` on a built trainer; it wraps
    instance attributes only (``model.generate``, ``accelerator.backward``) and adds forward hooks, touching no
    library code.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_kind: dict[str, float] = {}  # seconds per outermost call: generate, forward:<model>, backward
        self._depth = 0
        self._t0 = 0.0
        self._kind = ""

    def enter(self, kind: str = "model") -> None:
        if self._depth == 0:
            self._t0 = time.perf_counter()
            self._kind = kind
        self._depth += 1

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            elapsed = time.perf_counter() - self._t0
            self.seconds += elapsed
            self.by_kind[self._kind] = self.by_kind.get(self._kind, 0.0) + elapsed

    def _wrap(self, fn: Callable, kind: str) -> Callable:
        def wrapped(*args, **kwargs):
            self.enter(kind)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return wrapped

    def install(self, trainer: Any) -> None:
        import torch

        modules = {"policy": trainer.model, "reference": getattr(trainer, "ref_model", None)}
        for name in ("critic", "value_model", "critic_model"):
            modules[name] = getattr(trainer, name, None)
        for i, func in enumerate(getattr(trainer, "reward_funcs", None) or []):
            modules[f"reward_model_{i}"] = func
        for name, module in modules.items():
            if isinstance(module, torch.nn.Module):
                module.register_forward_pre_hook(lambda *_, kind=f"forward:{name}": self.enter(kind))
                module.register_forward_hook(lambda *_: self.exit())
                if hasattr(module, "generate"):
                    module.generate = self._wrap(module.generate, "generate")
        trainer.accelerator.backward = self._wrap(trainer.accelerator.backward, "backward")


def emit(result: dict) -> None:
    """Worker side: print the result as the last line of stdout, for :func:`run_worker`."""
    result = dict(result)
    result["peak_rss_mb"] = peak_rss_mb()
    if _RSS_AFTER_IMPORTS:
        result["rss_after_imports_mb"] = _RSS_AFTER_IMPORTS[0]
    print("BENCHMARK-RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# In the driver process
def run_worker(
    module: str, config: dict, *, python: str | None = None, env: dict | None = None, timeout: float = 1800
) -> dict:
    """Run ``python -m <module> '<json config>'`` in a fresh process from the repo root; return its result dict."""
    cmd = [python or sys.executable, "-m", module, json.dumps(config)]
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    full_env.setdefault("TRL_SAFEPPO_CACHE", os.path.join(tempfile.gettempdir(), "trl_safeppo_bench_cache"))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK-RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"benchmark worker {module} failed (exit {proc.returncode}) for {config}:\n{tail}")
    result = json.loads(lines[-1][len("BENCHMARK-RESULT ") :])
    result["process_wall_seconds"] = wall
    result["loadavg_1m_at_start"] = load  # other work on the machine while this run started (1-minute average)
    return result


def interleaved(configs: dict[str, tuple[str, dict, dict]], repeats: int) -> dict[str, list[dict]]:
    """Run every named (module, config, run_worker kwargs) `repeats` times, interleaved A, B, A, B, ..."""
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (module, config, kwargs) in configs.items():
            print(f"  running {name} ...", flush=True)
            results[name].append(run_worker(module, config, **kwargs))
    return results


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max (the figures docs/benchmarks.md reports)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed_steps(results: list[dict], warmup: int) -> list[float]:
    """All steps' seconds of several runs, dropping each run's first `warmup` steps (lazy init, first compile)."""
    return [s for r in results for s in r["step_seconds"][warmup:]]


def fmt_stats(s: dict[str, float], unit: str = "s", digits: int = 3) -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n== {title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def machine() -> dict[str, Any]:
    import platform

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for lib in ("trl", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    return info


def write_json(out: Path, name: str, payload: dict) -> Path:
    """Write `<out>/<name>.json` atomically."""
    from trl_safeppo.fileio import write_json as write

    path = out / f"{name}.json"
    write(path, payload)
    return path


def save_figure(fig, out: Path, name: str) -> Path:
    """Save a matplotlib figure as `<out>/<name>.png` atomically."""
    from trl_safeppo.fileio import atomic_path

    path = out / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Command line shared by every benchmark
def common_parser(name: str, description: str, *, steps: int, model: str = "tiny://arithmetic"):
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default {steps})")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by every configuration (default 0)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where JSON/PNG go")
    parser.add_argument("--model", default=model, help=f"policy: tiny://..., a path or a Hub id (default {model})")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    return parser


def check_args(args, *, min_steps: int = 1) -> None:
    """Impossible configurations fail before anything runs, naming the flag and the accepted range."""
    if args.steps < min_steps:
        raise SystemExit(f"--steps={args.steps}: this benchmark needs at least {min_steps} steps")
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads={args.threads}: must be >= 1")


def base_config(cli, trainer: str, /, **overrides) -> dict:
    """The worker config of one run from the parsed command line; `overrides` may include the worker's own
    `args` (extra trainer-config fields), hence the positional-only parameters."""
    config = {
        "trainer": trainer,
        "model": cli.model,
        "steps": cli.steps,
        "seed": cli.seed,
    }
    if cli.threads is not None:
        config["threads"] = cli.threads
    config.update(overrides)
    return config


def sft_warm_start(cli) -> str:
    """The SFT-warm-started policy of the reward-hacking and KL-control benchmarks: `cli.model` after one SFT pass
    on the embedded task's sft split (benchmarks/_sft_worker.py), cached per model and seed in the temp directory.
    A real model id (GPU) is taken as already instruction-tuned and returned as it is."""
    if not str(cli.model).startswith("tiny://"):
        return cli.model
    from trl_safeppo.models import resolve_model_path

    from benchmarks._sft_worker import sft_settings

    # keyed by the tiny model's fingerprint and the SFT settings: a changed model or demo setting re-trains
    name = Path(resolve_model_path(cli.model)).name
    key = hashlib.sha256(json.dumps(sft_settings(), sort_keys=True).encode()).hexdigest()[:8]
    warm = Path(tempfile.gettempdir()) / f"trl_safeppo_bench_sft_{name}_{key}_seed{cli.seed}"
    if not (warm / "config.json").exists():
        print(f"SFT warm start of {cli.model} (cached in {warm}) ...", flush=True)
    run_worker("benchmarks._sft_worker", {"model": cli.model, "output_dir": str(warm), "seed": cli.seed})
    return str(warm)


def load_stats(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Median [min, max] of the machine's 1-minute load average when each run started: the noise context of a
    timing figure (2 cores with load 2 is a free machine; more is contention)."""
    loads = [r.get("loadavg_1m_at_start") for rs in runs.values() for r in rs]
    return stats([x for x in loads if x is not None])


def bar_panels(panels: list[tuple[str, dict[str, dict[str, float]]]], title: str, colors: Sequence[str] = ()):
    """A row of bar charts, one per (y label, {bar name: stats}) panel: bar = median, error bar = [min, max], the
    median printed above each bar. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = list(colors) or ["tab:grey", "tab:blue", "tab:green", "tab:orange"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (ylabel, bars) in zip(axes[0], panels):
        names = list(bars)
        med = [bars[n]["median"] for n in names]
        err = [[m - bars[n]["min"] for m, n in zip(med, names)], [bars[n]["max"] - m for m, n in zip(med, names)]]
        ax.bar(range(len(names)), med, yerr=err, capsize=4, color=colors[: len(names)])
        for i, m in enumerate(med):
            ax.annotate(f"{m:.3g}" if m < 1000 else f"{m:.0f}", (i, m), textcoords="offset points", xytext=(8, 3),
                        fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
