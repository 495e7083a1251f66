"""IncLoRA: a new LoRA per task, old ones frozen; the model is W0 + sum_j s B_j A_j (METHODS.md "inc_lora").

Also the base of the other multi-adapter methods (O-LoRA, InfLoRA, GainLoRA): each task i gets the stock PEFT
adapter `task<i>`, every task adapter stays active, and only the current one is trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel

from loracl.methods.context import TaskContext
from loracl.models.lora import LoraState, attach_lora, set_lora_state
from loracl.models.multi_lora import activate_all, add_task_adapter, save_task_adapters, task_adapter

from .base import ContinualMethod, register


@register
class IncLoRA(ContinualMethod):
    name = "inc_lora"
    summary = "a new LoRA per task, old LoRAs frozen, all summed: W0 + sum_j s B_j A_j"
    data_free = True
    memory_growth = "O(T): one LoRA per task"
    init_adapter_obstacle = None  # a task leaves its LoRA behind, nothing else (`adopt`)

    def prepare_model(self, base: PreTrainedModel) -> PeftModel:
        return attach_lora(base, self.lora, adapter=task_adapter(1))

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        """Add task i's adapter (PEFT init: A random, B = 0); all active, only it trainable."""
        current = task_adapter(ctx.index)
        add_task_adapter(model, self.lora, current)
        activate_all(model, trainable=current)

    def adopt(self, model: PeftModel, state: LoraState) -> None:
        """The adapter as task 1's LoRA (`prepare_model` attached `task1`); task 2 adds its own and freezes it
        (`before_task`; METHODS.md, inc_lora: old ones frozen), as after any task."""
        set_lora_state(model, state, task_adapter(1))

    def export_extra(self, model: PeftModel, directory: Path) -> dict[str, Any]:
        """Write method-specific state files beside the adapters; returns the manifest's `extra` entry."""
        return {}

    def export(self, model: PeftModel, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_task_adapters(model, directory, self.name, self.export_extra(model, directory))
