"""GPM (Saha et al., ICLR 2021) on a single LoRA (METHODS.md "gpm").

Per adapted layer keep an orthonormal basis M (n x k) of past tasks' layer inputs, extended after each task
by GPM's own energy rule (loracl.models.subspace.gpm_update: squared singular values of the inputs, epsilon
0.97 rising 0.003 per task; InfLoRA and GainLoRA use the DualGPM rule instead). During later tasks the
gradient of A is projected, grad A <- grad A - grad A M M^T, so A x is unchanged for old inputs x. B is
trained freely, as METHODS.md specifies.

The shared loop uses AdamW, whose per-coordinate scaling (and weight decay) would move A inside span(M) even
from a projected gradient; so after each optimizer step the update of A is projected as well,
A <- A - (A - A_start) M M^T, which keeps A M (hence A x for x in span(M)) exactly at its value at the start
of the task.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.methods.context import TaskContext
from loracl.models.lora import lora_layers
from loracl.models.subspace import (
    basis_info,
    basis_nbytes,
    collect_input_grams,
    project_off,
    warn_few_free_directions,
)

from .base import ContinualMethod, register
from .options import GPMOptions  # torch-free, so that `loracl methods` can list them


@register
class GPM(ContinualMethod):
    name = "gpm"
    summary = "one LoRA; gradients of A projected off the input subspace of old tasks (GPM bases)"
    data_free = True
    memory_growth = "constant LoRA, plus a per-layer input basis that grows with T up to n x n"
    Options = GPMOptions
    options: GPMOptions
    state_attributes = ("bases",)  # `start` is set afresh by before_task
    init_adapter_obstacle = "its basis of old inputs, which later gradients avoid, needs task 0's inputs"

    def __init__(self, options, lora) -> None:
        super().__init__(options, lora)
        self.bases: dict[str, torch.Tensor] = {}  # layer name -> M (n x k)
        self.start: dict[str, torch.Tensor] = {}  # layer name -> A at the start of the current task

    def protected(self, model: PeftModel):
        for name, layer in lora_layers(model):
            if name in self.bases:
                yield name, layer.lora_A["default"].weight, self.bases[name]

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        warn_few_free_directions(
            self.name,
            ctx.index,
            self.bases,
            1,
            "A's gradient is projected to zero there, only B learns",
            "lower the threshold's rise, e.g. --methods gpm:threshold_step=0.001",
        )
        self.start = {name: A.detach().clone() for name, A, _ in self.protected(model)}

    @torch.no_grad()
    def after_backward(self, model: PeftModel) -> None:
        for _, A, M in self.protected(model):
            if A.grad is not None:
                A.grad.copy_(project_off(A.grad, M))

    @torch.no_grad()
    def after_optimizer_step(self, model: PeftModel) -> None:
        for name, A, M in self.protected(model):
            start = self.start[name]
            A.copy_(start + project_off(A - start, M))

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        layers = dict(lora_layers(model))
        grams = ctx.all_reduce(collect_input_grams(model, layers, ctx.batches(self.options.max_examples)))
        self.options.basis_rule().update_all(self.bases, grams, ctx.index)

    def task_info(self) -> dict[str, Any]:
        return basis_info(self.bases)

    def state_bytes(self) -> int:
        return basis_nbytes(self.bases)
