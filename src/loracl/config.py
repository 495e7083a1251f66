"""Run configuration: a YAML file validated by pydantic, with dotted `--set key=value` overrides.

Every option of a run lives here, so the CLI, the runner and the methods read one validated object.
Unknown keys are errors (with the closest valid key suggested), never silently ignored.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import ConfigError
from .files import UnsafeFileError, first_lone_surrogate, max_file_bytes, read_text_limited

# YAML aliases share one object per anchor, so nine nested lists of nine aliases load in microseconds but
# validating or dumping them visits 9**9 values (gigabytes). No real config comes near 100,000 values.
MAX_YAML_VALUES = 100_000
# PyYAML parses about 100 KB a second on a busy CPU: the shipped configs are under 1 KB, a config of a GiB
# (or /dev/zero behind a link) would parse for hours.
MAX_CONFIG_BYTES = 1 << 20
SEED_LIMIT = 2**32  # numpy's seeds are 0 <= seed < 2**32
# Upper bounds on counts and sizes, far beyond any model's context or any machine's memory: a typo such as
# 1e20 is refused at once instead of looping for ever or overflowing mid-run.
MAX_COUNT = 1 << 24
MAX_EPOCHS = 10_000
# The metrics of loracl.engine.scoring (a test keeps the two lists equal; config sits below engine).
METRIC_NAMES = Literal[
    "exact_match", "rouge_l", "trace_accuracy", "trace_rouge_l", "trace_edit_similarity", "trace_sari"
]
# The experiment trackers a run can log to, through accelerate.tracking (see loracl.engine.tracking).
TRACKER_NAMES = Literal["tensorboard", "wandb", "mlflow", "trackio"]
TRACKERS: tuple[str, ...] = get_args(TRACKER_NAMES)


class _Section(BaseModel):
    # inf and nan would pass gt/ge bounds or none at all and only fail mid-run (a nan loss, an endless loop).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(_Section):
    name: str = Field(
        "smollm2-135m",
        description="'smollm2-135m' (embedded default), 'tiny-random-llama', 'tiny-random-t5', a Hugging "
        "Face id or local directory (decoder-only or encoder-decoder, e.g. T5 / Flan-T5), or a .gguf file",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype of the frozen base model; auto = bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    cache_dir: str | None = Field(None, description="where converted GGUF weights are cached")
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")
    quantization: Literal["4bit", "8bit"] | None = Field(
        None,
        description="load the frozen base quantised through bitsandbytes (pip install "
        "'loracl[quantization]'): 4bit = QLoRA's NF4 with double quantisation, computing in model.dtype "
        "(auto: bfloat16); 8bit = LLM.int8; the LoRA weights stay float32. `export --merge` de-quantises "
        "the base to that dtype first",
    )

    @field_validator("quantization", mode="before")
    @classmethod
    def _none_word(cls, value: Any) -> Any:
        # `--set model.quantization=none` (or `null`, empty) means no quantisation, as YAML's null does
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @model_serializer(mode="wrap")
    def _quantization_when_set(self, handler: Any) -> Any:
        # Left out at its default: config.yaml, checkpoint hashes and zero-shot cache keys of runs made before
        # the key existed stay what they were.
        data = handler(self)
        if self.quantization is None and isinstance(data, dict):
            data.pop("quantization", None)
        return data


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the scaling is alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="layers to adapt; the default names the attention's query and value projections "
        "(on a T5-style model: q, v); [all-linear]: every linear layer but the output head",
    )
    init_adapter: str | None = Field(
        None,
        min_length=1,
        description="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) to start from, "
        "as the result of a task 0 trained before the run (not evaluated); its r, alpha, target modules "
        "and base model must be the run's (`loracl run --init-adapter DIR`)",
    )

    @field_validator("target_modules")
    @classmethod
    def _distinct_names(cls, names: list[str]) -> list[str]:
        if any(not name.strip() for name in names):
            raise ValueError("module names must be non-empty")
        if len(set(names)) != len(names):
            raise ValueError("module names must be distinct")
        return names


class MethodSection(_Section):
    # Method options are validated by the method's own Options class (see loracl.methods).
    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)
    name: str = Field("slao", description="continual-learning method; `loracl methods` lists them")

    @model_validator(mode="after")
    def _finite_options(self) -> MethodSection:
        # allow_inf_nan only reaches typed fields; a method's options are untyped here.
        for key, value in (self.model_extra or {}).items():
            if _holds_non_finite(value):
                raise ValueError(f"option '{key}' is not a finite number")
        return self


def _holds_non_finite(value: Any) -> bool:
    """Whether `value` is, or a list or mapping inside it holds, an inf or nan float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_holds_non_finite(item) for item in value)


class BenchmarkSection(_Section):
    name: str = Field("cl_benchmark", description="cl_benchmark, olora, superni or jsonl")
    order: str | None = Field(
        None,
        description="a named task order (`loracl benchmarks`); default: the benchmark's own (order1 for "
        "cl_benchmark and olora, trace for trace; superni and jsonl: every task of the folder)",
    )
    tasks: list[str] | None = Field(None, description="explicit task list; overrides order")
    data_dir: str | None = Field(None, description="data folder; default ../shared/data or $LORACL_DATA_DIR")
    max_train: int | None = Field(None, gt=0, description="cap on training examples per task")
    max_test: int | None = Field(None, gt=0, description="cap on test examples per task")
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of each task's (capped) training examples held out of training as its "
        "validation split (what eval.split=validation evaluates on; `loracl bench --tune` selects on it)",
    )


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="passes over each task's training data")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="learning rate within each task after warm-up: constant (O-LoRA's and GainLoRA's "
        "scripts), linear or cosine decay to 0",
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of each task's steps spent warming up")
    batch_size: int = Field(8, gt=0, le=MAX_COUNT)
    grad_accum: int = Field(1, gt=0, le=MAX_COUNT, description="gradient accumulation steps")
    max_length: int = Field(
        512, gt=8, le=MAX_COUNT, description="max tokens of prompt + answer (long prompts: see data.text)"
    )
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null disables")
    seed: int = Field(42, ge=0, lt=SEED_LIMIT, description="random seed, 0 <= seed < 2**32")
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward pass instead of keeping "
        "them: less memory for long sequences, about a third more compute per step; same results",
    )
    parallel: Literal["data", "fsdp"] = Field(
        "data",
        description="with several processes (accelerate launch, torchrun): data = a full copy of the model "
        "per process; fsdp = the frozen base's decoder blocks sharded across processes (FSDP2), LoRA "
        "replicated: for a base that does not fit one device; same results. One process: no difference",
    )


class EvalSection(_Section):
    batch_size: int = Field(16, gt=0, le=MAX_COUNT)
    max_new_tokens: int = Field(
        50,
        gt=0,
        le=MAX_COUNT,
        description="generation cap; classification tasks stop after their longest label",
    )
    zero_shot: bool = Field(True, description="evaluate the base model first (needed for FWT)")
    metric: METRIC_NAMES | None = Field(
        None,
        description="score every task with this metric instead of its benchmark's convention (exact match "
        "for Standard/Long, ROUGE-L for SuperNI, TRACE's own per task)",
    )
    matrix: Literal["full", "metrics"] = Field(
        "full",
        description="full: every task after every task (T*T evaluations); metrics: only the entries AP, "
        "BWT and FWT read (tasks i and i+1 after task i, every task after the last: 3T-2), forgetting n/a",
    )
    split: Literal["test", "validation"] = Field(
        "test",
        description="the examples every evaluation (zero-shot and the matrix) scores: test, or validation, "
        "carved from train (needs benchmark.validation_fraction > 0); with validation no test file is read",
    )


class TrackingSection(_Section):
    report_to: list[TRACKER_NAMES] = Field(
        default_factory=list,
        description="experiment trackers to log to (tensorboard, wandb, mlflow, trackio), under "
        "<run>/tracking/: per optimizer step loss, lr, grad_norm, tokens/s; per task the scores and the "
        "running AP",
    )
    project: str = Field(
        "loracl", min_length=1, description="wandb / trackio project, mlflow experiment (tensorboard: unused)"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # `--set tracking.report_to=tensorboard,wandb` is a YAML string, not a list: take it as the list it
        # names; an empty value (`report_to:`, `--set tracking.report_to=`) is no tracker
        if value is None:
            return []
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("report_to")
    @classmethod
    def _distinct_trackers(cls, names: list[str]) -> list[str]:
        return list(dict.fromkeys(names))  # a tracker named twice logs once


class VersionsSection(_Section):
    # Which adapter adapter/ serves, never what is trained or scored: every key may change at --resume.
    keep: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="keep the folders of only the N newest adapter versions (versions/v<k>/) and the "
        "promoted one; null: every version (a single-adapter method such as SLAO costs T x one adapter)",
    )
    max_forgetting: float | None = Field(
        None,
        ge=0,
        description="forgetting guard: a new version whose average drop on earlier tasks exceeds this many "
        "points is kept as a candidate, not promoted to adapter/ (`loracl run` then exits with status 3)",
    )
    guard_set: str | None = Field(
        None,
        min_length=1,
        description="folder of one <task>.jsonl per task (prompt/answer lines, as the jsonl benchmark's "
        "test.jsonl) on which the drop is measured instead of the tasks' test sets",
    )


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    method: MethodSection = Field(default_factory=MethodSection)
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    versions: VersionsSection = Field(default_factory=VersionsSection)
    output_dir: str | None = Field(None, description="run directory (default runs/<method>-<time>)")

    @field_validator("method", mode="before")
    @classmethod
    def _method_name_shortcut(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _validation_needs_a_fraction(self) -> RunConfig:
        if self.eval.split == "validation" and self.benchmark.validation_fraction == 0:
            raise ValueError(
                "eval.split=validation needs benchmark.validation_fraction > 0 (the validation split is "
                "carved from the training data), e.g. --set benchmark.validation_fraction=0.1"
            )
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
    if not first["loc"] and first["type"] == "value_error":  # a check across sections: its message says all
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    key = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_suggest(key)}"
    return f"{source}: {key}: {first['msg']} (got {_short_repr(first.get('input'))})"


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _children(where: str, value: Any) -> list[tuple[str, Any]]:
    """The values inside a loaded YAML value, each with its dotted key (for messages)."""
    if isinstance(value, dict):
        return [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
    if isinstance(value, (list, set)):
        return [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return []


def _check_loaded(data: Any, source: str) -> None:
    """Refuse what would hang or fail later: aliases that expand to more than MAX_YAML_VALUES values (counted
    while walking, so the expansion is never built; an alias inside its own anchor counts without end) and
    strings with a lone surrogate (YAML's "\\ud800"), which no file name or UTF-8 writer accepts."""
    pending: list[tuple[str, Any]] = [("", data)]
    seen = 1
    while pending:
        where, value = pending.pop()
        if isinstance(value, str) and first_lone_surrogate(value) is not None:
            name = where or "the value"
            raise ConfigError(f"{source}: {name} holds a lone surrogate (not valid Unicode text)")
        seen += len(value) if isinstance(value, (dict, list, set)) else 0
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values (anchors/aliases?)"
            )
        pending.extend(_children(where, value))


def _load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with every failure a one-line ConfigError naming `source` (a file or `--set KEY`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # an integer beyond Python's digit limit, a 13th month...
        raise ConfigError(f"{source}: invalid YAML value: {' '.join(str(exc).split())}") from exc
    _check_loaded(data, source)
    return data


def parse_value(raw: str, source: str) -> Any:
    """A YAML value given on the command line (`--set`, `bench --methods`), bounded like a config file's."""
    return _load_yaml(raw, source) if raw.strip() else None


def set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set `dotted.key` to `value` in a nested dict, in place, creating sections as needed."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{source}: empty key segment in {key!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=yaml_value` assignment to a nested dict, in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = assignment.split("=", 1)
    set_dotted(data, key, parse_value(raw, f"--set {key}"), f"--set {key}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: config file not found")
    try:  # a regular file of bounded size only: a named pipe would block, /dev/zero never end
        text = read_text_limited(path, min(MAX_CONFIG_BYTES, max_file_bytes()))
    except UnsafeFileError as exc:
        raise ConfigError(str(exc)) from None
    data = _load_yaml(text, str(path))
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
