"""On-disk task formats: the `Example`/`Task` types and one loader per format.

Every loader returns the task's full train and test splits with `validation=[]`; `load_benchmark` applies
caps and carves validation. Problems with a file raise a one-line DataError naming the file and, where it
applies, the bad record: `example N` / `instance N` is the 0-based position in a JSON list, `line N` the
1-based line of a JSONL file.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracl.data.paths import find_named, require_dir, subdirs
from loracl.errors import DataError
from loracl.files import UnsafeFileError, first_lone_surrogate, read_text_limited

EXACT_MATCH = "exact_match"
ROUGE_L = "rouge_l"
# TRACE's own metric per task (its evaluations/*.py); loracl.engine.scoring implements every name here.
TRACE_ACCURACY = "trace_accuracy"
TRACE_ROUGE_L = "trace_rouge_l"
TRACE_EDIT_SIMILARITY = "trace_edit_similarity"
TRACE_SARI = "trace_sari"
# TRACE's eight tasks, in the order of its training scripts, with the metric each is scored by.
TRACE_METRICS: dict[str, str] = {
    "C-STANCE": TRACE_ACCURACY,
    "FOMC": TRACE_ACCURACY,
    "MeetingBank": TRACE_ROUGE_L,
    "Py150": TRACE_EDIT_SIMILARITY,
    "ScienceQA": TRACE_ACCURACY,
    "NumGLUE-cm": TRACE_ACCURACY,
    "NumGLUE-ds": TRACE_ACCURACY,
    "20Minuten": TRACE_SARI,
}


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answers; `answers[0]` is the training target."""

    prompt: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.answers:
            raise ValueError("an Example needs at least one answer")


@dataclass
class Task:
    """One task of a continual-learning sequence."""

    name: str
    train: list[Example]
    test: list[Example]
    validation: list[Example]
    labels: list[str] | None  # closed label set of a classification task, else None
    metric: str  # EXACT_MATCH, ROUGE_L or one of TRACE_METRICS' values
    source: str  # the folder or file it was read from


# --- reading and validating JSON -------------------------------------------------------------------------

Items = list[tuple[str, Any]]  # (location used in error messages, decoded record)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {str: "string", int: "number", float: "number", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if value == "" else "a blank string"
    return _json_type(value)


def _read_text(path: Path) -> str:
    """A data file's text; only a regular UTF-8 file of bounded size is read (a named pipe would block and
    /dev/zero would never end), anything else is a one-line DataError naming the file."""
    try:
        return read_text_limited(path)
    except UnsafeFileError as exc:
        raise DataError(str(exc)) from None


def _decode_json(text: str, where: str) -> Any:
    """json.loads with every decoding failure as a DataError naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        place = f"line {exc.lineno}, column {exc.colno}" if "\n" in text else f"column {exc.colno}"
        raise DataError(f"{where}invalid JSON at {place}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{where}JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise DataError(f"{where}invalid JSON: {exc}") from None


def read_json(path: Path) -> Any:
    """Decode a whole JSON file, reporting syntax errors with their line and column."""
    return _decode_json(_read_text(path), f"{path}: ")


def _json_list_items(path: Path) -> Items:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON list of examples, got {_json_type(data)}")
    return [(f"{path}: example {i}", record) for i, record in enumerate(data)]


def _jsonl_items(path: Path) -> Items:
    items: Items = []
    # Split on "\n" only: str.splitlines would also break on U+2028 etc., which JSON strings may hold raw.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        items.append((f"{path}: line {number}", _decode_json(line, f"{path}: line {number}: ")))
    return items


def _text(value: Any, what: str) -> str:
    """Every text a loader keeps (prompt, answer, label, definition) passes here."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what} must be a non-empty string, got {_describe(value)}")
    # JSON's "\ud800" escape decodes to a lone surrogate, which tokenizers and UTF-8 writers reject mid-run.
    if first_lone_surrogate(value) is not None:
        raise DataError(f"{what} holds a lone surrogate (not valid Unicode text)")
    return value


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where} has no '{key}' field")
    return record[key]


def _answers(value: Any, where: str, key: str, allow_list: bool) -> tuple[str, ...]:
    if allow_list and isinstance(value, list):
        if not value:
            raise DataError(f"{where}: field '{key}' is an empty list")
        return tuple(_text(item, f"{where}: field '{key}' item {j}") for j, item in enumerate(value))
    return (_text(value, f"{where}: field '{key}'"),)


@dataclass(frozen=True)
class _Fields:
    """Which record fields hold the prompt text and the answer(s)."""

    prompt: str
    answer: str
    answer_list_ok: bool = False


_PROMPT_ANSWER = _Fields("prompt", "answer")
_JSONL_FIELDS = _Fields("prompt", "answer", answer_list_ok=True)
_OLORA_FIELDS = _Fields("sentence", "label")
_SUPERNI_FIELDS = _Fields("input", "output", answer_list_ok=True)


def _parse_split(
    items: Items,
    path: Path,
    fields: _Fields,
    labels: Sequence[str] | None = None,
    make_prompt: Callable[[str], str] = str,
) -> list[Example]:
    """Validate every record, build the examples, and check them against `labels`."""
    examples = []
    for where, record in items:
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a JSON object (got {_json_type(record)})")
        text = _text(_field(record, fields.prompt, where), f"{where}: field '{fields.prompt}'")
        answers = _answers(_field(record, fields.answer, where), where, fields.answer, fields.answer_list_ok)
        examples.append(Example(make_prompt(text), answers))
    if not examples:
        raise DataError(f"{path}: no examples (the split is empty)")
    if labels is not None:
        _warn_unknown_answers(examples, labels, path)
    return examples


def _warn_unknown_answers(examples: list[Example], labels: Sequence[str], path: Path) -> None:
    # Kept rather than rejected: such examples are still trainable, but the label set looks out of sync.
    allowed = set(labels)
    bad = sum(1 for ex in examples if any(answer not in allowed for answer in ex.answers))
    if bad:
        message = f"{path}: {bad} of {len(examples)} examples have an answer not in labels.json"
        warnings.warn(message, stacklevel=2)


def _split_paths(task_dir: Path, suffix: str, with_test: bool = True) -> list[Path]:
    """`train<suffix>` and (with_test) `test<suffix>` of a task folder; a missing one is named with its task,
    since some upstream releases ship a task without its train file."""
    splits = ("train", "test") if with_test else ("train",)
    paths = [task_dir / f"{split}{suffix}" for split in splits]
    for split, path in zip(splits, paths, strict=True):
        if not os.path.lexists(path):  # a dangling link is left to the reader, which names it as such
            raise DataError(f"{path}: file not found; task '{task_dir.name}' has no {split} split")
    return paths


def _read_splits(
    task_dir: Path,
    suffix: str,
    read_items: Callable[[Path], Items],
    fields: _Fields,
    labels: Sequence[str] | None,
    make_prompt: Callable[[str], str] = str,
    with_test: bool = True,
) -> tuple[list[Example], list[Example]]:
    """The train and test splits of a task folder (`train<suffix>`, `test<suffix>`); without `with_test` the
    test file is never opened (a run selecting on validation must not see test data) and test is empty."""
    paths = _split_paths(task_dir, suffix, with_test)
    train, *test = (_parse_split(read_items(p), p, fields, labels, make_prompt) for p in paths)
    return train, test[0] if test else []


def _task_name(path: Path, name: str | None = None) -> str:
    """`name` (default: the folder's name), which must be valid text: a file name whose bytes are not UTF-8
    reaches Python with lone surrogates, and the name seeds the caps and is printed and written in the run."""
    name = path.name if name is None else name
    if first_lone_surrogate(name) is not None:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")  # the bytes as \xe9, printable
        raise DataError(f"{shown}: the task name is not valid UTF-8 text; rename it")
    return name


def read_labels(path: Path) -> list[str]:
    """A labels.json file: a non-empty JSON list of non-empty strings."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        got = "an empty list" if data == [] else _json_type(data)
        raise DataError(f"{path}: labels must be a non-empty JSON list of strings, got {got}")
    return [_text(label, f"{path}: label {i}") for i, label in enumerate(data)]


# --- cl_benchmark: <dir>/<Task>/{train,test,labels}.json with ready-made prompts -------------------------


def load_cl_benchmark_task(task_dir: Path, *, with_test: bool = True) -> Task:
    """One task of the shared `cl_benchmark` layout (prompts already hold instruction and options)."""
    task_dir = require_dir(Path(task_dir), "task folder")
    labels = read_labels(task_dir / "labels.json")
    train, test = _read_splits(
        task_dir, ".json", _json_list_items, _PROMPT_ANSWER, labels, with_test=with_test
    )
    return Task(_task_name(task_dir), train, test, [], labels, EXACT_MATCH, str(task_dir))


# --- olora: upstream O-LoRA CL_Benchmark, <root>/<Category>/<task>/{train,dev,test,labels}.json -----------

# O-LoRA's configs/instruction_config_cl.json, keyed by category folder (lower-cased).
_OLORA_INSTRUCTIONS = {
    "nli": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "qqp": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "sc": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "tc": "What is the topic of the following paragraph? Choose one from the option.\n",
    "boolqa": "According to the following passage, is the question true or false? "
    "Choose one from the option.\n",
    "multirc": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.\n",
    "wic": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.\n",
}
# A user's own category gets the generic tail of the upstream instructions.
_OLORA_FALLBACK_INSTRUCTION = "Choose one from the option.\n"
# COPA sentences already hold the question and both choices: upstream adds neither instruction nor options.
_OLORA_BARE_CATEGORIES = {"copa"}


def olora_prompt(category: str, labels: Sequence[str], sentence: str) -> str:
    """Build the prompt O-LoRA builds (and the shared cl_benchmark stores) for one sentence."""
    if category.lower() in _OLORA_BARE_CATEGORIES:
        return f"{sentence}\nAnswer:"
    instruction = _OLORA_INSTRUCTIONS.get(category.lower(), _OLORA_FALLBACK_INSTRUCTION)
    return f"{instruction}Option: {', '.join(labels)} \n{sentence}\nAnswer:"


def _find_olora_task(root: Path, name: str) -> Path:
    require_dir(root, "O-LoRA CL_Benchmark folder")
    candidates = [(task.name, task) for category in subdirs(root) for task in subdirs(category)]
    return find_named(name, candidates, root, "O-LoRA task")


def load_olora_task(root: Path, name: str, *, with_test: bool = True) -> Task:
    """Task `name` of an upstream O-LoRA `CL_Benchmark` folder, searched in every category folder.

    dev.json is ignored: upstream it repeats test.json; validation is carved from train instead.
    """
    task_dir = _find_olora_task(Path(root), name)
    category = task_dir.parent.name
    labels = read_labels(task_dir / "labels.json")

    def make_prompt(sentence: str) -> str:
        return olora_prompt(category, labels, sentence)

    train, test = _read_splits(
        task_dir, ".json", _json_list_items, _OLORA_FIELDS, labels, make_prompt, with_test=with_test
    )
    return Task(_task_name(task_dir), train, test, [], labels, EXACT_MATCH, str(task_dir))


# --- superni: Super-NaturalInstructions task objects, one file per task or a folder per task ---------------

_MAX_CLASSIFICATION_LABELS = 10


def _superni_definition(data: dict[str, Any], path: Path) -> str:
    definition = _field(data, "Definition", f"{path}: the task object")
    if isinstance(definition, list) and definition:
        definition = definition[0]
    return _text(definition, f"{path}: 'Definition'").strip()


def _superni_labels(examples: list[Example]) -> list[str] | None:
    """The label set if the task looks like classification (few distinct single outputs), else None."""
    if any(len(ex.answers) != 1 for ex in examples):
        return None
    distinct = {ex.answers[0] for ex in examples}
    if len(distinct) <= _MAX_CLASSIFICATION_LABELS and len(distinct) < len(examples) / 2:
        return sorted(distinct)
    return None


def _split_test(examples: list[Example], test_size: int, seed: int, path: Path) -> tuple[list, list]:
    if test_size < 1:
        raise DataError(f"{path}: test_size must be at least 1, got {test_size}")
    if len(examples) < 2:
        raise DataError(f"{path}: needs at least 2 instances to split into train and test, has 1")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, min(test_size, len(shuffled) // 2))
    return shuffled[n_test:], shuffled[:n_test]


def superni_prompt(definition: str, text: str) -> str:
    """The prompt the superni loaders build for one instance."""
    return f"Definition: {definition}\n\nInput: {text}\nOutput:"


def _superni_examples(path: Path) -> list[Example]:
    """The instances of one SuperNI task object (a task file, or a split file of a task folder)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object (a SuperNI task), got {_json_type(data)}")
    definition = _superni_definition(data, path)
    instances = _field(data, "Instances", f"{path}: the task object")
    if not isinstance(instances, list):
        raise DataError(f"{path}: 'Instances' must be a JSON list, got {_json_type(instances)}")
    items = [(f"{path}: instance {i}", record) for i, record in enumerate(instances)]

    def make_prompt(text: str) -> str:
        return superni_prompt(definition, text)

    return _parse_split(items, path, _SUPERNI_FIELDS, make_prompt=make_prompt)


def _superni_task(name: str, train: list[Example], test: list[Example], source: Path) -> Task:
    # Every SuperNI task is scored with ROUGE-L, classification included: the field's convention (GainLoRA's
    # and SAPT's score.py read predict_eval_rougeL_for_<task>). The label set only bounds the generation.
    return Task(name, train, test, [], _superni_labels(train + test), ROUGE_L, str(source))


def load_superni_task(path: Path, *, test_size: int = 100, seed: int = 0, with_test: bool = True) -> Task:
    """A Super-NaturalInstructions task file, split deterministically into train and test. The file holds
    every instance: without `with_test` the test part is read with it, dropped at once, and the label set
    (which only bounds the generation) comes from train alone."""
    path = Path(path)
    train, test = _split_test(_superni_examples(path), test_size, seed, path)
    return _superni_task(_task_name(path, path.stem), train, test if with_test else [], path)


def load_superni_task_dir(task_dir: Path, *, with_test: bool = True) -> Task:
    """A SuperNI task folder as GainLoRA and O-LoRA distribute them, `{train,dev,test}.json`, each a task
    object. The official test split is kept as it is. dev.json is never read: upstream it may be the test
    split itself, so selecting on it would select on test; validation is carved from train instead."""
    task_dir = require_dir(Path(task_dir), "task folder")
    train, *test = (_superni_examples(path) for path in _split_paths(task_dir, ".json", with_test))
    return _superni_task(_task_name(task_dir), train, test[0] if test else [], task_dir)


# --- trace: TRACE's LLM-CL-Benchmark, <dir>/<Task>/{train,eval,test}.json with ready-made prompts ----------


def trace_metric(name: str, where: Path) -> str:
    """TRACE's metric for task `name` (any case). Another name is refused rather than given a guessed metric;
    a folder of other tasks in this layout loads with the generic formats."""
    for known, metric in TRACE_METRICS.items():
        if known.lower() == name.lower():
            return metric
    raise DataError(
        f"{where}: '{name}' is not a TRACE task (known: {', '.join(TRACE_METRICS)}); "
        "for other tasks use benchmark.name=jsonl or cl_benchmark"
    )


def load_trace_task(task_dir: Path, *, with_test: bool = True) -> Task:
    """One task of TRACE: train.json and test.json, lists of `{"prompt", "answer"}`. eval.json is not read
    (validation is carved from train, as for every benchmark). No label set: TRACE scores the generation with
    its own metric per task, and some tasks ship no labels.json."""
    task_dir = require_dir(Path(task_dir), "task folder")
    name = _task_name(task_dir)
    metric = trace_metric(name, task_dir)  # before reading: a folder of other tasks fails at once
    train, test = _read_splits(task_dir, ".json", _json_list_items, _PROMPT_ANSWER, None, with_test=with_test)
    return Task(name, train, test, [], None, metric, str(task_dir))


# --- jsonl: a user's own tasks, <dir>/<task>/{train,test}.jsonl [+ labels.json] ----------------------------


def load_jsonl_task(task_dir: Path, *, with_test: bool = True) -> Task:
    """A user's task folder; exact match when it has labels.json (a closed label set), else ROUGE-L."""
    task_dir = require_dir(Path(task_dir), "task folder")
    labels_path = task_dir / "labels.json"
    # A dangling link named labels.json is reported rather than silently turning the task into ROUGE-L.
    has_labels = labels_path.exists() or labels_path.is_symlink()
    labels = read_labels(labels_path) if has_labels else None
    train, test = _read_splits(task_dir, ".jsonl", _jsonl_items, _JSONL_FIELDS, labels, with_test=with_test)
    metric = EXACT_MATCH if labels is not None else ROUGE_L
    return Task(_task_name(task_dir), train, test, [], labels, metric, str(task_dir))


def read_jsonl_examples(path: Path, labels: Sequence[str] | None = None) -> list[Example]:
    """The examples of one JSONL file in the fields of the jsonl benchmark's splits (a `prompt` and an
    `answer` string or list per line), checked as they are (a forgetting guard set is such a file)."""
    return _parse_split(_jsonl_items(path), path, _JSONL_FIELDS, labels)


# --- the split shipped beside train and test ---------------------------------------------------------------


def _list_split(fields: _Fields) -> Callable[[Path], list[Example]]:
    return lambda path: _parse_split(_json_list_items(path), path, fields)


# Per folder format, the file of the split shipped beside train and test (upstream dev.json often repeats
# test.json) and how its examples are read. Runs never read it; `loracl data check` validates and counts it.
_HELD_OUT: dict[str, tuple[str, Callable[[Path], list[Example]]]] = {
    "cl_benchmark": ("dev.json", _list_split(_PROMPT_ANSWER)),
    "olora": ("dev.json", _list_split(_OLORA_FIELDS)),
    "superni": ("dev.json", _superni_examples),
    "trace": ("eval.json", _list_split(_PROMPT_ANSWER)),
}


def held_out_split(fmt: str, task: Task) -> tuple[str, int] | None:
    """The file name and size of the split a task of format `fmt` ships beside train and test, read and
    validated like them; None when its folder has none (or the task is a single file)."""
    entry = _HELD_OUT.get(fmt)
    source = Path(task.source)
    if entry is None or not source.is_dir():
        return None
    file_name, read = entry
    path = source / file_name
    return (file_name, len(read(path))) if os.path.lexists(path) else None
