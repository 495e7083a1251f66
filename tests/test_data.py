"""Tests of loracl.data: the four task formats, their validation, and benchmark assembly.

Fixtures are written into tmp_path; the tests on the real shared data skip when it is absent.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loracl.data import (
    ORDERS,
    Example,
    benchmark_names,
    default_data_root,
    load_benchmark,
    load_cl_benchmark_task,
    load_jsonl_task,
    load_olora_task,
    load_superni_task,
    olora_prompt,
)
from loracl.errors import DataError

LABELS = ["yes", "no"]


# --- fixture builders ---------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records(task: str, split: str, n: int, prompt_key: str = "prompt", answer_key: str = "answer") -> list:
    return [{prompt_key: f"{task} {split} {i}\nAnswer:", answer_key: LABELS[i % 2]} for i in range(n)]


def make_cl_task(root: Path, name: str, n_train: int = 20, n_test: int = 6) -> Path:
    task_dir = root / name
    write_json(task_dir / "train.json", records(name, "train", n_train))
    write_json(task_dir / "test.json", records(name, "test", n_test))
    write_json(task_dir / "labels.json", LABELS)
    return task_dir


def make_olora_task(root: Path, category: str, name: str, n: int = 4) -> Path:
    task_dir = root / category / name
    for split in ("train", "dev", "test"):
        write_json(task_dir / f"{split}.json", records(name, split, n, "sentence", "label"))
    write_json(task_dir / "labels.json", LABELS)
    return task_dir


def make_jsonl_task(root: Path, name: str, n_train: int = 8, labels: bool = True) -> Path:
    task_dir = root / name
    write_jsonl(task_dir / "train.jsonl", records(name, "train", n_train))
    write_jsonl(task_dir / "test.jsonl", records(name, "test", 3))
    if labels:
        write_json(task_dir / "labels.json", LABELS)
    return task_dir


def superni_data(outputs: list[list[str]]) -> dict:
    instances = [{"id": f"t-{i}", "input": f"input {i}", "output": out} for i, out in enumerate(outputs)]
    return {"Definition": ["Do the thing."], "Positive Examples": [], "Instances": instances}


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- public constants ---------------------------------------------------------------------------------------


def test_orders_match_the_data_readme() -> None:
    assert list(ORDERS)[:6] == [f"order{i}" for i in range(1, 7)]
    assert ORDERS["order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    for name in ("order4", "order5", "order6"):
        assert len(ORDERS[name]) == 15 and len(set(ORDERS[name])) == 15
    assert set(ORDERS["order4"]) == set(ORDERS["order5"]) == set(ORDERS["order6"])


def test_benchmark_names() -> None:
    assert benchmark_names() == ["cl_benchmark", "olora", "superni", "trace", "jsonl"]


def test_example_needs_an_answer() -> None:
    with pytest.raises(ValueError):
        Example("p", ())


# --- cl_benchmark -------------------------------------------------------------------------------------------


def test_cl_benchmark_task_loads(tmp_path: Path) -> None:
    task = load_cl_benchmark_task(make_cl_task(tmp_path, "SST-2"))
    assert (task.name, task.metric, task.labels) == ("SST-2", "exact_match", LABELS)
    assert (len(task.train), len(task.test), task.validation) == (20, 6, [])
    assert task.train[1] == Example("SST-2 train 1\nAnswer:", ("no",))
    assert task.source == str(tmp_path / "SST-2")


def test_lookup_is_case_insensitive(tmp_path: Path) -> None:
    make_cl_task(tmp_path, "SST-2")
    (task,) = load_benchmark("cl_benchmark", data_dir=tmp_path, tasks=["sst-2"])
    assert task.name == "SST-2"


def test_unknown_task_lists_available(tmp_path: Path) -> None:
    make_cl_task(tmp_path, "SST-2")
    make_cl_task(tmp_path, "agnews")
    with pytest.raises(DataError) as excinfo:
        load_benchmark("cl_benchmark", data_dir=tmp_path, tasks=["imdb"])
    assert_one_line_error(excinfo, str(tmp_path), "'imdb'", "agnews, SST-2")


def _replace(name: str, data: Any) -> Callable[[Path], Path]:
    return lambda task_dir: write_json(task_dir / name, data)


def _write_text(name: str, text: str) -> Callable[[Path], Path]:
    def mutate(task_dir: Path) -> Path:
        (task_dir / name).write_text(text, encoding="utf-8")
        return task_dir / name

    return mutate


def _write_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def mutate(task_dir: Path) -> Path:
        (task_dir / name).write_bytes(data)
        return task_dir / name

    return mutate


def _delete(name: str) -> Callable[[Path], Path]:
    def mutate(task_dir: Path) -> Path:
        (task_dir / name).unlink()
        return task_dir / name

    return mutate


GOOD = {"prompt": "p", "answer": "yes"}
CL_ERRORS = {
    "missing train": (_delete("train.json"), "file not found"),
    "missing labels": (_delete("labels.json"), "file not found"),
    "truncated json": (_write_text("test.json", '[\n  {"prompt": "p",\n   "answer": '), "line 3, column"),
    "top level not a list": (_replace("train.json", {"prompt": "p"}), "JSON list"),
    "example not an object": (_replace("train.json", [GOOD, "text"]), "example 1 is not a JSON object"),
    "no answer": (_replace("train.json", [GOOD, GOOD, {"prompt": "p"}]), "example 2 has no 'answer' field"),
    "no prompt": (_replace("test.json", [{"answer": "yes"}]), "example 0 has no 'prompt' field"),
    "answer a number": (_replace("train.json", [{**GOOD, "answer": 3}]), "example 0: field 'answer'"),
    "blank prompt": (_replace("train.json", [GOOD, {**GOOD, "prompt": " "}]), "example 1: field 'prompt'"),
    "empty answer": (_replace("test.json", [{**GOOD, "answer": ""}]), "'answer' must be a non-empty string"),
    "empty split": (_replace("test.json", []), "no examples"),
    "labels not a list": (_replace("labels.json", {"yes": 1}), "non-empty JSON list of strings"),
    "labels not strings": (_replace("labels.json", ["yes", 2]), "label 1 must be a non-empty string"),
    "not utf-8": (_write_bytes("train.json", b'[{"prompt": "caf\xe9", "answer": "yes"}]'), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CL_ERRORS))
def test_cl_benchmark_errors_name_the_file(tmp_path: Path, case: str) -> None:
    mutate, expected = CL_ERRORS[case]
    task_dir = make_cl_task(tmp_path, "agnews")
    bad_file = mutate(task_dir)
    with pytest.raises(DataError) as excinfo:
        load_cl_benchmark_task(task_dir)
    assert_one_line_error(excinfo, f"{bad_file}:", expected)


def test_missing_task_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_cl_benchmark_task(tmp_path / "nope")
    assert_one_line_error(excinfo, str(tmp_path / "nope"), "not found")


def test_answer_outside_labels_warns_once_per_file(tmp_path: Path) -> None:
    task_dir = make_cl_task(tmp_path, "agnews")
    write_json(task_dir / "train.json", [GOOD, {**GOOD, "answer": "maybe"}, {**GOOD, "answer": "?"}])
    with pytest.warns(UserWarning) as record:
        task = load_cl_benchmark_task(task_dir)
    assert len(record) == 1
    assert str(task_dir / "train.json") in str(record[0].message)
    assert "2 of 3 examples" in str(record[0].message)
    assert [ex.answers[0] for ex in task.train] == ["yes", "maybe", "?"]  # kept


# --- olora --------------------------------------------------------------------------------------------------


def test_olora_task_builds_upstream_prompts(tmp_path: Path) -> None:
    make_olora_task(tmp_path, "SC", "SST-2")
    task = load_olora_task(tmp_path, "sst-2")
    expected = (
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: yes, no \nSST-2 train 0\nAnswer:\nAnswer:"
    )
    assert task.train[0] == Example(expected, ("yes",))
    assert (task.name, task.metric, task.labels, task.validation) == ("SST-2", "exact_match", LABELS, [])
    assert task.test[0].prompt.endswith("SST-2 test 0\nAnswer:\nAnswer:")  # test.json, not dev.json


def test_olora_copa_and_unknown_category_prompts() -> None:
    assert olora_prompt("COPA", ["A", "B"], "Which one?\nA: x\nB: y") == "Which one?\nA: x\nB: y\nAnswer:"
    generic = "Choose one from the option.\nOption: a, b \ntext\nAnswer:"
    assert olora_prompt("Mine", ["a", "b"], "text") == generic


def test_olora_errors(tmp_path: Path) -> None:
    task_dir = make_olora_task(tmp_path, "TC", "agnews")
    make_olora_task(tmp_path, "SC", "yelp")
    with pytest.raises(DataError) as excinfo:
        load_olora_task(tmp_path, "dbpedia")
    assert_one_line_error(excinfo, str(tmp_path), "'dbpedia'", "agnews, yelp")
    write_json(task_dir / "train.json", [{"sentence": "s", "label": "yes"}, {"sentence": "s"}])
    with pytest.raises(DataError) as excinfo:
        load_olora_task(tmp_path, "agnews")
    assert_one_line_error(excinfo, str(task_dir / "train.json"), "example 1 has no 'label' field")


def test_olora_same_task_in_two_categories_is_ambiguous(tmp_path: Path) -> None:
    make_olora_task(tmp_path, "SC", "imdb")
    make_olora_task(tmp_path, "TC", "imdb")
    with pytest.raises(DataError, match="ambiguous"):
        load_olora_task(tmp_path, "imdb")


def test_olora_benchmark_needs_data_dir() -> None:
    with pytest.raises(DataError, match="data_dir"):
        load_benchmark("olora", order="order1")


# --- superni ------------------------------------------------------------------------------------------------


def test_superni_generation_task(tmp_path: Path) -> None:
    outputs = [[f"answer {i}", f"alt {i}"] for i in range(10)]
    path = write_json(tmp_path / "task001_make_titles.json", superni_data(outputs))
    task = load_superni_task(path, test_size=3, seed=1)
    assert (task.name, task.metric, task.labels) == ("task001_make_titles", "rouge_l", None)
    assert (len(task.train), len(task.test)) == (7, 3)
    example = task.test[0]
    i = int(example.prompt.split("input ")[1].split("\n")[0])
    prompt = f"Definition: Do the thing.\n\nInput: input {i}\nOutput:"
    assert example == Example(prompt, (f"answer {i}", f"alt {i}"))
    assert {ex.prompt for ex in task.train}.isdisjoint(ex.prompt for ex in task.test)
    assert load_superni_task(path, test_size=3, seed=1) == task
    assert load_superni_task(path, test_size=3, seed=2).test != task.test


def test_superni_classification_and_test_size_limits(tmp_path: Path) -> None:
    path = write_json(tmp_path / "task002_sentiment.json", superni_data([[LABELS[i % 2]] for i in range(9)]))
    task = load_superni_task(path)  # test_size 100 > half of 9 instances
    assert (task.metric, task.labels) == ("rouge_l", ["no", "yes"])  # ROUGE-L for every SuperNI task
    assert (len(task.train), len(task.test)) == (5, 4)
    two = write_json(tmp_path / "task003_tiny.json", superni_data([["a"], ["b"]]))
    assert (len(load_superni_task(two).train), len(load_superni_task(two).test)) == (1, 1)


def test_superni_benchmark_lookup_by_short_id(tmp_path: Path) -> None:
    write_json(tmp_path / "task002_sentiment.json", superni_data([[LABELS[i % 2]] for i in range(9)]))
    write_json(tmp_path / "task010_other.json", superni_data([[f"o{i}"] for i in range(6)]))
    tasks = load_benchmark("superni", data_dir=tmp_path, tasks=["TASK010", "task002_sentiment"])
    assert [t.name for t in tasks] == ["task010_other", "task002_sentiment"]
    everything = load_benchmark("superni", data_dir=tmp_path)  # no list and no order: every file, sorted
    assert [t.name for t in everything] == ["task002_sentiment", "task010_other"]
    with pytest.raises(DataError, match="twice"):
        load_benchmark("superni", data_dir=tmp_path, tasks=["task002", "task002_sentiment"])


SUPERNI_ERRORS = {
    "top level a list": ([], "JSON object"),
    "no instances": ({"Definition": ["d"]}, "no 'Instances' field"),
    "instances not a list": ({"Definition": ["d"], "Instances": {}}, "'Instances' must be a JSON list"),
    "no definition": ({"Instances": [{"input": "i", "output": ["o"]}] * 2}, "no 'Definition' field"),
    "instance without output": (
        {"Definition": ["d"], "Instances": [{"input": "i", "output": ["o"]}, {"input": "i"}]},
        "instance 1 has no 'output' field",
    ),
    "empty output list": ({"Definition": ["d"], "Instances": [{"input": "i", "output": []}]}, "empty list"),
    "non-string output": (
        {"Definition": ["d"], "Instances": [{"input": "i", "output": ["o", None]}]},
        "instance 0: field 'output' item 1",
    ),
    "one instance": ({"Definition": ["d"], "Instances": [{"input": "i", "output": ["o"]}]}, "at least 2"),
}


@pytest.mark.parametrize("case", list(SUPERNI_ERRORS))
def test_superni_errors_name_the_file(tmp_path: Path, case: str) -> None:
    data, expected = SUPERNI_ERRORS[case]
    path = write_json(tmp_path / "task009_bad.json", data)
    with pytest.raises(DataError) as excinfo:
        load_superni_task(path)
    assert_one_line_error(excinfo, f"{path}:", expected)


# --- jsonl --------------------------------------------------------------------------------------------------


def test_jsonl_task(tmp_path: Path) -> None:
    task_dir = make_jsonl_task(tmp_path, "mine", labels=False)
    with (task_dir / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write('\n   \n{"prompt": "many", "answer": ["one", "two"]}\n')
    task = load_jsonl_task(task_dir)
    assert (task.name, task.metric, task.labels) == ("mine", "rouge_l", None)
    assert (len(task.train), len(task.test)) == (9, 3)
    assert task.train[-1] == Example("many", ("one", "two"))
    labelled = load_jsonl_task(make_jsonl_task(tmp_path, "classes"))
    assert (labelled.metric, labelled.labels) == ("exact_match", LABELS)


JSONL_ERRORS = {
    "bad json": ('{"prompt": "p", "answer": "yes"}\n\n{"prompt": "p", "answer": }\n', "line 3: invalid JSON"),
    "missing answer": ('{"prompt": "p", "answer": "yes"}\n{"prompt": "p"}\n', "line 2 has no 'answer' field"),
    "not an object": ('["p", "yes"]\n', "line 1 is not a JSON object"),
    "empty answer list": ('{"prompt": "p", "answer": []}\n', "line 1: field 'answer' is an empty list"),
    "blank file": ("\n\n", "no examples"),
}


@pytest.mark.parametrize("case", list(JSONL_ERRORS))
def test_jsonl_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    text, expected = JSONL_ERRORS[case]
    task_dir = make_jsonl_task(tmp_path, "mine")
    (task_dir / "test.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_jsonl_task(task_dir)
    assert_one_line_error(excinfo, f"{task_dir / 'test.jsonl'}:", expected)


# --- load_benchmark: task lists, caps and validation --------------------------------------------------------


@pytest.fixture
def cl_root(tmp_path: Path) -> Path:
    for name in ("dbpedia", "amazon", "yahoo", "agnews"):
        make_cl_task(tmp_path, name, n_train=40, n_test=12)
    return tmp_path


def prompts(examples: list[Example]) -> list[str]:
    return [ex.prompt for ex in examples]


def test_order_and_explicit_tasks(cl_root: Path) -> None:
    tasks = load_benchmark("cl_benchmark", data_dir=cl_root, order="order1")
    assert [t.name for t in tasks] == ORDERS["order1"]
    override = load_benchmark("cl_benchmark", data_dir=str(cl_root), order="order1", tasks=["agnews"])
    assert [t.name for t in override] == ["agnews"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"order": "order9"}, "known orders: order1"),
        ({"order": "superni1"}, "is a superni order"),
        ({"tasks": ["agnews", "AGNEWS"]}, "same task twice"),
        ({"tasks": []}, "task list is empty"),
        ({"order": "order1", "max_train": 0}, "max_train"),
        ({"order": "order1", "validation_fraction": 1.0}, "validation_fraction"),
    ],
)
def test_bad_benchmark_settings(cl_root: Path, kwargs: dict, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_benchmark("cl_benchmark", data_dir=cl_root, **kwargs)


def test_unknown_benchmark_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cl_benchmark, olora, superni, trace, jsonl"):
        load_benchmark("glue", data_dir=tmp_path, order="order1")
    with pytest.raises(DataError, match="data folder not found"):
        load_benchmark("jsonl", data_dir=tmp_path / "absent", tasks=["x"])


def test_caps_are_deterministic_per_task(cl_root: Path) -> None:
    def load(order: str, seed: int) -> dict:
        tasks = load_benchmark(
            "cl_benchmark", data_dir=cl_root, order=order, max_train=10, max_test=5, seed=seed
        )
        return {t.name: t for t in tasks}

    first, reordered, other_seed = load("order1", 0), load("order3", 0), load("order1", 1)
    for name, task in first.items():
        assert (len(task.train), len(task.test)) == (10, 5)
        assert task.train == reordered[name].train and task.test == reordered[name].test
        full = load_cl_benchmark_task(cl_root / name)
        assert prompts(task.train) == [p for p in prompts(full.train) if p in set(prompts(task.train))]
    assert first["agnews"].train != other_seed["agnews"].train


def test_validation_is_carved_from_capped_train(cl_root: Path) -> None:
    tasks = load_benchmark("cl_benchmark", data_dir=cl_root, tasks=["agnews", "yahoo"], max_train=20,
                           validation_fraction=0.25, seed=3)
    for task in tasks:
        assert (len(task.train), len(task.validation), len(task.test)) == (15, 5, 12)
        assert set(prompts(task.train)).isdisjoint(prompts(task.validation))
    (uncapped,) = load_benchmark("cl_benchmark", data_dir=cl_root, tasks=["agnews"], validation_fraction=0.1)
    assert (len(uncapped.train), len(uncapped.validation)) == (36, 4)


def test_empty_task_after_caps(tmp_path: Path) -> None:
    make_cl_task(tmp_path, "tiny", n_train=1)
    with pytest.raises(DataError, match="no train examples left"):
        load_benchmark("cl_benchmark", data_dir=tmp_path, tasks=["tiny"], validation_fraction=0.9)


def test_jsonl_benchmark(tmp_path: Path) -> None:
    make_jsonl_task(tmp_path, "first")
    make_jsonl_task(tmp_path, "second", labels=False)
    tasks = load_benchmark("jsonl", data_dir=tmp_path, tasks=["second", "first"], validation_fraction=0.25)
    assert [(t.name, t.metric, len(t.train), len(t.validation)) for t in tasks] == [
        ("second", "rouge_l", 6, 2),
        ("first", "exact_match", 6, 2),
    ]
    every = load_benchmark("jsonl", data_dir=tmp_path)  # no order and no list: every task, in name order
    assert [t.name for t in every] == ["first", "second"]


# --- data root ----------------------------------------------------------------------------------------------


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORACL_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    make_cl_task(tmp_path / "cl_benchmark", "agnews")
    (task,) = load_benchmark("cl_benchmark", data_dir=None, tasks=["agnews"])
    assert task.source == str(tmp_path / "cl_benchmark" / "agnews")
    monkeypatch.setenv("LORACL_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="LORACL_DATA_DIR"):
        default_data_root()


# --- the real shared data -----------------------------------------------------------------------------------




def test_shared_order1(shared_root: Path) -> None:
    tasks = load_benchmark("cl_benchmark", data_dir=None, order="order1")
    assert [t.name for t in tasks] == ORDERS["order1"]
    for task in tasks:
        assert (len(task.train), len(task.test), task.metric) == (500, 100, "exact_match")
        assert all(ex.prompt.endswith("Answer:") for ex in task.train + task.test)
        assert all(ex.answers[0] in task.labels for ex in task.train)


def test_shared_superni_sample(shared_root: Path) -> None:
    loaded = load_benchmark("superni", data_dir=None, tasks=None, order=None)
    tasks = {t.name.split("_")[0]: t for t in loaded}
    assert set(tasks) == {"task833", "task1356", "task339"}
    assert (tasks["task833"].metric, tasks["task833"].labels) == ("rouge_l", ["negative", "positive"])
    assert tasks["task1356"].metric == tasks["task339"].metric == "rouge_l"
    assert tasks["task1356"].labels is None and tasks["task339"].labels is None
    for ex in tasks["task339"].train + tasks["task339"].test:
        assert ex.prompt.startswith("Definition: ") and ex.prompt.endswith("\nOutput:")


# Category folders of the upstream O-LoRA CL_Benchmark for each shared task.
OLORA_CATEGORIES = {
    **dict.fromkeys(["agnews", "dbpedia", "yahoo"], "TC"),
    **dict.fromkeys(["amazon", "yelp", "IMDB", "SST-2"], "SC"),
    **dict.fromkeys(["MNLI", "CB", "RTE"], "NLI"),
}  # the other tasks sit in a category folder named like themselves


def test_olora_prompts_match_shared_prompts(shared_root: Path, tmp_path: Path) -> None:
    """Rebuild an upstream-shaped tree from the shared prompts; the olora loader must reproduce them."""
    for source in sorted((shared_root / "cl_benchmark").iterdir()):
        labels = json.loads((source / "labels.json").read_text(encoding="utf-8"))
        category = OLORA_CATEGORIES.get(source.name, source.name)
        header = olora_prompt(category, labels, "\0").split("\0")[0]
        task_dir = tmp_path / category / source.name
        for split in ("train", "test"):
            shared = json.loads((source / f"{split}.json").read_text(encoding="utf-8"))
            assert all(r["prompt"].startswith(header) for r in shared), source.name
            sentences = [r["prompt"][len(header) : -len("\nAnswer:")] for r in shared]
            upstream = [{"sentence": s, "label": r["answer"]} for s, r in zip(sentences, shared, strict=True)]
            write_json(task_dir / f"{split}.json", upstream)
        write_json(task_dir / "labels.json", labels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MNLI's shared test split has two "-" answers outside its labels
            rebuilt, shared_task = load_olora_task(tmp_path, source.name), load_cl_benchmark_task(source)
        assert rebuilt.train == shared_task.train and rebuilt.test == shared_task.test
