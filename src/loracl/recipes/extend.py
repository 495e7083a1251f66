"""`loracl continue`: append tasks to a run, as if they had been in its task list from the start.

A continued run is the run of the longer sequence: its config lists the old tasks then the new ones, the
method resumes from the checkpoint after the last old task (SLAO's A_ft, B_ft, B_m and task count, GPM's
bases, EWC's Fisher, the replay memory, GainLoRA's gates: everything `state_dict` and the adapters hold),
and each new task is trained and evaluated as `loracl run` would, seeded by its position in the whole
sequence. So appending gives the same adapters and scores as one run over the whole sequence with the same
seed (tests/test_continue.py).

The accuracy matrix grows by rows and columns. Of the entries the old rows lack, the one a metric reads is
evaluated now: a[T_old][T_old + 1], the model after the last old task on the first new one (FWT, METHODS.md;
with `eval.matrix: full`, every new column of that row, as one long run evaluates it), from the restored
checkpoint, which is that model. The earlier rows' new columns were the models after earlier tasks, which no
longer exist: they stay null, "not evaluated" (`continued` in results.json says which). AP, BWT and FWT read
none of them; forgetting's max over every earlier row (METHODS.md) does for every new task but the last, so
a run continued by two or more tasks reports forgetting null, as an `eval.matrix: metrics` run does. The
base model's zero-shot scores are added for the new tasks.

Crash safety: everything is checked before anything is written (a task already in the run, another base
model, rank or method, a data folder whose old tasks differ from what the run read, an unreadable
checkpoint: one line, exit status 2, the run unchanged). The extended run is then written in the order
checkpoint, config.yaml, results.json; from then on it is an ordinary incomplete run, resumed by `loracl
run --resume` or by the same `loracl continue` again. A kill between the first two writes leaves a
checkpoint for the extended config beside the old config.yaml: `loracl continue` again recognises it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loracl.config import RunConfig, apply_override, build_config
from loracl.data import load_tasks
from loracl.engine import distributed
from loracl.engine.interrupt import stop_on_signals
from loracl.errors import CheckpointError, ConfigError, RunInterrupted
from loracl.files import write_json_atomic
from loracl.methods import method_class
from loracl.outputs.show import PREDICTIONS
from loracl.recipes.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    checkpoint_digest,
    checkpoint_version,
    config_hash,
    read_checkpoint,
    restore_checkpoint,
)
from loracl.recipes.run import (
    HARMLESS_KEYS,
    ContinualRun,
    _flatten,
    already_complete,
    prepare_run,
    result_relevant_config,
    resumed_config,
    run_provenance,
    say,
    write_config,
)

# What `continue` may change besides the harmless keys: where the data folder now is (its old tasks must be
# the files the run read), and the task list it extends.
MOVABLE_KEYS = ("benchmark.data_dir", "benchmark.tasks", "benchmark.order")


def continue_run(
    output_dir: str | Path,
    tasks: Sequence[str],
    overrides: Sequence[str] = (),
    zero_shot_cache: Path | None = None,
) -> dict[str, Any]:
    """Append `tasks` (names in the run's benchmark) to the run in `output_dir` and run them; returns
    results.json's content. `overrides`: "dotted.key=value" for the harmless keys and benchmark.data_dir."""
    start = time.perf_counter()
    run_dir = Path(output_dir)
    saved = resumed_config(run_dir, None)
    config, old_names, resuming = extended_config(run_dir, saved, list(tasks), overrides)
    check_method(config)
    if not resuming:
        checkpoint_version_or_none(run_dir)
    with stop_on_signals():
        try:
            cl = prepare_run(config, run_dir, resume=True)
        except RunInterrupted as exc:
            raise RunInterrupted(f"{exc}; the run is unchanged") from exc
    try:
        cl.zero_shot_cache = zero_shot_cache
        check_same_data(cl, old_names)
        if resuming or checkpoint_digest(run_dir) == cl.config_digest:
            # an interrupted continue: its checkpoint already holds the longer run (resume rewrites config)
            say(f"{run_dir}: the run already holds {', '.join(tasks)}: resuming it")
            cl.resume()
        else:
            extend(cl, saved, len(old_names))
        cl.start_tracking()
        return cl.run_all(start)
    finally:
        cl.release()


def extended_config(
    run_dir: Path, saved: RunConfig, new: list[str], overrides: Sequence[str]
) -> tuple[RunConfig, list[str], bool]:
    """The config of the longer sequence, the old task names, and whether the run already is that sequence
    (an interrupted `continue`, to resume). Refused in one line: no task, a task twice or already in the
    run, or an override of a key a continued run cannot change."""
    if not new or any(not name or not name.strip() for name in new):
        raise ConfigError("continue: --tasks needs one or more task names, e.g. --tasks yelp,agnews")
    names = run_task_names(run_dir, saved)
    if names[-len(new) :] == new and len(names) > len(new) and already_complete(run_dir) is None:
        return saved_with(saved, overrides, names), names[: -len(new)], True
    known = {name.lower(): i for i, name in enumerate(names, 1)}
    for k, name in enumerate(new):
        if name.lower() in known:
            raise ConfigError(f"continue: task {name!r} is already in the run (task {known[name.lower()]})")
        if name.lower() in (n.lower() for n in new[:k]):
            raise ConfigError(f"continue: task {name!r} is given twice")
    return saved_with(saved, overrides, [*names, *new]), names, False


def run_task_names(run_dir: Path, saved: RunConfig) -> list[str]:
    """The run's task sequence as it recorded it (results.json), or as its config names it."""
    try:
        recorded = json.loads((run_dir / "results.json").read_text(encoding="utf-8")).get("tasks")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, list) and recorded and all(isinstance(n, str) for n in recorded):
        return list(recorded)
    return [task.name for task in load_tasks(saved)]  # no task recorded yet: the config's list


def saved_with(saved: RunConfig, overrides: Sequence[str], names: list[str]) -> RunConfig:
    """`saved` with the overrides and the task list `names`; any other change is refused."""
    data = saved.model_dump(mode="json")
    for assignment in overrides:
        apply_override(data, assignment)
    data["benchmark"]["tasks"] = names
    data["benchmark"]["order"] = None
    config = build_config(data, "continue")
    old, now = _flatten(saved.model_dump(mode="json")), _flatten(config.model_dump(mode="json"))
    for key in sorted(old.keys() | now.keys()):
        if key in HARMLESS_KEYS or key in MOVABLE_KEYS or old.get(key) == now.get(key):
            continue
        raise ConfigError(
            f"continue: {key} is {now.get(key)!r} but the run used {old.get(key)!r}; a continued run keeps "
            "its base model, LoRA, method, data caps and training settings: start a new run to change them"
        )
    return config


def check_method(config: RunConfig) -> None:
    """A method whose run is one step over all tasks cannot take more tasks: a new run is that run."""
    cls = method_class(config.method.name)
    if cls.joint_training:
        raise ConfigError(
            f"continue: {cls.name} trains once on all tasks together; a run with more tasks is a new run"
        )
    if not cls.trains:
        raise ConfigError(f"continue: {cls.name} does not train; evaluate the base model with loracl eval")


def checkpoint_version_or_none(run_dir: Path) -> None:
    """Refuse, before the model loads, a checkpoint this loracl cannot read (another format version)."""
    if (run_dir / CHECKPOINT_DIR / LATEST).is_file():
        try:
            checkpoint_version(run_dir)
        except CheckpointError as exc:
            raise CheckpointError(f"continue: {exc}; the run is unchanged") from exc


def check_same_data(cl: ContinualRun, old_names: list[str]) -> None:
    """The old tasks' data files must hash as the run recorded them (provenance): a moved data folder is
    fine, other data would make the continued run a different sequence."""
    recorded = recorded_data_hashes(cl.run_dir)
    if recorded is None:
        return  # a run from before provenance: nothing to compare with
    old_tasks = cl.tasks[: len(old_names)]
    now = run_provenance(old_tasks, "", cl.config.eval.split)["data_files"]
    changed = [path for path, digest in now.items() if digest not in recorded]
    if changed:
        raise ConfigError(
            f"continue: {changed[0]} differs from the data the run read; give the data folder the run used "
            "(--data-dir)"
        )


def recorded_data_hashes(run_dir: Path) -> set[str] | None:
    """The sha256 of every data file the run recorded reading, or None when it recorded none."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        files = results["provenance"]["data_files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files.values()) if isinstance(files, dict) and files else None


def extend(cl: ContinualRun, saved: RunConfig, old_count: int) -> None:
    """Restore the run after its last finished task, add the new tasks' columns (scores where a metric needs
    them, zero-shot scores), and write the extended run: checkpoint, config.yaml, results.json. A run with
    no finished task only gets the longer task list (its fresh results already have every column)."""
    device = next(cl.model.parameters()).device
    checkpoint = read_checkpoint(cl.run_dir, config_hash(result_relevant_config(saved)), device)
    if checkpoint is None:
        distributed.on_main(lambda: write_config(cl.run_dir, cl.config))
        return
    restore_checkpoint(cl.model, cl.method, checkpoint)
    cl.results = checkpoint.results
    finished = checkpoint.finished
    new = list(range(old_count, len(cl.tasks)))
    cl.results["matrix"] = [[*row, *([None] * len(new))] for row in cl.results["matrix"]]
    if finished == old_count:
        fill_last_row(cl, finished, new)
    if cl.results.get("zero_shot") is not None:
        add_zero_shot(cl, new)
    record_extension(cl, old_count, finished)
    distributed.on_main(lambda: write_extended(cl))
    names = " -> ".join(cl.tasks[j].name for j in new)
    say(f"continuing after {finished} finished task(s) with {len(new)} new: {names}")


def fill_last_row(cl: ContinualRun, finished: int, new: list[int]) -> None:
    """Evaluate the restored model (the one after the last old task) on the new columns its row would
    have had in one long run: every new task (`eval.matrix: full`) or the next one (FWT's entry)."""
    wanted = cl.tasks_to_evaluate(finished)
    columns = new if wanted is None else [j for j in wanted if j in new]
    if not columns:
        return
    scores, seconds = cl.evaluate_all("eval of the last model on the new tasks", columns)
    row = cl.results["matrix"][finished - 1]
    for j in columns:
        row[j] = scores[j]
    cl.results["timings"]["eval"][finished - 1] += seconds
    folder = cl.run_dir / "tasks" / f"{finished}-{cl.tasks[finished - 1].name}"
    cl.write_predictions(folder, earlier_predictions(folder))


def earlier_predictions(folder: Path) -> list[dict[str, Any]]:
    """The records a step's predictions.jsonl already holds (none when it is missing or unreadable)."""
    try:
        lines = (folder / PREDICTIONS).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []


def add_zero_shot(cl: ContinualRun, new: list[int]) -> None:
    """The base model's scores on the new tasks (FWT's b_j), adapters off, as `zero_shot` takes them."""
    with cl.model.disable_adapter():
        scores, seconds = cl.evaluate_all("zero-shot eval of the new tasks", new)
    cl.results["zero_shot"] = [*cl.results["zero_shot"], *(scores[j] for j in new)]
    cl.results["timings"]["zero_shot_eval"] += seconds
    say(f"zero-shot on the new tasks: {' '.join(f'{scores[j]:.1f}' for j in new)}")


def record_extension(cl: ContinualRun, old_count: int, finished: int) -> None:
    """results.json as the longer run's, incomplete, with a `continued` record of the extension."""
    r = cl.results
    r["tasks"] = [t.name for t in cl.tasks]
    r["task_metrics"] = [cl.evaluator.metric_of(t) for t in cl.tasks]
    r["order"] = None
    r["config"] = cl.config.model_dump(mode="json")
    r["provenance"] = run_provenance(cl.tasks, r["device"], cl.config.eval.split)
    r["metrics"], r["complete"] = {}, False
    r["continued"] = [
        *r.get("continued", []),
        {
            "after_task": old_count,
            "tasks": r["tasks"][old_count:],
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # rows (1-based) whose new columns were not evaluated, their models gone: every finished row
            # but the last old task's, which the restored checkpoint is (fill_last_row)
            "not_evaluated_rows": list(range(1, finished if finished == old_count else finished + 1)),
        },
    ]


def write_extended(cl: ContinualRun) -> None:
    """Checkpoint first (for the extended config), then config.yaml, then results.json (main process)."""
    with cl.write_errors("the extended run", cl.finished):
        if cl.finished:
            cl.checkpoint()
        write_config(cl.run_dir, cl.config)
        write_json_atomic(cl.results, cl.run_dir / "results.json")
