"""`loracl bench --seeds`: every cell repeated per train.seed in <method>/<order>/seed-<s>/, resumable; and
bench.md's statistics over orders, seeds and test examples on cells whose per-example scores are known (the
runner replaced by one that writes a complete results.json and every step's predictions.jsonl, so the
cells pass the bench's real finished-cell check)."""

from __future__ import annotations

import csv
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from loracl.cli import main
from loracl.engine.metrics import all_metrics
from loracl.recipes import bench
from loracl.recipes import run as runner

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ORDERS = "COPA+SST-2,SST-2+COPA"
METHODS = "seq_lora,slao,olora"
N = 20  # test examples per task (= --max-test: the cap picks them, per seed)


def seeds_args(out: Path, seeds: str | None = "1,2", methods: str = METHODS, *extra: str) -> list[str]:
    args = ["bench", TINY, "--methods", methods, "--orders", ORDERS, "--max-train", "10"]
    args += ["--max-test", str(N)]
    return args + (["--seeds", seeds] if seeds is not None else []) + [*extra, "--output", str(out)]


def base_scores(order: str, seed: int, task: str) -> np.ndarray:
    """The examples every method gets right (10 of N, never the first): by order, seed and task."""
    rng = np.random.default_rng(zlib.crc32(f"{order}|{seed}|{task}".encode()))
    scores = np.zeros(N)
    scores[rng.choice(np.arange(1, N), N // 2, replace=False)] = 1.0
    return scores


def final_scores(method: str, order: str, seed: int, task: str) -> np.ndarray:
    """seq_lora: 6 more hits than slao in every task (+30 points, resolved); olora: one more on COPA
    (+2.5 points over the two tasks, not resolved on 20 examples); others: slao's."""
    scores = base_scores(order, seed, task)
    if method == "seq_lora":
        scores[np.flatnonzero(scores == 0)[:6]] = 1.0
    elif method == "olora" and task == "COPA":
        scores[0] = 1.0
    return scores


@pytest.fixture
def known_runs(monkeypatch) -> list:
    """The runner replaced by one that writes what a finished run leaves for the bench: results.json
    (complete, its config, the matrix and metrics) and tasks/<i>-<task>/predictions.jsonl after every step
    (each task right after learning it: all right; later, its final scores). Returns the configs run."""
    configs: list = []

    def fake_run(config, out, overwrite=False, resume=False, zero_shot_cache=None):
        configs.append(config)
        tasks, seed, method = config.benchmark.tasks, config.train.seed, config.method.name
        order = "+".join(tasks)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        matrix = []
        for step, name in enumerate(tasks, 1):
            rows = {t: final_scores(method, order, seed, t) if j < step - 1 or step == len(tasks) else
                    np.ones(N) if j == step - 1 else np.zeros(N) for j, t in enumerate(tasks)}  # fmt: skip
            folder = out / "tasks" / f"{step}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            records = [{"task": t, "id": i, "prediction": "", "references": [f"{t}-{seed}-{i}"],
                        "score": float(v), "metric": "exact_match"}
                       for t, scores in rows.items() for i, v in enumerate(scores)]  # fmt: skip
            (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            matrix.append([100 * float(rows[t].mean()) for t in tasks])
        results = {"complete": True, "config": config.model_dump(mode="json"), "tasks": tasks,
                   "matrix": matrix, "metrics": all_metrics(matrix, None), "role": "continual",
                   "data_free": True, "device": "cpu", "timings": {"train_total": 1, "wall": 1}}  # fmt: skip
        (out / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(runner, "run", fake_run)
    return configs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_cell_runs_at_every_seed_in_its_own_folder_and_resumes(tmp_path, known_runs, capsys):
    out = tmp_path / "grid"
    assert main(seeds_args(out)) == 0
    assert [(c.method.name, "+".join(c.benchmark.tasks), c.train.seed) for c in known_runs] == [
        (m, o, s) for m in METHODS.split(",") for o in ORDERS.split(",") for s in (1, 2)
    ]
    manifest = json.loads((out / "bench.json").read_text())
    assert manifest["seeds"] == [1, 2] and "--seeds 1,2" in manifest["command"]
    for entry in manifest["cells"]:
        assert entry["path"] == f"{entry['method']}/{entry['order']}/seed-{entry['seed']}"
        assert entry["config"]["train"]["seed"] == entry["seed"]
        assert (out / entry["path"] / "results.json").is_file()
    rows = read_csv(out / "bench.csv")
    assert [(r["method"], r["order"], r["seed"], r["status"]) for r in rows] == [
        (m, o, str(s), "ok") for m in METHODS.split(",") for o in ORDERS.split(",") for s in (1, 2)
    ]
    text = (out / "bench.md").read_text()
    assert "Seeds (`train.seed`, `--seeds`): 1, 2: every (method, order) cell ran at each" in text
    assert "seeds 1, 2; caps: 10 train / 20 test examples per task." in text
    assert "## Mean over orders and seeds" in text and "runs done (orders × seeds)" in text
    assert "| slao | yes | continual | 50.0 ± 0.0 |" in text and "| 4/4 |" in text
    assert "| seq_lora | SST-2+COPA | 2 | 80.0 |" in text  # the cells table names each seed
    capsys.readouterr()

    known_runs.clear()  # a rerun skips every finished cell
    assert main(seeds_args(out)) == 0
    assert known_runs == [] and capsys.readouterr().out.count("finished earlier, skipped") == 12
    (out / "slao" / "SST-2+COPA" / "seed-2" / "results.json").unlink()  # one cell lost: only it runs
    assert main(seeds_args(out)) == 0
    assert [(c.method.name, c.train.seed) for c in known_runs] == [("slao", 2)]
    known_runs.clear()  # one more seed: only its cells run
    assert main(seeds_args(out, "1,2,3")) == 0
    assert {c.train.seed for c in known_runs} == {3} and len(known_runs) == 6
    assert (out / "olora" / "COPA+SST-2" / "seed-3" / "results.json").is_file()
    known_runs.clear()
    (out / "bench.md").unlink()
    assert main(["bench", "--report-only", str(out)]) == 0
    assert known_runs == [] and "Seeds (`train.seed`, `--seeds`): 1, 2, 3" in (out / "bench.md").read_text()


def section(text: str) -> str:
    return text[text.index("## Intervals and paired comparisons") : text.index("## Every cell")]


def pair_row(text: str, name: str) -> list[str]:
    line = next(line for line in section(text).splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_intervals_over_orders_seeds_and_examples_on_known_scores(tmp_path, known_runs):
    out = tmp_path / "grid"
    assert main(seeds_args(out)) == 0
    text = (out / "bench.md").read_text()
    part = section(text)
    assert "**Over orders, seeds and test examples** (hierarchical)" in part
    assert "resamples the orders with replacement, then within each drawn order its seeds" in part
    # every run of slao scores 50 (10 of 20 in each task): the runs agree, only test examples vary
    slao = pair_row(text, "slao")
    assert slao[1] == "50.0"
    # seq_lora - slao: +30 points in every run and task, resolved on examples and across orders and seeds
    resolved = pair_row(text, "seq_lora − slao")
    assert resolved[1] == "+30.0" and resolved[-1] == "resolved"
    low, high = (float(v) for v in resolved[3].split(" – "))
    assert 0 < low < 30 < high
    # slao - olora: -2.5 points (one example of COPA), noise on 20 examples a task
    noise = pair_row(text, "slao − olora")
    assert noise[1] == "-2.5" and noise[-1].startswith("not resolved (~")
    # The examples that would resolve it, by the formula n = 1.96^2 sum_k s_k^2 / D^2: COPA's examples at a
    # seed are one key shared by both orders (the same task, cap and seed picks the same examples), so
    # c_k,i = 2 orders x 100 / (4 runs x 2 tasks) x (a_i - b_i) = 25 on example 0, 0 elsewhere, twice (two
    # seeds); SST-2 adds nothing. D = -2 x 25 / 20 = -2.5.
    c = np.zeros(N)
    c[0] = -25.0
    expected = math.ceil(1.959964**2 * 2 * np.var(c, ddof=1) / 2.5**2)
    assert expected == 39
    assert noise[-1] == f"not resolved (~{expected} test examples per task would resolve it with these " \
        f"orders and seeds; now {N})"  # fmt: skip
    assert "n ≥ 1.96² Σ_k s_k² / D²" in part


def test_the_chart_sorts_by_mean_ap_and_shows_forgetting_with_intervals(tmp_path, known_runs):
    out = tmp_path / "grid"
    assert main(seeds_args(out)) == 0
    manifest = bench.read_manifest(out)
    cells = [bench.read_cell(out, e) for e in manifest["cells"]]
    stats = bench.bench_statistics(manifest, cells, out)
    fig = bench.bench_figure(manifest, cells, None, stats)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["seq_lora", "olora", "slao"]  # 80 > 52.5 > 50
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert list(bars) == ["AP", "BWT", "forgetting"]
    assert [p.get_height() for p in bars["AP"].patches] == pytest.approx([80.0, 52.5, 50.0])
    # each task is all right right after it is learned: the first task's drop is forgetting = -BWT
    assert [p.get_height() for p in bars["forgetting"].patches] == pytest.approx([20.0, 47.5, 50.0])
    errors = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert set(errors) == {"_AP interval", "_BWT interval", "_forgetting interval"}
    segments = errors["_AP interval"].lines[2][0].get_segments()
    for segment, method in zip(segments, ["seq_lora", "olora", "slao"], strict=True):
        found = stats.methods[method].ap
        assert (segment[0][1], segment[1][1]) == pytest.approx((found.low, found.high))
    assert stats.methods["slao"].forgetting.value == pytest.approx(50.0)
    title = ax.get_title()
    assert "sorted by mean AP" in title
    assert "95 % bootstrap interval over orders, seeds and test examples" in title


@pytest.mark.parametrize(
    ("seeds", "methods", "extra", "message"),
    [
        ("1,x", METHODS, [], "--seeds: 'x' is not a whole number"),
        ("1,2,1", METHODS, [], "--seeds: '1,2,1' names the same entry twice"),
        ("1,01", METHODS, [], "--seeds: '1,01' names seed 1 twice"),
        ("-1", METHODS, [], "--seeds: -1 is out of range"),
        ("1,2", "slao,seq_lora:train.seed=3", [], "seq_lora:train.seed=3: train.seed is set by --seeds"),
        ("1,2", "seq_lora", ["--tune", "train.seed=1,2"], "--tune: train.seed is set by --seeds"),
    ],
)
def test_bad_seeds_are_refused_before_anything_runs(
    tmp_path, known_runs, capsys, seeds, methods, extra, message
):
    out = tmp_path / "grid"
    assert main(seeds_args(out, seeds, methods, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert known_runs == [] and not out.exists()


def test_a_grid_keeps_its_layout(tmp_path, known_runs, capsys):
    """A grid run without --seeds stays in <method>/<order>/ and its bench.md has no seed column; adding
    --seeds to it (or leaving them out of a seeded grid) is refused: runs would nest inside runs."""
    out = tmp_path / "grid"
    assert main(seeds_args(out, None, "slao,olora")) == 0
    manifest = json.loads((out / "bench.json").read_text())
    assert "seeds" not in manifest and all("seed" not in e for e in manifest["cells"])
    assert [e["path"] for e in manifest["cells"]] == [f"{m}/{o}" for m in ("slao", "olora") for o in
                                                      ORDERS.split(",")]  # fmt: skip
    text = (out / "bench.md").read_text()
    assert "## Mean over orders\n" in text and "Seeds (" not in text
    assert "| slao | COPA+SST-2 | 50.0 |" in text
    assert "**Over orders and test examples** (hierarchical)" in text
    known_runs.clear()
    capsys.readouterr()
    assert main(seeds_args(out, "1,2", "slao,olora")) == 2
    assert "holds a grid run without --seeds" in capsys.readouterr().err and known_runs == []
    seeded = tmp_path / "seeded"
    assert main(seeds_args(seeded, "1", "slao")) == 0
    capsys.readouterr()
    assert main(seeds_args(seeded, None, "slao")) == 2
    assert "holds a grid run with --seeds" in capsys.readouterr().err


def test_tuning_runs_every_seed_and_chooses_on_the_mean(tmp_path, monkeypatch, capsys):
    """--tune with --seeds: each candidate on every order at every seed, in .../<order>/seed-<s>/; an
    order's validation AP is the mean over the seeds. lr 1e-3 wins at seed 1 but loses on the mean."""
    validation = {(1e-4, 1): 50.0, (1e-4, 2): 50.0, (1e-3, 1): 70.0, (1e-3, 2): 20.0}
    ran = []

    def fake_run(config, out, overwrite=False, resume=False, zero_shot_cache=None):
        ran.append((config.eval.split, config.train.lr, config.train.seed))
        ap = validation[(config.train.lr, config.train.seed)] if config.eval.split == "validation" else 40.0
        tasks = config.benchmark.tasks
        Path(out).mkdir(parents=True, exist_ok=True)
        results = {"complete": True, "config": config.model_dump(mode="json"), "tasks": tasks,
                   "matrix": [[ap] * len(tasks)] * len(tasks),
                   "metrics": {"AP": ap, "BWT": 0.0, "FWT": None, "forgetting": 0.0}}  # fmt: skip
        (Path(out) / "results.json").write_text(json.dumps(results))

    monkeypatch.setattr(runner, "run", fake_run)
    out = tmp_path / "grid"
    args = ["bench", TINY, "--methods", "seq_lora", "--orders", "COPA+SST-2", "--max-train", "10",
            "--tune", "train.lr=1e-4,1e-3", "--seeds", "1,2", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    tuning = [("validation", lr, s) for lr in (1e-4, 1e-3) for s in (1, 2)]
    assert ran == [*tuning, ("test", 1e-4, 1), ("test", 1e-4, 2)]  # every tuning run first
    manifest = json.loads((out / "bench.json").read_text())
    [record] = manifest["selection"]["methods"]
    assert record["chosen"] == "train.lr=1e-4"
    assert [(c["scores"], c["mean"]) for c in record["candidates"]] == [
        ({"COPA+SST-2": 50.0}, 50.0), ({"COPA+SST-2": 45.0}, 45.0)
    ]
    assert {c["path"] for c in manifest["selection"]["cells"]} == {
        f"tune/seq_lora/train.lr={lr}/COPA+SST-2/seed-{s}" for lr in ("1e-4", "1e-3") for s in (1, 2)
    }
    text = (out / "bench.md").read_text()
    assert "ran on every order at every seed (1, 2; an order's score: the mean)" in text
    assert "| seq_lora | train.lr=1e-3 | 45.0 | 45.0 |  |" in text
