"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, trackio) through Accelerate's tracker classes.

`accelerate.tracking` already wraps each service behind one interface (start, store_init_configuration,
log, finish); loracl builds those trackers itself rather than through an `Accelerator`, which would take
over device placement and the process group that loracl.engine.distributed manages. Only the main process
ever holds trackers (the others get an empty `Tracking`), and everything goes under `<run>/tracking/`.

What is logged, with one global step (the optimizer step, counted across tasks):
  train/loss, train/lr, train/grad_norm, train/tokens_per_s   per optimizer step, from TrainStats.log
  eval/<task> for every task evaluated, eval/AP               after each task (AP: mean over tasks learnt)
  zero_shot/<task> at step 0, final/AP|BWT|FWT|forgetting     at the end
and the flattened config as hyper-parameters.

A task's training steps are logged when its training is over (from its log), not while it runs: the tracker
then only ever holds finished tasks, so a run resumed after a crash logs no step twice.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loracl.errors import ConfigError

# The trackers of loracl.config.TRACKERS: the modules each imports (any one will do: accelerate's
# TensorBoard tracker falls back to tensorboardX) and the pip package that provides the first.
MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
FOLDER = "tracking"  # in the run directory


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it: some trackers take seconds to import)."""
    return importlib.util.find_spec(module) is not None


def check_installed(names: Sequence[str]) -> None:
    """Refuse, before anything is loaded, a tracker whose package is missing: one line naming the fix."""
    for name in names:
        if not any(installed(module) for module in MODULES[name]):
            package = MODULES[name][0]
            raise ConfigError(
                f"tracker {name} (--report-to / tracking.report_to) needs the {package} package, which is "
                f"not installed: pip install {package} (every tracker: pip install 'loracl[tracking]')"
            )


def _metric_name(name: str) -> str:
    """A task name as a metric key every tracker accepts (MLflow allows letters, digits and _-./ only)."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name)


def hparam_values(flat_config: dict[str, Any]) -> dict[str, Any]:
    """Flattened config values as hyper-parameters: trackers take scalars only, so lists and mappings
    (target modules, task lists) become their JSON-like text; None is kept (TensorBoard skips it)."""
    return {
        key: value if value is None or isinstance(value, bool | int | float | str) else str(value)
        for key, value in flat_config.items()
    }


def optimizer_steps(log: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """One record per optimizer step from TrainStats.log (one per micro step; lr and grad_norm are set
    only where the optimizer stepped): the loss is the mean over the step's micro-batches, which is what
    the accumulated gradient descends."""
    steps: list[dict[str, float]] = []
    losses: list[float] = []
    for record in log:
        losses.append(float(record["loss"]))
        if record.get("lr") is None:
            continue
        steps.append(
            {
                "train/loss": sum(losses) / len(losses),
                "train/lr": float(record["lr"]),
                "train/grad_norm": float(record["grad_norm"]),
                "train/tokens_per_s": float(record["tokens_per_s"]),
            }
        )
        losses = []
    return steps


def _tracker(name: str, folder: Path, project: str, run_name: str) -> Any:
    """Accelerate's tracker of that name, writing under `folder` where the service allows it."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    folder.mkdir(parents=True, exist_ok=True)
    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        return cls("tensorboard", folder)  # events in <run>/tracking/tensorboard/
    if name == "wandb":
        return cls(project, name=run_name, dir=str(folder))  # the local copy in <run>/tracking/wandb/
    if name == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a tracking server the user set is theirs to keep
            import mlflow

            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        return cls(experiment_name=project, logging_dir=str(folder / "mlruns"), run_name=run_name)
    # trackio reads its storage folder from the environment when imported (accelerate imports it in start)
    os.environ.setdefault("TRACKIO_DIR", str((folder / "trackio").resolve()))
    return cls(project, name=run_name)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Tracking:
    """The run's trackers and the global step; with no tracker every method does nothing.

    `step` is the number of optimizer steps already taken (those of the tasks finished before a resume).
    A tracker that fails to start is an error (asked for, it should not silently log nothing); one that
    fails later is dropped with a note, and the run goes on: its results are in the run directory anyway.
    """

    def __init__(
        self,
        names: Sequence[str],
        run_dir: Path,
        project: str,
        hparams: dict[str, Any],
        step: int = 0,
    ) -> None:
        self.step = step
        self.trackers: list[Any] = []
        for name in names:
            try:
                tracker = _tracker(name, run_dir / FOLDER, project, run_dir.name)
                tracker.start()
                tracker.store_init_configuration(hparam_values(hparams))
            except Exception as exc:
                self.finish()  # those already started
                raise ConfigError(f"tracker {name} did not start: {_one_line(exc)}") from exc
            self.trackers.append(tracker)

    def log(self, values: dict[str, float | None], step: int | None = None) -> None:
        """Log the finite values at `step` (default: the current global step)."""
        values = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        if not values:
            return
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step=self.step if step is None else step)
            except Exception as exc:
                self.trackers.remove(tracker)
                print(f"note: tracker {tracker.name} stopped logging: {_one_line(exc)}", file=sys.stderr)

    def log_training(self, log: Sequence[dict[str, Any]]) -> None:
        """A task's training log (TrainStats.log), an entry per optimizer step, continuing the global step."""
        for values in optimizer_steps(log):
            self.step += 1
            self.log(dict(values))

    def log_evaluation(self, tasks: Sequence[str], scores: Sequence[float | None], learnt: int) -> None:
        """The scores after a training step (None: not evaluated) and the running AP, the mean over the
        `learnt` first tasks, when all of those were evaluated."""
        values: dict[str, float | None] = {
            f"eval/{_metric_name(task)}": score for task, score in zip(tasks, scores, strict=True)
        }
        seen = scores[:learnt]
        if seen and all(s is not None for s in seen):
            values["eval/AP"] = sum(s for s in seen if s is not None) / len(seen)
        self.log(values)

    def log_zero_shot(self, tasks: Sequence[str], scores: Sequence[float]) -> None:
        self.log({f"zero_shot/{_metric_name(t)}": s for t, s in zip(tasks, scores, strict=True)}, step=0)

    def log_metrics(self, metrics: dict[str, float | None]) -> None:
        """The run's final metrics (AP, BWT, FWT, forgetting), at the last step."""
        self.log({f"final/{key}": value for key, value in metrics.items()})

    def finish(self) -> None:
        """Close every tracker (flushes TensorBoard's files, ends the wandb / MLflow / trackio run)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as exc:
                print(f"note: tracker {tracker.name} did not close: {_one_line(exc)}", file=sys.stderr)
