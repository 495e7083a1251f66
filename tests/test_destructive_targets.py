"""`loracl run --output DIR --overwrite` replaces a loracl run and nothing else, and a run refused for its
input is refused before anything in DIR is touched (export's targets: tests/test_export_safety.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safety import one_line, tree_digest

from loracl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["benchmark.tasks=[dbpedia,amazon]", "benchmark.max_train=4", "benchmark.max_test=2",
         "eval.zero_shot=false", "eval.max_new_tokens=2", "train.max_length=64"]  # fmt: skip


def run_args(out: Path, *sets: str, overwrite: bool = True) -> list[str]:
    pairs = [arg for item in [*SMALL, *sets] for arg in ("--set", item)]
    return ["run", str(TINY), *pairs, "--output", str(out), *(["--overwrite"] if overwrite else [])]


def user_folder(root: Path) -> Path:
    folder = root / "thesis"
    (folder / "figures").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article}")
    (folder / "figures" / "plot.pdf").write_bytes(b"%PDF-1.4")
    return folder


@pytest.mark.parametrize(
    "contents",
    [
        {"thesis.tex": "x"},
        {"config.yaml": "title: my notes\n"},  # a config.yaml that is not loracl's
        {"results.json": '{"accuracy": 1}'},  # a results.json that is not loracl's
        {"config.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"},
    ],
    ids=["tex", "foreign-config", "foreign-results", "yaml-with-aliases"],
)
def test_overwrite_refuses_a_folder_that_is_not_a_loracl_run(
    contents: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    before = tree_digest(tmp_path)
    assert main(run_args(folder)) == 2
    assert "holds no loracl run" in one_line(capsys)
    assert tree_digest(tmp_path) == before


def test_overwrite_never_empties_a_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = user_folder(tmp_path)
    before = tree_digest(tmp_path)
    assert main(run_args(folder)) == 2
    assert "--overwrite only replaces a loracl run" in one_line(capsys)
    assert tree_digest(tmp_path) == before


def test_overwrite_replaces_a_loracl_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(run_args(out, overwrite=False)) == 0
    (out / "tasks" / "stale-file").write_text("left by the first run")
    assert main(run_args(out, "method.name=seq_lora")) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "seq_lora"
    assert not (out / "tasks" / "stale-file").exists()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["lora.target_modules=[nonexistent]"], "no layer named 'nonexistent'"),
        (["lora.target_modules=[mlp]"], "not a linear layer"),
        (["lora.r=4096"], "lora.r: 4096 is larger than layer"),
        (["lora.r=4096", "method.name=inflora"], "lora.r: 4096 is larger than layer"),
        (["lora.r=4096", "method.name=gainlora"], "lora.r: 4096 is larger than layer"),
    ],
    ids=["nonexistent", "mlp", "rank-slao", "rank-inflora", "rank-gainlora"],
)
def test_values_that_would_crash_later_are_refused_before_anything_is_written(
    sets: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fresh = tmp_path / "fresh"
    assert main(run_args(fresh, *sets, overwrite=False)) == 2
    assert message in one_line(capsys)
    assert not fresh.exists()  # not even an empty folder
    existing = tmp_path / "existing"
    assert main(run_args(existing, overwrite=False)) == 0
    before = tree_digest(existing)
    capsys.readouterr()
    assert main(run_args(existing, *sets)) == 2  # --overwrite: the old run must survive the refusal
    assert message in one_line(capsys)
    assert tree_digest(existing) == before


def test_output_that_is_a_file_or_below_one_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    before = tree_digest(tmp_path)
    for out, message in ((a_file, "exists and is not a directory"), (a_file / "run", "lies below")):
        assert main(run_args(out)) == 2
        assert message in one_line(capsys)
    assert tree_digest(tmp_path) == before


def test_default_output_parent_is_not_left_behind_by_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sets = [arg for item in [*SMALL, "lora.target_modules=[nonexistent]"] for arg in ("--set", item)]
    assert main(["run", str(TINY), *sets]) == 2
    one_line(capsys)
    assert list(tmp_path.iterdir()) == []  # no runs/ folder either
