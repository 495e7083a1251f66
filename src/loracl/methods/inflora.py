"""InfLoRA (Liang & Li, CVPR 2024; METHODS.md "inflora"), one PEFT adapter per task.

Per adapted layer keep an orthonormal basis M (n x k) of the input subspace of past tasks. For task i:
  - collect the layer inputs H_i of task i (forward hooks, non-padding tokens, float32; via their Gram);
  - A_i = top-r left singular vectors of (I - M M^T) H_i, as rows; A_i is frozen, B_i (init 0) is trained,
    so the new branch sees nothing of old tasks' inputs: B_i A_i x ~ 0 for x in span(M);
  - after the task, extend M with task i's inputs by GPM's energy rule (loracl.models.subspace.gpm_update).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.methods.context import TaskContext
from loracl.models.multi_lora import layer_map, task_adapter
from loracl.models.subspace import (
    GPM_THRESHOLD,
    GPM_THRESHOLD_STEP,
    basis_info,
    basis_nbytes,
    collect_input_grams,
    complement_directions,
    gpm_threshold,
    gpm_update,
    warn_few_free_directions,
)

from .base import MethodOptions, register
from .inc_lora import IncLoRA


class SubspaceOptions(MethodOptions):
    threshold: float = GPM_THRESHOLD  # GPM epsilon for task 1
    threshold_step: float = GPM_THRESHOLD_STEP  # its rise per task
    max_examples: int = 125  # training examples whose tokens give the input statistics (GPM: 125)


class InfLoRAOptions(SubspaceOptions):
    pass


@register
class InfLoRA(IncLoRA):
    name = "inflora"
    summary = "one LoRA per task; A_i designed in the complement of old tasks' input subspace and frozen"
    data_free = True
    memory_growth = "O(T): one LoRA per task, plus a per-layer input basis of at most n x n"
    Options = InfLoRAOptions
    options: InfLoRAOptions
    state_attributes = ("bases",)

    def __init__(self, options, lora) -> None:
        super().__init__(options, lora)
        self.bases: dict[str, torch.Tensor] = {}  # layer name -> M (n x k)

    def input_grams(self, model: PeftModel, ctx: TaskContext, adapter: str) -> dict[str, torch.Tensor]:
        layers = layer_map(model, adapter)
        batches = ctx.batches(self.options.max_examples)
        grams = collect_input_grams(model, layers, batches, context=lambda b: self.step_context(model, b))
        return ctx.all_reduce(grams)  # every process: the statistics of all batches, before any SVD

    @torch.no_grad()
    def design_branch(self, model: PeftModel, ctx: TaskContext) -> None:
        """A_i from the complement of M; B_i = 0; A_i frozen."""
        current = task_adapter(ctx.index)
        grams = self.input_grams(model, ctx, current)
        warn_few_free_directions(
            self.name, ctx.index, self.bases, self.lora.r,
            "A_i's remaining rows lie inside their span, so the new branch changes old tasks' outputs",
        )
        for name, layer in layer_map(model, current).items():
            A, B = layer.lora_A[current].weight, layer.lora_B[current].weight
            A.copy_(complement_directions(self.bases.get(name), grams[name], A.shape[0]).to(A))
            B.zero_()
            A.requires_grad_(False)

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.design_branch(model, ctx)

    def extend_bases(self, model: PeftModel, ctx: TaskContext) -> None:
        grams = self.input_grams(model, ctx, task_adapter(ctx.index))
        eps = gpm_threshold(ctx.index, self.options.threshold, self.options.threshold_step)
        for name, gram in grams.items():
            self.bases[name] = gpm_update(self.bases.get(name), gram, eps)

    def task_info(self) -> dict[str, Any]:
        return basis_info(self.bases)

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.extend_bases(model, ctx)

    def state_bytes(self) -> int:
        return basis_nbytes(self.bases)
