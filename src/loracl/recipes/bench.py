"""`loracl bench`: a grid of continual runs (method x task order), resumable, summarised in one table.

The bench directory:
- `bench.json`: the grid (label, method specs, orders, the command, each cell's resolved config);
- `<method>/<order>/`: one ordinary run directory per cell (see loracl.recipes.run), plus `bench_error.txt`
  (the traceback) when the cell failed; with `--seeds S1,S2,...` (train.seed) every cell is repeated per
  seed in `<method>/<order>/seed-<s>/` (bench.json's `seeds` and each cell's `seed`; a grid without
  --seeds keeps the single-folder layout, and one layout is never turned into the other in place);
- `bench.md`, `bench.csv`, `bench.png`: the table with its bootstrap intervals and paired comparisons (from
  the predictions each cell keeps; engine.statistics), one CSV row per cell, and a bar chart of AP, BWT and
  forgetting per method with their intervals.

A cell whose results.json is complete and holds the same resolved config is not run again, so an interrupted
or extended grid picks up where it stopped; anything else in a cell's folder is replaced by a fresh run.

With `--tune` (hyper-parameter selection, `--select-on validation`), every candidate config of each method
first runs on every order in `tune/<method>/<candidate>/<order>/` with `eval.split: validation` (scored on
a validation split carved from train; no test file is opened); per method the candidate with the best mean
validation AP is chosen, and only then are the ordinary cells planned (their test data read) and run with
the chosen config. bench.json's `selection` holds every candidate's scores and the choice. With --seeds the
tuning cells are repeated per seed too (`.../<order>/seed-<s>/`, each seed holding out its own validation
examples, as its final runs do), and a candidate's score on an order is its mean over the seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import itertools
import json
import math
import re
import shlex
import statistics
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from loracl.config import SEED_LIMIT, RunConfig, build_config, load_config_data, parse_value, set_dotted
from loracl.data import ORDERS, load_tasks, resolve_benchmark
from loracl.engine.metrics import is_complete
from loracl.engine.statistics import (
    DRAWS,
    Interval,
    Run,
    examples_to_resolve,
    interval,
    paired_difference,
)
from loracl.errors import CheckpointError, ConfigError, LoraclError, RunInterrupted
from loracl.files import UnsafeFileError, read_json_limited, read_text_limited
from loracl.locking import LOCK_NAME, FolderBusy
from loracl.methods import create_method, method_class
from loracl.outputs.report import setup_line
from loracl.outputs.show import predictions_file, read_predictions
from loracl.recipes import run as runner
from loracl.recipes import workers
from loracl.recipes.checkpoint import checkpoint_version

# The only numbers the reference gives (METHODS.md, SLAO section, quoting Qiao & Mahdavi, ICLR 2026,
# arXiv 2512.23017): Llama-2-7B-chat, averaged over the task orders of each benchmark family.
PAPER_MODEL = "Llama-2-7B-chat"
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "slao": {"standard": {"AP": 80.4}, "long": {"AP": 74.8, "BWT": -3.5}, "superni": {"AP": 37.2}},
    "mtl": {"standard": {"AP": 80.9}, "long": {"AP": 78.1}, "superni": {"AP": 45.2}},
}
# Benchmark families the paper reports: title, and the named orders that make one up.
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "standard": ("Standard CL benchmark, orders 1-3", {"order1", "order2", "order3"}),
    "long": ("Long Sequence benchmark, orders 4-6", {"order4", "order5", "order6"}),
    "superni": ("SuperNI", set()),
}
METRICS = ("AP", "BWT", "FWT", "forgetting")
ERROR_FILE = "bench_error.txt"
MANIFEST = "bench.json"
ZERO_SHOT_DIR = "_zero_shot"  # cached base-model scores (method folders never start with "_")
TUNE_DIR = "tune"  # tuning cells: tune/<method>/<candidate>/<order>/ (no method is named tune)
SELECT_ON = ("validation",)  # what --select-on accepts: never test
DEFAULT_VALIDATION_FRACTION = 0.1  # held out for selection when --tune is given and the config holds none
SEED_DIR = "seed-{}"  # a cell's folder per seed, under <method>/<order>/ (--seeds)


def _dirname(text: str) -> str:
    """A folder name for a method spec or an order: path separators and shell-hostile characters become _."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


@dataclass(frozen=True)
class MethodSpec:
    """One method of the grid: `name`, or `name:key=value:...` where a plain key is one of the method's
    options (`slao:schedule=inv`, for ablations) and a dotted key any config key for this method's cells
    alone (`seq_lora:train.lr=3e-4`: papers tune each method on its own)."""

    text: str
    name: str
    options: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value


@dataclass(frozen=True)
class OrderSpec:
    """One task sequence of the grid: a named order (order1..order6) or task names joined by '+'."""

    text: str
    order: str | None
    tasks: tuple[str, ...] | None


def _split(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--{what}: give at least one, separated by commas")
    if len(set(items)) != len(items):
        raise ConfigError(f"--{what}: {text!r} names the same entry twice")
    return items


# Keys the bench sets for every cell itself: a method may not move its cells to other tasks or folders.
_BENCH_KEYS = ("benchmark.order", "benchmark.tasks", "output_dir", "method.name")


def parse_method(text: str) -> MethodSpec:
    name, *assignments = text.split(":")
    options: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            example = "slao:schedule=inv or seq_lora:train.lr=3e-4"
            raise ConfigError(f"--methods: {text!r}: expected NAME:KEY=VALUE, e.g. {example}")
        if key in _BENCH_KEYS:
            raise ConfigError(f"--methods: {text!r}: {key} is set by the bench for every cell")
        value = parse_value(raw, f"--methods {text}: {key}")
        (settings if "." in key else options)[key] = value
    return MethodSpec(text, name, options, settings)


def parse_order(text: str) -> OrderSpec:
    if text in ORDERS:
        return OrderSpec(text, text, None)
    if "+" in text:
        return OrderSpec(text, None, tuple(text.split("+")))
    raise ConfigError(
        f"--orders: unknown order {text!r}; known: {', '.join(ORDERS)}, or task names joined by '+' "
        "(e.g. agnews+yelp)"
    )


def parse_seeds(text: str | None) -> list[int] | None:
    """--seeds: train.seed values separated by commas (None: no --seeds, each cell at the config's seed)."""
    if text is None:
        return None
    seeds = []
    for item in _split(text, "seeds"):
        try:
            seed = int(item)
        except ValueError:
            raise ConfigError(f"--seeds: {item!r} is not a whole number (e.g. --seeds 1,2,3)") from None
        if not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"--seeds: {seed} is out of range (0 <= seed < 2**32)")
        if seed in seeds:
            raise ConfigError(f"--seeds: {text!r} names seed {seed} twice")
        seeds.append(seed)
    return seeds


def check_seeds(seeds: list[int] | None, methods: Sequence[MethodSpec], tuned: Sequence[TunedKey]) -> None:
    """With --seeds the bench sets train.seed of every cell: no method or --tune may set it as well."""
    if seeds is None:
        return
    for spec in methods:
        if "train.seed" in spec.settings:
            raise ConfigError(f"--methods {spec.text}: train.seed is set by --seeds for every cell")
    if any(t.key == "train.seed" for t in tuned):
        raise ConfigError("--tune: train.seed is set by --seeds for every cell")


def _cell_path(folder: Path, seed: int | None) -> Path:
    return folder if seed is None else folder / SEED_DIR.format(seed)


# Keys --tune may not vary: the bench sets them, or selection and final runs must share them.
_UNTUNABLE = {
    **dict.fromkeys(_BENCH_KEYS, "is set by the bench for every cell"),
    "eval.split": "is set by the bench (validation for the tuning runs, test for the final ones)",
    "benchmark.validation_fraction": "cannot be tuned: selection and final runs hold out the same examples",
}
TUNE_EXAMPLE = "--tune 'train.lr=1e-4,3e-4;method.lam=1,100'"


@dataclass(frozen=True)
class TunedKey:
    """One key of --tune and the values to try, in the order given (`texts`: as typed, for labels)."""

    key: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Candidate:
    """One config a method is tried with: `text` as --methods writes config keys (`train.lr=1e-4:...`)."""

    text: str
    values: dict[str, Any]  # dotted config key -> value


def _split_outside(text: str, separator: str) -> list[str]:
    """`text` split at `separator`, except inside brackets, braces or quotes (a YAML list is one value)."""
    parts, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == separator and depth <= 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    return [*parts, "".join(current)]


def parse_tune(entries: Sequence[str]) -> list[TunedKey]:
    """--tune: `KEY=V1,V2,...`, several keys separated by ';' (or --tune repeated); KEY a dotted config key,
    each value YAML (a list in brackets is one value). Several keys: every combination is a candidate."""
    tuned: list[TunedKey] = []
    for item in (part.strip() for entry in entries for part in _split_outside(entry, ";")):
        if not item:
            continue
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ConfigError(f"--tune: {item!r}: expected KEY=V1,V2,..., e.g. {TUNE_EXAMPLE}")
        if "." not in key:
            raise ConfigError(f"--tune: {key!r} is not a dotted config key (e.g. train.lr, method.lam)")
        if key in _UNTUNABLE:
            raise ConfigError(f"--tune: {key} {_UNTUNABLE[key]}")
        if any(t.key == key for t in tuned):
            raise ConfigError(f"--tune: {key} is given twice")
        texts = [text.strip() for text in _split_outside(raw, ",")]
        if not all(texts):
            raise ConfigError(f"--tune: {key}={raw}: an empty value; give values separated by commas")
        values = [parse_value(text, f"--tune {key}") for text in texts]
        for i, value in enumerate(values):
            if value in values[:i]:
                first = texts[values.index(value)]
                raise ConfigError(f"--tune: {key} lists one value twice ({first!r} and {texts[i]!r})")
        tuned.append(TunedKey(key, tuple(values), tuple(texts)))
    if not tuned:
        raise ConfigError(f"--tune: give at least one KEY=V1,V2,..., e.g. {TUNE_EXAMPLE}")
    return tuned


def check_select_on(select_on: str | None, tuned: bool) -> None:
    if select_on is None:
        return
    if not tuned:
        raise ConfigError("--select-on needs --tune (the values to select among)")
    if select_on not in SELECT_ON:
        raise ConfigError(
            f"--select-on: {select_on!r} is not accepted; only 'validation' (a split carved from the "
            "training data: selection never looks at test)"
        )


def parse_grid(methods: str, orders: str) -> tuple[list[MethodSpec], list[OrderSpec]]:
    method_specs = [parse_method(t) for t in _split(methods, "methods")]
    order_specs = [parse_order(t) for t in _split(orders, "orders")]
    for specs, what in ((method_specs, "methods"), (order_specs, "orders")):
        names = [_dirname(s.text) for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"--{what}: two entries map to the same folder name ({', '.join(names)})")
    return method_specs, order_specs


@dataclass
class Cell:
    method: MethodSpec
    order: OrderSpec
    config: RunConfig
    path: Path
    zero_shot_cache: Path | None = None  # shared by the grid: the base model is evaluated once per order
    candidate: Candidate | None = None  # a tuning cell's candidate (its config evaluates on validation)
    seed: int | None = None  # its train.seed under --seeds (None: the config's)

    @property
    def where(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.method.text} on {self.order.text}{seed}"

    def config_json(self) -> dict[str, Any]:
        """The resolved config as results.json stores it (what a finished cell is compared with)."""
        return json.loads(json.dumps(self.config.model_dump(mode="json")))


def cell_data(
    base: dict[str, Any], method: MethodSpec, order: OrderSpec, seed: int | None = None
) -> dict[str, Any]:
    """The config mapping of one cell: the base config's method options, then the spec's own options and
    config keys, on top; `seed` (--seeds) as train.seed."""
    data = json.loads(json.dumps(base))  # deep copy of plain YAML data
    section = data.get("method")
    shared = {k: v for k, v in section.items() if k != "name"} if isinstance(section, dict) else {}
    data["method"] = {"name": method.name, **shared, **method.options}
    for key, value in method.settings.items():  # this method's own config keys, over the shared ones
        set_dotted(data, key, value, f"--methods {method.text}")
    bench = data.setdefault("benchmark", {})
    bench["order"] = order.order
    bench["tasks"] = list(order.tasks) if order.tasks else None
    data["output_dir"] = None  # the bench decides where each cell goes
    if seed is not None:
        set_dotted(data, "train.seed", seed, "--seeds")
    return data


def plan_grid(
    base: dict[str, Any],
    methods: list[MethodSpec],
    orders: list[OrderSpec],
    output: Path,
    seeds: list[int] | None = None,
) -> list[Cell]:
    """Every cell's config, validated (method options and each order's data) before anything runs; with
    `seeds`, one cell per seed of every (method, order)."""
    build_config(base)  # the shared part, reported against the user's own file first
    cells = []
    for method in methods:
        for order in orders:
            for seed in seeds or [None]:
                where = f"{method.text} on {order.text}" + ("" if seed is None else f" seed {seed}")
                config = resolve_benchmark(build_config(cell_data(base, method, order, seed), where))
                try:
                    create_method(method.name, config.method_options(), config.lora)
                except ConfigError as exc:
                    raise ConfigError(f"--methods {method.text}: {exc}") from exc
                path = _cell_path(output / _dirname(method.text) / _dirname(order.text), seed)
                cells.append(Cell(method, order, config, path, output / ZERO_SHOT_DIR, seed=seed))
    checked: set[str] = set()
    for cell in cells:
        if cell.order.text not in checked:
            load_tasks(cell.config)
            checked.add(cell.order.text)
    return cells


@dataclass
class MethodTuning:
    """How --tune applies to one method: its candidates (none: not tuned, `note` says why), the tuned keys
    it sets itself in --methods (they win over --tune) and those that are not options of it."""

    method: MethodSpec
    candidates: list[Candidate]
    fixed: dict[str, Any]
    skipped: list[str]
    note: str = ""

    def spec(self, candidate: Candidate) -> MethodSpec:
        """The method with the candidate's values among its own config keys (same text: same folder)."""
        m = self.method
        return MethodSpec(m.text, m.name, m.options, {**m.settings, **candidate.values})


def method_tuning(method: MethodSpec, tuned: list[TunedKey]) -> MethodTuning:
    cls = method_class(method.name)
    explicit = {**{f"method.{k}": v for k, v in method.options.items()}, **method.settings}
    fixed = {t.key: explicit[t.key] for t in tuned if t.key in explicit}
    options = cls.Options.model_fields
    skipped = [
        t.key
        for t in tuned
        if t.key not in fixed and t.key.startswith("method.") and t.key.split(".", 1)[1] not in options
    ]
    free = [t for t in tuned if t.key not in fixed and t.key not in skipped]
    if not cls.trains:
        return MethodTuning(method, [], fixed, [], "it does not train")
    if not free:
        return MethodTuning(method, [], fixed, skipped, "no tuned key is left to it")
    candidates = []
    for combo in itertools.product(*(list(zip(t.values, t.texts, strict=True)) for t in free)):
        pairs = list(zip(free, combo, strict=True))  # (tuned key, (value, text)), first key slowest
        text = ":".join(f"{t.key}={typed}" for t, (_, typed) in pairs)
        candidates.append(Candidate(text, {t.key: value for t, (value, _) in pairs}))
    folders = [_dirname(c.text) for c in candidates]
    if len(set(folders)) != len(folders):
        raise ConfigError(f"--tune: two candidates of {method.text} map to the same folder name")
    return MethodTuning(method, candidates, fixed, skipped)


def plan_tuning(
    base: dict[str, Any],
    methods: list[MethodSpec],
    orders: list[OrderSpec],
    tuned: list[TunedKey],
    output: Path,
    seeds: list[int] | None = None,
) -> tuple[list[MethodTuning], list[Cell]]:
    """Every method's candidates and every tuning cell's config (evaluating on validation; one per seed
    with `seeds`), validated, and each order's training data checked without opening a test file."""
    build_config(base)
    tunings = [method_tuning(m, tuned) for m in methods]
    for t in tuned:
        if t.key.startswith("method.") and all(t.key in mt.skipped for mt in tunings):
            names = ", ".join(m.text for m in methods)
            raise ConfigError(f"--tune: {t.key} is an option of none of the methods ({names})")
    for spec in methods:
        if "eval.split" in spec.settings:
            raise ConfigError(f"--methods {spec.text}: eval.split {_UNTUNABLE['eval.split']} under --tune")
    for tuning in tunings:  # the values a method sets itself, as its config holds them (1e-4: a float)
        if tuning.fixed:
            resolved = build_config(cell_data(base, tuning.method, orders[0])).model_dump(mode="json")
            tuning.fixed = {key: _dotted(resolved, key) for key in tuning.fixed}
    cells = []
    for tuning in tunings:
        seen: dict[str, str] = {}  # a candidate's resolved config -> its text: "1e-4" and "0.0001" are one
        for candidate in tuning.candidates:
            spec = tuning.spec(candidate)
            for order, seed in itertools.product(orders, seeds or [None]):
                data = cell_data(base, spec, order, seed)
                set_dotted(data, "eval.split", "validation", "--tune")
                where = f"{tuning.method.text} with {candidate.text} on {order.text}"
                where += "" if seed is None else f" seed {seed}"
                config = resolve_benchmark(build_config(data, where))
                try:
                    create_method(spec.name, config.method_options(), config.lora)
                except ConfigError as exc:
                    raise ConfigError(f"--tune: {where}: {exc}") from exc
                same = seen.setdefault(runner.result_relevant_config(config), candidate.text)
                if same != candidate.text:
                    raise ConfigError(f"--tune: {same} and {candidate.text} give {spec.text} the same config")
                path = output / TUNE_DIR / _dirname(spec.text) / _dirname(candidate.text)
                path = _cell_path(path / _dirname(order.text), seed)
                cells.append(Cell(spec, order, config, path, output / ZERO_SHOT_DIR, candidate, seed))
    checked: set[str] = set()
    for cell in cells:
        if cell.order.text not in checked:
            load_tasks(cell.config)  # eval.split is validation: train (and labels) only
            checked.add(cell.order.text)
    return tunings, cells


def _read_results(path: Path) -> dict[str, Any] | None:
    """A cell's results.json, or None when absent, unreadable or not a JSON object."""
    try:
        results = read_json_limited(path / "results.json")
    except UnsafeFileError:
        return None
    return results if isinstance(results, dict) else None


def made_with(results: dict[str, Any], config: RunConfig) -> bool:
    """Whether a complete run's results.json answers `config`: the same config up to harmless keys
    (runner.HARMLESS_KEYS), and a full matrix unless `config` asks for the metrics' entries only."""
    try:
        done = build_config(results["config"], "results.json")
    except (ConfigError, KeyError, TypeError):
        return False
    if runner.result_relevant_config(done) != runner.result_relevant_config(config):
        return False
    return config.eval.matrix == "metrics" or is_complete(results.get("matrix", []))


def is_finished(path: Path, config: RunConfig) -> bool:
    results = _read_results(path)
    return bool(results and results.get("complete") and made_with(results, config))


def _resumable(cell: Cell) -> bool:
    """A cell interrupted after some finished task, with the same config: continue it (`run --resume`).
    A complete cell that does not answer the grid (a sparse matrix where a full one is asked) runs again."""
    if not (cell.path / "checkpoint" / "latest.json").is_file() or runner.already_complete(cell.path):
        return False
    try:
        runner.resumed_config(cell.path, cell.config)
        checkpoint_version(cell.path)
    except (ConfigError, CheckpointError):
        return False  # another config, or a checkpoint this loracl does not read: run it from scratch
    return True


def run_cell(cell: Cell) -> str | None:
    """Run one cell (continuing it from its checkpoint when it was interrupted with the same config, else
    from scratch); returns None, or the error's one-line summary, which is also the first line of the
    cell's bench_error.txt (the traceback follows it); a cell that succeeds clears an earlier error.
    Ctrl-C / SIGTERM stop the whole grid; a cell another process is running raises FolderBusy and is left
    to it (its files untouched)."""
    error_file = cell.path / ERROR_FILE
    try:
        if is_finished(cell.path, cell.config):  # finished meanwhile, e.g. by another bench on this grid
            error_file.unlink(missing_ok=True)
            return None
        resume = _resumable(cell)
        if not resume and error_file.is_file() and not _holds_more_than_the_error(cell.path):
            error_file.unlink()  # the folder of a cell that failed before its run began: start afresh
        cache = cell.zero_shot_cache
        runner.run(cell.config, cell.path, resume=resume, overwrite=not resume, zero_shot_cache=cache)
        error_file.unlink(missing_ok=True)
        return None
    except (RunInterrupted, FolderBusy):
        raise
    except Exception as exc:  # noqa: BLE001  (one failing cell must not stop the grid)
        lines = str(exc).splitlines()
        summary = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        cell.path.mkdir(parents=True, exist_ok=True)
        error_file.write_text(f"{summary}\n\n{traceback.format_exc()}", encoding="utf-8")
        return summary
    finally:
        _free_memory()


def _holds_more_than_the_error(path: Path) -> bool:
    return any(p.name not in (ERROR_FILE, LOCK_NAME) for p in path.iterdir())


def _free_memory() -> None:
    """Drop the finished cell's model before the next one loads its own (matters on a GPU)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_command(
    config_path: str | None,
    methods: str,
    orders: str,
    overrides: Sequence[str],
    output: Path,
    label: str,
    tune: Sequence[str] = (),
    select_on: str | None = None,
    seeds: Sequence[int] | None = None,
) -> str:
    """The command line that reproduces this grid (recorded in bench.json and bench.md)."""
    parts = ["loracl", "bench"] + ([config_path] if config_path else [])
    parts += ["--methods", methods, "--orders", orders]
    if seeds is not None:
        parts += ["--seeds", ",".join(str(seed) for seed in seeds)]
    for override in overrides:
        parts += ["--set", override]
    for entry in tune:
        parts += ["--tune", entry]
    if tune:
        parts += ["--select-on", select_on or SELECT_ON[0]]
    parts += ["--output", str(output), "--label", label]
    return shlex.join(parts)


def _cell_entry(cell: Cell, output: Path) -> dict[str, Any]:
    entry = {
        "method": cell.method.text,
        "order": cell.order.text,
        "path": str(cell.path.relative_to(output)),
        "config": cell.config_json(),
    }
    if cell.seed is not None:
        entry["seed"] = cell.seed
    return entry if cell.candidate is None else {**entry, "candidate": cell.candidate.text}


def write_manifest(
    output: Path,
    label: str,
    command: str,
    cells: list[Cell],
    selection: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    orders: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> None:
    """bench.json. `selection` (with --tune): how the methods were tuned, its cells and its outcome; the
    ordinary `cells` are then those of the chosen configs (none yet while the selection runs). `seeds`
    (--seeds): the train.seed values every cell is repeated at (absent without --seeds)."""
    output.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(c.method.text for c in cells)) if methods is None else methods
    orders = list(dict.fromkeys(c.order.text for c in cells)) if orders is None else orders
    manifest: dict[str, Any] = {
        "label": label,
        "command": command,
        "methods": list(methods),
        "orders": list(orders),
        "cells": [_cell_entry(c, output) for c in cells],
    }
    if seeds is not None:
        manifest["seeds"] = list(seeds)
    if selection is not None:
        manifest["selection"] = selection
    runner.write_json_atomic(manifest, output / MANIFEST)


def check_bench_dir(output: Path) -> None:
    """A bench writes bench.md/.csv/.png/.json and one folder per method into --output: it must be absent,
    empty, or a bench directory already (a rerun), never a user's folder whose files those would replace."""
    if (output.exists() or output.is_symlink()) and not output.is_dir():
        raise ConfigError(f"--output: {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise ConfigError(
            f"--output: {output} is not empty and is not a loracl bench directory (no {MANIFEST}); choose "
            "another --output"
        )


def check_seed_layout(output: Path, seeds: list[int] | None) -> None:
    """A bench directory holds one layout: cells in <method>/<order>/ (no --seeds) or in
    <method>/<order>/seed-<s>/ (--seeds). Switching in place would nest runs inside runs, and a later rerun
    of the outer one would replace the inner ones: refused (more or other seeds are fine)."""
    if not (output / MANIFEST).is_file():
        return
    try:
        before = read_json_limited(output / MANIFEST)
    except UnsafeFileError:
        return  # read_manifest reports it when the report is written
    if not isinstance(before, dict) or not (before.get("cells") or before.get("selection")):
        return
    had = before.get("seeds") is not None
    if had != (seeds is not None):
        was = "with --seeds" if had else "without --seeds"
        raise ConfigError(
            f"--output: {output} holds a grid run {was}; cells with and without --seeds do not share a bench "
            f"directory ({'give --seeds' if had else 'leave out --seeds'}, or choose another --output)"
        )


def run_grid(
    config_path: str | None,
    methods: str,
    orders: str,
    overrides: Sequence[str] = (),
    output: str | Path = "runs/bench",
    label: str | None = None,
    jobs: int = 1,
    tune: Sequence[str] = (),
    select_on: str | None = None,
    seeds: str | None = None,
) -> list[CellResult]:
    """Validate the whole grid, run the cells not finished yet (`jobs` of them at a time, each in its own
    process, when jobs > 1), then write bench.md / .csv / .png. With `tune` (--tune entries), each method's
    config is first selected on validation (see select_configs), then the chosen one runs on test. With
    `seeds` (--seeds "1,2,3"), every cell is repeated at each train.seed."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {jobs}")
    check_select_on(select_on, bool(tune))
    tuned = parse_tune(tune) if tune else []
    seed_list = parse_seeds(seeds)
    output = Path(output)
    check_bench_dir(output)
    check_seed_layout(output, seed_list)
    label = label or output.name
    method_specs, order_specs = parse_grid(methods, orders)
    check_seeds(seed_list, method_specs, tuned)
    base = load_config_data(config_path, list(overrides))
    # A cell is scored, not served: keep only its last adapter version unless the grid asks for more (a
    # multi-adapter method's version k holds k LoRAs, so keeping all grows as T^2 over a Long grid).
    base.setdefault("versions", {}).setdefault("keep", 1)
    command = bench_command(
        config_path, methods, orders, overrides, output, label, tune, select_on, seed_list
    )
    grid = ([m.text for m in method_specs], [o.text for o in order_specs], seed_list)
    selection, busy = None, []
    if tuned:
        method_specs, selection, busy = select_configs(
            base, method_specs, order_specs, tuned, list(tune), output, label, command, jobs, seed_list
        )
    cells = plan_grid(base, method_specs, order_specs, output, seed_list) if method_specs else []
    write_manifest(output, label, command, cells, selection, *grid)
    heads = [f"[cell {n}/{len(cells)}] {c.where}" for n, c in enumerate(cells, 1)]
    busy += run_cells(cells, heads, jobs)
    # Another call on this folder (one order each, say, to use more cores) rewrites bench.json when it
    # starts; write ours again so that this call reports the grid it ran.
    write_manifest(output, label, command, cells, selection, *grid)
    results = write_bench_report(output)
    if busy:
        raise CellsBusy(
            f"{len(busy)} cell(s) are being run by another process ({'; '.join(busy)}); run the same "
            "command again once it has finished"
        )
    return results


def run_cells(cells: list[Cell], heads: list[str], jobs: int) -> list[str]:
    """Run the cells not finished yet, one after the other or `jobs` at a time; returns the heads of those
    left to another process running them."""
    pending = []
    for head, cell in zip(heads, cells, strict=True):
        if is_finished(cell.path, cell.config):
            (cell.path / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure this cell has outlived
            print(f"{head}: finished earlier, skipped")
        else:
            pending.append(workers.Job(head, cell.path, cell))
    busy = []
    if jobs > 1 and len(pending) > 1:
        outcomes = workers.run_jobs(pending, jobs, run_cell, _recorded_error, _record_error)
        busy = [head for head, outcome in outcomes.items() if outcome.status == "busy"]
    else:
        for job in pending:
            print(f"{job.head}: running in {job.path}")
            try:
                error = run_cell(job.cell)
            except FolderBusy as exc:
                print(f"{job.head}: skipped: {exc}")
                busy.append(job.head)
                continue
            if error:
                print(f"{job.head}: FAILED: {error} (traceback in {job.path / ERROR_FILE})")
    return busy


# -- selection on validation (--tune) -----------------------------------------------------------------------


def _validation_fraction(base: dict[str, Any]) -> tuple[float, bool]:
    """The fraction of training examples held out for selection, and whether --tune's default was applied
    (the config holds none): it is then written into `base`, so the final cells leave the same out."""
    fraction = build_config(base).benchmark.validation_fraction
    if fraction > 0:
        return fraction, False
    set_dotted(base, "benchmark.validation_fraction", DEFAULT_VALIDATION_FRACTION, "--tune")
    return DEFAULT_VALIDATION_FRACTION, True


def select_configs(
    base: dict[str, Any],
    methods: list[MethodSpec],
    orders: list[OrderSpec],
    tuned: list[TunedKey],
    tune_text: list[str],
    output: Path,
    label: str,
    command: str,
    jobs: int,
    seeds: list[int] | None = None,
) -> tuple[list[MethodSpec], dict[str, Any], list[str]]:
    """Run every tuning cell (validation only: no test file is opened before the choice is made), choose
    per method the candidate with the best mean validation AP over the orders (a tie: the one listed first),
    and return the methods to run on test (each tuned one with its choice; one without a choice is left
    out), bench.json's `selection`, and the heads of the tuning cells left to another process running them."""
    split = _dotted(base, "eval.split")
    if split not in (None, "test"):
        raise ConfigError(f"--tune: eval.split {_UNTUNABLE['eval.split']}; do not set it (it is {split!r})")
    fraction, defaulted = _validation_fraction(base)
    tunings, cells = plan_tuning(base, methods, orders, tuned, output, seeds)
    if defaulted:
        print(
            f"note: --tune: benchmark.validation_fraction is 0; holding out {DEFAULT_VALIDATION_FRACTION} of "
            "each task's training examples for selection (the final runs leave the same ones out)"
        )
    selection = {
        "select_on": "validation",
        "validation_fraction": fraction,
        "fraction_defaulted": defaulted,
        "tune": tune_text,
        "methods": [_method_record(t, cells, orders) for t in tunings],
        "cells": [_cell_entry(c, output) for c in cells],
    }
    texts = [m.text for m in methods]
    order_texts = [o.text for o in orders]
    write_manifest(output, label, command, [], selection, texts, order_texts, seeds)  # the grid's folder 1st
    heads = [
        f"[tune {n}/{len(cells)}] {c.method.text} {c.candidate.text if c.candidate else ''} on {c.order.text}"
        + ("" if c.seed is None else f" seed {c.seed}")
        for n, c in enumerate(cells, 1)
    ]
    busy = run_cells(cells, heads, jobs)
    records = [_method_record(t, cells, orders) for t in tunings]
    selection["methods"] = records
    chosen = []
    for tuning, record in zip(tunings, records, strict=True):
        print(f"[selection] {selection_line(record)}")
        if not tuning.candidates:
            chosen.append(tuning.method)
        elif record["chosen"] is not None:
            pick = next(c for c in tuning.candidates if c.text == record["chosen"])
            chosen.append(tuning.spec(pick))
    return chosen, selection, busy


def _tuning_score(cell: Cell) -> tuple[str, float | None]:
    """A tuning cell's state (ok, failed, unfinished) and its validation AP when ok."""
    if (cell.path / ERROR_FILE).is_file():
        return "failed", None
    results = _read_results(cell.path)
    if not (results and results.get("complete") and made_with(results, cell.config)):
        return "unfinished", None
    ap = results.get("metrics", {}).get("AP")
    return ("ok", float(ap)) if isinstance(ap, (int, float)) else ("failed", None)


def _method_record(tuning: MethodTuning, cells: list[Cell], orders: list[OrderSpec]) -> dict[str, Any]:
    """bench.json's account of one method's selection: each candidate's validation AP per order (with
    --seeds its mean over the seeds, once every seed is ok) and mean, its state (ok; failed: some cell
    failed, out of the running; unfinished), and the choice (None while a candidate is unfinished, or when
    none finished every order)."""
    candidates = []
    for candidate in tuning.candidates:
        mine: dict[str, list[Cell]] = {}
        for c in cells:
            if c.method.text == tuning.method.text and c.candidate and c.candidate.text == candidate.text:
                mine.setdefault(c.order.text, []).append(c)
        found = {order.text: [_tuning_score(c) for c in mine[order.text]] for order in orders}
        states = {state for runs in found.values() for state, _ in runs}
        state = "failed" if "failed" in states else "unfinished" if "unfinished" in states else "ok"
        scores = {
            order: statistics.fmean(ap for _, ap in runs) if all(ap is not None for _, ap in runs) else None
            for order, runs in found.items()
        }
        resolved = mine[orders[0].text][0].config.model_dump(mode="json")  # values as the config holds them
        values = {key: _dotted(resolved, key) for key in candidate.values}
        mean = statistics.fmean(ap for ap in scores.values() if ap is not None) if state == "ok" else None
        entry = {"text": candidate.text, "values": values, "scores": scores, "mean": mean}
        candidates.append({**entry, "state": state})
    chosen, why = None, tuning.note
    if tuning.candidates:
        if any(c["state"] == "unfinished" for c in candidates):
            why = "not every candidate has finished on every order yet"
        elif not any(c["state"] == "ok" for c in candidates):
            why = "no candidate finished on every order"
        else:
            best = max((c for c in candidates if c["state"] == "ok"), key=lambda c: c["mean"])  # 1st of ties
            chosen, why = best["text"], ""
    return {
        "method": tuning.method.text,
        "tuned_keys": list(tuning.candidates[0].values) if tuning.candidates else [],
        "fixed": tuning.fixed,
        "skipped": tuning.skipped,
        "candidates": candidates,
        "chosen": chosen,
        "note": why,
    }


def _dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def selection_line(record: dict[str, Any]) -> str:
    """One method's selection as the progress output says it."""
    method = record["method"]
    fixed = "".join(f"; {key} set in --methods (wins over --tune)" for key in record["fixed"])
    if not record["candidates"]:
        return f"{method}: not tuned ({record['note']}{fixed})"
    if record["chosen"] is None:
        return f"{method}: no choice: {record['note']}; its test cells do not run{fixed}"
    tried = ", ".join(f"{c['text']} {_fmt(c['mean'])}" for c in record["candidates"])
    best = next(c for c in record["candidates"] if c["text"] == record["chosen"])
    return (
        f"{method}: {record['chosen']} chosen, mean validation AP {_fmt(best['mean'])} (candidates: {tried})"
        + fixed
    )


class CellsBusy(ConfigError):
    """Some cells of the grid were left to another process running them; the report shows the rest."""

    exit_code = 1  # like a failed cell: the grid is not complete


def _recorded_error(path: Path) -> str | None:
    return _error_summary(path) if (path / ERROR_FILE).is_file() else None


def _record_error(job: workers.Job, summary: str) -> None:
    job.path.mkdir(parents=True, exist_ok=True)
    log = workers.log_path(job.path)
    (job.path / ERROR_FILE).write_text(f"{summary}\n\nThe worker's output: {log}\n", encoding="utf-8")


# -- the report ------------------------------------------------------------------------------------


@dataclass
class CellResult:
    """What the report needs of one cell, read back from its folder."""

    method: str
    order: str
    status: str  # ok, failed, incomplete, stale (finished with another config), missing
    results: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    candidate: str = ""  # a tuning cell's candidate (--tune); "" for the grid's own cells
    seed: int | None = None  # its train.seed under --seeds

    @property
    def where(self) -> str:
        """The cell in words, as the failure line names it."""
        seed = "" if self.seed is None else f" seed {self.seed}"
        tuning = f" (tuning {self.candidate})" if self.candidate else ""
        return f"{self.method} on {self.order}{seed}{tuning}"

    def metric(self, key: str) -> float | None:
        return self.results.get("metrics", {}).get(key) if self.status == "ok" else None


def _error_summary(path: Path) -> str:
    try:
        lines = read_text_limited(path / ERROR_FILE, limit=1 << 20).splitlines()
    except UnsafeFileError as exc:
        return f"unreadable {ERROR_FILE} ({exc})"
    return lines[0].strip() if lines and lines[0].strip() else "unknown error"


def read_cell(output: Path, entry: dict[str, Any]) -> CellResult:
    cell = dataclasses.replace(_read_cell(output, entry), seed=entry.get("seed"))
    return dataclasses.replace(cell, candidate=entry["candidate"]) if entry.get("candidate") else cell


def _read_cell(output: Path, entry: dict[str, Any]) -> CellResult:
    path = output / entry["path"]
    results = _read_results(path) or {}
    if (path / ERROR_FILE).is_file():
        return CellResult(entry["method"], entry["order"], "failed", results, _error_summary(path))
    if not results:
        return CellResult(entry["method"], entry["order"], "missing")
    if not results.get("complete"):
        return CellResult(entry["method"], entry["order"], "incomplete", results)
    try:
        wanted = build_config(entry["config"], str(output / MANIFEST))
    except ConfigError:
        return CellResult(entry["method"], entry["order"], "stale", results)
    status = "ok" if made_with(results, wanted) else "stale"
    return CellResult(entry["method"], entry["order"], status, results)


class _ManifestCell(BaseModel):
    method: str
    order: str
    path: str
    config: dict[str, Any]
    seed: int | None = None  # --seeds (absent in grids without)

    @field_validator("path")
    @classmethod
    def _inside_the_grid(cls, value: str) -> str:
        # A cell's folder lies inside the bench directory: a manifest from elsewhere may not point outside.
        if not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise ValueError(f"{value!r} is not a folder inside the bench directory")
        return value


class _TuneCell(_ManifestCell):
    candidate: str


class _CandidateRecord(BaseModel):
    text: str
    values: dict[str, Any]
    scores: dict[str, float | None]
    mean: float | None
    state: Literal["ok", "failed", "unfinished"]


class _MethodRecord(BaseModel):
    method: str
    tuned_keys: list[str]
    fixed: dict[str, Any]
    skipped: list[str]
    candidates: list[_CandidateRecord]
    chosen: str | None
    note: str


class _Selection(BaseModel):
    select_on: Literal["validation"]
    validation_fraction: float
    fraction_defaulted: bool
    tune: list[str]
    methods: list[_MethodRecord]
    cells: list[_TuneCell]


class _Manifest(BaseModel):
    label: str
    command: str
    methods: list[str]
    orders: list[str]
    cells: list[_ManifestCell]
    selection: _Selection | None = None
    seeds: list[int] | None = None  # --seeds (absent in grids without: each cell at its config's seed)

    @model_validator(mode="after")
    def _some_cell(self) -> _Manifest:
        if not self.cells and not (self.selection and self.selection.cells):
            raise ValueError("no cell")
        return self


def read_manifest(output: Path) -> dict[str, Any]:
    """bench.json, checked: every field the report reads is there with its type, every cell's config is a
    valid run config (its defaults filled in), and every cell path stays inside `output`."""
    where = output / MANIFEST
    if not where.exists():
        raise ConfigError(f"{output}: no {MANIFEST} here; not a `loracl bench` directory")
    try:
        manifest = _Manifest.model_validate(read_json_limited(where)).model_dump()
    except UnsafeFileError as exc:
        raise ConfigError(str(exc)) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<top level>"
        raise ConfigError(f"{where}: {key}: {first['msg']}; not a bench.json that loracl wrote") from exc
    for number, cell in enumerate(manifest["cells"]):
        cell["config"] = build_config(cell["config"], f"{where}: cell {number}").model_dump(mode="json")
    if manifest["selection"] is None:
        del manifest["selection"]
    else:
        for number, cell in enumerate(manifest["selection"]["cells"]):
            config = build_config(cell["config"], f"{where}: tuning cell {number}")
            cell["config"] = config.model_dump(mode="json")
    return manifest


@dataclass(frozen=True)
class Spread:
    """Mean and spread over orders of one metric; std is the sample standard deviation (n - 1)."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None


def aggregate(values: Sequence[float | None]) -> Spread:
    """Mean, sample std, min and max of the values present (None: undefined for that cell, left out)."""
    present = [v for v in values if v is not None]
    if not present:
        return Spread(0, None, None, None, None)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Spread(len(present), statistics.fmean(present), std, min(present), max(present))


def paper_family(orders: Sequence[str], benchmark: str) -> str | None:
    """Which reported benchmark family the grid's orders make up, if any (paper numbers only then)."""
    if benchmark == "superni":
        return "superni"
    for family, (_, members) in FAMILIES.items():
        if benchmark == "cl_benchmark" and members and set(orders) <= members:
            return family
    return None


def paper_ap(method: str, family: str | None) -> float | None:
    """The paper's AP beside a grid method, or None. A spec with its own config keys (`slao:train.lr=3e-3`) is
    still the paper's method (the paper tunes each method's rate too); one with method options
    (`slao:schedule=inv`) is a variant the paper did not report."""
    spec = parse_method(method)
    if family is None or spec.options:
        return None
    return PAPER_RESULTS.get(spec.name, {}).get(family, {}).get("AP")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(spread: Spread) -> str:
    if spread.mean is None:
        return "n/a"
    return _fmt(spread.mean) if spread.std is None else f"{spread.mean:.1f} ± {spread.std:.1f}"


def _by_method(manifest: dict[str, Any], cells: list[CellResult]) -> dict[str, list[CellResult]]:
    return {m: [c for c in cells if c.method == m] for m in manifest["methods"]}


def _seeds(manifest: dict[str, Any]) -> list[int | None]:
    """The seeds every cell ran at (--seeds), or [None]: one run per (method, order) at its config's seed."""
    return list(manifest.get("seeds") or [None])


def _seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(str(seed) for seed in seeds)


def _runs_word(manifest: dict[str, Any]) -> str:
    return "orders" if manifest.get("seeds") is None else "runs (every order at every seed)"


def ranking_line(
    manifest: dict[str, Any], cells: list[CellResult], stats: BenchStatistics | None = None
) -> str:
    """The continual methods ordered by mean AP, best first: the table's verdict in one line, whoever wins.
    Means equal at the table's precision are one rank, joined by `=`. Upper bounds and references are left
    out; they are comparison points, not contenders."""
    means = []
    for method, group in _by_method(manifest, cells).items():
        mean = aggregate([c.metric("AP") for c in group]).mean
        if mean is not None and method_class(parse_method(method).name).role == "continual":
            means.append((f"{mean:.1f}", mean, method))
    if not means:
        return "No continual method finished a cell yet."
    ranks: list[list[tuple[str, float, str]]] = []
    for entry in sorted(means, key=lambda m: -m[1]):  # stable: level methods keep the grid's order
        if ranks and ranks[-1][0][0] == entry[0]:
            ranks[-1].append(entry)
        else:
            ranks.append([entry])
    ranked = " > ".join(" = ".join(f"{method} {shown}" for shown, _, method in rank) for rank in ranks)
    line = f"Continual methods by mean AP, best first: {ranked}."
    if stats is not None and len(means) > 1:
        line += " Whether a gap is more than noise: the paired comparisons below."
    return line


def summary_table(manifest: dict[str, Any], cells: list[CellResult], family: str | None) -> str:
    paper_col = f" AP (paper, {PAPER_MODEL}) |" if family else ""
    done_col = "orders done" if manifest.get("seeds") is None else "runs done (orders × seeds)"
    lines = [
        f"| method | data-free | role | AP | BWT | FWT | forgetting | AP min–max | {done_col} |" + paper_col,
        "|---" * (9 + bool(family)) + "|",
    ]
    expected = len(manifest["orders"]) * len(_seeds(manifest))
    for method, group in _by_method(manifest, cells).items():
        cls = method_class(parse_method(method).name)
        spreads = {k: aggregate([c.metric(k) for c in group]) for k in METRICS}
        ap = spreads["AP"]
        span = "n/a" if ap.low is None else f"{ap.low:.1f}–{ap.high:.1f}"
        done = sum(c.status == "ok" for c in group)
        row = (
            f"| {method} | {'yes' if cls.data_free else '**no**'} | {cls.role} | "
            + " | ".join(_mean_std(spreads[k]) for k in METRICS)
            + f" | {span} | {done}/{len(group) or expected} |"  # no cell: not chosen yet
        )
        if family:
            paper = paper_ap(method, family)
            row += f" {_fmt(paper)} |" if paper is not None else " – |"
        lines.append(row)
    return "\n".join(lines)


def cells_table(cells: list[CellResult], seeds: bool = False) -> str:
    seed_col = " seed |" if seeds else ""
    lines = [
        f"| method | order |{seed_col} AP | BWT | FWT | forgetting | train s | wall s | status |",
        "|---" * (9 + seeds) + "|",
    ]
    for c in cells:
        timings = c.results.get("timings", {}) if c.status == "ok" else {}
        status = c.status if not c.error else f"failed: {c.error}"
        lines.append(
            f"| {c.method} | {c.order} |"
            + (f" {c.seed} |" if seeds else "")
            + " "
            + " | ".join(_fmt(c.metric(k)) for k in METRICS)
            + f" | {_fmt(timings.get('train_total'), 0)} | {_fmt(timings.get('wall'), 0)} | "
            + f"{status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def paper_table(family: str) -> str:
    """The paper's numbers for the benchmark family the grid makes up (the only ones bench.md shows)."""
    paper = f"paper, {PAPER_MODEL}"
    lines = [f"| method | benchmark | AP ({paper}) | BWT ({paper}) |", "|---" * 4 + "|"]
    for method, families in PAPER_RESULTS.items():
        if family in families:
            numbers = families[family]
            ap, bwt = (_fmt(numbers[k]) if k in numbers else "not reported" for k in ("AP", "BWT"))
            lines.append(f"| {method} | {FAMILIES[family][0]} | {ap} | {bwt} |")
    return "\n".join(lines)


def _entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's cells, or while a selection has chosen nothing yet its tuning cells (for the model, the
    benchmark and the orders the report names)."""
    return manifest["cells"] or manifest["selection"]["cells"]


def _orders_text(manifest: dict[str, Any]) -> str:
    configs = {e["order"]: e["config"]["benchmark"] for e in _entries(manifest)}
    return "\n".join(
        f"- `{order}`: {' → '.join(b['tasks'] or ORDERS.get(b['order'] or '', []))}"
        for order, b in configs.items()
    )


def _setup_text(manifest: dict[str, Any], base: dict[str, Any]) -> str:
    """The setup line; with --seeds it names every seed, not the first cell's alone."""
    line = setup_line({"config": base})
    seeds = manifest.get("seeds")
    if seeds is None:
        return line
    line = line.replace(f"seed {base['train']['seed']};", f"seeds {_seeds_text(seeds)};")
    return (
        f"{line}\n\nSeeds (`train.seed`, `--seeds`): {_seeds_text(seeds)}: every (method, order) cell ran at "
        f"each, in `<method>/<order>/{SEED_DIR.format('<s>')}/`."
    )


def bench_markdown(
    manifest: dict[str, Any],
    cells: list[CellResult],
    family: str | None,
    output: Path | None = None,
    tuning: Sequence[CellResult] = (),
    stats: BenchStatistics | None = None,
) -> str:
    base = _entries(manifest)[0]["config"]
    ok = [c for c in cells if c.status == "ok"]
    devices = sorted({c.results.get("device", "?") for c in ok}) or ["n/a"]
    if stats is None and output is not None:
        stats = bench_statistics(manifest, cells, output)
    seeded = manifest.get("seeds") is not None
    paper_note = (
        f"The last column and the table at the end are the **paper's** numbers ({PAPER_MODEL}, "
        f"{FAMILIES[family][0]}), not ours: another model, full data, no caps."
        if family
        else "No paper numbers beside ours: these orders are not a benchmark family the paper reports."
    )
    paper_section = (
        f"""
## Reported in the paper ({PAPER_MODEL}; source: METHODS.md, Qiao & Mahdavi, ICLR 2026)

{paper_table(family)}
"""
        if family
        else ""
    )
    return f"""# loracl bench: {manifest["label"]}

Model `{base["model"]["name"]}` ({base["model"]["dtype"]}), benchmark `{base["benchmark"]["name"]}`, on
{", ".join(f"`{d}`" for d in devices)}; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.
{_setup_text(manifest, base)}

Reproduce: `{manifest["command"]}`

Task orders:
{_orders_text(manifest)}

## Mean over {"orders and seeds" if seeded else "orders"}

Scores in percent; each cell is mean ± std over the {_runs_word(manifest)} run (std: sample standard
deviation, n − 1; n/a where a metric is undefined: FWT without zero-shot, BWT/FWT for joint training).
Data-free: no example of a finished task is kept; role `upper_bound` / `reference` are comparison points,
not continual methods.
{paper_note}

{summary_table(manifest, cells, family)}

{ranking_line(manifest, cells, stats)}

{statistics_section(stats) if output is not None else ""}
{selection_section(manifest, tuning)}
## Every cell (method × order{" × seed" if seeded else ""})

{cells_table(cells, seeded)}
{paper_section}
![AP, BWT and forgetting per method](bench.png)
"""


# -- statistics from the predictions the cells keep --------------------------------------------------------


def _examples_key(task: str, references: list[Any], seed: Any, capped: bool) -> tuple[Any, ...]:
    """What names a task's test examples across runs: the task, its examples' references (in order), and
    when a cap picked them (max_test reached) the seed that picked them (data.benchmarks: seeded by task
    name and train.seed, whatever the order)."""
    digest = hashlib.sha256(json.dumps(references, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (task, digest, seed if capped else None)


def _read_step(path: Path) -> dict[str, tuple[list[float], list[Any]]]:
    """One evaluation's predictions.jsonl: per task, the example scores and references, in file order."""
    found: dict[str, tuple[list[float], list[Any]]] = {}
    for record in read_predictions(path):
        scores, references = found.setdefault(str(record.get("task")), ([], []))
        scores.append(float(record["score"]))
        references.append(record.get("references"))
    return found


def read_run(run_dir: Path, results: dict[str, Any]) -> Run | None:
    """A finished cell's per-example scores after every training step (tasks/<i>-<task>/predictions.jsonl),
    or after the last alone (joint training: one evaluation), as engine.statistics reads them; None when
    the cell kept no predictions (run by an older loracl) or its last evaluation misses a task."""
    tasks = [str(t) for t in results.get("tasks") or []]
    config = results.get("config") or {}
    max_test = (config.get("benchmark") or {}).get("max_test")
    seed = (config.get("train") or {}).get("seed")
    try:
        last = _read_step(predictions_file(run_dir, None))
    except LoraclError:
        return None
    if not tasks or not all(t in last for t in tasks):
        return None
    sizes = [len(last[t][0]) for t in tasks]
    keys = tuple(
        _examples_key(t, last[t][1], seed, max_test is not None and n >= max_test)
        for t, n in zip(tasks, sizes, strict=True)
    )
    final = tuple(np.asarray(last[t][0]) for t in tasks)
    rows: list[tuple[np.ndarray | None, ...]] = []
    for step in range(1, len(tasks)):
        try:
            found = _read_step(predictions_file(run_dir, step))
        except LoraclError:
            return Run(keys, (final,))  # joint training, or steps without predictions: the last row only
        rows.append(
            tuple(
                np.asarray(found[t][0]) if t in found and len(found[t][0]) == n else None
                for t, n in zip(tasks, sizes, strict=True)
            )
        )
    return Run(keys, (*rows, final))


@dataclass(frozen=True)
class MethodStatistics:
    """A method's intervals: AP over test examples (orders and seeds fixed) and over orders, seeds and
    test examples (hierarchical; the same with one run), BWT and forgetting hierarchical (None: undefined)."""

    ap_examples: Interval
    ap: Interval
    bwt: Interval | None
    forgetting: Interval | None


@dataclass(frozen=True)
class PairStatistics:
    """AP(first) - AP(second), paired: over test examples, hierarchical, and the test examples per task
    (`needed`, engine.statistics.examples_to_resolve) at which the difference would be resolved with the
    orders and seeds fixed; `per_task`: the smallest task's test examples now. None: not the same examples."""

    first: str
    second: str
    examples: Interval | None
    hierarchical: Interval | None
    needed: int | None
    per_task: int

    @property
    def resolved(self) -> bool:
        return all(i is not None and i.resolved for i in (self.examples, self.hierarchical))


@dataclass
class BenchStatistics:
    orders: int
    seeds: int
    methods: dict[str, MethodStatistics]
    pairs: list[PairStatistics]
    without: list[str]  # methods left out: some run failed, is missing or kept no predictions

    @property
    def runs(self) -> int:
        return self.orders * self.seeds


def method_grids(
    manifest: dict[str, Any], cells: list[CellResult], output: Path
) -> dict[str, list[list[Run]]]:
    """Per method with every (order, seed) finished and its predictions kept, its runs: orders x seeds."""
    found: dict[tuple[str, str, int | None], Run] = {}
    for entry, cell in zip(manifest["cells"], cells, strict=True):
        if cell.status == "ok":
            run = read_run(output / entry["path"], cell.results)
            if run is not None:
                found[(cell.method, cell.order, cell.seed)] = run
    orders, seeds = manifest["orders"], _seeds(manifest)
    return {
        method: [[found[(method, o, s)] for s in seeds] for o in orders]
        for method in manifest["methods"]
        if all((method, o, s) in found for o in orders for s in seeds)
    }


def bench_statistics(manifest: dict[str, Any], cells: list[CellResult], output: Path) -> BenchStatistics:
    """Every complete method's intervals and every two such methods' paired comparison (engine.statistics)."""
    grids = method_grids(manifest, cells, output)
    orders, seeds = len(manifest["orders"]), len(_seeds(manifest))
    several = orders * seeds > 1
    methods = {}
    for method, grid in grids.items():
        examples = interval(grid, "AP")
        assert examples is not None  # every run has its last row
        methods[method] = MethodStatistics(
            examples,
            interval(grid, "AP", hierarchical=True) if several else examples,  # type: ignore[arg-type]
            interval(grid, "BWT", hierarchical=True),
            interval(grid, "forgetting", hierarchical=True),
        )
    pairs = []
    names = list(grids)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = grids[first], grids[second]
            per_task = min(len(v) for runs in a for run in runs for v in run.rows[-1] if v is not None)
            try:
                examples = paired_difference(a, b)
                hierarchical = paired_difference(a, b, hierarchical=True) if several else examples
                needed = examples_to_resolve(a, b)
            except ValueError:  # not the same test examples
                examples = hierarchical = needed = None
            pairs.append(PairStatistics(first, second, examples, hierarchical, needed, per_task))
    without = [m for m in manifest["methods"] if m not in grids]
    return BenchStatistics(orders, seeds, methods, pairs, without)


def _across(orders: int, seeds: int) -> str:
    """What the hierarchical interval resamples besides test examples, in words."""
    return "orders" if seeds == 1 else "orders and seeds" if orders > 1 else "seeds"


def _over(across: str) -> str:
    """The levels of the hierarchical interval in words: "orders, seeds and test examples"."""
    return f"{across.replace(' and ', ', ')} and test examples"


def _span(value: Interval | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{value.low:{sign}.1f} – {value.high:{sign}.1f}"


def _with_span(value: Interval | None) -> str:
    return "n/a" if value is None else f"{value.value:.1f} ({_span(value)})"


def _verdict(pair: PairStatistics, several: bool, across: str) -> str:
    if pair.examples is None or pair.hierarchical is None:
        return "n/a"
    if pair.resolved:
        return "resolved"
    if pair.examples.resolved:  # only across orders / seeds is it noise
        return (
            f"not resolved across {across} (resolved on these runs' test examples: more {across}, not more "
            "test examples, would settle it)"
        )
    if pair.needed is None:
        return "not resolved (no difference)"
    fixed = f" with these {across}" if several else ""
    if pair.needed <= pair.per_task:
        return (
            f"not resolved (at the edge: the normal approximation puts it at ~{pair.needed} test examples "
            f"per task{fixed}; now {pair.per_task})"
        )
    needed = f"~{pair.needed} test examples per task would resolve it{fixed}"
    return f"not resolved ({needed}; now {pair.per_task})"


def statistics_section(stats: BenchStatistics | None) -> str:
    """bench.md's intervals: per method AP over test examples (and, with several orders or seeds, over
    them too: hierarchical), BWT and forgetting; per pair of methods the paired difference, its verdict
    and the test examples per task that would resolve it."""
    if stats is None or not stats.methods:
        return (
            "## Intervals\n\nNo method has predictions kept in every "
            + ("order" if stats is None or stats.seeds == 1 else "order at every seed")
            + " (older cells, or cells not finished): no interval."
        )
    several = stats.runs > 1
    across = _across(stats.orders, stats.seeds)
    levels = (
        "the orders with replacement, then within each drawn order its seeds"
        if stats.orders > 1 and stats.seeds > 1
        else "the orders with replacement" if stats.orders > 1 else "the seeds with replacement"
    )  # fmt: skip
    fixed = "the order fixed" if stats.runs == 1 else f"the {across} fixed"
    intro = (
        f"95 % bootstrap intervals ({DRAWS} draws). **Over test examples**: {fixed}, each task's test "
        "examples resampled within the task (examples several runs share, the same task at the same cap and "
        "seed in another order, are drawn together)."
    )
    if several:
        intro += (
            f" **Over {_over(across)}** (hierarchical): each draw resamples {levels}, then the "
            f"test examples; with {stats.orders} order(s) and {stats.seeds} seed(s) it is narrow (a few "
            "values resampled): read it as a lower bound of the spread between them."
        )
    intro += (
        f" BWT and forgetting (from every step's predictions): the {'hierarchical' if several else 'same'} "
        "interval. A difference of two methods "
        "is paired (the same draws for both, on the same examples) and **resolved** when its interval"
        f"{'s exclude' if several else ' excludes'} 0; otherwise it is noise at this size."
    )
    hier_col = f" 95 % over {_over(across)} |" if several else ""
    lines = [
        "## Intervals and paired comparisons",
        "",
        intro,
        "",
        f"| method | AP | 95 % over test examples |{hier_col} BWT (95 %) | forgetting (95 %) |",
        "|---" * (5 + several) + "|",
    ]
    for method, m in stats.methods.items():
        hier = f" {_span(m.ap)} |" if several else ""
        lines.append(
            f"| {method} | {m.ap.value:.1f} | {_span(m.ap_examples)} |{hier} {_with_span(m.bwt)} | "
            f"{_with_span(m.forgetting)} |"
        )
    if stats.without:
        left = ", ".join(stats.without)
        lines += ["", f"No interval (not every run finished with its predictions kept): {left}."]
    pair_hier = f" 95 % over {_over(across)} |" if several else ""
    lines += [
        "",
        f"| difference | AP points | 95 % over test examples |{pair_hier} verdict |",
        "|---" * (4 + several) + "|",
    ]
    for pair in stats.pairs:
        name = f"{pair.first} − {pair.second}"
        if pair.examples is None or pair.hierarchical is None:
            lines.append(f"| {name} | n/a | not the same test examples |{' n/a |' if several else ''} n/a |")
            continue
        hier = f" {_span(pair.hierarchical, True)} |" if several else ""
        lines.append(
            f"| {name} | {pair.examples.value:+.1f} | {_span(pair.examples, True)} |{hier} "
            f"{_verdict(pair, several, across)} |"
        )
    if stats.pairs:
        lines += [
            "",
            "Test examples per task that would resolve a difference D (the verdicts' number; "
            f"{'the ' + across + ' fixed; ' if several else ''}engine.statistics): n ≥ 1.96² Σ_k s_k² / D², "
            "s_k² the variance over task k's examples of the paired difference c_k,i = 100 (a_i − b_i) / "
            "(runs × tasks), summed over the runs sharing those examples; for one run of T tasks "
            "n ≥ (1.96 × 100 / T)² Σ_t var_t(a − b) / D². It assumes D and the per-example variance stay as "
            "observed.",
        ]
    return "\n".join(lines)


def selection_section(manifest: dict[str, Any], tuning: Sequence[CellResult]) -> str:
    """bench.md's account of --tune: every candidate's validation AP per order and mean, the choice marked,
    and per method the tuned keys it sets itself or does not have."""
    selection = manifest.get("selection")
    if not selection:
        return ""
    orders = manifest["orders"]
    state: dict[tuple[str, str, str], list[CellResult]] = {}
    for c in tuning:
        state.setdefault((c.method, c.candidate, c.order), []).append(c)
    defaulted = " (the default of --tune: the config held none)" if selection["fraction_defaulted"] else ""
    seeds = manifest.get("seeds")
    seeds_text = "" if seeds is None else f" at every seed ({_seeds_text(seeds)}; an order's score: the mean)"
    lines = [
        "",
        "## Selection on validation",
        "",
        f"Tuned: {', '.join(f'`--tune {t}`' for t in selection['tune'])}. Every candidate config of a method "
        f"ran on every order{seeds_text} with evaluation on a **validation** split carved from the training "
        "data "
        f"(`benchmark.validation_fraction` = {selection['validation_fraction']:g} of each task's training "
        f"examples{defaulted}; the final runs leave the same examples out of their training). Per method the "
        "candidate with the best mean validation AP over the orders was chosen (a tie: the one listed first) "
        "and run on test: the cells above. **Test data was never read during selection**: the tuning runs "
        f"(`{TUNE_DIR}/<method>/<candidate>/<order>/{'' if seeds is None else 'seed-<s>/'}`, `eval.split: "
        "validation`) open no test file, and the "
        "final cells are planned, their test data read, only after the choice.",
        "",
        "| method | candidate | " + " | ".join(f"{o} (validation AP)" for o in orders) + " | mean | chosen |",
        "|---" * (len(orders) + 4) + "|",
    ]
    notes = []
    for record in selection["methods"]:
        method = record["method"]
        for candidate in record["candidates"]:
            scores = []
            for order in orders:
                score = candidate["scores"].get(order)
                runs = state.get((method, candidate["text"], order), [])
                status = next((c.status for c in runs if c.status != "ok"), "missing")  # a seed not ok
                scores.append(_fmt(score) if score is not None else status)
            mark = "**chosen**" if candidate["text"] == record["chosen"] else ""
            text = candidate["text"].replace("|", "/")
            lines.append(f"| {method} | {text} | {' | '.join(scores)} | {_fmt(candidate['mean'])} | {mark} |")
        said = [f"{key} is set in --methods ({value!r}), which wins over --tune" for key, value in
                record["fixed"].items()]  # fmt: skip
        said += [f"{key} is not one of its options" for key in record["skipped"]]
        if not record["candidates"]:
            said.append(f"not tuned: {record['note']}")
        elif record["chosen"] is None:
            said.append(f"no choice: {record['note']}; its test cells did not run")
        if said:
            notes.append(f"- `{method}`: {'; '.join(said)}.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_csv(cells: list[CellResult], path: Path) -> None:
    columns = ["method", "order", "seed", "status", *METRICS, "data_free", "role", "tasks", "train_seconds",
               "wall_seconds", "final_adapter_bytes", "error"]  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for c in cells:
            r = c.results if c.status == "ok" else {}
            writer.writerow([
                c.method, c.order, c.seed, c.status, *(c.metric(k) for k in METRICS), r.get("data_free"),
                r.get("role"), "+".join(r.get("tasks", [])), r.get("timings", {}).get("train_total"),
                r.get("timings", {}).get("wall"), (r.get("adapter_bytes") or [None])[-1], c.error,
            ])  # fmt: skip


PLOTTED = ("AP", "BWT", "forgetting")


def plot_order(manifest: dict[str, Any], cells: list[CellResult]) -> list[str]:
    """The chart's methods: by mean AP, best first (a method without AP last; ties in the grid's order)."""
    groups = _by_method(manifest, cells)
    means = {m: aggregate([c.metric("AP") for c in group]).mean for m, group in groups.items()}
    return sorted(groups, key=lambda m: (means[m] is None, -(means[m] or 0.0)))


def plot_bench(
    manifest: dict[str, Any],
    cells: list[CellResult],
    family: str | None,
    path: Path,
    stats: BenchStatistics | None = None,
) -> None:
    import matplotlib.pyplot as plt

    fig = bench_figure(manifest, cells, family, stats)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_figure(
    manifest: dict[str, Any],
    cells: list[CellResult],
    family: str | None,
    stats: BenchStatistics | None = None,
) -> Any:
    """bench.png's figure: AP, BWT and forgetting per method (mean over the runs; bar containers labelled
    by metric), the methods sorted by mean AP, each bar with its 95 % bootstrap interval where the cells
    kept predictions (hierarchical with several orders or seeds; error bar containers labelled
    `_<metric> interval`), and the paper's AP as a diamond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_method(manifest, cells)
    methods = plot_order(manifest, cells)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(methods) + 2), 4.8))
    width = 0.27
    for k, key in enumerate(PLOTTED):
        offset = (k - 1) * width
        spreads = [aggregate([c.metric(key) for c in groups[m]]) for m in methods]
        xs = [i + offset for i in range(len(methods))]
        heights = [math.nan if s.mean is None else s.mean for s in spreads]  # undefined: no bar, not a zero
        ax.bar(xs, heights, width, label=key)
        found = stats.methods if stats is not None else {}
        spans = [
            (x, h, _plotted_interval(found.get(m), key))
            for x, h, m in zip(xs, heights, methods, strict=True)
        ]
        spans = [(x, h, i) for x, h, i in spans if i is not None and not math.isnan(h)]
        if spans:
            ax.errorbar(
                [x for x, _, _ in spans],
                [h for _, h, _ in spans],
                yerr=[
                    [max(0.0, h - i.low) for _, h, i in spans],
                    [max(0.0, i.high - h) for _, h, i in spans],
                ],
                fmt="none",
                ecolor="black",
                elinewidth=1,
                capsize=3,
                label=f"_{key} interval",  # a leading _: not in the legend
            )
    paper = [(i, paper_ap(m, family)) for i, m in enumerate(methods)]
    paper = [(i - width, ap) for i, ap in paper if ap is not None]
    if paper:
        ax.scatter(*zip(*paper, strict=True), marker="D", color="black", zorder=3,
                   label=f"AP, paper ({PAPER_MODEL})")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), labels=methods, rotation=30, ha="right")
    ax.set_ylabel("percent")
    orders, seed_count = len(manifest["orders"]), len(_seeds(manifest))
    seeds = "" if manifest.get("seeds") is None else f" × {seed_count} seed(s)"
    over = _over(_across(orders, seed_count)) if orders * seed_count > 1 else "test examples"
    bars_text = f"95 % bootstrap interval over {over}"
    ax.set_title(
        f"{manifest['label']}: {orders} order(s){seeds}, sorted by mean AP\n"
        f"bars: mean over the runs; error bars: {bars_text}",
        fontsize="medium",
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _plotted_interval(stats: MethodStatistics | None, key: str) -> Interval | None:
    if stats is None:
        return None
    return {"AP": stats.ap, "BWT": stats.bwt, "forgetting": stats.forgetting}[key]


def write_bench_report(output: str | Path) -> list[CellResult]:
    """Read every cell of a bench directory and write bench.md, bench.csv and bench.png; returns the cells,
    the grid's own then the tuning cells (--tune), which the table and the CSV leave to bench.md's section
    on the selection."""
    output = Path(output)
    manifest = read_manifest(output)
    cells = [read_cell(output, entry) for entry in manifest["cells"]]
    tuning = [read_cell(output, entry) for entry in manifest.get("selection", {}).get("cells", [])]
    family = paper_family(manifest["orders"], _entries(manifest)[0]["config"]["benchmark"]["name"])
    stats = bench_statistics(manifest, cells, output)
    text = bench_markdown(manifest, cells, family, output, tuning, stats)
    (output / "bench.md").write_text(text, encoding="utf-8")
    write_csv(cells, output / "bench.csv")
    plot_bench(manifest, cells, family, output / "bench.png", stats)
    done = sum(c.status == "ok" for c in cells)
    tuned = f", {sum(c.status == 'ok' for c in tuning)}/{len(tuning)} tuning cells" if tuning else ""
    print(f"{done}/{len(cells)} cells finished{tuned}; table: {output / 'bench.md'}")
    return cells + tuning
