"""The sandbox: hostile snippets score 0 and leave the host untouched. Limits are small to keep this cheap."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from trl_safeppo.rewards.sandbox import SandboxLimits, run_python

# Short limits: the slowest case (an infinite loop) costs ~1 s of wall-clock.
LIMITS = SandboxLimits(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=64 << 10)


def test_passing_and_failing_code():
    ok = run_python("def f(x):\n    return 2 * x", "assert f(3) == 6", LIMITS)
    assert ok.passed and ok.returncode == 0
    bad = run_python("def f(x):\n    return x", "assert f(3) == 6", LIMITS)
    assert not bad.passed and "AssertionError" in bad.stderr


@pytest.mark.parametrize(
    "snippet",
    [
        "import sys\nsys.exit(0)",                       # exiting early is not passing
        "import os\nos._exit(0)",
        "raise SystemExit",
    ],
)
def test_early_exit_does_not_pass(snippet):
    assert not run_python(snippet, "assert False", LIMITS).passed


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        break\n"
                 "raise SystemExit(1)",
    "huge_allocation": "x = bytearray(8 * 1024 ** 3)",
    "socket_connect": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "huge_output": "import sys\nfor _ in range(10 ** 6):\n    sys.stdout.write('x' * 1000)",
    "read_proc": "print(open('/proc/self/environ').read())",
    "ctypes": "import ctypes\nctypes.CDLL(None)",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_snippets_score_zero(name):
    result = run_python(HOSTILE[name], "", LIMITS)
    assert not result.passed, (name, result)


def test_process_limit_is_set_before_the_code_runs():
    # Fork sleeping children until fork fails: the count stops below RLIMIT_NPROC (8 here), never at the 200 cap.
    code = (
        "import os, time\nn = 0\nwhile n < 200:\n    try:\n        pid = os.fork()\n    except OSError:\n"
        "        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    n += 1\nprint('forks', n)"
    )
    result = run_python(code, "", LIMITS)
    assert result.passed, result
    forks = int(result.stdout.split()[-1])
    assert forks < LIMITS.max_processes


def test_writing_outside_the_directory_is_blocked(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}"
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is out of bounds
    result = run_python(f"open({str(target)!r}, 'w').write('x')", "", LIMITS)
    assert not result.passed and "outside the working directory" in result.stderr
    assert not target.exists()
    # Inside its own directory it may write.
    assert run_python("open('scratch.txt', 'w').write('x')", "assert open('scratch.txt').read() == 'x'", LIMITS).passed


def test_output_is_capped():
    result = run_python("print('y' * 200_000)", "", LIMITS)
    assert not result.passed
    assert len(result.stdout) <= LIMITS.max_output_bytes


def test_bad_limits():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)


def test_without_namespaces_leftover_processes_are_killed(monkeypatch):
    # Force the fallback (no unshare): a child that leaves the process group with setsid() must still be killed.
    import trl_safeppo.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox, "unshare_command", lambda: ())
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    print(os.getpid(), flush=True)\n"
            "    time.sleep(60)\n    os._exit(0)\ntime.sleep(0.5)")
    result = sandbox.run_python(code, "", LIMITS)
    assert result.isolation == "audit-hooks" and result.passed
    pid = int(result.stdout.split()[0])
    for _ in range(100):  # SIGKILL was sent; give the kernel a moment to tear the process down (<= 5 s)
        state = _proc_state(pid)
        if state in ("Z", "X", "gone"):  # dead (a zombie until its new parent reaps it)
            break
        time.sleep(0.05)
    assert state in ("Z", "X", "gone")
    # The audit hooks still block the network.
    assert "socket.__new__ is not allowed" in sandbox.run_python("import socket\nsocket.socket()", "", LIMITS).stderr


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
