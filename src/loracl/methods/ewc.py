"""EWC, elastic weight consolidation (Kirkpatrick et al. 2017; METHODS.md, "ewc") on one LoRA.

After each task, the diagonal Fisher of the LoRA parameters is estimated as the mean over a bounded sample of
the task's training examples of the squared gradient of each example's log-likelihood (the sum of its answer
tokens' log-probabilities). Fishers are accumulated over tasks (F <- F + F_i) and the anchor θ* is the
parameters after the latest task. While later tasks train, the loss gets the penalty
    (λ / 2) Σ F (θ − θ*)²   over the LoRA parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel

from loracl.engine import distributed
from loracl.engine.training import answer_loss, target_mask
from loracl.methods.context import TaskContext

from ..config import LoraSection
from .base import ContinualMethod, register
from .options import EWCOptions  # torch-free, so that `loracl methods` can list them


def example_log_likelihood(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(answer | prompt) of a one-example batch: minus the summed cross-entropy of its answer tokens."""
    tokens = target_mask(batch).sum()
    return -answer_loss(model, batch) * tokens


def squared_gradient_sums(
    model: torch.nn.Module, named_params: dict[str, torch.nn.Parameter], batches
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over one-example batches of the squared log-likelihood gradient, per parameter entry; and the
    number of examples. A padding batch (`distributed.padding_pass()`) runs forward and backward, as the
    other processes do at that time, and counts for nothing."""
    params = list(named_params.values())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named_params.items()}
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(example_log_likelihood(model, batch), params, allow_unused=True)
        if distributed.padding_pass():
            continue
        for name, grad in zip(named_params, grads, strict=True):
            if grad is not None:
                fisher[name] += grad.detach().float() ** 2
        count += 1
    return fisher, count


def diagonal_fisher(
    model: torch.nn.Module,
    named_params: dict[str, torch.nn.Parameter],
    batches,
    ctx: TaskContext | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean over one-example batches of the squared log-likelihood gradient, per parameter entry. With `ctx`
    the sums and counts of every process's share of the batches are added up first."""
    sums, count = squared_gradient_sums(model, named_params, batches)
    if ctx is not None:
        sums, count = ctx.all_reduce(sums), ctx.all_reduce_count(count)
    return {name: f / max(count, 1) for name, f in sums.items()}, count


def ewc_penalty(
    params: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """(λ / 2) Σ F (θ − θ*)², summed over every entry of every parameter."""
    terms = [(fisher[n] * (p.float() - anchor[n]) ** 2).sum() for n, p in params.items()]
    return 0.5 * lam * torch.stack(terms).sum()


@register
class EWC(ContinualMethod):
    name = "ewc"
    summary = "one LoRA; quadratic penalty (λ/2) Σ F (θ − θ*)² with a diagonal Fisher accumulated over tasks"
    data_free = True  # keeps Fisher and anchor tensors, no examples
    memory_growth = "constant (one LoRA + its Fisher diagonal and anchor)"
    Options = EWCOptions
    options: EWCOptions
    state_attributes = ("fisher", "anchor", "info")  # `params` are live parameters, found by before_task
    init_adapter_obstacle = "its Fisher information after task 0 is computed on task 0's data"

    def __init__(self, options: EWCOptions, lora: LoraSection) -> None:
        super().__init__(options, lora)
        self.params: dict[str, torch.nn.Parameter] = {}  # the live LoRA parameters, by name
        self.fisher: dict[str, torch.Tensor] = {}  # Σ_i F_i
        self.anchor: dict[str, torch.Tensor] = {}  # θ* after the latest task
        self.info: dict[str, Any] = {}

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def extra_loss(self, model: PeftModel, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if not self.fisher:
            return None  # task 1: nothing to protect yet
        return ewc_penalty(self.params, self.fisher, self.anchor, self.options.lam)

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        batches = ctx.batches(self.options.fisher_samples, batch_size=1)  # one example: its own gradient
        task_fisher, count = diagonal_fisher(model, self.params, batches, ctx)
        for name, f in task_fisher.items():
            self.fisher[name] = self.fisher[name] + f if name in self.fisher else f
        self.anchor = {n: p.detach().float().clone() for n, p in self.params.items()}
        values = torch.cat([f.reshape(-1) for f in task_fisher.values()])
        total = torch.cat([f.reshape(-1) for f in self.fisher.values()])
        self.info = {
            "fisher_examples": count,
            "task_fisher_mean": float(values.mean()),
            "task_fisher_max": float(values.max()),
            "accumulated_fisher_mean": float(total.mean()),
        }

    def task_info(self) -> dict[str, Any]:
        return dict(self.info)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.fisher, self.anchor) for t in d.values())
