"""The GPU check (issue 18): four parts on one GPU in under 8 minutes, each printed as `name: value` lines.

  cuda_tests   `pytest tests/test_cuda.py`: passed / failed / skipped counts
  throughput   training tokens/s of loracl's loop vs transformers.Trainer + PEFT on the same tokens, model
               (SmolLM2-135M, bf16 on the GPU), batch size and max length (benchmarks/throughput.py)
  memory       peak GPU memory (torch.cuda.max_memory_allocated, reset before each task) after each task
               T = 1..15 for seq_lora, slao and the multi-LoRA methods on tiny synthetic tasks
               (benchmarks/adapter_growth.py)
  bench        the Standard order1 at the shared data's full size for slao, seq_lora, inflora and mtl:
               `loracl bench configs/gpu.yaml` (AP, BWT, FWT, seconds per method)

`--device cpu --quick` runs the same code paths on the CPU in a minute or two: the tiny random Llama, few
steps, T = 1..3, two methods, a 2-task order with small caps (tests/test_gpu_check.py runs it).

Each part runs in its own process under a time limit; a part that fails or times out prints
`<part>_error: <one line>` and the others still run; the exit status is 1 if any part failed (2: bad
options, or no CUDA for --device cuda). throughput runs alone (it times); the three others then run side by
side (their figures do not depend on timing: max_memory_allocated is per process). Every part's full output
is kept in the logs folder (`--output`, printed as `logs:`).

Usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--parts a,b] [--output DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PARTS = ("cuda_tests", "throughput", "memory", "bench")
FIGURES_HEADER = "== figures =="  # benchmarks/cost_common.py's
GPU_MODEL = "smollm2-135m"
TINY = "tiny-random-llama"
BENCH_METHODS = {"full": "slao,seq_lora,inflora,mtl", "quick": "slao,seq_lora"}
MEMORY_METHODS = {"full": "seq_lora,slao,inc_lora,olora,inflora,gainlora", "quick": "seq_lora,slao"}
MEMORY_TASKS = {"full": 15, "quick": 3}
# Seconds each part may take. Worst case: prepare + throughput + the longest of the three run side by side
# = 60 + 100 + 250 = 410 s, under the 8 minutes the check is given.
LIMITS = {"prepare": 60, "throughput": 100, "cuda_tests": 200, "memory": 200, "bench": 250}


class PartError(Exception):
    """A part failed: its one-line reason."""


@dataclass
class Part:
    """One part: the command it runs and how its output becomes `name: value` lines."""

    name: str
    command: list[str]
    parse: Callable[[str, Path], dict[str, str]]
    limit: float
    env: dict[str, str] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # what it measured on (printed with its figures)


# -- parsing ---------------------------------------------------------------------------------------------
def one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def last_error_line(output: str) -> str:
    """The most telling line of a failed command's output: its last `error:` or exception line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else "no output"


def figures_block(output: str) -> dict[str, str]:
    """The `name: value` lines after a cost benchmark's `== figures ==` header."""
    _, found, block = output.rpartition(FIGURES_HEADER)
    if not found:
        raise PartError(f"no figures in the output ({one_line(last_error_line(output))})")
    figures = {}
    for line in block.strip().splitlines():
        name, sep, value = line.partition(": ")
        if sep:
            figures[name.strip()] = value.strip()
    return figures


def pytest_counts(output: str) -> dict[str, int]:
    """passed / failed / skipped / errors of pytest's final summary line."""
    tallies = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    summary = tallies[-1] if tallies else ""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] += int(number)
    return counts


def parse_cuda_tests(device: str) -> Callable[[str, Path], dict[str, str]]:
    def parse(output: str, _logs: Path) -> dict[str, str]:
        counts = pytest_counts(output)
        lines = {f"cuda_tests_{key}": str(value) for key, value in counts.items()}
        if counts["failed"] or counts["errors"]:
            failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
            first = one_line(failed[0]) if failed else "see the log"
            raise PartError(f"{counts['failed']} failed, {counts['errors']} errors; first: {first}", lines)
        if device == "cuda" and counts["passed"] == 0:
            raise PartError(f"no CUDA test ran ({counts['skipped']} skipped)", lines)
        if not any(counts.values()):
            raise PartError(f"no pytest summary ({one_line(last_error_line(output))})", lines)
        return lines

    return parse


def parse_figures(prefix: str, keep: Callable[[str], bool] = lambda _: True):
    def parse(output: str, _logs: Path) -> dict[str, str]:
        return {f"{prefix}_{name}": value for name, value in figures_block(output).items() if keep(name)}

    return parse


def parse_bench(folder: Path) -> Callable[[str, Path], dict[str, str]]:
    def parse(output: str, _logs: Path) -> dict[str, str]:
        table = folder / "bench.csv"
        if not table.is_file():
            raise PartError(f"no bench.csv ({one_line(last_error_line(output))})")
        lines: dict[str, str] = {}
        failed = []
        with open(table, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                method = row["method"]
                if row["status"] != "ok":
                    failed.append(f"{method}: {one_line(row.get('error') or row['status'], 120)}")
                    continue
                for column in ("AP", "BWT", "FWT", "train_seconds", "wall_seconds"):
                    value = row.get(column)
                    lines[f"bench_{method}_{column.lower()}"] = f"{float(value):.4g}" if value else "n/a"
        if failed:
            raise PartError("; ".join(failed), lines)
        if not lines:
            raise PartError("bench.csv holds no cell")
        return lines

    return parse


# -- running ---------------------------------------------------------------------------------------------
class Running:
    """A part's process (its own process group, so that a time-out also stops what it started)."""

    def __init__(self, part: Part, logs: Path) -> None:
        self.part = part
        self.log = logs / f"{part.name}.log"
        self.started = time.monotonic()
        self.handle = open(self.log, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | part.env
        self.process = subprocess.Popen(
            part.command, cwd=ROOT, stdout=self.handle, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        self.ended: float | None = None  # when the process exited (parts side by side end at other times)
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()

    def _wait(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()

    def finish(self) -> tuple[dict[str, str], str | None]:
        """Wait (up to the part's limit); its lines and, if it failed, the one-line reason."""
        self.waiter.join(timeout=max(1.0, self.part.limit - (time.monotonic() - self.started)))
        timed_out = self.waiter.is_alive()
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the group this part's process leads
            self.waiter.join()
        self.handle.close()
        seconds = (self.ended or time.monotonic()) - self.started
        output = self.log.read_text(encoding="utf-8", errors="replace")
        timing = {f"{self.part.name}_seconds": f"{seconds:.1f}"}
        error = f"timed out after {self.part.limit:.0f} s" if timed_out else None
        try:
            lines = self.part.info | self.part.parse(output, self.log.parent) | timing
        except PartError as exc:  # what failed, and the lines it could read
            partial = exc.args[1] if len(exc.args) > 1 else {}
            return self.part.info | partial | timing, error or exc.args[0]
        except Exception as exc:  # output it cannot read
            return self.part.info | timing, error or f"cannot read its output: {exc!r}"
        if error is None and self.process.returncode != 0:
            error = f"exit status {self.process.returncode}: {one_line(last_error_line(output))}"
        return lines, error


def report(name: str, lines: dict[str, str], error: str | None) -> bool:
    for key, value in lines.items():
        print(f"{key}: {value}", flush=True)
    if error is not None:
        print(f"{name}_error: {one_line(error)}", flush=True)
    return error is None


def run_parts(parts: list[Part], logs: Path) -> list[str]:
    """Run `parts` side by side; print each one's lines in the given order; the names of those that failed."""
    running = []
    failed = []
    for part in parts:
        try:
            running.append(Running(part, logs))
        except OSError as exc:
            report(part.name, {}, f"cannot start: {exc}")
            failed.append(part.name)
    for process in running:
        if not report(process.part.name, *process.finish()):
            failed.append(process.part.name)
    return failed


# -- the parts -------------------------------------------------------------------------------------------
def auto_dtype(device: str) -> str:
    """What `model.dtype: auto` (the benchmarks' dtype) resolves to on `device`."""
    import torch

    return "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def build_parts(args: argparse.Namespace, logs: Path) -> dict[str, Part]:
    py = sys.executable
    mode = "quick" if args.quick else "full"
    model = TINY if args.quick else GPU_MODEL
    device = args.device
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.quick else "4")}
    if args.quick:
        sizes = ["--quick"]
    else:  # 4 tasks x 64 examples: 32 steps of 8 x <= 256 tokens per pass
        sizes = ["--train-per-task", "64", "--batch-size", "8", "--max-length", "256", "--passes", "3",
                 "--test-per-task", "2"]
    tasks = ",".join(str(t) for t in range(1, MEMORY_TASKS[mode] + 1))
    peak = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS of the process (VmHWM)"
    bench_dir = logs / "bench"
    bench = [py, "-m", "loracl", "bench", "configs/gpu.yaml", "--methods", BENCH_METHODS[mode],
             "--output", str(bench_dir), "--set", f"model.device={device}"]
    if args.quick:  # the same config file, on the tiny model: a 2-task order, small caps
        bench += ["--orders", "agnews+yelp", "--max-train", "4", "--max-test", "2", "--jobs", "2",
                  "--set", f"model.name={TINY}", "--set", "model.dtype=float32",
                  "--set", "train.max_length=64", "--set", "eval.max_new_tokens=4"]
    else:
        bench += ["--orders", "order1", "--jobs", "4"]
    return {
        "cuda_tests": Part(
            "cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
            parse_cuda_tests(device), LIMITS["cuda_tests"], threads,
        ),
        "throughput": Part(
            "throughput",
            [py, str(BENCHMARKS / "throughput.py"), "--device", device, "--model", model, *sizes],
            parse_figures("throughput"), LIMITS["throughput"], threads,
            {"throughput_model": model, "throughput_dtype": auto_dtype(device)},
        ),
        "memory": Part(
            "memory",
            [py, str(BENCHMARKS / "adapter_growth.py"), "--device", device, "--model", model,
             "--methods", MEMORY_METHODS[mode], "--tasks", tasks],
            parse_figures("memory", lambda name: "_peak_mib_T" in name), LIMITS["memory"], threads,
            {"memory_model": model, "memory_dtype": auto_dtype(device), "memory_peak": peak},
        ),
        "bench": Part(
            "bench", bench, parse_bench(bench_dir), LIMITS["bench"], threads,
            {"bench_model": model, "bench_order": "agnews+yelp, 4 train 2 test" if args.quick else "order1"},
        ),
    }


def prepare(args: argparse.Namespace, logs: Path) -> bool:
    """Convert the embedded SmolLM2 once (a cached safetensors copy) before the parts load it side by side."""
    code = (
        "from loracl.models.base_model import cached_gguf_dir, smollm2_gguf_path; "
        "cached_gguf_dir(smollm2_gguf_path(), None)"
    )
    part = Part("model_prepare", [sys.executable, "-c", code], lambda _o, _l: {}, LIMITS["prepare"])
    return report(part.name, *Running(part, logs).finish())


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: CUDA is not available here (try --device cpu --quick)")
        return f"cuda ({torch.cuda.get_device_name(0)}, torch {torch.__version__})"
    return f"cpu (torch {torch.__version__}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a minute or two on a CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--output", help="folder for the parts' logs (default: a new temporary folder)")
    args = parser.parse_args(argv)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        parser.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    try:
        device = describe_device(args.device)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    logs = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="loracl-gpu-check-"))
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"device: {device}\nmode: {'quick' if args.quick else 'full'}\nlogs: {logs}", flush=True)
    parts = build_parts(args, logs)
    failed = []
    if not args.quick and {"throughput", "memory", "bench"} & set(chosen) and not prepare(args, logs):
        failed.append("model_prepare")
    if "throughput" in chosen:  # alone: it measures time
        failed += run_parts([parts["throughput"]], logs)
    failed += run_parts([parts[name] for name in PARTS if name in chosen and name != "throughput"], logs)
    print(f"gpu_check_seconds: {time.monotonic() - start:.1f}")
    print(f"gpu_check_failed_parts: {','.join(failed) if failed else 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
