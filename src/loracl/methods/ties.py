"""TIES-merging (Yadav et al., NeurIPS 2023), a merging baseline of MagMax (METHODS.md).

After task i, per adapted layer: trim each task vector to its `density` largest-magnitude entries, elect
each entry's sign by total mass, average the entries that agree with it (disjoint mean) and scale by λ.
The combination is PEFT's `merge_utils.ties` (the one behind `add_weighted_adapter(combination_type=
"ties_svd")`), applied to the dense task vectors τ_j = s B_j A_j of sequential fine-tuning. As TIES
merges full weights, the merged delta (trimmed and sign-resolved, hence in general of full rank) is kept at
full rank, exactly, by default; `rank: k` truncates it by SVD to one LoRA (see merging_base; METHODS.md).
Defaults are the MagMax authors' TIES baseline: top 20 %, sign by mass, λ = 0.55. Differences from
upstream: trimming is per layer (PEFT's), not over the whole flattened model; it keeps int(density · numel)
entries (PEFT's top-k), where upstream's k-th-value threshold keeps one more (and any ties at it); an
entry whose kept values sum to exactly 0 takes sign + (PEFT's), not the majority of all elected signs.
"""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from .base import register
from .merging_base import MergingMethod
from .options import TiesOptions  # torch-free, so that `loracl methods` can list them


@register
class Ties(MergingMethod):
    name = "ties"
    summary = "sequential LoRA fine-tuning; TIES merge (trim, elect sign, disjoint mean); full rank (or SVD)"
    Options = TiesOptions
    options: TiesOptions

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        weights = torch.full((len(deltas),), self.options.scale, device=deltas[0].device)
        return merge_utils.ties(deltas, weights, self.options.density, self.options.majority_sign)
