"""Where benchmark data lives, and name lookups inside data folders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from loracl.errors import DataError

T = TypeVar("T")

DATA_DIR_ENV = "LORACL_DATA_DIR"


def default_data_root() -> Path:
    """The shared data folder: $LORACL_DATA_DIR, else `../shared/data` next to the repo or the working dir."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: the folder named by {DATA_DIR_ENV} does not exist")
        return root
    repo_root = Path(__file__).resolve().parents[3]  # src/loracl/data/paths.py -> repository root
    cwd = Path.cwd()
    candidates = [repo_root.parent / "shared/data", cwd.parent / "shared/data", cwd / "shared/data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"no benchmark data folder found (tried {tried}); set {DATA_DIR_ENV} or benchmark.data_dir"
    )


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a folder, else raise a DataError naming it as `what`."""
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    return path


def subdirs(path: Path) -> list[Path]:
    """The visible sub-folders of `path`, sorted by name."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:  # unreadable, or replaced by a file since it was checked
        raise DataError(f"{path}: cannot list folder ({exc.strerror or exc})") from None


def _matches(name: str, candidates: Sequence[tuple[str, T]]) -> list[T]:
    # An exact match wins, so folders differing only in case stay reachable.
    exact = [value for key, value in candidates if key == name]
    return exact or [value for key, value in candidates if key.lower() == name.lower()]


def find_named(
    name: str,
    candidates: Sequence[tuple[str, T]],
    where: Path,
    what: str,
    aliases: Sequence[tuple[str, T]] = (),
) -> T:
    """Look `name` up among `candidates` (exact, then case-insensitive), then among `aliases`.

    Raises a DataError listing the available names when nothing matches, or when the name is ambiguous.
    """
    hits = _matches(name, candidates) or _matches(name, aliases)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise DataError(f"{where}: {what} name '{name}' is ambiguous ({len(hits)} matches)")
    available = ", ".join(sorted({key for key, _ in candidates}, key=str.lower)) or "none"
    raise DataError(f"{where}: no {what} named '{name}' (available: {available})")
