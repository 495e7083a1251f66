"""Run a grid's cells side by side in worker processes (`loracl bench --jobs N`).

Why: one small model leaves most of a GPU, or of a CPU with several cores, idle; independent cells running
at once use it. Each cell runs in its own spawned process (its own model copy; torch threads = cores / N
unless OMP_NUM_THREADS says otherwise) and makes exactly the run a sequential grid would make; its output
goes to `<method>/<order>.log` beside the cell's folder instead of the terminal.

Stopping: Ctrl-C reaches every process of the terminal's group, so each worker stops at its next step
(its checkpoint stays and the same command continues it). A SIGTERM sent to the bench process alone is
passed on to the workers. A second signal stops the bench process at once and terminates the workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from loracl.engine.interrupt import requested_signal, stop_on_signals
from loracl.errors import RunInterrupted
from loracl.locking import FolderBusy, busy_owner

EXIT_FAILED = 1
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: another process runs the cell (holds its lock); left to it
EXIT_INTERRUPTED = RunInterrupted.exit_code
RunCell = Callable[[Any], "str | None"]  # bench.run_cell: a cell -> None, or its error's one-line summary


@dataclass
class Job:
    """One cell to run: the line that names it in the output, its folder, and the cell itself."""

    head: str
    path: Path
    cell: Any


@dataclass
class Outcome:
    status: str  # ok, failed, interrupted, busy (another process runs the cell)
    error: str = ""
    seconds: float = 0.0


def log_path(cell_dir: Path) -> Path:
    """Where a worker writes a cell's output: beside the cell's folder, which a fresh run replaces."""
    return cell_dir.with_name(cell_dir.name + ".log")


def worker_threads(jobs: int) -> int | None:
    """Torch threads per worker: None (torch's own choice) when OMP_NUM_THREADS is set, else cores / jobs."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def _worker(run_cell: RunCell, job: Job, threads: int | None) -> None:
    """A worker process's body: run one cell with its output in the cell's log; the exit code says how."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if busy_owner(job.path):  # another bench runs this cell: its log is not ours to truncate
        sys.exit(EXIT_BUSY)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path(job.path), "w", buffering=1, encoding="utf-8") as log:
        sys.stdout = sys.stderr = log
        try:
            error = run_cell(job.cell)
        except RunInterrupted:
            sys.exit(EXIT_INTERRUPTED)
        except FolderBusy as exc:
            print(f"skipped: {exc}")
            sys.exit(EXIT_BUSY)
        except BaseException as exc:  # noqa: BLE001  (whatever it was, the parent must learn the cell failed)
            print(f"{type(exc).__name__}: {exc}")
            sys.exit(EXIT_FAILED)
        sys.exit(EXIT_FAILED if error else 0)


def _outcome(exit_code: int | None, seconds: float, recorded_error: str | None, stopping: bool) -> Outcome:
    if exit_code == 0:
        return Outcome("ok", seconds=seconds)
    if exit_code == EXIT_INTERRUPTED:
        return Outcome("interrupted", seconds=seconds)
    if exit_code == EXIT_BUSY:
        return Outcome("busy", "being run by another process", seconds)
    if recorded_error:  # the cell's own error, written by run_cell
        return Outcome("failed", recorded_error, seconds)
    if stopping:  # ended by the stop before it could stop cleanly (e.g. still starting up)
        return Outcome("interrupted", seconds=seconds)
    # Killed (e.g. by the kernel's out-of-memory killer) or crashed before it could record anything.
    return Outcome("failed", f"worker process ended with exit code {exit_code}", seconds)


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    run_cell: RunCell,
    read_error: Callable[[Path], str | None],
    on_failure: Callable[[Job, str], None],
) -> dict[str, Outcome]:
    """Run every job, at most `workers` at a time; returns each job's outcome by head. `read_error` gives
    the error a failed cell recorded (None if none); `on_failure` records one for a worker that died without.
    Raises RunInterrupted (after every worker has ended) when a signal stopped the grid."""
    context = mp.get_context("spawn")  # a fresh interpreter per worker: safe with CUDA and with threads
    threads = worker_threads(workers)
    queue = list(jobs)
    running: dict[int, tuple[Any, Job, float]] = {}  # sentinel -> (process, job, start time)
    outcomes: dict[str, Outcome] = {}
    stopped_by: str | None = None
    try:
        with stop_on_signals():
            while queue or running:
                if stopped_by is None and requested_signal():
                    stopped_by = requested_signal()
                    if stopped_by != "SIGINT":  # Ctrl-C reached the workers already; SIGTERM did not
                        for process, _, _ in running.values():
                            process.terminate()  # SIGTERM: the worker stops at its next step
                if stopped_by:
                    queue.clear()
                while queue and len(running) < workers:
                    job = queue.pop(0)
                    process = context.Process(target=_worker, args=(run_cell, job, threads), name=job.head)
                    process.start()
                    running[process.sentinel] = (process, job, time.perf_counter())
                    print(f"{job.head}: running in {job.path} (output in {log_path(job.path)})", flush=True)
                for sentinel in wait(list(running), timeout=0.5):
                    process, job, start = running.pop(sentinel)
                    process.join()
                    recorded = read_error(job.path) if process.exitcode else None
                    seconds = time.perf_counter() - start
                    outcome = _outcome(process.exitcode, seconds, recorded, stopped_by is not None)
                    if outcome.status == "failed" and not recorded:
                        on_failure(job, outcome.error)  # so that the report shows the cell as failed
                    if outcome.status == "interrupted" and stopped_by is None:
                        stopped_by = "a signal to one of its workers"  # as in a sequential grid: stop all
                    outcomes[job.head] = outcome
                    _announce(job, outcome)
    except BaseException:
        for process, _, _ in running.values():  # a second signal, or an error here: leave no orphans
            process.terminate()
        for process, _, _ in running.values():
            process.join()
        raise
    if stopped_by:
        raise RunInterrupted(f"stopped by {stopped_by}; run the same command again to continue")
    return outcomes


def _announce(job: Job, outcome: Outcome) -> None:
    if outcome.status == "ok":
        print(f"{job.head}: finished in {outcome.seconds:.0f} s", flush=True)
    elif outcome.status == "interrupted":
        print(f"{job.head}: stopped (continues from its checkpoint next time)", flush=True)
    elif outcome.status == "busy":
        print(f"{job.head}: skipped: being run by another process (see {log_path(job.path)})", flush=True)
    else:
        print(f"{job.head}: FAILED: {outcome.error} (see {log_path(job.path)})", flush=True)

