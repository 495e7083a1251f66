"""Task arithmetic (Ilharco et al., ICLR 2023), a merging baseline of MagMax (METHODS.md).

After task i the merged delta is λ Σ_{j≤i} τ_j over the sequentially fine-tuned task vectors, computed by
PEFT's `merge_utils.task_arithmetic` (the combination behind `add_weighted_adapter(combination_type="svd")`).
Task arithmetic adds full weights; the sum of i rank-r LoRA updates has rank up to i·r, so the merged delta
is kept at full rank, exactly, by default; `rank: k` truncates it by SVD to one LoRA (see merging_base;
METHODS.md). λ defaults to 1/i, the mean of the task vectors, as in the MagMax authors' baseline
(1 / number of tasks).
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from .base import register
from .merging_base import MergingMethod
from .options import TaskArithmeticOptions  # torch-free, so that `loracl methods` can list them


@register
class TaskArithmetic(MergingMethod):
    name = "task_arithmetic"
    summary = (
        "sequential LoRA fine-tuning; task vectors summed with weight λ (default: their mean); full rank (or "
        "SVD to rank k)"
    )
    Options = TaskArithmeticOptions
    options: TaskArithmeticOptions

    def weight(self, count: int) -> float:
        return self.options.scale if self.options.scale is not None else 1.0 / count

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.full((len(deltas),), self.weight(len(deltas)), device=deltas[0].device)
        return merge_utils.task_arithmetic(deltas, weights)
