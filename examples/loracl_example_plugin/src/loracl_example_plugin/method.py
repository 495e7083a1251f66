"""`l2_anchor`: seq_lora plus an L2 penalty toward the LoRA parameters at the end of the previous task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from loracl.config import LoraSection
from loracl.methods import ContinualMethod, register_state_class
from loracl.methods.context import TaskContext

from .spec import L2_ANCHOR, L2AnchorOptions


@register_state_class  # a checkpoint reads back only tensors, plain values and registered classes
@dataclass
class Anchor:
    """The trainable LoRA parameters after a finished task: detached float32 copies, by parameter name."""

    task: int
    tensors: dict[str, torch.Tensor]


class L2Anchor(ContinualMethod):
    # The metadata is the spec's (loracl refuses a class that disagrees with the spec it was listed from).
    name = L2_ANCHOR.name
    summary = L2_ANCHOR.summary
    memory_growth = L2_ANCHOR.memory_growth
    Options = L2AnchorOptions
    options: L2AnchorOptions
    state_attributes = ("anchor",)  # checkpointed after every task; `params` are found again in before_task

    def __init__(self, options: L2AnchorOptions, lora: LoraSection) -> None:
        super().__init__(options, lora)
        self.anchor: Anchor | None = None
        self.params: dict[str, torch.nn.Parameter] = {}
        self.info: dict[str, Any] = {}

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def extra_loss(self, model: PeftModel, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if self.anchor is None or self.options.strength == 0:
            return None  # task 1: nothing to stay close to
        terms = [((p.float() - self.anchor.tensors[n]) ** 2).sum() for n, p in self.params.items()]
        return 0.5 * self.options.strength * torch.stack(terms).sum()

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        moved = self.distance()
        self.anchor = Anchor(ctx.index, {n: p.detach().float().clone() for n, p in self.params.items()})
        self.info = {"distance_from_previous_anchor": moved}

    def distance(self) -> float | None:
        """‖θ − θ*‖ now (None before the first anchor)."""
        if self.anchor is None:
            return None
        anchor = self.anchor.tensors
        squares = sum(float(((p.detach().float() - anchor[n]) ** 2).sum()) for n, p in self.params.items())
        return squares**0.5

    def task_info(self) -> dict[str, Any]:
        return dict(self.info)

    def state_bytes(self) -> int:
        tensors = self.anchor.tensors.values() if self.anchor else ()
        return sum(t.numel() * t.element_size() for t in tensors)
