"""Input-subspace statistics and basis rules shared by GPM, InfLoRA and GainLoRA (METHODS.md, "gpm" and
"inflora").

Per adapted layer the methods need the span of the layer's inputs x (n-dim) over a task's examples. Instead of
the n x N matrix R = [x_1 ... x_N] of every non-padding token, we accumulate its Gram matrix G = R R^T (n x n,
float32, on the model's device); memory stays bounded whatever the number of tokens, and every rule below is
exact in terms of G:
- GPM's rule (Saha et al. 2021) ranks directions by the squared singular values of R, which are the
  eigenvalues of G; the residual R^ = (I - M M^T) R has Gram P G P with P = I - M M^T.
- The "DualGPM" rule of InfLoRA's and GainLoRA's code works on the input covariance C = G / N and ranks by
  the squared singular values of C (the 4th power of R's); the residual is C - M M^T C = P C. Every ratio
  and singular vector is the same for G as for C, so we use G directly.
A rule is chosen per method: `BasisRule` names it and its threshold schedule.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from loracl.engine import distributed
from loracl.engine.training import IGNORE, decoder_inputs, is_seq2seq_batch

Batch = dict[str, torch.Tensor]
ContextFactory = Callable[[Batch], AbstractContextManager]

GPM_THRESHOLD = 0.97  # epsilon of GPM for task 1 (METHODS.md "gpm")
GPM_THRESHOLD_STEP = 0.003  # its rise per task
DUAL_GPM_THRESHOLD = 0.995  # epsilon_0 of InfLoRA's and GainLoRA's DualGPM rule (METHODS.md "inflora")
DUAL_GPM_TASKS = 15  # T_s: the rise of epsilon reaches 1 after T_s tasks (the authors' `total_sessions`)


def gpm_threshold(task_index: int, base: float = GPM_THRESHOLD, step: float = GPM_THRESHOLD_STEP) -> float:
    """epsilon_i = base + step (i - 1), capped at 1 (task_index is 1-based)."""
    return min(1.0, base + step * (task_index - 1))


def dual_gpm_threshold(
    task_index: int, base: float = DUAL_GPM_THRESHOLD, tasks: int = DUAL_GPM_TASKS
) -> float:
    """epsilon_i = base + (1 - base)(i - 1) / T_s, uncapped as in the authors' code (past task T_s + 1 the
    rule keeps every direction the inputs have)."""
    return base + (1.0 - base) * (task_index - 1) / tasks


def _decoder_call(model: torch.nn.Module, batch: Batch) -> None:
    """A forward pass of the transformer body only (the LM head is irrelevant to layer inputs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    target = decoder if decoder is not None else model
    target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _seq2seq_targets(batch: Batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The decoder targets of a seq2seq batch for a statistics pass, and the token masks by sequence length:
    the encoder's attention mask, and the decoder's (its target positions). The targets get one more
    (masked) position when both sequences are as long, so that a layer input's length says which stack's
    tokens it holds (cross-attention keys and values read the encoder's outputs inside the decoder)."""
    labels = batch["labels"]
    if labels.shape[1] == batch["input_ids"].shape[1]:
        labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)
    encoder_mask = batch["attention_mask"].bool()
    return labels, {encoder_mask.shape[1]: encoder_mask, labels.shape[1]: labels != IGNORE}


def _seq2seq_call(model: torch.nn.Module, batch: Batch, labels: torch.Tensor) -> None:
    """An encoder-decoder's full forward, the decoder reading the targets shifted right as in training."""
    model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs(model, labels),
        use_cache=False,
    )


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
    (e.g. to give a gating module the batch's prompt mask). A padding batch (`distributed.padding_pass()`,
    see TaskContext.batches) runs forward like the others but adds nothing.

    An encoder-decoder (a seq2seq batch: loracl.engine.training.collate_seq2seq) runs whole, encoder and
    decoder, so the adapted layers of both stacks are reached: an input of the encoder's length (the
    encoder's layers, the decoder's cross-attention keys and values) keeps the encoder's non-padding
    tokens, an input of the decoder's length its target tokens."""
    grams: dict[str, torch.Tensor] = {}
    masks: dict[int, torch.Tensor] = {}  # sequence length -> the token mask of inputs of that length

    def make_hook(name: str):
        def hook(_module, args, _output):
            if distributed.padding_pass():
                return
            x = args[0]
            mask = masks.get(x.shape[-2]) if x.dim() >= 3 else None
            if mask is None:
                raise RuntimeError(f"{name}: input of shape {tuple(x.shape)} matches no token mask")
            rows = x[mask].float().reshape(-1, x.shape[-1])
            gram = rows.T @ rows
            grams[name] = gram if name not in grams else grams[name] + gram

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with context(batch) if context else contextlib.nullcontext():
                masks.clear()
                if is_seq2seq_batch(batch):
                    labels, by_length = _seq2seq_targets(batch)
                    masks.update(by_length)
                    _seq2seq_call(model, batch, labels)
                else:
                    masks[batch["attention_mask"].shape[1]] = batch["attention_mask"].bool()
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
    """How much of the input space the bases protect after a task (results.json `method_info`): the basis
    size of every layer, their spread, the largest layer input size, and how many layers are full (their
    basis spans their own input space, so nothing new can be learnt there without touching old tasks)."""
    if not bases:
        return {}
    dims = {name: M.shape[1] for name, M in bases.items()}
    return {
        "basis_dims_min": min(dims.values()),
        "basis_dims_mean": round(sum(dims.values()) / len(dims), 1),
        "basis_dims_max": max(dims.values()),
        "input_dim": max(M.shape[0] for M in bases.values()),
        "layers_full": sum(M.shape[1] >= M.shape[0] for M in bases.values()),
        "basis_dims_per_layer": dims,
    }


def warn_few_free_directions(
    method: str, task_index: int, bases: dict[str, torch.Tensor], needed: int, consequence: str, hint: str
) -> None:
    """Warn when old tasks' bases leave fewer than `needed` free input directions in some layer.

    Both rules' thresholds rise with the task index; near 1 the energy rule keeps every direction with any
    energy, so on a small model (n = 576 for SmolLM2-135M) the bases can fill the input space within a long
    sequence. `hint` names the option that slows the rise."""
    short = sum(M.shape[0] - M.shape[1] < needed for M in bases.values())
    if short:
        warnings.warn(
            f"{method}, task {task_index}: in {short} of {len(bases)} layers the old tasks' input basis "
            f"leaves fewer than {needed} free direction(s): {consequence}. For long task sequences {hint}",
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


def _numerical_rank(values: torch.Tensor) -> int:
    """Count of the non-negligible values of a descending spectrum (relative tolerance 1e-10)."""
    return int((values > values[0] * 1e-10).sum().item()) if values.numel() and values[0] > 0 else 0


def _first_task_count(ratios: torch.Tensor, threshold: float) -> int:
    """Directions of task 1, as both authors' codes count them: #{j : sum_{l<=j} ratio_l < threshold}."""
    return int((torch.cumsum(ratios, 0) < threshold).sum().item())


def _later_task_count(ratios: torch.Tensor, start: float, threshold: float) -> int:
    """Directions of a later task: starting from the fraction the basis already explains, append directions
    in order while the accumulated fraction is below the threshold (both codes' loop, vectorised)."""
    before_each = start + torch.cumsum(ratios, 0) - ratios  # the fraction accumulated before direction j
    return int((before_each < threshold).sum().item())


def _extend(basis: torch.Tensor | None, new: torch.Tensor, n: int) -> torch.Tensor:
    """[M, new], at most n columns, kept exactly orthonormal (QR, signs fixed so columns keep direction)."""
    stacked = new if basis is None else torch.cat([basis.double(), new], dim=1)
    q, r = torch.linalg.qr(stacked[:, :n])
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def gpm_update(basis: torch.Tensor | None, gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM's basis update (Saha et al. 2021, their `update_GPM`; METHODS.md "gpm"), from G = R R^T.

    Energies are the squared singular values of R (the eigenvalues of G). Task 1 (no basis yet) keeps
    #{j : cumulative fraction < threshold} top directions, possibly none; later tasks start from the fraction
    tr(M^T G M) / tr(G) that M explains and append top eigenvectors of the residual Gram P G P while the
    accumulated fraction is below the threshold. Returns the orthonormal basis (n x k) in G's dtype/device."""
    n = gram.shape[0]
    G = gram.double()
    total = torch.trace(G)
    if total <= 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    P = _complement(basis, n, G.device)
    values, vectors = _eigh_desc(P @ G @ P)
    if basis is None:
        k = _first_task_count(values / total, threshold)
    else:
        captured = (total - values.sum()) / total  # = tr(M^T G M) / tr(G)
        k = _later_task_count(values / total, float(captured), threshold)
    k = min(k, _numerical_rank(values))  # never directions of a zero residual (they are arbitrary)
    if k == 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    return _extend(basis, P @ vectors[:, :k], n).to(gram.dtype)


def dual_gpm_update(basis: torch.Tensor | None, gram: torch.Tensor, threshold: float) -> torch.Tensor:
    """The "DualGPM" basis update of InfLoRA's and GainLoRA's code (METHODS.md "inflora"), from G (= N C).

    Energies are the squared singular values S^2 of C. Task 1 keeps max(1, #{j : cumulative fraction <
    threshold}) top singular vectors of C. Later tasks: total = sum S(C)^2; S^ = singular values of the
    projected C - M M^T C; start from (total - sum S^2) / total and append its left singular vectors, in
    order, while the accumulated fraction is below the threshold; at most n columns. Directions of a zero
    singular value of the projected matrix are never appended (the SVD returns arbitrary ones there, possibly
    inside span(M)); the authors' code only reaches that case with a threshold above 1."""
    n = gram.shape[0]
    C = gram.double()
    energies = torch.linalg.svdvals(C) ** 2
    total = energies.sum()
    if total <= 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    projected = C if basis is None else _complement(basis, n, C.device) @ C
    U, S, _ = torch.linalg.svd(projected)
    if basis is None:
        k = max(1, _first_task_count(energies / total, threshold))
    else:
        start = (total - (S**2).sum()) / total
        k = _later_task_count(S**2 / total, float(start), threshold)
    k = min(k, _numerical_rank(S))
    if k == 0:
        return basis if basis is not None else gram.new_zeros(n, 0)
    return _extend(basis, U[:, :k], n).to(gram.dtype)


@dataclass(frozen=True)
class BasisRule:
    """Which energy rule extends a method's input bases, and its threshold schedule.

    kind "gpm": epsilon_i = threshold + step (i - 1), capped at 1, energies sigma^2 of the inputs (GPM).
    kind "dual_gpm": epsilon_i = threshold + (1 - threshold)(i - 1) / tasks, energies S^2 of the covariance
    (InfLoRA's and GainLoRA's code)."""

    kind: Literal["gpm", "dual_gpm"]
    threshold: float
    step: float = GPM_THRESHOLD_STEP  # gpm only
    tasks: int = DUAL_GPM_TASKS  # dual_gpm only

    def threshold_at(self, task_index: int) -> float:
        if self.kind == "gpm":
            return gpm_threshold(task_index, self.threshold, self.step)
        return dual_gpm_threshold(task_index, self.threshold, self.tasks)

    def update(self, basis: torch.Tensor | None, gram: torch.Tensor, task_index: int) -> torch.Tensor:
        """The basis after task `task_index` (1-based), from the old basis (None before task 1) and Gram."""
        update = gpm_update if self.kind == "gpm" else dual_gpm_update
        return update(basis, gram, self.threshold_at(task_index))

    def update_all(
        self, bases: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], task_index: int
    ) -> None:
        """Extend every basis in `bases` (in place) with its layer's Gram."""
        for name, gram in grams.items():
            bases[name] = self.update(bases.get(name), gram, task_index)


def complement_directions(basis: torch.Tensor | None, gram: torch.Tensor, k: int) -> torch.Tensor:
    """InfLoRA's design of A (METHODS.md "inflora"): the top-k left singular vectors of C - M M^T C = P C, as
    rows (k x n, orthonormal, orthogonal to M), from G = N C.

    They are the top eigenvectors of P G G P. A tiny multiple of P is added before the eigen-decomposition so
    that, should P G have rank < k, the remaining rows are still taken inside the complement of M rather than
    inside span(M)."""
    n = gram.shape[0]
    G = gram.double()
    P = _complement(basis, n, G.device)
    projected = P @ G
    residual = projected @ projected.T
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
