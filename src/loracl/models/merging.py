"""Task vectors of LoRA fine-tuning, the MagMax merge rule, and the way back from a dense delta to one LoRA.

Shared by every merging method (magmax, task_arithmetic, ties; METHODS.md, "magmax" and the merging
baselines). Per adapted layer, the task vector after task i is the dense update of the LoRA then,
τ_i = s · B_i · A_i (m × n). A merge rule turns τ_1..τ_i into one dense delta; a truncated SVD brings it back
to a LoRA of a chosen rank k with scaling 1 (B = U_k Σ_k, A = V_kᵀ, lora_alpha = r = k: the layout of PEFT's
`add_weighted_adapter(combination_type="svd")`), keeping the fraction Σ_{j≤k} σ_j² / Σ_j σ_j² of the
delta's energy, which runs report per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loracl.models.lora import LoraPair


def task_vector(pair: LoraPair, scaling: float) -> torch.Tensor:
    """The dense update s · B · A of one layer's LoRA (float32)."""
    return scaling * (pair.B.float() @ pair.A.float())


def max_magnitude(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """MagMax's rule: per entry, the value of largest magnitude among the tensors. On equal magnitudes the
    later tensor wins, as in the authors' implementation (later tasks were fine-tuned longer)."""
    merged = tensors[0]
    for tensor in tensors[1:]:
        merged = torch.where(tensor.abs() >= merged.abs(), tensor, merged)
    return merged


@dataclass
class Truncation:
    """A dense delta brought back to a LoRA (scaling 1) and what the truncation kept."""

    pair: LoraPair  # A: k × n, B: m × k, with B @ A the best rank-k approximation of the delta
    energy_kept: float  # Σ_{j≤k} σ_j² / Σ_j σ_j² (1.0 for a zero delta)
    dense_rank: int  # numerical rank of the delta before truncation


def truncate_to_lora(delta: torch.Tensor, rank: int) -> Truncation:
    """Best rank-`rank` approximation of `delta` (Eckart–Young) as LoRA factors with scaling 1.

    When the delta has fewer than `rank` singular values the extra rows of A / columns of B are zero, so
    the adapter keeps the requested rank whatever the delta."""
    delta = delta.float()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    A = delta.new_zeros(rank, delta.shape[1])
    B = delta.new_zeros(delta.shape[0], rank)
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k]
    squares = S.double() ** 2
    total = float(squares.sum())
    energy = 1.0 if total == 0 else float(squares[:k].sum()) / total
    tolerance = float(S.max()) * max(delta.shape) * torch.finfo(delta.dtype).eps if S.numel() else 0.0
    return Truncation(LoraPair(A, B), energy, int((tolerance < S).sum()))
