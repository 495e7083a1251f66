"""benchmarks/gpu_check.sh (issue 18): its quick CPU mode prints every part's `name: value` lines; a part that
fails or times out prints `<part>_error: <one line>` while the others still report; the parsers of the
parts' outputs on known inputs. The helper scripts it runs (throughput.py, adapter_growth.py) have their
quick paths tested in test_benchmarks.py."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def gpu_check() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def lines_of(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and " " not in name:
            found[name] = value
    return found


@pytest.mark.slow
def test_quick_cpu_mode_reports_every_part(tmp_path) -> None:
    """The whole script as documented, all four parts on the tiny model (about a minute)."""
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--device", "cpu", "--quick", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    lines = lines_of(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines["gpu_check_failed_parts"] == "none" and not any(k.endswith("_error") for k in lines)
    assert lines["cuda_tests_failed"] == "0" and int(lines["cuda_tests_skipped"]) > 0  # no CUDA here
    assert float(lines["throughput_loracl_vs_trainer_throughput_ratio"]) > 0
    assert {f"memory_{m}_peak_mib_T{t}" for m in ("seq_lora", "slao") for t in (1, 2, 3)} <= lines.keys()
    assert {"bench_slao_ap", "bench_seq_lora_bwt", "bench_slao_fwt"} <= lines.keys()
    assert float(lines["gpu_check_seconds"]) < 300


def test_one_part_in_quick_cpu_mode(tmp_path, capsys) -> None:
    """--parts memory: adapter_growth.py's peak memory for T = 1..3 on the tiny model (seconds)."""
    argv = ["--device", "cpu", "--quick", "--parts", "memory", "--output", str(tmp_path)]
    assert gpu_check().main(argv) == 0
    lines = lines_of(capsys.readouterr().out)
    assert lines["memory_model"] == "tiny-random-llama" and lines["gpu_check_failed_parts"] == "none"
    assert all(float(lines[f"memory_slao_peak_mib_T{t}"]) > 0 for t in (1, 2, 3))
    assert (tmp_path / "memory.log").is_file()


def fake(name: str, code: str, limit: float = 60) -> object:
    module = gpu_check()
    return module.Part(name, [sys.executable, "-c", code], module.parse_figures(name), limit)


def test_a_failed_or_stuck_part_reports_one_error_line_and_the_others_run(tmp_path, capsys) -> None:
    module = gpu_check()
    parts = [
        fake("crash", "import sys; print('working'); sys.exit('error: the model did not load')"),
        # a part that hangs, with a child process of its own: both stopped at the limit
        fake("stuck", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
             "'import time; time.sleep(60)']); time.sleep(60)", limit=2),
        fake("fine", "print('== figures =='); print('speed: 12.5')"),
    ]
    start = time.monotonic()
    assert module.run_parts(parts, tmp_path) == ["crash", "stuck"]
    assert time.monotonic() - start < 30
    lines = lines_of(capsys.readouterr().out)
    assert lines["crash_error"] == "no figures in the output (error: the model did not load)"
    assert lines["stuck_error"] == "timed out after 2 s"
    assert lines["fine_speed"] == "12.5" and "fine_error" not in lines
    assert (tmp_path / "crash.log").read_text().startswith("working")


def test_no_cuda_is_one_line_and_exit_status_2(capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert gpu_check().main(["--parts", "bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda: CUDA is not available") and "\n" not in err


def test_unknown_part_is_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_check().main(["--parts", "bench,speed"])


def test_pytest_summary_counts() -> None:
    module = gpu_check()
    out = "....F\nFAILED tests/test_cuda.py::test_x - boom\n1 failed, 4 passed, 2 skipped, 1 error in 9.1s\n"
    assert module.pytest_counts(out) == {"passed": 4, "failed": 1, "skipped": 2, "errors": 1}
    with pytest.raises(module.PartError, match="first: FAILED tests/test_cuda.py::test_x - boom"):
        module.parse_cuda_tests("cuda")(out, Path())
    skipped = "sssss\n17 skipped in 3.0s\n"
    assert module.parse_cuda_tests("cpu")(skipped, Path())["cuda_tests_skipped"] == "17"
    with pytest.raises(module.PartError, match="no CUDA test ran"):
        module.parse_cuda_tests("cuda")(skipped, Path())


def test_bench_table_lines(tmp_path) -> None:
    module = gpu_check()
    header = "method,order,seed,status,AP,BWT,FWT,forgetting,data_free,role,tasks,train_seconds,wall_seconds,"
    header += "error"
    (tmp_path / "bench.csv").write_text(
        f"{header}\nslao,order1,,ok,0.7512,-0.01,0.02,0.03,True,continual,x,12.5,60.25,\n"
        "mtl,order1,,failed,,,,,True,upper_bound,x,,,CUDA out of memory\n"
    )
    with pytest.raises(module.PartError) as err:
        module.parse_bench(tmp_path)("", tmp_path)
    assert err.value.args[0] == "mtl: CUDA out of memory"
    lines = err.value.args[1]
    assert lines["bench_slao_ap"] == "0.7512" and lines["bench_slao_wall_seconds"] == "60.25"
