"""Benchmarks: which tasks to load, in which order, with deterministic caps and validation carving."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loracl.data.formats import (
    TRACE_METRICS,
    Example,
    Task,
    load_cl_benchmark_task,
    load_jsonl_task,
    load_olora_task,
    load_superni_task,
    load_superni_task_dir,
    load_trace_task,
)
from loracl.data.paths import default_data_root, find_named, require_dir, subdirs
from loracl.errors import DataError

_STANDARD_ORDERS = ["order1", "order2", "order3", "order4", "order5", "order6"]
_SUPERNI_ORDERS = ["superni1", "superni2"]

# Task orders as the literature defines them: order1-6 from the shared data README; superni1/2 from
# GainLoRA's and SAPT's SuperNI scripts ("Order 1"/"Order 2"); trace from TRACE's training scripts.
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
    "superni1": [
        "task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization",
        "task181_outcome_extraction", "task002_quoref_answer_generation",
        "task1510_evalution_relation_extraction", "task639_multi_woz_user_utterance_generation",
        "task1729_personachat_generate_next", "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation", "task748_glucose_reverse_cause_event_detection",
        "task511_reddit_tifu_long_text_summarization", "task591_sciq_answer_generation",
        "task1687_sentiment140_classification", "task875_emotion_classification",
    ],
    "superni2": [
        "task748_glucose_reverse_cause_event_detection", "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation", "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary", "task1687_sentiment140_classification", "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next", "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization", "task002_quoref_answer_generation",
        "task1290_xsum_summarization", "task875_emotion_classification",
    ],
    "trace": list(TRACE_METRICS),  # the metric table is kept in TRACE's order
}

# The benchmark each named order belongs to: its task names are that benchmark's.
ORDER_BENCHMARK: dict[str, str] = {
    **dict.fromkeys(_STANDARD_ORDERS, "cl_benchmark"),
    **dict.fromkeys(_SUPERNI_ORDERS, "superni"),
    "trace": "trace",
}


@dataclass(frozen=True)
class _Benchmark:
    subdir: str | None  # sub-folder of the default data root; None: benchmark.data_dir is required
    orders_of: str | None  # whose named orders it reads; None: every order
    default_order: str | None


_BENCHMARKS: dict[str, _Benchmark] = {
    "cl_benchmark": _Benchmark("cl_benchmark", "cl_benchmark", "order1"),
    "olora": _Benchmark(None, "cl_benchmark", "order1"),  # the same tasks in O-LoRA's upstream layout
    # Every task of the folder (a sample or a user's selection); the papers' sequences: order superni1/2.
    "superni": _Benchmark("superni_sample", "superni", None),
    "trace": _Benchmark(None, "trace", "trace"),
    # A user's own tasks, which may be a converted copy of any benchmark: every order is open to it.
    "jsonl": _Benchmark(None, None, None),
}


def benchmark_names() -> list[str]:
    """The names `load_benchmark` accepts."""
    return list(_BENCHMARKS)


def default_order(benchmark: str) -> str | None:
    """The order a run of `benchmark` follows when the config names neither order nor tasks; None for superni
    and jsonl (every task of the folder) and for a name that is no benchmark (load_benchmark refuses it)."""
    spec = _BENCHMARKS.get(benchmark)
    return spec.default_order if spec else None


def orders_for(benchmark: str) -> list[str]:
    """The named orders `benchmark` reads, in ORDERS' order."""
    spec = _BENCHMARKS.get(benchmark)
    if spec is None:
        return []
    return [name for name in ORDERS if spec.orders_of in (None, ORDER_BENCHMARK[name])]


def order_tasks(benchmark: str, order: str) -> list[str]:
    """The tasks of a named order, refusing an unknown order and another benchmark's."""
    if order not in ORDERS:
        raise DataError(f"unknown task order '{order}' (known orders: {', '.join(ORDERS)})")
    if order not in orders_for(benchmark):
        raise DataError(
            f"order '{order}' is a {ORDER_BENCHMARK[order]} order, not one of benchmark '{benchmark}' "
            f"(its orders: {', '.join(orders_for(benchmark)) or 'none'})"
        )
    return list(ORDERS[order])


def _data_dir(benchmark: str, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return require_dir(Path(data_dir).expanduser(), f"{benchmark} data folder")
    subdir = _BENCHMARKS[benchmark].subdir
    if subdir is None:
        raise DataError(f"benchmark '{benchmark}' has no default data; set benchmark.data_dir to its folder")
    return require_dir(default_data_root() / subdir, f"{benchmark} data folder")


def _superni_sources(root: Path) -> list[tuple[str, Path]]:
    """The SuperNI tasks of a folder: task files (`<task>.json`) and task folders (`<task>/train.json`...)."""
    files = [(p.stem, p) for p in root.glob("*.json") if p.is_file()]
    return sorted(files + [(d.name, d) for d in subdirs(root)])


def folder_tasks(benchmark: str, root: Path) -> list[str]:
    """The name of every task in a data folder of `benchmark`, sorted; a name held twice (one O-LoRA task in
    two categories, a SuperNI task as a file and a folder) is listed once, and loading it says it is
    ambiguous."""
    if benchmark == "superni":
        names = [name for name, _ in _superni_sources(root)]
    elif benchmark == "olora":
        names = [task.name for category in subdirs(root) for task in subdirs(category)]
    else:
        names = [d.name for d in subdirs(root)]
    return sorted(set(names))


def _task_names(benchmark: str, root: Path, order: str | None, tasks: list[str] | None) -> list[str]:
    """The task sequence: an explicit list wins over a named order, which defaults to the benchmark's own
    (default_order)."""
    order = order if order is not None or tasks is not None else default_order(benchmark)
    if tasks is not None:
        names = list(tasks)
    elif order is not None:
        names = order_tasks(benchmark, order)
    else:  # superni and jsonl without an order: every task of the folder, in name order
        names = folder_tasks(benchmark, root)
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


def _superni_path(root: Path, name: str) -> Path:
    sources = _superni_sources(root)
    # Also accept the short id, e.g. "task833" for "task833_poem_sentiment_classification".
    aliases = [(stem.split("_", 1)[0], path) for stem, path in sources]
    return find_named(name, sources, root, "SuperNI task", aliases)


def _load_superni(root: Path, name: str, with_test: bool) -> Task:
    path = _superni_path(root, name)
    if path.is_dir():
        return load_superni_task_dir(path, with_test=with_test)
    return load_superni_task(path, with_test=with_test)


def _load_task(benchmark: str, root: Path, name: str, with_test: bool = True) -> Task:
    """Task `name` of a benchmark folder; without `with_test` no test file is opened (eval.split:
    validation) and the task's test split is empty."""
    if benchmark == "olora":
        return load_olora_task(root, name, with_test=with_test)
    if benchmark == "superni":
        return _load_superni(root, name, with_test)
    task_dir = find_named(name, [(d.name, d) for d in subdirs(root)], root, "task")
    loaders = {"cl_benchmark": load_cl_benchmark_task, "trace": load_trace_task, "jsonl": load_jsonl_task}
    return loaders[benchmark](task_dir, with_test=with_test)


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


def _prepare(
    task: Task, max_train: int | None, max_test: int | None, fraction: float, seed: int, split: str = "test"
) -> Task:
    """Cap train and test, then carve validation out of the capped train split. Each draw has its own
    generator, so train and validation are the same whether the test split was loaded or not."""
    train = _cap(task.train, max_train, _rng(seed, task.name, "train"))
    test = _cap(task.test, max_test, _rng(seed, task.name, "test")) if split == "test" else []
    capped = len(train)
    validation, train = _pick(train, round(capped * fraction), _rng(seed, task.name, "validation"))
    for name, examples in (("train", train), ("test", test)):
        if not examples and (name == "train" or split == "test"):
            raise DataError(f"{task.source}: task '{task.name}' has no {name} examples left after caps")
    if split == "validation" and not validation:
        raise DataError(
            f"{task.source}: task '{task.name}' has no validation examples: validation_fraction {fraction} "
            f"of its {capped} training examples rounds to 0; raise benchmark.validation_fraction or "
            "benchmark.max_train"
        )
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
    split: Literal["test", "validation"] = "test",
) -> list[Task]:
    """Load a benchmark's task sequence, capped and with validation carved from train.

    SuperNI task files are split into train/test with a fixed seed (0) so the test set does not move with
    `seed`; SuperNI task folders and TRACE keep their official test split. `split`: the split the tasks
    are evaluated on; with "validation" no test file is opened (test stays empty) and every task must have
    validation examples.
    """
    if name not in _BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}' (known: {', '.join(benchmark_names())})")
    if split not in ("test", "validation"):
        raise DataError(f"split must be 'test' or 'validation', got {split!r}")
    _check_settings(max_train, max_test, validation_fraction)
    root = _data_dir(name, data_dir)
    names = _task_names(name, root, order, tasks)
    loaded = [_load_task(name, root, task, with_test=split == "test") for task in names]
    # Aliases (task833 and its full name) resolve to one source: reject them too.
    _check_unique([(task, loaded_task.source) for task, loaded_task in zip(names, loaded, strict=True)])
    return [_prepare(task, max_train, max_test, validation_fraction, seed, split) for task in loaded]
