"""One run per run directory: ``<output_dir>/.lock``, held with ``fcntl.flock`` for as long as the run lasts.

The kernel releases a flock when its holder dies (kill -9 included), so a lock is never left held by a dead run;
the JSON body (``pid``, ``host``, ``started_at``, ``argv``) only serves the messages:

- a second run while the first holds the lock refuses at once, naming the holder's PID, host and start time;
- a body left behind by a run that ended without releasing (killed) means a stale lock: taken over, and said so;
- the body names another host (a folder on a network filesystem): the lock is free, so that run ended or its host
  lost the lock; taken over, and the message says which host to check.

Under ``accelerate launch`` only the main process takes the lock (the runner broadcasts the outcome, so that the
other processes stop too instead of waiting at a barrier).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLocked(ValueError):
    """Another live run holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``RunLock(run_dir).acquire()`` -> a note to print (a stale lock taken over) or ``None``; ``release()``."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.pid = os.getpid()  # only this process releases (a forked child shares the lock, it must not drop it)

    def _body(self) -> dict:
        try:
            text = os.pread(self.fd, 1 << 16, 0).decode("utf-8", "replace") if self.fd is not None else ""
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._body()
            os.close(self.fd)
            self.fd = None
            raise RunDirLocked(self._held_message(holder)) from None
        previous = self._body()
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(self.fd)
        except OSError:  # a full disk: not held, and not left held by this object either
            os.close(self.fd)
            self.fd = None
            raise
        return self._stale_note(previous) if previous.get("pid") else None

    def release(self) -> None:
        if self.fd is None or os.getpid() != self.pid:
            return
        try:  # an empty body means "released cleanly"; the file stays (deleting it would race a newcomer)
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # a run that raised before its explicit release still frees the folder
        try:
            self.release()
        except OSError:
            pass

    def _held_message(self, holder: dict) -> str:
        pid, host, since = holder.get("pid", "?"), holder.get("host", "?"), holder.get("started_at", "?")
        text = f"output_dir {self.path.parent} is in use by another run: PID {pid} on host {host}, started {since}"
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            text += (f" (PID {pid} has exited, but a process it started still holds the lock: find it with "
                     f"`fuser {self.path}`)")
        return text + ". Fix: wait for that run to finish (or stop it), or choose another output_dir"

    def _stale_note(self, previous: dict) -> str:
        pid, host, since = previous.get("pid"), previous.get("host"), previous.get("started_at", "?")
        if host == socket.gethostname():
            return f"took over the lock of an earlier run that did not end cleanly (PID {pid}, started {since}; " \
                   f"that process is gone)"
        return (f"took over a lock left by PID {pid} on another host, {host} (started {since}): the lock was free, "
                f"so that run has ended or its host lost the lock; if it is still writing on {host}, stop it now")
