"""`loracl bench --tune ... --select-on validation`: hyper-parameters selected on a validation split carved
from train, then the choice run on test. Parsing and its errors; the choice on hand-made scores (the runner
replaced by one that writes results); one real tiny grid end to end; and the proof that no test file is
opened before the choice is made (every file open of the process is recorded through an audit hook)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_data import make_cl_task, make_jsonl_task, superni_data, write_json
from test_layouts import make_olora_dir, make_superni_dir, make_trace_dir

from loracl.cli import main
from loracl.config import build_config
from loracl.data import ORDERS, default_data_root, load_benchmark, load_tasks
from loracl.errors import ConfigError, DataError
from loracl.recipes import bench
from loracl.recipes import run as runner
from loracl.recipes.bench import parse_tune

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ORDER = "COPA+SST-2"
# 10 training examples per task: the default validation fraction of --tune (0.1) holds one out.
CAPS = ["--max-train", "10", "--max-test", "3", "--set", "train.max_length=96"]
TEST_FILES = ("test.json", "test.jsonl")


def tune_args(out: Path, tune: str = "train.lr=1e-4,1e-2", methods: str = "seq_lora", orders: str = ORDER,
              *extra: str) -> list[str]:  # fmt: skip
    return ["bench", TINY, "--methods", methods, "--orders", orders, *CAPS, "--tune", tune, *extra,
            "--output", str(out)]  # fmt: skip


# -- every file the process opens, while recording (an audit hook: builtins.open, io.open, os.open) ---------

_OPENS: list[tuple[str, str]] | None = None  # (event, path or cell folder) while recording; None: idle
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if _OPENS is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENS.append(("open", os.fsdecode(args[0])))


@pytest.fixture
def opened() -> list[tuple[str, str]]:
    """The files opened (("open", path)) from now to the end of the test, in order. An audit hook cannot be
    removed: it is added once and records nothing outside such a test."""
    global _OPENS, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    _OPENS = []
    try:
        yield _OPENS
    finally:
        _OPENS = None


def is_test_file(path: str) -> bool:
    return Path(path).name in TEST_FILES


# -- (a) the syntax and its errors --------------------------------------------------------------------------


def test_tune_syntax():
    [lr] = parse_tune(["train.lr=1e-4, 3e-4,1e-3"])
    assert (lr.key, lr.texts, lr.values) == ("train.lr", ("1e-4", "3e-4", "1e-3"), ("1e-4", "3e-4", "1e-3"))
    # (YAML 1.1 reads 1e-4 as a string; the float field of the config takes it, and bench.json the float)
    keys = parse_tune(["train.lr=1e-4,3e-4;method.lam=1,100", "lora.target_modules=[q_proj,v_proj],[q_proj]"])
    assert [k.key for k in keys] == ["train.lr", "method.lam", "lora.target_modules"]
    assert keys[1].values == (1, 100) and keys[2].values == (["q_proj", "v_proj"], ["q_proj"])
    # several keys: every combination, the first key varying slowest, named as --methods writes config keys
    tuning = bench.method_tuning(bench.parse_method("ewc"), keys[:2])
    assert [c.text for c in tuning.candidates] == [
        "train.lr=1e-4:method.lam=1", "train.lr=1e-4:method.lam=100",
        "train.lr=3e-4:method.lam=1", "train.lr=3e-4:method.lam=100",
    ]  # fmt: skip
    assert tuning.candidates[1].values == {"train.lr": "1e-4", "method.lam": 100}
    # a key the method sets itself wins; a method.KEY it does not have is not tuned for it
    fixed = bench.method_tuning(bench.parse_method("ewc:method.lam=7"), keys[:2])
    assert fixed.fixed == {"method.lam": 7}
    assert [c.text for c in fixed.candidates] == ["train.lr=1e-4", "train.lr=3e-4"]
    assert bench.method_tuning(bench.parse_method("ewc:lam=7"), keys[:2]).fixed == {"method.lam": 7}
    seq = bench.method_tuning(bench.parse_method("seq_lora"), keys[:2])
    assert seq.skipped == ["method.lam"] and len(seq.candidates) == 2
    assert bench.method_tuning(bench.parse_method("zero_shot"), keys).candidates == []  # does not train


@pytest.fixture
def no_runs(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(runner, "run", lambda config, out, **kwargs: calls.append(str(out)))
    return calls


@pytest.mark.parametrize(
    ("tune", "extra", "message"),
    [
        ("train.lr", [], "--tune: 'train.lr': expected KEY=V1,V2,..."),
        ("lr=1e-4,3e-4", [], "--tune: 'lr' is not a dotted config key"),
        ("train.lr=1e-4;train.lr=3e-4", [], "--tune: train.lr is given twice"),
        ("train.lr=1e-4,", [], "--tune: train.lr=1e-4,: an empty value"),
        ("train.lr=0.1,0.1", [], "--tune: train.lr lists one value twice"),
        ("train.lr=1e-4,0.0001", [], "train.lr=1e-4 and train.lr=0.0001 give seq_lora the same config"),
        ("train.lr=[1e-4", [], "--tune train.lr: invalid YAML"),
        ("benchmark.order=order1,order2", [], "--tune: benchmark.order is set by the bench"),
        ("eval.split=test,validation", [], "--tune: eval.split is set by the bench"),
        ("benchmark.validation_fraction=0.1,0.2", [], "benchmark.validation_fraction cannot be tuned"),
        ("train.nosuch=1,2", [], "unknown key 'train.nosuch'"),
        ("train.lr=-1,1", [], "train.lr: Input should be greater than 0"),
        ("method.lam=1,100", [], "--tune: method.lam is an option of none of the methods (seq_lora)"),
        (";", [], "--tune: give at least one KEY=V1,V2,..."),
        ("train.lr=1e-4,3e-4", ["--select-on", "test"], "--select-on: 'test' is not accepted"),
        ("train.lr=1e-4,3e-4", ["--set", "eval.split=validation"], "--tune: eval.split is set by the bench"),
        ("train.lr=1e-4,3e-4", ["--max-train", "4"], "no validation examples: validation_fraction 0.1 of"),
    ],
)
def test_bad_tuning_is_refused_before_anything_runs(tmp_path, no_runs, capsys, tune, extra, message):
    out = tmp_path / "grid"
    assert main(tune_args(out, tune, "seq_lora", ORDER, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert no_runs == [] and not out.exists()


def test_select_on_needs_tune_and_the_split_needs_a_fraction(tmp_path, no_runs, capsys):
    out = tmp_path / "grid"
    args = ["bench", TINY, "--methods", "seq_lora", "--orders", ORDER, "--output", str(out)]
    assert main([*args, "--select-on", "validation"]) == 2
    assert capsys.readouterr().err.strip() == "error: --select-on needs --tune (the values to select among)"
    assert main(["run", TINY, "--set", "eval.split=validation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert "eval.split=validation needs benchmark.validation_fraction > 0" in err
    assert len(err.splitlines()) == 1 and no_runs == [] and not out.exists()


# -- (b) the choice, on hand-made scores --------------------------------------------------------------------


@pytest.fixture
def scored_runs(monkeypatch) -> list[runner.RunConfig]:
    """The runner replaced by one that writes a complete results.json whose AP is SCORES[(lr, order tasks)]
    (a validation run) or 40 (a test run); a missing entry fails the run. Returns the configs run."""
    configs: list = []

    def fake_run(config, out, overwrite=False, resume=False, zero_shot_cache=None):
        configs.append(config)
        tasks = config.benchmark.tasks
        if config.eval.split == "validation":
            ap = SCORES.get((config.train.lr, "+".join(tasks)))
            if ap is None:
                raise RuntimeError("diverged on purpose")
        else:
            ap = 40.0
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / bench.ERROR_FILE).unlink(missing_ok=True)
        results = {"complete": True, "config": config.model_dump(mode="json"), "tasks": tasks,
                   "eval_split": config.eval.split, "matrix": [[ap] * len(tasks)] * len(tasks),
                   "metrics": {"AP": ap, "BWT": 0.0, "FWT": None, "forgetting": 0.0}}  # fmt: skip
        (out / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(runner, "run", fake_run)
    return configs


SCORES = {
    # lr 1e-4 wins on the first order, 3e-4 on the mean over both: 3e-4 is chosen.
    (1e-4, "COPA+SST-2"): 90.0, (1e-4, "SST-2+COPA"): 10.0,
    (3e-4, "COPA+SST-2"): 60.0, (3e-4, "SST-2+COPA"): 60.0,
    (1e-3, "COPA+SST-2"): 20.0, (1e-3, "SST-2+COPA"): 30.0,
    # a tie between 2e-4 and 5e-4: the one listed first
    (2e-4, "COPA+SST-2"): 50.0, (5e-4, "COPA+SST-2"): 50.0,
}  # fmt: skip


def test_the_best_mean_validation_ap_is_chosen_and_run_on_test(tmp_path, scored_runs, capsys):
    out = tmp_path / "grid"
    orders = "COPA+SST-2,SST-2+COPA"
    assert main(tune_args(out, "train.lr=1e-4,3e-4,1e-3", "seq_lora", orders)) == 0
    printed = capsys.readouterr().out
    tuning = [c for c in scored_runs if c.eval.split == "validation"]
    final = [c for c in scored_runs if c.eval.split == "test"]
    assert [(c.train.lr, "+".join(c.benchmark.tasks)) for c in tuning] == [
        (lr, o) for lr in (1e-4, 3e-4, 1e-3) for o in orders.split(",")
    ]
    assert scored_runs[: len(tuning)] == tuning  # every tuning run before any test run
    assert [(c.train.lr, c.eval.split) for c in final] == [(3e-4, "test")] * 2
    # selection and final runs hold out the same examples: --tune's default fraction, written in both
    assert {c.benchmark.validation_fraction for c in scored_runs} == {0.1}
    assert "note: --tune: benchmark.validation_fraction is 0; holding out 0.1" in printed
    assert "[tune 1/6] seq_lora train.lr=1e-4 on COPA+SST-2: running in" in printed
    assert "[selection] seq_lora: train.lr=3e-4 chosen, mean validation AP 60.0" in printed

    manifest = json.loads((out / "bench.json").read_text())
    [record] = manifest["selection"]["methods"]
    assert record["chosen"] == "train.lr=3e-4" and record["tuned_keys"] == ["train.lr"]
    assert [(c["text"], c["values"], c["scores"], c["mean"]) for c in record["candidates"]] == [
        ("train.lr=1e-4", {"train.lr": 1e-4}, {"COPA+SST-2": 90.0, "SST-2+COPA": 10.0}, 50.0),
        ("train.lr=3e-4", {"train.lr": 3e-4}, {"COPA+SST-2": 60.0, "SST-2+COPA": 60.0}, 60.0),
        ("train.lr=1e-3", {"train.lr": 1e-3}, {"COPA+SST-2": 20.0, "SST-2+COPA": 30.0}, 25.0),
    ]
    assert {c["path"] for c in manifest["selection"]["cells"]} == {
        f"tune/seq_lora/train.lr={lr}/{o}" for lr in ("1e-4", "3e-4", "1e-3") for o in orders.split(",")
    }
    assert all(c["config"]["eval"]["split"] == "validation" for c in manifest["selection"]["cells"])
    chosen = [(c["path"], c["config"]["train"]["lr"], c["config"]["eval"]["split"]) for c in
              manifest["cells"]]  # fmt: skip
    assert chosen == [(f"seq_lora/{o}", 3e-4, "test") for o in orders.split(",")]
    text = (out / "bench.md").read_text()
    section = text[text.index("## Selection on validation") : text.index("## Every cell")]
    assert "| seq_lora | train.lr=3e-4 | 60.0 | 60.0 | 60.0 | **chosen** |" in section
    assert "| seq_lora | train.lr=1e-4 | 90.0 | 10.0 | 50.0 |  |" in section
    assert "**Test data was never read during selection**" in section
    assert "--tune train.lr=1e-4,3e-4,1e-3 --select-on validation" in manifest["command"]

    # Rerun: every cell, tuning ones included, is finished and skipped; --report-only rebuilds the section.
    scored_runs.clear()
    assert main(tune_args(out, "train.lr=1e-4,3e-4,1e-3", "seq_lora", orders)) == 0
    assert scored_runs == [] and capsys.readouterr().out.count("finished earlier, skipped") == 8
    (out / "bench.md").unlink()
    assert main(["bench", "--report-only", str(out)]) == 0
    assert section in (out / "bench.md").read_text()


def test_ties_failures_and_explicit_settings(tmp_path, scored_runs, capsys):
    """A tie goes to the candidate listed first; a candidate that fails is out of the running (and the exit
    status says a cell failed); a method's own setting of a tuned key wins over --tune."""
    out = tmp_path / "grid"
    methods = "seq_lora,seq_lora:train.lr=7e-4,zero_shot"
    assert main(tune_args(out, "train.lr=9e-4,2e-4,5e-4", methods, ORDER)) == 1  # 9e-4: no score, fails
    captured = capsys.readouterr()
    assert "1 cell(s) failed: seq_lora on COPA+SST-2 (tuning train.lr=9e-4)" in captured.err
    final = {(c.method.name, c.train.lr) for c in scored_runs if c.eval.split == "test"}
    assert final == {("seq_lora", 2e-4), ("seq_lora", 7e-4), ("zero_shot", 1e-3)}
    tuned = [c.train.lr for c in scored_runs if c.eval.split == "validation"]
    assert tuned == [9e-4, 2e-4, 5e-4]  # seq_lora alone: the other two are not tuned
    manifest = json.loads((out / "bench.json").read_text())
    records = {r["method"]: r for r in manifest["selection"]["methods"]}
    assert records["seq_lora"]["chosen"] == "train.lr=2e-4"
    assert [c["state"] for c in records["seq_lora"]["candidates"]] == ["failed", "ok", "ok"]
    assert records["seq_lora:train.lr=7e-4"]["fixed"] == {"train.lr": 7e-4}
    assert records["zero_shot"]["note"] == "it does not train"
    text = (out / "bench.md").read_text()
    assert "| seq_lora | train.lr=9e-4 | failed | n/a |  |" in text
    assert "- `seq_lora:train.lr=7e-4`: train.lr is set in --methods (0.0007), which wins over --tune" in text
    assert "- `zero_shot`: not tuned: it does not train." in text
    assert "[selection] seq_lora:train.lr=7e-4: not tuned (no tuned key is left to it; train.lr set in " \
        "--methods (wins over --tune))" in captured.out  # fmt: skip


def test_no_candidate_finishing_means_no_test_run(tmp_path, scored_runs, capsys):
    out = tmp_path / "grid"
    assert main(tune_args(out, "train.lr=8e-4,9e-4")) == 1
    printed = capsys.readouterr().out
    assert "no choice: no candidate finished on every order; its test cells do not run" in printed
    assert all(c.eval.split == "validation" for c in scored_runs) and len(scored_runs) == 2
    manifest = json.loads((out / "bench.json").read_text())
    assert manifest["cells"] == [] and manifest["selection"]["methods"][0]["chosen"] is None
    assert "no choice: no candidate finished on every order" in (out / "bench.md").read_text()


# -- one real tiny grid, end to end, with every file open recorded ------------------------------------------


@pytest.fixture(scope="module")
def real_grid(tmp_path_factory):
    """seq_lora with two learning rates on one two-task order, on the tiny model: two tuning runs on
    validation, then the chosen one on test. Every file the process opens is recorded, with the start and
    end of each run (("start"/"end", run folder) among the ("open", path) entries)."""
    global _OPENS, _HOOKED
    out = tmp_path_factory.mktemp("tune") / "grid"
    real_run = runner.run

    def marked_run(config, run_dir, **kwargs):
        _OPENS.append(("start", str(run_dir)))
        try:
            return real_run(config, run_dir, **kwargs)
        finally:
            _OPENS.append(("end", str(run_dir)))

    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    runner.run = marked_run
    _OPENS = []
    try:
        code = main(tune_args(out, "train.lr=1e-4,1e-3"))
        events = _OPENS
    finally:
        _OPENS = None
        runner.run = real_run
    assert code == 0
    return out, events


def test_a_real_tuned_grid(real_grid):
    out, _ = real_grid
    manifest = json.loads((out / "bench.json").read_text())
    [record] = manifest["selection"]["methods"]
    candidates = {c["text"]: c for c in record["candidates"]}
    assert [c["state"] for c in candidates.values()] == ["ok", "ok"]
    means = [c["mean"] for c in record["candidates"]]
    best = record["candidates"][means.index(max(means))]  # the first of the best
    assert record["chosen"] == best["text"]
    final = json.loads((out / "seq_lora" / ORDER / "results.json").read_text())
    assert final["complete"] and final["eval_split"] == "test" and final["config"]["train"]["lr"] == \
        best["values"]["train.lr"]  # fmt: skip
    for candidate in ("train.lr=1e-4", "train.lr=1e-3"):
        folder = out / "tune" / "seq_lora" / candidate / ORDER
        results = json.loads((folder / "results.json").read_text())
        assert results["complete"] and results["eval_split"] == "validation"
        assert results["metrics"]["AP"] == candidates[candidate]["scores"][ORDER]
        # one validation example per task (0.1 of 10), the same examples both runs and the final one held out
        assert [t["eval_examples"] for t in results["per_task"]] == [1, 1]
        assert [t["test_examples"] for t in results["per_task"]] == [0, 0]
        assert [t["train_examples"] for t in results["per_task"]] == [9, 9]
        assert not any(is_test_file(p) for p in results["provenance"]["data_files"])
        assert "validation** split" in (folder / "report.md").read_text()
        predictions = (folder / "tasks" / "2-SST-2" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == 2  # the validation example of each task
    assert [t["train_examples"] for t in final["per_task"]] == [9, 9]
    assert [t["test_examples"] for t in final["per_task"]] == [3, 3]
    assert any(is_test_file(p) for p in final["provenance"]["data_files"])


def test_no_test_file_is_opened_before_the_choice(real_grid):
    """(c) Every file the bench process opened, in order: no test split file of any task until every tuning
    run has ended; each tuning run opened the training files (the record sees the data being read); the
    final run, after the choice, opens the test files."""
    out, events = real_grid
    runs = [(i, event, path) for i, (event, path) in enumerate(events) if event in ("start", "end")]
    tuning_end = max(i for i, event, path in runs if event == "end" and "/tune/" in path)
    final_start = next(i for i, event, path in runs if event == "start" and "/tune/" not in path)
    assert tuning_end < final_start
    opened_before = [path for event, path in events[:tuning_end] if event == "open"]
    assert not [p for p in opened_before if is_test_file(p)], "a test file was opened during selection"
    data = default_data_root() / "cl_benchmark"
    for task in ORDER.split("+"):
        assert str(data / task / "train.json") in opened_before  # the tuning runs did read their data
        assert str(data / task / "test.json") in [p for e, p in events[final_start:] if e == "open"]


# -- the data layer: the same train and validation, no test file opened, in every format -------------------


def _folders(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """One small data folder per format (benchmark name -> folder, task names)."""
    cl = root / "cl"
    for name in ("alpha", "beta"):
        make_cl_task(cl, name)
    jsonl = root / "jsonl"
    make_jsonl_task(jsonl, "alpha", n_train=10)
    make_jsonl_task(jsonl, "beta", n_train=10, labels=False)
    files = root / "superni_files"
    write_json(files / "task001_x.json", superni_data([[f"out {i}"] for i in range(20)]))
    return {
        "cl_benchmark": (cl, ["alpha", "beta"]),
        "jsonl": (jsonl, ["alpha", "beta"]),
        "olora": (make_olora_dir(root / "olora"), ["agnews", "MNLI"]),
        "trace": (make_trace_dir(root / "trace"), ORDERS["trace"][:2]),
        "superni": (make_superni_dir(root / "superni", ORDERS["superni1"][:2]), ORDERS["superni1"][:2]),
        "superni_files": (files, ["task001_x"]),
    }


@pytest.mark.parametrize("layout", ["cl_benchmark", "jsonl", "olora", "trace", "superni", "superni_files"])
def test_validation_loading_reads_no_test_file(tmp_path, opened, layout):
    root, names = _folders(tmp_path)[layout]
    benchmark = "superni" if layout == "superni_files" else layout
    kwargs = {"data_dir": root, "tasks": names, "max_train": 8, "validation_fraction": 0.3, "seed": 3}
    full = load_benchmark(benchmark, **kwargs)
    opened.clear()
    held = load_benchmark(benchmark, split="validation", **kwargs)
    for a, b in zip(full, held, strict=True):
        assert (a.name, a.train, a.validation) == (b.name, b.train, b.validation)
        assert (a.metric, a.source) == (b.metric, b.source)
        assert b.test == [] and a.test and b.validation
        assert a.labels == b.labels or benchmark == "superni"  # SuperNI's, from train alone: a bound only
    paths = [path for _, path in opened]
    assert not [p for p in paths if is_test_file(p)]
    assert any(Path(p).name.startswith("train") or layout == "superni_files" for p in paths)


def test_validation_needs_examples_and_a_named_benchmark(tmp_path):
    make_cl_task(tmp_path / "cl", "alpha", n_train=4)
    with pytest.raises(DataError, match="no validation examples: validation_fraction 0.1 of its 4 training"):
        load_benchmark("cl_benchmark", data_dir=tmp_path / "cl", tasks=["alpha"], validation_fraction=0.1,
                       split="validation")  # fmt: skip
    data = {"data_dir": str(tmp_path / "cl"), "tasks": ["alpha"], "validation_fraction": 0.5}
    config = build_config({"benchmark": data, "eval": {"split": "validation"}})
    with pytest.raises(ConfigError, match="set benchmark.name"):  # detection would read test.json
        load_tasks(config)
    config.benchmark.name = "cl_benchmark"
    assert [len(t.validation) for t in load_tasks(config)] == [2]


def test_a_validation_run_has_its_own_zero_shot_key_and_old_keys_hold():
    test = build_config({"benchmark": {"validation_fraction": 0.2}})
    validation = build_config({"benchmark": {"validation_fraction": 0.2}, "eval": {"split": "validation"}})
    assert runner.zero_shot_key(test, []) != runner.zero_shot_key(validation, [])
    assert "eval.split" not in runner.result_relevant_config(test)  # the checkpoint hashes of older runs hold
    assert "eval.split" in runner.result_relevant_config(validation)


def test_a_tuned_grid_copy_reruns_only_what_changed(real_grid, tmp_path, no_runs, capsys):
    out = Path(shutil.copytree(real_grid[0], tmp_path / "grid"))
    assert main(tune_args(out, "train.lr=1e-4,1e-3")) == 0
    assert no_runs == [] and capsys.readouterr().out.count("finished earlier, skipped") == 3
    assert main(tune_args(out, "train.lr=1e-4,1e-3,3e-3")) == 0  # one more candidate: only it runs
    assert no_runs == [str(out / "tune" / "seq_lora" / "train.lr=3e-3" / ORDER)]
