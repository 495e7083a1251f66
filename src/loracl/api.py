"""The Python API: `loracl.run`, the run `loracl run` makes, called from Python (a notebook, a script).

    import loracl

    results = loracl.run(
        "configs/tiny.yaml",                       # or a dict of the same sections, or a RunConfig
        overrides=["method.name=ewc", "method.lam=100"],
        tasks={                                    # optional: the tasks themselves instead of a benchmark
            "sentiment": {
                "train": [("Review: a joy. Sentiment:", "positive"), ...],
                "test": [("Review: dull. Sentiment:", "negative"), ...],
                "labels": ["positive", "negative"],  # optional: a closed label set (exact match)
            },
            "topic": {"train": [...], "test": [...]},  # no labels: generation, scored by ROUGE-L
        },
        output_dir="runs/notebook",
    )
    results["metrics"]["AP"]

More tasks for a finished run: `loracl.continue_run("runs/notebook", ["yelp"])` (as `loracl continue`).

It returns results.json's content and writes the same run directory as the command line (so `loracl run
--resume`, `export`, `eval`, `report` work on it). It reads no command line and never exits: bad input raises
loracl's own exceptions (loracl.errors: ConfigError, DataError, ModelError, CheckpointError, ...; each one
line, `exit_code` what the CLI would return), a stop by Ctrl-C raises RunInterrupted.

In-memory tasks are written once, as a `jsonl` benchmark folder named by a digest of their content
(`data_dir`, default `_tasks/` beside the run directory), and the config's benchmark section points at it:
the run directory records where its data is, a resumed run (here or with `loracl run --resume`) reads the
same files, and the same tasks given again reuse the folder. Examples are (prompt, answer) pairs, (prompt,
[answers...]) for several references, {"prompt", "answer"} mappings or loracl.data.Example objects; a list
of loracl.data.Task objects is accepted too. The config's benchmark caps (max_train, max_test) and
validation_fraction apply as to any benchmark.

`model`: an already loaded base model, as a loracl LoadedModel, a (model, tokenizer) pair, or a
transformers model with `tokenizer=`. It is used as it is (device and dtype included; the config's
model.name becomes its `name_or_path`, for the run directory's records) and the method attaches its
adapters to it in place: give a fresh base model to each run.

Methods of other packages: see loracl.methods (entry points of the group `loracl.methods`, `register`,
`register_state_class`), re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracl.config import RunConfig, apply_override, build_config, load_config
from loracl.data import EXACT_MATCH, ROUGE_L, Example, Task
from loracl.errors import ConfigError, LoraclError
from loracl.methods import register, register_state_class, unregister

if TYPE_CHECKING:
    from loracl.models.base_model import LoadedModel

__all__ = ["LoraclError", "continue_run", "register", "register_state_class", "run", "unregister"]

TASKS_DIR = "_tasks"  # beside the run directory: the folders of in-memory tasks, by digest


def run(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    tasks: Mapping[str, Mapping[str, Any]] | Sequence[Task] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    output_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    overrides: Sequence[str] = (),
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run a continual-learning sequence and write its run directory; returns results.json's content.

    `config`: a RunConfig, a dict of config sections, a YAML file's path, or None (the defaults; with
    `resume`, the run's own config.yaml). `overrides`: "dotted.key=value" strings, as `--set`. `tasks`,
    `model`, `tokenizer`, `data_dir`: see the module's documentation. `output_dir`, `overwrite`, `resume`:
    as `loracl run --output/--overwrite/--resume`."""
    from loracl.recipes import run as runner  # torch and all: only once a run is asked for

    if resume and config is None and (tasks is not None or model is not None or overrides):
        config = _saved_config(output_dir)  # what the in-memory parts are applied to
    built = None if config is None and resume else _config(config, overrides)
    if built is not None and not resume and output_dir is None and built.output_dir is None:
        output_dir = runner.default_run_dir(built)  # fixed now: the tasks' folder is beside it
    loaded = _loaded_model(model, tokenizer) if model is not None or tokenizer is not None else None
    if built is not None:
        if loaded is not None and loaded.name:
            built.model.name = loaded.name
        if tasks is not None:
            run_dir = Path(output_dir or built.output_dir or ".")
            root = Path(data_dir) if data_dir is not None else run_dir.absolute().parent / TASKS_DIR
            _use_tasks(built, tasks, root.absolute())
    return runner.run(built, output_dir, overwrite=overwrite, resume=resume, loaded=loaded)


def continue_run(
    run_dir: str | os.PathLike[str],
    tasks: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Append the tasks named `tasks` (in the run's benchmark and data folder; `data_dir` if it moved) to the
    run in `run_dir` and learn them, as `loracl continue`; returns results.json's content. The run ends as
    one run over the whole sequence would (loracl.recipes.extend). `overrides`: as `loracl continue --set`."""
    from loracl.recipes.extend import continue_run as extend_run

    if isinstance(tasks, str):
        raise ConfigError("continue_run: tasks must be a list of task names, not one string")
    moved = [f"benchmark.data_dir={Path(data_dir).absolute()}"] if data_dir is not None else []
    return extend_run(run_dir, list(tasks), [*overrides, *moved])


# --- the config ---------------------------------------------------------------------------------------------


def _config(config: Any, overrides: Sequence[str]) -> RunConfig:
    """A fresh RunConfig from any accepted form, with the overrides (the caller's object stays as it is)."""
    if isinstance(overrides, str):
        raise ConfigError("overrides: a list of 'dotted.key=value' strings, not one string")
    overrides = list(overrides)
    if config is None or isinstance(config, str | os.PathLike):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        data = config.model_dump(mode="json", exclude_unset=True)  # set stays set (see resolve_benchmark)
    elif isinstance(config, Mapping):
        data = json.loads(json.dumps(config, default=_not_json))  # a deep copy, with plain types only
    else:
        raise ConfigError(
            "config: a RunConfig, a dict of config sections or a YAML file's path, not "
            f"{type(config).__name__}"
        )
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConfigError("config: the top level must map section names (model, method, ...) to sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return build_config(data, "config")


def _not_json(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise ConfigError(f"config: {type(value).__name__} is not a config value ({value!r:.80})")


def _saved_config(output_dir: Any) -> RunConfig | None:
    if output_dir is None:
        raise ConfigError("resume needs the run directory: output_dir")
    saved = Path(output_dir) / "config.yaml"
    return load_config(saved) if saved.is_file() else None  # none: the runner says the folder holds no run


# --- in-memory tasks ----------------------------------------------------------------------------------------


def _use_tasks(config: RunConfig, tasks: Any, root: Path) -> None:
    """Write `tasks` as a jsonl benchmark folder under `root` (named by their digest; kept when it exists)
    and point the config's benchmark section at it."""
    content = _task_files(tasks, config)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    folder = root / digest
    if not folder.is_dir():
        _write_folder(folder, content)
    b = config.benchmark
    b.name, b.data_dir, b.order, b.tasks = "jsonl", str(folder), None, [name for name, _ in content]


def _task_files(tasks: Any, config: RunConfig) -> list[tuple[str, dict[str, Any]]]:
    """Each task's name and its files' content: {"train": [records], "test": [records], "labels": [...]}."""
    if isinstance(tasks, Mapping):
        items = [(name, _from_mapping(name, spec)) for name, spec in tasks.items()]
    elif isinstance(tasks, Sequence) and not isinstance(tasks, str | bytes) and all(
        isinstance(t, Task) for t in tasks
    ):
        items = [(task.name, _from_task(task, config)) for task in tasks]
    else:
        raise ConfigError(
            "tasks: a dict {name: {'train': [(prompt, answer), ...], 'test': [...]}} or a list of "
            f"loracl.data.Task, not {type(tasks).__name__}"
        )
    if not items:
        raise ConfigError("tasks: give at least one task")
    names = [name for name, _ in items]
    for name in names:
        if not isinstance(name, str) or not name.strip() or name != name.strip() or name.startswith("."):
            raise ConfigError(f"tasks: {name!r} is not a task name (a non-empty word, used as a folder name)")
        if any(sep in name for sep in ("/", "\\", "\0", "+", ",")):
            raise ConfigError(f"tasks: task name {name!r} holds '/', '\\\\', '+' or ','")
    if len(set(names)) != len(names):
        raise ConfigError("tasks: two tasks have the same name")
    return items


def _from_mapping(name: Any, spec: Any) -> dict[str, Any]:
    where = f"tasks[{name!r}]"
    if not isinstance(spec, Mapping):
        wanted = "a dict with 'train', 'test' (and optionally 'labels')"
        raise ConfigError(f"{where}: {wanted}, not {type(spec).__name__}")
    unknown = sorted(str(key) for key in spec if key not in ("train", "test", "labels"))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: train, test, labels")
    files: dict[str, Any] = {}
    for split in ("train", "test"):
        if split in spec:
            files[split] = _records(spec[split], f"{where}[{split!r}]")
    if "train" not in files:
        raise ConfigError(f"{where}: no 'train' examples")
    labels = spec.get("labels")
    if labels is not None:
        if not isinstance(labels, Sequence) or isinstance(labels, str) or not all(
            isinstance(label, str) for label in labels
        ):
            raise ConfigError(f"{where}['labels']: a list of label strings")
        files["labels"] = list(labels)
    return files


def _from_task(task: Task, config: RunConfig) -> dict[str, Any]:
    where = f"tasks: task {task.name!r}"
    if task.validation:
        raise ConfigError(
            f"{where} has validation examples: give them inside train and set benchmark.validation_fraction "
            "(the validation split is carved from train)"
        )
    kept = EXACT_MATCH if task.labels is not None else ROUGE_L  # what a jsonl folder implies
    if task.metric != kept and config.eval.metric != task.metric:
        raise ConfigError(
            f"{where} is scored by {task.metric}; a task without labels is scored by ROUGE-L and one with "
            f"labels by exact match: set eval.metric={task.metric} (it then applies to every task)"
        )
    files: dict[str, Any] = {"train": _records(task.train, f"{where}: train")}
    if task.test:
        files["test"] = _records(task.test, f"{where}: test")
    if task.labels is not None:
        files["labels"] = list(task.labels)
    return files


def _records(examples: Any, where: str) -> list[dict[str, Any]]:
    """{"prompt", "answer"} records of a jsonl file from any accepted form of examples."""
    if isinstance(examples, str | bytes | Mapping) or not isinstance(examples, Sequence):
        raise ConfigError(f"{where}: a list of examples, not {type(examples).__name__}")
    records = []
    for i, example in enumerate(examples):
        if isinstance(example, Example):
            prompt, answer = example.prompt, list(example.answers)
        elif isinstance(example, Mapping) and set(example) == {"prompt", "answer"}:
            prompt, answer = example["prompt"], example["answer"]
        elif isinstance(example, Sequence) and not isinstance(example, str | bytes) and len(example) == 2:
            prompt, answer = example
        else:
            raise ConfigError(
                f"{where}[{i}]: an example is (prompt, answer), (prompt, [answers]), {{'prompt': ..., "
                f"'answer': ...}} or a loracl.data.Example, not {example!r:.80}"
            )
        if isinstance(answer, Sequence) and not isinstance(answer, str):
            answer = list(answer)
            if len(answer) == 1:
                answer = answer[0]
        if not isinstance(prompt, str) or not (
            isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))
        ):
            raise ConfigError(f"{where}[{i}]: the prompt and the answer(s) must be strings")
        records.append({"prompt": prompt, "answer": answer})
    return records


def _write_folder(folder: Path, content: list[tuple[str, dict[str, Any]]]) -> None:
    """The jsonl benchmark folder, written beside its final name and renamed into place (a concurrent
    writer of the same tasks wins the rename or finds the folder complete)."""
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        for name, files in content:
            task_dir = partial / name
            task_dir.mkdir(parents=True)
            for split in ("train", "test"):
                if split in files:
                    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in files[split])
                    (task_dir / f"{split}.jsonl").write_text(lines, encoding="utf-8")
            if "labels" in files:
                (task_dir / "labels.json").write_text(json.dumps(files["labels"]), encoding="utf-8")
        try:
            os.replace(partial, folder)
        except OSError:
            if not folder.is_dir():
                raise
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"tasks: cannot write them to {folder} ({reason}); choose data_dir") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# --- a model given ------------------------------------------------------------------------------------------


def _loaded_model(model: Any, tokenizer: Any) -> LoadedModel:
    """`model` (and `tokenizer`) as the runner's LoadedModel, pad token set as load_model sets it."""
    from transformers import PreTrainedModel

    from loracl.models.base_model import LoadedModel, mark_seq2seq

    if isinstance(model, LoadedModel):
        if tokenizer is not None:
            raise ConfigError("model: a LoadedModel carries its tokenizer; do not give tokenizer= as well")
        loaded = model
    else:
        if isinstance(model, tuple) and len(model) == 2 and tokenizer is None:
            model, tokenizer = model
        if not isinstance(model, PreTrainedModel):
            raise ConfigError(
                "model: a loracl LoadedModel, a (model, tokenizer) pair or a transformers model with "
                f"tokenizer=, not {type(model).__name__}"
            )
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ConfigError("model: give its tokenizer too (tokenizer=, or model=(model, tokenizer))")
        name = getattr(model, "name_or_path", "") or ""
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name, path=name)
    if hasattr(loaded.model, "peft_config") or any("lora_" in n for n, _ in loaded.model.named_parameters()):
        raise ConfigError("model: it carries adapters (from an earlier run?); give a fresh base model")
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    if getattr(loaded.model.config, "is_encoder_decoder", False):
        mark_seq2seq(loaded.tokenizer)
    return loaded
