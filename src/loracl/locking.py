"""An advisory lock on a folder that one loracl process writes (a run directory, a bench cell), so that a
second command started on the same folder is refused instead of mixing its files with the first one's.

The lock is a file `.loracl.lock` inside the folder, holding the owner's pid, host and start time, and held
with `flock`: the kernel releases it when the owner dies, however it dies, so a lock file left by a killed
process is recognised as stale (the flock is free) and taken over. The file is removed on release.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from loracl.errors import LoraclError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, as before
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".loracl.lock"


class FolderBusy(LoraclError):
    """Another live loracl process holds the folder's lock."""


def _owner_text(fd: int) -> dict[str, Any]:
    """What the lock file says of its owner ({} when empty or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def busy_owner(folder: str | Path) -> dict[str, Any] | None:
    """What the lock file of `folder` says of its owner if a live process holds it, else None (no lock, or
    a stale one). A probe: it takes nothing."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _owner_text(fd) or {"pid": "?"}
    finally:
        os.close(fd)  # also drops the shared lock taken when the folder was free
    return None


class FolderLock:
    """`with FolderLock(folder):` holds the folder's lock (creating the folder if needed) or raises
    FolderBusy naming the process that has it. `took_over` is the pid of a dead owner whose lock file was
    left behind (None when there was none)."""

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.fd: int | None = None
        self.took_over: int | None = None
        self.created: Path | None = None  # the topmost folder acquire() had to create, if any

    def acquire(self) -> FolderLock:
        if fcntl is None:
            return self
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing[-1] if missing else None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner_text(fd)
                os.close(fd)
                raise FolderBusy(self._busy_message(owner)) from None
            if self._still_current(fd):
                break
            os.close(fd)  # the previous owner removed the file between our open and our flock: again
        previous = _owner_text(fd).get("pid")
        self.took_over = previous if isinstance(previous, int) and previous != os.getpid() else None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self.fd = fd
        return self

    def _still_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _busy_message(self, owner: dict[str, Any]) -> str:
        who = f"loracl process {owner.get('pid', '?')}"
        if owner.get("host") and owner.get("host") != socket.gethostname():
            who += f" on {owner['host']}"
        return (
            f"{self.folder}: this {self.what} is in use by {who} (lock {self.path}); wait for it to finish "
            "or stop it first"
        )

    def release(self, discard_created: bool = False) -> None:
        """Drop the lock and its file; with `discard_created`, also remove the folders acquire() created,
        where they are still empty (a command refused after locking leaves nothing behind)."""
        if self.fd is None:
            return
        if self._still_current(self.fd):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing drops the flock
        self.fd = None
        if discard_created and self.created is not None:
            for folder in (self.folder, *self.folder.parents):
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self.created:
                    break

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
