"""SLAO's math (METHODS.md) on known tensors, through the method object itself."""

from __future__ import annotations

import math

import pytest
import torch

from loracl.config import LoraSection
from loracl.methods import create_method
from loracl.methods.slao import interpolate, merge_weight, orthonormal_row_basis
from loracl.models.lora import LoraPair


def make_slao(**options):
    return create_method("slao", options, LoraSection(r=3))


def test_orthonormal_rows_span_previous_row_space():
    torch.manual_seed(0)
    A = torch.randn(3, 10)
    Q = orthonormal_row_basis(A)
    assert Q.shape == (3, 10)
    torch.testing.assert_close(Q @ Q.T, torch.eye(3), atol=1e-5, rtol=0)
    # Same row space: projecting A's rows onto span(Q) loses nothing.
    torch.testing.assert_close(A @ Q.T @ Q, A, atol=1e-5, rtol=0)


def test_sign_fix_matches_qr_with_positive_diagonal():
    A = torch.tensor([[-2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    # A^T = Q R; the sign fix makes diag(R) >= 0 so each row of Q^T points like the row of A.
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(orthonormal_row_basis(A), expected)


def test_sign_fix_takes_sign_zero_as_plus():
    A = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # rank 1: diag(R)[1] == 0
    Q = orthonormal_row_basis(A)
    _, R = torch.linalg.qr(A.T.double())
    raw_second_row = torch.linalg.qr(A.T.double())[0][:, 1]
    assert R[1, 1].abs() < 1e-12
    torch.testing.assert_close(Q[1].double(), raw_second_row)  # not flipped


def test_lambda_schedules():
    assert merge_weight(1, "inv_sqrt") == 1.0
    assert merge_weight(4, "inv_sqrt") == pytest.approx(0.5)
    assert merge_weight(9, "inv_sqrt") == pytest.approx(1 / 3)
    assert merge_weight(4, "inv") == pytest.approx(0.25)
    assert merge_weight(4, "constant", 0.3) == pytest.approx(0.3)


def state(A, B):
    return {"layer": LoraPair(torch.tensor(A), torch.tensor(B))}


def test_init_uses_previous_finetuned_A_and_B():
    slao = make_slao()
    slao.finetuned = state([[3.0, 0.0, 4.0]], [[1.0], [2.0]])
    slao.merged = state([[9.0, 9.0, 9.0]], [[7.0], [7.0]])
    assert slao.initial_state(1) is None  # task 1: PEFT's own init
    init = slao.initial_state(2)["layer"]
    torch.testing.assert_close(init.A, torch.tensor([[0.6, 0.0, 0.8]]))  # row normalised, same direction
    torch.testing.assert_close(init.B, torch.tensor([[1.0], [2.0]]))  # B_ft,i-1, not the merged B


def test_init_last_merge_and_random_options():
    finetuned = state([[3.0, 0.0, 4.0]], [[1.0], [2.0]])
    merged = state([[0.0, 5.0, 0.0]], [[7.0], [8.0]])
    slao = make_slao(init="last_merge")
    slao.finetuned, slao.merged = finetuned, merged
    init = slao.initial_state(2)["layer"]
    torch.testing.assert_close(init.A, torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(init.B, torch.tensor([[7.0], [8.0]]))
    slao = make_slao(init="random")
    slao.finetuned, slao.merged = finetuned, merged
    assert slao.initial_state(2) is None


def test_merge_formula_B_only():
    slao = make_slao()
    ft1 = state([[1.0, 0.0]], [[2.0], [4.0]])
    merged1 = slao.merge(1, ft1)
    torch.testing.assert_close(merged1["layer"].B, ft1["layer"].B)  # B_m1 = B_ft1
    slao.merged = merged1
    ft4 = state([[0.0, 1.0]], [[6.0], [0.0]])
    merged = slao.merge(4, ft4)["layer"]
    # lambda(4) = 1/2: B_m = B_prev + 0.5 (B_ft - B_prev)
    torch.testing.assert_close(merged.B, torch.tensor([[4.0], [2.0]]))
    torch.testing.assert_close(merged.A, torch.tensor([[0.0, 1.0]]))  # A_m,i = A_ft,i


@pytest.mark.parametrize(
    ("merge", "expected_A", "expected_B"),
    [
        ("A_and_B", [[0.5, 0.5]], [[4.0], [2.0]]),
        ("A", [[0.5, 0.5]], [[6.0], [0.0]]),
        ("none", [[0.0, 1.0]], [[6.0], [0.0]]),
    ],
)
def test_merge_ablations(merge, expected_A, expected_B):
    slao = make_slao(merge=merge)
    slao.merged = state([[1.0, 0.0]], [[2.0], [4.0]])
    merged = slao.merge(4, state([[0.0, 1.0]], [[6.0], [0.0]]))["layer"]
    torch.testing.assert_close(merged.A, torch.tensor(expected_A))
    torch.testing.assert_close(merged.B, torch.tensor(expected_B))


def test_interpolate_is_running_mean_for_inv_schedule():
    torch.manual_seed(1)
    vectors = [torch.randn(4, 2) for _ in range(5)]
    merged = vectors[0]
    for i, v in enumerate(vectors[1:], start=2):
        merged = interpolate(merged, v, merge_weight(i, "inv"))
    torch.testing.assert_close(merged, torch.stack(vectors).mean(0))


def test_inv_sqrt_weights_of_earlier_tasks():
    # With lambda(i) = 1/sqrt(i), after task 3: B_m3 = w1 B_ft1 + w2 B_ft2 + (1/sqrt3) B_ft3.
    finetuned_B = [torch.tensor([[1.0]]), torch.tensor([[10.0]]), torch.tensor([[100.0]])]
    merged = finetuned_B[0]
    for i in (2, 3):
        merged = interpolate(merged, finetuned_B[i - 1], merge_weight(i, "inv_sqrt"))
    w1 = (1 - 1 / math.sqrt(2)) * (1 - 1 / math.sqrt(3))
    w2 = (1 / math.sqrt(2)) * (1 - 1 / math.sqrt(3))
    assert float(merged) == pytest.approx(w1 * 1.0 + w2 * 10.0 + 100.0 / math.sqrt(3))


def test_unknown_option_is_a_clear_error():
    from loracl.errors import ConfigError

    with pytest.raises(ConfigError, match="method.lambda_schedule: unknown option for method 'slao'"):
        make_slao(lambda_schedule="inv")
    with pytest.raises(ConfigError, match="method.merge"):
        make_slao(merge="C")


def test_rebase_b_init_keeps_every_layers_update():
    """`rebase_b` (not the paper's): B_init A_init = B_ft A_ft exactly; the paper's B_init = B_ft does not."""
    torch.manual_seed(0)
    A, B = 0.6 * torch.randn(3, 7), torch.randn(5, 3)  # PEFT-like A: rows of norm well below 1
    paper, rebased = make_slao(), make_slao(rebase_b=True)
    paper.finetuned = rebased.finetuned = {"layer": LoraPair(A, B)}
    plain, kept = paper.initial_state(2)["layer"], rebased.initial_state(2)["layer"]
    torch.testing.assert_close(kept.A, plain.A)  # the same orthonormal A_init
    torch.testing.assert_close(kept.B @ kept.A, B @ A)
    assert torch.linalg.matrix_norm(plain.B @ plain.A - B @ A) > 0.1 * torch.linalg.matrix_norm(B @ A)


def test_rebase_b_merges_the_previous_merged_B_in_the_new_basis():
    slao = make_slao(rebase_b=True)
    ft1 = state([[3.0, 0.0, 4.0]], [[1.0], [2.0]])  # A_init = [[0.6, 0, 0.8]], so C = A_ft,1 A_init^T = [[5]]
    slao.merged = slao.merge(1, ft1)
    slao.finetuned = ft1
    init = slao.initial_state(2)["layer"]
    torch.testing.assert_close(init.B, torch.tensor([[5.0], [10.0]]))
    ft2 = state([[0.0, 1.0, 0.0]], [[1.0], [0.0]])
    merged = slao.merge(2, ft2)["layer"]
    # B_m,2 = B_m,1 C + (1/sqrt 2) (B_ft,2 - B_m,1 C), with B_m,1 C = [[5], [10]]
    weight = 1 / math.sqrt(2)
    expected = torch.tensor([[5.0 + weight * (1.0 - 5.0)], [10.0 + weight * (0.0 - 10.0)]])
    torch.testing.assert_close(merged.B, expected)
    torch.testing.assert_close(merged.A, torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("options", [{"init": "random"}, {"merge": "A_and_B"}, {"merge": "A"}])
def test_rebase_b_refuses_options_without_one_basis(options):
    from loracl.errors import ConfigError

    with pytest.raises(ConfigError, match="^method: Value error, rebase_b needs init last_ft or last_merge"):
        make_slao(rebase_b=True, **options)
