"""Pieces shared by the cost benchmarks: command-line options, timing, data, the final block of figures.

Every script ends by printing `== figures ==` and then one `name: value` line per figure (see
`print_figures`), so that the output can be read by people and by `parse_figures` alike.
"""

from __future__ import annotations

import argparse
import atexit
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import set_seed

from loracl.config import LoraSection, TrainSection
from loracl.data import EXACT_MATCH, Example, Task, load_benchmark
from loracl.data.text import Encoded, PromptEncoder
from loracl.engine.training import train_task
from loracl.errors import LoraclError
from loracl.methods import ContinualMethod
from loracl.methods.context import TaskContext
from loracl.models.base_model import SMOLLM2, LoadedModel, load_model

FIGURES_HEADER = "== figures =="
DEFAULT_ORDER = "order1"  # the real tasks whose prompts the timing benchmarks train on


# --- command line -----------------------------------------------------------------------------------------


def base_parser(description: str, default_model: str = SMOLLM2) -> argparse.ArgumentParser:
    """The options every cost benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute on 2 CPU cores")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default=default_model, help="e.g. smollm2-135m, tiny-random-llama")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="base model dtype (default auto: bfloat16 on CUDA, float32 on CPU; the demo config: bfloat16)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data-dir", default=None, help="benchmark data folder (default: ../shared/data)")
    return parser


def with_defaults(given: Sequence[int | None], defaults: Sequence[int]) -> list[int]:
    """Sizes given on the command line, the mode's defaults for those left out."""
    return [default if value is None else value for value, default in zip(given, defaults, strict=True)]


def run_main(main: Callable[[list[str] | None], dict[str, float]]) -> None:
    """Entry point of a script: user errors are one line on stderr and exit status 2."""
    try:
        main(None)
    except LoraclError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# --- numbers ----------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        raise ValueError(f"ratio with a non-positive denominator ({denominator})")
    return numerator / denominator


def format_value(value: float) -> str:
    """Integers as integers (bytes, counts), other numbers with 4 significant digits."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return str(int(value))
    return f"{value:.4g}"


def print_figures(figures: dict[str, float]) -> None:
    print(FIGURES_HEADER)
    for name, value in figures.items():
        print(f"{name}: {format_value(value)}")


def parse_figures(text: str) -> dict[str, float]:
    """The `name: value` lines after the figures header of a script's output."""
    _, found, block = text.rpartition(FIGURES_HEADER)
    if not found:
        raise ValueError("no figures block in the output")
    figures = {}
    for line in block.strip().splitlines():
        name, _, value = line.partition(": ")
        figures[name] = float(value)
    return figures


# --- timing -----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for the files the real code writes (adapters, Trainer output), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix=f"loracl-{prefix}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# --- model and data ---------------------------------------------------------------------------------------


def load(args: argparse.Namespace) -> LoadedModel:
    """The base model at the script's --model, --device and --dtype (auto: bf16 on CUDA, fp32 on CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    return load_model(args.model, dtype=args.dtype, device=args.device)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def real_tasks(args: argparse.Namespace, per_task: int) -> list[Task]:
    """The tasks of the Standard CL order 1 with `per_task` train and test examples (real prompt lengths)."""
    return load_benchmark(
        "cl_benchmark", data_dir=args.data_dir, order=DEFAULT_ORDER, max_train=per_task, max_test=per_task,
        seed=args.seed,
    )


def real_examples(args: argparse.Namespace, per_task: int) -> list[Example]:
    """`per_task` training examples of each task of the Standard CL order 1, task after task."""
    return [ex for task in real_tasks(args, per_task) for ex in task.train]


def encode_all(loaded: LoadedModel, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    encoder = PromptEncoder(loaded.tokenizer, max_length)
    return [encoder.encode(ex) for ex in examples]


def synthetic_tasks(count: int, train_size: int, test_size: int, seed: int) -> list[Task]:
    """Tiny classification tasks built in memory: random word prompts of varied length, two labels each."""
    rng = random.Random(seed)
    words = ["red", "blue", "green", "stone", "river", "cloud", "tree", "light", "sound", "glass"]
    tasks = []

    def example(index: int, labels: list[str]) -> Example:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))
        return Example(f"Task {index}. Classify: {text}\nAnswer:", (rng.choice(labels),))

    for index in range(1, count + 1):
        labels = [f"label{index}a", f"label{index}b"]
        train = [example(index, labels) for _ in range(train_size)]
        test = [example(index, labels) for _ in range(test_size)]
        tasks.append(Task(f"synthetic{index}", train, test, [], labels, EXACT_MATCH, "synthetic"))
    return tasks


def task_context(
    index: int, encoded: list[Encoded], loaded: LoadedModel, cfg: TrainSection, task_dir: Path, seed: int
) -> TaskContext:
    """A TaskContext over already encoded examples (the Task itself only names them)."""
    task = Task(f"bench{index}", [], [], [], None, EXACT_MATCH, "benchmark")
    return TaskContext(
        index=index,
        task=task,
        task_dir=task_dir,
        encoded=encoded,
        pad_id=loaded.tokenizer.pad_token_id,
        device=model_device(loaded.model),
        batch_size=cfg.batch_size,
        seed=seed,
    )


def slao_step_seconds(
    method: ContinualMethod,
    model: torch.nn.Module,
    loaded: LoadedModel,
    encoded: list[Encoded],
    cfg: TrainSection,
    seed: int,
) -> Callable[[], float]:
    """Prepare a method the way a run does at task 2 (task 1 trained once, which also warms up), and return
    a function that runs the real training loop over `encoded` again and gives its seconds per step."""
    workdir = scratch_dir("step")
    first = task_context(1, encoded, loaded, cfg, workdir / "1", seed)
    method.before_task(model, first)
    train_task(model, method, encoded, cfg, first.pad_id, seed)
    method.after_task(model, first)
    method.before_task(model, task_context(2, encoded, loaded, cfg, workdir / "2", seed))

    def one_pass() -> float:
        # train_task's clock needs no extra synchronisation: each step ends with loss.item().
        stats = train_task(model, method, encoded, cfg, first.pad_id, seed)
        return stats.seconds / stats.steps

    return one_pass


def lora_section(rank: int) -> LoraSection:
    """The LoRA of every benchmark: the project's defaults (q_proj, v_proj, alpha = 2r) at `rank`."""
    return LoraSection(r=rank, alpha=2.0 * rank)
