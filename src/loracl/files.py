"""Crash-safe file writing: write to a temporary name, flush to disk, then rename, so that a reader (or a
resumed run) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError


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


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, flush to disk, then rename: readers never see a torn file. The temporary
    name is the process's own, so processes writing the same file side by side never share one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write_durable(tmp, lambda handle: handle.write(text.encode("utf-8")))
    os.replace(tmp, path)


def write_jsonl_atomic(records: list[Any], path: Path) -> None:
    """One JSON value per line, atomically (see _write_atomic)."""
    _write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def write_json_atomic(data: Any, path: Path) -> None:
    """A JSON file, atomically (see _write_atomic)."""
    _write_atomic(path, json.dumps(data, indent=2))


# Reading files that someone else may have written (data, prompts, run folders): only regular files, never
# more than a bound, UTF-8 text with no lone surrogates, JSON without pathological nesting.
MAX_FILE_BYTES_ENV = "LORACL_MAX_FILE_BYTES"
DEFAULT_MAX_FILE_BYTES = 1 << 30  # 1 GiB: far above any benchmark file of the field, far below a /dev/zero


class UnsafeFileError(ValueError):
    """A file that loracl will not read (not a regular file, too large, not UTF-8): the message is one line
    naming the file; callers turn it into their own LoraclError (DataError, ConfigError, ...)."""


def max_file_bytes() -> int:
    raw = os.environ.get(MAX_FILE_BYTES_ENV)
    return int(raw) if raw and raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_FILE_BYTES


def read_bytes_limited(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file (links followed) of at most `limit` bytes (default: max_file_bytes()).
    Named pipes, devices, sockets and folders are refused before anything is opened, so nothing blocks or
    reads without end; the size is checked on the open file and again while reading (a file that grows)."""
    limit = max_file_bytes() if limit is None else limit
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UnsafeFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise UnsafeFileError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, device or socket)"
        raise UnsafeFileError(f"{path}: {kind}; expected a regular file")
    if info.st_size > limit:
        raise UnsafeFileError(
            f"{path}: {info.st_size} bytes, more than the {limit} loracl reads ({MAX_FILE_BYTES_ENV})"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise UnsafeFileError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise UnsafeFileError(f"{path}: more than the {limit} bytes loracl reads ({MAX_FILE_BYTES_ENV})")
    return data


def first_lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (e.g. from JSON "\\ud800"), which no tokenizer or UTF-8 writer
    accepts; None for valid text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def read_text_limited(path: Path, limit: int | None = None) -> str:
    """A regular UTF-8 text file (a byte-order mark tolerated) of bounded size; see read_bytes_limited."""
    raw = read_bytes_limited(path, limit)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_json_limited(path: Path, limit: int | None = None) -> Any:
    """A JSON file read through read_text_limited; syntax errors and nesting too deep are UnsafeFileError
    with one line. Strings may still hold lone surrogates (JSON's "\ud800" escape): callers that pass text
    on check it with first_lone_surrogate."""
    text = read_text_limited(path, limit)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnsafeFileError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise UnsafeFileError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise UnsafeFileError(f"{path}: invalid JSON: {exc}") from None
    return data


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any] | None:
    """A JSON file that must hold an object, or None when there is no such file; an unreadable file or
    another JSON value raises `error` (a LoraclError class) with one line naming the file."""
    if not os.path.lexists(path):
        return None
    try:
        data = read_json_limited(path)
    except UnsafeFileError as exc:
        raise error(str(exc)) from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that write_json_atomic left in `folder` (`<name>.<pid>.tmp`) when its
    process was killed between writing and renaming; a live process's temporaries are left alone.
    Returns what was removed."""
    removed = []
    for path in Path(folder).glob("*.tmp"):
        pid = path.suffixes[-2].lstrip(".") if len(path.suffixes) >= 2 else ""
        if pid.isdigit() and not _pid_alive(int(pid)) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# Libraries report a failed write (a full disk, a read-only folder) in types of their own: safetensors as
# SafetensorError("... No space left on device"), torch.save as a RuntimeError from its zip writer.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "inline_container", "file write failed")
_WRITE_FAILURE_HINTS = ("No space left on device", "Read-only file system", "Permission denied", "Disk quota")


def is_write_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed write, whatever library raised it (so it is reported as one, not a crash)."""
    if isinstance(exc, OSError | SafetensorError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITE_FAILURES)


def write_failure_reason(exc: BaseException) -> str:
    """One line saying why a write failed ("No space left on device", ...)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    for hint in _WRITE_FAILURE_HINTS:
        if hint in str(exc):
            return hint
    return lines[0][:200]
