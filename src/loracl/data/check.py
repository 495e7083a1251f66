"""`loracl data check`: what a data folder holds, loaded through the real loaders, and which benchmark's
layout it has.

Detection reads the layout (file names) and one file per task folder, so it can tell apart layouts whose
file names agree (cl_benchmark and TRACE both hold `{prompt, answer}` lists; SuperNI task folders hold task
objects under the same names). Runs never detect: `benchmark.name` always decides their format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from loracl.data.benchmarks import (
    ORDERS,
    benchmark_names,
    folder_tasks,
    load_benchmark,
    order_tasks,
    orders_for,
)
from loracl.data.formats import Task, held_out_split, read_json
from loracl.data.paths import require_dir, subdirs
from loracl.errors import DataError

# The split file read to tell a task folder's records apart: test first, usually the smallest.
_SAMPLE_FILES = ("test.json", "dev.json", "eval.json", "train.json")
_OLORA_TASK = "olora task"  # a task folder of {sentence, label} records: an O-LoRA task, inside a category


def _file_names(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.is_file()}
    except OSError:  # unreadable: the folder says nothing about its layout
        return set()


def _record_kind(path: Path) -> str | None:
    """What a JSON file holds: "superni" (a task object), "prompt" ({prompt, answer} records), "sentence"
    ({sentence, label} records); None for anything else, unreadable files included."""
    try:
        data = read_json(path)
    except DataError:
        return None
    if isinstance(data, dict):
        return "superni" if "Instances" in data else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return None
    keys = data[0].keys()
    if {"prompt", "answer"} <= keys:
        return "prompt"
    return "sentence" if {"sentence", "label"} <= keys else None


def _task_dir_kind(task_dir: Path) -> str | None:
    """The benchmark a task folder's layout belongs to, or _OLORA_TASK, or None."""
    names = _file_names(task_dir)
    if {"train.jsonl", "test.jsonl"} & names:
        return "jsonl"
    # The first split file that reads: one damaged file leaves the layout known, and the check names it.
    samples = (_record_kind(task_dir / name) for name in _SAMPLE_FILES if name in names)
    kind = next((kind for kind in samples if kind is not None), None)
    if kind == "prompt":
        return "trace" if "eval.json" in names else "cl_benchmark"
    return {"superni": "superni", "sentence": _OLORA_TASK}.get(kind or "")


def _folder_kind(folder: Path) -> str | None:
    """A task folder's benchmark, or "olora" for a category folder whose sub-folders are all O-LoRA tasks."""
    kind = _task_dir_kind(folder)
    if kind is not None:
        return kind
    tasks = subdirs(folder)
    return "olora" if tasks and all(_task_dir_kind(t) == _OLORA_TASK for t in tasks) else None


def _layout_kinds(root: Path) -> dict[str, str | None]:
    """Each sub-folder (and SuperNI task file) of `root` -> the benchmark its layout belongs to, or None."""
    kinds = {folder.name: _folder_kind(folder) for folder in subdirs(root)}
    # Loose files other than SuperNI task files (a README, a stray JSON) say nothing about the layout.
    for path in sorted(root.glob("*.json")):
        if _record_kind(path) == "superni":
            kinds[path.name] = "superni"
    return kinds


def _agreed(kinds: dict[str, str | None]) -> str | None:
    found = set(kinds.values())
    if len(found) != 1 or None in found or _OLORA_TASK in found:
        return None
    return found.pop()


def detect_benchmark(root: Path) -> str | None:
    """The benchmark whose layout `root` has: every sub-folder (and every SuperNI task file) must agree.
    None for an empty or ambiguous folder (a sub-folder of no known layout, or of two layouts)."""
    root = Path(root)
    if not root.is_dir():
        return None
    try:
        return _agreed(_layout_kinds(root))
    except DataError:  # a folder that cannot be listed
        return None


def _undetected(root: Path) -> DataError:
    """Why `root`'s layout names no benchmark, as the one line `data check` prints."""
    kinds = _layout_kinds(root)
    unknown = [name for name, kind in kinds.items() if kind in (None, _OLORA_TASK)]
    if not kinds:
        why = "no task folders or SuperNI task files"
    elif unknown:
        why = f"sub-folders of no known layout: {', '.join(unknown)}"
    else:
        why = "layouts mixed: " + ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    names = ", ".join(benchmark_names())
    return DataError(f"{root}: cannot tell the benchmark from the layout ({why}); give --benchmark ({names})")


# --- the check --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSummary:
    name: str
    train: int
    held_out: tuple[str, int] | None  # the dev/eval file shipped beside train and test, and its size
    test: int
    labels: int | None  # size of the closed label set; None for generation
    metric: str


@dataclass(frozen=True)
class FolderReport:
    root: Path
    benchmark: str
    detected: bool  # True when the benchmark was read from the layout, not given
    tasks: list[TaskSummary]
    order: str | None  # the order asked for (every task of it is present)
    complete_orders: list[str]  # the benchmark's named orders whose every task is present
    warnings: list[str]


def _summary(benchmark: str, task: Task) -> TaskSummary:
    labels = len(task.labels) if task.labels else None
    held_out = held_out_split(benchmark, task)
    return TaskSummary(task.name, len(task.train), held_out, len(task.test), labels, task.metric)


def _missing(names: list[str], tasks: list[Task]) -> list[str]:
    """The names (compared in any case, as lookups do) that are no task of `tasks`."""
    present = {task.name.lower() for task in tasks}
    return [name for name in names if name.lower() not in present]


def _benchmark(root: Path, benchmark: str | None) -> tuple[str, bool]:
    if benchmark is not None:
        if benchmark not in benchmark_names():
            raise DataError(f"unknown benchmark '{benchmark}' (known: {', '.join(benchmark_names())})")
        return benchmark, False
    detected = detect_benchmark(root)
    if detected is None:
        raise _undetected(root)
    return detected, True


def _load_all(benchmark: str, root: Path) -> tuple[list[Task], list[str]]:
    """Every task of the folder through the loaders runs use, with the warnings they gave."""
    names = folder_tasks(benchmark, root)
    if not names:
        raise DataError(f"{root}: no {benchmark} tasks in the folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks = load_benchmark(benchmark, data_dir=root, tasks=names)
    return tasks, [str(w.message) for w in caught]


def check_folder(root: Path, benchmark: str | None = None, order: str | None = None) -> FolderReport:
    """Validate a data folder: load every task (any problem is a one-line DataError) and, for `order`,
    require each of its tasks to be present."""
    root = require_dir(Path(root), "data folder")
    benchmark, detected = _benchmark(root, benchmark)
    wanted = order_tasks(benchmark, order) if order is not None else []  # a wrong order fails before loading
    tasks, caught = _load_all(benchmark, root)
    missing = _missing(wanted, tasks)
    if missing:
        raise DataError(
            f"{root}: order '{order}' names {len(missing)} task(s) not in the folder: {', '.join(missing)}"
        )
    complete = [name for name in orders_for(benchmark) if not _missing(ORDERS[name], tasks)]
    summaries = [_summary(benchmark, task) for task in tasks]
    return FolderReport(root, benchmark, detected, summaries, order, complete, caught)


def _row(cells: list[str], widths: list[int]) -> str:
    """The task name left-aligned, the figures right-aligned."""
    first, *rest = cells
    figures = "".join(cell.rjust(width + 2) for cell, width in zip(rest, widths[1:], strict=True))
    return "  " + first.ljust(widths[0]) + figures


def _table(tasks: list[TaskSummary]) -> list[str]:
    header = ["task", "train", "dev/eval", "test", "labels", "metric"]
    rows = [
        [
            t.name,
            str(t.train),
            str(t.held_out[1]) if t.held_out else "-",
            str(t.test),
            str(t.labels) if t.labels is not None else "generation",
            t.metric,
        ]
        for t in tasks
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [_row(row, widths).rstrip() for row in [header, *rows]]


def format_report(report: FolderReport) -> str:
    """The report `loracl data check` prints."""
    how = "detected from the layout" if report.detected else "given"
    lines = [
        f"folder: {report.root}",
        f"benchmark: {report.benchmark} ({how})",
        f"tasks: {len(report.tasks)} (train/test as runs load them; dev/eval is never read by a run)",
        *_table(report.tasks),
    ]
    if report.order is not None:
        lines.append(f"order {report.order}: all {len(ORDERS[report.order])} tasks present")
    lines.append(f"complete orders: {', '.join(report.complete_orders) or 'none'}")
    lines += [f"warning: {message}" for message in report.warnings]
    return "\n".join(lines)
