"""MagMax (Marczak et al., ECCV 2024; METHODS.md, "magmax"): sequential fine-tuning + max-magnitude merge.

After task i, per adapted layer and per entry, the merged delta takes the task vector entry of largest
magnitude among τ_1..τ_i (τ_j = the sequentially fine-tuned LoRA's s B_j A_j after task j; on equal
magnitudes the later task), scaled by λ (0.5, the authors' setting): the model is W_0 + λ·maxmag(τ_1..τ_i).
The authors do this on full weights (τ_j = θ_j − θ_0 of sequential fine-tuning) and a per-entry selection
is in general of full rank, so the merged delta is kept at full rank, exactly, by default; `rank: k`
truncates it by SVD to one rank-k LoRA and reports the energy kept (see merging_base; METHODS.md).
"""

from __future__ import annotations

import torch

from loracl.models.merging import max_magnitude

from .base import register
from .merging_base import MergingMethod
from .options import MagMaxOptions  # torch-free, so that `loracl methods` can list them


@register
class MagMax(MergingMethod):
    name = "magmax"
    summary = (
        "sequential LoRA fine-tuning; per entry the task-vector value of largest magnitude; full rank (or "
        "SVD to rank k)"
    )
    Options = MagMaxOptions
    options: MagMaxOptions

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        return self.options.scale * max_magnitude(deltas)
