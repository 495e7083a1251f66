"""Continual-learning metrics of METHODS.md on the accuracy matrix a[i][j] (score on task j after task i).

Indices here are 0-based; the formulas are the 1-based ones of METHODS.md. BWT, FWT and forgetting average
over T - 1 tasks (some papers divide by T: not the default here).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> int:
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError("the accuracy matrix must be square, T x T, with T >= 1")
    return T


def average_performance(matrix: Matrix) -> float:
    """AP = (1/T) sum_j a[T][j]."""
    T = _check(matrix)
    return sum(matrix[-1]) / T


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT = (1/(T-1)) sum_{j<T} (a[T][j] - a[j][j])."""
    T = _check(matrix)
    if T < 2:
        return None
    return sum(matrix[-1][j] - matrix[j][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(matrix: Matrix, zero_shot: Sequence[float]) -> float | None:
    """FWT = (1/(T-1)) sum_{j>1} (a[j-1][j] - b_j), b_j the base model's zero-shot score."""
    T = _check(matrix)
    if T < 2 or len(zero_shot) != T:
        return None
    return sum(matrix[j - 1][j] - zero_shot[j] for j in range(1, T)) / (T - 1)


def forgetting(matrix: Matrix) -> float | None:
    """F = (1/(T-1)) sum_{j<T} (max_{l<T} a[l][j] - a[T][j])."""
    T = _check(matrix)
    if T < 2:
        return None
    return sum(max(matrix[row][j] for row in range(T - 1)) - matrix[-1][j] for j in range(T - 1)) / (T - 1)


def all_metrics(
    matrix: Matrix, zero_shot: Sequence[float] | None, sequential: bool = True
) -> dict[str, float | None]:
    """AP, BWT, FWT and forgetting. `sequential=False` (one joint training, every row the final model):
    only AP is defined; the metrics that compare steps of a sequence are None."""
    if not sequential:
        return {"AP": average_performance(matrix), "BWT": None, "FWT": None, "forgetting": None}
    return {
        "AP": average_performance(matrix),
        "BWT": backward_transfer(matrix),
        "FWT": forward_transfer(matrix, zero_shot) if zero_shot else None,
        "forgetting": forgetting(matrix),
    }
