"""A write that fails (full disk, read-only place, output below a file) is one line that says what survives
and how to resume, whichever library did the writing (safetensors, torch.save, json), and the checkpoint
stays intact. A real small tmpfs where this machine lets the tests mount one (root), injected failures
otherwise and always."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError
from safety import one_line, tree_digest

from loracl.cli import main
from loracl.recipes import checkpoint
from loracl.recipes import run as runner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["benchmark.tasks=[dbpedia,amazon,agnews]", "benchmark.max_train=4", "benchmark.max_test=2",
         "eval.zero_shot=false", "eval.max_new_tokens=2", "train.max_length=64"]  # fmt: skip


def run_args(out: Path) -> list[str]:
    return ["run", str(TINY), *[a for item in SMALL for a in ("--set", item)], "--output", str(out)]


def mount_tmpfs(where: Path, size_kib: int, read_only: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounted: list[Path] = []

    def make(size_kib: int, read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        if not mount_tmpfs(where, size_kib, read_only):
            pytest.skip("this machine does not let the tests mount a tmpfs (needs root)")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.parametrize("size_kib", [64, 128, 160, 192, 224])
def test_a_full_disk_is_one_line_and_the_run_resumes_elsewhere(
    size_kib: int, tmpfs, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Sizes chosen so that the disk fills at different writes: the first checkpoint, a task's files, a
    later checkpoint, the final adapter and report."""
    out = tmpfs(size_kib) / "run"
    code = main(run_args(out))
    if code == 0:
        pytest.skip(f"{size_kib} KiB was enough for the whole run on this machine")
    assert code == 2
    line = one_line(capsys)
    assert "No space left on device" in line
    pointer = out / "checkpoint" / "latest.json"
    if pointer.exists():
        finished = json.loads(pointer.read_text())["finished"]
        assert f"the checkpoint after task {finished} is intact" in line
        assert f"loracl run --resume --output {out}" in line
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)  # the user frees space by moving the run to a roomier disk
        assert main(["run", "--resume", "--output", str(moved)]) == 0
        assert json.loads((moved / "results.json").read_text())["complete"]


def test_a_read_only_place_is_one_line(tmpfs, capsys: pytest.CaptureFixture) -> None:
    out = tmpfs(1024, read_only=True) / "run"
    assert main(run_args(out)) == 2
    assert "Read-only file system" in one_line(capsys)


@pytest.mark.parametrize(
    ("target", "name", "failure", "where"),
    [
        (checkpoint.torch, "save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
         "the checkpoint after task 2"),
        (checkpoint, "write_json_durable", OSError(errno.ENOSPC, "No space left on device"),
         "the checkpoint after task 2"),
        (runner, "write_report", SafetensorError("Error while serializing: No space left on device"),
         "the final adapter and report"),
    ],
    ids=["torch-save", "json", "safetensors"],
)
def test_injected_write_failures_are_one_line(
    target: object, name: str, failure: Exception, where: str, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each library's own failure type, raised where that library writes (after task 1's checkpoint for
    the checkpoint cases, at the end for the final files)."""
    out = tmp_path / "run"
    real = getattr(target, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if where == "the final adapter and report" or calls["n"] > 1:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    assert main(run_args(out)) == 2
    line = one_line(capsys)
    assert where in line
    assert any(reason in line for reason in ("No space left on device", "unexpected pos"))
    assert "the checkpoint after task" in line and "is intact" in line
    intact = tree_digest(out / "checkpoint")
    monkeypatch.undo()
    assert tree_digest(out / "checkpoint") == intact
    assert main(["run", "--resume", "--output", str(out)]) == 0


def test_temporaries_of_killed_writes_are_cleared_on_resume(tmp_path: Path) -> None:
    """write_json_atomic's `<name>.<pid>.tmp` left by a process killed before its rename: removed when the
    run is taken up again; a live process's temporary is not touched."""
    out = tmp_path / "run"
    assert main(run_args(out)) == 0
    results = json.loads((out / "results.json").read_text())
    results["complete"] = False
    (out / "results.json").write_text(json.dumps(results))
    dead = [out / "results.json.999999999.tmp", out / "checkpoint" / "latest.json.999999999.tmp"]
    live = out / f"results.json.{os.getppid()}.tmp"  # a live process other than this one
    for path in [*dead, live]:
        path.write_text("{")
    assert main(["run", "--resume", "--output", str(out)]) == 0
    assert not any(path.exists() for path in dead)
    assert live.exists()
