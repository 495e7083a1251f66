"""Bootstrap intervals of AP (BWT, forgetting), paired comparisons and the test size that would resolve a
difference, on synthetic predictions whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loracl.engine.statistics import (
    Interval,
    Run,
    average_performance,
    examples_to_resolve,
    interval,
    paired_difference,
)


def scores(rate: float, n: int, seed: int) -> list[float]:
    """n example scores with exactly round(rate * n) correct, in a random order."""
    hits = round(rate * n)
    values = np.array([1.0] * hits + [0.0] * (n - hits))
    np.random.default_rng(seed).shuffle(values)
    return values.tolist()


def one(tasks, keys=None) -> list[list[Run]]:
    """A grid of one order at one seed."""
    return [[Run.final(tasks, keys)]]


def test_ap_is_the_mean_of_task_means_and_its_interval_covers_it():
    order = [scores(0.8, 50, 1), scores(0.4, 100, 2)]  # tasks of different sizes: never pooled
    assert average_performance(order) == pytest.approx(60.0)
    found = interval(one(order))
    assert found.value == pytest.approx(60.0) and found.low < 60.0 < found.high
    # the binomial standard error of the mean of two task means: sqrt(.8*.2/50 + .4*.6/100) / 2 = 3.74 points
    assert (found.high - found.low) / 2 == pytest.approx(1.96 * 3.74, rel=0.1)
    assert interval(one(order), hierarchical=True) == found  # one order, one seed: nothing else to resample


def test_a_constant_score_has_a_zero_width_interval():
    assert interval(one([[1.0] * 20, [0.0] * 20])) == Interval(50.0, 50.0, 50.0)


def test_a_large_paired_difference_is_resolved_and_a_tiny_one_is_not():
    base = [scores(0.5, 100, 3), scores(0.5, 100, 4)]
    better = [[1.0 if s or i % 3 == 0 else 0.0 for i, s in enumerate(task)] for task in base]  # +~17 points
    diff = paired_difference(one(better), one(base))
    assert diff.value == pytest.approx(average_performance(better) - average_performance(base))
    assert diff.resolved and diff.low > 10
    nudged = [list(task) for task in base]
    nudged[0][nudged[0].index(0.0)] = 1.0  # one example more: half a point
    small = paired_difference(one(nudged), one(base))
    assert small.value == pytest.approx(0.5) and not small.resolved


def test_examples_to_resolve_follows_its_formula_and_means_what_it_says():
    """n = ceil(1.96^2 (100/T)^2 sum_t var_t(a - b) / D^2) for one run of T tasks; and at about that many
    examples per task (the same examples repeated, so D and the per-example variance stay) the paired
    interval over test examples stops holding 0, while at half as many it still holds it."""
    rng = np.random.default_rng(7)
    base = [(rng.random(40) < 0.5).astype(float) for _ in range(2)]
    other = [b.copy() for b in base]
    flips = [np.flatnonzero(o == 0)[:3] for o in other]
    for o, f in zip(other, flips, strict=True):
        o[f] = 1.0  # 3 more hits in each task: +7.5 points each
    other[0][np.flatnonzero(base[0] == 1)[:2]] = 0.0  # and 2 fewer on task 0: D = (2.5 + 7.5) / 2 = 5
    diffs = [o - b for o, b in zip(other, base, strict=True)]
    d = 100 * np.mean([x.mean() for x in diffs])
    assert d == pytest.approx(5.0)
    by_hand = math.ceil(1.959964**2 * (100 / 2) ** 2 * sum(np.var(x, ddof=1) for x in diffs) / d**2)
    needed = examples_to_resolve(one(other), one(base))
    assert needed == by_hand == 77  # 40 examples a task do not resolve 5 points here
    assert not paired_difference(one(other), one(base)).resolved

    def at(n: int) -> Interval:
        repeat = -(-n // 40)  # examples per task: 40 * repeat >= n
        tiled = [[np.tile(x, repeat) for x in tasks] for tasks in (other, base)]
        return paired_difference(one(tiled[0]), one(tiled[1]))

    assert at(round(1.3 * needed)).resolved
    assert not at(round(0.5 * needed)).resolved
    assert examples_to_resolve(one(base), one(base)) is None  # no difference: no size resolves it


def test_examples_to_resolve_counts_shared_examples_once():
    """Two orders scored on the same examples (one key) add no information: the same n as one order; on
    independent examples (two keys) half the variance, so about half the examples."""
    rng = np.random.default_rng(8)
    base = [(rng.random(60) < 0.5).astype(float)]
    other = [np.where(rng.random(60) < 0.2, 1.0, base[0])]
    single = examples_to_resolve(one(other), one(base))
    shared = examples_to_resolve([[Run.final(other, ["t"])]] * 2, [[Run.final(base, ["t"])]] * 2)
    apart = [[Run.final(other, ["t1"])], [Run.final(other, ["t2"])]]
    apart_base = [[Run.final(base, ["t1"])], [Run.final(base, ["t2"])]]
    assert shared == single
    assert examples_to_resolve(apart, apart_base) == pytest.approx(single / 2, abs=1)


def test_pairing_cancels_what_both_methods_share():
    """Two methods right on the same hard examples: paired, the difference is certain; unpaired (two
    independent intervals) it would look like noise."""
    shared = scores(0.5, 60, 5)
    first = [shared, shared]
    second = [[s * (i % 10 != 0) for i, s in enumerate(shared)], shared]  # loses a few of its hits
    assert paired_difference(one(first), one(second)).resolved
    a, b = interval(one(first)), interval(one(second))
    assert a.low < b.high  # the separate intervals overlap


def test_pairing_needs_the_same_examples():
    with pytest.raises(ValueError, match="same test examples"):
        paired_difference(one([[1.0, 0.0]]), one([[1.0]]))
    with pytest.raises(ValueError, match="same test examples"):
        paired_difference(one([[1.0]], ["a"]), one([[1.0]], ["b"]))
    with pytest.raises(ValueError, match="same orders"):
        paired_difference([[Run.final([[1.0]])]] * 2, one([[1.0]]))


def test_orders_are_resampled_in_the_hierarchical_interval():
    """One method perfect on one order and wrong on the other: over test examples (orders fixed) AP is
    exactly 50; resampling the two orders gives 0, 50 or 100 with probabilities 1/4, 1/2, 1/4."""
    grid = [[Run.final([[1.0] * 30], ["a"])], [Run.final([[0.0] * 30], ["b"])]]
    assert interval(grid) == Interval(50.0, 50.0, 50.0)
    assert interval(grid, hierarchical=True) == Interval(50.0, 0.0, 100.0)


def test_seeds_are_a_level_within_each_order():
    """Three seeds of one order at 20, 50 and 80 (constant scores): the mean of three seeds drawn with
    replacement is 20 with probability 1/27 > 2.5 %, so the interval is [20, 80]; with the seeds fixed it
    has no width."""
    grid = [[Run.final([[rate] * 10]) for rate in (0.2, 0.5, 0.8)]]
    assert interval(grid) == Interval(50.0, 50.0, 50.0)
    assert interval(grid, hierarchical=True) == pytest.approx(Interval(50.0, 20.0, 80.0))


def test_a_difference_that_flips_between_orders_is_resolved_per_example_but_not_across_orders():
    n = 400
    base = np.zeros(n)
    ahead = base.copy()
    ahead[: n // 5] = 1.0  # +20 points on order 1
    behind = base.copy()
    behind[: n // 10] = 1.0  # the other method +10 on order 2
    first = [[Run.final([ahead], ["o1"])], [Run.final([base], ["o2"])]]
    second = [[Run.final([base], ["o1"])], [Run.final([behind], ["o2"])]]
    examples = paired_difference(first, second)
    assert examples.value == pytest.approx(5.0) and examples.resolved
    across = paired_difference(first, second, hierarchical=True)
    assert across.value == pytest.approx(5.0) and not across.resolved
    # a quarter of the draws take order 2 twice: -10 points, give or take its test noise (sd 100
    # sqrt(.1 * .9 / 400) = 1.5), so the 2.5 % quantile is that draw's 10 % quantile, -10 - 1.28 * 1.5;
    # likewise the top: 20 + 1.28 * 2 (sd 100 sqrt(.2 * .8 / 400) = 2)
    assert across.low == pytest.approx(-10 - 1.28 * 1.5, abs=1)
    assert across.high == pytest.approx(20 + 1.28 * 2, abs=1)


def test_shared_examples_are_drawn_together():
    """The same examples scored in two orders (one key) are one sample: the interval of their mean is that
    of one order. On independent examples (two keys) it narrows by about sqrt(2)."""
    task = scores(0.5, 200, 9)
    alone = interval([[Run.final([task], ["t"])]])
    shared = interval([[Run.final([task], ["t"])], [Run.final([task], ["t"])]])
    apart = interval([[Run.final([task], ["t1"])], [Run.final([task], ["t2"])]])
    assert shared == alone
    assert (apart.high - apart.low) == pytest.approx((alone.high - alone.low) / math.sqrt(2), rel=0.15)
    with pytest.raises(ValueError, match="same number of test examples"):
        interval([[Run.final([task], ["t"])], [Run.final([task[:100]], ["t"])]])


def test_bwt_and_forgetting_from_every_step():
    """Two tasks of 40 examples: task 1 all right after step 1 and half right after step 2: BWT -50,
    forgetting 50; the paired per-example drop has standard error 100 * 0.5 / sqrt(40) = 7.9 points."""
    n = 40
    first_after_1, second_after_1 = np.ones(n), np.zeros(n)
    first_after_2 = np.array([1.0, 0.0] * (n // 2))
    run = Run(("a", "b"), ((first_after_1, second_after_1), (first_after_2, np.ones(n))))
    bwt, forgetting = interval([[run]], "BWT"), interval([[run]], "forgetting")
    assert bwt.value == pytest.approx(-50.0) and forgetting.value == pytest.approx(50.0)
    assert (bwt.high - bwt.low) / 2 == pytest.approx(1.96 * 7.9, rel=0.15)
    assert forgetting.low > 0 and bwt.high < 0
    assert interval([[run]], "AP").value == pytest.approx(75.0)
    assert interval([[Run.final([first_after_2, np.ones(n)])]], "BWT") is None  # the last row alone: no BWT
    sparse = Run(("a", "b"), ((first_after_1, None), (first_after_2, np.ones(n))))  # eval.matrix: metrics
    assert interval([[sparse]], "BWT") is not None and interval([[sparse]], "forgetting") is not None
    sparser = Run(("a", "b"), ((None, None), (first_after_2, np.ones(n))))
    assert interval([[sparser]], "BWT") is None and interval([[sparser]], "forgetting") is None
