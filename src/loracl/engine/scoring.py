"""Per-example scores as the field computes them (METHODS.md, "Scores"), from the libraries its code uses.

- exact match: SuperNI's `compute_metrics` (Tk-Instruct, used by O-LoRA, SAPT, InfLoRA and GainLoRA):
  both strings lower-cased, every `string.punctuation` character removed, whitespace collapsed, then equal.
  Articles are kept (that line is commented out upstream).
- ROUGE-L: the `rouge-score` package, `RougeScorer(["rougeL"], use_stemmer=True)`, F-measure, the best over
  a task's references, as in the same `compute_metrics`.
- TRACE's per-task metrics (BeyonderXX/TRACE `metrics.py` and `evaluations/eval_*.py`, called by
  `inference/infer_multi.py`): `trace_accuracy`, `trace_rouge_l`, `trace_edit_similarity` and `trace_sari`,
  each described at its function. TRACE normalises nothing: the strings are compared as generated.

Every metric takes (prediction, references, source): `source` is the example's prompt, which only SARI reads.
Scores are fractions in [0, 1]; the evaluator averages them per task and reports percent.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

from loracl.data.formats import (  # the names tasks carry in Task.metric
    EXACT_MATCH,
    ROUGE_L,
    TRACE_ACCURACY,
    TRACE_EDIT_SIMILARITY,
    TRACE_ROUGE_L,
    TRACE_SARI,
)
from loracl.data.text import ANSWER_SEPARATOR

Metric = Callable[[str, Sequence[str], str], float]

_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SuperNI's normalisation: lower-case, drop every punctuation character, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str], source: str = "") -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


# The scorers' libraries are imported on first use: nltk alone (under rouge-score) costs ~0.2 s at import.


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str], source: str = "") -> float:
    """ROUGE-L F-measure with the Porter stemmer, the best over references (rouge-score's tokenizer:
    lower-case, non-alphanumeric characters as separators)."""
    scorer = _rouge()
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references), default=0.0)


# ---------------------------------------------------------------------------------------------------------
# TRACE. Its metrics.py scores an empty prediction or target 0 (skipped, but still in the denominator); a
# task with several references (TRACE's have one) takes the best, as rouge_l does.


def _generated(prediction: str) -> str:
    """The answer as TRACE's model would emit it. TRACE trains on prompt + answer with nothing between
    (utils/data/data_collator.py); our encoder puts ANSWER_SEPARATOR there, so a decoded answer may start
    with it. TRACE compares strings unnormalised, so that one separator must go (and nothing else)."""
    return prediction.removeprefix(ANSWER_SEPARATOR)


# A choice answer: one capital letter alone (C-STANCE's and FOMC's "A"/"B"/"C" in TRACE's release) or
# followed by a line break and the reasoning (ScienceQA's "A\nBecause ...").
_CHOICE = re.compile(r"[A-Z](?:\n|$)")
# ScienceQA's older layout, "Answer: A\nBecause ..." (LLM-CL_Benchmark/dataset_examples.txt).
_ANSWER_LABEL = "Answer: "


def _after_label(text: str) -> str:
    """The one character after the first "Answer: " ("" without one): eval_ScienceQA.py @747512c."""
    at = text.find(_ANSWER_LABEL)
    return "" if at < 0 else text[at + len(_ANSWER_LABEL) : at + len(_ANSWER_LABEL) + 1]


def _compared(prediction: str, target: str) -> tuple[str, str]:
    """The parts of prediction and target that TRACE's accuracy compares, chosen by the target's form.

    - choice answers: the first character of each. eval_ScienceQA.py @f896365 (the version infer_multi.py
      calls) compares first characters; TRACE's own eval_CStance.py is not published, and its fork
      jinghan1he/SEEKR compares the prediction's first character with the whole one-letter target: the same.
      SEEKR's eval_FOMC.py defines that same first-character resolve() but never calls it (whole-string
      equality); FOMC's targets are one letter like C-STANCE's, so FOMC is scored like C-STANCE here and
      differs from SEEKR only on a prediction that adds text after its letter.
    - "Answer: X..." targets: the character after "Answer: " in each (eval_ScienceQA.py @747512c).
    - anything else (NumGLUE-cm, NumGLUE-ds numbers; FOMC's older word labels): the whole strings, as
      metrics.py `caculate_accuracy` and eval_NumGLUE_ds.py do.
    """
    if _CHOICE.match(target):
        return prediction[:1], target[:1]
    if target.startswith(_ANSWER_LABEL):
        return _after_label(prediction), _after_label(target)
    return prediction, target


def _accurate(prediction: str, target: str) -> bool:
    prediction, target = _compared(prediction, target)
    return prediction != "" and target != "" and prediction == target


def trace_accuracy(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE's accuracy (C-STANCE, FOMC, ScienceQA, NumGLUE-cm, NumGLUE-ds): exact, case- and
    whitespace-sensitive string equality (metrics.py `caculate_accuracy`) of the parts `_compared` picks."""
    pred = _generated(prediction)
    return float(any(_accurate(pred, ref) for ref in references))


@lru_cache(maxsize=1)
def _trace_rouge() -> Any:
    from rouge import Rouge

    return Rouge(metrics=["rouge-l"])


@contextlib.contextmanager
def _recursion_room(depth: int) -> Iterator[None]:
    """The `rouge` package rebuilds each LCS recursively, up to one call per word of the two sentences, so a
    long summary would exceed Python's default limit of 1000. The room is given for that call only (its
    depth is bounded by the texts' words: generations are capped by max_new_tokens)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + depth)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _rouge_l_f(prediction: str, target: str) -> float:
    if not prediction or not target:
        return 0.0
    # metrics.py score_rouge(target, prediction) calls get_scores(target, prediction): the target is the
    # package's "hypothesis". Its summary-level ROUGE-L is not symmetric, so the order is kept.
    with _recursion_room(len(prediction.split()) + len(target.split())):
        try:
            return float(_trace_rouge().get_scores(target, prediction, avg=True)["rouge-l"]["f"])
        except ValueError:  # only full stops: no sentence to score (TRACE itself would stop here)
            return 0.0


def trace_rouge_l(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE's ROUGE-L (MeetingBank): the `rouge` package's `Rouge(metrics=["rouge-l"])` F score, no
    stemming and no lower-casing (sentences split at ".", words at spaces), as metrics.py `caculate_rouge`."""
    pred = _generated(prediction)
    return max((_rouge_l_f(pred, ref) for ref in references), default=0.0)


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """evaluations/eval_Py150.py `postprocess`: bare literal placeholders become "0" or nothing, and
    `<X_LIT:v>` becomes v (each form found in the text replaced everywhere, in the order found, as there)."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def _fuzz_ratio(prediction: str, target: str) -> float:
    """fuzzywuzzy's `fuzz.ratio` / 100 as TRACE ran it. TRACE's requirements.txt installs fuzzywuzzy without
    python-Levenshtein, so fuzz.ratio falls back to difflib's SequenceMatcher (not the Levenshtein ratio of
    rapidfuzz or thefuzz, which differs on some strings), rounded to a whole percent; equal strings score
    100 before any matching (check_for_equivalence), empty ones 0 (metrics.py `caculate_fuzz`)."""
    if not prediction or not target:
        return 0.0
    if prediction == target:
        return 1.0
    return round(100 * difflib.SequenceMatcher(None, prediction, target).ratio()) / 100


def trace_edit_similarity(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE's edit similarity (Py150): fuzz.ratio of the post-processed prediction and target, as a
    fraction (evaluations/eval_Py150.py @f0c95cf)."""
    pred = py150_postprocess(_generated(prediction))
    return max((_fuzz_ratio(pred, py150_postprocess(ref)) for ref in references), default=0.0)


# SARI (Xu et al. 2016) as TRACE computes it: metrics.py `caculate_sari` calls the Hugging Face `sari`
# metric (datasets.load_metric("sari"); huggingface/evaluate metrics/sari/sari.py), which no package on
# PyPI ships. Below is that script's algorithm in our own words: tensor2tensor's SARI with 0/0 = 1 and the
# keep-recall fix of cocoxu/simplification issue 6; texts lower-cased and tokenised by sacrebleu's 13a
# tokenizer, n-grams n = 1..4 of the tokens split at single spaces.
_SARI_ORDERS = (1, 2, 3, 4)


@lru_cache(maxsize=1)
def _tokenizer_13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _sari_tokens(text: str) -> list[str]:
    return _tokenizer_13a()(text.lower()).split(" ")


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _keep_f1(source: Counter[str], prediction: Counter[str], references: Counter[str]) -> float:
    """Source n-grams the prediction keeps, against those the references keep (counts scaled by the number
    of references, as the script does)."""
    kept = source & prediction
    kept_good = kept & references
    kept_by_references = source & references
    precision = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
    recall = sum(kept_good.values()) / sum(kept_by_references.values()) if kept_by_references else 1.0
    return _f1(precision, recall)


def _delete_precision(source: Counter[str], prediction: Counter[str], references: Counter[str]) -> float:
    """Of the source n-grams the prediction deletes, the share the references delete too."""
    deleted = source - prediction
    deleted_good = deleted - references
    return sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0


def _add_f1(source: set[str], prediction: set[str], references: set[str]) -> float:
    """N-grams new in the prediction that a reference has, against those new in the references (types)."""
    added = prediction - source
    added_good = added & references
    added_by_references = references - source
    precision = len(added_good) / len(added) if added else 1.0
    recall = len(added_good) / len(added_by_references) if added_by_references else 1.0
    return _f1(precision, recall)


def _sari_order(source: list[str], prediction: list[str], references: list[list[str]]) -> tuple[float, ...]:
    copies = len(references)
    reference_counts = Counter(g for ref in references for g in ref)
    source_counts = Counter({g: c * copies for g, c in Counter(source).items()})
    prediction_counts = Counter({g: c * copies for g, c in Counter(prediction).items()})
    return (
        _keep_f1(source_counts, prediction_counts, reference_counts),
        _delete_precision(source_counts, prediction_counts, reference_counts),
        _add_f1(set(source), set(prediction), set(reference_counts)),
    )


def sari(source: str, prediction: str, references: Sequence[str]) -> float:
    """One sentence's SARI in [0, 1] (the script's `SARIsent`, before its x 100): keep F1, delete precision
    and add F1, each averaged over n = 1..4, then averaged."""
    if not references:
        return 0.0
    src, pred = _sari_tokens(source), _sari_tokens(prediction)
    refs = [_sari_tokens(ref) for ref in references]
    per_order = [
        _sari_order(_ngrams(src, n), _ngrams(pred, n), [_ngrams(ref, n) for ref in refs])
        for n in _SARI_ORDERS
    ]
    keep, delete, add = (sum(scores) / len(_SARI_ORDERS) for scores in zip(*per_order, strict=True))
    return (keep + delete + add) / 3


def trace_sari(prediction: str, references: Sequence[str], source: str = "") -> float:
    """TRACE's SARI (20Minuten): sources are the prompts, references [[answer]] (metrics.py `caculate_sari`
    via evaluations/eval_20Minuten.py). The corpus score is the mean of these sentence scores, so the
    evaluator's mean over examples equals it."""
    return sari(source, _generated(prediction), references)


METRICS: dict[str, Metric] = {
    EXACT_MATCH: exact_match,
    ROUGE_L: rouge_l,
    TRACE_ACCURACY: trace_accuracy,
    TRACE_ROUGE_L: trace_rouge_l,
    TRACE_EDIT_SIMILARITY: trace_edit_similarity,
    TRACE_SARI: trace_sari,
}


def strip_token(text: str, token: str | None) -> str:
    """`text` without any occurrence of `token` (an end-of-sequence marker a decoder may leave)."""
    return text.replace(token, "") if token else text


def score(prediction: str, references: Sequence[str], metric: str, source: str = "") -> float:
    """One example's score under `metric` (a name of METRICS); `source` is the example's prompt."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prediction, references, source)
