"""The base class every continual-learning method derives from, and the method registry.

The training loop (loracl.engine.training) and the runner (loracl.recipes.run) call only the hooks
below, in this order:
for each task i = 1..T:  before_task -> [per step: (inside step_context: task loss, extra_loss), backward,
after_backward, optimizer step, after_optimizer_step] -> after_task -> evaluation of the model as it then
stands -> ... -> export at the end.
`before_task` and `after_task` receive a TaskContext: the task, its tokenized training examples and a way
to batch them (for statistics such as input subspaces or Fisher information).

Generic hooks with do-nothing defaults, for methods that need them:
- `step_context(model, batch)`: a context manager entered around each training step's forward and backward
  passes (backward too: gradient checkpointing recomputes the forward there), so a
  method can hand per-batch side information to its forward hooks (GainLoRA: the prompt mask its gates
  pool over, which the decoder call itself does not carry).
- `evaluating(model, position)`: a context manager entered around the evaluation of the task at 0-based
  `position` of the sequence, so a method can measure something on every task's test prompts without
  keeping them (GainLoRA: its newest gate's values on old tasks), for the next `task_info`.
- `after_optimizer_step(model)`: after each optimizer step, e.g. to keep a protected part of the parameters
  exactly fixed: gradient projection alone does not survive AdamW's per-coordinate scaling.
- `restore(model, directory, manifest)` (class method): re-creates, on a model loaded from an exported
  multi-adapter `adapter/` folder, the extra state the method exported beside the PEFT adapters
  (`loracl.outputs.loading.load_adapter` calls it; see `loracl.models.multi_lora` for the layout).
  `manifest_extra` names the manifest's `extra` keys that state takes, and `check_extra(directory,
  manifest)` (class method) refuses, before any model is loaded, a manifest whose `extra` does not hold
  exactly those keys (a manifest edited to another method would otherwise drop or ignore the state
  silently); a method with extra state extends it to check the files and values themselves.

Inside a training step the loop also calls `augment_batch` (add examples to the step's batch before it is
collated, e.g. replayed memory) and, once the gradient of an optimizer step is complete (after gradient
accumulation, before clipping), `before_optimizer_step` (e.g. project that gradient). After `after_task`
the runner stores `task_info()` (a JSON-able dict) as `per_task[i]["method_info"]` and the report shows it.

Attributes that change the shape of a run (the runner reads them; it never names a method):
- `trains = False`: nothing is trained and no task hook is called; the model is evaluated once and that
  row stands for every step of the matrix (the model never changes).
- `joint_training = True`: one training on the union of every task's training data (shuffled), through
  the same hooks with one TaskContext for the union; every row of the matrix is the final model's scores,
  and only AP is defined (BWT, FWT and forgetting are null).
- `role`: "continual" for a continual-learning method; "upper_bound" or "reference" for comparison points
  that are not continual methods; results.json and the report label the run with it.


Checkpoints (loracl.recipes.checkpoint) after every task save the model's adapters and the method's
state between tasks: the instance attributes named in `state_attributes`: tensors, numbers, strings,
containers of them, the few classes of `checkpoint.STATE_CLASSES` and those registered with
`register_state_class` (a checkpoint is read without running code; a state that could not be read back is
refused when the checkpoint is written).
State a method sets afresh in `before_task` need not be listed. A method that attaches modules of its own
beside the PEFT adapters re-creates them in `rebuild` so that a resumed run can load their weights.

Starting from an existing adapter (`lora.init_adapter`, loracl.recipes.init_adapter): after `prepare_model`
the runner hands the adapter's factors to `adopt`, which leaves the model and the method's state as
`after_task` of a task 1 that had trained them would have; the run's first task is then the method's task 2
(`ctx.index` 2). A method whose state after a task needs that task's data (input bases, a Fisher, a memory of
examples) cannot, and says why in `init_adapter_obstacle` (the run is refused with that reason); by default a
method cannot.

`merge_obstacle` (None by default) says why the exported adapters cannot be added into the base weights,
for methods whose model is not W0 + a fixed update (`loracl export --merge` refuses with that reason).

With `train.parallel: fsdp` the frozen base's decoder blocks are sharded across processes while every LoRA
(and anything a method trains or attaches) stays whole and replicated, so a method's math on its adapters
is unchanged. What it must respect: the base weights inside the blocks are not whole outside a forward or
backward (a method that reads them sets `fsdp_obstacle`, a reason, and such a run is refused), and every
process must run the same passes: `ctx.batches()` then adds padding batches, run inside
`distributed.padding()`, which a method runs like the others but never counts (`distributed.padding_pass()`).
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import PreTrainedModel

from loracl.data.text import Encoded
from loracl.methods import catalog
from loracl.methods.catalog import CATALOG, Role, unknown_method
from loracl.methods.context import TaskContext
from loracl.methods.options import MethodOptions
from loracl.models.lora import DEFAULT_ADAPTER, LoraState, adapter_nbytes, attach_lora, save_adapter
from loracl.models.multi_lora import MANIFEST, short

from ..config import LoraSection
from ..errors import CheckpointError, ConfigError, RunFolderError


class ContinualMethod:
    """A continual-learning method expressed as hooks around one shared training loop.

    A method is also declared in loracl.methods.catalog (its metadata below, its Options class and where its
    implementation lives), which `loracl methods` and the registry read without importing torch."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `loracl methods`
    data_free: ClassVar[bool] = True  # False when old examples are stored (replay-like methods)
    memory_growth: ClassVar[str] = "constant"  # how stored state grows with the number of tasks T
    trains: ClassVar[bool] = True  # False: no training at all (see the module docstring)
    joint_training: ClassVar[bool] = False  # True: one training on the union of all tasks
    role: ClassVar[Role] = "continual"
    merge_obstacle: ClassVar[str | None] = None  # why `export --merge` is impossible; None: it is fine
    fsdp_obstacle: ClassVar[str | None] = None  # why it cannot run with train.parallel: fsdp; None: it can
    # why it cannot start from an existing adapter (`lora.init_adapter`); None: it can, through `adopt`
    init_adapter_obstacle: ClassVar[str | None] = "it has no way to take an adapter as the result of a task"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    state_attributes: ClassVar[tuple[str, ...]] = ()  # attributes kept between tasks (checkpointed)
    manifest_extra: ClassVar[tuple[str, ...]] = ()  # keys of the manifest's "extra" that `restore` reads

    def __init__(self, options: MethodOptions, lora: LoraSection) -> None:
        self.options = options
        self.lora = lora

    # -- model ---------------------------------------------------------------------------------
    def prepare_model(self, base: PreTrainedModel) -> PeftModel:
        """Wrap the frozen base model with the method's adapters (default: one LoRA)."""
        return attach_lora(base, self.lora)

    def trainable_parameters(self, model: PeftModel) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # -- hooks ---------------------------------------------------------------------------------
    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        """Called before training task `ctx.index` (1-based)."""

    def extra_loss(self, model: PeftModel, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """A regulariser of the parameters added to the task loss of each step, or None.

        With several processes each computes it and the loop divides it by their number, so it must not
        depend on the process's share of the batch; `batch` is None on a process whose share is empty."""
        return None

    def augment_batch(self, examples: list[Encoded]) -> list[Encoded]:
        """The examples of one training step, before collation; a method may add its own (replay)."""
        return examples

    def after_backward(self, model: PeftModel) -> None:
        """Called after each backward pass, before the optimizer step (e.g. to project gradients)."""

    def step_context(self, model: PeftModel, batch: dict[str, torch.Tensor]) -> AbstractContextManager:
        """Entered around the forward and backward passes of each training step (task loss and extra_loss)."""
        return contextlib.nullcontext()

    def after_optimizer_step(self, model: PeftModel) -> None:
        """Called after each optimizer step."""

    def evaluating(self, model: PeftModel, position: int) -> AbstractContextManager:
        """Entered around the evaluation of the task at 0-based `position` in the sequence."""
        return contextlib.nullcontext()

    def before_optimizer_step(self, model: PeftModel) -> None:
        """Called once the accumulated gradient of an optimizer step is complete, before clipping and the
        step itself (e.g. to project that whole gradient)."""

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        """Called after training task `ctx.index`; leaves the model as it should be evaluated.

        `ctx.task_dir` is the run's `tasks/<i>-<task>/` folder, for per-task artefacts."""

    def adopt(self, model: PeftModel, state: LoraState) -> None:
        """Take `state` (one LoRA's factors per adapted layer, keyed as `lora_layers` names the layers of
        the adapter `prepare_model` attached, on its device) as what a task 1 trained before the run
        (`lora.init_adapter`): leave the model and the method's state as `after_task` of that task would
        have. Called after `prepare_model`, before the first `before_task` (of task 2); only for a method
        whose `init_adapter_obstacle` is None."""
        obstacle = self.init_adapter_obstacle
        raise NotImplementedError(f"method {self.name!r} cannot adopt an adapter: {obstacle}")

    def task_info(self) -> dict[str, Any]:
        """A JSON-able summary of what the method did for the task just finished (read after after_task)."""
        return {}

    def export(self, model: PeftModel, directory: Path) -> None:
        """Write the final model's adapter(s) in stock PEFT format."""
        save_adapter(model, directory, DEFAULT_ADAPTER)

    @classmethod
    def check_extra(cls, directory: Path, manifest: dict[str, Any]) -> None:
        """Refuse (RunFolderError) a multi-adapter manifest (read by `read_manifest`) whose `extra` is not
        what this method's `restore` needs: by default, exactly the keys of `manifest_extra`."""
        found, wanted = set(manifest["extra"]), set(cls.manifest_extra)
        if found != wanted:
            where = f"{Path(directory) / MANIFEST}: method {cls.name!r}"
            if found - wanted:
                raise RunFolderError(f"{where} does not use the extra state {short(sorted(found - wanted))}")
            raise RunFolderError(
                f"{where} needs the extra state {short(sorted(wanted - found))}, which is missing"
            )

    @classmethod
    def restore(cls, model: PeftModel, directory: Path, manifest: dict[str, Any]) -> None:
        """Re-create extra exported state (beyond the PEFT adapters) on a loaded model; default: none."""

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's state between tasks: the attributes named in `state_attributes`."""
        return {name: getattr(self, name) for name in self.state_attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self.state_attributes if name not in state]
        if missing:
            raise CheckpointError(f"method {self.name!r}: the checkpoint lacks its {', '.join(missing)}")
        for name in self.state_attributes:
            setattr(self, name, state[name])

    def rebuild(self, model: PeftModel, finished: int) -> None:
        """Re-create on a freshly prepared model the modules the first `finished` tasks attached beside the
        PEFT adapters (those the checkpoint re-creates itself), so that their saved weights can be loaded."""

    # -- accounting ----------------------------------------------------------------------------
    def adapter_bytes(self, model: PeftModel) -> int:
        """Bytes of the adapter weights the deployed model carries."""
        return adapter_nbytes(model)

    def stored_adapters(self, model: PeftModel) -> int:
        return len(model.peft_config)

    def state_bytes(self) -> int:
        """Bytes of the state the method keeps between tasks besides the model's adapters."""
        return 0


# The registry: every name resolves here (run, --resume, bench and its worker processes, export, eval). The
# names a user can give are those of the catalog (loracl.methods.catalog; implementations imported on first
# use), of plugins (entry points of the group `loracl.methods`, loaded on first use of their name, in each
# process) and of classes registered at run time. A name registered again replaces the class before it
# (a notebook re-running a cell): silently when the new class has the same module and qualified name, with
# a warning when it replaces another class (a built-in included). Importing a built-in's module after
# its name was replaced does not undo the replacement; `unregister` does.
_REGISTRY: dict[str, type[ContinualMethod]] = {}
# Classes a method's state may hold, besides tensors, numbers, strings, containers and the built-in ones of
# loracl.recipes.checkpoint.STATE_CLASSES: the checkpoint reader accepts them (register_state_class).
_STATE_CLASSES: dict[str, type] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator adding a method to the registry under `cls.name` (replacing what had that name)."""
    if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)):
        raise TypeError(f"register: {cls!r} is not a ContinualMethod subclass")
    name = getattr(cls, "name", None)
    if problem := catalog.name_problem(name):
        raise ValueError(f"register {catalog.class_path(cls)}: {problem}")
    path, old = catalog.class_path(cls), _REGISTRY.get(name)
    declared = catalog.declared_implementation(name)
    if path == declared:  # the catalog's (or a plugin's) own class, imported
        if old is None or catalog.class_path(old) == path:
            _REGISTRY[name] = cls
        return cls  # else a class registered in this session replaced it: that one stays
    replaced = catalog.class_path(old) if old is not None else declared
    if replaced is not None and replaced != path:
        kind = "built-in method" if name in catalog.CATALOG and replaced == declared else "method"
        warnings.warn(f"{kind} {name!r} ({replaced}) replaced by {path}", UserWarning, stacklevel=2)
    _REGISTRY[name] = cls
    catalog.note_registered(catalog.spec_from_class(cls), name)
    return cls


def unregister(name: str) -> None:
    """Forget what was registered under `name` in this session: a built-in or plugin method of that name is
    resolved afresh (its own implementation) on next use; any other name becomes unknown."""
    _REGISTRY.pop(name, None)
    catalog.note_registered(None, name)
    catalog.forget_plugin(name)


def register_state_class(cls: type) -> type:
    """Class decorator: allow instances of `cls` in a method's checkpointed state (`state_attributes`).

    A checkpoint is read without running code (torch.load with weights_only=True), so it holds only tensors,
    numbers, strings, containers and allowed classes; the class must be importable by module and name (not
    defined in __main__ or inside a function), so that a resumed run in another process can find it. Its
    instances are rebuilt without __init__ (their __dict__, or __setstate__, restores them)."""
    if not isinstance(cls, type):
        raise TypeError(f"register_state_class: {cls!r} is not a class")
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(
            f"register_state_class: {catalog.class_path(cls)} is defined in __main__ or inside a function; a "
            "resumed run could not find it: define it at the top level of an importable module"
        )
    _STATE_CLASSES[catalog.class_path(cls)] = cls
    return cls


def state_classes() -> tuple[type, ...]:
    """The classes registered with register_state_class (loaded plugins' included)."""
    return tuple(_STATE_CLASSES.values())


def available_methods() -> dict[str, type[ContinualMethod]]:
    """Every method by name, each implementation imported (torch and all; the catalog lists them without),
    plugins' included; a plugin that fails to load is left out (`loracl methods` says why)."""
    for name in catalog.known_names():
        with contextlib.suppress(ConfigError):
            method_class(name)
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[ContinualMethod]:
    """The implementation of method `name` (ConfigError, one line, when it is unknown or cannot be loaded)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    spec = CATALOG.get(name) if isinstance(name, str) else None
    if spec is not None:
        return _REGISTRY.setdefault(name, spec.load())
    found = catalog.plugin(name) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(f"method.name: {unknown_method(name, catalog.known_names())}")
    if isinstance(found, catalog.PluginFailure):
        raise ConfigError(f"method.name: {found.line()}")
    try:
        cls = found.load()
    except Exception as exc:  # noqa: BLE001  (a plugin's import error, whatever it is, as one line)
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"method.name: plugin method {name!r} ({found.origin}): cannot import its implementation "
            f"{found.implementation} ({type(exc).__name__}: {reason})"
        ) from exc
    problem = None if isinstance(cls, type) and issubclass(cls, ContinualMethod) else "not a ContinualMethod"
    problem = problem or catalog.spec_mismatch(found, cls)
    if problem:
        raise ConfigError(f"method.name: plugin method {name!r} ({found.origin}): {problem}")
    return _REGISTRY.setdefault(name, cls)


def create_method(name: str, options: dict[str, Any], lora: LoraSection) -> ContinualMethod:
    cls = method_class(name)
    try:
        parsed = cls.Options.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["method", *(str(p) for p in first["loc"])])  # no loc: a check across options
        if first["type"] == "extra_forbidden":
            valid = list(cls.Options.model_fields)
            close = difflib.get_close_matches(str(first["loc"][0]), valid, n=1)
            hint = f" (did you mean 'method.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{key}: unknown option for method {name!r}{hint}; its options: {', '.join(valid) or 'none'}"
            ) from err
        raise ConfigError(f"{key}: {first['msg']} (got {first.get('input')!r})") from err
    return cls(parsed, lora)
