"""The Python API, `loracl.run`: config as dict / YAML path / RunConfig, in-memory tasks written once as a
jsonl benchmark folder (so a run resumes, from Python or the CLI, on the same files), an already loaded
model, and loracl's own exceptions (never SystemExit) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import loracl
from loracl import api
from loracl.cli import main
from loracl.config import RunConfig, load_config
from loracl.data import Example, Task
from loracl.errors import ConfigError, DataError, LoraclError
from loracl.models.base_model import load_model
from loracl.recipes import run as runner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CONFIG = {
    "model": {"name": "tiny-random-llama", "dtype": "float32", "device": "cpu"},
    "lora": {"r": 4, "alpha": 8},
    "method": {"name": "ewc", "lam": 10.0},
    "train": {"lr": 1e-3, "batch_size": 4, "max_length": 64, "seed": 0},
    "eval": {"max_new_tokens": 2, "zero_shot": False},
}
TASKS = {
    "sentiment": {
        "train": [("Review: a joy. Sentiment:", "positive"), ("Review: dull. Sentiment:", "negative")] * 4,
        "test": [("Review: fine. Sentiment:", "positive"), ("Review: awful. Sentiment:", "negative")],
        "labels": ["positive", "negative"],
    },
    "echo": {
        "train": [{"prompt": f"Repeat {i}:", "answer": str(i)} for i in range(8)],
        "test": [(f"Repeat {i}:", [str(i), f"{i}."]) for i in range(3)],
    },
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted run of in-memory tasks on a model loaded beforehand."""
    out = tmp_path_factory.mktemp("api") / "run"
    loaded = load_model("tiny-random-llama", dtype="float32", device="cpu")
    results = loracl.run(CONFIG, tasks=TASKS, model=loaded, output_dir=out)
    assert any("lora_" in name for name, _ in loaded.model.named_parameters())  # the model given was used
    return out, results


def test_in_memory_tasks_run_and_are_kept_as_a_jsonl_folder(finished) -> None:
    out, results = finished
    assert results["complete"] and results["tasks"] == ["sentiment", "echo"]
    assert results["task_metrics"] == ["exact_match", "rouge_l"]  # labels: exact match; none: ROUGE-L
    assert results == json.loads((out / "results.json").read_text())
    benchmark = yaml.safe_load((out / "config.yaml").read_text())["benchmark"]
    folder = Path(benchmark["data_dir"])
    assert benchmark["name"] == "jsonl" and benchmark["tasks"] == ["sentiment", "echo"]
    assert folder.parent == out.parent / api.TASKS_DIR and folder.is_absolute()
    assert json.loads((folder / "sentiment" / "labels.json").read_text()) == ["positive", "negative"]
    first = json.loads((folder / "echo" / "test.jsonl").read_text().splitlines()[0])
    assert first == {"prompt": "Repeat 0:", "answer": ["0", "0."]}
    # The same tasks again: the same folder, and the finished run is recognised.
    again = loracl.run(CONFIG, tasks=TASKS, output_dir=out, resume=True)
    assert again == results and len(list(folder.parent.iterdir())) == 1


def test_an_interrupted_run_resumes_from_python_or_the_command_line(
    finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_resume import SimulatedCrash, crash, fail_in_task, finished_tasks

    for resume_with in ("python", "cli"):
        out = tmp_path / resume_with / "run"
        with monkeypatch.context() as patch, pytest.raises(SimulatedCrash):
            fail_in_task(patch, 2, crash)
            loracl.run(CONFIG, tasks=TASKS, output_dir=out)
        assert finished_tasks(out) == 1
        if resume_with == "python":
            model = load_model("tiny-random-llama", dtype="float32", device="cpu")
            results = loracl.run(None, tasks=TASKS, model=model, output_dir=out, resume=True)
        else:
            assert main(["run", "--resume", "--output", str(out)]) == 0  # the data folder is on disk
            results = json.loads((out / "results.json").read_text())
        assert results["matrix"] == finished[1]["matrix"] and results["resumed_after"] == [1]
        losses = [[p["final_loss"] for p in r["per_task"]] for r in (results, finished[1])]
        assert losses[0] == losses[1]


def test_tasks_as_task_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture_runs(monkeypatch)
    train = [Example("Q: 1+1?", ("2",)), Example("Q: 2+2?", ("4",))]
    tasks = [Task("sums", train, train, [], None, "exact_match", "memory")]
    with pytest.raises(ConfigError, match="scored by exact_match; .*set eval.metric=exact_match"):
        loracl.run(CONFIG, tasks=tasks, output_dir=tmp_path / "a")
    config = {**CONFIG, "eval": {**CONFIG["eval"], "metric": "exact_match"}}
    loracl.run(config, tasks=tasks, output_dir=tmp_path / "b", data_dir=tmp_path / "data")
    benchmark = seen[-1][0].benchmark
    assert benchmark.tasks == ["sums"] and Path(benchmark.data_dir).parent == tmp_path / "data"
    lines = (Path(benchmark.data_dir) / "sums" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": "Q: 1+1?", "answer": "2"},
                                                    {"prompt": "Q: 2+2?", "answer": "4"}]  # fmt: skip
    with pytest.raises(ConfigError, match="validation examples"):
        with_validation = Task("v", train, train, train, None, "exact_match", "m")
        loracl.run(config, tasks=[with_validation], output_dir=tmp_path)


def capture_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace the runner with a recorder of (config, output_dir, overwrite, resume)."""
    seen: list[tuple] = []

    def record(config, output_dir=None, overwrite=False, resume=False, zero_shot_cache=None, loaded=None):
        seen.append((config, output_dir, overwrite, resume))
        return {"recorded": True}

    monkeypatch.setattr(runner, "run", record)
    return seen


def test_config_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture_runs(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["loracl", "--not-an-option", "run"])  # never read
    assert loracl.run(TINY, overrides=["method.name=ewc", "method.lam=5"], output_dir=tmp_path / "y") == {
        "recorded": True
    }
    config, output_dir, _, _ = seen[-1]
    assert (config.method.name, config.method_options()) == ("ewc", {"lam": 5})
    assert output_dir == tmp_path / "y"

    given = load_config(TINY)
    loracl.run(given, overrides=["lora.r=2"], output_dir=tmp_path / "c")
    assert seen[-1][0].lora.r == 2 and given.lora.r == 4  # the caller's config is not changed
    assert isinstance(seen[-1][0], RunConfig) and seen[-1][0] is not given

    loracl.run({"method": "seq_lora"})  # no output_dir: the default name, fixed before the run
    config, output_dir, _, _ = seen[-1]
    assert config.method.name == "seq_lora" and str(output_dir).startswith("runs/seq_lora-")

    loracl.run(None, output_dir=tmp_path / "y", resume=True)
    assert seen[-1] == (None, tmp_path / "y", False, True)  # the run's own config.yaml


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"config": {"trian": {}}}, ConfigError, "unknown key 'trian' \\(did you mean 'train'\\?\\)"),
        ({"config": 3}, ConfigError, "config: a RunConfig, a dict of config sections or a YAML file's path"),
        ({"config": "no/such.yaml"}, ConfigError, "config file not found"),
        ({"config": {"train": {"lr": object()}}}, ConfigError, "is not a config value"),
        ({"overrides": "train.lr=1"}, ConfigError, "a list of 'dotted.key=value' strings"),
        ({"overrides": ["train.lr"]}, ConfigError, "expected KEY=VALUE"),
        ({"tasks": "agnews"}, ConfigError, "tasks: a dict"),
        ({"tasks": {}}, ConfigError, "at least one task"),
        ({"tasks": {"a/b": {"train": [("p", "a")]}}}, ConfigError, "holds '/'"),
        ({"tasks": {"t": {"train": [("p", "a", "x")]}}}, ConfigError, "tasks\\['t'\\]\\['train'\\]\\[0\\]"),
        ({"tasks": {"t": {"train": [("p", 1)]}}}, ConfigError, "must be strings"),
        ({"tasks": {"t": {"test": [("p", "a")]}}}, ConfigError, "no 'train' examples"),
        ({"tasks": {"t": {"train": [], "dev": []}}}, ConfigError, "unknown key\\(s\\) dev"),
        ({"model": "tiny-random-llama"}, ConfigError, "model: a loracl LoadedModel"),
    ],
)
def test_bad_input_raises_loracls_errors(
    kwargs: dict, error: type, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture_runs(monkeypatch)
    kwargs = {"config": CONFIG, "output_dir": tmp_path / "run", **kwargs}
    with pytest.raises(error, match=match):
        loracl.run(**kwargs)


def test_errors_of_the_run_itself_are_loracls_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'sloa'"):
        loracl.run({**CONFIG, "method": {"name": "sloa"}}, tasks=TASKS, output_dir=tmp_path / "a")
    with pytest.raises(DataError, match="train.jsonl: no examples"):
        loracl.run(CONFIG, tasks={"t": {"train": [], "test": [("p", "a")]}}, output_dir=tmp_path / "b")
    used = load_model("tiny-random-llama", dtype="float32", device="cpu")
    from loracl.config import LoraSection
    from loracl.models.lora import attach_lora

    attach_lora(used.model, LoraSection(r=2))
    with pytest.raises(ConfigError, match="carries adapters"):
        loracl.run(CONFIG, tasks=TASKS, model=used, output_dir=tmp_path / "c")
    assert issubclass(ConfigError, LoraclError) and not (tmp_path / "c").exists()


def test_importing_loracl_stays_light() -> None:
    probe = textwrap.dedent(
        """
        import json, sys
        import loracl
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
        print(json.dumps({"heavy": heavy, "api": callable(loracl.run) and callable(loracl.register)}))
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": [], "api": True}
