"""Use what a run produced: evaluate its final model on any tasks and generate with it (`loracl eval`,
`loracl predict`); `Source` and `resolve_source` say where a final model comes from (also for
`loracl.outputs.export`).

The source is a run directory (its config.yaml says which base model and prompt settings to use) or an
adapter folder alone (the base model is then the one its adapter_config.json names, or `--model`). The model
is rebuilt exactly as the run evaluated it: `loracl.models.base_model.load_model` +
`loracl.outputs.loading.load_adapter`.

Neither destroys a user's file: `eval -o` replaces only an earlier eval file.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from peft import PeftModel

from loracl import __version__
from loracl.config import ModelSection, RunConfig, load_config
from loracl.data import default_order, load_tasks
from loracl.engine import distributed
from loracl.engine.evaluation import make_evaluator
from loracl.errors import ConfigError, RunFolderError
from loracl.files import (
    UnsafeFileError,
    first_lone_surrogate,
    read_json_limited,
    read_json_object,
    read_text_limited,
    write_json_atomic,
)
from loracl.methods import available_methods
from loracl.models.base_model import LoadedModel, load_model
from loracl.models.multi_lora import MANIFEST, read_manifest, short
from loracl.outputs.loading import AdapterFolder, load_adapter, read_adapter_folder

ADAPTER_CONFIG = "adapter_config.json"
RESULTS = "results.json"
DTYPES = get_args(ModelSection.model_fields["dtype"].annotation)
NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
EVAL_KEYS = ("tasks", "scores", "predictions")  # what marks a file as an earlier `loracl eval` output


def assignment(key: str, value: Any) -> str:
    """A `--set`-style `key=value` whose value reads back (through YAML) as exactly `value`: a JSON literal,
    with every character outside printable ASCII escaped (YAML double-quoted strings take \\u and \\U
    escapes), so that a task called `no` stays a string and a path with ": " is no YAML mapping."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return f"{key}={NOT_PRINTABLE_ASCII.sub(escape, json.dumps(value, ensure_ascii=False))}"


@dataclass
class Source:
    """Where a final model comes from: its adapter folder and the settings to rebuild and prompt it."""

    adapter_dir: Path
    config: RunConfig
    run_dir: Path | None  # None when an adapter folder was given on its own
    method: str | None  # the method that produced the adapter, when known

    @property
    def multi_adapter(self) -> bool:
        return read_manifest(self.adapter_dir) is not None

    @property
    def root(self) -> Path:
        """The folder the source consists of: the run directory, or the adapter folder alone."""
        return self.run_dir or self.adapter_dir


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() or read_manifest(path) is not None


def _recorded_base(folder: AdapterFolder) -> str:
    """The base model an adapter folder names (a multi-adapter folder: its first task adapter's)."""
    first = next(iter(folder.adapters.values()))
    recorded = first.config.get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded:
        raise ConfigError(f"{first.directory / ADAPTER_CONFIG} names no base model; pass --model")
    return recorded


def read_run_results(run_dir: Path) -> dict[str, Any]:
    """A run's results.json ({} when there is none), with the keys deploy reads checked: `method` a known
    method, `base_dtype` a dtype."""
    path = run_dir / RESULTS
    results = read_json_object(path, RunFolderError)
    if results is None:
        return {}
    method = results.get("method")
    if method is not None and (not isinstance(method, str) or method not in available_methods()):
        raise RunFolderError(f"{path}: unknown method {short(method)}")
    if results.get("base_dtype") not in (None, *DTYPES):
        raise RunFolderError(f"{path}: base_dtype {short(results['base_dtype'])} is none of {DTYPES}")
    return results


def _run_method(run_dir: Path, folder: AdapterFolder, method: str | None) -> str | None:
    """The method of a run: its results.json's, which the adapter's manifest (if any) must name too."""
    if folder.manifest is None:
        return method
    if method is not None and folder.manifest["method"] != method:
        raise RunFolderError(
            f"{folder.directory / MANIFEST}: method {short(folder.manifest['method'])}, but "
            f"{run_dir / RESULTS} says the run used {method!r}"
        )
    return folder.manifest["method"]


def resolve_source(path: str | Path, overrides: list[str] = (), model: str | None = None) -> Source:
    """A run directory or an adapter folder -> Source. `overrides` are `--set`-style config assignments.

    Everything that can be checked without the model is checked here (manifest, method, adapter and gate
    files: `loading.read_adapter_folder`), so a damaged folder is refused before any work."""
    path = Path(path)
    model_override = [assignment("model.name", model)] if model else []
    if (path / "config.yaml").is_file():
        adapter_dir = path / "adapter"
        if not _is_adapter_dir(adapter_dir):
            raise ConfigError(f"{path}: the run has no final adapter (adapter/ is missing: did it finish?)")
        results = read_run_results(path)
        method = _run_method(path, read_adapter_folder(adapter_dir), results.get("method"))
        config = load_config(path / "config.yaml", [*overrides, *model_override])
        return Source(adapter_dir, config, path, method)
    if _is_adapter_dir(path):
        folder = read_adapter_folder(path)
        base = model or _recorded_base(folder)
        config = load_config(None, [*overrides, assignment("model.name", base)])
        return Source(path, config, None, folder.manifest["method"] if folder.manifest else None)
    raise ConfigError(
        f"{path}: neither a run directory (config.yaml + adapter/) nor an adapter folder ({ADAPTER_CONFIG})"
    )


def load_final_model(
    source: Source, device: str | None = None, dtype: str | None = None
) -> tuple[PeftModel, LoadedModel]:
    """The base model of `source` with its adapter(s) loaded, in eval mode, as the run evaluated it (`dtype`:
    the base weights' dtype instead of the config's)."""
    m = source.config.model
    loaded = load_model(
        m.name,
        dtype=dtype or m.dtype,
        device=device or m.device,
        cache_dir=m.cache_dir,
        quantization=m.quantization,  # eval/predict rebuild the run's quantised base
    )
    return load_adapter(source.adapter_dir, loaded.model), loaded


# -- eval and predict ----------------------------------------------------------------------------------------
def check_output_file(output: Path) -> None:
    """Refuse, before anything is computed, an output that is not a new file or an earlier eval file."""
    if output.is_dir():
        raise ConfigError(f"-o: {output} is a folder; give a file name, e.g. {output / 'eval.json'}")
    if output.parent.exists() and not output.parent.is_dir():
        raise ConfigError(f"-o: {output.parent} is not a folder")
    if not output.exists():
        return
    try:
        earlier = read_json_limited(output)
    except UnsafeFileError:
        earlier = None
    if not isinstance(earlier, dict) or not all(key in earlier for key in EVAL_KEYS):
        raise ConfigError(f"-o: {output} exists and is not an earlier eval result; refusing to replace it")


def evaluate(source: Source, output: Path, device: str | None = None) -> dict[str, Any]:
    """Scores and predictions of the source's final model on the config's benchmark tasks (test sets);
    writes `output`. Launched with several processes, the test examples are split among them."""
    check_output_file(output)
    distributed.init()
    tasks = load_tasks(source.config)
    model, loaded = load_final_model(source, device)
    evaluator = make_evaluator(source.config, loaded.tokenizer)
    start = time.perf_counter()
    outcomes = [evaluator.evaluate(model, task) for task in tasks]
    scores = [outcome.score for outcome in outcomes]
    b = source.config.benchmark
    results = {
        "source": str(source.root),
        "adapter": str(source.adapter_dir),
        "method": source.method,
        "model": source.config.model.name,
        "benchmark": b.name,
        "order": None if b.tasks else b.order or default_order(b.name),
        "tasks": [t.name for t in tasks],
        "task_metrics": [evaluator.metric_of(t) for t in tasks],
        "test_examples": [len(t.test) for t in tasks],
        "scores": scores,
        "average": sum(scores) / len(scores),
        "eval_seconds": time.perf_counter() - start,
        "processes": distributed.world_size(),
        "loracl_version": __version__,
        "predictions": {t.name: o.predictions for t, o in zip(tasks, outcomes, strict=True)},
        "references": {t.name: [list(ex.answers) for ex in t.test] for t in tasks},  # the golds, in order
        "example_scores": {t.name: o.example_scores for t, o in zip(tasks, outcomes, strict=True)},
    }
    distributed.on_main(lambda: _write_results(results, output))
    return results


def _write_results(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, output)


def check_prompt(prompt: str, where: str) -> None:
    """Refuse a prompt no model can take: blank, or not Unicode text (a lone surrogate, e.g. JSON "\\ud800"
    or undecodable command-line bytes)."""
    if not prompt.strip():
        raise ConfigError(f"{where}: empty prompt")
    index = first_lone_surrogate(prompt)
    if index is not None:
        raise ConfigError(f"{where}: not valid Unicode text (a lone surrogate at character {index})")


def read_prompts(path: Path) -> list[str]:
    """Prompts of a JSONL file: one JSON object with a "prompt" key, or one JSON string, per line."""
    try:
        text = read_text_limited(path)
    except UnsafeFileError as exc:
        raise ConfigError(f"--file: {exc}") from None
    prompts = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is text in JSON
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, nesting, integers too long
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise ConfigError(f"{path}:{number}: not JSON ({reason})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise ConfigError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        check_prompt(prompt, f"{path}:{number}")
        prompts.append(prompt)
    return prompts


def predict(
    source: Source, prompts: list[str], max_new_tokens: int | None = None, device: str | None = None
) -> list[dict[str, str]]:
    """Greedy generations of the final model, prompts formatted and truncated as in the run. Launched with
    several processes, the prompts are split among them and every process returns all the answers."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens: must be a positive number of tokens (got {max_new_tokens})")
    for number, prompt in enumerate(prompts, start=1):
        check_prompt(prompt, f"prompt {number}")
    distributed.init()
    model, loaded = load_final_model(source, device)
    evaluator = make_evaluator(source.config, loaded.tokenizer)
    budget = source.config.eval.max_new_tokens if max_new_tokens is None else max_new_tokens
    ids = [evaluator.encoder.prompt_ids(p, reserve=budget)[0] for p in prompts]
    outputs = evaluator.generate(model, ids, budget)
    return [{"prompt": p, "output": o} for p, o in zip(prompts, outputs, strict=True)]
