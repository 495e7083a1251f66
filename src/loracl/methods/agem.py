"""A-GEM, averaged gradient episodic memory (Chaudhry et al., ICLR 2019; METHODS.md, "agem"): not data-free.

One LoRA, trained task after task. At each optimizer step the gradient g of the task loss is compared with
the reference gradient g_ref of the loss on a batch drawn from a reservoir memory of past tasks' examples;
when they conflict (g . g_ref < 0), g is projected onto the half-space where it does not increase that loss:
    g <- g - (g . g_ref / g_ref . g_ref) g_ref,
so the step's first-order effect on the memory loss is never an increase.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.engine.training import answer_loss, collate
from loracl.methods.context import TaskContext

from .base import register
from .episodic import EpisodicMemoryMethod


def agem_project(grad: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A-GEM's projection of a flat gradient; returns (gradient to use, whether it was projected)."""
    dot = torch.dot(grad, reference)
    norm = torch.dot(reference, reference)
    if dot >= 0 or norm == 0:
        return grad, False
    return grad - (dot / norm) * reference, True


@register
class AGEM(EpisodicMemoryMethod):
    name = "agem"
    summary = (
        "one LoRA; gradient projected when it conflicts with the gradient on a memory batch of past tasks "
        "(not data-free)"
    )

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        super().before_task(model, ctx)
        self.steps = self.projected = 0

    def reference_gradient(self, model: PeftModel, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """Flat gradient of the answer loss on a memory batch (None while the memory is empty)."""
        drawn = self.draw()
        if not drawn:
            return None
        loss = answer_loss(model, collate(drawn, self.pad_id, self.device))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([flat(g, p) for g, p in zip(grads, params, strict=True)])

    def before_optimizer_step(self, model: PeftModel) -> None:
        self.steps += 1
        params = self.trainable_parameters(model)
        reference = self.reference_gradient(model, params)
        if reference is None:
            return
        grad = torch.cat([flat(p.grad, p) for p in params])
        projected, changed = agem_project(grad, reference)
        if not changed:
            return
        self.projected += 1
        offset = 0
        for p in params:
            p.grad = projected[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def task_info(self) -> dict[str, Any]:
        return {**super().task_info(), "optimizer_steps": self.steps, "projected_steps": self.projected}


def flat(grad: torch.Tensor | None, param: torch.nn.Parameter) -> torch.Tensor:
    """A gradient as a float32 vector; a parameter the loss does not reach has a zero gradient."""
    if grad is None:
        return torch.zeros(param.numel(), device=param.device)
    return grad.detach().reshape(-1).float()
