"""Pipeline progress (trl_safeppo/monitoring/progress.py) when output is not a terminal: plain log lines."""

from __future__ import annotations

import io
import re

import pytest

from trl_safeppo.monitoring.progress import PipelineProgress


def _lines(buf):
    return [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in buf.getvalue().splitlines()]


def test_plain_lines_for_stages_and_sampling():
    buf = io.StringIO()  # not a terminal
    progress = PipelineProgress(2, stream=buf)
    assert not progress.interactive
    with progress.stage(1, "sft", "sft"):
        list(progress.bar(range(5), desc="sampling"))
    with pytest.raises(RuntimeError):
        with progress.stage(2, "grpo", "grpo"):
            raise RuntimeError("boom")
    lines = _lines(buf)
    assert lines[0] == "stage 1/2: sft (sft): started"
    # 5 items: a line at 1/5 = 20% (>= 10%), 2/5, ... every item passes the next 10% mark
    assert lines[1:6] == [f"sampling: {i}/5" for i in range(1, 6)]
    assert re.fullmatch(r"stage 1/2: sft \(sft\): completed in \d+\.\ds", lines[6])
    assert lines[7] == "stage 2/2: grpo (grpo): started"
    assert re.fullmatch(r"stage 2/2: grpo \(grpo\): failed \(RuntimeError\) in \d+\.\ds", lines[8])


def test_sampling_bar_logs_every_tenth():
    buf = io.StringIO()
    bar = PipelineProgress(1, stream=buf).bar(total=100, desc="sampling")
    for _ in range(100):
        bar.update(1)
    assert _lines(buf) == [f"sampling: {i}/100" for i in range(10, 101, 10)]


def test_trainer_callback_prints_step_and_headline_metrics():
    from transformers import TrainerControl, TrainerState

    buf = io.StringIO()
    callback = PipelineProgress(1, stream=buf).trainer_callback()
    state = TrainerState(global_step=3, max_steps=10)
    callback.on_log(None, state, TrainerControl(), logs={"reward": 0.5, "kl": 0.01234, "epoch": 0.3})
    callback.on_step_end(None, state, TrainerControl())  # other events are no-ops
    callback.on_log(None, state, TrainerControl(), logs={"train_runtime": 1.0, "train_loss": 0.3})  # summary
    assert _lines(buf) == ["  step 3/10 reward=0.5 kl=0.01234"]
    assert PipelineProgress(1, interactive=True).trainer_callback() is None  # a terminal keeps tqdm


def test_disabled_progress_writes_nothing():
    buf = io.StringIO()
    progress = PipelineProgress(1, stream=buf, enabled=False)
    with progress.stage(1, "sft"):
        list(progress.bar(range(3)))
    progress.close()
    assert buf.getvalue() == ""


def test_terminal_shows_a_stage_bar_with_the_stage_name():
    buf = io.StringIO()
    progress = PipelineProgress(2, stream=buf, interactive=True)  # as on a terminal
    with progress.stage(1, "sft", "sft"):
        for _ in progress.bar(range(3), desc="sampling"):
            pass
    progress.close()
    text = buf.getvalue()
    assert "stage 1/2: sft (sft)" in text and "1/2 stages" in text  # the pipeline bar after one stage
    assert "sampling" in text  # the inner bar
    assert "stage 1/2: sft (sft): completed in" in text
