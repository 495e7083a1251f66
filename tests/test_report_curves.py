"""The report's training-loss curves (loss.png): drawn from each task's train_log.jsonl in the run directory,
linked from report.md, absent (and unlinked) when nothing was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loracl.config import load_config
from loracl.outputs.report import LOSS_PLOT, plot_losses, training_curves, write_report
from loracl.recipes.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = [
    "benchmark.tasks=[agnews,yelp]",
    "benchmark.max_train=8",
    "benchmark.max_test=2",
    "eval.max_new_tokens=2",
    "eval.zero_shot=false",
    "train.max_length=64",
]
LINK = f"![training loss]({LOSS_PLOT})"
PNG = b"\x89PNG\r\n\x1a\n"


def test_a_run_reports_its_loss_curves_and_they_can_be_redrawn(tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run(load_config(TINY, SMALL), out)
    assert (out / LOSS_PLOT).read_bytes().startswith(PNG)
    assert LINK in (out / "report.md").read_text()
    curves = training_curves(results, out)
    assert [label for label, _ in curves] == ["1. agnews", "2. yelp"]
    assert [len(records) for _, records in curves] == [t["train_steps"] for t in results["per_task"]]
    assert curves[-1][1][-1]["loss"] == pytest.approx(results["per_task"][-1]["final_loss"])

    # From the folder alone (results.json and the train logs), as a report rebuilt later would be.
    (out / LOSS_PLOT).unlink()
    saved = json.loads((out / "results.json").read_text())
    assert plot_losses(saved, out, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes().startswith(PNG)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A zero_shot run: evaluated once, never trained."""
    out = tmp_path_factory.mktemp("untrained") / "run"
    return run(load_config(TINY, [*SMALL, "method.name=zero_shot"]), out), out


def test_a_run_that_trains_nothing_has_no_curve_and_no_link(untrained: tuple[dict, Path]) -> None:
    results, out = untrained
    assert not (out / LOSS_PLOT).exists()
    report = (out / "report.md").read_text()
    assert LOSS_PLOT not in report and "Training loss" not in report
    (out / LOSS_PLOT).write_bytes(PNG)  # left by something earlier: not described by this run
    assert not plot_losses(results, out, out / LOSS_PLOT) and not (out / LOSS_PLOT).exists()


def fake_results(tasks: list[str], steps: list[int], rows: str = "after_each_task") -> dict:
    per_task = [{"task": t, "train_steps": n} for t, n in zip(tasks, steps, strict=True)]
    return {"method": "seq_lora", "matrix_rows": rows, "per_task": per_task}


def write_log(folder: Path, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": v, "lr": 1e-3}) for i, v in enumerate(losses)]
    (folder / "train_log.jsonl").write_text("\n".join(lines) + "\n")


def test_a_missing_or_damaged_log_only_leaves_its_task_out(tmp_path: Path) -> None:
    results = fake_results(["a", "b", "c", "d"], [2, 2, 2, 0])
    write_log(tmp_path / "tasks" / "1-a", [2.0, 1.5])
    (tmp_path / "tasks" / "2-b").mkdir(parents=True)
    (tmp_path / "tasks" / "2-b" / "train_log.jsonl").write_text('{"step": 1, "loss": "x"}\nnot json\n')
    # 3-c has no folder at all; d did not train
    curves = training_curves(results, tmp_path)
    assert [(label, [r["loss"] for r in records]) for label, records in curves] == [("1. a", [2.0, 1.5])]
    assert plot_losses(results, tmp_path, tmp_path / LOSS_PLOT)


def test_joint_training_is_read_from_tasks_joint(tmp_path: Path) -> None:
    results = fake_results(["joint (a+b)"], [3], rows="final_model")
    write_log(tmp_path / "tasks" / "joint", [3.0, 2.0, 1.0])
    assert [len(records) for _, records in training_curves(results, tmp_path)] == [3]


def test_the_report_links_the_plot_only_when_given(untrained: tuple[dict, Path], tmp_path: Path) -> None:
    results, _ = untrained
    write_report(results, tmp_path / "with.md", LOSS_PLOT)
    write_report(results, tmp_path / "without.md")
    assert LINK in (tmp_path / "with.md").read_text()
    assert LOSS_PLOT not in (tmp_path / "without.md").read_text()
