"""Pipeline-level progress: "stage i of n: name (type)", with each trainer's own progress bar running inside it.

On a terminal, the pipeline bar is a tqdm bar at the top (one tick per finished stage); the trainers' tqdm bars
(transformers' ``ProgressCallback``) and the sampling bar open below it. When output is not a terminal (CI, a log
file, ``nohup``), there are no bars: plain, timestamped log lines instead, one when a stage starts and ends, and
one per trainer log step from ``PlainProgressCallback`` (use it instead of ``ProgressCallback``; trainers then run
with ``disable_tqdm=True``).

```python
progress = PipelineProgress(n_stages=len(stages))
for i, stage in enumerate(stages, start=1):
    with progress.stage(i, stage.name, stage.type):
        trainer.add_callback(progress.trainer_callback())  # None on a terminal: keep tqdm
        ...
        for batch in progress.bar(batches, desc="sampling"):
            ...
progress.close()
```
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any


def is_terminal(stream: IO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _now() -> str:
    return time.strftime("%H:%M:%S")


class PipelineProgress:
    """Progress of a recipe run: stage ``i`` of ``n``.

    Args:
        n_stages: number of stages in the recipe.
        stream: where to write (default stderr, where tqdm writes too).
        interactive: force bars (True) or plain lines (False); default: whether ``stream`` is a terminal.
        enabled: False on non-main processes (nothing is written).
    """

    def __init__(self, n_stages: int, *, stream: IO | None = None, interactive: bool | None = None,
                 enabled: bool = True):
        self.n_stages = int(n_stages)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = is_terminal(self.stream) if interactive is None else bool(interactive)
        self.enabled = enabled
        self._bar = None
        self._started = time.monotonic()

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(f"[{_now()}] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, index: int, name: str, kind: str = "") -> Iterator[dict]:
        """Context for one stage; logs its start and end (with status and wall time). It yields a dict in which the
        caller may set ``status`` (default ``completed``) and ``detail`` (appended to the end line), so that the
        stage's end is one line."""
        label = f"stage {index}/{self.n_stages}: {name}" + (f" ({kind})" if kind else "")
        if self.enabled and self.interactive and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.n_stages, position=0, leave=True, file=self.stream, unit="stage",
                             bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}]")
        if self._bar is not None:
            self._bar.set_description_str(label)
            self._bar.refresh()
        else:
            self._line(f"{label}: started")
        start = time.monotonic()
        end: dict = {"status": "completed", "detail": ""}
        try:
            yield end
        except BaseException as err:
            end.update(status=f"failed ({type(err).__name__})", detail="")
            raise
        finally:
            elapsed = time.monotonic() - start
            if self._bar is not None:
                self._bar.update(1)
            self._line(f"{label}: {end['status']} in {elapsed:.1f}s" + (f"; {end['detail']}" if end["detail"] else ""))

    def message(self, text: str) -> None:
        """A log line that does not break the bars (e.g. a gate outcome, a tripwire)."""
        self._line(text)

    def bar(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "") -> Any:
        """A progress bar for work inside a stage (sampling): tqdm on a terminal, else a line every 10%."""
        if self.enabled and self.interactive:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True)
        return _PlainBar(iterable, total=total, desc=desc, emit=self._line if self.enabled else lambda _: None)

    def trainer_callback(self):
        """``PlainProgressCallback`` when output is not a terminal, else None (keep the trainer's tqdm bar)."""
        if self.interactive or not self.enabled:
            return None
        return PlainProgressCallback(self._line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._line(f"pipeline finished in {time.monotonic() - self._started:.1f}s")


class _PlainBar:
    """Minimal stand-in for tqdm without a terminal: iterate / update, with a log line every 10% of ``total``."""

    def __init__(self, iterable, *, total, desc, emit):
        self.iterable, self.desc, self.emit = iterable, desc or "progress", emit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self._next = total, 0, 0.1

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self._next - 1e-12:
            self.emit(f"{self.desc}: {self.n}/{self.total}")
            while self._next <= self.n / self.total + 1e-12:
                self._next += 0.1

    def close(self) -> None:
        if not self.total:
            self.emit(f"{self.desc}: {self.n} done")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlainProgressCallback:
    """TrainerCallback printing ``step i/N`` and the headline metrics at each log step (no tqdm)."""

    KEYS = ("loss", "reward", "kl", "entropy", "completions/mean_length", "rewards/margins")

    def __init__(self, emit=None):
        self.emit = emit or (lambda text: print(f"[{_now()}] {text}", file=sys.stderr, flush=True))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        shown = " ".join(f"{k}={logs[k]:.4g}" for k in self.KEYS if isinstance(logs.get(k), (int, float)))
        if shown:  # the end-of-training summary (train_runtime, ...) has none: the stage line follows anyway
            self.emit(f"  step {state.global_step}/{state.max_steps} {shown}")

    def __getattr__(self, name):  # the other TrainerCallback events: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
