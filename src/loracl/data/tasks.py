"""The tasks of a run config: its benchmark (named, or detected from its data folder's layout) and order."""

from __future__ import annotations

from pathlib import Path

from loracl.config import RunConfig
from loracl.data.benchmarks import load_benchmark
from loracl.data.check import detect_benchmark
from loracl.data.formats import Task
from loracl.errors import ConfigError


def resolve_benchmark(config: RunConfig) -> RunConfig:
    """Name the config's benchmark for good: as the config names it, or, when it names none but gives a data
    folder, the one that folder's layout shows unambiguously (as `loracl data check` detects it; the
    default cl_benchmark otherwise). Recorded in the config, so config.yaml, a resume and a bench rerun see
    the same benchmark."""
    b = config.benchmark
    if "name" not in b.model_fields_set and b.data_dir is not None:
        if config.eval.split == "validation":  # detection samples test.json first: never open it here
            raise ConfigError(
                "eval.split=validation: set benchmark.name (telling the benchmark from the data folder's "
                "layout reads test files)"
            )
        detected = detect_benchmark(Path(b.data_dir).expanduser())
        b.name = detected or b.name  # an assignment: from now on the name counts as given
    return config


def load_tasks(config: RunConfig) -> list[Task]:
    """The tasks a run config names (benchmark section; the seed picks capped examples). With
    eval.split=validation no test file is opened: each task's test list is empty."""
    b = resolve_benchmark(config).benchmark
    return load_benchmark(
        b.name,
        data_dir=b.data_dir,
        order=b.order,
        tasks=b.tasks,
        max_train=b.max_train,
        max_test=b.max_test,
        validation_fraction=b.validation_fraction,
        seed=config.train.seed,
        split=config.eval.split,
    )
