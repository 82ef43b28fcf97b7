"""Reward functions with a deadline: `TimedReward` runs a reward function in a worker process and gives up on it.

A reward function that hangs (a 60 s sleep, a regex that backtracks forever, a sandbox that never returns) would
stall every training step. A thread cannot be stopped, so the call runs in a worker process of its own, started once
per reward function and kept across calls; the parent sends each batch over a pipe and waits at most `timeout_s`.
On timeout the worker (with its process group) is killed, every completion of the batch scores None (TRL's GRPO
treats None as "no score" and NaN-sums across functions), a warning is logged, and `rewards/<name>/timeout` = 1 is
logged for the tripwires (`reward_timeout`). The next call starts a fresh worker.

Every wrapped call also logs `rewards/<name>/none_frac` (the share of completions the function gave no score:
None, NaN, or all of them on a timeout) unless the function logged it itself (a `RuleChecker` does), for the
`silent_reward` tripwire, and warns when a batch got no score at all.

What the function sees: the same arguments, except that ``log_metric`` / ``log_extra`` are recorders replayed in
the parent in order once the call returns, and ``trainer_state`` is a copy whose ``log_history`` is empty (it grows
with training and would be pickled at every call). Calls that pass ``environments`` (TRL's environment objects,
which live in the trainer process) run in-process without a deadline.

The worker is forked where the platform forks (Linux: no import cost, the function need not even pickle), else
spawned (the function must pickle, as the project's reward functions do). A function that uses CUDA cannot run in a
forked worker: give it ``timeout_s=None`` (or pass GPU reward models as ``nn.Module``, which are never wrapped).
`TimedReward` itself pickles (without its worker), has the wrapped function's ``__name__`` and forwards other
attributes (``pass_threshold``, ``max_score``, ...) to it.
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable

from .base import RewardRuleError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
ON_TIMEOUT = ("none", "raise")


class RewardTimeoutError(RewardRuleError):
    """A reward function did not return within its timeout (raised when ``on_timeout="raise"``: the self-test)."""


def check_timeout(value: Any, field: str = "reward_timeout_s") -> float | None:
    """``None`` or a finite number of seconds > 0; anything else raises one ValueError naming the field and fix."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; use a number of seconds > 0 such as {DEFAULT_TIMEOUT_S:g}, "
                         f"or null to call reward functions without a timeout")
    return float(value)


def _start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "fork" if sys.platform.startswith("linux") and "fork" in methods else "spawn"


def _name_of(func: Callable) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


class _Recorder:
    """Stands in for TRL's ``log_metric`` / ``log_extra`` hooks: records the calls so the parent can replay them."""

    def __init__(self):
        self.calls: list[tuple[str, str, Any]] = []

    def metric(self, name: str, value: float) -> None:
        self.calls.append(("metric", name, value))

    def extra(self, column: str, values: list) -> None:
        self.calls.append(("extra", column, list(values)))


def _call(func: Callable, prompts, completions, completion_ids, kwargs: dict) -> tuple[list, list]:
    """Call ``func`` with recording hooks; returns (scores as a list, recorded hook calls)."""
    recorder = _Recorder()
    kwargs = dict(kwargs)
    if "log_metric" in kwargs:
        kwargs["log_metric"] = recorder.metric
    if "log_extra" in kwargs:
        kwargs["log_extra"] = recorder.extra
    out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    return list(out), recorder.calls


def _serve(func: Callable, conn) -> None:
    """Worker loop: receive a batch, score it, send back ("ok", scores, hook calls) or ("error", type, text)."""
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills whatever the reward started as well
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        pass
    if sys.platform.startswith("linux"):
        try:  # die with the parent, even on kill -9 (strictly: with the parent's thread that started the worker)
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover
            pass
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:  # the parent died before the prctl: nobody to serve
            os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if "torch" in sys.modules:  # as DataLoader workers do: a forked OpenMP pool must not be reused
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", *_call(func, *request))
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
            reply = ("error", type(err).__name__, str(err), traceback.format_exc(), isinstance(err, RewardRuleError))
        try:
            conn.send(reply)
        except Exception as err:  # noqa: BLE001 - an unpicklable score
            conn.send(("error", type(err).__name__, f"its scores could not be sent back: {err}", "", False))


def _serve_spawned(payload: bytes, conn, folders: dict) -> None:
    """Spawned worker: find the recipe's modules (``imports:``) as the parent does, then unpickle the function."""
    import pickle

    from ..dotted import install_listed_folders

    install_listed_folders(folders)
    _serve(pickle.loads(payload), conn)


class _Worker:
    def __init__(self, func: Callable, method: str):
        ctx = multiprocessing.get_context(method)
        self.conn, child = ctx.Pipe()
        if method == "fork":
            target, args = _serve, (func, child)
        else:
            import pickle

            from ..dotted import listed_folders

            target, args = _serve_spawned, (pickle.dumps(func), child, listed_folders())
        self.process = ctx.Process(target=target, args=args, daemon=True, name="reward-worker")
        try:
            self.process.start()
        finally:
            child.close()

    def kill(self) -> None:
        pid = self.process.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except (AttributeError, OSError):
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class TimedReward:
    """A reward function with a per-call timeout (see the module docstring).

    Args:
        func: a reward function with TRL's signature.
        timeout_s: seconds each call may take (> 0), or None: call in-process, without a deadline (the metrics and
            the silent-batch warning stay).
        name: ``__name__`` (default the function's; TRL logs ``rewards/<name>/mean``).
        on_timeout: ``"none"`` (the batch scores None, as in training) or ``"raise"`` (`RewardTimeoutError`, as in the
            pre-flight self-test).
    """

    def __init__(self, func: Callable, timeout_s: float | None = DEFAULT_TIMEOUT_S, *, name: str | None = None,
                 on_timeout: str = "none"):
        if not callable(func):
            raise ValueError(f"TimedReward: {func!r} is not callable")
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"TimedReward: on_timeout={on_timeout!r}; accepted: {list(ON_TIMEOUT)}")
        self.func = func
        self.timeout_s = check_timeout(timeout_s)
        self.__name__ = name or _name_of(func)
        self.on_timeout = on_timeout
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._worker: _Worker | None = None
        self._lock = threading.Lock()
        self._in_process_why: str | None = None  # set once the function was found not to run in a worker
        self._silent_run = 0

    # pickling: the function and the settings, never the worker
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k in ("func", "timeout_s", "__name__", "on_timeout")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __getattr__(self, name: str) -> Any:  # pass_threshold, max_score, rule_names, ... of the wrapped function
        if name.startswith("_") or name == "func":
            raise AttributeError(name)
        return getattr(self.func, name)

    def __repr__(self) -> str:
        return f"TimedReward({self.func!r}, timeout_s={self.timeout_s})"

    def __del__(self):
        worker = self.__dict__.get("_worker")
        if worker is not None:
            try:
                worker.kill()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def close(self) -> None:
        """Stop the worker process (a later call starts a new one)."""
        with self._lock:
            if self._worker is not None:
                self._worker.kill()
                self._worker = None

    # ------------------------------------------------------------------ call
    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float | None]:
        n = len(completions) if completions is not None and hasattr(completions, "__len__") else 0
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        with self._lock:
            scores, calls, timed_out = self._run(prompts, completions, completion_ids, kwargs)
        if not timed_out and completions is not None and len(scores) != n:
            raise RewardRuleError(f"reward function {self.__name__!r} returned {len(scores)} scores for {n} "
                                  "completions; return one score (or None) per completion, in order")
        for kind, key, value in calls:  # replay what the function logged, in order
            hook = log_metric if kind == "metric" else log_extra
            if callable(hook):
                hook(key, value)
        if timed_out:
            if self.on_timeout == "raise":
                raise RewardTimeoutError(
                    f"reward rule {self.__name__!r} did not return within reward_timeout_s={self.timeout_s:g} s on a "
                    f"batch of {n} completions; make it faster, raise reward_timeout_s, or set it to null"
                )
            logger.warning("reward function %r did not return within reward_timeout_s=%g s: its %d scores of this "
                           "batch are None (the worker process was killed; the next batch starts a new one)",
                           self.__name__, self.timeout_s, n)
            scores = [None] * n
        missing = sum(_missing(s) for s in scores)
        if callable(log_metric):
            none_key = f"rewards/{self.__name__}/none_frac"
            if not any(kind == "metric" and key == none_key for kind, key, _ in calls):
                log_metric(none_key, missing / n if n else 0.0)
            if self.timeout_s is not None:
                log_metric(f"rewards/{self.__name__}/timeout", float(timed_out))
        self._warn_if_silent(n, missing)
        return scores

    def _run(self, prompts, completions, completion_ids, kwargs) -> tuple[list, list, bool]:
        """(scores, recorded hook calls, timed out) for one batch; in-process when there is no deadline to keep."""
        if self.timeout_s is None or "environments" in kwargs or self._in_process_why is not None:
            if self.timeout_s is not None and self._in_process_why is None:
                self._in_process("TRL passes `environments` (objects of the trainer process) to it")
            return (*_call(self.func, prompts, completions, completion_ids, kwargs), False)
        request_kwargs = dict(kwargs)
        state = request_kwargs.get("trainer_state")
        if state is not None and getattr(state, "log_history", None):
            state = copy.copy(state)
            state.log_history = []
            request_kwargs["trainer_state"] = state
        if self._worker is None or not self._worker.process.is_alive():
            if self._worker is not None:  # died between calls: reap it before starting the next
                self._worker.kill()
                self._worker = None
            try:
                self._worker = _Worker(self.func, _start_method())
            except Exception as err:  # noqa: BLE001 - e.g. a function that does not pickle under spawn
                self._in_process(f"its worker process could not start ({type(err).__name__}: {err})")
                return (*_call(self.func, prompts, completions, completion_ids, kwargs), False)
        conn = self._worker.conn
        request = (prompts, completions, completion_ids,
                   {k: (True if k in ("log_metric", "log_extra") else v) for k, v in request_kwargs.items()})
        try:
            conn.send(request)
        except (BrokenPipeError, EOFError, ConnectionError) as err:
            code = self._worker.process.exitcode
            self._worker.kill()
            self._worker = None
            raise RewardRuleError(f"reward function {self.__name__!r}: its worker process died "
                                  f"(exit code {code}): {err}") from None
        except Exception as err:  # noqa: BLE001 - the batch does not pickle: score it here, once warned
            self._in_process(f"its inputs could not be sent to a worker ({type(err).__name__}: {err})")
            return (*_call(self.func, prompts, completions, completion_ids, kwargs), False)
        if not conn.poll(self.timeout_s):
            self._worker.kill()
            self._worker = None
            return [], [], True
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            self._worker.process.join(5)
            code = self._worker.process.exitcode
            self._worker.kill()
            self._worker = None
            raise RewardRuleError(f"reward function {self.__name__!r}: its worker process died while scoring "
                                  f"(exit code {code})") from None
        if reply[0] == "error":
            _, type_name, message, trace, is_rule_error = reply
            if is_rule_error:
                raise RewardRuleError(message)
            raise RewardRuleError(f"reward function {self.__name__!r} raised {type_name}: {message}\n"
                                  f"--- in its worker process ---\n{trace}")
        _, scores, calls = reply
        return scores, calls, False

    def _in_process(self, why: str) -> None:
        self._in_process_why = why
        logger.warning("reward function %r runs in the trainer process without its %g s timeout: %s", self.__name__,
                       self.timeout_s, why)

    def _warn_if_silent(self, n: int, missing: int) -> None:
        if n and missing == n:
            if self._silent_run == 0:
                logger.warning("reward function %r gave no score (None or NaN) to any of the %d completions of this "
                               "batch; it contributes nothing to the reward (the `silent_reward` tripwire counts it)",
                               self.__name__, n)
            self._silent_run += 1
        else:
            self._silent_run = 0


def close_workers(reward_funcs: Any) -> None:
    """Stop the worker process of every `TimedReward` in ``reward_funcs`` (one or a list): training ended, and a
    forked worker keeps a copy of the trainer's memory as it was at the fork. A later call starts a new one."""
    for func in reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]:
        if isinstance(func, TimedReward):
            func.close()


def _missing(score: Any) -> bool:
    if score is None:
        return True
    try:
        return math.isnan(float(score))
    except (TypeError, ValueError):
        return False


def with_timeouts(reward_funcs: Any, timeout_s: float | None) -> Any:
    """Wrap every plain synchronous reward function of ``reward_funcs`` (one or a list) in `TimedReward`.

    Left as they are: reward models (``nn.Module``) and their ids or paths (strings), async functions (TRL runs them
    on its event loop), and functions already wrapped. The return has the input's shape (a list stays a list).
    """
    from trl.trainer.utils import is_async_callable

    def wrap(func: Any) -> Any:
        if isinstance(func, (str, os.PathLike, TimedReward)) or not callable(func) or is_async_callable(func):
            return func
        try:
            import torch

            if isinstance(func, torch.nn.Module):
                return func
        except ImportError:  # pragma: no cover
            pass
        return TimedReward(func, timeout_s)

    if isinstance(reward_funcs, (list, tuple)):
        return [wrap(f) for f in reward_funcs]
    return wrap(reward_funcs) if reward_funcs is not None else None
