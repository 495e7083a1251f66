"""Bootstrap intervals of AP and paired comparisons, on synthetic predictions whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from loracl.engine.statistics import (
    Interval,
    ap_interval,
    average_performance,
    examples_to_resolve,
    paired_difference,
)


def scores(rate: float, n: int, seed: int) -> list[float]:
    """n example scores with exactly round(rate * n) correct, in a random order."""
    hits = round(rate * n)
    values = np.array([1.0] * hits + [0.0] * (n - hits))
    np.random.default_rng(seed).shuffle(values)
    return values.tolist()


def test_ap_is_the_mean_of_task_means_and_its_interval_covers_it():
    order = [scores(0.8, 50, 1), scores(0.4, 100, 2)]  # tasks of different sizes: never pooled
    assert average_performance(order) == pytest.approx(60.0)
    interval = ap_interval([order])
    assert interval.low < 60.0 < interval.high
    # the binomial standard error of the mean of two task means: sqrt(.8*.2/50 + .4*.6/100) / 2 = 3.3 points
    assert (interval.high - interval.low) / 2 == pytest.approx(1.96 * 3.32, rel=0.15)


def test_a_constant_score_has_a_zero_width_interval():
    assert ap_interval([[[1.0] * 20, [0.0] * 20]]) == Interval(50.0, 50.0, 50.0)


def test_a_large_paired_difference_is_resolved_and_a_tiny_one_is_not():
    base = [scores(0.5, 100, 3), scores(0.5, 100, 4)]
    better = [[1.0 if s or i % 3 == 0 else 0.0 for i, s in enumerate(task)] for task in base]  # +~17 points
    diff = paired_difference([better], [base])
    assert diff.value == pytest.approx(average_performance(better) - average_performance(base))
    assert diff.resolved and diff.low > 10
    nudged = [list(task) for task in base]
    nudged[0][nudged[0].index(0.0)] = 1.0  # one example more: half a point
    small = paired_difference([nudged], [base])
    assert small.value == pytest.approx(0.5) and not small.resolved
    needed = examples_to_resolve(small, 100)
    assert needed is not None and needed > 100


def test_pairing_cancels_what_both_methods_share():
    """Two methods right on the same hard examples: paired, the difference is certain; unpaired (two
    independent intervals) it would look like noise."""
    shared = scores(0.5, 60, 5)
    first = [[shared, shared]]
    second = [[[s * (i % 10 != 0) for i, s in enumerate(shared)], shared]]  # loses a few of its hits
    diff = paired_difference(first, second)
    assert diff.resolved
    a, b = ap_interval(first), ap_interval(second)
    assert a.low < b.high  # the separate intervals overlap


def test_pairing_needs_the_same_examples():
    with pytest.raises(ValueError, match="same test examples"):
        paired_difference([[[1.0, 0.0]]], [[[1.0]]])
