"""Metrics of METHODS.md on a hand-made matrix, and the scorers."""

from __future__ import annotations

import pytest

from loracl.engine.metrics import (
    all_metrics,
    average_performance,
    backward_transfer,
    forgetting,
    forward_transfer,
    other_conventions,
)
from loracl.engine.scoring import exact_match, normalize_answer, rouge_l, score, strip_token

# a[i][j]: score on task j after training task i (T = 3)
MATRIX = [
    [80.0, 10.0, 5.0],
    [60.0, 90.0, 20.0],
    [50.0, 70.0, 85.0],
]
ZERO_SHOT = [0.0, 4.0, 15.0]


def test_average_performance():
    assert average_performance(MATRIX) == pytest.approx((50 + 70 + 85) / 3)


def test_backward_transfer():
    # ((50 - 80) + (70 - 90)) / 2
    assert backward_transfer(MATRIX) == pytest.approx(-25.0)


def test_forward_transfer():
    # ((a[1][2] - b2) + (a[2][3] - b3)) / 2 = ((10 - 4) + (20 - 15)) / 2
    assert forward_transfer(MATRIX, ZERO_SHOT) == pytest.approx(5.5)


def test_forgetting_uses_max_over_earlier_rows():
    # task 1: max(80, 60) - 50 = 30; task 2: max(10, 90) - 70 = 20
    assert forgetting(MATRIX) == pytest.approx(25.0)


def test_the_metrics_entries_alone_give_the_same_ap_bwt_fwt():
    """`eval.matrix: metrics` leaves out every entry but a[i][i], a[i][i+1] and the last row."""
    sparse = [
        [80.0, 10.0, None],
        [None, 90.0, 20.0],
        [50.0, 70.0, 85.0],
    ]
    full, some = all_metrics(MATRIX, ZERO_SHOT), all_metrics(sparse, ZERO_SHOT)
    assert some == {**full, "forgetting": None}  # forgetting needs every earlier row
    assert full["forgetting"] == pytest.approx(25.0)
    incomplete_last_row = [row[:] for row in MATRIX]
    incomplete_last_row[-1][0] = None
    assert all_metrics(incomplete_last_row, ZERO_SHOT)["AP"] is None


def test_single_task_has_no_transfer():
    metrics = all_metrics([[42.0]], [1.0])
    assert metrics == {"AP": 42.0, "BWT": None, "FWT": None, "forgetting": None}


def test_non_square_matrix_is_rejected():
    with pytest.raises(ValueError):
        average_performance([[1.0, 2.0]])


def test_normalize_and_exact_match_as_superni_computes_them():
    """SuperNI's compute_metrics: lower-case, every punctuation character dropped, whitespace collapsed."""
    assert normalize_answer("  Company.") == "company"
    assert strip_token("Company.</s>", "</s>") == "Company."
    assert (
        normalize_answer("Business & Finance")
        == normalize_answer("business  &  finance")
        == "business finance"
    )
    assert exact_match("Business & Finance", ["business  & finance"]) == 1.0
    assert exact_match(" Written Work!", ["Written Work"]) == 1.0
    assert exact_match("Written-Work", ["writtenwork"]) == 1.0  # the hyphen goes, it is not a space
    assert exact_match("the answer", ["answer"]) == 0.0  # articles are kept (commented out upstream)
    assert exact_match("Artist", ["Athlete"]) == 0.0
    assert exact_match("yes", ["no", "Yes"]) == 1.0  # any reference


# (prediction, reference, ROUGE-L F in percent from rouge-score 0.1.2, RougeScorer(["rougeL"],
# use_stemmer=True), as SuperNI's compute_metrics calls it)
ROUGE_REFERENCE = [
    ("hello world", "Hello, world", 100.0),  # 50.0 with loracl's former whitespace-token ROUGE
    ("the dog runs", "The dogs were running.", 85.714),  # stems: dog/dog, run/run; 28.6 formerly
    ("the cat", "the black cat", 80.0),
    ("dog", "the cat", 0.0),
    ("", "x", 0.0),
]


@pytest.mark.parametrize(("prediction", "reference", "expected"), ROUGE_REFERENCE)
def test_rouge_l_matches_the_reference_implementation(
    prediction: str, reference: str, expected: float
) -> None:
    assert 100 * rouge_l(prediction, [reference]) == pytest.approx(expected, abs=1e-3)


def test_rouge_l_takes_the_best_reference_and_score_dispatches():
    assert rouge_l("a b", ["x", "a b"]) == pytest.approx(1.0)
    assert score("The dogs.", ["the dog", "cat"], "rouge_l") == pytest.approx(1.0)
    assert score("The dogs.", ["the dogs"], "exact_match") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score("a", ["a"], "bleu")


def test_other_conventions_on_a_known_matrix():
    """GainLoRA's score.py: BWT divided by T (the last task's 0 difference included), mean diagonal."""
    matrix = [[80.0, 0.0, 0.0], [70.0, 60.0, 0.0], [50.0, 45.0, 90.0]]
    # METHODS.md: ((50 - 80) + (45 - 60)) / 2 = -22.5; score.py: (-30 - 15 + 0) / 3 = -15
    assert backward_transfer(matrix) == pytest.approx(-22.5)
    assert other_conventions(matrix) == {
        "BWT_over_T": pytest.approx(-15.0),
        "mean_diagonal": pytest.approx(230 / 3),
    }
    assert other_conventions(matrix, sequential=False) == {"BWT_over_T": None, "mean_diagonal": None}


def test_the_config_knows_every_metric_of_the_scorer():
    """config.py sits below engine and lists the metric names itself: the two lists must agree."""
    from typing import get_args

    from loracl.config import METRIC_NAMES
    from loracl.engine.scoring import METRICS

    assert set(get_args(METRIC_NAMES)) == set(METRICS)
