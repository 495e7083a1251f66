"""`loracl continue`: a run extended by tasks ends exactly as one run over the whole sequence with the same
seed (adapters, losses, the method's reports, every score both evaluated, AP/BWT/FWT), for methods whose state
between tasks differs in kind: SLAO (merged B, task count in 1/sqrt(i)), GPM (bases), replay (a memory of
examples and its random generator), GainLoRA (one branch and gate per task). A crash during `continue`
resumes like any run; bad input is one line, exit status 2, the run unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety import one_line, tree_digest
from test_resume import SimulatedCrash, assert_same_outcome, crash, fail_in_task, outcome
from test_versions import data, run_args, same_weights  # noqa: F401  (data: the colliding tasks' fixture)

from loracl.cli import main
from loracl.config import load_config
from loracl.errors import HELD_BACK_EXIT
from loracl.recipes.extend import continue_run
from loracl.recipes.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SETTINGS = [
    "benchmark.max_train=8",
    "benchmark.max_test=2",
    "eval.max_new_tokens=2",
    "train.max_length=64",
]
FIRST, LATER, TWO_LATER = ["dbpedia", "amazon"], ["agnews"], ["agnews", "yahoo"]


def config(method: str, tasks: list[str], *extra: str):
    return load_config(
        TINY, [*SETTINGS, f"benchmark.tasks=[{','.join(tasks)}]", f"method.name={method}", *extra]
    )


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_same_where_evaluated(whole: list[list], continued: list[list]) -> None:
    """Every entry the continued run evaluated equals one long run's; and it evaluated every entry of the
    rows it trained, and the last old row."""
    assert len(whole) == len(continued)
    for a_row, b_row in zip(whole, continued, strict=True):
        assert len(a_row) == len(b_row)
        for a, b in zip(a_row, b_row, strict=True):
            assert b is None or a == b


@pytest.mark.parametrize("method", ["slao", "gpm", "replay", "gainlora"])
def test_continuing_equals_one_run_over_the_whole_sequence(method: str, tmp_path: Path) -> None:
    whole = run(config(method, FIRST + TWO_LATER), tmp_path / "whole")
    run(config(method, FIRST), tmp_path / "grown")
    continued = continue_run(tmp_path / "grown", TWO_LATER)

    a, b = outcome(tmp_path / "whole"), outcome(tmp_path / "grown")
    matrix_a, matrix_b = a.pop("matrix"), b.pop("matrix")
    metrics_a, metrics_b = a.pop("metrics"), b.pop("metrics")
    assert_same_outcome(a, b)  # zero-shot scores, per-task losses and method reports, adapter tensors
    assert_same_where_evaluated(matrix_a, matrix_b)
    assert matrix_b[0][2:] == [None, None]  # the model after task 1 is gone
    assert matrix_b[1][2:] == matrix_a[1][2:]  # the restored model after task 2: FWT's entry and the rest
    assert matrix_b[2:] == matrix_a[2:]
    for key in ("AP", "BWT", "FWT"):
        assert metrics_b[key] == metrics_a[key] and metrics_a[key] is not None
    assert metrics_b["forgetting"] is None  # max over rows reads a[1][3], gone (loracl.recipes.extend)
    assert continued["tasks"] == whole["tasks"] == FIRST + TWO_LATER
    assert continued["continued"][0]["after_task"] == 2 and continued["continued"][0][
        "not_evaluated_rows"
    ] == [1]
    saved = load_config(tmp_path / "grown" / "config.yaml")
    assert saved.benchmark.tasks == FIRST + TWO_LATER
    # the step folder of task 2 holds the predictions of its new columns too
    predictions = (tmp_path / "grown" / "tasks" / "2-amazon" / "predictions.jsonl").read_text().splitlines()
    assert {json.loads(line)["task"] for line in predictions} == {"dbpedia", "amazon", "agnews", "yahoo"}


def test_continuing_with_the_sparse_matrix_equals_one_run(tmp_path: Path) -> None:
    sparse = "eval.matrix=metrics"
    run(config("slao", FIRST + LATER, sparse), tmp_path / "whole")
    run(config("slao", FIRST, sparse), tmp_path / "grown")
    continue_run(tmp_path / "grown", LATER)
    whole, grown = results_of(tmp_path / "whole")["metrics"], results_of(tmp_path / "grown")["metrics"]
    assert {k: grown[k] for k in ("AP", "BWT", "FWT")} == {k: whole[k] for k in ("AP", "BWT", "FWT")}
    assert whole["FWT"] is not None  # a[2][3], evaluated from the restored checkpoint


def test_a_crash_during_continue_resumes_like_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(config("slao", FIRST + LATER), tmp_path / "whole")
    run(config("slao", FIRST), tmp_path / "grown")
    with monkeypatch.context() as patch:
        fail_in_task(patch, 3, crash)
        with pytest.raises(SimulatedCrash):
            continue_run(tmp_path / "grown", LATER)
    assert main(["continue", str(tmp_path / "grown"), "--tasks", "agnews"]) == 0  # the same command again
    a, b = outcome(tmp_path / "whole"), outcome(tmp_path / "grown")
    assert b["metrics"]["AP"] == a["metrics"]["AP"]
    for result in (a, b):
        result.pop("matrix"), result.pop("metrics")
    assert_same_outcome(a, b)


def test_a_continue_killed_before_its_config_was_written_is_recognised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loracl.recipes.extend as extend

    run(config("slao", FIRST), tmp_path / "grown")
    with monkeypatch.context() as patch:
        patch.setattr(extend, "write_config", lambda *args: crash())  # after the checkpoint, before config
        with pytest.raises(SimulatedCrash):
            continue_run(tmp_path / "grown", LATER)
    assert load_config(tmp_path / "grown" / "config.yaml").benchmark.tasks == FIRST
    results = continue_run(tmp_path / "grown", LATER)
    assert results["complete"] and results["tasks"] == FIRST + LATER and len(results["continued"]) == 1


def test_a_run_resumed_then_continued_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run can be given more tasks before it finished its own."""
    run(config("slao", FIRST + LATER), tmp_path / "whole")
    with monkeypatch.context() as patch:
        fail_in_task(patch, 2, crash)
        with pytest.raises(SimulatedCrash):
            run(config("slao", FIRST), tmp_path / "grown")
    continue_run(tmp_path / "grown", LATER)
    a, b = outcome(tmp_path / "whole"), outcome(tmp_path / "grown")
    assert a.pop("matrix")[1:] == b.pop("matrix")[1:] and a.pop("metrics") == b.pop("metrics")
    assert_same_outcome(a, b)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "amazon"], "task 'amazon' is already in the run (task 2)"),
        (["--tasks", "agnews,AGNEWS"], "given twice"),
        (["--tasks", "agnews", "--set", "lora.r=8"], "lora.r is 8 but the run used 4"),
        (["--tasks", "agnews", "--set", "model.name=other"], "model.name"),
        (["--tasks", "nosuchtask"], "nosuchtask"),
        (["--tasks", ","], "one or more task names"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    finished: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    before = tree_digest(finished)
    assert main(["continue", str(finished), *argv]) == 2
    err = one_line(capsys)
    assert message in err
    assert tree_digest(finished) == before


def test_data_that_changed_since_is_refused(finished: Path, tmp_path: Path, capsys) -> None:
    import shutil

    moved = tmp_path / "data"
    source = ROOT.parent / "shared" / "data" / "cl_benchmark"
    for name in ("dbpedia", "amazon", "agnews"):
        shutil.copytree(source / name, moved / name)
    (moved / "amazon" / "test.json").write_text(
        (moved / "amazon" / "test.json").read_text().replace("a", "b", 1)
    )
    before = tree_digest(finished)
    assert main(["continue", str(finished), "--tasks", "agnews", "--data-dir", str(moved)]) == 2
    assert "differs from the data the run read" in one_line(capsys)
    assert tree_digest(finished) == before


def test_joint_training_cannot_continue(tmp_path: Path, capsys) -> None:
    run(config("mtl", FIRST), tmp_path / "mtl")
    before = tree_digest(tmp_path / "mtl")
    assert main(["continue", str(tmp_path / "mtl"), "--tasks", "agnews"]) == 2
    assert "trains once on all tasks" in one_line(capsys)
    assert tree_digest(tmp_path / "mtl") == before


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("continue") / "run"
    run(config("slao", FIRST, "eval.zero_shot=false"), out)
    return out


def test_the_python_api_continues_a_run(tmp_path: Path) -> None:
    import loracl
    from loracl.errors import ConfigError

    run(config("seq_lora", FIRST, "eval.zero_shot=false"), tmp_path / "run")
    with pytest.raises(ConfigError, match="list of task names"):
        loracl.continue_run(tmp_path / "run", "agnews")
    results = loracl.continue_run(tmp_path / "run", ["agnews"])
    assert results["complete"] and results["tasks"] == FIRST + LATER and len(results["matrix"]) == 3


def test_a_checkpoint_of_another_format_is_refused(finished: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "old-format"
    shutil.copytree(finished, copy)
    latest = copy / "checkpoint" / "latest.json"
    latest.write_text(latest.read_text().replace('"version": 2', '"version": 1'))
    before = tree_digest(copy)
    assert main(["continue", str(copy), "--tasks", "agnews"]) == 2
    assert "checkpoint format version 1" in one_line(capsys)
    assert tree_digest(copy) == before


def test_the_production_loop_run_continue_guard_promote(data: Path, tmp_path: Path) -> None:  # noqa: F811
    """A served adapter gets a task that collides with its first one: `continue` keeps the new version as a
    candidate (exit status 3), adapter/ keeps serving version 1, and `promote` can serve version 2."""
    out = tmp_path / "prod"
    assert main(run_args(data, out, ["alpha"])) == 0
    assert main(["continue", str(out), "--tasks", "beta", "--max-forgetting", "10"]) == HELD_BACK_EXIT
    results = results_of(out)
    assert results["tasks"] == ["alpha", "beta"] and results["promoted_version"] == 1
    assert results["held_back"] == [2] and same_weights(out / "adapter", out / "versions" / "v1")
    assert main(["promote", str(out), "--version", "2"]) == 0
    assert same_weights(out / "adapter", out / "versions" / "v2")
