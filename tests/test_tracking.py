"""Experiment trackers (`--report-to`, `tracking.report_to`) through accelerate.tracking: what a tiny run
writes to TensorBoard under its run directory, a missing package refused before the model loads, a tracker
that breaks, and the option's parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loracl.cli import build_parser, main
from loracl.config import TRACKERS, load_config
from loracl.engine import tracking
from loracl.engine.tracking import MODULES, Tracking, optimizer_steps
from loracl.errors import ConfigError
from loracl.recipes import run as runner
from loracl.recipes.run import result_relevant_config, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TASKS = ["agnews", "yelp"]
SMALL = [
    f"benchmark.tasks=[{','.join(TASKS)}]",
    "benchmark.max_train=12",
    "benchmark.max_test=2",
    "eval.max_new_tokens=2",
    "train.max_length=64",
]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds for the run: tag -> [(step, value)] in logging order."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run_dir / tracking.FOLDER / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def train_log(run_dir: Path, index: int, task: str) -> list[dict]:
    lines = (run_dir / "tasks" / f"{index}-{task}" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tensorboard_gets_every_optimizer_step_and_the_scores(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    sets = [arg for item in [*SMALL, "train.grad_accum=2"] for arg in ("--set", item)]
    assert main(["run", str(TINY), *sets, "--report-to", "tensorboard", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["tracking"]["report_to"] == ["tensorboard"]
    found = scalars(out)

    # One loss per optimizer step (3 micro steps per task, grad_accum 2: 2 updates), the global step running
    # on across tasks; each the mean of its micro-batches' losses in the task's train_log.jsonl.
    expected = [step for i, task in enumerate(TASKS, 1) for step in optimizer_steps(train_log(out, i, task))]
    assert [t["train_steps"] for t in results["per_task"]] == [3, 3] and len(expected) == 4
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert [step for step, _ in found[tag]] == [1, 2, 3, 4], tag
        assert [v for _, v in found[tag]] == pytest.approx([e[tag] for e in expected], rel=1e-6), tag
    first = train_log(out, 1, "agnews")
    assert found["train/loss"][0][1] == pytest.approx((first[0]["loss"] + first[1]["loss"]) / 2, rel=1e-6)

    # After each task (at its last step) every task's score and the running AP over the tasks learnt.
    for j, task in enumerate(TASKS):
        assert found[f"eval/{task}"] == [(2, pytest.approx(results["matrix"][0][j])),
                                         (4, pytest.approx(results["matrix"][1][j]))]  # fmt: skip
        assert found[f"zero_shot/{task}"] == [(0, pytest.approx(results["zero_shot"][j]))]
    assert found["eval/AP"] == [(2, pytest.approx(results["matrix"][0][0])),
                                (4, pytest.approx(sum(results["matrix"][1]) / 2))]  # fmt: skip
    assert found["final/AP"] == [(4, pytest.approx(results["metrics"]["AP"]))]
    assert list((out / tracking.FOLDER / "tensorboard").glob("*/hparams.yml"))  # the config, as hparams


def test_a_resumed_run_continues_the_global_step_and_logs_no_step_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crashed in the middle of task 2: its first steps never reached the tracker (a task is sent whole,
    once finished), so the resumed run sends them once, after task 1's."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    config = load_config(TINY, [*SMALL, "eval.zero_shot=false", "tracking.report_to=[tensorboard]"])
    real = runner.train_task

    def crash() -> None:
        raise RuntimeError("simulated crash")

    def crash_in_task_2(model, method, *args, **kwargs):
        if kwargs["description"].startswith("task 2/"):  # after its first optimizer step
            method.after_optimizer_step = lambda model: crash()
        return real(model, method, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "train_task", crash_in_task_2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(config, out)
    run(None, out, resume=True)
    assert [step for step, _ in scalars(out)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars(out)["eval/AP"]] == [3, 6]


def test_a_missing_tracker_package_is_one_line_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(tracking, "installed", lambda module: module not in ("wandb",))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_model", no_loading)
    out = tmp_path / "run"
    assert main(["run", str(TINY), "--report-to", "tensorboard,wandb", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tracker wandb" in err and "pip install wandb" in err
    assert not out.exists()


def test_a_tracker_that_does_not_start_is_an_error_and_one_that_breaks_later_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    class Broken:
        name = "wandb"

        def __init__(self, fail_start: bool) -> None:
            self.fail_start, self.logged, self.finished = fail_start, [], False

        def start(self) -> None:
            if self.fail_start:
                raise RuntimeError("api key\nmissing")

        def store_init_configuration(self, values: dict) -> None:
            assert all(v is None or isinstance(v, bool | int | float | str) for v in values.values())

        def log(self, values: dict, step: int | None = None) -> None:
            if self.logged:
                raise OSError("network down")
            self.logged.append((step, values))

        def finish(self) -> None:
            self.finished = True

    monkeypatch.setattr(tracking, "_tracker", lambda *args: Broken(fail_start=True))
    with pytest.raises(ConfigError, match="tracker wandb did not start: api key missing$"):
        Tracking(["wandb"], tmp_path, "loracl", {})

    monkeypatch.setattr(tracking, "_tracker", lambda *args: Broken(fail_start=False))
    t = Tracking(["wandb"], tmp_path, "loracl", {"lora.target_modules": ["q_proj"], "x": None}, step=5)
    broken = t.trackers[0]
    t.log_evaluation(["a b", "c"], [50.0, None], learnt=2)  # not every learnt task evaluated: no AP
    assert broken.logged == [(5, {"eval/a_b": 50.0})]
    t.log({"train/loss": 1.0})
    assert not t.trackers and "note: tracker wandb stopped logging: network down" in capsys.readouterr().err
    t.log({"train/loss": math.nan})  # nothing left to log to, and a nan is never sent
    t.finish()


def test_optimizer_steps_average_the_micro_batches() -> None:
    log = [
        {"step": 1, "loss": 4.0, "lr": None, "grad_norm": None, "tokens_per_s": 10.0},
        {"step": 2, "loss": 2.0, "lr": 0.1, "grad_norm": 3.0, "tokens_per_s": 20.0},
        {"step": 3, "loss": 1.0, "lr": 0.05, "grad_norm": 2.0, "tokens_per_s": 30.0},
    ]
    assert optimizer_steps(log) == [
        {"train/loss": 3.0, "train/lr": 0.1, "train/grad_norm": 3.0, "train/tokens_per_s": 20.0},
        {"train/loss": 1.0, "train/lr": 0.05, "train/grad_norm": 2.0, "train/tokens_per_s": 30.0},
    ]


def test_report_to_parsing_and_config() -> None:
    parser = build_parser()

    def report_to(*argv: str) -> list[str]:
        args = parser.parse_args(["run", *argv])
        return load_config(None, args.overrides).tracking.report_to

    assert report_to("--report-to", "tensorboard, wandb", "--report-to", "mlflow,wandb") == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    assert report_to("--report-to", "tensorboard", "--report-to", "none") == []
    assert report_to("--set", "tracking.report_to=trackio") == ["trackio"]
    assert report_to("--set", "tracking.report_to=[wandb]", "--report-to", "tensorboard") == ["tensorboard"]
    assert report_to() == []
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["run", "--report-to", "neptune"])
    assert exit_info.value.code == 2
    with pytest.raises(ConfigError, match=r"tracking\.report_to\.0: Input should be 'tensorboard'"):
        load_config(None, ["tracking.report_to=[neptune]"])
    assert set(MODULES) == set(TRACKERS)


def test_tracking_keys_do_not_change_what_a_checkpoint_or_bench_cell_matches() -> None:
    """Trackers only decide where the numbers also go: a run may be resumed, a bench cell reused, with
    other trackers."""
    plain = load_config(TINY)
    tracked = load_config(TINY, ["tracking.report_to=[tensorboard]", "tracking.project=other"])
    assert result_relevant_config(plain) == result_relevant_config(tracked)
