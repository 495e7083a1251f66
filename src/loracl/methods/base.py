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
containers of them and the few classes of `checkpoint.STATE_CLASSES`
(a checkpoint is read without running code).
State a method sets afresh in `before_task` need not be listed. A method that attaches modules of its own
beside the PEFT adapters re-creates them in `rebuild` so that a resumed run can load their weights.

`merge_obstacle` (None by default) says why the exported adapters cannot be added into the base weights,
for methods whose model is not W0 + a fixed update (`loracl export --merge` refuses with that reason).
"""

from __future__ import annotations

import contextlib
import difflib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import PreTrainedModel

from loracl.data.text import Encoded
from loracl.methods.catalog import CATALOG, Role, unknown_method
from loracl.methods.context import TaskContext
from loracl.methods.options import MethodOptions
from loracl.models.lora import DEFAULT_ADAPTER, adapter_nbytes, attach_lora, save_adapter
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


# The methods whose modules have been imported (each class registers itself). The names a user can give are
# those of the catalog (loracl.methods.catalog), whose implementations are imported on first use, plus any
# class registered at run time.
_REGISTRY: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[ContinualMethod]]:
    """Every method by name, each implementation imported (torch and all; the catalog lists them without)."""
    for spec in CATALOG.values():
        spec.load()
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[ContinualMethod]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in CATALOG:
        return CATALOG[name].load()
    raise ConfigError(f"method.name: {unknown_method(name, [*CATALOG, *_REGISTRY])}")


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
