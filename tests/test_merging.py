"""The merging baselines' math on small tensors: MagMax's rule, TIES and task arithmetic through the methods,
the SVD to LoRA factors (exact at full rank by default, truncated with `rank`), agreement with PEFT's own
add_weighted_adapter, what the runs report, and checkpoints of the merged adapter. Parity with plain
transcriptions of the authors' full-weight algorithms: test_merging_parity.py."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loracl.config import LoraSection
from loracl.data import Task
from loracl.errors import CheckpointError
from loracl.methods import create_method
from loracl.methods.context import TaskContext
from loracl.methods.merging_base import MERGED_ADAPTER
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import LoraPair, get_lora_state, lora_layers, peft_config, set_lora_state
from loracl.models.merging import max_magnitude, task_vector, truncate_to_lora
from loracl.recipes.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint

LORA = LoraSection(r=2, alpha=4)


def method(name: str, **options):
    return create_method(name, options, LORA)


def test_task_vector_is_scaled_B_times_A():
    pair = LoraPair(A=torch.tensor([[1.0, 2.0, 0.0]]), B=torch.tensor([[3.0], [-1.0]]))
    expected = 2.0 * torch.tensor([[3.0, 6.0, 0.0], [-1.0, -2.0, 0.0]])
    torch.testing.assert_close(task_vector(pair, 2.0), expected)


def test_magmax_picks_the_largest_magnitude_entry():
    t1 = torch.tensor([[1.0, -5.0], [2.0, 0.0]])
    t2 = torch.tensor([[-3.0, 4.0], [-2.0, -1.0]])
    t3 = torch.tensor([[0.5, 0.0], [1.0, 0.5]])
    # (0,0): |-3| wins; (0,1): |-5| wins; (1,0): tie 2 vs -2, the later task wins; (1,1): |-1| wins
    torch.testing.assert_close(max_magnitude([t1, t2, t3]), torch.tensor([[-3.0, -5.0], [-2.0, -1.0]]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-100, 100), min_size=6, max_size=6), min_size=1, max_size=5))
def test_magmax_entries_come_from_some_task_with_maximal_magnitude(rows):
    tensors = [torch.tensor(r, dtype=torch.float64).view(2, 3) for r in rows]
    merged = max_magnitude(tensors)
    stacked = torch.stack(tensors)
    torch.testing.assert_close(merged.abs(), stacked.abs().amax(0))
    assert bool(((stacked == merged).any(0)).all())


def test_magmax_method_scales_the_merged_vector():
    t1, t2 = torch.tensor([[1.0, -4.0]]), torch.tensor([[-2.0, 3.0]])
    torch.testing.assert_close(method("magmax").combine([t1, t2]), torch.tensor([[-1.0, -2.0]]))  # λ = 0.5
    torch.testing.assert_close(method("magmax", scale=1.0).combine([t1, t2]), torch.tensor([[-2.0, -4.0]]))


def test_task_arithmetic_default_is_the_mean_and_scale_is_a_weight():
    t1, t2 = torch.tensor([[1.0, -4.0]]), torch.tensor([[3.0, 2.0]])
    torch.testing.assert_close(method("task_arithmetic").combine([t1, t2]), torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(method("task_arithmetic").combine([t1]), t1)  # 1/i with i = 1
    scaled = method("task_arithmetic", scale=0.3).combine([t1, t2])
    torch.testing.assert_close(scaled, torch.tensor([[1.2, -0.6]]))


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])  # top 50 %: 3, 2
    t2 = torch.tensor([[-2.5, -4.0], [1.0, 0.2]])  # top 50 %: -4, -2.5
    t3 = torch.tensor([[1.0, 0.1], [0.2, -3.0]])  # top 50 %: -3, 1
    # mass after trimming: (0,0) 3 - 2.5 + 1 > 0 -> mean of 3 and 1; (0,1) -4; (1,0) nothing kept;
    # (1,1) 2 - 3 < 0 -> only -3 agrees
    expected = torch.tensor([[2.0, -4.0], [0.0, -3.0]])
    ties = method("ties", density=0.5, scale=1.0)
    torch.testing.assert_close(ties.combine([t1, t2, t3]), expected)
    torch.testing.assert_close(method("ties", density=0.5).combine([t1, t2, t3]), 0.55 * expected)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def test_truncation_keeps_the_top_singular_directions_and_reports_energy():
    U, V = random_orthogonal(5, 0), random_orthogonal(4, 1)
    S = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    delta = (U[:, :3] * S) @ V[:, :3].T
    cut = truncate_to_lora(delta.float(), 2)
    assert cut.pair.A.shape == (2, 4) and cut.pair.B.shape == (5, 2)
    best = (U[:, :2] * S[:2]) @ V[:, :2].T  # Eckart–Young
    torch.testing.assert_close(cut.pair.B @ cut.pair.A, best.float(), atol=1e-5, rtol=0)
    assert cut.energy_kept == pytest.approx((9 + 4) / (9 + 4 + 1), rel=1e-5)
    assert cut.dense_rank == 3
    torch.testing.assert_close(cut.pair.A @ cut.pair.A.T, torch.eye(2), atol=1e-5, rtol=0)  # A = V_kᵀ


def test_truncation_above_the_delta_rank_is_exact_and_zero_padded():
    delta = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]))  # rank 1, 3 x 2
    cut = truncate_to_lora(delta, 4)
    assert cut.pair.A.shape == (4, 2) and cut.pair.B.shape == (3, 4)
    torch.testing.assert_close(cut.pair.B @ cut.pair.A, delta, atol=1e-5, rtol=0)
    assert cut.energy_kept == pytest.approx(1.0) and cut.dense_rank == 1
    assert torch.count_nonzero(cut.pair.A[2:]) == 0 and torch.count_nonzero(cut.pair.B[:, 2:]) == 0
    zero = truncate_to_lora(torch.zeros(3, 2), 2)
    assert zero.energy_kept == 1.0 and zero.dense_rank == 0


@pytest.mark.parametrize("options", [{}, {"rank": 2}])
def test_merge_goes_through_every_stored_task_vector(options):
    magmax = method("magmax", **options)
    magmax.scalings = {"layer": 2.0}
    magmax.task_vectors = [
        {"layer": LoraPair(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))},  # τ1 = 2 e11
        {"layer": LoraPair(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [-3.0]]))},  # τ2 = -6 e22
    ]
    merged = magmax.merge()["layer"]
    torch.testing.assert_close(merged.pair.B @ merged.pair.A, 0.5 * torch.tensor([[2.0, 0.0], [0.0, -6.0]]))
    assert merged.energy_kept == pytest.approx(1.0)


def test_full_rank_is_the_default_of_every_merging_method():
    for name in ("magmax", "task_arithmetic", "ties"):
        merger = method(name)
        assert merger.rank is None and merger.merged_rank == "full"
        assert method(name, rank=3).merged_rank == 3


def test_full_rank_factors_are_the_delta_itself_and_keep_all_energy():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 4, generator=generator)
    full = truncate_to_lora(delta)
    assert full.pair.A.shape == (4, 4) and full.pair.B.shape == (5, 4)  # min(m, n) directions
    torch.testing.assert_close(full.pair.B @ full.pair.A, delta, atol=1e-5, rtol=0)
    assert full.energy_kept == 1.0 and full.dense_rank == 4 and full.kept_rank == 4
    padded = truncate_to_lora(delta, None, width=6)  # one adapter rank for layers of other shapes
    assert padded.pair.A.shape == (6, 4) and padded.pair.B.shape == (5, 6)
    torch.testing.assert_close(padded.pair.B @ padded.pair.A, delta, atol=1e-5, rtol=0)
    assert torch.count_nonzero(padded.pair.A[4:]) == 0 and torch.count_nonzero(padded.pair.B[:, 4:]) == 0
    cut = truncate_to_lora(delta, 2)
    assert cut.energy_kept < 1.0 and cut.kept_rank == 2 and cut.dense_rank == 4
    with pytest.raises(ValueError, match="width 3"):
        truncate_to_lora(delta, None, width=3)


def trained(merger, seed: int = 0):
    """The tiny random Llama wrapped by `merger`, its sequential LoRA set to random factors."""
    base, _ = tiny_random_llama()
    model = merger.prepare_model(base)
    generator = torch.Generator().manual_seed(seed)
    state = {
        name: LoraPair(
            torch.randn(p.A.shape, generator=generator), torch.randn(p.B.shape, generator=generator)
        )
        for name, p in get_lora_state(model).items()
    }
    set_lora_state(model, state)
    return model


def finish_task(merger, model, index: int, tmp_path, seed: int | None = None) -> None:
    task = Task("t", [], [], [], None, "exact_match", "test")
    ctx = TaskContext(index, task, tmp_path / f"task-{index}", [], 0, torch.device("cpu"), 2, 0)
    merger.before_task(model, ctx)
    if seed is not None:  # what training task `index` changed
        generator = torch.Generator().manual_seed(seed)
        state = {
            name: LoraPair(p.A + torch.randn(p.A.shape, generator=generator), p.B)
            for name, p in get_lora_state(model).items()
        }
        set_lora_state(model, state)
    merger.after_task(model, ctx)


def test_default_merged_adapter_is_exact_and_reported_as_full_rank(tmp_path):
    magmax = method("magmax")
    model = trained(magmax)
    finish_task(magmax, model, 1, tmp_path)
    finish_task(magmax, model, 2, tmp_path, seed=1)
    # q_proj is 64 × 64, v_proj 32 × 64 (GQA): one adapter rank, the largest min(m, n)
    config = model.peft_config[MERGED_ADAPTER]
    assert config.r == 64 and config.lora_alpha == 64
    merged = get_lora_state(model, MERGED_ADAPTER)
    for name, layer in lora_layers(model, MERGED_ADAPTER):
        assert layer.scaling[MERGED_ADAPTER] == 1.0
        deltas = [task_vector(state[name], magmax.scalings[name]) for state in magmax.task_vectors]
        exact = 0.5 * max_magnitude(deltas)
        # exact up to float32 rounding of the SVD, which scales with the delta's norm
        scale = float(torch.linalg.matrix_norm(exact, ord=2))
        torch.testing.assert_close(merged[name].B @ merged[name].A, exact, atol=1e-6 * scale, rtol=0)
    info = magmax.task_info()
    assert info["merged_rank"] == "full" and info["adapter_rank"] == 64 and info["tasks_merged"] == 2
    assert info["energy_kept_mean"] == 1.0 and info["energy_kept_min"] == 1.0
    per_layer = json.loads((tmp_path / "task-2" / "merge_info.json").read_text())
    assert per_layer.keys() == merged.keys()
    assert all(v["rank"] == "full" and v["energy_kept"] == 1.0 for v in per_layer.values())
    # a per-entry selection is far above the rank of the two rank-2 task vectors' sum
    assert info["dense_rank_max"] == max(v["dense_rank"] for v in per_layer.values()) > 2 * LORA.r
    saved = json.loads((tmp_path / "task-2" / "adapter_merged" / "adapter_config.json").read_text())
    assert saved["r"] == 64 and saved["lora_alpha"] == 64
    # deployed: per block q_proj A 64×64 + B 64×64, v_proj A 64×64 + B 32×64, float32, 2 blocks
    assert magmax.adapter_bytes(model) == 2 * (64 * 64 + 64 * 64 + 64 * 64 + 32 * 64) * 4


def test_rank_option_truncates_and_reports_the_energy_kept(tmp_path):
    ties = method("ties", rank=3)
    model = trained(ties)
    finish_task(ties, model, 1, tmp_path)
    finish_task(ties, model, 2, tmp_path, seed=1)
    assert model.peft_config[MERGED_ADAPTER].r == 3
    info = ties.task_info()
    assert info["merged_rank"] == 3 and info["adapter_rank"] == 3
    assert 0.0 < info["energy_kept_min"] <= info["energy_kept_mean"] < 1.0
    per_layer = json.loads((tmp_path / "task-2" / "merge_info.json").read_text())
    assert all(v["rank"] == 3 and v["energy_kept"] < 1.0 for v in per_layer.values())
    assert ties.adapter_bytes(model) == 2 * 3 * ((64 + 64) + (64 + 32)) * 4


def test_resume_from_a_checkpoint_continues_the_full_rank_merge(tmp_path):
    """Checkpointed after task 1 and resumed on a fresh model, task 2 gives the same merged adapter and
    reports as the run that went on."""
    whole = method("magmax")
    model = trained(whole)
    finish_task(whole, model, 1, tmp_path / "whole")
    save_checkpoint(tmp_path / "run", model, whole, {"per_task": [whole.task_info()]}, 1, "digest")
    finish_task(whole, model, 2, tmp_path / "whole", seed=1)

    resumed = method("magmax")
    fresh = resumed.prepare_model(tiny_random_llama()[0])
    checkpoint = read_checkpoint(tmp_path / "run", "digest", torch.device("cpu"))
    restore_checkpoint(fresh, resumed, checkpoint)
    assert fresh.peft_config[MERGED_ADAPTER].r == 64
    finish_task(resumed, fresh, 2, tmp_path / "resumed", seed=1)
    assert resumed.task_info() == whole.task_info()
    for name, pair in get_lora_state(model, MERGED_ADAPTER).items():
        theirs = get_lora_state(fresh, MERGED_ADAPTER)[name]
        torch.testing.assert_close(theirs.B @ theirs.A, pair.B @ pair.A)
    assert resumed.adapter_bytes(fresh) == whole.adapter_bytes(model)


def test_resume_refuses_a_merged_adapter_truncated_by_an_older_default():
    magmax = method("magmax")
    model = magmax.prepare_model(tiny_random_llama()[0])
    old = LORA.model_copy(update={"alpha": LORA.r, "dropout": 0.0})  # rank lora.r, the former default
    model.add_adapter(MERGED_ADAPTER, peft_config(old))
    with pytest.raises(CheckpointError, match="rank 2.*needs 64"):
        magmax.rebuild(model, 1)
    method("magmax", rank=2).rebuild(model, 1)  # asked for rank 2: the same adapter


@pytest.mark.parametrize(
    ("name", "options", "combination", "weights", "density"),
    [
        ("task_arithmetic", {}, "svd", [0.5, 0.5], None),
        ("task_arithmetic", {"scale": 0.8}, "svd", [0.8, 0.8], None),
        ("ties", {"density": 0.3}, "ties_svd", [0.55, 0.55], 0.3),
    ],
)
def test_same_merged_lora_as_peft_add_weighted_adapter(name, options, combination, weights, density):
    """Our dense merge + truncation gives the same LoRA update as PEFT's add_weighted_adapter."""
    rank = 3
    merger = method(name, rank=rank, **options)
    base, _ = tiny_random_llama()
    model = merger.prepare_model(base)
    model.add_adapter("t2", model.peft_config["default"])
    torch.manual_seed(0)
    states = []
    for adapter in ("default", "t2"):
        state = {
            layer: LoraPair(torch.randn_like(p.A), torch.randn_like(p.B))
            for layer, p in get_lora_state(model, adapter).items()
        }
        set_lora_state(model, state, adapter)
        states.append(state)
    merger.task_vectors = states
    merger.scalings = {layer: float(module.scaling["default"]) for layer, module in lora_layers(model)}
    ours = merger.merge()
    model.add_weighted_adapter(
        ["default", "t2"], weights, "peft", combination_type=combination, svd_rank=rank, density=density
    )
    theirs = get_lora_state(model, "peft")
    for layer, cut in ours.items():
        scaling = dict(lora_layers(model, "peft"))[layer].scaling["peft"]
        assert scaling == 1.0
        expected = theirs[layer].B @ theirs[layer].A
        torch.testing.assert_close(cut.pair.B @ cut.pair.A, expected, atol=1e-4, rtol=1e-4)
