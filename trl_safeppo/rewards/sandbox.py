"""Run untrusted Python (model completions) behind a kernel boundary: namespaces, an empty root, no capabilities,
seccomp and resource limits. Never runs code unsandboxed: where the kernel refuses, it fails closed.

Process tree of one run (see docs/rewards.md, "Threat model"):

- **parent** (this process): writes the program to a memfd, starts the runner with a fresh interpreter
  (``python -S -s -B``, a controlled environment, nothing inherited but the memfd and the write end of the *result
  pipe*), and reads one JSON record from the result pipe. stdout of the code never reaches the verdict.
- **runner**: ``unshare`` of the mount, PID, network, IPC, UTS and cgroup namespaces (as root), or of a user
  namespace plus those (as an ordinary user, mapping the caller to uid 0 of the new namespace; as host root without
  ``CAP_SYS_ADMIN``, mapping 0 to host root and 1 to a random unprivileged uid, written from outside).
- **init** (PID 1 of the new PID namespace): builds an empty tmpfs root holding only read-only bind mounts of the
  interpreter's standard library and the shared libraries it loads, a private size-limited ``/tmp`` and
  ``/dev/{null,zero,random,urandom}``; ``pivot_root`` into it and detaches the host tree. No ``/proc``, no
  ``/sys``, no ``/etc`` (but ``ld.so.cache``). It forks the worker, waits for it (with a wall-clock deadline),
  copies its stdout/stderr (two memfds) and writes the record to the result pipe. When init exits, the kernel kills
  every process left in the namespace.
- **worker**: closes every inherited fd (the result pipe included), sets the limits (``RLIMIT_AS``, ``CPU``,
  ``NPROC``, ``FSIZE``, ``NOFILE``, ``CORE``), locks the securebits, empties the capability bounding, ambient,
  inheritable, permitted and effective sets (as root it also switches to a random unprivileged uid/gid, so
  ``RLIMIT_NPROC`` holds), sets ``no_new_privs`` and installs a seccomp filter (classic BPF written here, arch
  checked) that denies ``execve``/``execveat``, ``ptrace``, ``mount``, ``unshare``, ``setns``, ``bpf``, ``keyctl``,
  ``io_uring``, namespace flags in ``clone``, sockets other than unix/inet/inet6/netlink (``AF_VSOCK``) and more.
  Its main thread then starts one thread that installs a
  second filter on itself (``exit_group`` kills the process) and runs ``exec(solution)``, ``exec(tests)`` and, only
  if both returned, releases a lock no Python name leads to. The main thread waits, then exits 0 if that lock was
  released, else 1. The code cannot exit 0 by itself (``os._exit(0)`` dies by SIGSYS), cannot reach the result
  pipe, and output is never parsed.

The verdict (``passed``) is: the worker exited 0, within the wall-clock limit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import secrets
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    Args:
        timeout: wall-clock seconds before every process of the run is killed.
        cpu_seconds: CPU seconds (``RLIMIT_CPU``).
        memory_mb: address-space limit in MiB (``RLIMIT_AS``).
        max_processes: processes and threads the code may start (``RLIMIT_NPROC``, counted per run).
        max_output_bytes: largest file the code may write, stdout and stderr included (``RLIMIT_FSIZE``); the
            private ``/tmp`` holds at most ``4 * max_output_bytes`` (at least 1 MiB).
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
    passed: bool          # the worker exited 0: solution and tests ran to the end, within the limits
    returncode: int | None  # the worker's exit status (negative: killed by that signal); None if it never ran
    timed_out: bool
    stdout: str
    stderr: str
    isolation: str        # "kernel", or "unavailable" (nothing ran; stderr says why)


class SandboxUnavailable(RuntimeError):
    """The kernel refused to build the sandbox (no namespaces, no seccomp, unsupported arch)."""


# ---- what the sandbox root holds: probed once per process from the interpreter itself --------------------------

# Runs (unsandboxed, trusted code only) in the base interpreter: imports its compiled standard-library modules and
# lists the shared objects the dynamic loader mapped, by the path the loader used.
_PROBE = r'''
import ctypes, json, os, sys
dirs = [p for p in sys.path[1:] if os.path.isdir(p)]
for d in dirs:
    for name in sorted(os.listdir(d)):
        if name.endswith(".so") and not name.startswith(("_test", "_ctypes_test", "_xxtestfuzz", "xxlimited",
                                                            "_tkinter")):
            try:
                __import__(name.split(".", 1)[0])
            except BaseException:
                pass
class Info(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p), ("phdr", ctypes.c_void_p),
                ("phnum", ctypes.c_uint16)]
names = []
@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)
def visit(info, size, data):
    if info.contents.name:
        names.append(os.fsdecode(info.contents.name))
    return 0
ctypes.CDLL(None).dl_iterate_phdr(visit, None)
print(json.dumps({"dirs": dirs, "libs": names, "executable": os.path.realpath(sys.executable),
                  "cap_last_cap": open("/proc/sys/kernel/cap_last_cap").read().strip()}))
'''

_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class _Layout:
    python: str
    dirs: tuple[str, ...]    # bound read-only as directories (the standard library, lib-dynload)
    files: tuple[str, ...]   # bound read-only as files (the interpreter, shared libraries, ld.so.cache)
    hide: tuple[str, ...]    # directories inside ``dirs`` covered by an empty read-only tmpfs (site-packages)
    arch: str
    cap_last_cap: int
    mask: tuple[str, ...] = ()  # files inside ``dirs`` covered by an empty file (CPython's test extensions)


def _base_interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def _layout() -> _Layout:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the sandbox needs Linux namespaces and seccomp; this is {sys.platform}")
    arch = _ARCHES.get(platform.machine().lower())
    if arch is None:
        raise SandboxUnavailable(f"no seccomp filter for the {platform.machine()} architecture (x86_64, aarch64)")
    python = _base_interpreter()
    try:
        probe = subprocess.run([python, "-S", "-s", "-E", "-c", _PROBE], capture_output=True, text=True, timeout=60,
                               cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        info = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as err:
        raise SandboxUnavailable(f"could not probe the interpreter {python}: {err!r}") from None
    try:
        dirs = tuple(os.path.realpath(d) for d in info["dirs"])
        cap_last_cap = int(info["cap_last_cap"])
    except (KeyError, TypeError, ValueError) as err:
        raise SandboxUnavailable(f"could not probe the interpreter {python}: {err!r}") from None
    inside = lambda p: any(p == d or p.startswith(d + os.sep) for d in dirs)  # noqa: E731
    files = [info["executable"]]
    files += [p for p in info["libs"] if os.path.isabs(p) and not inside(os.path.realpath(p))]
    if os.path.isfile("/etc/ld.so.cache"):
        files.append("/etc/ld.so.cache")
    hide = tuple(os.path.join(d, "site-packages") for d in dirs if os.path.isdir(os.path.join(d, "site-packages")))
    # CPython's own test extensions (_testcapi, _testinternalcapi, _ctypes_test, ...) hand out raw memory access
    mask = tuple(sorted({os.path.join(d, name) for d in dirs for name in os.listdir(d)
                         if name.startswith(_MASKED) and name.endswith(".so")}))
    return _Layout(python=python, dirs=dirs, files=tuple(dict.fromkeys(files)), hide=hide, arch=arch,
                   cap_last_cap=cap_last_cap, mask=mask)


# (and sub-interpreters, which the audit hook of the main interpreter does not watch)
_MASKED = ("_test", "_ctypes_test", "_xxtestfuzz", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
           "_interpchannels", "_interpqueues")


# ---- the code that runs in the runner / init / worker (a fresh interpreter; only the standard library) ----------

_RUNNER = r'''
import ctypes, json, os, resource, signal, struct, sys, _thread, itertools


def _main():
    cfg = json.loads(sys.argv[1])
    result_fd = cfg["result_fd"]

    def report(record):
        data = json.dumps(record).encode()
        while data:
            data = data[os.write(result_fd, data):]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for fn in ("unshare", "mount", "umount2", "prctl", "syscall", "capset", "capget"):
            getattr(libc, fn).restype = ctypes.c_int
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        libc.unshare.argtypes = [ctypes.c_int]

        def check(ret, what):
            if ret != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{what}: {os.strerror(err)}")

        def prctl(op, a=0, b=0, c=0, d=0, what="prctl"):
            ret = libc.prctl(op, a, b, c, d)
            if ret < 0:
                check(ret, what)
            return ret

        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
        if os.getppid() != cfg["parent"]:
            os._exit(1)
        with os.fdopen(cfg["program_fd"], "rb") as f:
            blob = f.read()
        n = struct.unpack("<I", blob[:4])[0]
        solution = blob[4:4 + n].decode("utf-8", "surrogatepass")
        tests = blob[4 + n:].decode("utf-8", "surrogatepass")
        del blob
        global _STATE
        _STATE = (cfg, libc, check, prctl, report, solution, tests)

        NS = 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000 | 0x02000000  # mnt pid net ipc uts cgroup
        NEWUSER = 0x10000000
        uid, gid = os.getuid(), os.getgid()
        with open("/proc/self/uid_map") as f:
            initial = f.read().split() == ["0", "0", "4294967295"]
        # Root of the initial user namespace: mount/PID/... namespaces, and the code runs as a random unprivileged
        # uid. Anyone else (an ordinary user, root of a rootless container): a user namespace first.
        userns = cfg["mode"] == "userns" or os.geteuid() != 0 or not initial
        if not userns and libc.unshare(NS) != 0:
            userns = True  # root without CAP_SYS_ADMIN (a restricted container): try a user namespace instead
        if not userns:
            start_init(cfg["uid"])
        if os.geteuid() == 0 and initial:
            # Host root in a user namespace: uid 0 of the namespace is host root (to reach the interpreter while
            # building the root) and uid 1 is the random unprivileged uid the code runs as (host root is exempt
            # from RLIMIT_NPROC whatever the namespace). A map of two ids must be written from outside.
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            child = os.fork()
            if child == 0:
                try:
                    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
                    os.close(ready_r)
                    os.close(go_w)
                    check(libc.unshare(NS | NEWUSER), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
                    os.write(ready_w, b"u")
                    os.close(ready_w)
                    if os.read(go_r, 1) != b"g":
                        os._exit(3)
                    start_init(1)
                except BaseException as err:
                    report({"error": f"{type(err).__name__}: {err}"})
                os._exit(3)
            os.close(ready_w)
            os.close(go_r)
            if os.read(ready_r, 1) == b"u":
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{child}/{name}", "w") as f:
                        f.write(f"0 0 1\n1 {cfg['uid']} 1\n")
                os.write(go_w, b"g")
            os.close(go_w)
            os.close(result_fd)
            _, status = os.waitpid(child, 0)
            os._exit(0 if status == 0 else 3)
        check(libc.unshare(NS | NEWUSER), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
        start_init(None)  # the code keeps uid 0 of the namespace, which is the caller on the host
    except BaseException as err:
        report({"error": f"{type(err).__name__}: {err}"})
        os._exit(3)


def start_init(switch):
    """Fork PID 1 of the new PID namespace, wait for it and exit. ``switch``: the uid (and gid) the code runs as, in
    the namespace the worker lives in, or None to keep the current one."""
    cfg, libc, check, prctl, report, solution, tests = _STATE
    init = os.fork()
    if init == 0:
        _init(cfg, libc, check, prctl, report, solution, tests, switch)
        os._exit(3)
    os.close(cfg["result_fd"])
    _, status = os.waitpid(init, 0)
    os._exit(0 if status == 0 else 3)


def _init(cfg, libc, check, prctl, report, solution, tests, switch):
    try:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the whole namespace dies with the runner
        prctl(4, 0)               # PR_SET_DUMPABLE 0
        # As PID 1, init ignores every signal it has no handler for (sent from inside the namespace); Python's
        # SIGINT handler would be one, so the code could interrupt init (same uid in a user namespace).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _build_root(cfg, libc, check)
        out = os.memfd_create("stdout")
        err = os.memfd_create("stderr")
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    except BaseException as e:
        report({"error": f"building the sandbox failed: {type(e).__name__}: {e}"})
        os._exit(3)
    worker = os.fork()
    if worker == 0:
        try:
            _worker(cfg, libc, check, prctl, solution, tests, switch, out, err)
        except BaseException as e:
            try:
                os.write(2, f"{type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(2)
        os._exit(2)
    try:
        _supervise(cfg, report, worker, out, err)
    except BaseException as e:  # the code has run: whatever happens now is a failed run, never "unavailable"
        report({"returncode": None, "timed_out": False, "stdout": "", "stderr": f"sandbox init: {e!r}"})
    os._exit(0)


def _supervise(cfg, report, worker, out, err):
    deadline = _monotonic() + cfg["timeout"]
    status, timed_out = None, False
    while status is None:
        try:
            while True:
                pid, st = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if pid == worker:
                    status = st
        except ChildProcessError:
            break
        if status is not None:
            break
        left = deadline - _monotonic()
        if left <= 0:
            timed_out = True
            break
        signal.sigtimedwait([signal.SIGCHLD], min(left, 1.0))
    cap = cfg["output_cap"]
    record = {"timed_out": timed_out, "stdout": _read(out, cap), "stderr": _read(err, 1 << 16)}
    if status is not None:
        code = os.waitstatus_to_exitcode(status)
        if code in (2, 3):  # only the harness exits 2 or 3 (the code itself cannot exit at all)
            record = {"error": "the sandbox worker could not lock itself down: " + record["stderr"][-2000:]}
        else:
            record["returncode"] = code
    report(record)


def _monotonic():
    import time
    return time.monotonic()


def _read(fd, cap):
    chunks, size = [], 0
    while size < cap:
        chunk = os.pread(fd, min(cap - size, 1 << 16), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24


def _build_root(cfg, libc, check):
    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and os.fsencode(src), os.fsencode(dst), fstype and fstype.encode(), flags,
                         data and ctypes.c_char_p(data.encode())), f"mount {src or fstype} on {dst}")

    def locked_flags(path):
        # A remount inside a user namespace must keep the flags the host mount has (they are locked).
        f = os.statvfs(path).f_flag
        flags = 0
        for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                       (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
            if f & st:
                flags |= ms
        if not flags & (MS_NOATIME | MS_RELATIME):
            flags |= MS_STRICTATIME
        return flags

    sources = cfg["dirs"] + cfg["files"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do propagates to the host
    base = next((d for d in ("/mnt", "/media", "/srv", "/opt", "/tmp") if os.path.isdir(d) and not os.path.islink(d)
                 and not any(s == d or s.startswith(d + "/") for s in sources)), None)
    if base is None:
        raise OSError("no free mount point for the sandbox root")
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,nr_inodes=4096,mode=0755")
    root = base

    def place(path, is_dir):
        # Recreate ``path`` under the new root, symlinks included (``/lib64 -> usr/lib64``), and return the real
        # host path it leads to, or None when that is not a directory / regular file.
        seen = 0
        todo = [c for c in path.split("/") if c]
        cur = "/"
        while todo:
            seen += 1
            if seen > 200:
                return None
            comp = todo.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                cur = os.path.dirname(cur)
                continue
            host = os.path.join(cur, comp)
            inner = root + host
            try:
                st = os.lstat(host)
            except OSError:
                return None
            if os.path.islink(host):
                target = os.readlink(host)
                if not os.path.lexists(inner):
                    os.symlink(target, inner)
                todo = [c for c in target.split("/") if c] + todo
                if target.startswith("/"):
                    cur = "/"
                continue
            if todo or os.path.isdir(host):
                if not os.path.isdir(host):
                    return None
                if not os.path.lexists(inner):
                    os.mkdir(inner, 0o755)
                cur = host
                continue
            if not os.path.isfile(host):
                return None
            if not os.path.lexists(inner):
                os.close(os.open(inner, os.O_CREAT | os.O_WRONLY, 0o644))
            return host
        return cur if is_dir else None

    binds = []
    for d in cfg["dirs"]:
        real = place(d, True)
        if real is not None:
            binds.append((real, True))
    for f in cfg["files"]:
        real = place(f, False)
        if real is not None:
            binds.append((real, False))
    for real, _ in sorted(set(binds), key=lambda b: b[0].count("/")):
        target = root + real
        mount(real, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked_flags(real))
    empty = root + "/.empty"
    os.close(os.open(empty, os.O_CREAT | os.O_WRONLY, 0o444))
    for m in cfg["mask"]:
        if os.path.isfile(root + m):
            mount(empty, root + m, None, MS_BIND)
            mount(None, root + m, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for h in cfg["hide"]:
        if os.path.isdir(root + h):
            mount("tmpfs", root + h, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    os.makedirs(root + "/dev", 0o755, exist_ok=True)
    for dev in ("null", "zero", "random", "urandom"):
        if os.path.exists("/dev/" + dev):
            os.close(os.open(root + "/dev/" + dev, os.O_CREAT | os.O_WRONLY, 0o666))
            mount("/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
            mount(None, root + "/dev/" + dev, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC
                  | locked_flags("/dev/" + dev))
    os.makedirs(root + "/tmp", 0o755, exist_ok=True)
    mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={cfg['tmp_bytes']},nr_inodes=1024,mode=1777")
    os.chdir(root)
    check(libc.syscall(cfg["nr"]["pivot_root"], b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "umount the host tree")  # MNT_DETACH
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if os.path.exists("/proc/self") or os.path.exists("/etc/passwd"):
        raise OSError("the host tree is still visible after pivot_root")


# ---- seccomp ------------------------------------------------------------------------------------------------------

def _filter(nr, arch_id, deny, kill=(), clone_ns=True):
    """Classic BPF: wrong arch -> kill; listed syscalls -> EPERM (``kill`` -> kill the process); clone with
    namespace flags -> EPERM; clone3 -> ENOSYS (its flags are out of reach; libc falls back to clone); ioctl
    TIOCSTI and socket families other than unix/inet/inet6/netlink -> EPERM."""
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    KILL, ALLOW = 0x80000000, 0x7FFF0000
    EPERM, ENOSYS = 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch_id), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if arch_id == 0xC000003E:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]  # x32 ABI
    for name in kill:
        prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, KILL)]
    for name in deny:
        prog += [(JEQ, 0, 1, nr[name]), (RET, 0, 0, EPERM)]
    if clone_ns:
        prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS)]
        prog += [(JEQ, 0, 3, nr["clone"]), (LD, 0, 0, 16), (JSET, 0, 1, 0x7E020000), (RET, 0, 0, EPERM)]
        prog += [(LD, 0, 0, 0)]
        prog += [(JEQ, 0, 3, nr["ioctl"]), (LD, 0, 0, 24), (JEQ, 0, 1, 0x5412), (RET, 0, 0, EPERM)]  # TIOCSTI
        prog += [(LD, 0, 0, 0)]
        # socket(): only AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, which the network namespace confines. AF_VSOCK
        # (a VM guest talking to its hypervisor) and the like are not namespaced.
        prog += [(JEQ, 0, 6, nr["socket"]), (LD, 0, 0, 16), (JEQ, 4, 0, 1), (JEQ, 3, 0, 2), (JEQ, 2, 0, 10),
                 (JEQ, 1, 0, 16), (RET, 0, 0, EPERM)]
    prog += [(RET, 0, 0, ALLOW)]
    return prog


def _install(libc, prog):
    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")


def _worker(cfg, libc, check, prctl, solution, tests, switch, out, err):
    global _STATE
    _STATE = None  # the program's source stays out of module globals the code can read
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.closerange(3, 1 << 16)  # the result pipe, the memfds' own fds, anything inherited
    os.chdir("/tmp")
    os.environ.clear()
    os.environ.update({"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PATH": "/nonexistent"})
    # limits (NPROC counts the tasks of the code's uid: itself and its thread, plus runner and init when it keeps
    # the uid they have)
    nproc = cfg["max_processes"] + (1 if switch is not None else 3)
    for res, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_FSIZE, cfg["fsize"]), (resource.RLIMIT_AS, cfg["memory"])):
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
    # capabilities: lock the securebits, empty the bounding and ambient sets, switch uid (root), empty the rest
    # PR_SET_SECUREBITS: NOROOT (+locked), NO_SETUID_FIXUP locked off, KEEP_CAPS locked off, NO_CAP_AMBIENT_RAISE
    prctl(28, 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80, what="securebits")
    for cap in range(cfg["cap_last_cap"] + 1):
        prctl(24, cap, what=f"drop capability {cap} from the bounding set")  # PR_CAPBSET_DROP
    prctl(47, 4, what="clear ambient capabilities")  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    if switch is not None:
        os.setgroups([])
        os.setresgid(switch, switch, switch)
        os.setresuid(switch, switch, switch)
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))
    data = ctypes.create_string_buffer(24)
    check(libc.capset(header, data), "capset")
    check(libc.capget(header, data), "capget")
    if any(data.raw) or any(prctl(23, c) for c in range(cfg["cap_last_cap"] + 1)):
        raise OSError("capabilities are still held")
    prctl(38, 1, what="no_new_privs")
    nr, arch_id = cfg["nr"], cfg["arch_id"]
    _install(libc, _filter(nr, arch_id, cfg["deny"]))
    # The code runs in a thread whose own extra filter kills the process on exit_group: only this main thread can
    # end the process with a status, and it says 0 only if the lock below was released, which happens after the
    # tests returned. No Python name leads to that lock (it sits in an iterator on the C stack of the thread).
    guard = cfg["guard"]
    import traceback
    print_exc, flush_out, flush_err = traceback.print_exc, sys.stdout.flush, sys.stderr.flush
    try:
        sol_code = compile(solution, "solution.py", "exec", dont_inherit=True)
        test_code = compile(tests, "tests.py", "exec", dont_inherit=True)
    except BaseException:
        print_exc()
        flush_err()
        os._exit(1)
    del solution, tests
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["solution.py"]
    blocked = frozenset(("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                         "sys._current_exceptions", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                         "sys.monitoring.register_callback",
                         "code.__new__"))
    kill_exit = _filter(nr, arch_id, (), kill=("exit_group",), clone_ns=False)

    def seal():
        _install(libc, kill_exit)
        if guard:
            def hook(event, args):
                if event in blocked or event[:7] == "ctypes.":
                    raise PermissionError(f"sandbox: {event} is not allowed")
                if event == "object.__setattr__" and len(args) > 1 and args[1] == "__code__":
                    raise PermissionError("sandbox: replacing __code__ is not allowed")
            sys.addaudithook(hook)

    ok, finished = _thread.allocate_lock(), _thread.allocate_lock()
    ok.acquire()
    finished.acquire()
    box = [itertools.chain(iter(seal, None), map(exec, (sol_code, test_code), (namespace, namespace)),
                           iter(ok.release, None))]
    del sol_code, test_code, namespace

    def run(box, finished):
        try:
            for _ in box.pop():
                pass
        except BaseException:
            try:
                print_exc()
            except BaseException:
                pass
        finally:
            for flush in (flush_out, flush_err):
                try:
                    flush()
                except BaseException:
                    pass
            finished.release()

    _exit = os._exit
    try:
        _thread.start_new_thread(run, (box, finished))
        del box
        finished.acquire()
        _exit(0 if ok.acquire(False) else 1)
    except BaseException:
        _exit(1)


_main()
'''

# syscall numbers (x86_64, and the generic table of aarch64)
_NR = {
    "x86_64": dict(
        execve=59, execveat=322, ptrace=101, process_vm_readv=310, process_vm_writev=311, pidfd_getfd=438,
        mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308, bpf=321, keyctl=250,
        add_key=248, request_key=249, perf_event_open=298, userfaultfd=323, init_module=175, finit_module=313,
        delete_module=176, kexec_load=246, kexec_file_load=320, reboot=169, swapon=167, swapoff=168, acct=163,
        quotactl=179, quotactl_fd=443, open_by_handle_at=304, name_to_handle_at=303, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, fanotify_init=300, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, syslog=103, kcmp=312, personality=135,
        vhangup=153, lookup_dcookie=212, modify_ldt=154, iopl=172, ioperm=173, uselib=134, memfd_secret=447,
        settimeofday=164, clock_settime=227, adjtimex=159, clock_adjtime=305, sethostname=170, setdomainname=171,
        mknod=133, mknodat=259, process_madvise=440,
        clone=56, clone3=435, ioctl=16, exit_group=231, socket=41,
    ),
    "aarch64": dict(
        execve=221, execveat=281, ptrace=117, process_vm_readv=270, process_vm_writev=271, pidfd_getfd=438,
        mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, bpf=280, keyctl=219, add_key=217,
        request_key=218, perf_event_open=241, userfaultfd=282, init_module=105, finit_module=273, delete_module=106,
        kexec_load=104, kexec_file_load=294, reboot=142, swapon=224, swapoff=225, acct=89, quotactl=60,
        quotactl_fd=443, open_by_handle_at=265, name_to_handle_at=264, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, fanotify_init=262, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
        fsmount=432, fspick=433, mount_setattr=442, syslog=116, kcmp=272, personality=92, vhangup=58,
        lookup_dcookie=18, memfd_secret=447, settimeofday=170, clock_settime=112, adjtimex=171, clock_adjtime=266,
        sethostname=161, setdomainname=162, mknodat=33, process_madvise=440,
        clone=220, clone3=435, ioctl=29, exit_group=94, socket=198,
    ),
}
_ARCH_ID = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_NOT_DENIED = ("clone", "clone3", "ioctl", "exit_group", "socket")  # handled by argument (or per thread) in the filter
_UID_BASE = 1 << 30  # root runs the code as a random uid in [2^30, 2^30 + 2^24): its own RLIMIT_NPROC count

_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _unavailable(reason: str) -> SandboxResult:
    return SandboxResult(passed=False, returncode=None, timed_out=False, stdout="", stderr=reason,
                         isolation="unavailable")


def run_python(solution: str, tests: str = "", limits: SandboxLimits = SandboxLimits(), *, _guard: bool = True,
               _mode: str = "auto") -> SandboxResult:
    """Run ``solution`` then ``tests`` (Python source, one namespace) in the sandbox described in the module
    docstring. Never raises for anything the code does; ``passed`` tells whether both ran to the end. When the
    kernel refuses to build the sandbox nothing runs and ``isolation == "unavailable"``.

    ``_guard=False`` (tests only) leaves out the Python audit hook that keeps the code away from the verdict lock,
    to show that the host-facing layers hold without it. ``_mode="userns"`` (tests only) takes the ordinary-user
    path (a user namespace) even as root."""
    try:
        layout = _layout()
    except SandboxUnavailable as err:
        return _unavailable(str(err))
    nr = _NR[layout.arch]
    cfg = {
        "parent": os.getpid(), "mode": _mode, "guard": bool(_guard), "timeout": float(limits.timeout),
        "cpu": int(limits.cpu_seconds), "memory": int(limits.memory_mb) << 20,
        "max_processes": int(limits.max_processes),
        "fsize": int(limits.max_output_bytes), "output_cap": int(limits.max_output_bytes),
        "tmp_bytes": max(4 * int(limits.max_output_bytes), 1 << 20), "uid": _UID_BASE + secrets.randbelow(1 << 24),
        "dirs": list(layout.dirs), "files": list(layout.files), "hide": list(layout.hide),
        "mask": list(layout.mask), "nr": nr,
        "arch_id": _ARCH_ID[layout.arch], "cap_last_cap": layout.cap_last_cap,
        "deny": [name for name in nr if name not in _NOT_DENIED],
    }
    sol, tst = solution.encode("utf-8", "surrogatepass"), tests.encode("utf-8", "surrogatepass")
    program = os.memfd_create("program", os.MFD_CLOEXEC)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(program, struct.pack("<I", len(sol)))
        _write_all(program, sol)
        _write_all(program, tst)
        os.lseek(program, 0, os.SEEK_SET)
        cfg["program_fd"], cfg["result_fd"] = program, write_end
        argv = [layout.python, "-S", "-s", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
        try:
            proc = subprocess.Popen([*argv, "-c", _RUNNER, json.dumps(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(program, write_end),
                                    close_fds=True, start_new_session=True, env=_ENV, cwd="/")
        except OSError as err:
            return _unavailable(f"could not start {layout.python}: {err}")
    finally:
        os.close(program)
        os.close(write_end)
    # the record holds stdout and stderr as JSON strings: at most 6 characters per byte (``\\u0001``)
    record_cap = 6 * (int(limits.max_output_bytes) + (1 << 16)) + (1 << 16)
    record, errors, killed = _collect(proc, read_end, limits.timeout + 10.0, record_cap)
    if record is not None and "error" in record:  # refused before any of the code ran
        return _unavailable(record["error"])
    if record is None:  # no verdict (killed, or died after the code started): a failed run, never "unavailable"
        return SandboxResult(False, None, killed, "", errors or "the sandbox gave no result", "kernel")
    code = record.get("returncode")
    timed_out = bool(record.get("timed_out"))
    return SandboxResult(passed=code == 0 and not timed_out, returncode=code, timed_out=timed_out,
                         stdout=record.get("stdout", ""), stderr=record.get("stderr", ""), isolation="kernel")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _collect(proc: subprocess.Popen, result_fd: int, grace: float, cap: int) -> tuple[dict | None, str, bool]:
    """Read the result record and the runner's own stderr (bounded) until both close; kill the runner's process
    group if that takes longer than ``grace`` (init enforces the real wall-clock limit)."""
    deadline = time.monotonic() + grace
    result, errors, killed = bytearray(), bytearray(), False
    sel = selectors.DefaultSelector()
    sel.register(result_fd, selectors.EVENT_READ, result)
    sel.register(proc.stderr, selectors.EVENT_READ, errors)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                killed = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif len(key.data) < cap:
                    key.data.extend(chunk)
    finally:
        sel.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner (and so init and the namespace) never outlives a run
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        proc.stderr.close()
        os.close(result_fd)
    try:
        record = json.loads(bytes(result)) if result else None
    except ValueError:
        record = None
    return record, errors.decode("utf-8", "replace")[-8000:], killed


# ---- availability ---------------------------------------------------------------------------------------------

_warned = threading.Lock()
_warned_once: list[bool] = []


@functools.lru_cache(maxsize=1)
def _probe() -> str:
    result = run_python("x = 1", "assert x == 1", SandboxLimits(timeout=20.0, cpu_seconds=5, memory_mb=512))
    if result.isolation == "unavailable":
        return result.stderr or "unknown reason"
    if not result.passed:
        return f"a trivial program did not pass in the sandbox (exit {result.returncode}): {result.stderr[-500:]}"
    return ""


def sandbox_available() -> bool:
    """True if the kernel lets this process build the sandbox (probed once per process, then cached)."""
    return not _probe()


def sandbox_unavailable_reason() -> str:
    """Why `sandbox_available` is False ("" when it is True)."""
    return _probe()


def warn_unavailable(reason: str) -> None:
    """Warn once per process that sandboxed rules return None because the sandbox cannot be built."""
    with _warned:
        if _warned_once:
            return
        _warned_once.append(True)
    message = (
        "trl_safeppo sandbox unavailable, so code_tests returns None (never runs code unsandboxed): "
        f"{reason}. It needs Linux with seccomp and either root with CAP_SYS_ADMIN or unprivileged user "
        "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 where it exists; "
        "in Docker: a seccomp profile that allows unshare/mount, or --cap-add SYS_ADMIN)."
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
