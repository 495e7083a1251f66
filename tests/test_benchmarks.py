"""The cost benchmarks of benchmarks/: each script's quick path on the tiny model prints a figures block
that parses back to what the script returned; their pure helpers on known inputs."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from loracl.errors import LoraclError
from loracl.methods.slao import orthogonal_init, orthonormal_row_basis
from loracl.models.lora import LoraPair

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_CPU = ["--model", "tiny-random-llama", "--device", "cpu"]


def script(name: str) -> ModuleType:
    """Import a benchmark script as the scripts import each other (benchmarks/ on sys.path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def run_and_parse(name: str, argv: list[str], capsys) -> dict[str, float]:
    returned = script(name).main(argv)
    printed = script("cost_common").parse_figures(capsys.readouterr().out)
    assert printed.keys() == returned.keys()
    for key, value in returned.items():
        assert math.isfinite(printed[key]), key
        assert printed[key] == pytest.approx(value, rel=1e-3), key
    return printed


EXPECTED = {
    "step_time": {"slao_vs_peft_step_time_ratio", "slao_vs_peft_same_loss_step_time_ratio"},
    "slao_overhead": {
        "slao_qr_total_seconds_T40",
        "slao_rsvd_total_seconds_T40",
        "slao_overhead_fraction_of_task",
        "rsvd_vs_qr_subspace_distance_max",
    },
    "adapter_growth": {"slao_adapter_growth_T5_over_T1", "gainlora_peak_mib_T5", "inflora_state_bytes_T3"},
    "throughput": {"loracl_vs_trainer_throughput_ratio", "eval_merged_vs_unmerged_speedup"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_mode_prints_parseable_figures(name, capsys):
    figures = run_and_parse(name, ["--quick"] + TINY_CPU, capsys)
    assert EXPECTED[name] <= figures.keys()


def test_adapter_growth_slao_flat_multi_lora_linear(capsys):
    argv = ["--tasks", "1,3", "--methods", "slao,inc_lora"] + TINY_CPU
    figures = run_and_parse("adapter_growth", argv, capsys)
    assert figures["slao_adapter_bytes_T3"] == figures["slao_adapter_bytes_T1"]
    assert figures["slao_state_bytes_T3"] == figures["slao_state_bytes_T1"]
    assert figures["inc_lora_adapter_bytes_T3"] == 3 * figures["inc_lora_adapter_bytes_T1"]
    assert figures["inc_lora_adapter_growth_T3_over_T1"] == 3


def test_training_activations_do_not_grow_with_old_tasks(capsys):
    """A training step keeps what its backward needs; frozen old tasks' branches (and GainLoRA's frozen gates)
    need nothing per token. GainLoRA used to keep every old branch's gated output: +11 % per old task here."""
    argv = ["--tasks", "1,3", "--methods", "gainlora,inc_lora", "--step-length", "96"] + TINY_CPU
    figures = run_and_parse("adapter_growth", argv, capsys)
    for name in ("gainlora", "inc_lora"):
        first, third = figures[f"{name}_step_saved_mib_T1"], figures[f"{name}_step_saved_mib_T3"]
        assert third < 1.02 * first, (name, first, third)


def test_overhead_with_a_given_task_time(capsys):
    argv = ["--quick", "--sequences", "2,3", "--task-seconds", "10"] + TINY_CPU
    figures = run_and_parse("slao_overhead", argv, capsys)
    assert figures["task_train_seconds"] == 10
    assert figures["slao_overhead_fraction_of_task"] == pytest.approx(
        figures["slao_qr_init_merge_seconds_per_task"] / 10, rel=1e-2
    )
    assert {"slao_qr_total_seconds_T2", "slao_qr_total_seconds_T3"} <= figures.keys()


def test_unknown_device_choice_is_rejected():
    with pytest.raises(SystemExit):
        script("step_time").main(["--device", "tpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script("cost_common").run_main(lambda argv: script("step_time").main(["--device", "cuda"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.device:") and "CUDA is not available" in err and err.count("\n") == 1


# --- pure helpers ------------------------------------------------------------------------------------------


def test_median_and_ratio():
    common = script("cost_common")
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert common.ratio(3.0, 2.0) == 1.5
    with pytest.raises(ValueError):
        common.median([])
    with pytest.raises(ValueError):
        common.ratio(1.0, 0.0)


def test_figures_block_round_trip(capsys):
    common = script("cost_common")
    common.print_figures({"bytes": 14336, "some_ratio": 1.00421, "fraction": 2.5e-05, "speedup": 3.0})
    out = capsys.readouterr().out
    assert out.splitlines() == [
        common.FIGURES_HEADER,
        "bytes: 14336",
        "some_ratio: 1.004",
        "fraction: 2.5e-05",
        "speedup: 3",
    ]
    assert common.parse_figures("progress line\n" + out) == {
        "bytes": 14336.0,
        "some_ratio": 1.004,
        "fraction": 2.5e-05,
        "speedup": 3.0,
    }
    with pytest.raises(ValueError):
        common.parse_figures("no block here")


def test_synthetic_tasks_are_deterministic_and_labelled():
    common = script("cost_common")
    tasks = common.synthetic_tasks(3, train_size=5, test_size=2, seed=1)
    again = common.synthetic_tasks(3, train_size=5, test_size=2, seed=1)
    assert [t.name for t in tasks] == ["synthetic1", "synthetic2", "synthetic3"]
    assert [t.train for t in tasks] == [t.train for t in again]
    for task in tasks:
        assert len(task.train) == 5 and len(task.test) == 2
        assert all(ex.answers[0] in task.labels for ex in task.train + task.test)
    assert tasks[0].labels != tasks[1].labels  # distinct tasks


def test_padding_fraction_and_random_batches():
    throughput = script("throughput")
    lengths = [2, 4, 4, 8]
    assert throughput.padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(1 - 18 / 24)
    assert throughput.padding_fraction(lengths, [[0], [1, 2], [3]]) == 0.0
    batches = throughput.random_batches(10, 4, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == throughput.random_batches(10, 4, seed=3)


def test_trainer_features_mask_the_prompt():
    from loracl.data.text import Encoded

    encoded = Encoded([5, 6, 7, 8], prompt_len=3, truncated=False)
    assert script("throughput").trainer_features([encoded]) == [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, -100, 8]}
    ]


def test_randomized_basis_spans_the_qr_basis_space():
    overhead = script("slao_overhead")
    torch.manual_seed(0)
    A = torch.randn(4, 40)
    rsvd = overhead.randomized_row_basis(A)
    torch.testing.assert_close(rsvd @ rsvd.T, torch.eye(4), atol=1e-5, rtol=0)
    assert overhead.subspace_distance(rsvd, orthonormal_row_basis(A)) < 1e-4
    E = torch.eye(40)
    assert overhead.subspace_distance(E[:4], E[4:8]) == pytest.approx(math.sqrt(8))


def test_orthogonal_init_takes_any_basis_and_copies_B():
    B = torch.randn(6, 2)
    source = {"layer": LoraPair(torch.randn(2, 5), B)}
    init = orthogonal_init(source, row_basis=lambda A: torch.zeros_like(A))
    assert torch.equal(init["layer"].A, torch.zeros(2, 5))
    assert torch.equal(init["layer"].B, B) and init["layer"].B is not B
    torch.testing.assert_close(orthogonal_init(source)["layer"].A, orthonormal_row_basis(source["layer"].A))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_an_allocation():
    growth = script("adapter_growth")
    cpu = torch.device("cpu")
    growth.reset_peak(cpu)
    before = growth.peak_mib(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = growth.peak_mib(cpu)
    del block
    assert after - before > 48


def test_slao_drift_on_known_factors():
    drift = script("slao_drift").drift
    q, _ = torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64))
    orthonormal = q.T.float()  # 4 x 16, orthonormal rows
    B = torch.randn(8, 4)
    same = LoraPair(orthonormal, B)
    figures = drift(same, same, same, same)
    assert figures["init_change"] == pytest.approx(0.0, abs=1e-5)  # already a basis: the init keeps B A
    assert figures["swap_change"] == figures["merge_gap"] == 0.0
    assert figures["prev_a_row_norm"] == pytest.approx(1.0)
    scaled = LoraPair(2 * orthonormal, B)  # rows of norm 2: the basis halves B A
    moved = LoraPair(-orthonormal, B)
    figures = drift(scaled, scaled, moved, LoraPair(orthonormal, B))
    assert figures["init_change"] == pytest.approx(0.5, rel=1e-5)
    assert figures["swap_change"] == pytest.approx(1.5, rel=1e-5)  # |-B Q - 2 B Q| / |2 B Q|
    assert figures["merge_gap"] == pytest.approx(2.0, rel=1e-5)  # |B Q + B Q| / |B Q|
    rebased = drift(scaled, scaled, moved, LoraPair(orthonormal, B), rebase_b=True)  # B_init = B C, C = 2 I
    assert rebased["init_change"] == pytest.approx(0.0, abs=1e-5)
    assert rebased["swap_change"] == pytest.approx(2.0, rel=1e-5)  # |-2 B Q - 2 B Q| / |2 B Q|


def test_slao_drift_reads_a_run(tmp_path, capsys):
    from loracl.config import load_config
    from loracl.recipes.run import run

    overrides = ["benchmark.max_train=4", "benchmark.max_test=2", "train.max_length=64"]
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    run(load_config(tiny, [*overrides, "eval.zero_shot=false"]), tmp_path / "run")
    capsys.readouterr()
    figures = run_and_parse("slao_drift", [str(tmp_path / "run")], capsys)
    assert {f"merge_gap_task{i}" for i in (2, 3)} <= figures.keys()  # tiny.yaml: 3 tasks
    assert figures["prev_a_row_norm_task3"] == pytest.approx(1.0, abs=0.05)  # task 2 started orthonormal
    with pytest.raises(LoraclError, match="not a slao run"):
        script("slao_drift").main([str(tmp_path)])
