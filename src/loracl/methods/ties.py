"""TIES-merging (Yadav et al., NeurIPS 2023), a merging baseline of MagMax (METHODS.md).

After task i, per adapted layer: trim each task vector to its `density` largest-magnitude entries, elect
each entry's sign by total mass, average the entries that agree with it (disjoint mean) and scale by λ.
The combination is PEFT's `merge_utils.ties` (the one behind `add_weighted_adapter(combination_type=
"ties_svd")`), applied to the dense task vectors τ_j = s B_j A_j of sequential fine-tuning, then truncated
back to one LoRA (see merging_base). Defaults are the MagMax authors' TIES baseline: top 20 %, sign by
mass, λ = 0.55. Trimming is per layer (PEFT's), not over the whole flattened model as upstream.
"""

from __future__ import annotations

from typing import Literal

import torch
from peft.utils import merge_utils
from pydantic import Field

from .base import register
from .merging_base import MergingMethod, MergingOptions


class TiesOptions(MergingOptions):
    density: float = Field(0.2, gt=0, le=1, description="fraction of each task vector's entries kept")
    majority_sign: Literal["total", "frequency"] = Field(
        "total", description="sign election: by total mass (TIES) or by count"
    )
    scale: float = Field(0.55, gt=0, description="λ applied to the merged delta (MagMax authors' 0.55)")


@register
class Ties(MergingMethod):
    name = "ties"
    summary = "sequential LoRA fine-tuning; TIES merge (trim, elect sign, disjoint mean), SVD to a LoRA"
    Options = TiesOptions
    options: TiesOptions

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.full((len(deltas),), self.options.scale, device=deltas[0].device)
        return merge_utils.ties(deltas, weights, self.options.density, self.options.majority_sign)
