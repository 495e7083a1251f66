"""Experience replay with a reservoir memory (METHODS.md, "replay"): not data-free.

One LoRA, trained task after task; every training step's batch is extended with `memory_batch_size`
examples drawn from a fixed-size memory of past tasks' examples (reservoir sampling), so the task loss is
the mean over current and replayed answer tokens (ER as in Chaudhry et al. 2019, "On tiny episodic memories").
"""

from __future__ import annotations

from typing import Any

from peft import PeftModel

from loracl.data.text import Encoded
from loracl.methods.context import TaskContext

from .base import register
from .episodic import EpisodicMemoryMethod


@register
class Replay(EpisodicMemoryMethod):
    name = "replay"
    summary = (
        "one LoRA; each batch mixed with examples drawn from a reservoir memory of past tasks (not data-free)"
    )

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.replayed = 0  # examples replayed while training this task

    def augment_batch(self, examples: list[Encoded]) -> list[Encoded]:
        drawn = self.draw()
        self.replayed += len(drawn)
        return examples + drawn

    def task_info(self) -> dict[str, Any]:
        return {**super().task_info(), "replayed_examples": self.replayed}
