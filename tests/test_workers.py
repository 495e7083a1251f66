"""`loracl bench --jobs N`'s worker processes: how each way a worker can end is reported, and stopping.

The workers run functions of this module (spawned processes import it by name), standing in for
bench.run_cell; the real grid in parallel is checked against the sequential one in test_bench.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from loracl.engine.interrupt import check_interrupt, stop_on_signals
from loracl.errors import RunInterrupted
from loracl.recipes.workers import Job, log_path, run_jobs, worker_threads


def fake_run_cell(cell: str) -> str | None:
    """What bench.run_cell does for a cell named after its fate."""
    print(f"running {cell}")
    if cell == "fails":
        return "RuntimeError: boom"  # run_cell has written the cell's error file
    if cell == "dies":
        os._exit(3)  # as if killed: nothing recorded
    if cell == "stopped":
        raise RunInterrupted("stopped by SIGINT")
    if cell.startswith("waits"):
        with stop_on_signals():  # as runner.run does around a run
            Path(cell.split(":", 1)[1]).touch()
            while True:
                time.sleep(0.05)
                check_interrupt()
    return None


def jobs(tmp_path: Path, *names: str) -> list[Job]:
    return [Job(name, tmp_path / name.split(":")[0].replace("/", "_"), name) for name in names]


def recorded_error(path: Path) -> str | None:
    return "RuntimeError: boom" if path.name == "fails" else None


def test_each_way_a_worker_ends_is_reported(tmp_path, capsys):
    recorded: list[tuple[str, str]] = []
    outcomes = run_jobs(
        jobs(tmp_path, "ok", "fails", "dies"), 2, fake_run_cell, recorded_error,
        lambda job, error: recorded.append((job.head, error)),
    )
    assert {head: (o.status, o.error) for head, o in outcomes.items()} == {
        "ok": ("ok", ""),
        "fails": ("failed", "RuntimeError: boom"),
        "dies": ("failed", "worker process ended with exit code 3"),
    }
    assert recorded == [("dies", "worker process ended with exit code 3")]  # only what no one recorded
    assert log_path(tmp_path / "ok").read_text() == "running ok\n"  # the worker's output, not the terminal's
    out = capsys.readouterr().out
    assert "ok: finished in" in out and "fails: FAILED: RuntimeError: boom" in out
    assert mp.active_children() == []


def test_an_interrupted_cell_stops_the_grid(tmp_path, capsys):
    with pytest.raises(RunInterrupted, match="run the same command again"):
        run_jobs(jobs(tmp_path, "stopped", "ok"), 1, fake_run_cell, recorded_error, lambda *_: None)
    out = capsys.readouterr().out
    assert "stopped: stopped" in out and "ok: running" not in out  # the queue was dropped
    assert mp.active_children() == []


def test_sigterm_to_the_bench_process_stops_its_workers(tmp_path):
    markers = [tmp_path / "a.started", tmp_path / "b.started"]

    def signal_when_both_run() -> None:
        deadline = time.monotonic() + 120
        while not all(m.exists() for m in markers) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_both_run, daemon=True).start()
    names = [f"waits-{i}:{marker}" for i, marker in enumerate(markers)]
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        run_jobs(jobs(tmp_path, *names), 2, fake_run_cell, recorded_error, lambda *_: None)
    assert mp.active_children() == []


def test_threads_per_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_threads(4) == 4 and worker_threads(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert worker_threads(4) is None  # the user's setting wins
