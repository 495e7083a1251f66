"""A run whose training diverges stops at the first non-finite loss or update with one line naming the task
and the step, keeps the last checkpoint, and never saves a NaN adapter as if all were well."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safety import one_line, tree_digest

from loracl.cli import main
from loracl.recipes import run as runner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["benchmark.tasks=[dbpedia,amazon]", "benchmark.max_train=8", "benchmark.max_test=2",
         "eval.zero_shot=false", "eval.max_new_tokens=2", "train.max_length=64"]  # fmt: skip


def run_args(out: Path, *sets: str) -> list[str]:
    pairs = [arg for item in [*SMALL, *sets] for arg in ("--set", item)]
    return ["run", str(TINY), *pairs, "--output", str(out)]


@pytest.mark.parametrize("method", ["slao", "seq_lora"])
def test_a_huge_learning_rate_stops_at_the_first_step(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(run_args(out, "train.lr=1e308", f"method.name={method}")) == 2
    line = one_line(capsys)
    assert "task 1/2 dbpedia, step 1: the update left non-finite weights" in line
    assert "no task had finished" in line
    assert not (out / "adapter").exists() and not (out / "checkpoint").exists()


def test_a_nan_loss_in_task_2_keeps_task_1s_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    real = runner.train_task
    seen = {"steps": 0}

    def poisoned(model, method, *args, **kwargs):
        if kwargs["description"].startswith("task 2/"):
            import loracl.engine.training as training

            original = training.answer_loss

            def nan_on_step_2(model, batch):
                seen["steps"] += 1
                loss = original(model, batch)
                return loss * math.nan if seen["steps"] == 2 else loss

            monkeypatch.setattr(training, "answer_loss", nan_on_step_2)
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", poisoned)
    assert main(run_args(out)) == 2
    line = one_line(capsys)
    assert "task 2/2 amazon, step 2: the loss is nan" in line
    assert f"the checkpoint after task 1 is kept in {out}" in line
    pointer = json.loads((out / "checkpoint" / "latest.json").read_text())
    assert pointer["finished"] == 1
    before = tree_digest(out / "checkpoint")
    assert not (out / "adapter").exists()
    monkeypatch.undo()
    assert main(["run", "--resume", "--output", str(out)]) == 0  # the checkpoint is good to go on from
    assert tree_digest(out / "checkpoint") != before
    assert json.loads((out / "results.json").read_text())["complete"]
