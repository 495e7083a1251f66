"""Run configuration: a YAML file validated by pydantic, with dotted `--set key=value` overrides.

Every option of a run lives here, so the CLI, the runner and the methods read one validated object.
Unknown keys are errors (with the closest valid key suggested), never silently ignored.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        "smollm2-135m",
        description="'smollm2-135m' (embedded default), 'tiny-random-llama', a Hugging Face id or local "
        "directory, or a .gguf file",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype of the frozen base model; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    cache_dir: str | None = Field(None, description="where converted GGUF weights are cached")
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the scaling is alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class MethodSection(_Section):
    # Method options are validated by the method's own Options class (see loracl.methods).
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = Field("slao", description="continual-learning method; `loracl methods` lists them")


class BenchmarkSection(_Section):
    name: str = Field("cl_benchmark", description="cl_benchmark, olora, superni or jsonl")
    order: str | None = Field("order1", description="a named task order (order1..order6)")
    tasks: list[str] | None = Field(None, description="explicit task list; overrides order")
    data_dir: str | None = Field(None, description="data folder; default ../shared/data or $LORACL_DATA_DIR")
    max_train: int | None = Field(None, gt=0, description="cap on training examples per task")
    max_test: int | None = Field(None, gt=0, description="cap on test examples per task")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of train held out")


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, description="passes over each task's training data")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps")
    max_length: int = Field(512, gt=8, description="max tokens of prompt + answer (prompts cut on the left)")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null disables")
    seed: int = 42


class EvalSection(_Section):
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(
        32, gt=0, description="generation cap; classification tasks stop after their longest label"
    )
    zero_shot: bool = Field(True, description="evaluate the base model first (needed for FWT)")
    matrix: Literal["full", "metrics"] = Field(
        "full",
        description="full: every task after every task (T*T evaluations); metrics: only the entries AP, "
        "BWT and FWT read (tasks i and i+1 after task i, every task after the last: 3T-2), forgetting n/a",
    )


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    method: MethodSection = Field(default_factory=MethodSection)
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str | None = Field(None, description="run directory (default runs/<method>-<time>)")

    @field_validator("method", mode="before")
    @classmethod
    def _method_name_shortcut(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _order_or_tasks(self) -> RunConfig:
        if self.benchmark.order is None and not self.benchmark.tasks and self.benchmark.name != "superni":
            raise ValueError("benchmark: give either 'order' or 'tasks'")
        return self

    def method_options(self) -> dict[str, Any]:
        """Options of the method section other than its name."""
        return {k: v for k, v in self.method.model_dump().items() if k != "name"}


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(_known_keys(sub, f"{prefix}{name}."))
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(RunConfig), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_suggest(key)}"
    return f"{source}: {key}: {first['msg']} (got {first.get('input')!r})"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=yaml_value` assignment to a nested dict, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value is not valid YAML: {exc}".splitlines()[0]) from exc
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (model, method, ...)")
    return data


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from err


def load_config_data(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The raw config mapping: a YAML file (or {} for the defaults) with `--set` overrides applied, not yet
    validated (`loracl bench` derives one config per grid cell from it)."""
    data = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None) and apply `--set` overrides."""
    return build_config(load_config_data(path, overrides), str(path) if path is not None else "config")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
