"""The project's one way to put a file or a folder on disk: write it under a temporary name, then rename.

A reader (a resumed run, a later stage, the report) sees either the old content or the new, never half of it: a
kill, a full disk or an exception while writing leaves the destination as it was and removes the temporary. Every
module writes through these helpers; none hand-rolls its own ``os.replace``.

- :func:`atomic_path`: a context manager that yields a temporary path beside the destination, for writers that want a
  path (``torch.save``, ``fig.savefig``, ``Dataset.save_to_disk``). On success the temporary replaces the
  destination; on any exception it is removed.
- :func:`write_text`, :func:`write_bytes`, :func:`write_json`: the common cases in one line.
- :func:`atomic_dir`: the same for a folder (:func:`install_dir` moves a folder written under an agreed name). The new folder replaces the old one whole; the old one is moved aside
  first and deleted only once the new one is in place.

The temporary lives in the destination's folder (same filesystem, so ``os.replace`` is an atomic rename) and its
name starts with ``.tmp-``, which :func:`is_temporary` recognizes so that readers can skip leftovers of a process
killed with SIGKILL (no cleanup can run then).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]
TEMP_PREFIX = ".tmp-"


def is_temporary(path: PathLike) -> bool:
    """Whether ``path`` names a temporary left by these helpers (a writer killed before its rename).

    >>> is_temporary("/runs/x/.tmp-abc123-manifest.json"), is_temporary("/runs/x/manifest.json")
    (True, False)
    """
    return os.path.basename(os.fspath(path)).startswith(TEMP_PREFIX)


def _fsync_dir(directory: str) -> None:
    # Make the rename itself durable (POSIX: a rename is recorded in the folder's entry). Best effort: some
    # filesystems refuse O_RDONLY on a folder or fsync on it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True, mode: int | None = None) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on a clean exit it replaces ``path`` atomically.

    ``mode``: the new file's permissions (the temporary is created 0600; 0o644 for a file meant to be shared).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.txt")) as tmp:
    ...     _ = open(tmp, "w").write("hello")
    >>> open(os.path.join(d, "a.txt")).read(), sorted(os.listdir(d))
    ('hello', ['a.txt'])
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}", suffix=f"-{os.path.basename(path)}")
    os.close(fd)
    try:
        yield tmp
        if fsync and os.path.isfile(tmp):
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``mode``: as :func:`atomic_path`)."""
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8", *, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically (``mode``: as :func:`atomic_path`)."""
    write_bytes(path, text.encode(encoding), mode=mode)


def write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON (one trailing newline) to ``path`` atomically; values JSON cannot hold become ``str``."""
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, replace: bool = True) -> Iterator[str]:
    """Yield a fresh temporary folder beside ``path``; on a clean exit it replaces ``path`` whole.

    An existing ``path`` is first renamed aside (``.tmp-old-...``) and deleted only after the new folder is in
    place, so at every instant ``path`` is either the old folder or the new one (between the two renames, briefly,
    absent: a reader must treat a missing folder as "not written yet"). With ``replace=False`` a folder that is
    already there (another process finished first) is kept and the new one dropped.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with atomic_dir(os.path.join(d, "out")) as tmp:
    ...     _ = open(os.path.join(tmp, "f"), "w").write("x")
    >>> sorted(os.listdir(d)), os.listdir(os.path.join(d, "out"))
    (['out'], ['f'])
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}", suffix=f"-{os.path.basename(path)}")
    try:
        yield tmp
        install_dir(tmp, path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(src: PathLike, path: PathLike, *, replace: bool = True) -> None:
    """Move the finished folder ``src`` (same filesystem) to ``path``, replacing a folder there as :func:`atomic_dir`
    does: the old one is renamed aside first and deleted once the new one is in place. For a folder that several
    processes write under a name they agree on (``trainer.save_model``), then one installs. ``replace=False``: keep
    a folder already at ``path`` (``src`` is deleted)."""
    src, path = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not replace:
        try:
            os.rename(src, path)  # fails when a folder is already there
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(src, ignore_errors=True)
        _fsync_dir(parent)
        return
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}old-")
        os.rmdir(old)
        os.replace(path, old)
    os.replace(src, path)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(directory: PathLike) -> list[str]:
    """Delete the temporaries these helpers left in ``directory`` (a writer killed by SIGKILL); return their names."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        if is_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry.name)
    return removed
