"""The recipe: wire config, data, model, method, training loop and evaluation into one continual run.

Run directory (other tools rely on it): config.yaml, results.json, report.md, matrix.png, loss.png (when
anything was trained), adapter/ (final adapter, stock PEFT format), tasks/<i>-<task>/ for per-task artefacts
(train_log.jsonl, predictions.jsonl, the method's files), checkpoint/ (the state after the last finished
task, for `--resume`; see loracl.recipes.checkpoint) and, with `tracking.report_to`, tracking/ (the
experiment trackers' files; see loracl.engine.tracking). versions/v<k>/ and versions.json keep the adapter
after every finished task; adapter/ holds the promoted one, the last unless the forgetting guard held it
back (`loracl run` then exits with status 3; see loracl.outputs.versions).

Reproducibility: the global random generators are re-seeded from (seed, task index) before each task, so
a run resumed after task k draws the same numbers for task k + 1 as an uninterrupted run.

Launched with several processes (`accelerate launch`, `torchrun`) every process runs the same sequence on
its share of the data (see loracl.engine.distributed); only the main process writes files or prints. With
`train.parallel: fsdp` the frozen base's decoder blocks are sharded across the processes after the method
has attached its adapters (`distributed.shard_frozen_base`), and the evaluation keeps the processes in step
(`LockstepEvaluator`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import set_seed

from loracl import __version__
from loracl.config import RunConfig, build_config, dump_config, read_yaml
from loracl.data import Task, default_order, load_tasks
from loracl.engine import distributed
from loracl.engine.evaluation import Evaluator, TaskResult, make_evaluator
from loracl.engine.interrupt import check_interrupt, stop_at_once, stop_on_signals
from loracl.engine.metrics import all_metrics, other_conventions
from loracl.engine.tracking import Tracking, check_installed
from loracl.engine.training import NonFiniteTraining, TrainStats, train_task
from loracl.errors import CheckpointError, ConfigError, RunInterrupted
from loracl.files import (
    UnsafeFileError,
    is_write_failure,
    read_json_limited,
    remove_stale_temporaries,
    write_failure_reason,
    write_json_atomic,
    write_jsonl_atomic,
)
from loracl.locking import LOCK_NAME, FolderLock
from loracl.methods import ContinualMethod, create_method
from loracl.methods.context import TaskContext
from loracl.models.base_model import LoadedModel, load_model, resolve_device, resolve_dtype
from loracl.models.lora import check_lora_targets, target_modules
from loracl.outputs.provenance import data_files, model_card, provenance
from loracl.outputs.report import (
    LOSS_PLOT,
    matrix_entry,
    matrix_table,
    metrics_line,
    plot_losses,
    plot_matrix,
    write_report,
)
from loracl.outputs.show import PREDICTIONS  # in tasks/<i>-<task>/: the evaluation after task i
from loracl.outputs.versions import AdapterVersions, report_section, version_card
from loracl.recipes.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    config_hash,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from loracl.recipes.checkpoint import FORMAT as CHECKPOINT_FORMAT
from loracl.recipes.init_adapter import InitAdapter, adopt_init_adapter, read_init_adapter

# Keys that may change between a run and its resumption: they do not affect any result (eval.matrix only
# picks which entries of the accuracy matrix are evaluated, not what they score; tracking.* only where the
# numbers are also sent; gradient checkpointing recomputes activations and gives the same gradients,
# tests/test_gradient_checkpointing.py; sharding the frozen base changes where its weights live, not what
# they compute, tests/test_fsdp.py; versions.* decide which adapter adapter/ serves, not what is learnt).
HARMLESS_KEYS = (
    "output_dir",
    "model.cache_dir",
    "eval.matrix",
    "tracking.report_to",
    "tracking.project",
    "train.gradient_checkpointing",
    "train.parallel",
    "versions.keep",
    "versions.max_forgetting",
    "versions.guard_set",
)
DATA_SUFFIXES = (".json", ".jsonl")  # the files of a task folder provenance() hashes


def say(*args: Any) -> None:
    """print, on the main process only (the others would repeat every line)."""
    if distributed.is_main():
        print(*args)


def _is_loracl_config(path: Path) -> bool:
    try:
        build_config(read_yaml(path), str(path))
    except ConfigError:
        return False
    return True


def _is_loracl_json(path: Path, test: Callable[[dict[str, Any]], bool]) -> bool:
    try:
        data = read_json_limited(path, limit=64 << 20)
    except UnsafeFileError:
        return False
    return isinstance(data, dict) and test(data)


def is_loracl_run(path: Path) -> bool:
    """Whether a folder holds a loracl run, the only kind of folder `--overwrite` empties: a loracl
    config.yaml, results.json or checkpoint pointer, or nothing but the lock of a run that died before
    writing any of them. A user's folder that happens to be non-empty is never one."""
    if {p.name for p in path.iterdir()} <= {LOCK_NAME}:
        return True
    return (
        _is_loracl_config(path / "config.yaml")
        or _is_loracl_json(path / "results.json", lambda r: "loracl_version" in r and "matrix" in r)
        or _is_loracl_json(path / CHECKPOINT_DIR / LATEST, lambda r: r.get("format") == CHECKPOINT_FORMAT)
    )


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an --output that cannot hold a new run: a file, a
    path below a file, a non-empty folder without --overwrite, or with --overwrite a non-empty folder that
    is not a loracl run."""
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = (
                    "exists and is not a directory" if ancestor == path else f"lies below {ancestor}, a file"
                )
                raise ConfigError(f"output: {path} {where}")
            break
    if not path.is_dir() or not any(p.name != LOCK_NAME for p in path.iterdir()):
        return
    if not overwrite:
        raise ConfigError(
            f"output: {path} is not empty; pass --resume to continue that run, --overwrite to replace "
            "it, or choose another --output"
        )
    if not is_loracl_run(path):
        raise ConfigError(
            f"output: {path} is not empty and holds no loracl run (no loracl config.yaml, results.json or "
            "checkpoint); --overwrite only replaces a loracl run: choose another --output"
        )


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Empty the (locked) run directory for a new run: checked again now that no other loracl process can
    write it, then everything but the lock removed."""
    check_output_dir(path, overwrite)
    for entry in path.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def result_relevant_config(config: RunConfig) -> str:
    """The config less the harmless keys, as canonical JSON: what a checkpoint's config hash covers."""
    flat = _flatten(config.model_dump(mode="json"))
    if flat.get("eval.split") == "test":  # added later: at its default, the hash of older checkpoints holds
        del flat["eval.split"]
    if flat.get("lora.init_adapter", "") is None:  # added later too: unset, older checkpoints still fit
        del flat["lora.init_adapter"]
    return json.dumps({k: v for k, v in flat.items() if k not in HARMLESS_KEYS}, sort_keys=True)


def resumed_config(run_dir: Path, given: RunConfig | None) -> RunConfig:
    """The config of the run in `run_dir`; a config given again must match it except in harmless keys,
    which then take the values given now (another cache folder, `eval.matrix` for the remaining tasks)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml); start it without --resume")
    saved = build_config(read_yaml(saved_path), str(saved_path))
    if given is None:
        return saved
    old, new = _flatten(saved.model_dump(mode="json")), _flatten(given.model_dump(mode="json"))
    for key in sorted(old.keys() | new.keys()):
        if key not in HARMLESS_KEYS and old.get(key) != new.get(key):
            raise ConfigError(
                f"--resume: {key} is {new.get(key)!r} but the run in {run_dir} used {old.get(key)!r}; "
                "resume with the same config (or none: the run's own config.yaml is used)"
            )
    return given


def already_complete(run_dir: Path) -> dict[str, Any] | None:
    """results.json of a finished run, or None."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("complete") is True else None


def write_config(run_dir: Path, config: RunConfig) -> None:
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.method.name}-{datetime.now():%Y%m%d-%H%M%S}"


class LockstepEvaluator(Evaluator):
    """The run's evaluator. On a sharded model (`distributed.lockstep`) every generate call all-gathers each
    block, so the processes must make as many calls: one with fewer test batches than another makes padding
    calls (one prompt, answer discarded, inside `distributed.padding()`), and transformers' generate keeps
    stepping until every process has finished its batch (`synced_gpus`, which it turns on for the model
    `shard_frozen_base` marks). Otherwise it is the plain Evaluator."""

    @classmethod
    def like(cls, evaluator: Evaluator) -> LockstepEvaluator:
        twin = cls.__new__(cls)
        twin.__dict__.update(vars(evaluator))
        return twin

    def _generate_batches(self, model, prompts, batches, max_new_tokens) -> dict[int, str]:
        # asked before generating: asked after, it would meet the collectives of a process still generating
        missing = distributed.max_int(len(batches)) - len(batches) if distributed.lockstep(model) else 0
        outputs = super()._generate_batches(model, prompts, batches, max_new_tokens)
        for _ in range(missing):
            with distributed.padding():
                super()._generate_batches(model, prompts, [[0]], max_new_tokens)
        return outputs


@dataclass
class ContinualRun:
    """One continual-learning sequence: everything validated and loaded, ready to train."""

    config: RunConfig
    method: ContinualMethod
    tasks: list[Task]
    loaded: LoadedModel
    run_dir: Path
    zero_shot_cache: Path | None = None  # folder of base-model scores shared by runs (see zero_shot)
    lock: FolderLock | None = None  # the run directory's lock, held from preparation to the end
    init_adapter: InitAdapter | None = None  # lora.init_adapter, read and checked: the result of a task 0

    def __post_init__(self) -> None:
        # first: a bad guard set is refused before the adapters are even made
        self.versions = AdapterVersions.of(self.config, self.tasks, self.run_dir)
        self.evaluator = LockstepEvaluator.like(make_evaluator(self.config, self.loaded.tokenizer))
        self.outcomes: dict[int, TaskResult] = {}  # the last evaluation's, by 0-based task index
        self.encoder = self.evaluator.encoder
        set_seed(self.config.train.seed)  # the same initial adapters on every process
        self.model = self.method.prepare_model(self.loaded.model)
        if self.init_adapter is not None:  # whole adapters, before anything is written (refusals)
            adopt_init_adapter(self.init_adapter, self)
        if self.config.train.parallel == "fsdp":  # after prepare_model: its adapters stay whole
            distributed.shard_frozen_base(self.model, resolve_device(self.config.model.device))
        self.results = self._empty_results()
        self.config_digest = config_hash(result_relevant_config(self.config))
        self.tracking = Tracking([], self.run_dir, "", {})  # none until start_tracking

    def start_tracking(self) -> None:
        """Start the experiment trackers of `tracking.report_to` (main process), their global step after the
        optimizer steps of the tasks already finished (a resumed run continues its curves)."""
        names = self.config.tracking.report_to if distributed.is_main() else []
        if not names:
            return
        accum = self.config.train.grad_accum
        done = sum(-(-t["train_steps"] // accum) for t in self.results["per_task"])  # as train_task counts
        hparams = _flatten(self.config.model_dump(mode="json"))
        try:
            self.tracking = Tracking(names, self.run_dir, self.config.tracking.project, hparams, step=done)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; nothing was trained: once fixed (or with another --report-to), run again with "
                f"loracl run --resume --output {self.run_dir}"
            ) from exc

    @property
    def finished(self) -> int:
        """Training steps (tasks, or the one joint training) finished and recorded."""
        return len(self.results["per_task"])

    @property
    def tasks_before(self) -> int:
        """Tasks the method learnt before the run's first: 1 with an init adapter (its task 1, the run's task
        0), else 0. The run's task i is the method's task i + tasks_before (`ctx.index`), seeded as such: as
        in the run that trained task 0 first, so starting from its adapter changes no number (SLAO's λ(i),
        IncLoRA's adapter names and every per-task seed are those of the longer run)."""
        return 1 if self.init_adapter is not None else 0

    def resume(self) -> None:
        """Continue from the run directory's checkpoint (if any task had finished)."""
        device = next(self.model.parameters()).device
        checkpoint = read_checkpoint(self.run_dir, self.config_digest, device)
        if checkpoint is None:
            say("no finished task to resume from: starting from the first task")
            return
        restore_checkpoint(self.model, self.method, checkpoint)
        self.results = checkpoint.results
        self.results["config"] = self.config.model_dump(mode="json")  # harmless keys may have changed
        distributed.on_main(lambda: write_config(self.run_dir, self.config))
        self.results["resumed_after"] = [*self.results.get("resumed_after", []), checkpoint.finished]
        say(f"resuming after {checkpoint.finished} finished task(s)")

    @contextlib.contextmanager
    def write_errors(self, what: str, checkpointed: int) -> Iterator[None]:
        """A failed write (a full disk, a read-only folder) as one clear error saying what survives: the
        checkpoint after task `checkpointed`."""
        try:
            yield
        except Exception as exc:
            if not is_write_failure(exc):
                raise
            kept = f"the checkpoint after task {checkpointed} is intact" if checkpointed else "no checkpoint"
            raise CheckpointError(
                f"cannot write {what} in {self.run_dir} ({write_failure_reason(exc)}); {kept}; "
                f"resume with: loracl run --resume --output {self.run_dir}"
            ) from exc

    def release(self) -> None:
        """Close the trackers and drop the run directory's lock (the run is over, finished or not)."""
        self.tracking.finish()
        if self.lock is not None:
            self.lock.release()

    def checkpoint(self) -> None:
        save_checkpoint(
            self.run_dir, self.model, self.method, self.results, self.finished, self.config_digest
        )

    def _empty_results(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": self.method.name,
            "method_options": self.method.options.model_dump(mode="json"),
            "role": self.method.role,
            "data_free": self.method.data_free,
            "model": c.model.name,
            "benchmark": c.benchmark.name,
            "order": None if c.benchmark.tasks else c.benchmark.order or default_order(c.benchmark.name),
            # The examples every score is over: "test", or "validation" (carved from train; no test file
            # was opened, `per_task` counts them as eval_examples).
            "eval_split": c.eval.split,
            "tasks": [t.name for t in self.tasks],
            "task_metrics": [self.evaluator.metric_of(t) for t in self.tasks],  # what each column scores
            "matrix": [],
            "matrix_rows": self._matrix_rows(),
            "zero_shot": None,
            "metrics": {},
            "timings": {"train": [], "eval": [], "zero_shot_eval": 0.0},
            "adapter_bytes": [],
            "stored_adapters": [],
            "per_task": [],
            "device": str(next(self.model.parameters()).device),
            "base_dtype": str(self.loaded.model.dtype).removeprefix("torch."),  # what `export --merge` saves
            "distributed": {
                "processes": distributed.world_size(),
                "replica_max_abs_diff": 0.0,
                "parallel": c.train.parallel,
                "parameter_bytes": distributed.parameter_bytes(self.model),  # this process holds (main)
            },
            "loracl_version": __version__,
            "provenance": run_provenance(self.tasks, str(next(self.model.parameters()).device), c.eval.split),
            "config": c.model_dump(mode="json"),
            # what PEFT adapted: the configured names, or their per-architecture reading (T5: q, v)
            "lora_targets": target_modules(self.loaded.model, c.lora),
            "resumed_after": [],  # finished tasks at each --resume of this run
            # {folder, sha256 of its weights}: the adapter the run started from, its task 0 (not evaluated)
            "init_adapter": self.init_adapter.record() if self.init_adapter else None,
            "complete": False,
        }

    def _matrix_rows(self) -> str:
        """What the rows of the accuracy matrix mean for this kind of run (results.json `matrix_rows`)."""
        if self.method.joint_training:
            return "final_model"  # every row: the model after one joint training on all tasks
        if not self.method.trains:
            return "unchanged_model"  # every row: the same untrained model
        return "after_each_task"  # row i: after training task i

    def evaluate_all(
        self, description: str, wanted: Sequence[int] | None = None
    ) -> tuple[list[float | None], float]:
        """Scores on every task (or on the 0-based task indices `wanted`, None for the others) and the
        seconds it took."""
        start = time.perf_counter()
        chosen = list(range(len(self.tasks))) if wanted is None else sorted(wanted)
        found = self.evaluator.evaluate_tasks(
            self.model,
            [self.tasks[j] for j in chosen],
            description,
            around=lambda k: self.method.evaluating(self.model, chosen[k]),
        )
        self.outcomes = dict(zip(chosen, found, strict=True))
        scores: list[float | None] = [None] * len(self.tasks)
        for j, outcome in self.outcomes.items():
            scores[j] = outcome.score
        return scores, time.perf_counter() - start

    def write_predictions(self, folder: Path, earlier: Sequence[dict[str, Any]] = ()) -> None:
        """predictions.jsonl in a training step's folder: every test example (validation example, with
        eval.split=validation) of every task the evaluation after that step scored (task, id, prediction,
        references, score, metric), to see what was missed (`loracl show`); after the `earlier` records
        (those of tasks the step's folder already holds, when `loracl continue` adds columns)."""
        records = [*earlier, *self.prediction_records()]
        distributed.on_main(lambda: write_jsonl_atomic(records, folder / PREDICTIONS))

    def prediction_records(self) -> list[dict[str, Any]]:
        """The records of predictions.jsonl for the last evaluation's outcomes."""
        return [
            {"task": task.name, "id": k, "prediction": prediction, "references": list(example.answers),
             "score": value, "metric": self.evaluator.metric_of(task)}
            for j, outcome in sorted(self.outcomes.items())
            for task in [self.tasks[j]]
            for k, (example, prediction, value) in enumerate(
                zip(self.evaluator.examples(task), outcome.predictions, outcome.example_scores, strict=True)
            )
        ]  # fmt: skip

    def tasks_to_evaluate(self, index: int) -> list[int] | None:
        """After training task `index` (1-based): None (every task), or with `eval.matrix: metrics` the
        0-based indices of the entries the metrics read, a[i][i] for BWT and a[i][i+1] for FWT (METHODS.md);
        the last row is always complete (AP, BWT); with the forgetting guard on, every task learnt so far too
        (the drop it measures reads a[index][j] for every j < index)."""
        if self.config.eval.matrix == "full" or index == len(self.tasks):
            return None
        return [*range(index - 1 if self.versions.guarded else 0), index - 1, index]

    def zero_shot(self) -> None:
        """The base model's scores b_j (for FWT). With a `zero_shot_cache` folder (every cell of a `loracl
        bench` grid shares one), runs whose base model, tasks and evaluation settings agree evaluate the
        base model once: the scores depend on nothing else."""
        cache = None
        if self.zero_shot_cache is not None:
            cache = self.zero_shot_cache / f"{zero_shot_key(self.config, self.tasks)}.json"
        found = read_zero_shot(cache, self.tasks) if cache and distributed.is_main() else None
        cached = distributed.broadcast_object(found)  # the main process's reading, on every process
        if cached is not None:
            scores, seconds, source = cached, 0.0, f"from {cache}"
        else:
            with self.model.disable_adapter():
                scores, seconds = self.evaluate_all("zero-shot eval")
            source = f"{seconds:.0f} s"
            if cache and distributed.is_main():
                try:
                    write_zero_shot(cache, self.tasks, scores)
                except OSError as exc:  # only a saving for later runs: this one goes on
                    say(f"note: could not cache the zero-shot scores in {cache} ({exc.strerror or exc})")
        self.results["zero_shot"] = scores
        self.results["zero_shot_from_cache"] = cached is not None
        self.results["timings"]["zero_shot_eval"] = seconds
        self.tracking.log_zero_shot([t.name for t in self.tasks], scores)
        say(f"zero-shot: {' '.join(f'{s:.1f}' for s in scores)}  ({source})")

    def context(self, index: int, task: Task, folder: str) -> TaskContext:
        task_dir = self.run_dir / "tasks" / folder
        if distributed.is_main():
            task_dir.mkdir(parents=True, exist_ok=True)
        return TaskContext(
            index=index,
            task=task,
            task_dir=task_dir,
            encoded=[self.encoder.encode(ex) for ex in task.train],
            pad_id=self.loaded.tokenizer.pad_token_id,
            device=next(self.model.parameters()).device,
            batch_size=self.config.train.batch_size,
            seed=self.config.train.seed,
            lockstep=distributed.lockstep(self.model),
        )

    def train(self, ctx: TaskContext, description: str) -> TrainStats:
        """One training through the method's hooks: before_task, the shared loop, after_task."""
        set_seed(self.config.train.seed * 1000 + ctx.index)  # per task: a resumed run draws the same numbers
        self.method.before_task(self.model, ctx)
        stats = train_task(
            self.model,
            self.method,
            ctx.encoded,
            self.config.train,
            ctx.pad_id,
            seed=self.config.train.seed * 1000 + ctx.index,
            description=description,
        )
        self.method.after_task(self.model, ctx)
        self.check_replicas()
        distributed.on_main(lambda: write_jsonl_atomic(stats.log, ctx.task_dir / "train_log.jsonl"))
        return stats

    def check_replicas(self) -> None:
        """Processes apply the same summed gradients and the same method updates, so the adapters must be
        identical everywhere (SLAO's QR and merge, for instance, act on them with no further exchange);
        record the largest difference seen, and stop if the copies drifted apart."""
        adapters = [p for n, p in self.model.named_parameters() if p.requires_grad or "lora_" in n]
        diff = distributed.max_replica_difference(adapters)
        info = self.results["distributed"]
        info["replica_max_abs_diff"] = max(info["replica_max_abs_diff"], diff)
        if diff > 1e-3:
            raise RuntimeError(f"adapters differ across processes by {diff:.3g}: training diverged")

    def learn(self, index: int, task: Task) -> None:
        """Train task `index` (1-based) through the method's hooks, then evaluate on every task (or, with
        `eval.matrix: metrics`, on the tasks `tasks_to_evaluate` picks).

        A method that does not train (`trains = False`) is evaluated once, on every task; the model never
        changes, so that row stands for every later step."""
        T = len(self.tasks)
        ctx = self.context(index + self.tasks_before, task, f"{index}-{task.name}")
        stats = self.train(ctx, f"task {index}/{T} {task.name}") if self.method.trains else None
        evaluated_now = True
        if self.method.trains:
            scores, eval_seconds = self.evaluate_all(f"eval after {task.name}", self.tasks_to_evaluate(index))
            self.write_predictions(ctx.task_dir)
        elif not self.results["matrix"]:
            scores, eval_seconds = self.evaluate_all(f"eval after {task.name}")
            self.write_predictions(ctx.task_dir)
        else:
            scores, eval_seconds = list(self.results["matrix"][-1]), 0.0
            evaluated_now = False
        self.results["matrix"].append(scores)
        self.track(stats, scores if evaluated_now else None, learnt=index)
        evaluated = len(self.evaluator.examples(task))
        self.record(f"[{index}/{T}]", task.name, len(task.train), evaluated, stats, scores, eval_seconds)

    def learn_jointly(self) -> None:
        """`joint_training`: one training on the shuffled union of all tasks' training data, then one
        evaluation; every row of the matrix is the final model's scores (only the last row is meaningful)."""
        union = [ex for task in self.tasks for ex in task.train]
        random.Random(f"{self.config.train.seed}:joint").shuffle(union)
        names = "+".join(t.name for t in self.tasks)
        joint = Task("joint", union, [], [], None, "n/a", f"union of {names}")
        ctx = self.context(1, joint, "joint")
        stats = self.train(ctx, f"joint training on {len(self.tasks)} tasks")
        scores, eval_seconds = self.evaluate_all("eval after joint training")
        self.write_predictions(ctx.task_dir)
        self.results["matrix"] = [list(scores) for _ in self.tasks]
        self.track(stats, scores, learnt=len(self.tasks))
        evaluated = sum(len(self.evaluator.examples(t)) for t in self.tasks)
        self.record("[joint]", f"joint ({names})", len(union), evaluated, stats, scores, eval_seconds)

    def track(self, stats: TrainStats | None, scores: list[float | None] | None, learnt: int) -> None:
        """Send a finished training step to the trackers: its optimizer steps, then the scores after it
        (None: the row only repeats an untrained model's) and the running AP over the `learnt` first tasks.
        Sent with the step's record, just before its checkpoint, so a resumed run sends no step twice."""
        if stats is not None:
            self.tracking.log_training(stats.log)
        if scores is not None:
            self.tracking.log_evaluation([t.name for t in self.tasks], scores, learnt)

    def record(
        self,
        step: str,
        name: str,
        train_examples: int,
        eval_examples: int,
        stats: TrainStats | None,
        scores: list[float],
        eval_seconds: float,
    ) -> None:
        """Store one training step's timings, sizes and method details; print its line; save results.json."""
        r = self.results
        train_seconds = stats.seconds if stats else 0.0
        r["timings"]["train"].append(train_seconds)
        r["timings"]["eval"].append(eval_seconds)
        r["adapter_bytes"].append(self.method.adapter_bytes(self.model))
        r["stored_adapters"].append(self.method.stored_adapters(self.model))
        r["per_task"].append(
            {
                "task": name,
                "train_examples": train_examples,
                "test_examples": eval_examples if self.config.eval.split == "test" else 0,
                "eval_examples": eval_examples,  # of the split results.json's eval_split names
                "train_steps": stats.steps if stats else 0,
                "train_tokens": stats.tokens if stats else 0,
                "train_seconds": train_seconds,
                "train_tokens_per_s": stats.tokens_per_second if stats else 0.0,
                "eval_seconds": eval_seconds,
                "final_loss": stats.final_loss if stats else None,
                "truncated_prompts": stats.truncated if stats else 0,
                "adapter_bytes": r["adapter_bytes"][-1],
                "stored_adapters": r["stored_adapters"][-1],
                "method_state_bytes": self.method.state_bytes(),
                "method_info": self.method.task_info() if stats else {},
            }
        )
        if stats and stats.truncated:
            cut = f"{stats.truncated} prompts of {name} cut (middle of their longest line)"
            say(f"  note: {cut} to fit train.max_length")
        trained = (
            f"loss {stats.final_loss:.3f}, {stats.tokens_per_second:.0f} tok/s, train {stats.seconds:.0f} s"
            if stats
            else "no training"
        )
        say(
            f"{step} {name}: {trained}, eval {eval_seconds:.0f} s | "
            + " ".join(f"{t.name} {matrix_entry(s)}" for t, s in zip(self.tasks, scores, strict=True))
        )
        self.keep_version(self.finished, name, scores)
        distributed.on_main(self.save_progress)

    def keep_version(self, index: int, name: str, scores: list[float | None]) -> None:
        """Keep the adapter after training step `index` as versions/v<index> and let the forgetting guard
        decide whether adapter/ will serve it (loracl.outputs.versions). Before the step's checkpoint: a run
        killed in between redoes the step at --resume and writes the same version again."""
        learnt = len(self.tasks) if self.method.joint_training else index
        guard = self.versions.guard_scores(self.evaluator, self.model, self.method, learnt)  # every process
        kept = (self.method, self.model, index, name, scores, self.results, guard, self.config_digest)
        distributed.on_main(lambda: self.versions.keep(*kept))

    def save_progress(self) -> None:
        """results.json and the checkpoint after the step just recorded (main process)."""
        write_json_atomic(self.results, self.run_dir / "results.json")
        self.checkpoint()

    def run_steps(self) -> None:
        """Zero-shot evaluation and every training step not finished yet (all of them on a fresh run)."""
        if self.config.eval.zero_shot and self.results["zero_shot"] is None:
            self.zero_shot()
        if self.method.joint_training:
            if not self.finished:
                with self.write_errors("the files of the joint training", 0):
                    self.learn_jointly()
            return
        for index, task in enumerate(self.tasks, start=1):
            if index > self.finished:
                check_interrupt()
                with self.write_errors(f"the files of task {index}", index - 1):
                    self.learn(index, task)

    def run_all(self, start: float) -> dict[str, Any]:
        """Every step not finished yet, then export and reports; `start` is the perf_counter time the run
        began (for the wall time). SIGINT/SIGTERM stop between two steps, or at once while the final
        files are written (a resume writes them again), with the way to resume."""
        with stop_on_signals():
            try:
                self.run_steps()
                final = "writing the final adapter and report"
                with self.write_errors("the final adapter and report", self.finished), stop_at_once(final):
                    results = self.finish(time.perf_counter() - start)
            except RunInterrupted as exc:
                done = self.finished
                kept = f"checkpoint after task {done} kept" if done else "no task finished yet"
                resume_hint = f"resume with: loracl run --resume --output {self.run_dir}"
                raise RunInterrupted(f"{exc}; {kept}; {resume_hint}") from exc
            except NonFiniteTraining as exc:
                done = self.finished
                kept = f"the checkpoint after task {done} is kept" if done else "no task had finished"
                raise NonFiniteTraining(f"{exc}; {kept} in {self.run_dir}") from exc
        say("\n" + matrix_table(results) + "\n\n" + metrics_line(results["metrics"]))
        say(f"wall time {results['timings']['wall']:.0f} s; report: {self.run_dir / 'report.md'}")
        return results

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        r = self.results
        # adapter/ <- the promoted version; promoted_version and held_back on every process (the exit status)
        r.update(distributed.on_main(lambda: self.versions.install(self.method, self.model)))
        sequential = not self.method.joint_training
        r["metrics"] = all_metrics(r["matrix"], r["zero_shot"], sequential=sequential)
        r["metrics_other_conventions"] = other_conventions(r["matrix"], sequential=sequential)
        t = r["timings"]
        t["train_total"] = sum(t["train"])
        t["eval_total"] = sum(t["eval"]) + t["zero_shot_eval"]
        t["wall"] = wall_seconds
        r["complete"] = True
        self.tracking.log_metrics(r["metrics"])
        distributed.on_main(lambda: self.write_outputs(r))  # the others leave once the directory is complete
        return r

    def write_outputs(self, results: dict[str, Any]) -> None:
        card = version_card(model_card(results, self.loaded.path), self.run_dir)  # over PEFT's template
        (self.run_dir / "adapter" / "README.md").write_text(card, encoding="utf-8")
        plot_matrix(results, self.run_dir / "matrix.png")
        has_loss = plot_losses(results, self.run_dir, self.run_dir / LOSS_PLOT)  # from the train logs
        loss_plot = LOSS_PLOT if has_loss else None
        write_report(results, self.run_dir / "report.md", loss_plot, report_section(self.run_dir))
        write_json_atomic(results, self.run_dir / "results.json")  # last: "complete" means all is there


def zero_shot_key(config: RunConfig, tasks: list[Task]) -> str:
    """Digest of what the base model's scores depend on: the model, the tasks and their caps, the prompt
    length and the evaluation settings (never the method, LoRA or optimiser settings)."""
    split = config.eval.split
    # eval.split at its default, test, is left out: the keys of caches written before it existed hold
    left_out = {"matrix"} | ({"split"} if split == "test" else set())
    relevant = {
        "model": config.model.model_dump(mode="json", exclude={"cache_dir"}),
        "benchmark": config.benchmark.model_dump(mode="json"),
        "eval": config.eval.model_dump(mode="json", exclude=left_out),
        "max_length": config.train.max_length,
        "seed": config.train.seed,  # picks the capped examples
        "tasks": [(t.name, len(t.validation if split == "validation" else t.test)) for t in tasks],
    }
    return config_hash(json.dumps(relevant, sort_keys=True))


def run_provenance(tasks: list[Task], device: str, split: str) -> dict[str, Any]:
    """provenance() of the run; with eval.split=validation the data files hashed are those the run read: a
    task folder's files but its test split (`test.json` / `test.jsonl`), which is never opened."""
    if split == "test":
        return provenance(tasks, device)
    read = [
        dataclasses.replace(task, source=str(path))  # a file as a task's source: only that file is hashed
        for task in tasks
        for path in (
            sorted(p for p in Path(task.source).iterdir() if p.suffix in DATA_SUFFIXES and p.stem != "test")
            if Path(task.source).is_dir()
            else [Path(task.source)]
        )
    ]
    return {**provenance([], device), "data_files": data_files(read)}


def read_zero_shot(path: Path, tasks: list[Task]) -> list[float] | None:
    """Cached zero-shot scores for `tasks`, or None when absent, unreadable or for other tasks."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["tasks"] == [t.name for t in tasks] and len(data["scores"]) == len(tasks):
            return [float(s) for s in data["scores"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def write_zero_shot(path: Path, tasks: list[Task], scores: list[float]) -> None:
    """Store zero-shot scores (runs side by side may write the same entry: the write is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"tasks": [t.name for t in tasks], "scores": scores}, path)


def _resume_target(
    config: RunConfig | None, output_dir: str | Path | None, overwrite: bool
) -> tuple[Path, RunConfig]:
    """The run directory to resume and its config (checked against `config` when one is given)."""
    if overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    target = output_dir or (config.output_dir if config else None)
    if target is None:
        raise ConfigError("--resume needs the run directory: --output RUN_DIR")
    return Path(target), resumed_config(Path(target), config)


def run(
    config: RunConfig | None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    zero_shot_cache: Path | None = None,
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Run a whole continual-learning sequence and write the run directory; returns results.json's content.

    With `resume`, the run in `output_dir` continues after its last finished task (config None: that run's
    own config.yaml). `zero_shot_cache`: a folder where runs share the base model's scores. `loaded`: a
    base model already in memory (the Python API's `model=`), used instead of loading config.model. The run
    directory is locked (loracl.locking) from before the model loads to the end: a second command on it is
    refused."""
    start = time.perf_counter()
    if resume:
        run_dir, config = _resume_target(config, output_dir, overwrite)
        done = already_complete(run_dir)
        if done is not None:
            say(f"{run_dir}: the run is already complete; nothing to resume")
            return done
        output_dir = run_dir
    elif config is None:
        raise ConfigError("a config is needed to start a run")
    with stop_on_signals():
        try:
            cl = prepare_run(config, output_dir, overwrite, resume, loaded)
        except RunInterrupted as exc:
            unchanged = f"the run is unchanged; resume with: loracl run --resume --output {output_dir}"
            raise RunInterrupted(f"{exc}; {unchanged if resume else 'nothing was written'}") from exc
    try:
        cl.zero_shot_cache = zero_shot_cache
        if resume:
            cl.resume()
        cl.start_tracking()
        return cl.run_all(start)
    finally:
        cl.release()


def prepare_run(
    config: RunConfig,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    loaded: LoadedModel | None = None,
) -> ContinualRun:
    """Check and load everything of a run, lock its directory and create it (unless resuming it);
    `run_all` does the rest (the model stays in memory on the returned object; `release` drops the lock).

    Everything that can be checked (method options, data, output folder, model, LoRA targets, the adapter
    of lora.init_adapter: loracl.recipes.init_adapter) is checked before the run directory is emptied or
    written, so bad input never leaves a half-written run behind, nor destroys what was there."""
    distributed.init()
    check_installed(config.tracking.report_to)  # a missing tracker package: refused before any loading
    method = create_method(config.method.name, config.method_options(), config.lora)
    check_parallel(config, method)
    init_adapter = read_init_adapter(config, method)  # the method, folder, rank and alpha: before the model
    tasks = load_tasks(config)  # also names the benchmark detected from the data folder, for config.yaml
    run_dir = Path(output_dir or config.output_dir or default_run_dir(config))
    run_dir = distributed.broadcast_object(run_dir)  # the default name has the time: take the main's
    if not resume:
        distributed.on_main(lambda: check_output_dir(run_dir, overwrite))
    lock = FolderLock(run_dir, "run directory")
    distributed.on_main(lambda: _lock_run_dir(lock))
    try:
        with stop_at_once("loading the model"):
            if loaded is None:
                device, dtype = load_placement(config)
                loaded = load_model(
                    config.model.name,
                    dtype=dtype,
                    device=device,
                    cache_dir=config.model.cache_dir,
                    quantization=config.model.quantization,
                )
            check_lora_targets(loaded.model, config.lora)
            cl = ContinualRun(config, method, tasks, loaded, run_dir, lock=lock, init_adapter=init_adapter)
        if not resume:
            distributed.on_main(lambda: write_config(prepare_run_dir(run_dir, overwrite), config))
    except BaseException:
        lock.release(discard_created=True)
        raise
    say(
        f"run directory: {run_dir}\n"
        f"method {method.name} on {len(tasks)} tasks: {' -> '.join(t.name for t in tasks)}"
        f" | model {config.model.name} on {next(loaded.model.parameters()).device}"
        + (f", {distributed.world_size()} processes" if distributed.active() else "")
        + (", frozen base sharded (FSDP)" if distributed.lockstep(cl.model) else "")
        + (f"\nstarting from adapter {config.lora.init_adapter} (task 0)" if init_adapter else "")
    )
    return cl


def check_parallel(config: RunConfig, method: ContinualMethod) -> None:
    """Refuse, before the model loads, a `train.parallel: fsdp` run that cannot be sharded: a method that
    says why (`fsdp_obstacle`), or a quantised base."""
    if config.train.parallel != "fsdp":
        return
    if method.fsdp_obstacle:
        raise ConfigError(
            f"train.parallel: fsdp: method {method.name!r} cannot run on a sharded base "
            f"({method.fsdp_obstacle}); use train.parallel: data"
        )
    if config.model.quantization:
        raise ConfigError(
            "train.parallel: fsdp cannot shard a quantised base (FSDP shards floating-point weights): "
            "use model.quantization with train.parallel: data, or fsdp without quantisation"
        )


def load_placement(config: RunConfig) -> tuple[str, str]:
    """The device and dtype the base is loaded with: the configured ones; with `train.parallel: fsdp` over
    several processes on a GPU, host memory first (in the dtype the GPU would get), so that only each
    process's shard of the decoder blocks ever reaches its GPU (`distributed.shard_frozen_base`)."""
    m = config.model
    if config.train.parallel != "fsdp" or not distributed.active():
        return m.device, m.dtype
    target = resolve_device(m.device)
    if target.type == "cpu":
        return m.device, m.dtype
    return "cpu", str(resolve_dtype(m.dtype, target)).removeprefix("torch.")


def _lock_run_dir(lock: FolderLock) -> None:
    """Take the run directory's lock (main process), saying when a dead run's lock was taken over, and
    clear the temporaries such a run left behind."""
    try:
        lock.acquire()
    except OSError as exc:  # a read-only or unwritable place: nothing can be written there
        reason = write_failure_reason(exc)
        raise ConfigError(f"output: cannot create or lock {lock.folder} ({reason})") from exc
    if lock.took_over is not None:
        say(f"note: {lock.path} was left by process {lock.took_over}, which is gone; taken over")
    for folder in (lock.folder, lock.folder / CHECKPOINT_DIR):
        if folder.is_dir():
            remove_stale_temporaries(folder)
