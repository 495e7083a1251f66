"""MagMax (Marczak et al., ECCV 2024; METHODS.md, "magmax"): sequential fine-tuning + max-magnitude merge.

After task i, per adapted layer and per entry, the merged delta takes the task vector entry of largest
magnitude among τ_1..τ_i (τ_j = the sequentially fine-tuned LoRA's s B_j A_j after task j), scaled by λ
(0.5, the authors' setting). The merged delta is truncated back to one LoRA (see merging_base).
"""

from __future__ import annotations

import torch
from pydantic import Field

from loracl.models.merging import max_magnitude

from .base import register
from .merging_base import MergingMethod, MergingOptions


class MagMaxOptions(MergingOptions):
    scale: float = Field(0.5, gt=0, description="λ applied to the merged task vector (authors' 0.5)")


@register
class MagMax(MergingMethod):
    name = "magmax"
    summary = (
        "sequential LoRA fine-tuning; per entry the task-vector value of largest magnitude, SVD to a LoRA"
    )
    Options = MagMaxOptions
    options: MagMaxOptions

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        return self.options.scale * max_magnitude(deltas)
