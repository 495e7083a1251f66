"""Benchmarks: which tasks to load, in which order, with deterministic caps and validation carving."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from loracl.config import RunConfig
from loracl.data.formats import (
    Example,
    Task,
    load_cl_benchmark_task,
    load_jsonl_task,
    load_olora_task,
    load_superni_task,
)
from loracl.data.paths import default_data_root, find_named, require_dir, subdirs
from loracl.errors import DataError

# Task orders as the literature defines them (see the shared data README).
ORDERS: dict[str, list[str]] = {
    "order1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "order2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "order3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "order4": ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon", "SST-2",
               "dbpedia", "agnews", "MultiRC", "yahoo"],
    "order5": ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia",
               "agnews", "yelp", "amazon", "yahoo"],
    "order6": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews",
               "yahoo", "MultiRC", "BoolQA", "WiC"],
}

# Sub-folder of the default data root each benchmark reads when no data_dir is given.
_DEFAULT_SUBDIRS: dict[str, str | None] = {
    "cl_benchmark": "cl_benchmark",
    "olora": None,
    "superni": "superni_sample",
    "jsonl": None,
}


def benchmark_names() -> list[str]:
    """The names `load_benchmark` accepts."""
    return list(_DEFAULT_SUBDIRS)


def _data_dir(benchmark: str, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return require_dir(Path(data_dir).expanduser(), f"{benchmark} data folder")
    subdir = _DEFAULT_SUBDIRS[benchmark]
    if subdir is None:
        raise DataError(f"benchmark '{benchmark}' has no default data; set benchmark.data_dir to its folder")
    return require_dir(default_data_root() / subdir, f"{benchmark} data folder")


def _superni_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.json") if p.is_file())


def _task_names(benchmark: str, root: Path, order: str | None, tasks: list[str] | None) -> list[str]:
    """The task sequence: an explicit list wins over a named order."""
    if tasks is not None:
        names = list(tasks)
    elif order is not None:
        if order not in ORDERS:
            raise DataError(f"unknown task order '{order}' (known orders: {', '.join(ORDERS)})")
        names = list(ORDERS[order])
    elif benchmark == "superni":
        names = [p.stem for p in _superni_files(root)]
    else:
        raise DataError(f"benchmark '{benchmark}' needs a task list or an order ({', '.join(ORDERS)})")
    if not names:
        raise DataError(f"{root}: the task list is empty")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise DataError(f"task names must be non-empty strings, got {bad[0]!r}")
    _check_unique([(name, name.lower()) for name in names])
    return names


def _check_unique(entries: list[tuple[str, str]]) -> None:
    """Reject a task list naming one task twice; `entries` pairs each requested name with its identity."""
    seen: dict[str, str] = {}
    for name, key in entries:
        if key in seen:
            raise DataError(f"the task list names the same task twice: {seen[key]!r} and {name!r}")
        seen[key] = name


def _load_task(benchmark: str, root: Path, name: str) -> Task:
    if benchmark == "olora":
        return load_olora_task(root, name)
    if benchmark == "superni":
        files = _superni_files(root)
        # Also accept the short id, e.g. "task833" for "task833_poem_sentiment_classification".
        aliases = [(p.stem.split("_", 1)[0], p) for p in files]
        stems = [(p.stem, p) for p in files]
        return load_superni_task(find_named(name, stems, root, "SuperNI task", aliases))
    task_dir = find_named(name, [(d.name, d) for d in subdirs(root)], root, "task")
    return load_cl_benchmark_task(task_dir) if benchmark == "cl_benchmark" else load_jsonl_task(task_dir)


def _rng(seed: int, task: str, purpose: str) -> random.Random:
    # Seeded by the task name, not its position, so a task gets the same subset in every order.
    return random.Random(f"{seed}:{task}:{purpose}")


def _pick(examples: list[Example], k: int, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Split into `k` randomly chosen examples and the rest, both kept in file order."""
    chosen = set(rng.sample(range(len(examples)), k))
    picked = [ex for i, ex in enumerate(examples) if i in chosen]
    rest = [ex for i, ex in enumerate(examples) if i not in chosen]
    return picked, rest


def _cap(examples: list[Example], limit: int | None, rng: random.Random) -> list[Example]:
    if limit is None or limit >= len(examples):
        return list(examples)
    return _pick(examples, limit, rng)[0]


def _prepare(task: Task, max_train: int | None, max_test: int | None, fraction: float, seed: int) -> Task:
    """Cap train and test, then carve validation out of the capped train split."""
    train = _cap(task.train, max_train, _rng(seed, task.name, "train"))
    test = _cap(task.test, max_test, _rng(seed, task.name, "test"))
    validation, train = _pick(train, round(len(train) * fraction), _rng(seed, task.name, "validation"))
    for split, examples in (("train", train), ("test", test)):
        if not examples:
            raise DataError(f"{task.source}: task '{task.name}' has no {split} examples left after caps")
    return dataclasses.replace(task, train=train, test=test, validation=validation)


def _check_settings(max_train: int | None, max_test: int | None, validation_fraction: float) -> None:
    for key, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise DataError(f"{key} must be at least 1 (or None for all examples), got {value}")
    if not 0 <= validation_fraction < 1:
        raise DataError(f"validation_fraction must be in [0, 1), got {validation_fraction}")


def load_benchmark(
    name: str,
    *,
    data_dir: str | Path | None = None,
    order: str | None = None,
    tasks: list[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> list[Task]:
    """Load a benchmark's task sequence, capped and with validation carved from train.

    SuperNI files are split into train/test with a fixed seed (0) so the test set does not move with `seed`.
    """
    if name not in _DEFAULT_SUBDIRS:
        raise DataError(f"unknown benchmark '{name}' (known: {', '.join(benchmark_names())})")
    _check_settings(max_train, max_test, validation_fraction)
    root = _data_dir(name, data_dir)
    names = _task_names(name, root, order, tasks)
    loaded = [_load_task(name, root, task) for task in names]
    # Aliases (task833 and its full name) resolve to one source: reject them too.
    _check_unique([(task, loaded_task.source) for task, loaded_task in zip(names, loaded, strict=True)])
    return [_prepare(task, max_train, max_test, validation_fraction, seed) for task in loaded]


def load_tasks(config: RunConfig) -> list[Task]:
    """The tasks a run config names (benchmark section; the seed picks capped examples)."""
    b = config.benchmark
    return load_benchmark(
        b.name,
        data_dir=b.data_dir,
        order=b.order,
        tasks=b.tasks,
        max_train=b.max_train,
        max_test=b.max_test,
        validation_fraction=b.validation_fraction,
        seed=config.train.seed,
    )
