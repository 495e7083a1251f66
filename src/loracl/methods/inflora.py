"""InfLoRA (Liang & Li, CVPR 2024; METHODS.md "inflora"), one PEFT adapter per task, as the authors' LLM code
(liangyanshuo/gainlora, `cl_trainer_inflora.py`, `cl_trainer_gainlora_inflora.py`) computes it.

Per adapted layer keep an orthonormal basis M (n x k) of the input subspace of past tasks. For task i:
  - collect the input covariance C_i of the layer over task i's training tokens (forward hooks, non-padding
    tokens, float32; as the Gram N C_i, which has the same singular vectors and energy ratios);
  - A_i = top-r left singular vectors of C_i - M M^T C_i, as rows, scaled by 1/sqrt(3) (the authors'
    scale, `a_scale`); A_i is frozen and B_i (init 0) trained, so the new branch sees little of old tasks'
    inputs: B_i A_i x ~ 0 for x in span(M);
  - after the task, extend M with the DualGPM rule (loracl.models.subspace.dual_gpm_update): energies S^2
    of C_i, threshold 0.995 rising to 1 over 15 tasks. (GPM's own rule, sigma^2 of the inputs with
    threshold 0.97, kept 80-279 of 576 directions per layer of SmolLM2 after one task where this one keeps
    0-12, and filled the input space within a Long sequence.)
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.methods.context import TaskContext
from loracl.models.multi_lora import layer_map, task_adapter
from loracl.models.subspace import (
    basis_info,
    basis_nbytes,
    collect_input_grams,
    complement_directions,
    warn_few_free_directions,
)

from .base import register
from .inc_lora import IncLoRA
from .options import InfLoRAOptions  # torch-free, so that `loracl methods` can list them


@register
class InfLoRA(IncLoRA):
    name = "inflora"
    summary = "one LoRA per task; A_i designed in the complement of old tasks' input subspace and frozen"
    data_free = True
    memory_growth = "O(T): one LoRA per task, plus a per-layer input basis of at most n x n"
    Options = InfLoRAOptions
    options: InfLoRAOptions
    state_attributes = ("bases",)
    init_adapter_obstacle = "its basis of old tasks' inputs, which designs the next A, needs task 0's inputs"

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
        """A_i from the complement of M, rows of norm a_scale; B_i = 0; A_i frozen."""
        current = task_adapter(ctx.index)
        grams = self.input_grams(model, ctx, current)
        warn_few_free_directions(
            self.name,
            ctx.index,
            self.bases,
            self.lora.r,
            "A_i's remaining rows lie inside their span, so the new branch changes old tasks' outputs",
            f"raise threshold_tasks, e.g. --methods {self.name}:threshold_tasks=30",
        )
        for name, layer in layer_map(model, current).items():
            A, B = layer.lora_A[current].weight, layer.lora_B[current].weight
            rows = complement_directions(self.bases.get(name), grams[name], A.shape[0])
            A.copy_((self.options.a_scale * rows).to(A))
            B.zero_()
            A.requires_grad_(False)

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.design_branch(model, ctx)

    def extend_bases(self, model: PeftModel, ctx: TaskContext) -> None:
        grams = self.input_grams(model, ctx, task_adapter(ctx.index))
        self.options.basis_rule().update_all(self.bases, grams, ctx.index)

    def task_info(self) -> dict[str, Any]:
        return basis_info(self.bases)

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.extend_bases(model, ctx)

    def state_bytes(self) -> int:
        return basis_nbytes(self.bases)
