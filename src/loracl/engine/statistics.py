"""How sure a table can be: bootstrap intervals of AP over the test examples, and paired comparisons of two
methods scored on the same examples.

AP is the mean over tasks of each task's mean example score (METHODS.md; tasks are never pooled), so a
resample draws each task's examples with replacement within that task (stratified) and recomputes AP the
same way. Over several task orders the orders are fixed and their APs averaged, so the interval is the
test-sampling uncertainty of the mean over those orders (the spread between orders is reported apart).
Two methods run on the same order are scored on the same examples: the paired bootstrap resamples example
indices once and applies them to both, so what they share cancels out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TaskScores = Sequence[Sequence[float]]  # per task, the per-example scores in [0, 1]
DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float  # percent
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (for a difference: the sign is settled at this level)."""
        return self.low > 0 or self.high < 0


def average_performance(tasks: TaskScores) -> float:
    return 100.0 * float(np.mean([np.mean(scores) for scores in tasks]))


def _draws(orders: Sequence[TaskScores], rng: np.random.Generator, draws: int) -> list[list[np.ndarray]]:
    """Resampled example indices, per order and task, `draws` times (shared by methods to pair them)."""
    return [[rng.integers(0, len(scores), size=(draws, len(scores))) for scores in order] for order in orders]


def _resampled_ap(orders: Sequence[TaskScores], indices: list[list[np.ndarray]]) -> np.ndarray:
    per_order = [
        np.mean(
            [np.asarray(scores)[idx].mean(axis=1) for scores, idx in zip(order, order_idx, strict=True)],
            axis=0,
        )
        for order, order_idx in zip(orders, indices, strict=True)
    ]
    return 100.0 * np.mean(per_order, axis=0)


def _interval(value: float, samples: np.ndarray) -> Interval:
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(value, float(low), float(high))


def ap_interval(orders: Sequence[TaskScores], draws: int = DRAWS, seed: int = 0) -> Interval:
    """AP averaged over `orders` (each a list of tasks' example scores) with its bootstrap interval."""
    rng = np.random.default_rng(seed)
    value = float(np.mean([average_performance(order) for order in orders]))
    return _interval(value, _resampled_ap(orders, _draws(orders, rng, draws)))


def paired_difference(
    first: Sequence[TaskScores], second: Sequence[TaskScores], draws: int = DRAWS, seed: int = 0
) -> Interval:
    """AP(first) - AP(second) over the same orders and test examples, with its paired bootstrap interval."""
    for a, b in zip(first, second, strict=True):
        if [len(t) for t in a] != [len(t) for t in b]:
            raise ValueError("a paired comparison needs the same test examples for both methods")
    rng = np.random.default_rng(seed)
    indices = _draws(first, rng, draws)
    pairs = zip(first, second, strict=True)
    value = float(np.mean([average_performance(a) - average_performance(b) for a, b in pairs]))
    return _interval(value, _resampled_ap(first, indices) - _resampled_ap(second, indices))


def examples_to_resolve(difference: Interval, examples_per_task: int) -> int | None:
    """Test examples per task at which an interval of this width (shrinking as 1/sqrt(n)) would exclude 0
    for a difference this large; None when the difference is 0."""
    half = (difference.high - difference.low) / 2
    if difference.value == 0:
        return None
    return max(examples_per_task, math.ceil(examples_per_task * (half / abs(difference.value)) ** 2))
