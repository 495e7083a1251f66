"""`loracl bench`: one real tiny grid (2 methods x 2 two-task orders), then resuming, failing cells, input
validation and the report's numbers on hand-made cells."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracl.cli import main
from loracl.config import build_config
from loracl.data import Task
from loracl.errors import ConfigError
from loracl.recipes import bench
from loracl.recipes import run as runner
from loracl.recipes.bench import aggregate, parse_method, parse_order, write_bench_report

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
METHODS = "slao,seq_lora"
ORDERS = "COPA+SST-2,SST-2+COPA"
CAPS = ["--max-train", "4", "--max-test", "3", "--set", "train.max_length=96"]


def bench_args(out: Path, methods: str = METHODS, orders: str = ORDERS) -> list[str]:
    return ["bench", TINY, "--methods", methods, "--orders", orders, *CAPS, "--output", str(out)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "grid"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices are too small to gain from threads; a busy CPU loses
    try:
        assert main(bench_args(out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def grid_copy(grid, tmp_path) -> Path:
    """A private copy of the finished grid, for tests that change it."""
    return Path(shutil.copytree(grid, tmp_path / "grid"))


@pytest.fixture
def no_runs(monkeypatch) -> list[str]:
    """Replace the runner with a recorder that runs nothing; returns the run directories it was asked for
    (marked " (resumed)" when asked to continue one from its checkpoint)."""
    calls: list[str] = []

    def record(config, out, overwrite=False, resume=False, zero_shot_cache=None):
        calls.append(str(out) + (" (resumed)" if resume else ""))

    monkeypatch.setattr(runner, "run", record)
    return calls


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_grid_writes_cells_and_tables_that_match_them(grid):
    for name in ("bench.json", "bench.md", "bench.csv", "bench.png"):
        assert (grid / name).is_file(), name
    rows = read_csv(grid / "bench.csv")
    assert [(r["method"], r["order"]) for r in rows] == [
        (m, o) for m in METHODS.split(",") for o in ORDERS.split(",")
    ]
    table = (grid / "bench.md").read_text()
    for row in rows:
        results = json.loads((grid / row["method"] / row["order"] / "results.json").read_text())
        assert results["complete"] and results["method"] == row["method"]
        assert results["tasks"] == row["order"].split("+") == row["tasks"].split("+")
        assert results["config"]["benchmark"]["max_train"] == 4
        # a cell keeps its last adapter version only (bench sets versions.keep: 1)
        assert results["config"]["versions"]["keep"] == 1
        kept = [p.name for p in (grid / row["method"] / row["order"] / "versions").iterdir()]
        assert kept == [f"v{len(results['matrix'])}"], kept
        assert row["status"] == "ok"
        for key in ("AP", "BWT", "FWT", "forgetting"):
            assert float(row[key]) == pytest.approx(results["metrics"][key])
        cells = [f"{results['metrics'][k]:.1f}" for k in ("AP", "BWT", "FWT", "forgetting")]
        assert f"| {row['method']} | {row['order']} | {' | '.join(cells)} |" in table
    assert "caps: 4 train / 3 test examples per task" in table
    assert "--max-train" not in table and "--set benchmark.max_train=4" in table  # reproducible command
    assert "not a benchmark family the paper reports" in table  # no paper column for custom orders


def test_second_invocation_skips_finished_cells(grid_copy, no_runs, capsys):
    assert main(bench_args(grid_copy)) == 0
    assert no_runs == []
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4


def test_cells_in_parallel_workers_make_the_same_runs(grid, tmp_path, capsys):
    out = tmp_path / "parallel"
    assert main([*bench_args(out), "--jobs", "2"]) == 0  # workers inherit OMP_NUM_THREADS=1 (conftest)
    printed = capsys.readouterr().out
    assert printed.count("finished in") == 4 and "output in" in printed
    for method in METHODS.split(","):
        for order in ORDERS.split(","):
            ours, theirs = (out / method / order, grid / method / order)
            results = [json.loads((d / "results.json").read_text()) for d in (ours, theirs)]
            for key in ("matrix", "config"):
                assert results[0][key] == results[1][key]
            weights = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ours, theirs)]
            assert weights[0].keys() == weights[1].keys()
            for key in weights[0]:
                torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-6)
            assert "method " in (out / method / f"{order}.log").read_text()  # the cell's output went there
    assert [r["status"] for r in read_csv(out / "bench.csv")] == ["ok"] * 4


def test_the_base_model_is_evaluated_once_per_order(grid):
    """The first method of each order evaluates the base model and caches its scores; the next reuses them."""
    cached = list((grid / bench.ZERO_SHOT_DIR).glob("*.json"))
    assert len(cached) == 2  # one per order: the tasks differ
    first, second = METHODS.split(",")
    for order in ORDERS.split(","):
        runs = [json.loads((grid / m / order / "results.json").read_text()) for m in (first, second)]
        assert runs[0]["zero_shot_from_cache"] is False and runs[0]["timings"]["zero_shot_eval"] > 0
        assert runs[1]["zero_shot_from_cache"] is True and runs[1]["timings"]["zero_shot_eval"] == 0
        assert runs[0]["zero_shot"] == runs[1]["zero_shot"]
        assert len(runs[1]["zero_shot"]) == 2


def test_zero_shot_cache_key_and_entries(tmp_path):
    base = build_config({"model": {"name": "tiny-random-llama"}, "benchmark": {"order": "order1"}})
    tasks = [Task(name, [], [], [], None, "exact_match", "") for name in ("dbpedia", "amazon")]
    key = runner.zero_shot_key(base, tasks)
    same_base = base.model_copy(update={"method": base.method.model_copy(update={"name": "olora"})})
    same_base.train = base.train.model_copy(update={"lr": 0.5})
    same_base.lora = base.lora.model_copy(update={"r": 2})
    assert runner.zero_shot_key(same_base, tasks) == key  # method, optimiser and LoRA do not matter
    for changed in (
        base.model_copy(update={"eval": base.eval.model_copy(update={"batch_size": 3})}),
        base.model_copy(update={"benchmark": base.benchmark.model_copy(update={"max_test": 5})}),
        base.model_copy(update={"train": base.train.model_copy(update={"max_length": 64})}),
    ):
        assert runner.zero_shot_key(changed, tasks) != key
    entry = tmp_path / "cache" / f"{key}.json"
    assert runner.read_zero_shot(entry, tasks) is None
    runner.write_zero_shot(entry, tasks, [12.5, 0.0])
    assert runner.read_zero_shot(entry, tasks) == [12.5, 0.0]
    assert runner.read_zero_shot(entry, tasks[::-1]) is None  # other tasks: not these scores
    entry.write_text("{not json")
    assert runner.read_zero_shot(entry, tasks) is None


def test_each_call_reports_its_own_grid_when_another_shares_the_folder(grid_copy, monkeypatch, capsys):
    """Two calls on one folder (one order each, to use two cores): the later one rewrites bench.json when it
    starts, yet the earlier one's report is of the grid it ran."""
    run_cells = bench.run_cells

    def another_call_starts(cells, heads, jobs):
        bench.write_manifest(grid_copy, "other", "loracl bench (another call)", [], None, ["slao"], ["x+y"])
        return run_cells(cells, heads, jobs)

    monkeypatch.setattr(bench, "run_cells", another_call_starts)
    assert main(bench_args(grid_copy, orders="COPA+SST-2")) == 0
    manifest = json.loads((grid_copy / "bench.json").read_text())
    assert manifest["orders"] == ["COPA+SST-2"] and len(manifest["cells"]) == 2
    assert "2/2 cells finished" in capsys.readouterr().out
    assert [(r["method"], r["order"]) for r in read_csv(grid_copy / "bench.csv")] == [
        ("slao", "COPA+SST-2"), ("seq_lora", "COPA+SST-2")
    ]


def test_jobs_must_be_positive(tmp_path, no_runs, capsys):
    assert main([*bench_args(tmp_path / "out"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err and no_runs == []


def test_unfinished_or_changed_cells_run_again(grid_copy, no_runs):
    results_path = grid_copy / "seq_lora" / "SST-2+COPA" / "results.json"
    results = json.loads(results_path.read_text())
    results_path.write_text(json.dumps({**results, "complete": False}))
    assert main(bench_args(grid_copy)) == 0
    assert no_runs == [str(grid_copy / "seq_lora" / "SST-2+COPA") + " (resumed)"]  # from its checkpoint
    no_runs.clear()
    shutil.rmtree(grid_copy / "seq_lora" / "SST-2+COPA" / "checkpoint")
    assert main(bench_args(grid_copy)) == 0
    assert no_runs == [str(grid_copy / "seq_lora" / "SST-2+COPA")]  # no checkpoint: from scratch
    no_runs.clear()
    assert main(bench_args(grid_copy) + ["--set", "train.lr=5e-4"]) == 0  # another config: every cell
    assert len(no_runs) == 4 and not any("resumed" in c for c in no_runs)


def test_a_full_matrix_answers_a_metrics_grid_but_not_the_reverse(grid_copy, no_runs, capsys):
    assert main([*bench_args(grid_copy), "--set", "eval.matrix=metrics"]) == 0
    assert no_runs == [] and capsys.readouterr().out.count("finished earlier, skipped") == 4
    cell = grid_copy / "slao" / "COPA+SST-2"
    results = json.loads((cell / "results.json").read_text())
    results["matrix"][0][1] = None  # as a metrics run of more tasks leaves some entries
    results["config"]["eval"]["matrix"] = "metrics"
    (cell / "results.json").write_text(json.dumps(results))
    assert main(bench_args(grid_copy)) == 0
    assert no_runs == [str(cell)]  # from scratch: resuming a complete run would change nothing


def test_failing_cell_is_reported_and_the_exit_status_is_non_zero(grid_copy, monkeypatch, capsys):
    real_run = runner.run

    def run_or_fail(config, out, overwrite=False, resume=False, zero_shot_cache=None):
        if config.method.name == "zero_shot":
            raise RuntimeError("out of memory on purpose")
        return real_run(config, out, overwrite=overwrite, resume=resume, zero_shot_cache=zero_shot_cache)

    monkeypatch.setattr(runner, "run", run_or_fail)
    code = main(bench_args(grid_copy, methods="slao,zero_shot", orders="COPA+SST-2"))
    assert code == 1
    assert "1 cell(s) failed: zero_shot on COPA+SST-2" in capsys.readouterr().err
    rows = {r["method"]: r for r in read_csv(grid_copy / "bench.csv")}
    assert rows["slao"]["status"] == "ok"  # finished in the first grid, skipped here
    assert rows["zero_shot"]["status"] == "failed"
    assert rows["zero_shot"]["error"] == "RuntimeError: out of memory on purpose"
    assert "failed: RuntimeError: out of memory on purpose" in (grid_copy / "bench.md").read_text()
    assert "Traceback" in (grid_copy / "zero_shot" / "COPA+SST-2" / "bench_error.txt").read_text()
    assert main(["bench", "--report-only", str(grid_copy)]) == 1  # the rebuilt report still says so


@pytest.mark.parametrize(
    ("methods", "orders", "message"),
    [
        ("slao,seq_lora,nosuch", ORDERS, "unknown method 'nosuch'"),
        ("slao,slao:schedul=inv", ORDERS, "method.schedul: unknown option for method 'slao'"),
        ("slao", "order1,order9", "unknown order 'order9'"),
        ("slao", "COPA+nosuchtask", "nosuchtask"),
        ("slao,slao", ORDERS, "names the same entry twice"),
    ],
)
def test_bad_grid_is_refused_before_anything_runs(tmp_path, no_runs, capsys, methods, orders, message):
    out = tmp_path / "out"
    assert main(bench_args(out, methods, orders)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert no_runs == [] and not out.exists()


def test_report_only_needs_a_bench_directory(tmp_path, capsys):
    assert main(["bench", "--report-only", str(tmp_path)]) == 2
    assert "not a `loracl bench` directory" in capsys.readouterr().err


def test_aggregate_known_numbers():
    spread = aggregate([1.0, 2.0, 6.0, None])
    assert (spread.n, spread.mean, spread.low, spread.high) == (3, 3.0, 1.0, 6.0)
    assert spread.std == pytest.approx(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) ** 0.5 / 2 ** 0.5)
    assert aggregate([4.0]).std is None and aggregate([4.0]).mean == 4.0
    assert aggregate([None, None]).mean is None


def test_method_and_order_specs():
    spec = parse_method("slao:schedule=inv:constant=0.25")
    assert (spec.name, spec.options) == ("slao", {"schedule": "inv", "constant": 0.25})
    assert parse_order("order4").tasks is None and parse_order("order4").order == "order4"
    assert parse_order("COPA+SST-2").tasks == ("COPA", "SST-2")
    with pytest.raises(ConfigError, match="NAME:KEY=VALUE"):
        parse_method("slao:schedule")


def test_shared_method_options_apply_to_every_cell_and_a_spec_overrides_them():
    base = {"method": {"name": "seq_lora", "schedule": "inv"}, "benchmark": {"tasks": ["a", "b"]}}
    data = bench.cell_data(base, parse_method("slao:schedule=constant"), parse_order("order2"))
    assert data["method"] == {"name": "slao", "schedule": "constant"}
    assert data["benchmark"] == {"order": "order2", "tasks": None}
    assert base["method"]["schedule"] == "inv"  # the shared base is not modified


def test_a_method_may_have_its_own_config_keys(tmp_path, no_runs):
    """Papers tune each method on its own: `seq_lora:train.lr=3e-4` changes seq_lora's cells alone, over a
    shared --set; the grid records it in each cell's config."""
    spec = parse_method("seq_lora:train.lr=0.0003:method.lam=2")
    assert (spec.options, spec.settings) == ({}, {"train.lr": 0.0003, "method.lam": 2})
    base = {"train": {"lr": 1e-3}, "benchmark": {"max_test": 2}}
    data = bench.cell_data(base, spec, parse_order("order1"))
    assert data["train"]["lr"] == 0.0003 and data["method"]["lam"] == 2 and base["train"]["lr"] == 1e-3
    out = tmp_path / "grid"
    assert main(bench_args(out, methods="slao,seq_lora:train.lr=3e-4", orders="COPA+SST-2")) == 0
    configs = {c["method"]: c["config"] for c in json.loads((out / "bench.json").read_text())["cells"]}
    assert configs["seq_lora:train.lr=3e-4"]["train"]["lr"] == 3e-4 and configs["slao"]["train"]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seq_lora:benchmark.order=order2", "benchmark.order is set by the bench"),
        ("seq_lora:output_dir=x", "output_dir is set by the bench"),
        ("seq_lora:train.nosuch=1", "unknown key 'train.nosuch'"),
        ("seq_lora:train.lr=[a", "invalid YAML"),
    ],
)
def test_a_methods_config_keys_are_checked_before_anything_runs(tmp_path, no_runs, capsys, text, message):
    out = tmp_path / "grid"
    assert main(bench_args(out, methods=f"slao,{text}", orders="COPA+SST-2")) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert no_runs == [] and not out.exists()


# -- the report on hand-made cells with known metrics ----------------------------------------------


def fake_cell(out: Path, method: str, order: str, metrics: dict, role: str = "continual") -> dict:
    benchmark = {"order": order} if "+" not in order else {"tasks": order.split("+")}
    config = build_config({"method": method, "benchmark": benchmark}).model_dump(mode="json")
    path = out / method / order
    path.mkdir(parents=True)
    results = {"method": method, "complete": True, "config": config, "metrics": metrics, "role": role,
               "data_free": method != "mtl", "tasks": ["t1", "t2"], "device": "cpu",
               "timings": {"train_total": 1.0, "wall": 2.0}, "adapter_bytes": [10, 10]}
    (path / "results.json").write_text(json.dumps(results))
    return {"method": method, "order": order, "path": f"{method}/{order}", "config": config}


def test_report_means_spreads_and_paper_numbers(tmp_path):
    def metrics(ap: float, bwt: float | None) -> dict:
        return {"AP": ap, "BWT": bwt, "FWT": None if bwt is None else 1.0, "forgetting": None}

    orders = ["order1", "order2", "order3"]
    aps = (70.0, 80.0, 90.0)
    entries = [fake_cell(tmp_path, "slao", o, metrics(a, -a / 10)) for o, a in zip(orders, aps, strict=True)]
    entries += [fake_cell(tmp_path, "mtl", o, metrics(85, None), "upper_bound") for o in orders[:2]]
    entries.append({**entries[-1], "order": "order3", "path": "mtl/order3"})  # never run
    entries.append(fake_cell(tmp_path, "seq_lora", "order1", metrics(90.0, -1.0)))
    stale = json.loads((tmp_path / "slao" / "order3" / "results.json").read_text())
    stale["config"] = {**stale["config"], "method": {"name": "slao", "schedule": "inv"}}
    manifest = {"label": "hand-made", "command": "loracl bench ...", "methods": ["slao", "mtl", "seq_lora"],
                "orders": orders, "cells": entries}
    (tmp_path / "bench.json").write_text(json.dumps(manifest))
    write_bench_report(tmp_path)
    table = (tmp_path / "bench.md").read_text()
    # AP 70/80/90: mean 80, sample std 10; BWT -7/-8/-9: mean -8, std 1; paper AP beside: 80.4 and 80.9.
    slao = "| slao | yes | continual | 80.0 ± 10.0 | -8.0 ± 1.0 | 1.0 ± 0.0 | n/a | 70.0–90.0 | 3/3 | 80.4 |"
    assert slao in table
    assert "| mtl | **no** | upper_bound | 85.0 ± 0.0 | n/a | n/a | n/a | 85.0–85.0 | 2/3 | 80.9 |" in table
    assert "| mtl | order3 | n/a | n/a | n/a | n/a | n/a | n/a | missing |" in table
    assert "AP (paper, Llama-2-7B-chat)" in table
    # the paper table at the end holds the family of these orders alone, as the note above it says
    assert "## Reported in the paper" in table
    assert "| slao | Standard CL benchmark, orders 1-3 | 80.4 |" in table
    assert "Long Sequence" not in table and "SuperNI" not in table
    # A baseline that beats SLAO is ranked above it; mtl is an upper bound, not ranked.
    assert "Continual methods by mean AP, best first: seq_lora 90.0 > slao 80.0." in table

    (tmp_path / "slao" / "order3" / "results.json").write_text(json.dumps(stale))
    cells = write_bench_report(tmp_path)
    assert [c.status for c in cells][:3] == ["ok", "ok", "stale"]  # finished with another config: not counted
    assert "| slao | yes | continual | 75.0 ± 7.1 |" in (tmp_path / "bench.md").read_text()


def test_paper_numbers_stand_beside_a_tuned_method_but_not_beside_a_variant(tmp_path):
    metrics = {"AP": 70.0, "BWT": -1.0, "FWT": 1.0, "forgetting": None}
    tuned = fake_cell(tmp_path, "slao", "order1", metrics)
    variant = fake_cell(tmp_path / "variant", "slao", "order1", metrics)
    entries = [{**tuned, "method": "slao:train.lr=3e-3"},
               {**variant, "method": "slao:schedule=inv", "path": "variant/slao/order1"}]
    manifest = {"label": "hand-made", "command": "loracl bench ...", "orders": ["order1"], "cells": entries,
                "methods": [e["method"] for e in entries]}
    (tmp_path / "bench.json").write_text(json.dumps(manifest))
    write_bench_report(tmp_path)
    table = (tmp_path / "bench.md").read_text()
    row = "| {} | yes | continual | 70.0 | -1.0 | 1.0 | n/a | 70.0–70.0 | 1/1 | {} |"
    assert row.format("slao:train.lr=3e-3", "80.4") in table  # the paper's method at another rate
    assert row.format("slao:schedule=inv", "–") in table  # a variant the paper did not report


def test_the_report_does_not_contradict_itself(tmp_path):
    """Orders that are no benchmark family of the paper: bench.md says there are no paper numbers and shows
    none (no column, no table); means equal at the table's precision are one rank, `=`, not `80.0 > 80.0`."""
    aps = {"slao": 80.04, "seq_lora": 79.96, "olora": 70.0, "inflora": 0.0, "ewc": 0.0}
    metrics = {m: {"AP": ap, "BWT": -1.0, "FWT": None, "forgetting": 1.0} for m, ap in aps.items()}
    entries = [fake_cell(tmp_path, m, "agnews+yelp", metrics[m]) for m in aps]
    manifest = {"label": "ties", "command": "loracl bench ...", "methods": list(aps),
                "orders": ["agnews+yelp"], "cells": entries}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(manifest))
    write_bench_report(tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "No paper numbers beside ours" in table
    note = "No paper numbers beside ours: these orders are not a benchmark family the paper reports."
    assert "paper" not in table.replace(note, "")
    ranking = "slao 80.0 = seq_lora 80.0 > olora 70.0 > inflora 0.0 = ewc 0.0."
    assert f"Continual methods by mean AP, best first: {ranking}" in table and "0.0 > 0.0" not in table


def test_the_table_gives_intervals_and_paired_comparisons(grid):
    """Cells keep their predictions, so bench.md gives each method's AP with a bootstrap interval over the
    test examples and every pair's difference with its paired interval and a verdict."""
    text = (grid / "bench.md").read_text()
    section = text[text.index("## Intervals and paired comparisons") : text.index("## Every cell")]
    assert "| slao |" in section and "| seq_lora |" in section
    row = next(line for line in section.splitlines() if line.startswith("| slao − seq_lora |"))
    assert "resolved" in row  # "resolved" or "not resolved (...)"
    # the interval's centre is the AP the table reports, averaged over the orders
    ap = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in section.splitlines()
          if line.startswith("| slao |") or line.startswith("| seq_lora |")}  # fmt: skip
    means = {m: sum(float(r["AP"]) for r in read_csv(grid / "bench.csv") if r["method"] == m) / 2 for m in ap}
    assert ap == pytest.approx(means, abs=0.05)
