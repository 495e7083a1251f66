"""`loracl bench` on a grid folder another bench is running, or someone else wrote: a cell being run
elsewhere is left to that process (not reported failed, its files untouched), a cell that completes clears
an earlier error, and a damaged bench.json or cell is one line, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safety import one_line, tree_digest
from test_locking import ENV, PAUSING

from loracl.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def bench_args(out: Path, methods: str = "seq_lora") -> list[str]:
    return [
        "bench", TINY, "--methods", methods, "--orders", "COPA+SST-2", "--max-train", "4", "--max-test", "2",
        "--set", "train.max_length=96", "--set", "eval.max_new_tokens=2", "--output", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "grid"
    assert main(bench_args(out)) == 0
    return out


@pytest.fixture
def grid(finished_grid: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_grid, tmp_path / "grid"))


def test_a_cell_another_bench_is_running_is_left_to_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "grid"
    marker, release = tmp_path / "paused", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSING, "training", str(marker), str(release), *bench_args(out)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        cell = out / "seq_lora" / "COPA+SST-2"
        before = tree_digest(cell)
        capsys.readouterr()
        assert main(bench_args(out)) == 1
        captured = capsys.readouterr()
        assert "skipped" in captured.out and "in use by loracl process" in captured.out
        assert "1 cell(s) are being run by another process" in captured.err
        assert not (cell / "bench_error.txt").exists()
        assert tree_digest(cell) == before
    finally:
        release.touch()
    assert first.wait(timeout=300) == 0, first.communicate()
    assert main(bench_args(out)) == 0  # the first bench finished the cell: the second now agrees
    assert "finished earlier, skipped" in capsys.readouterr().out


def test_a_finished_cell_clears_an_old_error(grid: Path, capsys: pytest.CaptureFixture) -> None:
    cell = grid / "seq_lora" / "COPA+SST-2"
    (cell / "bench_error.txt").write_text("RuntimeError: from a run long ago\n")
    assert main(["bench", "--report-only", str(grid)]) == 1  # the table believes the error file
    assert main(bench_args(grid)) == 0  # the rerun sees a finished cell and drops the stale error
    assert not (cell / "bench_error.txt").exists()
    assert main(["bench", "--report-only", str(grid)]) == 0


def test_a_cell_that_failed_then_succeeds_clears_its_error(
    grid: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loracl.recipes import run as runner

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "run", broken)
        assert main(bench_args(grid, "seq_lora,slao")) == 1
    cell = grid / "slao" / "COPA+SST-2"
    assert (cell / "bench_error.txt").exists()
    assert main(bench_args(grid, "seq_lora,slao")) == 0
    assert not (cell / "bench_error.txt").exists()


MANIFESTS = {
    "garbage": b"\x00\xff not json",
    "a-list": b"[1, 2]",
    "no-cells": json.dumps({"label": "x", "command": "c", "methods": [], "orders": [], "cells": []}).encode(),
    "cell-without-path": None,
    "path-outside": "../../elsewhere",
    "absolute-path": "/etc",
    "bad-config": {"train": {"lr": "fast"}},
}


@pytest.mark.parametrize("case", MANIFESTS)
def test_a_damaged_bench_json_is_one_line(
    case: str, grid: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest_path = grid / "bench.json"
    manifest = json.loads(manifest_path.read_text())
    value = MANIFESTS[case]
    if isinstance(value, bytes):
        manifest_path.write_bytes(value)
    else:
        cell = manifest["cells"][0]
        if value is None:
            del cell["path"]
        elif isinstance(value, dict):
            cell["config"] = value
        else:
            cell["path"] = value
        manifest_path.write_text(json.dumps(manifest))
    before = tree_digest(grid)
    assert main(["bench", "--report-only", str(grid)]) == 2
    assert "bench.json" in one_line(capsys)
    assert tree_digest(grid) == before


@pytest.mark.parametrize("content", [b"[]", b"garbage", b'{"complete": true, "config": 3}', b""])
def test_a_damaged_cell_results_json_is_reported_not_fatal(
    content: bytes, grid: Path, capsys: pytest.CaptureFixture
) -> None:
    (grid / "seq_lora" / "COPA+SST-2" / "results.json").write_bytes(content)
    assert main(["bench", "--report-only", str(grid)]) == 0
    rows = (grid / "bench.csv").read_text()
    assert "seq_lora" in rows and ",ok," not in rows


def test_a_bench_never_writes_into_a_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "paper"
    folder.mkdir()
    (folder / "bench.md").write_text("my own notes")
    before = tree_digest(tmp_path)
    assert main(bench_args(folder)) == 2
    assert "not a loracl bench directory" in one_line(capsys)
    assert tree_digest(tmp_path) == before
