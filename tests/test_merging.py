"""The merging baselines' math on small tensors: MagMax's rule, TIES and task arithmetic through the methods,
the truncated SVD back to a LoRA, and agreement with PEFT's own add_weighted_adapter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loracl.config import LoraSection
from loracl.methods import create_method
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import LoraPair, get_lora_state, lora_layers, set_lora_state
from loracl.models.merging import max_magnitude, task_vector, truncate_to_lora

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


def test_merge_goes_through_every_stored_task_vector():
    magmax = method("magmax", rank=2)
    magmax.scalings = {"layer": 2.0}
    magmax.task_vectors = [
        {"layer": LoraPair(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))},  # τ1 = 2 e11
        {"layer": LoraPair(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [-3.0]]))},  # τ2 = -6 e22
    ]
    merged = magmax.merge()["layer"]
    torch.testing.assert_close(merged.pair.B @ merged.pair.A, 0.5 * torch.tensor([[2.0, 0.0], [0.0, -6.0]]))
    assert merged.energy_kept == pytest.approx(1.0)


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
