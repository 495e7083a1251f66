"""The shared base of the methods that keep a bounded memory of past examples (replay, agem).

One LoRA is trained task after task (as seq_lora); after each task its training examples are offered to a
reservoir memory (loracl.methods.memory), so while task i trains the memory holds examples of tasks < i
only. These
methods store old examples: not data-free (METHODS.md), which results.json and the report say.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.data.text import Encoded
from loracl.methods.context import TaskContext
from loracl.methods.memory import ReservoirMemory

from ..config import LoraSection
from .base import ContinualMethod
from .options import MemoryOptions  # torch-free, so that `loracl methods` can list them


class EpisodicMemoryMethod(ContinualMethod):
    """One LoRA trained task after task, with a reservoir memory of the finished tasks' examples.

    The memory is filled after each task, so while task i trains it holds examples of tasks < i only."""

    data_free = False
    memory_growth = "constant (one LoRA + a memory of memory_size examples)"
    Options = MemoryOptions
    options: MemoryOptions
    state_attributes = ("memory",)  # the memory pickles with its random generators' states
    init_adapter_obstacle = "its memory after task 0 holds examples of task 0"

    def __init__(self, options: MemoryOptions, lora: LoraSection) -> None:
        super().__init__(options, lora)
        self.memory: ReservoirMemory | None = None
        self.memory_batch = 0  # examples drawn per step, set from the task's batch size
        self.pad_id = 0
        self.device = torch.device("cpu")

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        if self.memory is None:
            self.memory = ReservoirMemory(self.options.memory_size, ctx.seed)
        self.memory_batch = self.options.memory_batch_size or ctx.batch_size
        self.pad_id, self.device = ctx.pad_id, ctx.device

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        assert self.memory is not None
        self.memory.extend(ctx.encoded, ctx.task.name)

    def draw(self) -> list[Encoded]:
        """A random batch from the memory (empty during the first task)."""
        return self.memory.sample(self.memory_batch) if self.memory else []

    def state_bytes(self) -> int:
        return self.memory.nbytes() if self.memory else 0

    def task_info(self) -> dict[str, Any]:
        return {**(self.memory.summary() if self.memory else {}), "memory_batch_size": self.memory_batch}
