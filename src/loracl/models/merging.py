"""Task vectors of LoRA fine-tuning, the MagMax merge rule, and the way from a dense delta to LoRA factors.

Shared by every merging method (magmax, task_arithmetic, ties; METHODS.md, "magmax" and the merging
baselines). Per adapted layer, the task vector after task i is the dense update of the LoRA then,
τ_i = s · B_i · A_i (m × n). A merge rule turns τ_1..τ_i into one dense delta ΔW, which is in general of
full rank (a per-entry selection such as MagMax's, or TIES's trimming, does not keep a low rank; a sum of i
rank-r updates has rank up to i·r). The authors of these methods merge full weights, so the merged ΔW must
reach the model exactly: `truncate_to_lora` writes it as LoRA factors with scaling 1 through its SVD,
B = U_k Σ_k, A = V_kᵀ (lora_alpha = r: the layout of PEFT's `add_weighted_adapter(combination_type="svd")`),
with every singular direction kept (k = min(m, n), B · A = ΔW up to float rounding) unless a rank k is
asked for, which gives the best rank-k approximation (Eckart–Young) and keeps the fraction
Σ_{j≤k} σ_j² / Σ_j σ_j² of the delta's energy, which runs report per layer.
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
    """A dense delta as LoRA factors (scaling 1) and how much of it they keep."""

    pair: LoraPair  # A: r × n, B: m × r, with B @ A the delta itself or its best rank-k approximation
    energy_kept: float  # Σ_{j≤k} σ_j² / Σ_j σ_j²: 1.0 when every direction is kept (and for a zero delta)
    dense_rank: int  # numerical rank of the delta
    kept_rank: int  # k: singular directions kept, min(m, n) when exact


def truncate_to_lora(delta: torch.Tensor, rank: int | None = None, width: int | None = None) -> Truncation:
    """`delta` as LoRA factors with scaling 1 through its SVD (B = U Σ, A = Vᵀ).

    rank None keeps every singular direction: B @ A is the delta (up to float rounding). A rank k keeps the
    k largest, the best rank-k approximation (Eckart–Young). The factors have `width` rows of A / columns
    of B (default: k, or min(m, n) at full rank); those beyond the kept directions are zero, so one adapter
    rank can serve layers of different shapes, or a delta of lower rank than asked."""
    delta = delta.float()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = S.numel() if rank is None else min(rank, S.numel())
    width = width if width is not None else (S.numel() if rank is None else rank)
    if width < k:
        raise ValueError(f"LoRA factors of width {width} cannot hold {k} singular directions")
    A = delta.new_zeros(width, delta.shape[1])
    B = delta.new_zeros(delta.shape[0], width)
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k]
    squares = S.double() ** 2
    total = float(squares.sum())
    energy = 1.0 if total == 0 or k == S.numel() else float(squares[:k].sum()) / total
    tolerance = float(S.max()) * max(delta.shape) * torch.finfo(delta.dtype).eps if S.numel() else 0.0
    return Truncation(LoraPair(A, B), energy, int((tolerance < S).sum()), k)
