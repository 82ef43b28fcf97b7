"""Run untrusted Python (model completions) in a throwaway subprocess with hard limits.

Layers, outermost first:

1. Linux namespaces when ``unshare`` works (probed once): a new network namespace (no interface is up, so no
   network at all) and a new PID namespace whose init is the sandboxed interpreter, so every process it starts is
   killed with it.
2. Resource limits set by the bootstrap before any untrusted code runs: ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_AS``
   (memory), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (largest file, which also caps stdout/stderr since they go
   to files), ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``. When started as root the bootstrap drops to the ``nobody`` user
   first, because root ignores ``RLIMIT_NPROC``.
3. Python audit hooks (PEP 578) installed before the code runs: no sockets, no ``ctypes``, no writes / deletes /
   renames outside the working directory, no reads under ``/proc``, no GC introspection, no ``sys._current_frames``
   (which, with the code running in its own thread, keeps the completion marker out of its reach, see below).
4. A wall-clock timeout after which the whole process group is ``SIGKILL``-ed (without a PID namespace, processes
   that left the group are found by a token in their environment and killed too); the working directory is a
   fresh temporary directory removed afterwards.

A run counts as passed only if the interpreter exits 0 **and** printed, after the test code, a random marker that
the parent sent on stdin before the untrusted code started; so ``os._exit(0)`` or ``sys.exit(0)`` in a completion
does not pass the tests.

Limits, honestly: audit hooks are a Python-level guard (native extension code can bypass them); without ``unshare``
there is no network namespace and no PID namespace, only the audit hooks, the process-group kill and the
environment-token sweep (which a process that rewrites its own environment block would escape). Not a security
boundary for adversarial humans; it is meant for model completions in RL training.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_NOBODY = 65534

# Runs in the child; receives the limits as argv, the marker on stdin, and the program in ./program.py.
_BOOTSTRAP = r'''
import os, resource, sys
def _main():
    cpu, mem, nproc, fsize, drop = (int(a) for a in sys.argv[1:6])
    marker = sys.stdin.readline().strip()
    sys.stdin.close()
    os.close(0)
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem)):
        hard = value + 1 if res == resource.RLIMIT_CPU else value
        resource.setrlimit(res, (value, hard))
    if drop and os.geteuid() == 0:
        # Drop to nobody (root ignores RLIMIT_NPROC) but keep CAP_DAC_READ_SEARCH, so that an interpreter installed
        # under a private home (/root/.pyenv, ...) can still import its standard library.
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS
        os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
        class _Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class _Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]
        data = (_Data * 2)()
        data[0].effective = data[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH only
        if libc.capset(ctypes.byref(_Header(0x20080522, 0)), data) != 0:
            os.write(2, b"sandbox: capset failed; imports outside world-readable paths will fail\n")
        del libc, data
    work = os.path.realpath(os.getcwd())
    with open("program.py", encoding="utf-8") as f:
        program = compile(f.read(), "program.py", "exec")
    os.remove("program.py")
    blocked = {"socket.__new__", "socket.connect", "socket.bind", "sys._current_frames", "sys.settrace",
               "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.addaudithook",
               "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill"}
    writes = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
              "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chdir"}
    realpath, sep, startswith, fsdecode = os.path.realpath, os.sep, str.startswith, os.fsdecode
    def inside(path):
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return p == work or startswith(p, work + sep)
    def hook(event, args):  # stays on until exit: threads the code started may outlive it
        if event in blocked or startswith(event, "ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if isinstance(path, int):
                return
            if startswith(realpath(fsdecode(path)), "/proc"):
                raise PermissionError("sandbox: /proc is not readable")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory: {fsdecode(path)}")
        elif event in writes:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} outside the working directory")
    import threading, traceback
    sys.argv = ["program.py"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    outcome = []
    def run():
        try:
            exec(program, namespace)
        except BaseException as err:  # SystemExit included: exiting early is not passing the tests
            outcome.append(err)
            return
        outcome.append(None)
    # The untrusted code runs in its own thread: its frames never lead back to this one (which holds the marker).
    sys.addaudithook(hook)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # This interpreter is PID 1 of its namespace, which ignores SIGXCPU, so its own CPU time is polled here (its
    # children, if any, are stopped by RLIMIT_CPU as usual).
    while thread.is_alive():
        thread.join(0.02)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if usage.ru_utime + usage.ru_stime > cpu:
            os.write(2, b"sandbox: CPU time limit exceeded\n")
            os._exit(1)
    if outcome != [None]:
        err = outcome[-1] if outcome else RuntimeError("the code did not finish")
        traceback.print_exception(err) if isinstance(err, BaseException) else None
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(1, ("\n" + marker + "\n").encode())
    sys.stderr.flush()
    os._exit(0)
_main()
''' % {"nobody": _NOBODY}


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    Args:
        timeout: wall-clock seconds before the process group is killed.
        cpu_seconds: CPU seconds (``RLIMIT_CPU``).
        memory_mb: address-space limit in MiB (``RLIMIT_AS``).
        max_processes: process limit (``RLIMIT_NPROC``) for the sandbox user.
        max_output_bytes: largest file the code may write, stdout and stderr included (``RLIMIT_FSIZE``).
    """

    timeout: float = 5.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    max_output_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("timeout", "cpu_seconds", "memory_mb", "max_processes", "max_output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool          # exit 0 and the completion marker seen after the tests
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    isolation: str        # "namespaces" or "audit-hooks"


@functools.lru_cache(maxsize=1)
def unshare_command() -> tuple[str, ...]:
    """The ``unshare`` prefix that works here (network + PID namespaces), or ``()`` when none does."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for prefix in ((exe, "--net", "--pid", "--fork", "--kill-child"),
                   (exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", "import os; print(os.getpid())"],
                                   capture_output=True, timeout=10, text=True)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0 and probe.stdout.strip() == "1":
            return prefix
    return ()


def _kill_leftovers(token: str) -> None:
    """Without a PID namespace, a process the code started may have left the process group (``os.setsid``): find
    the processes whose environment carries this run's token and kill them."""
    needle = f"TRL_SAFEPPO_SANDBOX={token}".encode()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def _read_capped(path: str, cap: int) -> str:
    with open(path, "rb") as f:
        return f.read(cap).decode("utf-8", "replace")


def run_python(solution: str, tests: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``solution`` then ``tests`` (Python source, same namespace) in the sandbox described in the module
    docstring. Never raises for anything the code does; ``passed`` tells whether both ran to the end."""
    base = tempfile.mkdtemp(prefix="trl_safeppo_sandbox_")
    work = os.path.join(base, "work")
    os.mkdir(work)
    drop = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    if drop:
        os.chown(work, _NOBODY, _NOBODY)
        os.chmod(base, 0o711)
    with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
        f.write(solution.rstrip() + "\n\n" + tests)
    marker = secrets.token_hex(16)  # proves the tests ran to the end; never in the child's environment or files
    token = secrets.token_hex(16)   # finds leftover processes; visible to the code, which is harmless
    prefix = unshare_command()
    argv = [*prefix, sys.executable, "-I", "-c", _BOOTSTRAP, str(limits.cpu_seconds), str(limits.memory_mb << 20),
            str(limits.max_processes), str(limits.max_output_bytes), str(int(drop))]
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "TRL_SAFEPPO_SANDBOX": token}
    out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
    timed_out, returncode = False, None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                try:
                    proc.stdin.write((marker + "\n").encode())
                    proc.stdin.close()
                except OSError:
                    pass
                returncode = proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: leftovers of a fork bomb included
                except (ProcessLookupError, PermissionError):
                    pass
                if returncode is None:
                    proc.wait()
                if not prefix:
                    _kill_leftovers(token)
        stdout = _read_capped(out_path, limits.max_output_bytes)
        stderr = _read_capped(err_path, 64 << 10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    passed = returncode == 0 and not timed_out and lines[-1] == marker
    if passed:
        stdout = lines[0] if len(lines) == 2 else ""
    return SandboxResult(passed=passed, returncode=returncode, timed_out=timed_out, stdout=stdout, stderr=stderr,
                         isolation="namespaces" if prefix else "audit-hooks")
