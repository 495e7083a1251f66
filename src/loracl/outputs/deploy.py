"""Use what a run produced: export its adapter (or the base model with it merged in), evaluate a saved adapter
on any tasks, and generate with the final model (`loracl export`, `loracl eval`, `loracl predict`).

The source is a run directory (its config.yaml says which base model and prompt settings to use) or an
adapter folder alone (the base model is then the one its adapter_config.json names, or `--model`). The model
is rebuilt exactly as the run evaluated it: `loracl.models.base_model.load_model` +
`loracl.outputs.loading.load_adapter`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel

from loracl import __version__
from loracl.config import RunConfig, load_config
from loracl.data import load_tasks
from loracl.engine import distributed
from loracl.engine.evaluation import make_evaluator
from loracl.errors import ConfigError
from loracl.files import write_json_atomic
from loracl.methods import method_class
from loracl.models.base_model import LoadedModel, load_model
from loracl.models.multi_lora import read_manifest
from loracl.outputs.loading import load_adapter

ADAPTER_CONFIG = "adapter_config.json"


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


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() or read_manifest(path) is not None


def _recorded_base(adapter_dir: Path) -> str:
    """The base model an adapter folder names (a multi-adapter folder: its first task adapter's)."""
    manifest = read_manifest(adapter_dir)
    folder = adapter_dir / manifest["adapters"][0] if manifest else adapter_dir
    settings = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    recorded = settings.get("base_model_name_or_path")
    if not recorded:
        raise ConfigError(f"{folder / ADAPTER_CONFIG} names no base model; pass --model")
    return recorded


def _run_results(run_dir: Path) -> dict[str, Any]:
    results = run_dir / "results.json"
    return json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}


def _run_method(run_dir: Path) -> str | None:
    return _run_results(run_dir).get("method")


def resolve_source(path: str | Path, overrides: list[str] = (), model: str | None = None) -> Source:
    """A run directory or an adapter folder -> Source. `overrides` are `--set`-style config assignments."""
    path = Path(path)
    model_override = [f"model.name={model}"] if model else []
    if (path / "config.yaml").is_file():
        adapter_dir = path / "adapter"
        if not _is_adapter_dir(adapter_dir):
            raise ConfigError(f"{path}: the run has no final adapter (adapter/ is missing: did it finish?)")
        config = load_config(path / "config.yaml", [*overrides, *model_override])
        return Source(adapter_dir, config, path, _run_method(path))
    if _is_adapter_dir(path):
        base = model or _recorded_base(path)
        config = load_config(None, [*overrides, f"model.name={base}"])
        manifest = read_manifest(path)
        return Source(path, config, None, manifest["method"] if manifest else None)
    raise ConfigError(
        f"{path}: neither a run directory (config.yaml + adapter/) nor an adapter folder ({ADAPTER_CONFIG})"
    )


def load_final_model(
    source: Source, device: str | None = None, dtype: str | None = None
) -> tuple[PeftModel, LoadedModel]:
    """The base model of `source` with its adapter(s) loaded, in eval mode, as the run evaluated it (`dtype`:
    the base weights' dtype instead of the config's)."""
    m = source.config.model
    loaded = load_model(m.name, dtype=dtype or m.dtype, device=device or m.device, cache_dir=m.cache_dir)
    return load_adapter(source.adapter_dir, loaded.model), loaded


def _prepare_target(target: Path, overwrite: bool) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise ConfigError(f"--to: {target} exists and is not empty; choose another folder or --overwrite")
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def check_mergeable(source: Source) -> None:
    """Refuse to merge adapters that are not a fixed weight update (the method says why)."""
    if source.method is None:
        return
    obstacle = method_class(source.method).merge_obstacle
    if obstacle:
        raise ConfigError(f"--merge: {source.method} adapters cannot be merged into the weights: {obstacle}")


def export(run_dir: str | Path, target: str | Path, merge: bool = False, overwrite: bool = False) -> Path:
    """Write the final adapter folder (as the run left it), or with `merge` the base model with every active
    adapter added into its weights, saved with its tokenizer as a plain transformers folder."""
    source = resolve_source(run_dir)
    target = Path(target)
    if merge:
        check_mergeable(source)
    _prepare_target(target, overwrite)
    if not merge:
        shutil.copytree(source.adapter_dir, target)
        return target
    # On CPU, in the dtype the run's base weights had: `dtype: auto` alone would give float32 here for a
    # run that trained in bfloat16 on a GPU.
    run_dtype = _run_results(source.run_dir).get("base_dtype") if source.run_dir else None
    model, loaded = load_final_model(source, device="cpu", dtype=run_dtype)
    merged = model.merge_and_unload()  # W0 + sum over active adapters of s B A
    merged.save_pretrained(str(target))
    loaded.tokenizer.save_pretrained(str(target))
    return target


def evaluate(source: Source, output: Path, device: str | None = None) -> dict[str, Any]:
    """Scores and predictions of the source's final model on the config's benchmark tasks (test sets);
    writes `output`. Launched with several processes, the test examples are split among them."""
    distributed.init()
    tasks = load_tasks(source.config)
    model, loaded = load_final_model(source, device)
    evaluator = make_evaluator(source.config, loaded.tokenizer)
    start = time.perf_counter()
    outcomes = [evaluator.evaluate(model, task) for task in tasks]
    scores = [outcome.score for outcome in outcomes]
    b = source.config.benchmark
    results = {
        "source": str(source.run_dir or source.adapter_dir),
        "adapter": str(source.adapter_dir),
        "method": source.method,
        "model": source.config.model.name,
        "benchmark": b.name,
        "order": None if b.tasks else b.order,
        "tasks": [t.name for t in tasks],
        "test_examples": [len(t.test) for t in tasks],
        "scores": scores,
        "average": sum(scores) / len(scores),
        "eval_seconds": time.perf_counter() - start,
        "processes": distributed.world_size(),
        "loracl_version": __version__,
        "predictions": {t.name: o.predictions for t, o in zip(tasks, outcomes, strict=True)},
    }
    distributed.on_main(lambda: _write_results(results, output))
    return results


def _write_results(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, output)


def read_prompts(path: Path) -> list[str]:
    """Prompts of a JSONL file: one JSON object with a "prompt" key, or one JSON string, per line."""
    prompts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--file: cannot read {path}: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise ConfigError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        prompts.append(prompt)
    return prompts


def predict(
    source: Source, prompts: list[str], max_new_tokens: int | None = None, device: str | None = None
) -> list[dict[str, str]]:
    """Greedy generations of the final model, prompts formatted and truncated as in the run. Launched with
    several processes, the prompts are split among them and every process returns all the answers."""
    distributed.init()
    model, loaded = load_final_model(source, device)
    evaluator = make_evaluator(source.config, loaded.tokenizer)
    budget = max_new_tokens or source.config.eval.max_new_tokens
    ids = [evaluator.encoder.prompt_ids(p, reserve=budget)[0] for p in prompts]
    outputs = evaluator.generate(model, ids, budget)
    return [{"prompt": p, "output": o} for p, o in zip(prompts, outputs, strict=True)]
