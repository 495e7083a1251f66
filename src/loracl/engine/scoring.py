"""Per-example scores as the field computes them (METHODS.md, "Scores"), from the libraries its code uses.

- exact match: SuperNI's `compute_metrics` (Tk-Instruct, used by O-LoRA, SAPT, InfLoRA and GainLoRA):
  both strings lower-cased, every `string.punctuation` character removed, whitespace collapsed, then equal.
  Articles are kept (that line is commented out upstream).
- ROUGE-L: the `rouge-score` package, `RougeScorer(["rougeL"], use_stemmer=True)`, F-measure, the best over
  a task's references, as in the same `compute_metrics`.

Scores are fractions in [0, 1]; the evaluator averages them per task and reports percent.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

EXACT_MATCH = "exact_match"
ROUGE_L = "rouge_l"

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SuperNI's normalisation: lower-case, drop every punctuation character, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure with the Porter stemmer, the best over references (rouge-score's tokenizer:
    lower-case, non-alphanumeric characters as separators)."""
    scorer = _rouge()
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {EXACT_MATCH: exact_match, ROUGE_L: rouge_l}


def strip_token(text: str, token: str | None) -> str:
    """`text` without any occurrence of `token` (an end-of-sequence marker a decoder may leave)."""
    return text.replace(token, "") if token else text


def score(prediction: str, references: Sequence[str], metric: str) -> float:
    """One example's score under `metric` (a name of METRICS)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prediction, references)
