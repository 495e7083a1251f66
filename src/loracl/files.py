"""Crash-safe file writing: write to a temporary name, flush to disk, then rename, so that a reader (or a
resumed run) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create `path` through `write(handle)` and flush it to disk before returning."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_durable(data: Any, path: Path) -> None:
    write_durable(path, lambda handle: handle.write(json.dumps(data, indent=2).encode("utf-8")))


def write_json_atomic(data: Any, path: Path) -> None:
    """Write to a temporary name, flush to disk, then rename: readers never see a torn file. The temporary
    name is the process's own, so processes writing the same file side by side never share one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write_json_durable(data, tmp)
    os.replace(tmp, path)
