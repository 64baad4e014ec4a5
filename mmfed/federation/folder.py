"""The run folder's safety: it must be usable, one process at a time, and left clean by a crash.

Why: two processes on one folder used to both train (metrics.jsonl then held every round twice), and
a second process with another seed rewrote config.yaml before it was refused, so the folder lied
about its own results. `Run` now (1) checks the folder can be written (`check_run_dir`), (2) builds
and checks everything that needs no folder, (3) takes the folder's lock (`RunLock`: an OS lock on
``.lock``, released when the process ends, even by SIGKILL), (4) re-checks the folder under the lock,
and only then writes. Stale temp files of a killed atomic write are removed under the lock.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import ClassVar

from mmfed.utils.io import remove_stale_temp_files

LOCK_FILE = ".lock"
MIN_FREE_BYTES = 16 * 2**20  # less free space than this, and a checkpoint write would fail mid-run


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (message names the folder and what to do)."""


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_run_dir(path: Path) -> None:
    """`path` is (or can be created as) a writable folder with some free space; else one line naming it."""
    path = Path(path)
    base = _existing_ancestor(path.absolute())
    if not base.is_dir():
        what = "is a file" if base == path.absolute() else f"is under {base}, which is a file"
        raise RunFolderError(
            f"run_dir {path} {what}, not a folder: choose another run_dir=... or name=..."
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"run_dir {path}: folder {base} is not writable (read-only or another user's): choose another "
            "run_dir=... or name=..."
        )
    free = shutil.disk_usage(base).free
    if free < MIN_FREE_BYTES:
        raise RunFolderError(
            f"run_dir {path}: the disk holding {base} is full ({free // 2**20} MiB free): free space or "
            "choose another run_dir=..."
        )


def describe_os_error(error: OSError) -> str:
    """One line for a failed write: the file, the reason, and what to do."""
    where = error.filename or "a file"
    if error.errno == errno.ENOSPC:
        return f"cannot write {where}: no space left on the disk; free space or choose another run_dir=..."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: permission denied (a read-only folder or another user's file); use another path"
    if error.errno == errno.ENOTDIR:
        return f"{where}: a path component is a file, not a folder; use another path"
    return f"{where}: {error.strerror or error}"


class RunLock:
    """An exclusive lock on a run folder, held by one process (re-entrant within it).

    ``.lock`` names the holder (pid, host, start time) so a refused process can say who holds it.
    The OS lock (flock) dies with its process, so a killed run never leaves the folder locked.
    """

    _held: ClassVar[dict[Path, tuple[int, int]]] = {}  # folder -> (fd, how many holders in this process)

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.locked = False

    def acquire(self) -> RunLock:
        import fcntl

        if self.locked:
            return self
        if self.folder in self._held:
            fd, count = self._held[self.folder]
            self._held[self.folder] = (fd, count + 1)
            self.locked = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.folder} is in use by {holder}: wait for it to finish, or choose "
                "another name=... (two runs in one folder would mix their results)"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {stamp})\n".encode())
        self._held[self.folder] = (fd, 1)
        self.locked = True
        return self

    def release(self) -> None:
        if not self.locked:
            return
        self.locked = False
        fd, count = self._held.pop(self.folder)
        if count > 1:
            self._held[self.folder] = (fd, count - 1)
            return
        os.close(fd)  # closing the descriptor drops the flock; the file stays (harmless, reused)

    def clean(self) -> list[Path]:
        """Remove the temp files a killed atomic write left in the folder (only while holding it)."""
        assert self.locked, "clean the run folder only while holding its lock"
        return remove_stale_temp_files(self.folder)
