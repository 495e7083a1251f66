"""Where a run's numbers come from: the software that computed them, the code's commit, the device, the
data files read (by hash), and a model card for the adapter it exports, so that a results.json or an adapter
found later says what it is."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from loracl import __version__
from loracl.data import Task
from loracl.files import UnsafeFileError, read_bytes_limited
from loracl.models.base_model import SMOLLM2, SMOLLM2_DESCRIPTION

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "rouge-score")
_DATA_SUFFIXES = (".json", ".jsonl")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the loracl checkout in use, "+modified" when tracked files differ from it; None for an
    installed copy (even one inside some other repository, e.g. a virtual environment in a project)."""
    package = Path(__file__).resolve().parents[1]
    top = _git("rev-parse", "--show-toplevel", cwd=package)
    if top is None or Path(top).resolve() / "src" / "loracl" != package:
        return None
    commit = _git("rev-parse", "HEAD", cwd=package)
    changed = _git("status", "--porcelain", "--untracked-files=no", cwd=package)
    return None if commit is None else commit + ("+modified" if changed else "")


def data_files(tasks: list[Task]) -> dict[str, str]:
    """sha256 of every data file the tasks were read from (a task folder's JSON/JSONL files, or its file)."""
    hashes: dict[str, str] = {}
    for task in tasks:
        source = Path(task.source)
        files = (
            sorted(p for p in source.iterdir() if p.suffix in _DATA_SUFFIXES) if source.is_dir() else [source]
        )
        for path in files:
            try:
                hashes[str(path)] = hashlib.sha256(read_bytes_limited(path)).hexdigest()
            except UnsafeFileError:
                continue  # read when the task loaded; gone or changed since: nothing to vouch for
    return hashes


def provenance(tasks: list[Task], device: str) -> dict[str, Any]:
    return {
        "loracl": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "device": device,
        "data_files": data_files(tasks),
    }


def model_card(results: dict[str, Any], base_path: str) -> str:
    """README.md for the exported adapter: what trained it, on which tasks, how it scored, on which base."""
    model = results.get("model", "")
    base = SMOLLM2_DESCRIPTION.format(path=base_path) if model == SMOLLM2 else f"`{model}`"
    metrics = results.get("metrics", {})
    shown = ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if isinstance(v, int | float)) or "n/a"
    rows = "\n".join(
        f"| {i + 1} | {task} | {score:.1f} |"
        if isinstance(score, int | float)
        else f"| {i + 1} | {task} | n/a |"
        for i, (task, score) in enumerate(zip(results["tasks"], results["matrix"][-1], strict=True))
    )
    method, role = results.get("method", ""), results.get("role", "continual")
    commit = results.get("provenance", {}).get("git_commit")
    return f"""---
library_name: peft
base_model: {base_path}
tags:
- lora
- continual-learning
- loracl
- {method}
---

# {method} adapter, trained with loracl

Continual learning with LoRA: the method `{method}` ({role}) trained one task after another on the
`{results.get("benchmark")}` benchmark: {" → ".join(results["tasks"])}.

Base model: {base}.

Metrics (percent, METHODS.md conventions): {shown}.

| step | task | score after the last task |
|---|---|---|
{rows}

Trained by loracl {results.get("loracl_version")} (commit {commit}); the run's `results.json` holds the
whole accuracy matrix, the settings and the provenance. Load it with
`loracl.outputs.loading.load_adapter(folder, base_model)`; a single-LoRA folder also with PEFT alone.
"""
