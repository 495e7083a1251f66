"""`loracl bench`: a grid of continual runs (method x task order), resumable, summarised in one table.

The bench directory:
- `bench.json`: the grid (label, method specs, orders, the command, each cell's resolved config);
- `<method>/<order>/`: one ordinary run directory per cell (see loracl.recipes.run), plus `bench_error.txt`
  (the traceback) when the cell failed;
- `bench.md`, `bench.csv`, `bench.png`: the table, one CSV row per cell, and a bar chart of AP and BWT.

A cell whose results.json is complete and holds the same resolved config is not run again, so an interrupted
or extended grid picks up where it stopped; anything else in a cell's folder is replaced by a fresh run.

With `--tune` (hyper-parameter selection, `--select-on validation`), every candidate config of each method
first runs on every order in `tune/<method>/<candidate>/<order>/` with `eval.split: validation` (scored on
a validation split carved from train; no test file is opened); per method the candidate with the best mean
validation AP is chosen, and only then are the ordinary cells planned (their test data read) and run with
the chosen config. bench.json's `selection` holds every candidate's scores and the choice.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
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

from pydantic import BaseModel, ValidationError, field_validator, model_validator

from loracl.config import RunConfig, build_config, load_config_data, parse_value, set_dotted
from loracl.data import ORDERS, load_tasks, resolve_benchmark
from loracl.engine.metrics import is_complete
from loracl.engine.statistics import DRAWS, ap_interval, examples_to_resolve, paired_difference
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

    def config_json(self) -> dict[str, Any]:
        """The resolved config as results.json stores it (what a finished cell is compared with)."""
        return json.loads(json.dumps(self.config.model_dump(mode="json")))


def cell_data(base: dict[str, Any], method: MethodSpec, order: OrderSpec) -> dict[str, Any]:
    """The config mapping of one cell: the base config's method options, then the spec's own options and
    config keys, on top."""
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
    return data


def plan_grid(
    base: dict[str, Any], methods: list[MethodSpec], orders: list[OrderSpec], output: Path
) -> list[Cell]:
    """Every cell's config, validated (method options and each order's data) before anything runs."""
    build_config(base)  # the shared part, reported against the user's own file first
    cells = []
    for method in methods:
        for order in orders:
            where = f"{method.text} on {order.text}"
            config = resolve_benchmark(build_config(cell_data(base, method, order), where))
            try:
                create_method(method.name, config.method_options(), config.lora)
            except ConfigError as exc:
                raise ConfigError(f"--methods {method.text}: {exc}") from exc
            path = output / _dirname(method.text) / _dirname(order.text)
            cells.append(Cell(method, order, config, path, output / ZERO_SHOT_DIR))
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
) -> tuple[list[MethodTuning], list[Cell]]:
    """Every method's candidates and every tuning cell's config (evaluating on validation), validated, and
    each order's training data checked without opening a test file."""
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
            for order in orders:
                data = cell_data(base, spec, order)
                set_dotted(data, "eval.split", "validation", "--tune")
                where = f"{tuning.method.text} with {candidate.text} on {order.text}"
                config = resolve_benchmark(build_config(data, where))
                try:
                    create_method(spec.name, config.method_options(), config.lora)
                except ConfigError as exc:
                    raise ConfigError(f"--tune: {where}: {exc}") from exc
                same = seen.setdefault(runner.result_relevant_config(config), candidate.text)
                if same != candidate.text:
                    raise ConfigError(f"--tune: {same} and {candidate.text} give {spec.text} the same config")
                path = output / TUNE_DIR / _dirname(spec.text) / _dirname(candidate.text)
                path = path / _dirname(order.text)
                cells.append(Cell(spec, order, config, path, output / ZERO_SHOT_DIR, candidate))
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
) -> str:
    """The command line that reproduces this grid (recorded in bench.json and bench.md)."""
    parts = ["loracl", "bench"] + ([config_path] if config_path else [])
    parts += ["--methods", methods, "--orders", orders]
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
    return entry if cell.candidate is None else {**entry, "candidate": cell.candidate.text}


def write_manifest(
    output: Path,
    label: str,
    command: str,
    cells: list[Cell],
    selection: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    orders: Sequence[str] | None = None,
) -> None:
    """bench.json. `selection` (with --tune): how the methods were tuned, its cells and its outcome; the
    ordinary `cells` are then those of the chosen configs (none yet while the selection runs)."""
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
) -> list[CellResult]:
    """Validate the whole grid, run the cells not finished yet (`jobs` of them at a time, each in its own
    process, when jobs > 1), then write bench.md / .csv / .png. With `tune` (--tune entries), each method's
    config is first selected on validation (see select_configs), then the chosen one runs on test."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {jobs}")
    check_select_on(select_on, bool(tune))
    tuned = parse_tune(tune) if tune else []
    output = Path(output)
    check_bench_dir(output)
    label = label or output.name
    method_specs, order_specs = parse_grid(methods, orders)
    base = load_config_data(config_path, list(overrides))
    command = bench_command(config_path, methods, orders, overrides, output, label, tune, select_on)
    grid = ([m.text for m in method_specs], [o.text for o in order_specs])
    selection, busy = None, []
    if tuned:
        method_specs, selection, busy = select_configs(
            base, method_specs, order_specs, tuned, list(tune), output, label, command, jobs
        )
    cells = plan_grid(base, method_specs, order_specs, output) if method_specs else []
    write_manifest(output, label, command, cells, selection, *grid)
    heads = [f"[cell {n}/{len(cells)}] {c.method.text} on {c.order.text}" for n, c in enumerate(cells, 1)]
    busy += run_cells(cells, heads, jobs)
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
) -> tuple[list[MethodSpec], dict[str, Any], list[str]]:
    """Run every tuning cell (validation only: no test file is opened before the choice is made), choose
    per method the candidate with the best mean validation AP over the orders (a tie: the one listed first),
    and return the methods to run on test (each tuned one with its choice; one without a choice is left
    out), bench.json's `selection`, and the heads of the tuning cells left to another process running them."""
    split = _dotted(base, "eval.split")
    if split not in (None, "test"):
        raise ConfigError(f"--tune: eval.split {_UNTUNABLE['eval.split']}; do not set it (it is {split!r})")
    fraction, defaulted = _validation_fraction(base)
    tunings, cells = plan_tuning(base, methods, orders, tuned, output)
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
    write_manifest(output, label, command, [], selection, texts, order_texts)  # the grid's folder, first
    heads = [
        f"[tune {n}/{len(cells)}] {c.method.text} {c.candidate.text if c.candidate else ''} on {c.order.text}"
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
    """bench.json's account of one method's selection: each candidate's validation AP per order and mean,
    its state (ok; failed: some order failed, out of the running; unfinished), and the choice (None while
    a candidate is unfinished, or when none finished every order)."""
    candidates = []
    for candidate in tuning.candidates:
        mine = {
            c.order.text: c
            for c in cells
            if c.method.text == tuning.method.text and c.candidate and c.candidate.text == candidate.text
        }
        found = {order.text: _tuning_score(mine[order.text]) for order in orders}
        states = {state for state, _ in found.values()}
        state = "failed" if "failed" in states else "unfinished" if "unfinished" in states else "ok"
        scores = {order: ap for order, (_, ap) in found.items()}
        resolved = mine[orders[0].text].config.model_dump(mode="json")  # the values as the config holds them
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

    @property
    def where(self) -> str:
        """The cell in words, as the failure line names it."""
        return f"{self.method} on {self.order}" + (f" (tuning {self.candidate})" if self.candidate else "")

    def metric(self, key: str) -> float | None:
        return self.results.get("metrics", {}).get(key) if self.status == "ok" else None


def _error_summary(path: Path) -> str:
    try:
        lines = read_text_limited(path / ERROR_FILE, limit=1 << 20).splitlines()
    except UnsafeFileError as exc:
        return f"unreadable {ERROR_FILE} ({exc})"
    return lines[0].strip() if lines and lines[0].strip() else "unknown error"


def read_cell(output: Path, entry: dict[str, Any]) -> CellResult:
    cell = _read_cell(output, entry)
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


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(spread: Spread) -> str:
    if spread.mean is None:
        return "n/a"
    return _fmt(spread.mean) if spread.std is None else f"{spread.mean:.1f} ± {spread.std:.1f}"


def _by_method(manifest: dict[str, Any], cells: list[CellResult]) -> dict[str, list[CellResult]]:
    return {m: [c for c in cells if c.method == m] for m in manifest["methods"]}


def ranking_line(manifest: dict[str, Any], cells: list[CellResult]) -> str:
    """The continual methods ordered by mean AP, best first: the table's verdict in one line, whoever wins.
    Upper bounds and references are left out; they are comparison points, not contenders."""
    means = []
    for method, group in _by_method(manifest, cells).items():
        mean = aggregate([c.metric("AP") for c in group]).mean
        if mean is not None and method_class(parse_method(method).name).role == "continual":
            means.append((mean, method))
    if not means:
        return "No continual method finished a cell yet."
    ranked = " > ".join(f"{method} {mean:.1f}" for mean, method in sorted(means, key=lambda m: -m[0]))
    return f"Continual methods by mean AP, best first: {ranked}."


def summary_table(manifest: dict[str, Any], cells: list[CellResult], family: str | None) -> str:
    paper_col = f" AP (paper, {PAPER_MODEL}) |" if family else ""
    lines = [
        "| method | data-free | role | AP | BWT | FWT | forgetting | AP min–max | orders done |" + paper_col,
        "|---" * (9 + bool(family)) + "|",
    ]
    for method, group in _by_method(manifest, cells).items():
        cls = method_class(parse_method(method).name)
        spreads = {k: aggregate([c.metric(k) for c in group]) for k in METRICS}
        ap = spreads["AP"]
        span = "n/a" if ap.low is None else f"{ap.low:.1f}–{ap.high:.1f}"
        done = sum(c.status == "ok" for c in group)
        row = (
            f"| {method} | {'yes' if cls.data_free else '**no**'} | {cls.role} | "
            + " | ".join(_mean_std(spreads[k]) for k in METRICS)
            + f" | {span} | {done}/{len(group) or len(manifest['orders'])} |"  # no cell: not chosen yet
        )
        if family:
            paper = PAPER_RESULTS.get(method, {}).get(family, {}).get("AP")
            row += f" {_fmt(paper)} |" if paper is not None else " – |"
        lines.append(row)
    return "\n".join(lines)


def cells_table(cells: list[CellResult]) -> str:
    lines = ["| method | order | AP | BWT | FWT | forgetting | train s | wall s | status |", "|---" * 9 + "|"]
    for c in cells:
        timings = c.results.get("timings", {}) if c.status == "ok" else {}
        status = c.status if not c.error else f"failed: {c.error}"
        lines.append(
            f"| {c.method} | {c.order} | "
            + " | ".join(_fmt(c.metric(k)) for k in METRICS)
            + f" | {_fmt(timings.get('train_total'), 0)} | {_fmt(timings.get('wall'), 0)} | "
            + f"{status.replace('|', '/')} |"
        )
    return "\n".join(lines)


def paper_table() -> str:
    paper = f"paper, {PAPER_MODEL}"
    lines = [f"| method | benchmark | AP ({paper}) | BWT ({paper}) |", "|---" * 4 + "|"]
    for method, families in PAPER_RESULTS.items():
        for family, numbers in families.items():
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


def bench_markdown(
    manifest: dict[str, Any],
    cells: list[CellResult],
    family: str | None,
    output: Path | None = None,
    tuning: Sequence[CellResult] = (),
) -> str:
    base = _entries(manifest)[0]["config"]
    ok = [c for c in cells if c.status == "ok"]
    devices = sorted({c.results.get("device", "?") for c in ok}) or ["n/a"]
    paper_note = (
        f"The last column and the table below are the **paper's** numbers ({PAPER_MODEL}, "
        f"{FAMILIES[family][0]}), not ours: another model, full data, no caps."
        if family
        else "No paper numbers beside ours: these orders are not a benchmark family the paper reports."
    )
    return f"""# loracl bench: {manifest["label"]}

Model `{base["model"]["name"]}` ({base["model"]["dtype"]}), benchmark `{base["benchmark"]["name"]}`, on
{", ".join(f"`{d}`" for d in devices)}; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.
{setup_line({"config": base})}

Reproduce: `{manifest["command"]}`

Task orders:
{_orders_text(manifest)}

## Mean over orders

Scores in percent; each cell is mean ± std over the orders run (std: sample standard deviation, n − 1;
n/a where a metric is undefined: FWT without zero-shot, BWT/FWT for joint training). Data-free: no example
of a finished task is kept; role `upper_bound` / `reference` are comparison points, not continual methods.
{paper_note}

{summary_table(manifest, cells, family)}

{ranking_line(manifest, cells)}

{statistics_section(manifest, cells, output)}
{selection_section(manifest, tuning)}
## Every cell (method × order)

{cells_table(cells)}

## Reported in the paper ({PAPER_MODEL}; source: METHODS.md, Qiao & Mahdavi, ICLR 2026)

{paper_table()}

![AP and BWT per method](bench.png)
"""


def final_scores(output: Path, entry: dict[str, Any], tasks: list[str]) -> list[list[float]] | None:
    """A finished cell's per-example scores on every task after its last step (from its predictions.jsonl),
    in task order; None when the cell kept no predictions (run by an older loracl) or misses a task."""
    try:
        path = predictions_file(output / entry["path"], None)
        records = list(read_predictions(path))
    except LoraclError:
        return None
    by_task: dict[str, list[float]] = {}
    for record in records:
        by_task.setdefault(str(record.get("task")), []).append(float(record["score"]))
    return [by_task[t] for t in tasks] if all(t in by_task for t in tasks) else None


def statistics_section(manifest: dict[str, Any], cells: list[CellResult], output: Path | None = None) -> str:
    """95 % bootstrap intervals of AP per method (over test examples; orders fixed) and a paired comparison
    of every two methods on the same examples, each marked resolved or not (engine.statistics)."""
    if output is None:
        return ""
    scores: dict[str, dict[str, list[list[float]]]] = {}
    for entry, cell in zip(manifest["cells"], cells, strict=True):
        found = final_scores(output, entry, cell.results.get("tasks", [])) if cell.status == "ok" else None
        if found is not None:
            scores.setdefault(cell.method, {})[cell.order] = found
    orders = manifest["orders"]
    complete = {m: [found[o] for o in orders] for m, found in scores.items() if set(found) >= set(orders)}
    if not complete:
        return "## Intervals\n\nNo method has predictions kept in every order (older cells): no interval."
    lines = [
        "## Intervals and paired comparisons",
        "",
        f"95 % bootstrap intervals over the test examples (each task resampled within itself, {DRAWS} draws; "
        "the orders are fixed: the spread between orders is the table's std). A difference is **resolved** "
        "when its paired interval (the same examples for both methods) excludes 0.",
        "",
        "| method | AP | 95 % interval |",
        "|---|---|---|",
    ]
    for method, orders_scores in complete.items():
        interval = ap_interval(orders_scores)
        lines.append(f"| {method} | {interval.value:.1f} | {interval.low:.1f} – {interval.high:.1f} |")
    lines += ["", "| difference | AP points | 95 % interval | verdict |", "|---|---|---|---|"]
    names = list(complete)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            lines.append(_comparison_row(first, second, complete))
    return "\n".join(lines)


def _comparison_row(first: str, second: str, complete: dict[str, list[list[list[float]]]]) -> str:
    try:
        diff = paired_difference(complete[first], complete[second])
    except ValueError:
        return f"| {first} − {second} | n/a | not the same test examples | n/a |"
    if diff.resolved:
        verdict = "resolved"
    else:
        per_task = min(len(task) for order in complete[first] for task in order)
        needed = examples_to_resolve(diff, per_task)
        verdict = "not resolved" + (f" (~{needed} test examples per task would resolve it)" if needed else "")
    return f"| {first} − {second} | {diff.value:+.1f} | {diff.low:+.1f} – {diff.high:+.1f} | {verdict} |"


def selection_section(manifest: dict[str, Any], tuning: Sequence[CellResult]) -> str:
    """bench.md's account of --tune: every candidate's validation AP per order and mean, the choice marked,
    and per method the tuned keys it sets itself or does not have."""
    selection = manifest.get("selection")
    if not selection:
        return ""
    orders = manifest["orders"]
    state = {(c.method, c.candidate, c.order): c for c in tuning}
    defaulted = " (the default of --tune: the config held none)" if selection["fraction_defaulted"] else ""
    lines = [
        "",
        "## Selection on validation",
        "",
        f"Tuned: {', '.join(f'`--tune {t}`' for t in selection['tune'])}. Every candidate config of a method "
        "ran on every order with evaluation on a **validation** split carved from the training data "
        f"(`benchmark.validation_fraction` = {selection['validation_fraction']:g} of each task's training "
        f"examples{defaulted}; the final runs leave the same examples out of their training). Per method the "
        "candidate with the best mean validation AP over the orders was chosen (a tie: the one listed first) "
        "and run on test: the cells above. **Test data was never read during selection**: the tuning runs "
        f"(`{TUNE_DIR}/<method>/<candidate>/<order>/`, `eval.split: validation`) open no test file, and the "
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
                cell = state.get((method, candidate["text"], order))
                scores.append(_fmt(score) if score is not None else cell.status if cell else "missing")
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
    columns = ["method", "order", "status", *METRICS, "data_free", "role", "tasks", "train_seconds",
               "wall_seconds", "final_adapter_bytes", "error"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for c in cells:
            r = c.results if c.status == "ok" else {}
            writer.writerow([
                c.method, c.order, c.status, *(c.metric(k) for k in METRICS), r.get("data_free"),
                r.get("role"), "+".join(r.get("tasks", [])), r.get("timings", {}).get("train_total"),
                r.get("timings", {}).get("wall"), (r.get("adapter_bytes") or [None])[-1], c.error,
            ])


def plot_bench(manifest: dict[str, Any], cells: list[CellResult], family: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_method(manifest, cells)
    methods = list(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(methods) + 2), 4.5))
    width = 0.38
    for offset, key in ((-width / 2, "AP"), (width / 2, "BWT")):
        spreads = [aggregate([c.metric(key) for c in groups[m]]) for m in methods]
        ax.bar(
            [i + offset for i in range(len(methods))],
            [math.nan if s.mean is None else s.mean for s in spreads],  # undefined: no bar, not a zero
            width,
            yerr=[s.std or 0.0 for s in spreads],
            capsize=3,
            label=f"{key} (mean ± std over orders)",
        )
    paper = [(i, PAPER_RESULTS.get(m, {}).get(family or "", {}).get("AP")) for i, m in enumerate(methods)]
    paper = [(i - width / 2, ap) for i, ap in paper if ap is not None]
    if paper:
        ax.scatter(*zip(*paper, strict=True), marker="D", color="black", zorder=3,
                   label=f"AP, paper ({PAPER_MODEL})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), labels=methods, rotation=30, ha="right")
    ax.set_ylabel("percent")
    ax.set_title(f"{manifest['label']}: {len(manifest['orders'])} order(s)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_bench_report(output: str | Path) -> list[CellResult]:
    """Read every cell of a bench directory and write bench.md, bench.csv and bench.png; returns the cells,
    the grid's own then the tuning cells (--tune), which the table and the CSV leave to bench.md's section
    on the selection."""
    output = Path(output)
    manifest = read_manifest(output)
    cells = [read_cell(output, entry) for entry in manifest["cells"]]
    tuning = [read_cell(output, entry) for entry in manifest.get("selection", {}).get("cells", [])]
    family = paper_family(manifest["orders"], _entries(manifest)[0]["config"]["benchmark"]["name"])
    text = bench_markdown(manifest, cells, family, output, tuning)
    (output / "bench.md").write_text(text, encoding="utf-8")
    write_csv(cells, output / "bench.csv")
    plot_bench(manifest, cells, family, output / "bench.png")
    done = sum(c.status == "ok" for c in cells)
    tuned = f", {sum(c.status == 'ok' for c in tuning)}/{len(tuning)} tuning cells" if tuning else ""
    print(f"{done}/{len(cells)} cells finished{tuned}; table: {output / 'bench.md'}")
    return cells + tuning
