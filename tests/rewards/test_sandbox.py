"""The sandbox as a kernel boundary: escape attempts score 0 and leave the host untouched; correct code still passes.

Each escape is written so that it *passes* only if the escape worked (the solution records the outcome, the test
asserts it), so a pass would be a real escape. Every escape runs twice: with the Python audit hook (the default) and
without it (``_guard=False``), to show that the host-facing layers are the kernel's, not Python's. Limits are small
to keep this cheap (one run is ~0.1-0.2 s; the CPU-bound and wall-clock cases ~1-3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest

from trl_safeppo.rewards import sandbox
from trl_safeppo.rewards.sandbox import SandboxLimits, run_python, sandbox_available, sandbox_unavailable_reason

LIMITS = SandboxLimits(timeout=3.0, cpu_seconds=1, memory_mb=256, max_processes=8, max_output_bytes=64 << 10)
SANDBOX_PY = Path(sandbox.__file__).resolve()

pytestmark = pytest.mark.skipif(not sandbox_available(), reason=f"sandbox unavailable: {sandbox_unavailable_reason()}")


def _sandbox_processes() -> list[int]:
    """Host PIDs running as a sandbox uid (root mode gives the code a random uid in [2^30, 2^30 + 2^24))."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if sandbox._UID_BASE <= uid < sandbox._UID_BASE + (1 << 24):
            pids.append(int(p))
    return pids


# ---- positive behaviour ---------------------------------------------------------------------------------------


def test_passing_and_failing_code():
    ok = run_python("def f(x):\n    return 2 * x\nprint('hi')", "assert f(3) == 6", LIMITS)
    assert ok.passed and ok.returncode == 0 and ok.isolation == "kernel"
    assert ok.stdout == "hi\n"  # output is returned as is, never parsed
    bad = run_python("def f(x):\n    return x", "assert f(3) == 6", LIMITS)
    assert not bad.passed and bad.returncode == 1 and "AssertionError" in bad.stderr


def test_the_code_can_use_the_standard_library_and_its_tmp():
    code = textwrap.dedent("""
        import collections, decimal, hashlib, heapq, json, math, re, sqlite3, zlib
        P = collections.namedtuple("P", "x y")
        open("scratch.txt", "w").write("x")
        con = sqlite3.connect(":memory:")
        value = (P(1, 2).y, str(decimal.Decimal("0.1") * 3), hashlib.sha256(b"").hexdigest()[:8],
                 zlib.decompress(zlib.compress(b"ab")), con.execute("select 6*7").fetchone()[0])
    """)
    result = run_python(code, "assert value == (2, '0.3', 'e3b0c442', b'ab', 42)\n"
                              "assert open('/tmp/scratch.txt').read() == 'x'", LIMITS)
    assert result.passed, result


def test_threads_and_forks_work_within_the_limits():
    code = textwrap.dedent("""
        import os, threading
        box = []
        t = threading.Thread(target=box.append, args=(1,))
        t.start(); t.join()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"child")
            while True:   # a forked child cannot exit on its own here (exit_group is the verdict's): it waits
                pass
        got = os.read(r, 5)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    """)
    assert run_python(code, "assert box == [1] and got == b'child'", LIMITS).passed


@pytest.mark.parametrize(
    "snippet",
    [
        "import sys\nsys.exit(0)",                       # exiting early is not passing
        "import os\nos._exit(0)",                        # exit_group from the code's thread: killed by seccomp
        "raise SystemExit",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
        "import _thread\n_thread.interrupt_main()\nimport time\ntime.sleep(1)",
    ],
)
def test_early_exit_does_not_pass(snippet):
    result = run_python(snippet, "assert False", LIMITS)
    assert not result.passed and result.returncode != 0, result


def test_unix_sockets_and_odd_text_work():
    code = "import socket\na, b = socket.socketpair()\na.sendall(b'x')\ngot = b.recv(1)\ns = '\\ud800'"
    assert run_python(code, "assert got == b'x' and len(s) == 1", LIMITS).passed
    # A lone surrogate in the program itself is a failed run (it cannot compile), not an unavailable sandbox.
    odd = run_python("x = '\ud800'", "assert False", LIMITS)
    assert odd.isolation == "kernel" and not odd.passed


def test_wall_clock_timeout():
    result = run_python("import time\ntime.sleep(30)", "", SandboxLimits(timeout=1.0, cpu_seconds=1))
    assert not result.passed and result.timed_out and result.returncode is None


def test_cpu_limit():
    # A generous wall clock, so that the CPU limit (1 s) is what stops it even on a busy machine.
    result = run_python("while True:\n    pass", "", SandboxLimits(timeout=30.0, cpu_seconds=1, memory_mb=256))
    assert not result.passed and not result.timed_out and result.returncode == -signal.SIGXCPU


def test_memory_limit():
    result = run_python("x = bytearray(1 << 30)", "", LIMITS)  # 1 GiB > 256 MiB
    assert not result.passed and "MemoryError" in result.stderr


# Fork sleeping children until fork fails, at most 200.
_FORKS = (
    "import os, time\nn = 0\nwhile n < 200:\n    try:\n        pid = os.fork()\n    except OSError:\n"
    "        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    n += 1\nprint('forks', n)"
)


def test_process_limit_is_set_before_the_code_runs():
    # The count stops below max_processes (8 here), never at the 200 cap.
    result = run_python(_FORKS, "", LIMITS)
    assert result.passed, result
    forks = int(result.stdout.split()[-1])
    assert 1 <= forks < LIMITS.max_processes


def test_output_is_capped():
    result = run_python("print('y' * 200_000, flush=True)", "", LIMITS)  # 200 kB > 64 kB
    # RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG and the run fails
    assert not result.passed and result.returncode == 1 and "File too large" in result.stderr
    assert len(result.stdout) <= LIMITS.max_output_bytes


def test_output_of_control_characters_up_to_the_cap_still_passes():
    # 1.5 MB of control characters (each becomes 6 characters, 9 MB, in the JSON record) is under a 2 MiB cap
    limits = SandboxLimits(timeout=10.0, cpu_seconds=5, memory_mb=256, max_output_bytes=2 << 20)
    result = run_python("import sys\nsys.stdout.write('\\x01' * 1_500_000)", "", limits)
    assert result.passed and result.stdout == "\x01" * 1_500_000


def test_bad_limits():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)


def test_user_namespace_path_as_root():
    # The path an ordinary user takes (a user namespace), forced here so it is covered whoever runs the tests.
    # As host root, uid 1 of the namespace (mapped to a random unprivileged host uid) runs the code.
    ok = run_python("import os\nuid = os.getuid()", "assert uid == 1", LIMITS, _mode="userns")
    assert ok.passed, ok
    forks = run_python(_FORKS, "", LIMITS, _mode="userns")
    assert forks.passed and 1 <= int(forks.stdout.split()[-1]) < LIMITS.max_processes, forks
    assert not run_python("open('/etc/shadow').read()", "", LIMITS, _mode="userns").passed
    assert not run_python("import os\nos._exit(0)", "assert False", LIMITS, _mode="userns").passed
    killed = run_python(_SIGNAL_INIT, "assert False", LIMITS, _mode="userns")
    assert killed.isolation == "kernel" and not killed.passed and "AssertionError" in killed.stderr


# Signal init (PID 1) with everything. Where the code has init's uid (an ordinary user's user namespace), init ignores
# them (no handlers), so the run still gets a verdict: a failed run, never "unavailable" (None instead of 0).
_SIGNAL_INIT = ("import os, time\nfor s in (2, 15, 9, 19, 1, 10):\n    try:\n        os.kill(1, s)\n"
                "    except OSError:\n        pass\ntime.sleep(0.2)")


# ---- escapes --------------------------------------------------------------------------------------------------

# name -> (solution, tests): the tests pass only if the escape worked.
ESCAPES = {
    "read_etc_shadow": ("data = open('/etc/shadow').read()", "assert data"),
    "read_proc_cmdline": ("import glob\nfound = glob.glob('/proc/*/cmdline') + glob.glob('/proc/1/environ')\n"
                          "data = open('/proc/1/cmdline', 'rb').read()", "assert found or data"),
    "read_proc_self_mem": ("f = open('/proc/self/mem', 'rb')", ""),
    "read_sys": ("import os\nnames = os.listdir('/sys')", "assert names"),
    "exec_os_system": ("import os\nstatus = os.system('exit 0')", "assert status == 0"),
    "exec_subprocess": ("import subprocess, sys\nrc = subprocess.run([sys.executable, '-c', 'pass']).returncode",
                        "assert rc == 0"),
    "exec_os_execv_interpreter": ("import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])", ""),
    "exec_os_execve_shell": ("import os\nos.execve('/bin/sh', ['sh', '-c', 'exit 0'], {{}})", ""),
    "exec_posix_spawn": ("import os, sys\npid = os.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {{}})\n"
                         "status = os.waitpid(pid, 0)[1]", "assert status == 0"),
    "exec_fork_then_exec": ("import os, sys\npid = os.fork()\nif pid == 0:\n"
                            "    os.execv(sys.executable, [sys.executable, '-c', 'pass'])\n"
                            "status = os.waitpid(pid, 0)[1]", "assert status == 0"),
    "exec_ctypes_execve": ("import ctypes, sys\nlibc = ctypes.CDLL(None)\n"
                           "argv = (ctypes.c_char_p * 3)(sys.executable.encode(), b'-V', None)\n"
                           "rc = libc.execve(sys.executable.encode(), argv, None)", "assert rc == 0"),
    "ctypes_mount": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                     "rc = libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, None)", "assert rc == 0"),
    "ctypes_unshare_user": ("import ctypes\nrc = ctypes.CDLL(None).unshare(0x10000000)", "assert rc == 0"),
    "ctypes_ptrace_init": ("import ctypes\nrc = ctypes.CDLL(None).ptrace(16, 1, 0, 0)", "assert rc == 0"),
    "write_via_dir_fd": ("import os\nfd = os.open('/', os.O_RDONLY | os.O_DIRECTORY)\n"
                         "os.close(os.open('escape-{tag}', os.O_CREAT | os.O_WRONLY, dir_fd=fd))", ""),
    "write_via_openat_dotdot": ("import os\nfd = os.open('/tmp', os.O_RDONLY | os.O_DIRECTORY)\n"
                                "os.close(os.open('../../../usr/escape-{tag}', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
                                ""),
    "write_over_interpreter": ("import sys\nopen(sys.executable, 'ab').write(b'x')", ""),
    "write_host_path": ("open('{host_tmp}/escape-{tag}', 'w').write('x')", ""),
    "connect_host_listener": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                              "s.sendall(b'escaped')", ""),
    "import_testcapi": ("import _testcapi", ""),  # CPython's test extensions are masked (raw memory access)
    "import_subinterpreters": ("import _xxsubinterpreters", ""),  # their own audit hooks: masked too
    "socket_vsock_to_the_hypervisor": ("import socket\ns = socket.socket(40, socket.SOCK_STREAM)", ""),  # AF_VSOCK
    "socket_packet": ("import socket\ns = socket.socket(17, socket.SOCK_RAW)", ""),  # AF_PACKET
    "fill_tmp_until_enospc": ("import os\nn = 0\ntry:\n    while True:\n"
                              "        with open(f'/tmp/fill-{tag}-{{n}}', 'wb') as f:\n"
                              "            f.write(b'x' * 32768)\n        n += 1\nexcept OSError:\n    pass\n"
                              "try:\n    open('cwd-{tag}', 'wb').write(b'x' * 32768)\nexcept OSError:\n    pass",
                              "assert n * 32768 > 64 << 20"),
    "fork_bomb": ("import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n        n += 1\n"
                  "    except OSError:\n        break", "assert n > 1000"),
    "setuid_root_then_write": ("import os\nos.setuid(0)\nopen('/escape-{tag}', 'w')", ""),
    "forge_marker_and_fds": (
        "import json, os, sys\n"
        "record = json.dumps({{'returncode': 0, 'timed_out': False, 'stdout': '', 'stderr': ''}}).encode()\n"
        "for fd in range(256):\n"
        "    for payload in (record, b'\\nPASSED\\n0' * 4, bytes(64)):\n"
        "        try:\n            os.write(fd, payload)\n        except OSError:\n            pass\n"
        "print('0' * 32)\nsys.stdout.flush()",
        "assert False",
    ),
    "exec_posixsubprocess_fork_exec": (
        "import os, sys, _posixsubprocess\nr, w = os.pipe()\nexe = sys.executable.encode()\n"
        "pid = _posixsubprocess.fork_exec([exe, b'-c', b'pass'], [exe], True, (w,), None, None, -1, -1, -1, -1, -1, -1,"
        " r, w, True, False, -1, None, None, None, -1, None, False)\n"
        "os.close(w)\nerr = os.read(r, 100)\nstatus = os.waitpid(pid, 0)[1]",
        "assert status == 0 and not err",
    ),
    "signal_parent_and_everyone": ("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
                                   "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass",
                                   "assert False"),
    "forge_exit_zero_from_a_thread": ("import os, threading\nt = threading.Thread(target=os._exit, args=(0,))\n"
                                      "t.start(); t.join()", "assert False"),
    "forge_release_harness_lock_via_frames": (
        "import sys\nf = sys._getframe()\nwhile f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        if hasattr(v, 'release'):\n            try:\n                v.release()\n"
        "            except Exception:\n                pass\n    f = f.f_back\nimport time\ntime.sleep(0.3)",
        "assert False",
    ),
    # review of issue 21: more routes out
    "open_host_devices": ("import os\nopened = []\nfor p in ('/dev/mem', '/dev/kmem', '/dev/port', '/dev/kmsg', "
                          "'/dev/tty', '/dev/console', '/dev/sda', '/dev/vda', '/dev/nvme0n1', '/dev/kvm', "
                          "'/dev/fuse', '/dev/net/tun', '/dev/shm', '/dev/loop0', '/dev/nvidia0'):\n"
                          "    try:\n        os.close(os.open(p, os.O_RDONLY))\n        opened.append(p)\n"
                          "    except OSError:\n        pass", "assert opened"),
    "mknod_dev_mem": ("import os, stat\nos.mknod('/tmp/mem-{tag}', stat.S_IFCHR | 0o600, os.makedev(1, 1))\n"
                      "data = open('/tmp/mem-{tag}', 'rb').read(16)", "assert data"),
    "symlink_to_host_path": ("import os\nos.symlink('{host_tmp}/escape-{tag}', '/tmp/link-{tag}')\n"
                             "open('/tmp/link-{tag}', 'w').write('x')", ""),
    "abstract_unix_socket_to_host": ("import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                                     "s.settimeout(1)\ns.connect('\\0{abstract}')\ns.sendall(b'escaped')", ""),
    "sethostname": ("import socket\nsocket.sethostname('pwned-{tag}')", ""),
    "daemon_outlives_the_run": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                                "    if os.fork() == 0:\n        time.sleep(20)\n    os._exit(0)", "assert False"),
}

# Forgeries of the verdict through the interpreter's whole object graph. The result pipe and the output are out of
# reach by construction, exiting early is stopped by seccomp, and no frame leads to the verdict lock (all above, with
# and without the hook); but that lock lives in the same process as the code, so walking every object (gc) would
# find it: the audit hook stops that, and these run with it only (see docs/rewards.md, "Threat model").
FORGERIES = {
    "forge_via_gc": ("import gc\nfor o in gc.get_objects():\n    if hasattr(o, 'release') and hasattr(o, 'locked'):\n"
                     "        try:\n            o.release()\n        except Exception:\n            pass",
                     "assert False"),
}


def test_signals_do_not_reach_the_harness():
    # kill(-1) and kill(init) from the code: the run still ends normally and its verdict is the tests' own.
    code = ("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\nx = 1")
    assert run_python(code, "assert x == 1", LIMITS).passed


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def abstract_listener():
    # a unix socket in the abstract namespace, which belongs to the network namespace (no file to hide it)
    name = f"trl-safeppo-test-{uuid.uuid4().hex}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + name)
    srv.listen(8)
    srv.settimeout(0.2)
    yield name, srv
    srv.close()


CASES = [(name, guard) for name in sorted(ESCAPES) for guard in (True, False)] + [(n, True) for n in sorted(FORGERIES)]


@pytest.mark.parametrize(("name", "guard"), CASES, ids=[f"{n}-{'hooked' if g else 'kernel_only'}" for n, g in CASES])
def test_escape_scores_zero_and_leaves_nothing(name, guard, tmp_path, listener, abstract_listener):
    tag = uuid.uuid4().hex
    os.chmod(tmp_path, 0o777)  # even a world-writable host folder is out of reach
    hostname = socket.gethostname()
    solution, tests = {**ESCAPES, **FORGERIES}[name]
    solution = solution.format(tag=tag, host_tmp=tmp_path, port=listener.getsockname()[1],
                               abstract=abstract_listener[0])
    sentinel = subprocess.Popen(["sleep", "30"])  # a host process the code must not be able to signal
    try:
        result = run_python(solution, tests, LIMITS, _guard=guard)
        assert result.isolation == "kernel"
        assert not result.passed, (name, result)
        # nothing left on the host
        for path in (f"/escape-{tag}", f"/usr/escape-{tag}", tmp_path / f"escape-{tag}", f"/tmp/fill-{tag}-0",
                     f"/cwd-{tag}", f"/tmp/cwd-{tag}", Path.cwd() / f"cwd-{tag}"):
            assert not os.path.exists(path), path
        assert sentinel.poll() is None, "a host process was signalled"
        if os.geteuid() == 0:
            deadline = time.monotonic() + 5
            while _sandbox_processes() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _sandbox_processes(), "processes of the sandbox outlived the run"
        with pytest.raises(socket.timeout):
            listener.accept()[0].close()
        with pytest.raises(socket.timeout):
            abstract_listener[1].accept()[0].close()
        assert socket.gethostname() == hostname
    finally:
        sentinel.kill()
        sentinel.wait()


def test_the_parent_environment_does_not_reach_the_code(monkeypatch):
    # Secrets in the trainer's environment (HF_TOKEN, cloud keys) are not the code's: the runner starts with a fixed
    # environment. The tests pass only if the code saw one of them (through os.environ or its own /proc).
    secret = f"hf_{uuid.uuid4().hex}"
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "LD_PRELOAD_TEST_SECRET"):
        monkeypatch.setenv(name, secret)
    code = ("import os\nseen = repr(dict(os.environ))\ntry:\n    seen += open('/proc/self/environ').read()\n"
            "except OSError:\n    pass")
    for guard in (True, False):
        result = run_python(code, f"assert {secret!r} in seen", LIMITS, _guard=guard)
        assert result.isolation == "kernel" and not result.passed, result
        assert secret not in result.stdout + result.stderr
    probe = run_python("import os\nkeys = sorted(os.environ)", "print(keys)", LIMITS)
    assert probe.passed and not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"} & set(eval(probe.stdout))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_killed_run_leaves_no_files_fds_or_processes():
    # A run cut off by the wall clock (and one cut off by the CPU limit) leaves nothing on the host: no temporary
    # file or folder in the host's temp folders, no fd open in this process, no process of the sandbox.
    import tempfile

    folders = [tempfile.gettempdir(), "/dev/shm", "/var/tmp"]

    def snapshot() -> dict[str, set[str]]:
        return {d: set(os.listdir(d)) for d in folders if os.path.isdir(d)}

    before_files, before_fds = snapshot(), _open_fds()
    wall = run_python("import time\nopen('/tmp/big', 'wb').write(b'x' * 4096)\ntime.sleep(60)", "",
                      SandboxLimits(timeout=1.0, cpu_seconds=1, memory_mb=256, max_processes=8))
    cpu = run_python("while True:\n    pass", "", LIMITS)
    assert wall.timed_out and not wall.passed, wall
    assert not cpu.passed, cpu
    after_files, after_fds = snapshot(), _open_fds()
    for d in before_files:  # only names created by this run would matter; other processes' files are ignored
        new = {n for n in after_files[d] - before_files[d] if "sandbox" in n or n.startswith(("tmp", ".tmp"))}
        assert not new, (d, new)
    assert after_fds <= before_fds, after_fds - before_fds
    if os.geteuid() == 0:
        deadline = time.monotonic() + 5
        while _sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _sandbox_processes()


def test_host_sysv_shared_memory_is_out_of_reach():
    # The IPC namespace: a System V segment of the host (key known to the code) cannot be attached from inside.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    key = 0x7E57_0000 + os.getpid() % 0xFFFF
    shmid = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, world-readable and -writable
    if shmid < 0:
        pytest.skip(f"System V shared memory unavailable here (errno {ctypes.get_errno()})")
    try:
        code = (f"import ctypes\nlibc = ctypes.CDLL(None)\nshmid = libc.shmget({key}, 0, 0)")
        result = run_python(code, "assert shmid >= 0", LIMITS, _guard=False)
        assert result.isolation == "kernel" and not result.passed, result
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_exec_is_refused_by_seccomp_not_by_a_missing_file():
    # The interpreter's own binary is in the sandbox root, so EPERM (not ENOENT) is seccomp's doing.
    result = run_python("import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])", "", LIMITS,
                        _guard=False)
    assert not result.passed and "PermissionError: [Errno 1] Operation not permitted" in result.stderr


def test_the_code_sees_an_empty_root():
    code = ("import os\nroot = sorted(os.listdir('/'))\nuid = os.getuid()\nppid = os.getppid()\n"
            "files = os.listdir('/etc')")
    probe = "print(root, uid, ppid, files)"
    result = run_python(code, probe, LIMITS)
    assert result.passed, result
    # No /proc, /sys, /home; /etc only for the dynamic loader's cache; the parent is init of the PID namespace.
    root, rest = result.stdout.split("]", 1)
    assert set(eval(root + "]")) <= {"tmp", "dev", "etc", "usr", "lib", "lib64", "bin", "root", "opt", "home", ".empty"}
    assert "proc" not in root and "sys" not in root
    assert rest.split()[1] == "1"
    assert eval(rest.split(" ", 3)[3]) in (["ld.so.cache"], [])
    # /root holds at most the path to the interpreter, never the host's entries.
    listing = run_python("import os\nnames = os.listdir('/root') if os.path.isdir('/root') else []", "print(names)",
                         LIMITS)
    needed = {p.split("/")[2] for p in (sys.base_prefix, sandbox._base_interpreter()) if p.startswith("/root/")}
    assert set(eval(listing.stdout)) <= needed


def test_capabilities_are_empty_and_no_new_privs_is_set():
    code = textwrap.dedent("""
        import ctypes, struct
        libc = ctypes.CDLL(None)
        header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))
        data = ctypes.create_string_buffer(24)
        assert libc.capget(header, data) == 0
        caps = data.raw
        bounding = [c for c in range(41) if libc.prctl(23, c, 0, 0, 0) == 1]
        nnp = libc.prctl(39, 0, 0, 0, 0)
    """)
    result = run_python(code, "print(caps.hex(), bounding, nnp)", LIMITS, _guard=False)
    assert result.passed, result
    assert result.stdout.split() == ["0" * 48, "[]", "1"]


# ---- as an ordinary user, and fail-closed -------------------------------------------------------------------

_AS_USER = r'''
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sbx", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules["sbx"] = m; spec.loader.exec_module(m)
L = m.SandboxLimits(timeout=5.0, cpu_seconds=2, memory_mb=256, max_processes=8, max_output_bytes=64 << 10)
port = int(sys.argv[2])
cases = {
    "correct": ("def f(x):\n    return 2 * x", "assert f(3) == 6"),
    "failing": ("def f(x):\n    return x", "assert f(3) == 6"),
    "shadow": ("data = open('/etc/shadow').read()", "assert data"),
    "exec": ("import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])", ""),
    "exit0": ("import os\nos._exit(0)", "assert False"),
    "listener": ("import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=1)" % port, ""),
    "whoami": ("import os\nme = (os.getuid(), sorted(os.listdir('/')))", "print(me)"),
    "signal_init": (sys.argv[3], "assert False"),
    "signal_init_ok": (sys.argv[3], ""),
    "forks": ("import os, time\nn = 0\nwhile n < 200:\n    try:\n        pid = os.fork()\n    except OSError:\n"
              "        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    n += 1", "print(n)"),
}
out = {"available": m.sandbox_available(), "reason": m.sandbox_unavailable_reason()}
for name, (sol, tests) in cases.items():
    r = m.run_python(sol, tests, L)
    out[name] = [r.passed, r.isolation, r.stdout]
print(json.dumps(out))
'''


def _ordinary_user_python() -> str | None:
    """An interpreter that uid 65534 can run and that can read this checkout, via setpriv; None if there is none."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for candidate in (sandbox._base_interpreter(), "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        check = (f"import os, sys; open({str(SANDBOX_PY)!r}).read(); "
                 f"sys.exit(0 if os.access({candidate!r}, os.R_OK | os.X_OK) else 1)")
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", candidate, "-I", "-c",
                                check], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


def test_as_an_ordinary_user(listener):
    python = _ordinary_user_python()
    if python is None:
        pytest.skip("needs root (to drop to uid 65534 with setpriv) and an interpreter that uid can run")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", _AS_USER,
                           str(SANDBOX_PY), str(listener.getsockname()[1]), _SIGNAL_INIT],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if not out["available"]:
        # Fail closed: nothing ran, every case is "unavailable" and not passed.
        assert all(out[k][:2] == [False, "unavailable"] for k in out if k not in ("available", "reason"))
        pytest.skip(f"unprivileged user namespaces are off here; failed closed as it must: {out['reason']}")
    assert out["correct"][:2] == [True, "kernel"]
    for name in ("failing", "shadow", "exec", "exit0", "listener"):
        assert out[name][:2] == [False, "kernel"], (name, out[name])
    # uid 0 of its own user namespace (the host's 65534), in the empty root
    assert out["whoami"][2].startswith("(0, [")
    assert 1 <= int(out["forks"][2]) < 8  # RLIMIT_NPROC counts this run only
    assert out["signal_init"][:2] == [False, "kernel"] and out["signal_init_ok"][:2] == [True, "kernel"]
    with pytest.raises(socket.timeout):
        listener.accept()[0].close()


def test_fails_closed_where_the_kernel_refuses_namespaces():
    # Inside a user namespace whose nested-namespace budget is 0 (max_user_namespaces is per user namespace, so the
    # host is untouched), the sandbox cannot be built: run_python reports "unavailable", code_tests returns None
    # and warns once.
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    script = textwrap.dedent("""
        import json, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from trl_safeppo.rewards.rules.code import code_tests_reward
            from trl_safeppo.rewards.sandbox import run_python, sandbox_available
            rule = code_tests_reward(timeout=5)
            scores = rule(completions=["def f():\\n    return 1"] * 2, tests=["assert f() == 1"] * 2)
            scores += rule(completions=["def f():\\n    return 1"], tests=["assert f() == 1"])
            direct = run_python("x = 1", "assert x == 1")
        print(json.dumps({"available": sandbox_available(), "scores": scores, "isolation": direct.isolation,
                          "passed": direct.passed, "warnings": [str(w.message) for w in caught
                                                               if "sandbox unavailable" in str(w.message)]}))
    """)
    inner = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c {_shquote(script)}"
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--fork", "sh", "-c", inner],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "always"})
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create a user namespace to simulate the refusal: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["available"] is False
    assert out["scores"] == [None, None, None]
    assert out["isolation"] == "unavailable" and out["passed"] is False
    assert len(out["warnings"]) == 1 and "never runs code unsandboxed" in out["warnings"][0]


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def test_unavailable_result_never_passes(monkeypatch):
    # The parent side of failing closed: an interpreter that cannot be started gives "unavailable", not a score.
    monkeypatch.setattr(sandbox, "_layout", lambda: sandbox._Layout("/nonexistent/python", (), (), (), "x86_64", 40))
    result = run_python("x = 1", "assert x == 1", LIMITS)
    assert result.isolation == "unavailable" and not result.passed and "could not start" in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl_safeppo.rewards.rules.code import CodeTestsRule

        rule = CodeTestsRule(timeout=5)
        assert rule.score("def f():\n    return 1", {"tests": "assert f() == 1"}) is None
