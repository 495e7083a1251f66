"""Wall time of the `loracl` commands that only print information (target: under 1 s each).

Each command runs `--repeats` times, each in a fresh subprocess (`python -m loracl ...`, as the installed
`loracl` script runs it: a new interpreter, every import paid again), after one untimed warm-up run that
fills the file cache; the figure is the median wall time in seconds, from the start of the subprocess to
its exit. What dominates is the imports: these commands must not import torch, transformers or peft
(tests/test_cli.py holds that without timing anything). No model, no data; seconds on a CPU.

Usage: python benchmarks/cli_time.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# Not cost_common's helpers: that module imports torch, which this script has no other need of.
FIGURES_HEADER = "== figures =="
COMMANDS = {
    "loracl_help_s": ["--help"],
    "loracl_methods_s": ["methods"],
    "loracl_methods_name_s": ["methods", "slao"],
    "loracl_benchmarks_s": ["benchmarks"],
}


def run_once(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loracl", *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        command = " ".join(["loracl", *argv])
        raise SystemExit(f"error: {command} exited with {done.returncode}: {done.stderr.strip()}")
    return seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per command (default 7)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    figures = {}
    for name, command in COMMANDS.items():
        run_once(command)  # warm-up: file cache, .pyc files
        times = [run_once(command) for _ in range(args.repeats)]
        figures[name] = statistics.median(times)
        print(f"loracl {' '.join(command)}: median {figures[name]:.3f} s over {args.repeats} runs "
              f"(min {min(times):.3f}, max {max(times):.3f})")  # fmt: skip
    print(FIGURES_HEADER)
    for name, value in figures.items():
        print(f"{name}: {value:.4g}")
    return figures


if __name__ == "__main__":
    main()
