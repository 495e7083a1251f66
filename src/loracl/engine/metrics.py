"""Continual-learning metrics of METHODS.md on the accuracy matrix a[i][j] (score on task j after task i).

Indices here are 0-based; the formulas are the 1-based ones of METHODS.md. BWT, FWT and forgetting average
over T - 1 tasks (some papers divide by T: not the default here). An entry may be None (not evaluated, see
`eval.matrix: metrics`); a metric that needs a missing entry is None.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def is_complete(matrix: Matrix) -> bool:
    """Every entry evaluated (`eval.matrix: full`, or a run too short to leave any out)."""
    return all(v is not None for row in matrix for v in row)


def _mean(values: list[float | None]) -> float | None:
    """Mean of `values`, or None when any is missing."""
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def _max(values: list[float | None]) -> float | None:
    return None if None in values else max(values)  # type: ignore[type-var]


def _check(matrix: Matrix) -> int:
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError("the accuracy matrix must be square, T x T, with T >= 1")
    return T


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def average_performance(matrix: Matrix) -> float | None:
    """AP = (1/T) sum_j a[T][j]."""
    _check(matrix)
    return _mean(list(matrix[-1]))


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT = (1/(T-1)) sum_{j<T} (a[T][j] - a[j][j])."""
    T = _check(matrix)
    if T < 2:
        return None
    return _mean([_difference(matrix[-1][j], matrix[j][j]) for j in range(T - 1)])


def forward_transfer(matrix: Matrix, zero_shot: Sequence[float]) -> float | None:
    """FWT = (1/(T-1)) sum_{j>1} (a[j-1][j] - b_j), b_j the base model's zero-shot score."""
    T = _check(matrix)
    if T < 2 or len(zero_shot) != T:
        return None
    return _mean([_difference(matrix[j - 1][j], zero_shot[j]) for j in range(1, T)])


def forgetting(matrix: Matrix) -> float | None:
    """F = (1/(T-1)) sum_{j<T} (max_{l<T} a[l][j] - a[T][j])."""
    T = _check(matrix)
    if T < 2:
        return None
    best_before = [_max([matrix[row][j] for row in range(T - 1)]) for j in range(T - 1)]
    return _mean([_difference(best_before[j], matrix[-1][j]) for j in range(T - 1)])


def backward_transfer_over_t(matrix: Matrix) -> float | None:
    """BWT as GainLoRA's and SAPT's score.py compute it: the same differences summed over every task
    j <= T (the last one's is 0) and divided by T, so |BWT| is (T-1)/T of METHODS.md's."""
    T = _check(matrix)
    if T < 2:
        return None
    return _mean([_difference(matrix[-1][j], matrix[j][j]) for j in range(T)])


def mean_diagonal(matrix: Matrix) -> float | None:
    """(1/T) sum_j a[j][j]: the score on each task right after learning it, what GainLoRA's score.py
    reports as FWT (less a constant baseline that is 0 in its released scripts)."""
    T = _check(matrix)
    return _mean([matrix[j][j] for j in range(T)])


def other_conventions(matrix: Matrix, sequential: bool = True) -> dict[str, float | None]:
    """The metrics some papers compute differently from METHODS.md (reported beside the headline ones,
    labelled, never instead of them): BWT over T and the mean diagonal of GainLoRA's score.py."""
    if not sequential:
        return {"BWT_over_T": None, "mean_diagonal": None}
    return {"BWT_over_T": backward_transfer_over_t(matrix), "mean_diagonal": mean_diagonal(matrix)}


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
