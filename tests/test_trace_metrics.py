"""TRACE's per-task metrics (loracl.engine.scoring) against the values TRACE's own code gives.

Reference values were obtained by running, in a throwaway script outside the project:
- ROUGE-L: TRACE's metrics.py `score_rouge(target, prediction)`, i.e.
  `rouge.Rouge(metrics=["rouge-l"]).get_scores(target, prediction, avg=True)["rouge-l"]["f"]`, rouge 1.0.1;
- edit similarity: TRACE's evaluations/eval_Py150.py `postprocess` then fuzzywuzzy 0.18.0 `fuzz.ratio`
  without python-Levenshtein (difflib, as TRACE's requirements.txt installs it); rapidfuzz 3.14.6
  `fuzz.ratio` is listed where it differs, to show the choice matters;
- SARI: the Hugging Face `sari` metric script (huggingface/evaluate metrics/sari/sari.py) with sacrebleu
  2.6.0, the script TRACE's metrics.py `caculate_sari` loads; its metric card's examples are included.
Accuracy has no library: its cases follow TRACE's string comparisons as described in scoring.py.
"""

from __future__ import annotations

import pytest

from loracl.engine import scoring
from loracl.engine.scoring import (
    METRICS,
    py150_postprocess,
    sari,
    score,
    trace_accuracy,
    trace_edit_similarity,
    trace_rouge_l,
    trace_sari,
)

# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        # C-STANCE (release targets are one letter): SEEKR's eval_CStance compares the first character
        ("A", "A", 1.0),
        ("A。", "A", 1.0),
        ("B", "A", 0.0),
        ("a", "A", 0.0),  # no lower-casing anywhere in TRACE
        # ScienceQA "A\nBecause ...": eval_ScienceQA.py @f896365 compares first characters only
        ("A\nBecause the wax reduces friction.", "A\nBecause Experiments can be designed ...", 1.0),
        ("A", "A\nBecause Experiments can be designed ...", 1.0),
        ("B\nBecause Experiments can be designed ...", "A\nBecause Experiments can be designed ...", 0.0),
        # NumGLUE-cm / NumGLUE-ds: whole-string equality, nothing stripped
        ("12", "12", 1.0),
        ("1", "12", 0.0),  # a first-character rule would wrongly accept this
        ("12.0", "12", 0.0),
        ("12 ", "12", 0.0),
        ("12\n", "12", 0.0),
        # FOMC's older word labels (LLM-CL_Benchmark/FOMC/test.json): whole-string equality
        ("dovish", "dovish", 1.0),
        ("Dovish", "dovish", 0.0),
        ("dovish.", "dovish", 0.0),
        # ScienceQA's older "Answer: X" layout: the character after "Answer: " (eval_ScienceQA.py @747512c)
        ("Answer: A\nBecause it is.", "Answer: A\nBecause Experiments ...", 1.0),
        ("Answer: B\nBecause it is.", "Answer: A\nBecause Experiments ...", 0.0),
        ("A\nBecause it is.", "Answer: A\nBecause Experiments ...", 0.0),  # no "Answer: " found
        # metrics.py: an empty prediction or target scores 0
        ("", "A", 0.0),
        ("", "", 0.0),
        ("5", "", 0.0),
    ],
)
def test_trace_accuracy_compares_as_trace_does(prediction: str, target: str, expected: float) -> None:
    assert trace_accuracy(prediction, [target]) == expected


def test_only_the_answer_separator_is_removed():
    """Our encoder puts one space between prompt and answer; TRACE puts nothing, so one leading space goes."""
    assert trace_accuracy(" 12", ["12"]) == 1.0
    assert trace_accuracy("  12", ["12"]) == 0.0
    assert trace_accuracy(" A", ["A"]) == 1.0
    assert trace_edit_similarity(" return x", ["return x"]) == 1.0


def test_trace_accuracy_takes_any_reference():
    assert trace_accuracy("7", ["5", "7"]) == 1.0
    assert trace_accuracy("7", []) == 0.0


# ---------------------------------------------------------------------------------------------- ROUGE-L

# (prediction, target, rouge 1.0.1 F as TRACE calls it)
ROUGE_REFERENCE = [
    ("The council approved the budget.", "The council approved the annual budget.", 0.9090909041322315),
    ("Motion carries. The vote was unanimous.", "The motion carries. Vote unanimous.", 0.5454545404958678),
    ("the cat sat", "The cat sat", 0.6666666616666668),  # case-sensitive: rouge-score's rouge_l gives 1.0
    # summary-level ROUGE-L is not symmetric: TRACE's order gives 0.5, the swapped order 0.749999995
    ("a c e d. c d c e", "b c b a e", 0.4999999950000001),
]


@pytest.mark.parametrize(("prediction", "target", "expected"), ROUGE_REFERENCE)
def test_trace_rouge_l_matches_the_rouge_package(prediction: str, target: str, expected: float) -> None:
    assert trace_rouge_l(prediction, [target]) == pytest.approx(expected, abs=1e-12)


def test_trace_rouge_l_scores_empty_and_unscorable_texts_zero():
    assert trace_rouge_l("", ["x"]) == 0.0
    assert trace_rouge_l("x", [""]) == 0.0
    assert trace_rouge_l("...", ["a."]) == 0.0  # the package raises: no sentence left after splitting at "."


def test_trace_rouge_l_survives_a_long_sentence():
    """The package's recursive LCS exceeds Python's default recursion limit on 1,200 words."""
    text = " ".join(f"w{i}" for i in range(1200))
    assert trace_rouge_l(text, [text]) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------- edit similarity


def test_py150_postprocess_replaces_literals_as_trace_does():
    assert py150_postprocess("x = <NUM_LIT> + <NUM_LIT:3>") == "x = 0 + 3"
    assert py150_postprocess("f ( '<STR_LIT>' , '<STR_LIT:utf-8>' , <CHAR_LIT> )") == "f ( '' , 'utf-8' ,  )"
    assert py150_postprocess("c == '<CHAR_LIT:a>' <EOL>") == "c == 'a' <EOL>"  # <EOL> is left alone


_LONG_TARGET = (
    "self . parser . add_argument ( '<STR_LIT>' , '<STR_LIT>' , dest = '<STR_LIT:verbose>' , action = "
    "'<STR_LIT:store_true>' , default = False , help = '<STR_LIT>' ) ; self . parser . add_argument ( "
    "'<STR_LIT>' , type = int , default = <NUM_LIT:10> , help = '<STR_LIT>' , required = False )"
)

# (prediction, target, fuzzywuzzy fuzz.ratio / 100 after postprocess; rapidfuzz's ratio in the comment)
FUZZ_REFERENCE = [
    ("return <NUM_LIT:0>", "return <NUM_LIT:1>", 0.88),  # 87.5 rounded to a whole percent
    ("self . assertEqual ( x , <STR_LIT> )", "self . assertEqual ( y , '<STR_LIT:abc>' )", 0.88),  # 88.14
    ("if x == <NUM_LIT> : <EOL>", "if x == <CHAR_LIT:a> :", 0.71),  # 71.43
    ("for i in range ( <NUM_LIT:10> ) :", "for j in xrange ( len ( parts ) - <NUM_LIT:1> ) :", 0.68),  # 67.74
    ("return self . name", "return name . self", 0.61),  # rapidfuzz: 66.67
    # a target of 200+ characters: difflib's autojunk heuristic applies (rapidfuzz and autojunk=False: 61.64)
    (
        "self . parser . add_argument ( '<STR_LIT>' , dest = '<STR_LIT:verbose>' , action = "
        "'<STR_LIT:store_true>' , default = True )",
        _LONG_TARGET,
        0.60,
    ),
    ("return x", "return x", 1.0),
    ("<STR_LIT>", "<STR_LIT>", 0.0),  # empty after postprocess: skipped by caculate_fuzz, so 0
    ("", "x = 1", 0.0),
]


@pytest.mark.parametrize(("prediction", "target", "expected"), FUZZ_REFERENCE)
def test_trace_edit_similarity_matches_fuzzywuzzy(prediction: str, target: str, expected: float) -> None:
    assert trace_edit_similarity(prediction, [target]) == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------- SARI

CARD_SOURCE = "About 95 species are currently accepted."
CARD_REFERENCES = [
    "About 95 species are currently known.",
    "About 95 species are now accepted.",
    "95 species are now accepted.",
]


def test_sari_gives_the_hugging_face_metric_card_examples():
    # metrics/sari/README.md: {'sari': 26.953601953601954} and a perfect match {'sari': 100.0}
    assert sari(CARD_SOURCE, "About 95 you now get in.", CARD_REFERENCES) == pytest.approx(
        0.26953601953601954, abs=1e-12
    )
    spaced = "About 95 species are currently accepted ."
    assert sari(spaced, spaced, [spaced]) == pytest.approx(1.0, abs=1e-12)
    assert sari(CARD_SOURCE, "About 95 you now get in.", []) == 0.0


TRACE_SOURCE = (
    "Provide a simplified version of the following paragraph in German.\n\n"
    "Die Stadt Zürich hat am Montag beschlossen, die Gebühren für Parkplätze im Zentrum deutlich zu erhöhen."
)
TRACE_ANSWER = "Die Stadt Zürich erhöht die Gebühren für Parkplätze."

# (prediction, the HF script's sari / 100 with sources=[prompt], references=[[answer]], as TRACE calls it)
SARI_REFERENCE = [
    ("Zürich erhöht die Parkgebühren im Zentrum.", 0.43880579297245966),
    ("", 0.2859262650929318),
    (TRACE_ANSWER, 0.9960317460317461),
    (TRACE_SOURCE.split("\n\n")[1], 0.4489799308878257),  # copying the paragraph
]


@pytest.mark.parametrize(("prediction", "expected"), SARI_REFERENCE)
def test_trace_sari_matches_the_hugging_face_script(prediction: str, expected: float) -> None:
    assert trace_sari(prediction, [TRACE_ANSWER], TRACE_SOURCE) == pytest.approx(expected, abs=1e-12)
    assert score(" " + prediction, [TRACE_ANSWER], "trace_sari", TRACE_SOURCE) == pytest.approx(expected)


def test_sari_lower_cases_and_tokenises_with_13a():
    assert sari("Der Hund, der bellt.", "DER HUND , DER BELLT .", ["der hund, der bellt."]) == 1.0
    tokens = ["über", "95", "arten", ",", "z", ".", "b", ".", "heute", "."]
    assert scoring._sari_tokens("Über 95 Arten, z.B. heute.") == tokens


def test_the_trace_metrics_are_registered_and_take_the_source():
    for name in ("trace_accuracy", "trace_rouge_l", "trace_edit_similarity", "trace_sari"):
        assert name in METRICS
    prediction = "About 95 you now get in."
    with_source = score(prediction, CARD_REFERENCES, "trace_sari", CARD_SOURCE)
    assert with_source == pytest.approx(0.26953601953601954)  # the metric card's example, above
    assert score(prediction, CARD_REFERENCES, "trace_sari") != pytest.approx(with_source)
    assert score("A", ["A"], "trace_accuracy", "ignored") == 1.0
