"""`loracl show`: what a run's model answered on a task's test examples, from the predictions.jsonl each
training step leaves in its folder (loracl.recipes.run), so that nobody has to guess what was missed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loracl.errors import RunFolderError
from loracl.files import UnsafeFileError, read_text_limited

PREDICTIONS = "predictions.jsonl"
_STEP = re.compile(r"^(\d+)-")


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's training-step folders holding predictions, by step (joint training: step 1)."""
    found = []
    for folder in sorted((run_dir / "tasks").glob("*")):
        match = _STEP.match(folder.name)
        step = int(match.group(1)) if match else 1 if folder.name == "joint" else None
        if step is not None and (folder / PREDICTIONS).is_file():
            found.append((step, folder))
    return sorted(found)


def predictions_file(run_dir: Path, step: int | None) -> Path:
    """The predictions of the evaluation after training step `step` (default: the last step evaluated)."""
    steps = _step_folders(run_dir)
    if not steps:
        raise RunFolderError(
            f"{run_dir}: no {PREDICTIONS} under tasks/ (a run from before loracl kept them?)"
        )
    if step is None:
        return steps[-1][1] / PREDICTIONS
    for number, folder in steps:
        if number == step:
            return folder / PREDICTIONS
    raise RunFolderError(
        f"{run_dir}: no predictions after step {step} (steps: {', '.join(str(n) for n, _ in steps)})"
    )


def read_predictions(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = read_text_limited(path).splitlines()
    except UnsafeFileError as exc:
        raise RunFolderError(str(exc)) from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("score"), int | float):
            raise RunFolderError(f"{path}:{number}: not a prediction record")
        yield record


def show(
    run_dir: str | Path, task: str, wrong: bool = False, step: int | None = None
) -> list[dict[str, Any]]:
    """The records of `task` (every test example, or with `wrong` those that did not score full marks)."""
    path = predictions_file(Path(run_dir), step)
    records = list(read_predictions(path))
    tasks = sorted({str(r.get("task")) for r in records})
    if task not in tasks:
        raise RunFolderError(f"{path}: no task {task!r} evaluated there (tasks: {', '.join(tasks)})")
    return [r for r in records if r.get("task") == task and (not wrong or r["score"] < 1)]
