"""Started by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU):
one run per method through the real CLI, then `loracl eval` and `loracl predict` of the first run, all in
the same processes.
With FULL_DISK_AT=k in the environment, the main process's k-th results.json write fails as on a full disk;
with RUNS_ONLY=1 only the runs are made (no eval, no predict); with RESUME=1 they are resumed (--resume).
At exit each process prints whether its process group was already destroyed (loracl's own exit handler).

usage: distributed_worker.py OUT_DIR CONFIG METHOD[,METHOD...] [KEY=VALUE ...]
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from pathlib import Path

import torch.distributed as dist

from loracl.cli import main
from loracl.engine import distributed
from loracl.recipes import run as runner

PROMPTS = [f"Predict-check {k}: is this review positive or negative? Answer:" for k in range(3)]


def fill_the_disk_at(write: int) -> None:
    real, calls = runner.write_json_atomic, []

    def write_json_atomic(data, path):
        calls.append(path)
        if distributed.is_main() and len(calls) == write:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(data, path)

    runner.write_json_atomic = write_json_atomic


def report_process_group_at_exit() -> None:
    # Registered before loracl joins the group, so it runs after loracl's handler (atexit is LIFO).
    atexit.register(lambda: print(f"process group left before exit: {not dist.is_initialized()}", flush=True))


def work(out: Path, config: str, methods: list[str], overrides: list[str]) -> int:
    sets = [arg for item in overrides for arg in ("--set", item)]
    sets += ["--resume"] if os.environ.get("RESUME") == "1" else []
    for method in methods:
        code = main(["run", config, "--output", str(out / method), "--set", f"method.name={method}", *sets])
        if code:
            return code
    if os.environ.get("RUNS_ONLY") == "1":
        return 0
    code = main(["eval", str(out / methods[0]), "--output", str(out / "eval.json")])
    return code or main(["predict", str(out / methods[0]), *PROMPTS])


if __name__ == "__main__":
    out_dir, config_path, method_list, *extra = sys.argv[1:]
    report_process_group_at_exit()
    if "FULL_DISK_AT" in os.environ:
        fill_the_disk_at(int(os.environ["FULL_DISK_AT"]))
    sys.exit(work(Path(out_dir), config_path, method_list.split(","), extra))
