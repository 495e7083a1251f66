"""A run directory (and so a bench cell) is locked for the whole run: a second loracl command on it is
refused with one line while the first goes on untouched; a lock left by a dead process is taken over. Also
how a stop (SIGTERM) outside the training steps is reported: while the model loads, while the final files
are written. Real processes throughout: the lock is between processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safety import one_line, tree_digest

from loracl.cli import main
from loracl.locking import LOCK_NAME, FolderBusy, FolderLock, busy_owner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["benchmark.tasks=[dbpedia,amazon]", "benchmark.max_train=8", "benchmark.max_test=2",
         "eval.zero_shot=false", "eval.max_new_tokens=2", "train.max_length=64"]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

# A `loracl` process that, at a chosen point, creates `marker` and waits (for a signal, or for `release`).
PAUSING = """
import os, sys, time
from pathlib import Path
from loracl.recipes import run as runner
from loracl.cli import main

where, marker, release = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

def pause():
    marker.touch()
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

if where == "training":
    real_train = runner.train_task
    def train_task(*args, **kwargs):
        pause()
        return real_train(*args, **kwargs)
    runner.train_task = train_task
elif where == "loading":
    real_load = runner.load_model
    def load_model(*args, **kwargs):
        pause()
        return real_load(*args, **kwargs)
    runner.load_model = load_model
elif where == "finishing":
    real_finish = runner.ContinualRun.finish
    def finish(self, wall):
        self.method.export(self.model, self.run_dir / "adapter")
        pause()
        return real_finish(self, wall)
    runner.ContinualRun.finish = finish
sys.exit(main(sys.argv[4:]))
"""


def run_args(out: Path, *extra: str) -> list[str]:
    sets = [arg for item in SMALL for arg in ("--set", item)]
    return ["run", str(TINY), *sets, "--output", str(out), *extra]


def start_paused(tmp_path: Path, where: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    marker, release = tmp_path / f"{where}.paused", tmp_path / f"{where}.release"
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING, where, str(marker), str(release), *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the paused process never reached its pause"
        time.sleep(0.05)
    return proc, release


def test_a_second_run_on_a_running_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    first, release = start_paused(tmp_path, "training", run_args(out))
    try:
        before = tree_digest(out)
        capsys.readouterr()
        assert main(run_args(out, "--overwrite")) == 2
        line = one_line(capsys)
        assert f"in use by loracl process {first.pid}" in line
        assert main(["run", "--resume", "--output", str(out)]) == 2
        assert "in use by loracl process" in one_line(capsys)
        assert tree_digest(out) == before  # nothing of the first run was touched
    finally:
        release.touch()
    assert first.wait(timeout=300) == 0, first.communicate()
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["per_task"]) == 2
    assert not (out / LOCK_NAME).exists()  # cleared on exit


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    first, _ = start_paused(tmp_path, "training", run_args(out))
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (out / LOCK_NAME).exists() and busy_owner(out) is None  # stale: its owner is gone
    capsys.readouterr()
    assert main(run_args(out, "--overwrite")) == 0
    assert f"process {first.pid}, which is gone; taken over" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "nested"
    with FolderLock(folder) as lock:
        assert lock.created == tmp_path / "new"
        assert busy_owner(folder)["pid"] == os.getpid()
        take = "import sys; from loracl.locking import FolderLock; FolderLock(sys.argv[1]).acquire()"
        probe = subprocess.run(
            [sys.executable, "-c", take, str(folder)], env=ENV, capture_output=True, text=True
        )
        assert probe.returncode != 0 and "FolderBusy" in probe.stderr
    assert not (folder / LOCK_NAME).exists() and busy_owner(folder) is None
    again = FolderLock(tmp_path / "other" / "deep").acquire()
    again.release(discard_created=True)
    assert not (tmp_path / "other").exists()  # a refused command leaves no folder it made
    with pytest.raises(FolderBusy), FolderLock(folder), FolderLock(folder):
        pass  # flock is per open file: even the same process cannot take it twice


def test_sigterm_while_the_model_loads_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, _ = start_paused(tmp_path, "loading", run_args(out))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines == ["interrupted: stopped by SIGTERM while loading the model; nothing was written"], err
    assert not out.exists()


def test_sigterm_while_the_final_files_are_written_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, _ = start_paused(tmp_path, "finishing", run_args(out))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip()
    assert "\n" not in line and line.startswith("interrupted: stopped by SIGTERM while writing the final")
    assert f"checkpoint after task 2 kept; resume with: loracl run --resume --output {out}" in line
    assert not json.loads((out / "results.json").read_text())["complete"]
    assert main(["run", "--resume", "--output", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["complete"]
