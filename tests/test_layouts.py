"""The benchmark layouts as the field distributes them (SuperNI task folders and task files, TRACE, O-LoRA's
CL_Benchmark), the named orders of each benchmark, layout detection and `loracl data check`.

Fixtures are small copies of each layout written into tmp_path; the last tests read the real shared data
and skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safety import one_line, tree_digest
from test_data import assert_one_line_error, make_cl_task, make_jsonl_task, make_olora_task, write_json

from loracl.cli import main
from loracl.data import (
    ORDER_BENCHMARK,
    ORDERS,
    TRACE_METRICS,
    Example,
    default_order,
    load_benchmark,
    load_superni_task_dir,
    load_trace_task,
    orders_for,
)
from loracl.data.check import check_folder, detect_benchmark
from loracl.data.formats import superni_prompt
from loracl.errors import DataError

SUPERNI1, SUPERNI2, TRACE = ORDERS["superni1"], ORDERS["superni2"], ORDERS["trace"]
CLASSIFICATION = {"task363_sst2_polarity_classification": ["POS", "NEG"]}


# --- layout builders --------------------------------------------------------------------------------------


def superni_object(task: str, split: str, n: int) -> dict[str, Any]:
    """A SuperNI task object as GainLoRA ships a split: outputs as a string (upstream) or a list."""
    labels = CLASSIFICATION.get(task)
    instances = [
        {
            "id": f"{task}-{split}-{i}",
            "input": f"{task} {split} input {i}",
            "output": labels[i % 2] if labels else [f"{split} answer {i}", f"{split} other {i}"],
        }
        for i in range(n)
    ]
    definition: Any = f"Do {task}." if labels else [f"Do {task}."]  # a string or a list of one string
    return {"Definition": definition, "Positive Examples": [], "Instances": instances}


def make_superni_dir(root: Path, tasks: list[str], n_train: int = 10, n_test: int = 4) -> Path:
    """`<root>/<task>/{train,dev,test}.json`, dev.json identical to test.json (as upstream releases do)."""
    for task in tasks:
        write_json(root / task / "train.json", superni_object(task, "train", n_train))
        test = superni_object(task, "test", n_test)
        write_json(root / task / "test.json", test)
        write_json(root / task / "dev.json", test)
    return root


def make_trace_dir(root: Path, tasks: list[str] = TRACE, without_train: tuple[str, ...] = ()) -> Path:
    """`<root>/<Task>/{train,eval,test}.json` of {prompt, answer}; no labels.json."""
    for task in tasks:
        for split, n in (("train", 6), ("eval", 2), ("test", 3)):
            if split == "train" and task in without_train:
                continue
            records = [{"prompt": f"{task} {split} {i}\nAnswer:", "answer": f"{task} {i}"} for i in range(n)]
            write_json(root / task / f"{split}.json", records)
    return root


def make_olora_dir(root: Path) -> Path:
    """O-LoRA's CL_Benchmark: category folders of task folders, a Long-sequence task (MNLI) among them."""
    for category, task in (("TC", "agnews"), ("SC", "yelp"), ("NLI", "MNLI"), ("NLI", "CB")):
        make_olora_task(root, category, task)
    return root


def expected_examples(task: str, split: str, n: int) -> list[Example]:
    """The examples of a superni_object, built independently of the loader."""
    data = superni_object(task, split, n)
    definition = data["Definition"] if isinstance(data["Definition"], str) else data["Definition"][0]
    outputs = [i["output"] if isinstance(i["output"], list) else [i["output"]] for i in data["Instances"]]
    prompts = [superni_prompt(definition, i["input"]) for i in data["Instances"]]
    return [Example(prompt, tuple(out)) for prompt, out in zip(prompts, outputs, strict=True)]


def check_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(["data", "check", *args])
    return code, capsys.readouterr().out


# --- SuperNI ----------------------------------------------------------------------------------------------


def test_superni_folders_keep_the_official_test_split(tmp_path: Path) -> None:
    root = make_superni_dir(tmp_path, SUPERNI1)
    tasks = load_benchmark("superni", data_dir=root, order="superni1", validation_fraction=0.2)
    assert [t.name for t in tasks] == SUPERNI1
    for task in tasks:
        assert task.test == expected_examples(task.name, "test", 4)  # every instance, in file order
        train = expected_examples(task.name, "train", 10)
        assert len(task.validation) == 2 and sorted(task.train + task.validation, key=train.index) == train
        assert task.metric == "rouge_l" and task.source == str(root / task.name)
    labelled = {t.name: t.labels for t in tasks if t.labels}
    assert labelled == {"task363_sst2_polarity_classification": ["NEG", "POS"]}  # bounds generation only
    name = "task363_sst2_polarity_classification"
    prompt = f"Definition: Do {name}.\n\nInput: {name} test input 0\nOutput:"
    assert tasks[1].test[0] == Example(prompt, ("POS",))


def test_superni_prompt_format(tmp_path: Path) -> None:
    task = load_superni_task_dir(
        make_superni_dir(tmp_path, ["task002_quoref_answer_generation"]) / "task002_quoref_answer_generation"
    )
    assert task.test[0] == Example(
        "Definition: Do task002_quoref_answer_generation.\n\nInput: task002_quoref_answer_generation test "
        "input 0\nOutput:",
        ("test answer 0", "test other 0"),
    )


def test_superni_dev_is_never_read(tmp_path: Path) -> None:
    root = make_superni_dir(tmp_path, ["task875_emotion_classification"])
    (root / "task875_emotion_classification" / "dev.json").write_text("not json", encoding="utf-8")
    (task,) = load_benchmark("superni", data_dir=root, tasks=["task875"])  # short ids work for folders too
    assert len(task.test) == 4


def test_superni_folder_missing_test_names_task_and_file(tmp_path: Path) -> None:
    root = make_superni_dir(tmp_path, ["task591_sciq_answer_generation"])
    (root / "task591_sciq_answer_generation" / "test.json").unlink()
    with pytest.raises(DataError) as excinfo:
        load_benchmark("superni", data_dir=root, tasks=["task591_sciq_answer_generation"])
    assert_one_line_error(excinfo, "task591_sciq_answer_generation/test.json", "no test split")


def test_superni_files_are_split_and_scored_with_rouge(tmp_path: Path) -> None:
    for task in ("task363_sst2_polarity_classification", "task1572_samsum_summary"):
        write_json(tmp_path / f"{task}.json", superni_object(task, "all", 12))
    tasks = load_benchmark("superni", data_dir=tmp_path)
    assert [(t.name, len(t.train), len(t.test), t.metric) for t in tasks] == [
        ("task1572_samsum_summary", 6, 6, "rouge_l"),
        ("task363_sst2_polarity_classification", 6, 6, "rouge_l"),
    ]
    assert tasks[1].labels == ["NEG", "POS"]
    assert load_benchmark("superni", data_dir=tmp_path) == tasks  # deterministic


# --- TRACE ------------------------------------------------------------------------------------------------


def test_trace_tasks_and_their_metrics(tmp_path: Path) -> None:
    tasks = load_benchmark("trace", data_dir=make_trace_dir(tmp_path), order="trace")
    assert {t.name: t.metric for t in tasks} == {
        "C-STANCE": "trace_accuracy",
        "FOMC": "trace_accuracy",
        "MeetingBank": "trace_rouge_l",
        "Py150": "trace_edit_similarity",
        "ScienceQA": "trace_accuracy",
        "NumGLUE-cm": "trace_accuracy",
        "NumGLUE-ds": "trace_accuracy",
        "20Minuten": "trace_sari",
    }
    fomc = tasks[1]
    assert (len(fomc.train), len(fomc.test), fomc.labels, fomc.validation) == (6, 3, None, [])
    assert fomc.test[2] == Example("FOMC test 2\nAnswer:", ("FOMC 2",))


def test_trace_missing_train_names_task_and_file(tmp_path: Path) -> None:
    root = make_trace_dir(tmp_path, without_train=("Py150",))
    with pytest.raises(DataError) as excinfo:
        load_benchmark("trace", data_dir=root, order="trace")
    assert_one_line_error(excinfo, str(root / "Py150" / "train.json"), "task 'Py150' has no train split")


def test_trace_unknown_task_is_refused(tmp_path: Path) -> None:
    root = make_trace_dir(tmp_path, tasks=["Lima"])
    with pytest.raises(DataError) as excinfo:
        load_trace_task(root / "Lima")
    assert_one_line_error(excinfo, "'Lima' is not a TRACE task", ", ".join(TRACE_METRICS), "jsonl")


def test_trace_needs_a_data_dir() -> None:
    with pytest.raises(DataError, match="set benchmark.data_dir"):
        load_benchmark("trace", order="trace")


# --- O-LoRA -----------------------------------------------------------------------------------------------


def test_olora_long_sequence_task_in_its_category(tmp_path: Path) -> None:
    root = make_olora_dir(tmp_path)
    (mnli,) = load_benchmark("olora", data_dir=root, tasks=["MNLI"])
    assert (mnli.source, mnli.metric) == (str(root / "NLI" / "MNLI"), "exact_match")
    assert mnli.test[0].prompt.startswith('What is the logical relationship between the "sentence 1"')


# --- orders -----------------------------------------------------------------------------------------------


def test_named_orders_of_each_benchmark() -> None:
    assert (len(SUPERNI1), len(SUPERNI2), len(TRACE)) == (15, 15, 8)
    assert (SUPERNI1[0], SUPERNI1[-1]) == ("task1572_samsum_summary", "task875_emotion_classification")
    assert (SUPERNI2[0], SUPERNI2[-1]) == (
        "task748_glucose_reverse_cause_event_detection",
        "task875_emotion_classification",
    )
    assert len(set(SUPERNI1)) == 15 and set(SUPERNI1) == set(SUPERNI2)
    assert (TRACE[0], TRACE[-1]) == ("C-STANCE", "20Minuten")
    assert set(ORDER_BENCHMARK) == set(ORDERS)
    assert [ORDER_BENCHMARK[o] for o in ("order1", "order6", "superni1", "superni2", "trace")] == [
        "cl_benchmark",
        "cl_benchmark",
        "superni",
        "superni",
        "trace",
    ]
    defaults = {b: default_order(b) for b in ("cl_benchmark", "olora", "superni", "trace", "jsonl", "glue")}
    assert defaults == {
        "cl_benchmark": "order1",
        "olora": "order1",
        "superni": None,
        "trace": "trace",
        "jsonl": None,
        "glue": None,
    }
    assert orders_for("olora") == orders_for("cl_benchmark") == [f"order{i}" for i in range(1, 7)]
    assert orders_for("jsonl") == list(ORDERS)


@pytest.mark.parametrize(
    ("benchmark", "order"), [("cl_benchmark", "superni1"), ("superni", "order1"), ("olora", "trace")]
)
def test_an_order_of_another_benchmark_is_refused(tmp_path: Path, benchmark: str, order: str) -> None:
    make_cl_task(tmp_path, "agnews")
    with pytest.raises(DataError) as excinfo:
        load_benchmark(benchmark, data_dir=tmp_path, order=order)
    assert_one_line_error(excinfo, f"order '{order}' is a {ORDER_BENCHMARK[order]} order", f"'{benchmark}'")


# --- detection --------------------------------------------------------------------------------------------


def test_detection_on_each_layout(tmp_path: Path) -> None:
    superni_dir = make_superni_dir(tmp_path / "superni_dir", SUPERNI1[:2])
    write_json(tmp_path / "superni_files" / "task1_a.json", superni_object("task1_a", "all", 4))
    (tmp_path / "superni_files" / "README.md").write_text("not a task", encoding="utf-8")
    for name in ("agnews", "yelp"):
        make_cl_task(tmp_path / "cl", name)
        make_jsonl_task(tmp_path / "jsonl", name)
    detected = {
        "superni_dir": detect_benchmark(superni_dir),
        "superni_files": detect_benchmark(tmp_path / "superni_files"),
        "trace": detect_benchmark(make_trace_dir(tmp_path / "trace", without_train=("Py150",))),
        "olora": detect_benchmark(make_olora_dir(tmp_path / "olora")),
        "cl": detect_benchmark(tmp_path / "cl"),
        "jsonl": detect_benchmark(tmp_path / "jsonl"),
    }
    assert detected == {
        "superni_dir": "superni",
        "superni_files": "superni",
        "trace": "trace",
        "olora": "olora",
        "cl": "cl_benchmark",
        "jsonl": "jsonl",
    }


def test_detection_gives_none_when_ambiguous_or_empty(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    make_cl_task(mixed, "agnews")
    make_trace_dir(mixed, tasks=["FOMC"])  # a cl_benchmark task beside a TRACE task
    unknown = tmp_path / "unknown"
    make_cl_task(unknown, "agnews")
    (unknown / "notes").mkdir()  # a folder of no known layout
    (tmp_path / "empty").mkdir()
    olora_tasks_at_top = make_olora_task(tmp_path / "flat", "agnews", "x").parent  # no category level
    for folder in (mixed, unknown, tmp_path / "empty", olora_tasks_at_top, tmp_path / "absent"):
        assert detect_benchmark(folder) is None, folder


# --- loracl data check ------------------------------------------------------------------------------------


def test_data_check_superni_folder_with_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_superni_dir(tmp_path / "SuperNI", SUPERNI1)
    code, out = check_cli(capsys, str(root), "--order", "superni2")
    lines = out.splitlines()
    assert code == 0
    assert lines[:3] == [
        f"folder: {root}",
        "benchmark: superni (detected from the layout)",
        "tasks: 15 (train/test as runs load them; dev/eval is never read by a run)",
    ]
    assert lines[3].split() == ["task", "train", "dev/eval", "test", "labels", "metric"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[4:19]}
    assert rows["task363_sst2_polarity_classification"] == ["10", "4", "4", "2", "rouge_l"]
    assert rows["task1572_samsum_summary"] == ["10", "4", "4", "generation", "rouge_l"]
    assert lines[19:] == ["order superni2: all 15 tasks present", "complete orders: superni1, superni2"]


def test_data_check_given_benchmark_and_other_layouts(tmp_path: Path) -> None:
    trace = check_folder(make_trace_dir(tmp_path / "trace"), benchmark="trace", order="trace")
    assert (trace.benchmark, trace.detected, trace.complete_orders) == ("trace", False, ["trace"])
    assert [(t.name, t.train, t.held_out, t.test, t.labels) for t in trace.tasks][0] == (
        "20Minuten",
        6,
        ("eval.json", 2),
        3,
        None,
    )
    olora = check_folder(make_olora_dir(tmp_path / "olora"))
    assert (olora.benchmark, [t.name for t in olora.tasks]) == ("olora", ["CB", "MNLI", "agnews", "yelp"])
    assert {(t.held_out, t.labels, t.metric) for t in olora.tasks} == {(("dev.json", 4), 2, "exact_match")}
    write_json(tmp_path / "files" / "task1_a.json", superni_object("task1_a", "all", 6))
    (files,) = check_folder(tmp_path / "files").tasks
    assert (files.train, files.held_out, files.test) == (3, None, 3)


def _trace_without_train(root: Path) -> list[str]:
    make_trace_dir(root, without_train=("Py150",))
    return [str(root)]


def _malformed(root: Path) -> list[str]:
    make_superni_dir(root, SUPERNI1[:2])
    (root / SUPERNI1[1] / "test.json").write_text('{"Definition": ["d"], "Instances": [', encoding="utf-8")
    return [str(root)]


def _order_task_absent(root: Path) -> list[str]:
    make_trace_dir(root, tasks=TRACE[:6])
    return [str(root), "--order", "trace"]


def _order_of_another_benchmark(root: Path) -> list[str]:
    make_cl_task(root, "agnews")
    return [str(root), "--order", "superni1"]


def _undetectable(root: Path) -> list[str]:
    make_cl_task(root, "agnews")
    make_trace_dir(root, tasks=["FOMC"])
    return [str(root)]


def _unknown_layout(root: Path) -> list[str]:
    make_cl_task(root, "agnews")
    (root / "notes").mkdir()
    return [str(root)]


def _unknown_benchmark(root: Path) -> list[str]:
    make_cl_task(root, "agnews")
    return [str(root), "--benchmark", "glue"]


def _superni_task_without_split(root: Path) -> list[str]:
    make_superni_dir(root, SUPERNI1[:2])
    (root / SUPERNI1[0] / "train.json").unlink()
    return [str(root)]


CHECK_ERRORS = {
    "trace task without train.json": (_trace_without_train, "Py150/train.json: file not found; task 'Py150'"),
    "malformed file": (_malformed, f"{SUPERNI1[1]}/test.json: invalid JSON"),
    "order naming absent tasks": (
        _order_task_absent,
        "order 'trace' names 2 task(s) not in the folder: NumGLUE-ds, 20Minuten",
    ),
    "order of another benchmark": (_order_of_another_benchmark, "order 'superni1' is a superni order"),
    "mixed layouts": (
        _undetectable,
        "cannot tell the benchmark from the layout (layouts mixed: FOMC (trace), agnews (cl_benchmark))",
    ),
    "unknown layout": (_unknown_layout, "(sub-folders of no known layout: notes)"),
    "unknown benchmark": (_unknown_benchmark, "unknown benchmark 'glue'"),
    "superni task folder without train.json": (_superni_task_without_split, "has no train split"),
}


@pytest.mark.parametrize("case", list(CHECK_ERRORS))
def test_data_check_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    build, expected = CHECK_ERRORS[case]
    args = build(tmp_path / "data")
    before = tree_digest(tmp_path)
    assert main(["data", "check", *args]) == 2
    assert expected in one_line(capsys)
    assert capsys.readouterr().out == ""
    assert tree_digest(tmp_path) == before  # nothing written


def test_data_check_help_has_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["data", "check", "--help"])
    assert excinfo.value.code == 0
    assert "loracl data check ../shared/data/cl_benchmark" in capsys.readouterr().out


def test_benchmarks_lists_orders_by_benchmark(capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "benchmarks: cl_benchmark, olora, superni, trace, jsonl" in out
    for header in (
        "cl_benchmark, olora (default: order1):",
        "superni (default: every task of the folder):",
        "trace (default: trace):",
    ):
        assert f"\n  {header}\n" in out
    assert out.index("order6:") < out.index("superni1:") < out.index("superni2:") < out.index("    trace:")


# --- the real shared data ---------------------------------------------------------------------------------




def test_shared_data_still_loads_and_is_detected(shared_root: Path, capsys: pytest.CaptureFixture) -> None:
    tasks = load_benchmark("cl_benchmark", order="order1")
    assert [(t.name, len(t.train), len(t.test), t.metric) for t in tasks] == [
        (name, 500, 100, "exact_match") for name in ORDERS["order1"]
    ]
    assert detect_benchmark(shared_root / "cl_benchmark") == "cl_benchmark"
    assert detect_benchmark(shared_root / "superni_sample") == "superni"
    assert detect_benchmark(shared_root) is None  # two benchmarks side by side
    code, out = check_cli(capsys, str(shared_root / "cl_benchmark"), "--order", "order4")
    assert code == 0 and "order order4: all 15 tasks present" in out
    assert "complete orders: order1, order2, order3, order4, order5, order6" in out
