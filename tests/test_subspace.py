"""Input-subspace math (loracl.models.subspace) and O-LoRA's penalty on small tensors with known answers."""

from __future__ import annotations

import pytest
import torch

from loracl.config import LoraSection
from loracl.methods import create_method
from loracl.methods.olora import l2_penalty, olora_loss, orthogonality_penalty
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import lora_layers
from loracl.models.multi_lora import activate_all, add_task_adapter, task_adapter
from loracl.models.subspace import (
    basis_info,
    collect_input_grams,
    complement_directions,
    gpm_threshold,
    gpm_update,
    project_off,
    vector_gram,
)


def e(i: int, n: int = 5) -> torch.Tensor:
    return torch.eye(n)[i]


def test_threshold_schedule():
    assert gpm_threshold(1) == pytest.approx(0.97)
    assert gpm_threshold(3) == pytest.approx(0.976)
    assert gpm_threshold(100) == 1.0


def test_gpm_update_takes_the_fewest_directions_reaching_the_energy_threshold():
    # Energy 9 along e0, 1 along e1: 90% in one direction.
    # GPM's task-1 count is #{j : cumulative fraction < threshold}: the directions strictly below it.
    R = torch.stack([3 * e(0), e(1)])  # rows are inputs
    G = vector_gram(R)
    M = gpm_update(None, G, 0.95)
    assert M.shape == (5, 1)
    torch.testing.assert_close((M @ M.T), torch.outer(e(0), e(0)), atol=1e-6, rtol=0)
    assert gpm_update(None, G, 0.85).shape == (5, 0)  # 90 % is not below 85 %: no direction at all


def test_gpm_update_counts_what_the_basis_already_explains():
    M = gpm_update(None, vector_gram(torch.stack([e(0)])), 0.97)
    # New task: 96% of its energy along e0 (already in M), 4% along e2.
    R = torch.stack([torch.sqrt(torch.tensor(0.96)) * e(0), 0.2 * e(2)])
    assert gpm_update(M, vector_gram(R), 0.95).shape == (5, 1)  # 96% >= 95%: nothing added
    M2 = gpm_update(M, vector_gram(R), 0.97)  # needs the residual direction e2
    assert M2.shape == (5, 2)
    torch.testing.assert_close(M2.T @ M2, torch.eye(2), atol=1e-6, rtol=0)
    span = torch.outer(e(0), e(0)) + torch.outer(e(2), e(2))
    torch.testing.assert_close(M2 @ M2.T, span, atol=1e-6, rtol=0)


def test_complement_directions_are_the_top_singular_vectors_of_the_residual():
    torch.manual_seed(0)
    n = 8
    M = torch.linalg.qr(torch.randn(n, 3))[0]
    H = torch.randn(n, 40) * torch.linspace(3, 0.5, n).unsqueeze(1)
    A = complement_directions(M, vector_gram(H.T), 2)
    assert A.shape == (2, n)
    torch.testing.assert_close(A @ A.T, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(A @ M, torch.zeros(2, 3), atol=1e-5, rtol=0)
    C = H @ H.T  # InfLoRA: the left singular vectors of the projected covariance, not of projected inputs
    U = torch.linalg.svd((torch.eye(n) - M @ M.T) @ C)[0][:, :2].T
    torch.testing.assert_close((A @ U.T).abs(), torch.eye(2), atol=1e-4, rtol=0)  # same vectors up to sign


def test_complement_directions_stay_in_the_complement_when_the_residual_is_rank_deficient():
    M = torch.eye(5)[:, :2]
    H = torch.stack([e(0), e(1), e(2)], dim=1)  # residual has rank 1 (e2) < k = 3
    A = complement_directions(M, vector_gram(H.T), 3)
    torch.testing.assert_close(A @ M, torch.zeros(3, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(A @ A.T, torch.eye(3), atol=1e-6, rtol=0)
    assert abs(float(A[0] @ e(2))) == pytest.approx(1.0, abs=1e-6)


def test_projected_gradient_has_no_component_in_the_protected_subspace():
    torch.manual_seed(1)
    M = torch.linalg.qr(torch.randn(6, 2))[0]
    grad = torch.randn(3, 6)
    projected = project_off(grad, M)
    torch.testing.assert_close(projected @ M, torch.zeros(3, 2), atol=1e-6, rtol=0)
    # What lies outside span(M) is untouched.
    outside = torch.eye(6) - M @ M.T
    torch.testing.assert_close(projected @ outside, grad @ outside, atol=1e-6, rtol=0)


def test_collector_uses_only_non_padding_tokens_in_float32():
    base, _ = tiny_random_llama()
    model = create_method("seq_lora", {}, LoraSection(r=2)).prepare_model(base)
    layers = {n: m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj")}
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    padded = collect_input_grams(model, layers, [{"input_ids": ids, "attention_mask": m}])
    singles = [
        collect_input_grams(
            model, layers, [{"input_ids": ids[i : i + 1, :k], "attention_mask": m[i : i + 1, :k]}]
        )
        for i, k in ((0, 4), (1, 2))
    ]
    (name,) = layers
    assert padded[name].dtype == torch.float32
    torch.testing.assert_close(padded[name], singles[0][name] + singles[1][name], atol=1e-4, rtol=1e-5)


def two_adapter_model(A1: torch.Tensor, A2: torch.Tensor):
    base, _ = tiny_random_llama()
    lora = LoraSection(r=A1.shape[0], target_modules=["q_proj"])
    method = create_method("olora", {}, lora)
    model = method.prepare_model(base)
    add_task_adapter(model, lora, task_adapter(2))
    activate_all(model, trainable=task_adapter(2))
    with torch.no_grad():
        for _, layer in lora_layers(model, "task1"):
            layer.lora_A["task1"].weight.copy_(A1)
            layer.lora_A["task2"].weight.copy_(A2)
    return method, model


def test_olora_penalty_is_zero_for_mutually_orthogonal_A():
    A1 = torch.eye(64)[:2]
    A2 = torch.eye(64)[2:4]
    method, model = two_adapter_model(A1, A2)
    assert float(orthogonality_penalty(model, "task2", ["task1"]).detach()) == 0.0
    assert float(method.extra_loss(model, {}).detach()) == 0.0


def test_olora_penalty_is_the_l1_norm_of_A_j_A_i_T_summed_over_layers():
    A1 = torch.zeros(2, 64)
    A1[0, 0], A1[1, 1] = 1.0, 2.0
    A2 = torch.zeros(2, 64)
    A2[0, 0], A2[0, 1], A2[1, 1] = 1.0, -1.0, 3.0
    method, model = two_adapter_model(A1, A2)
    expected_per_layer = (A1 @ A2.T).abs().sum()  # |1| + |0| + |-2| + |6| = 9
    assert float(expected_per_layer) == 9.0
    layers = 2  # q_proj of the 2 decoder layers
    assert float(method.extra_loss(model, {}).detach()) == pytest.approx(0.5 * layers * 9.0)
    l2 = float(l2_penalty(model, "task2").detach())  # B = 0 at PEFT init
    assert l2 == pytest.approx(layers * float(A2.pow(2).sum()))
    assert float(olora_loss(model, 0.0, 2.0).detach()) == pytest.approx(2.0 * l2)


def test_only_the_current_adapter_is_trainable():
    A = torch.eye(64)[:2]
    _, model = two_adapter_model(A, A)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".task2." in n for n in names)
    assert any(".task1." in n for n, _ in model.named_parameters())
    assert set(model.base_model.active_adapters) == {"task1", "task2"}


def test_basis_info_judges_each_layer_against_its_own_input_size():
    # q_proj-like layers (n = 4) and a down_proj-like layer (n = 6): a 4-dim basis fills only the former.
    bases = {"q": torch.eye(4), "v": torch.eye(4)[:, :2], "down": torch.eye(6)[:, :4]}
    assert basis_info(bases) == {
        "basis_dims_min": 2,
        "basis_dims_mean": 3.3,
        "basis_dims_max": 4,
        "input_dim": 6,
        "layers_full": 1,
        "basis_dims_per_layer": {"q": 4, "v": 2, "down": 4},
    }
    assert basis_info({}) == {}
