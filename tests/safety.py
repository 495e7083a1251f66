"""Shared checks of the safety tests (issue 15): what a refused command must leave behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry below `root` (itself included) -> a digest of its content (files), target (links) or
    kind (folders): equal digests before and after a command mean it changed nothing there."""
    root = Path(root)
    found: dict[str, str] = {}
    if not root.exists() and not root.is_symlink():
        return found
    entries = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in entries:
        key = str(path.relative_to(root.parent))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "special"
    return found


def one_line(capsys: pytest.CaptureFixture, label: str = "error") -> str:
    """The single line a refused command printed on stderr (asserts there was exactly one, and no
    traceback)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{label}: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err
