"""SLAO: a single LoRA continually merged (METHODS.md, "SLAO").

Per adapted layer, for task i >= 2:
  init   Q R = A_ft,i-1^T (reduced QR), Q <- Q diag(sign(diag R)), A_init = Q^T, B_init = B_ft,i-1
  merge  A_m,i = A_ft,i;  B_m,i = B_m,i-1 + lambda(i) (B_ft,i - B_m,i-1),  lambda(i) = 1 / sqrt(i)
The model after task i is W0 + s B_m,i A_m,i: one ordinary LoRA, whatever T.
Ablation options (init, merge, schedule, freeze) are those the paper reports. `rebase_b` is not in the
paper: it expresses B in the new basis (B C, C = A A_init^T) so that the init leaves B A unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from peft import PeftModel

from loracl.methods.context import TaskContext
from loracl.models.lora import (
    LoraPair,
    LoraState,
    get_lora_state,
    reset_lora,
    save_adapter,
    set_lora_state,
    set_trainable,
)
from loracl.models.lora import state_nbytes as lora_state_nbytes

from .base import ContinualMethod, register
from .options import SLAOOptions  # torch-free, so that `loracl methods` can list them


def orthonormal_row_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of A (r x n), via reduced QR of A^T with a sign fix.

    The sign fix makes diag(R) >= 0 so the basis is unique and each row of the result stays on the same side
    as the corresponding row of A (sign(0) counts as +1)."""
    Q, R = torch.linalg.qr(A.T.double(), mode="reduced")  # Q: n x r
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1.0
    return (Q * signs).T.to(A.dtype)


def orthogonal_init(
    source: LoraState, row_basis: Callable[[torch.Tensor], torch.Tensor] = orthonormal_row_basis
) -> LoraState:
    """SLAO's init for the next task: per layer A_init = an orthonormal basis of the rows of source A,
    B_init = a copy of source B. `row_basis` is a parameter so that other bases (e.g. a randomised SVD) can
    be compared on the same code path (benchmarks/slao_overhead.py)."""
    return {name: LoraPair(row_basis(p.A), p.B.clone()) for name, p in source.items()}


def basis_coefficients(A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """C (r x r) with A = C basis, for `basis` with orthonormal rows spanning A's rows: C = A basis^T.
    Then (B C) basis = B A: the same update, with B expressed in the new basis."""
    return A @ basis.T


def merge_weight(task_index: int, schedule: str, constant: float = 0.5) -> float:
    """lambda(i): 1/sqrt(i) (paper), 1/i (running mean) or a constant; lambda(1) = 1 (nothing to merge)."""
    if task_index == 1:
        return 1.0
    if schedule == "inv_sqrt":
        return 1.0 / math.sqrt(task_index)
    if schedule == "inv":
        return 1.0 / task_index
    return constant


def interpolate(previous: torch.Tensor, finetuned: torch.Tensor, weight: float) -> torch.Tensor:
    """previous + weight (finetuned - previous): the time-aware merge of METHODS.md."""
    return previous + weight * (finetuned - previous)


@register
class SLAO(ContinualMethod):
    name = "slao"
    summary = (
        "single LoRA: orthogonal init of A from the previous A, time-aware 1/sqrt(i) merge of B (headline)"
    )
    data_free = True
    memory_growth = "constant (one LoRA + the previous fine-tuned and merged factors)"
    Options = SLAOOptions
    options: SLAOOptions
    state_attributes = ("finetuned", "merged")
    init_adapter_obstacle = None  # its state after a task is that task's factors alone (`adopt`)

    def __init__(self, options: SLAOOptions, lora) -> None:
        super().__init__(options, lora)
        self.finetuned: LoraState = {}  # A_ft,i-1 / B_ft,i-1
        self.merged: LoraState = {}  # A_m,i-1 / B_m,i-1
        self.rebase: dict[str, torch.Tensor] = {}  # `rebase_b`: the current task's C per layer

    def initial_state(self, task_index: int) -> LoraState | None:
        """The (A_init, B_init) of task i; None means PEFT's own init (A random, B = 0). With `rebase_b` it
        also records each layer's C, which the merge after task i applies to B_m,i-1."""
        if task_index == 1 or self.options.init == "random":
            return None
        source = self.finetuned if self.options.init == "last_ft" else self.merged
        init = orthogonal_init(source)
        if not self.options.rebase_b:
            return init
        # merge B / none keep A_m = A_ft, so last_ft and last_merge share A and one C serves B_ft and B_m
        self.rebase = {name: basis_coefficients(source[name].A, p.A) for name, p in init.items()}
        return {name: LoraPair(p.A, source[name].B @ self.rebase[name]) for name, p in init.items()}

    def merge(self, task_index: int, finetuned: LoraState) -> LoraState:
        """The merged factors after task i from the fine-tuned ones and the previous merge."""
        if task_index == 1:
            return {name: LoraPair(p.A.clone(), p.B.clone()) for name, p in finetuned.items()}
        weight = merge_weight(task_index, self.options.schedule, self.options.constant)
        merge_A = self.options.merge in ("A", "A_and_B")
        merge_B = self.options.merge in ("B", "A_and_B")
        merged = {}
        for name, ft in finetuned.items():
            prev = self.merged[name]
            if self.options.rebase_b:  # B_m,i-1 in the basis task i trained in
                prev = LoraPair(prev.A, prev.B @ self.rebase[name])
            A = interpolate(prev.A, ft.A, weight) if merge_A else ft.A.clone()
            B = interpolate(prev.B, ft.B, weight) if merge_B else ft.B.clone()
            merged[name] = LoraPair(A, B)
        return merged

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        init = self.initial_state(ctx.index)
        if init is None:
            reset_lora(model)
        else:
            set_lora_state(model, init)
        freeze = self.options.freeze if ctx.index > 1 else "none"  # task 1 is plain LoRA
        set_trainable(model, A=freeze != "A", B=freeze != "B")

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        save_adapter(model, ctx.task_dir / "adapter_ft")
        self.conclude(model, ctx.index, get_lora_state(model))
        save_adapter(model, ctx.task_dir / "adapter_merged")

    def conclude(self, model: PeftModel, task_index: int, finetuned: LoraState) -> None:
        """What after_task keeps of task i: A_ft,i / B_ft,i, the merge B_m,i (METHODS.md), and the model set
        to W0 + s B_m,i A_m,i for evaluation and export."""
        self.finetuned = finetuned
        self.merged = self.merge(task_index, finetuned)
        set_lora_state(model, self.merged)

    def adopt(self, model: PeftModel, state: LoraState) -> None:
        """The adapter as task 1's fine-tuned A_ft,1 / B_ft,1, merged as after task 1 (METHODS.md, SLAO:
        A_m1 = A_ft1, B_m1 = B_ft1): the next task is i = 2, initialised from the orthonormal basis of the
        adopted A's rows and the adopted B, and merged with λ(2)."""
        self.conclude(model, 1, state)

    def state_bytes(self) -> int:
        return lora_state_nbytes(self.finetuned) + lora_state_nbytes(self.merged)
