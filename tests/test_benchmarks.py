"""The benchmark harness's own logic (the benchmarks themselves are scripts, not tests)."""

import subprocess
import sys

import pytest

from benchmarks import _harness as h
from benchmarks.run import BENCHMARKS, main


def test_stats_median_min_max():
    # sorted: 1, 2, 3, 10 -> median (2 + 3) / 2 = 2.5
    assert h.stats([3, 1, 10, 2]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}


def test_timed_steps_drops_each_runs_warmup():
    runs = [{"step_seconds": [9.0, 1.0, 2.0]}, {"step_seconds": [8.0, 3.0]}]
    # warm-up 1 drops 9.0 and 8.0, one per run
    assert h.timed_steps(runs, warmup=1) == [1.0, 2.0, 3.0]


def test_model_timer_counts_nested_calls_once(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 20.0])  # enter@0 (outer), nested enter/exit ignored, exit@5; enter@10, exit@20
    monkeypatch.setattr(h.time, "perf_counter", lambda: next(clock))
    timer = h.ModelTimer()
    timer.enter()  # generate
    timer.enter()  # forward inside generate: no clock read
    timer.exit()
    timer.exit()  # closes at 5.0
    timer.enter()
    timer.exit()
    # (5 - 0) + (20 - 10) = 15 seconds; a double count would give more
    assert timer.seconds == 15.0


def test_unknown_benchmark_lists_accepted(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'nope'" in err
    for name in BENCHMARKS:
        assert name in err


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_has_help(name):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", name, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--steps" in proc.stdout and "--seed" in proc.stdout and "--out" in proc.stdout


def test_impossible_configuration_is_refused_before_running():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "kl_control", "--steps", "2"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "--steps=2" in proc.stderr and "at least 8" in proc.stderr
