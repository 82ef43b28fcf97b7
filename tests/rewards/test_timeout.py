"""TimedReward: a reward function with a per-call deadline, run in a worker process that is killed on timeout."""

from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from trl_safeppo.rewards import RewardRuleError, resolve
from trl_safeppo.rewards.timeout import RewardTimeoutError, TimedReward, check_timeout, with_timeouts

GOOD = "<think>3+4</think><answer>7</answer>"
WRONG = "<answer>8</answer>"


class Sleeps:
    """1.0 per completion after sleeping `seconds`; with `child`, first starts `sleep 300` in the background and
    writes its pid to that file (a process the reward left behind)."""

    __name__ = "sleeps"

    def __init__(self, seconds: float, child: str | None = None):
        self.seconds, self.child = seconds, child

    def __call__(self, prompts=None, completions=None, **kwargs):
        if self.child:
            proc = subprocess.Popen(["sleep", "300"])
            with open(self.child, "w") as f:
                f.write(str(proc.pid))
        time.sleep(self.seconds)
        return [1.0] * len(completions)


class Raises:
    __name__ = "raises"

    def __call__(self, prompts=None, completions=None, **kwargs):
        raise KeyError("no such column")


class DiesOnce:
    """Kills its own process on the first call (a crash in native code, an OOM kill), then scores 1.0."""

    __name__ = "dies_once"

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, prompts=None, completions=None, **kwargs):
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(9)
        return [1.0] * len(completions)


class Pid:
    """Scores every completion with the id of the process that scored it."""

    __name__ = "pid"

    def __call__(self, prompts=None, completions=None, **kwargs):
        return [float(os.getpid())] * len(completions)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) is gone for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_a_fast_reward_returns_what_the_function_returns_and_replays_its_logs():
    checker = resolve([{"name": "format", "weight": 0.5}, {"name": "math"}])
    metrics, extra = defaultdict(list), {}
    timed = TimedReward(checker, 30)
    out = timed(completions=[GOOD, WRONG], answer=["7", "7"], log_metric=lambda k, v: metrics[k].append(v),
                log_extra=lambda k, v: extra.__setitem__(k, v))
    assert out == checker(completions=[GOOD, WRONG], answer=["7", "7"]) == [1.5, 0.125]
    # the checker's own logs, replayed from the worker; its none_frac is not logged twice; timeout 0 added
    assert metrics["rewards/math/mean"] == [0.5] and metrics["rewards/rules/none_frac"] == [0.0]
    assert metrics["rewards/rules/timeout"] == [0.0]
    assert extra == {"format": [1.0, 0.25], "math": [1.0, 0.0]}
    assert timed.__name__ == "rules" and timed.pass_threshold == checker.pass_threshold  # forwarded attributes


def test_the_call_runs_in_a_worker_process_kept_across_calls():
    timed = TimedReward(Pid(), 30)
    first, second = timed(completions=["a"]), timed(completions=["b", "c"])
    assert first[0] != os.getpid() and second == [first[0], first[0]]  # one worker, reused
    assert TimedReward(Pid(), None)(completions=["a"]) == [float(os.getpid())]  # no timeout: in-process
    timed.close()
    assert not _alive(int(first[0]))


def test_a_hanging_call_is_cut_off_and_scores_none(tmp_path, caplog):
    child_file = tmp_path / "child.pid"
    timed = TimedReward(Sleeps(60, child=str(child_file)), 1.0)
    metrics = defaultdict(list)
    with caplog.at_level(logging.WARNING, logger="trl_safeppo.rewards.timeout"):
        out = timed(completions=["a", "b", "c"], log_metric=lambda k, v: metrics[k].append(v))
    assert out == [None, None, None]
    assert metrics["rewards/sleeps/timeout"] == [1.0] and metrics["rewards/sleeps/none_frac"] == [1.0]
    assert "did not return within reward_timeout_s=1 s" in caplog.text
    assert "gave no score" in caplog.text
    # nothing left running: the worker and the process the reward started (same process group) are killed
    assert timed._worker is None
    child = int(child_file.read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    # the next call gets a fresh worker, which scores normally
    timed.func.seconds, timed.func.child = 0.0, None
    assert timed(completions=["a"]) == [1.0]


def test_raise_mode_names_the_rule_and_the_timeout():
    with pytest.raises(RewardTimeoutError, match=r"reward rule 'slow' did not return within reward_timeout_s=0.5 s"):
        TimedReward(Sleeps(60), 0.5, name="slow", on_timeout="raise")(completions=["a"])


def test_errors_in_the_worker_reach_the_caller():
    with pytest.raises(RewardRuleError, match=r"reward function 'raises' raised KeyError: 'no such column'"):
        TimedReward(Raises(), 30)(completions=["a"])
    checker = resolve("math")  # a RewardRuleError keeps its own message
    with pytest.raises(RewardRuleError, match="needs the dataset column 'answer'"):
        TimedReward(checker, 30)(completions=["a"])


def test_silent_batches_are_counted():
    metrics = defaultdict(list)
    timed = TimedReward(lambda prompts=None, completions=None, **kw: [None, float("nan")], None, name="nothing")
    out = timed(completions=["a", "b"], log_metric=lambda k, v: metrics[k].append(v))
    assert out[0] is None and math.isnan(out[1])  # returned as they are: GRPO reads both as "no score"
    assert metrics["rewards/nothing/none_frac"] == [1.0] and "rewards/nothing/timeout" not in metrics


def test_pickles_without_its_worker_and_trainer_state_history_is_not_sent():
    class State:
        global_step = 3
        log_history = [{"loss": 1.0}] * 1000

    timed = TimedReward(resolve("format"), 30)
    timed(completions=[GOOD])
    clone = pickle.loads(pickle.dumps(timed))
    assert clone._worker is None and clone.timeout_s == 30 and clone.__name__ == "format"
    assert clone(completions=[GOOD], trainer_state=State()) == timed(completions=[GOOD]) == [1.0]
    assert len(State.log_history) == 1000  # the caller's state is untouched (a copy without history was sent)


def test_with_timeouts_wraps_only_plain_functions():
    import torch

    async def judge(prompts=None, completions=None, **kwargs):
        return [1.0] * len(completions)

    model = torch.nn.Linear(1, 1)
    checker = resolve("format")
    wrapped = with_timeouts([checker, "tiny://reward", model, judge], 10)
    assert isinstance(wrapped[0], TimedReward) and wrapped[0].timeout_s == 10
    assert wrapped[1:] == ["tiny://reward", model, judge]
    assert with_timeouts(wrapped[0], 5) is wrapped[0]  # never wrapped twice
    assert isinstance(with_timeouts(checker, None), TimedReward)  # no timeout: still counted


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "60", True])
def test_bad_timeout_names_field_value_and_fix(value):
    with pytest.raises(ValueError, match=r"reward_timeout_s=.* is invalid; use a number of seconds > 0 such as 60, "
                                         r"or null"):
        check_timeout(value)
    assert check_timeout(None) is None and check_timeout(2) == 2.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers are the Linux path")
def test_a_function_that_does_not_pickle_still_runs_in_a_forked_worker():
    def local(prompts=None, completions=None, **kwargs):  # a closure: not picklable
        return [float(os.getpid())] * len(completions)

    with pytest.raises(Exception):
        pickle.dumps(local)
    assert TimedReward(local, 30)(completions=["a"])[0] != os.getpid()


def test_a_worker_that_dies_is_an_error_and_the_next_call_recovers(tmp_path):
    timed = TimedReward(DiesOnce(str(tmp_path / "died")), 30)
    with pytest.raises(RewardRuleError, match=r"reward function 'dies_once': its worker process died while scoring "
                                              r"\(exit code 9\)"):
        timed(completions=["a"])
    assert timed(completions=["a", "b"]) == [1.0, 1.0]  # a fresh worker


def test_a_wrong_number_of_scores_is_an_error_naming_the_function():
    # 1 score for 2 completions: an error before any metric (none_frac = 1/2 would be logged for a batch of 2)
    def one(prompts=None, completions=None, **kwargs):
        return [1.0]

    for timeout_s in (30, None):  # in a worker and in-process
        with pytest.raises(RewardRuleError, match=r"reward function 'one' returned 1 scores for 2 completions"):
            TimedReward(one, timeout_s)(completions=["a", "b"])


def test_a_spawned_worker_finds_the_recipes_rule_module(tmp_path, monkeypatch):
    # Where workers are spawned (not Linux), the function is unpickled in a fresh interpreter: it must find the
    # recipe's module (listed under imports:, beside the recipe) as the parent does, without sys.path.
    import importlib
    import uuid

    from trl_safeppo.dotted import add_search_folders
    from trl_safeppo.rewards import timeout as timeout_mod

    name = f"spawn_rules_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import os\n\ndef pid(prompts=None, completions=None, **kwargs):\n"
                                         "    return [float(os.getpid())] * len(completions)\n")
    add_search_folders([tmp_path], [name])
    func = importlib.import_module(name).pid
    assert str(tmp_path) not in sys.path
    monkeypatch.setattr(timeout_mod, "_start_method", lambda: "spawn")
    timed = TimedReward(func, 60)
    try:
        scores = timed(completions=["a", "b"])
        assert timed._in_process_why is None and scores[0] == scores[1] != float(os.getpid())
    finally:
        timed.close()
        sys.modules.pop(name, None)


def _descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below ``pid``, from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children[int(fields[1])].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_timed_out_sandboxed_rule_leaves_no_process_behind():
    # code_tests runs each program in the sandbox (its own session, its own PID namespace), so the worker's process
    # group is not all there is to kill: the sandbox dies with the worker (PR_SET_PDEATHSIG down the chain).
    from trl_safeppo.rewards.rules.code import code_tests_reward
    from trl_safeppo.rewards.sandbox import sandbox_available

    if not sandbox_available():
        pytest.skip("sandbox unavailable here")
    import threading

    before = set(_descendants(os.getpid()))
    seen: set[int] = set()  # every process below this one while the call runs (once orphaned, they are not)
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_descendants(os.getpid()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    rule = code_tests_reward(timeout=60, cpu_seconds=60)
    timed = TimedReward(rule, 3.0)
    hangs = "```python\nimport time\ntime.sleep(50)\n```"
    try:
        assert timed(completions=[hangs], tests=["assert True"]) == [None]
    finally:
        done.set()
        watcher.join()
    started = seen - before
    assert len(started) >= 3  # the worker, the sandbox's runner, its init (and the code's process)

    def alive() -> list[int]:
        out = []
        for pid in started:
            try:
                out += [pid] if _alive(pid) else []
            except OSError:  # gone between the two looks
                pass
        return out

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()
    timed.close()
