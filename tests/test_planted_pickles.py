"""No code path of loracl unpickles a run folder's files with the full unpickler: a checkpoint whose state.pt
holds a payload (an object whose unpickling runs a command) is refused in every checkpoint format version,
by `loracl run --resume` and by a `loracl bench` rerun over a grid folder someone else wrote, and the
payload never runs."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safety import one_line, tree_digest
from test_resume import crashed_in_task_2

from loracl.cli import main


class Payload:
    """Unpickling this creates the file `sentinel`: proof that code from the checkpoint ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def plant(run_dir: Path, sentinel: Path, version: object) -> None:
    """Replace the checkpoint's state.pt by one holding the payload, and give latest.json `version`
    (the key removed when `version` is ...)."""
    pointer = run_dir / "checkpoint" / "latest.json"
    latest = json.loads(pointer.read_text())
    state_path = run_dir / "checkpoint" / latest["directory"] / "state.pt"
    torch.save({"peft_configs": {}, "tensors": {}, "method": {"x": Payload(sentinel)}}, state_path)
    if version is ...:
        latest.pop("version")
    else:
        latest["version"] = version
    pointer.write_text(json.dumps(latest))


VERSIONS = [1, ..., 2, 3, "2", None]


@pytest.mark.parametrize("version", VERSIONS, ids=[repr(v) for v in VERSIONS])
def test_resume_never_runs_a_planted_payload(
    version: object, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = crashed_in_task_2(tmp_path / "run")
    sentinel = tmp_path / "payload-ran"
    plant(run_dir, sentinel, version)
    before = tree_digest(run_dir)
    capsys.readouterr()
    assert main(["run", "--resume", "--output", str(run_dir)]) == 2
    line = one_line(capsys)
    assert "checkpoint" in line
    assert not sentinel.exists()
    assert tree_digest(run_dir) == before


def test_a_bench_rerun_never_runs_a_planted_payload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A grid folder from elsewhere whose interrupted cell holds a version-1 checkpoint with a payload: the
    rerun does not read it, runs the cell from scratch and finishes."""
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    args = [
        "bench", str(tiny), "--methods", "seq_lora", "--orders", "dbpedia+amazon", "--max-train", "4",
        "--max-test", "2", "--set", "eval.max_new_tokens=2", "--set", "eval.zero_shot=false",
        "--output", str(tmp_path / "grid"),
    ]  # fmt: skip
    assert main(args) == 0
    cell = tmp_path / "grid" / "seq_lora" / "dbpedia+amazon"
    results = json.loads((cell / "results.json").read_text())
    results["complete"] = False  # as if interrupted after task 1
    (cell / "results.json").write_text(json.dumps(results))
    sentinel = tmp_path / "payload-ran"
    for version in (1, ...):
        plant(cell, sentinel, version)
        assert main(args) == 0
        assert not sentinel.exists()
        assert json.loads((cell / "results.json").read_text())["complete"] is True
    capsys.readouterr()


def test_the_package_never_asks_for_the_full_unpickler() -> None:
    """No weights_only=False, pickle.load(s) or torch.load without weights_only anywhere in loracl."""
    package = Path(__file__).resolve().parents[1] / "src" / "loracl"
    offenders = []
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("weights_only=False", "pickle.load", "dill.load", "cloudpickle.load"):
            if needle in text:
                offenders.append(f"{path.name}: {needle}")
        for line in text.splitlines():
            if re.search(r"(?<![\w.])torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders
