"""Input-subspace statistics shared by GPM, InfLoRA and GainLoRA (METHODS.md, "gpm" and "inflora").

Per adapted layer the methods need the span of the layer's inputs x (n-dim) over a task's examples. Instead of
the n x N matrix R = [x_1 ... x_N] of every non-padding token, we accumulate its Gram matrix G = R R^T (n x n,
float32, on the model's device): the left singular vectors of R are the eigenvectors of G and the squared
singular values its eigenvalues, so the GPM energy criterion and InfLoRA's SVD are exact in terms of G while
memory stays bounded whatever the number of tokens. The residual of GPM, R^ = (I - M M^T) R, has Gram
P G P with P = I - M M^T.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

Batch = dict[str, torch.Tensor]
ContextFactory = Callable[[Batch], AbstractContextManager]

GPM_THRESHOLD = 0.97  # epsilon of GPM for task 1 (METHODS.md)
GPM_THRESHOLD_STEP = 0.003  # rise per task


def gpm_threshold(task_index: int, base: float = GPM_THRESHOLD, step: float = GPM_THRESHOLD_STEP) -> float:
    """epsilon_i = base + step (i - 1), capped at 1 (task_index is 1-based)."""
    return min(1.0, base + step * (task_index - 1))


def _decoder_call(model: torch.nn.Module, batch: Batch) -> None:
    """A forward pass of the transformer body only (the LM head is irrelevant to layer inputs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    target = decoder if decoder is not None else model
    target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@torch.no_grad()
def collect_input_grams(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Module],
    batches: Iterable[Batch],
    context: ContextFactory | None = None,
) -> dict[str, torch.Tensor]:
    """G = sum over non-padding tokens of x x^T for the input x of every module in `layers`.

    Forward hooks read each module's first positional input; only positions where attention_mask is 1 are
    kept; accumulation is in float32 on the model's device. `context(batch)` is entered around each forward
    (e.g. to give a gating module the batch's prompt mask)."""
    grams: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, args, _output):
            x = args[0]
            rows = x[mask_holder["mask"]].float().reshape(-1, x.shape[-1])
            gram = rows.T @ rows
            grams[name] = gram if name not in grams else grams[name] + gram

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask_holder["mask"] = batch["attention_mask"].bool()
            with context(batch) if context else contextlib.nullcontext():
                _decoder_call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    device = next(model.parameters()).device
    for name, module in layers.items():  # no batch reached it (e.g. a process with an empty share): G = 0
        if name not in grams:
            grams[name] = torch.zeros(module.in_features, module.in_features, device=device)
    return grams


def basis_info(bases: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How much of the input space the bases protect after a task (results.json `method_info`).
    `input_dim` is the largest layer input size; a layer is full when its basis spans its own input space."""
    if not bases:
        return {}
    dims = [M.shape[1] for M in bases.values()]
    return {
        "basis_dims_mean": round(sum(dims) / len(dims), 1),
        "input_dim": max(M.shape[0] for M in bases.values()),
        "layers_full": sum(M.shape[1] >= M.shape[0] for M in bases.values()),
    }


def warn_few_free_directions(
    method: str, task_index: int, bases: dict[str, torch.Tensor], needed: int, consequence: str
) -> None:
    """Warn when old tasks' bases leave fewer than `needed` free input directions in some layer.

    The threshold rises by `threshold_step` per task and is capped at 1; at 1 (task 11 with the defaults)
    the energy rule keeps every direction with any energy, so on a small model (n = 576 for SmolLM2-135M)
    the bases fill the whole input space within a 15-task sequence."""
    short = sum(M.shape[0] - M.shape[1] < needed for M in bases.values())
    if short:
        warnings.warn(
            f"{method}, task {task_index}: in {short} of {len(bases)} layers the old tasks' input basis "
            f"leaves fewer than {needed} free direction(s): {consequence}. For long task sequences lower "
            f"the threshold's rise, e.g. --methods {method}:threshold_step=0.001",
            stacklevel=2,
        )


def vector_gram(vectors: torch.Tensor) -> torch.Tensor:
    """Gram matrix of row vectors (N x n) -> n x n, in their dtype (for inputs that are not layer inputs)."""
    return vectors.T @ vectors


def _complement(basis: torch.Tensor | None, n: int, device, dtype=torch.float64) -> torch.Tensor:
    """P = I - M M^T (identity when there is no basis yet)."""
    eye = torch.eye(n, device=device, dtype=dtype)
    return eye if basis is None else eye - basis.to(dtype) @ basis.to(dtype).T


def _eigh_desc(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(sym)
    return values.flip(0).clamp(min=0), vectors.flip(1)


def gpm_update(basis: torch.Tensor | None, gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM's basis update (Saha et al. 2021; METHODS.md "gpm").

    With total energy ||R||_F^2 = tr(G) and the part M already explains ||M^T R||_F^2 = tr(M^T G M), add the
    fewest top eigenvectors of the residual Gram P G P whose energy brings the captured fraction up to
    `threshold`. Returns the new orthonormal basis (n x k) in the Gram's dtype and device."""
    n = gram.shape[0]
    G = gram.double()
    P = _complement(basis, n, G.device)
    total = torch.trace(G)
    if total <= 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    captured = total - torch.trace(P @ G @ P)  # = tr(M^T G M)
    values, vectors = _eigh_desc(P @ G @ P)
    needed = threshold * total - captured
    if needed <= 0:
        k = 0
    else:
        cumulative = torch.cumsum(values, 0)
        k = int((cumulative < needed).sum().item()) + 1
        k = min(k, int((values > values[0] * 1e-10).sum().item()) if values[0] > 0 else 0)
    if k == 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    new = P @ vectors[:, :k]  # exactly orthogonal to M, then re-orthonormalised
    stacked = new if basis is None else torch.cat([basis.double(), new], dim=1)
    q, _ = torch.linalg.qr(stacked)
    return q.to(gram.dtype)


def complement_directions(basis: torch.Tensor | None, gram: torch.Tensor, k: int) -> torch.Tensor:
    """InfLoRA's design of A (METHODS.md "inflora"): the top-k left singular vectors of (I - M M^T) H, i.e.
    the top-k eigenvectors of P G P, as rows (k x n, orthonormal, orthogonal to M).

    A tiny multiple of P is added before the eigen-decomposition so that, should the residual have rank < k,
    the remaining rows are still taken inside the complement of M rather than inside span(M)."""
    n = gram.shape[0]
    G = gram.double()
    P = _complement(basis, n, G.device)
    residual = P @ G @ P
    scale = torch.trace(residual).clamp(min=1e-30) / n
    _, vectors = _eigh_desc(residual + 1e-9 * scale * P)
    rows = (P @ vectors[:, :k]).T
    q, r = torch.linalg.qr(rows.T)  # keep them exactly orthonormal; sign-fix so rows follow the eigvectors
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.float()


def project_off(tensor: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """X - X M M^T: removes from each row of X (... x n) its component in span(M) (GPM's projection)."""
    if basis is None or basis.shape[1] == 0:
        return tensor
    M = basis.to(tensor.dtype)
    return tensor - (tensor @ M) @ M.T


def basis_nbytes(bases: dict[str, torch.Tensor]) -> int:
    return sum(b.numel() * b.element_size() for b in bases.values())
