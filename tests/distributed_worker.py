"""Started by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU):
one run per method through the real CLI, then `loracl eval` of the slao run, all in the same processes.

usage: distributed_worker.py OUT_DIR CONFIG METHOD[,METHOD...] [KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from loracl.cli import main


def work(out: Path, config: str, methods: list[str], overrides: list[str]) -> int:
    sets = [arg for item in overrides for arg in ("--set", item)]
    for method in methods:
        code = main(["run", config, "--output", str(out / method), "--set", f"method.name={method}", *sets])
        if code:
            return code
    return main(["eval", str(out / methods[0]), "--output", str(out / "eval.json")])


if __name__ == "__main__":
    out_dir, config_path, method_list, *extra = sys.argv[1:]
    sys.exit(work(Path(out_dir), config_path, method_list.split(","), extra))
