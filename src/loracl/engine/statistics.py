"""How sure a table can be: bootstrap intervals of a method's AP (and BWT, forgetting), paired comparisons of
two methods scored on the same test examples, and the test size that would settle a difference.

The data. Per method a grid of runs, orders x seeds (every order at every seed; one seed when the bench was
given none). A run holds the accuracy matrix of METHODS.md with each entry a vector of per-example scores
instead of their mean (rows: after each training step; a run may hold its last row only), and per task a
key naming its test examples: runs whose tasks share a key were scored on the same examples in the same
order (the same task at the same cap and seed in another order; the same task of the same run for every
method), and a resample draws those examples once for all of them.

A metric is computed per run as the run computes it (AP = mean over tasks of each task's mean example
score: tasks are never pooled; BWT and forgetting from the same matrix, METHODS.md), then averaged over
the runs (over seeds, then orders: the same, as the grid is rectangular).

Intervals, 95 % percentile bootstrap, DRAWS draws:
- over test examples (`hierarchical=False`): orders and seeds fixed, every key's examples resampled with
  replacement within their task (stratified). The test-sampling uncertainty of these runs' mean.
- hierarchical (`hierarchical=True`): each draw resamples the orders with replacement, then within each drawn
  order its seeds with replacement, then the test examples as above (shared by the runs that share them),
  and averages. The uncertainty of the mean over other orders and seeds as well. A level with one member
  (one order, one seed) is not resampled: with one order and one seed both intervals are the same. With
  few orders (2-3) it is narrow: n values resampled have (n-1)/n of their variance and 3 orders give 10
  distinct resamples; read it as a lower bound of the order-to-order uncertainty.

Paired comparisons: two methods on the same orders, seeds and examples; every draw (the same orders, seeds
and example indices) is applied to both and the interval read off the draws' differences, so what the two
share cancels out. A difference is resolved when its interval excludes 0.

Examples to resolve a difference (examples_to_resolve), orders and seeds fixed. The AP difference is
D = sum over keys k of the mean over k's n_k examples of

    c_k,i = sum over the (run r, task t) scored on k of 100 (a_r,t,i - b_r,t,i) / (R T_r)

(R runs, T_r tasks in run r, a and b the two methods' scores of example i), so its test-sampling variance
is sum_k s_k^2 / n_k, s_k^2 the sample variance (n_k - 1) of c_k,i over i. With n examples in every task
it is sum_k s_k^2 / n, and the normal interval D +- z sqrt(sum_k s_k^2 / n) excludes 0 once

    n >= z^2 sum_k s_k^2 / D^2,   z = 1.96 (95 %).

One run of T tasks: n >= (1.96 * 100 / T)^2 sum_t s_t^2 / D^2, s_t^2 the variance over task t's examples
of the difference of the two methods' scores. It assumes the observed D and per-example variance hold at
the larger size, and speaks for these orders and seeds: more examples do not shrink the spread between
orders or seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

DRAWS = 2000
LEVEL = 0.95
Z = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 %
_CHUNK = 256  # draws made at once (a key's counts are draws x examples)

Matrix = list[list[np.ndarray | None]]  # per row, per task: a vector of values per draw (or None)


@dataclass(frozen=True)
class Interval:
    value: float  # percent (points for a difference)
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0 (for a difference: the sign is settled at this level)."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Run:
    """One run's per-example scores: `rows[i][j]` those of task j after training step i+1 (None: not
    evaluated), every row of the run or only its last one; `keys[j]` names task j's test examples."""

    keys: tuple[Hashable, ...]
    rows: tuple[tuple[np.ndarray | None, ...], ...]

    def __post_init__(self) -> None:
        tasks = len(self.keys)
        if tasks == 0 or len(self.rows) not in (1, tasks) or any(len(row) != tasks for row in self.rows):
            raise ValueError("a run needs one row per training step (or its last only), one entry per task")

    @classmethod
    def final(cls, tasks: Sequence[Sequence[float]], keys: Sequence[Hashable] | None = None) -> Run:
        """A run known by its last row: per task the example scores after the last step. `keys` default to
        the tasks' positions (runs share the examples of their j-th task)."""
        keys = tuple(range(len(tasks))) if keys is None else tuple(keys)
        return cls(keys, (tuple(np.asarray(scores, dtype=float) for scores in tasks),))


Grid = Sequence[Sequence[Run]]  # orders x seeds


def average_performance(tasks: Sequence[Sequence[float]]) -> float:
    """AP of one run's last row: 100 times the mean over tasks of each task's mean example score."""
    return 100.0 * float(np.mean([np.mean(scores) for scores in tasks]))


# -- the metrics, on matrices whose entries are vectors (one value per draw) -------------------------------


def _ap(rows: Matrix) -> np.ndarray | None:
    last = rows[-1]
    return None if any(v is None for v in last) else 100.0 * np.mean(last, axis=0)


def _bwt(rows: Matrix) -> np.ndarray | None:
    """BWT = (1/(T-1)) sum_{j<T} (a[T][j] - a[j][j])."""
    tasks = len(rows[-1])
    if tasks < 2 or len(rows) < tasks:
        return None
    pairs = [(rows[-1][j], rows[j][j]) for j in range(tasks - 1)]
    if any(a is None or b is None for a, b in pairs):
        return None
    return 100.0 * np.mean([a - b for a, b in pairs], axis=0)


def _forgetting(rows: Matrix) -> np.ndarray | None:
    """F = (1/(T-1)) sum_{j<T} (max_{l<T} a[l][j] - a[T][j])."""
    tasks = len(rows[-1])
    if tasks < 2 or len(rows) < tasks:
        return None
    columns = [[rows[row][j] for row in range(tasks - 1)] for j in range(tasks - 1)]
    if any(v is None for column in columns for v in column) or any(v is None for v in rows[-1]):
        return None
    return 100.0 * np.mean([np.max(c, axis=0) - rows[-1][j] for j, c in enumerate(columns)], axis=0)


METRICS: dict[str, Callable[[Matrix], np.ndarray | None]] = {
    "AP": _ap, "BWT": _bwt, "forgetting": _forgetting
}


def _needed(metric: str, run: Run) -> set[tuple[int, int]]:
    """The (row, task) entries `metric` reads, among those the run holds."""
    tasks, last = len(run.keys), len(run.rows) - 1
    wanted = {(last, j) for j in range(tasks)}
    if metric == "BWT" and last:
        wanted |= {(j, j) for j in range(tasks)}
    elif metric == "forgetting" and last:
        wanted |= {(i, j) for i in range(last) for j in range(tasks)}
    return {(i, j) for i, j in wanted if run.rows[i][j] is not None}


# -- the bootstrap -----------------------------------------------------------------------------------------


def _shape(grids: Sequence[Grid]) -> tuple[int, int]:
    """Orders and seeds of the grids, which must be rectangular and alike, and score the same examples."""
    orders, seeds = len(grids[0]), len(grids[0][0]) if grids[0] else 0
    for grid in grids:
        if len(grid) != orders or any(len(runs) != seeds for runs in grid) or not orders or not seeds:
            raise ValueError("every method needs the same orders, each at the same seeds")
    for o in range(orders):
        for s in range(seeds):
            runs = [grid[o][s] for grid in grids]
            sizes = [[None if v is None else len(v) for v in r.rows[-1]] for r in runs]
            if any(r.keys != runs[0].keys for r in runs) or any(size != sizes[0] for size in sizes):
                raise ValueError("a paired comparison needs the same test examples for both methods")
    return orders, seeds


def _entry_means(grids: Sequence[Grid], metric: str, draws: int, seed: int) -> dict[tuple, np.ndarray]:
    """Every needed entry's mean score in each draw, the examples of a key resampled once for all entries
    scored on them (counts of a multinomial: a draw with replacement)."""
    by_key: dict[Hashable, list[tuple[tuple, np.ndarray]]] = {}
    for g, grid in enumerate(grids):
        for o, runs in enumerate(grid):
            for s, run in enumerate(runs):
                for i, j in sorted(_needed(metric, run)):
                    by_key.setdefault(run.keys[j], []).append(((g, o, s, i, j), run.rows[i][j]))
    means: dict[tuple, np.ndarray] = {}
    for number, entries in enumerate(by_key.values()):
        size = len(entries[0][1])
        if any(len(scores) != size for _, scores in entries):
            raise ValueError("runs that share a key must hold the same number of test examples")
        scores = np.stack([scores for _, scores in entries], axis=1)  # examples x entries
        rng = np.random.default_rng((seed, 1, number))
        out = np.empty((draws, len(entries)))
        for start in range(0, draws, _CHUNK):
            count = min(_CHUNK, draws - start)
            counts = rng.multinomial(size, np.full(size, 1.0 / size), size=count)
            out[start : start + count] = counts @ scores / size
        for column, (where, _) in enumerate(entries):
            means[where] = out[:, column]
    return means


def _run_values(grid: Grid, metric: str, entry: Callable[[int, int, int, int], np.ndarray | None]):
    """The metric of every run (orders x seeds x values), or None when some run does not define it."""
    values = []
    for o, runs in enumerate(grid):
        row = []
        for s, run in enumerate(runs):
            matrix = [[entry(o, s, i, j) for j in range(len(run.keys))] for i in range(len(run.rows))]
            value = METRICS[metric](matrix)
            if value is None:
                return None
            row.append(value)
        values.append(row)
    return np.asarray(values)


def _resampled(grids: Sequence[Grid], metric: str, hierarchical: bool, draws: int, seed: int):
    """Per grid, the metric averaged over the runs in each draw (None where a run does not define it);
    every grid sees the same draws."""
    orders, seeds = _shape(grids)
    means = _entry_means(grids, metric, draws, seed)
    rng = np.random.default_rng((seed, 0))
    picked_orders = rng.integers(0, orders, size=(draws, orders)) if hierarchical else np.tile(
        np.arange(orders), (draws, 1))  # fmt: skip
    picked_seeds = rng.integers(0, seeds, size=(draws, orders, seeds)) if hierarchical else np.tile(
        np.arange(seeds), (draws, orders, 1))  # fmt: skip
    out = []
    for g, grid in enumerate(grids):
        values = _run_values(grid, metric, lambda o, s, i, j, g=g: means.get((g, o, s, i, j)))
        if values is None:
            out.append(None)
            continue
        draw = np.arange(draws)[:, None, None]
        out.append(values[picked_orders[:, :, None], picked_seeds, draw].mean(axis=(1, 2)))
    return out


def _value(grid: Grid, metric: str) -> float | None:
    """The metric on the runs' own examples, averaged over the runs."""
    def entry(o: int, s: int, i: int, j: int) -> np.ndarray | None:
        scores = grid[o][s].rows[i][j]
        return None if scores is None else np.array([np.mean(scores)])

    values = _run_values(grid, metric, entry)
    return None if values is None else float(values.mean())


def _interval(value: float, samples: np.ndarray) -> Interval:
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(value, float(low), float(high))


def interval(
    grid: Grid, metric: str = "AP", hierarchical: bool = False, draws: int = DRAWS, seed: int = 0
) -> Interval | None:
    """`metric` (AP, BWT, forgetting) averaged over the grid's runs with its bootstrap interval, over test
    examples or hierarchical (orders, seeds, examples); None when a run does not define the metric."""
    value = _value(grid, metric)
    if value is None:
        return None
    [samples] = _resampled([grid], metric, hierarchical, draws, seed)
    return _interval(value, samples)


def paired_difference(
    first: Grid,
    second: Grid,
    metric: str = "AP",
    hierarchical: bool = False,
    draws: int = DRAWS,
    seed: int = 0,
) -> Interval | None:
    """metric(first) - metric(second) over the same orders, seeds and test examples, with its paired
    bootstrap interval; None when a run of either does not define the metric."""
    a, b = _value(first, metric), _value(second, metric)
    samples = _resampled([first, second], metric, hierarchical, draws, seed)
    if a is None or b is None or samples[0] is None or samples[1] is None:
        return None
    return _interval(a - b, samples[0] - samples[1])


def examples_to_resolve(first: Grid, second: Grid, z: float = Z) -> int | None:
    """Test examples per task at which the AP difference first - second, as observed, would be resolved
    with the orders and seeds fixed: n = ceil(z^2 sum_k s_k^2 / D^2) (the module's docstring); None when
    D is 0 or a last row lacks a task."""
    orders, seeds = _shape([first, second])
    runs = orders * seeds
    sums: dict[Hashable, np.ndarray] = {}
    for o in range(orders):
        for s in range(seeds):
            a, b = first[o][s], second[o][s]
            if any(v is None for v in (*a.rows[-1], *b.rows[-1])):
                return None
            for j, key in enumerate(a.keys):
                weight = 100.0 / (runs * len(a.keys))
                diff = weight * (np.asarray(a.rows[-1][j]) - np.asarray(b.rows[-1][j]))
                sums[key] = sums[key] + diff if key in sums else diff
    difference = sum(float(c.mean()) for c in sums.values())
    if abs(difference) < 1e-9:
        return None
    variance = sum(float(np.var(c, ddof=1 if len(c) > 1 else 0)) for c in sums.values())
    return max(1, math.ceil(z**2 * variance / difference**2))
