"""The recipe: wire config, data, model, method, training loop and evaluation into one continual run.

Run directory (other tools rely on it): config.yaml, results.json, report.md, matrix.png, adapter/ (final
adapter, stock PEFT format) and tasks/<i>-<task>/ for per-task artefacts written by the method.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import set_seed

from . import __version__
from .config import RunConfig, dump_config
from .context import TaskContext
from .data import Task, load_benchmark
from .errors import ConfigError
from .evaluation import Evaluator
from .methods import ContinualMethod, create_method
from .metrics import all_metrics
from .models import LoadedModel, load_model
from .report import matrix_table, metrics_line, plot_matrix, write_report
from .text import PromptEncoder
from .training import train_task


def write_json_atomic(data: Any, path: Path) -> None:
    """Write to a temporary name, flush to disk, then rename: readers never see a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"output: {path} is not empty; choose another --output or pass --overwrite")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.method.name}-{datetime.now():%Y%m%d-%H%M%S}"


def load_tasks(config: RunConfig) -> list[Task]:
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


@dataclass
class ContinualRun:
    """One continual-learning sequence: everything validated and loaded, ready to train."""

    config: RunConfig
    method: ContinualMethod
    tasks: list[Task]
    loaded: LoadedModel
    run_dir: Path

    def __post_init__(self) -> None:
        tokenizer = self.loaded.tokenizer
        self.encoder = PromptEncoder(tokenizer, self.config.train.max_length, self.config.model.chat_template)
        self.evaluator = Evaluator(
            tokenizer, self.encoder, self.config.eval.batch_size, self.config.eval.max_new_tokens
        )
        set_seed(self.config.train.seed)
        self.model = self.method.prepare_model(self.loaded.model)
        self.results = self._empty_results()

    def _empty_results(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": self.method.name,
            "data_free": self.method.data_free,
            "model": c.model.name,
            "benchmark": c.benchmark.name,
            "order": None if c.benchmark.tasks else c.benchmark.order,
            "tasks": [t.name for t in self.tasks],
            "matrix": [],
            "zero_shot": None,
            "metrics": {},
            "timings": {"train": [], "eval": [], "zero_shot_eval": 0.0},
            "adapter_bytes": [],
            "stored_adapters": [],
            "per_task": [],
            "device": str(next(self.model.parameters()).device),
            "loracl_version": __version__,
            "config": c.model_dump(mode="json"),
            "complete": False,
        }

    def evaluate_all(self, description: str) -> tuple[list[float], float]:
        start = time.perf_counter()
        scores = self.evaluator.evaluate_all(self.model, self.tasks, description)
        return scores, time.perf_counter() - start

    def zero_shot(self) -> None:
        with self.model.disable_adapter():
            scores, seconds = self.evaluate_all("zero-shot eval")
        self.results["zero_shot"] = scores
        self.results["timings"]["zero_shot_eval"] = seconds
        print(f"zero-shot: {' '.join(f'{s:.1f}' for s in scores)}  ({seconds:.0f} s)")

    def learn(self, index: int, task: Task) -> None:
        """Train task `index` (1-based) through the method's hooks, then evaluate on every task."""
        T = len(self.tasks)
        task_dir = self.run_dir / "tasks" / f"{index}-{task.name}"
        task_dir.mkdir(parents=True, exist_ok=True)
        ctx = TaskContext(
            index=index,
            task=task,
            task_dir=task_dir,
            encoded=[self.encoder.encode(ex) for ex in task.train],
            pad_id=self.loaded.tokenizer.pad_token_id,
            device=next(self.model.parameters()).device,
            batch_size=self.config.train.batch_size,
            seed=self.config.train.seed,
        )
        self.method.before_task(self.model, ctx)
        stats = train_task(
            self.model,
            self.method,
            ctx.encoded,
            self.config.train,
            ctx.pad_id,
            seed=self.config.train.seed * 1000 + index,
            description=f"task {index}/{T} {task.name}",
        )
        self.method.after_task(self.model, ctx)
        scores, eval_seconds = self.evaluate_all(f"eval after {task.name}")
        r = self.results
        r["matrix"].append(scores)
        r["timings"]["train"].append(stats.seconds)
        r["timings"]["eval"].append(eval_seconds)
        r["adapter_bytes"].append(self.method.adapter_bytes(self.model))
        r["stored_adapters"].append(self.method.stored_adapters(self.model))
        r["per_task"].append(
            {
                "task": task.name,
                "train_examples": len(task.train),
                "test_examples": len(task.test),
                "train_steps": stats.steps,
                "train_tokens": stats.tokens,
                "train_seconds": stats.seconds,
                "train_tokens_per_s": stats.tokens_per_second,
                "eval_seconds": eval_seconds,
                "final_loss": stats.final_loss,
                "truncated_prompts": stats.truncated,
                "adapter_bytes": r["adapter_bytes"][-1],
                "stored_adapters": r["stored_adapters"][-1],
                "method_state_bytes": self.method.state_bytes(),
            }
        )
        if stats.truncated:
            print(
                f"  note: {stats.truncated} prompts of {task.name} cut on the left to fit train.max_length"
            )
        print(
            f"[{index}/{T}] {task.name}: loss {stats.final_loss:.3f}, {stats.tokens_per_second:.0f} tok/s, "
            f"train {stats.seconds:.0f} s, eval {eval_seconds:.0f} s | "
            + " ".join(f"{t.name} {s:.1f}" for t, s in zip(self.tasks, scores, strict=True))
        )
        write_json_atomic(self.results, self.run_dir / "results.json")

    def finish(self, wall_seconds: float) -> dict[str, Any]:
        r = self.results
        self.method.export(self.model, self.run_dir / "adapter")
        r["metrics"] = all_metrics(r["matrix"], r["zero_shot"])
        t = r["timings"]
        t["train_total"] = sum(t["train"])
        t["eval_total"] = sum(t["eval"]) + t["zero_shot_eval"]
        t["wall"] = wall_seconds
        r["complete"] = True
        write_json_atomic(r, self.run_dir / "results.json")
        write_report(r, self.run_dir / "report.md")
        plot_matrix(r, self.run_dir / "matrix.png")
        return r


def run(config: RunConfig, output_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run a whole continual-learning sequence and write the run directory; returns results.json's content.

    Everything that can be checked (method options, data, model) is checked before the run directory is
    created, so bad input never leaves a half-written run behind."""
    start = time.perf_counter()
    method = create_method(config.method.name, config.method_options(), config.lora)
    tasks = load_tasks(config)
    loaded = load_model(
        config.model.name,
        dtype=config.model.dtype,
        device=config.model.device,
        cache_dir=config.model.cache_dir,
    )
    run_dir = prepare_run_dir(Path(output_dir or config.output_dir or default_run_dir(config)), overwrite)
    (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    print(
        f"run directory: {run_dir}\n"
        f"method {method.name} on {len(tasks)} tasks: {' -> '.join(t.name for t in tasks)}"
        f" | model {config.model.name} on {next(loaded.model.parameters()).device}"
    )
    cl = ContinualRun(config, method, tasks, loaded, run_dir)
    if config.eval.zero_shot:
        cl.zero_shot()
    for index, task in enumerate(tasks, start=1):
        cl.learn(index, task)
    results = cl.finish(time.perf_counter() - start)
    print("\n" + matrix_table(results) + "\n\n" + metrics_line(results["metrics"]))
    print(f"wall time {results['timings']['wall']:.0f} s; report: {run_dir / 'report.md'}")
    return results
