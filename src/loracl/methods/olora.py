"""O-LoRA (Wang et al. 2023; METHODS.md "olora"): IncLoRA plus, while training task i,

    L = L_task + lambda1 * sum_layers sum_{j<i} sum |A_j A_i^T|  +  lambda2 * ||A_i, B_i||^2

(entrywise L1 of the r x r products: orthogonality acts on A, the down-projection; the last term is the
squared Frobenius norm of the current factors). Defaults lambda1 = 0.5, lambda2 = 0.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from loracl.models.lora import lora_layers
from loracl.models.multi_lora import task_adapters

from .base import register
from .inc_lora import IncLoRA
from .options import OLoRAOptions  # torch-free, so that `loracl methods` can list them


def orthogonality_penalty(model: torch.nn.Module, current: str, old: list[str]) -> torch.Tensor:
    """sum over layers and old adapters j of sum |A_j A_current^T|."""
    terms = []
    for _, layer in lora_layers(model, current):
        A_i = layer.lora_A[current].weight
        for name in old:
            terms.append((layer.lora_A[name].weight @ A_i.T).abs().sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l2_penalty(model: torch.nn.Module, current: str) -> torch.Tensor:
    """||A_i||_F^2 + ||B_i||_F^2 summed over layers."""
    terms = []
    for _, layer in lora_layers(model, current):
        terms.append(layer.lora_A[current].weight.pow(2).sum() + layer.lora_B[current].weight.pow(2).sum())
    return torch.stack(terms).sum()


def olora_loss(model: PeftModel, lambda1: float, lambda2: float) -> torch.Tensor | None:
    """The O-LoRA regulariser for the last (current) task adapter; None when it is identically 0."""
    *old, current = task_adapters(model)
    loss = None
    if lambda1 and old:
        loss = lambda1 * orthogonality_penalty(model, current, old)
    if lambda2:
        l2 = lambda2 * l2_penalty(model, current)
        loss = l2 if loss is None else loss + l2
    return loss


@register
class OLoRA(IncLoRA):
    name = "olora"
    summary = "IncLoRA + L1 penalty on A_j A_i^T keeping each new LoRA's A orthogonal to the old ones"
    data_free = True
    memory_growth = "O(T): one LoRA per task"
    Options = OLoRAOptions
    options: OLoRAOptions

    def extra_loss(self, model: PeftModel, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        return olora_loss(model, self.options.lambda1, self.options.lambda2)
