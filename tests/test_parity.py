"""Parity with the authors' code (issue 17): on small deterministic problems, a plain-torch transcription of
each authors' algorithm, written here independently of loracl, gives the same numbers as loracl's method.

- GPM: sahagobinda/GPM `update_GPM` (SVD of the raw representation matrix R, energies sigma^2 of R).
- InfLoRA: liangyanshuo/gainlora `cl_trainer_gainlora_inflora.py` `get_reg_matrix` (design of A from the
  projected covariance, scaled 1/sqrt(3)) and `get_repsentation` (the DualGPM basis update on the covariance,
  threshold (1 - eps0) * (i - 1) / 15 + eps0).
- GainLoRA: the same file: the key from the projected covariance of the gate's outputs (norm of the previous
  key), and the projection of the updates of trans_input[0], trans_input[2] and prompt_key after each
  optimizer step, each row rescaled to its norm after the step.
- O-LoRA: cmnfriend/O-LoRA `uie_trainer_lora.py`: lamda_1 * sum over layers of |A_old A_new^T|.sum(), with
  A_old the old tasks' A stacked.

Bases are compared as projectors and column by column up to sign (an SVD fixes a singular vector's sign
arbitrarily); counts exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from method_helpers import setup

from loracl.engine.training import train_task
from loracl.methods.gainlora import GateBank
from loracl.methods.olora import olora_loss
from loracl.models.multi_lora import layer_map, task_adapter, task_adapters
from loracl.models.subspace import BasisRule, collect_input_grams, complement_directions, vector_gram

DOUBLE = torch.float64


# -- transcriptions of the authors' code --------------------------------------------------------------------
def authors_count(ratio: torch.Tensor, accumulated: torch.Tensor, threshold: float) -> int:
    """The later-task loop both authors' codes share: append directions while the fraction is below ε."""
    r = 0
    for value in ratio:
        if accumulated < threshold:
            accumulated = accumulated + value
            r += 1
        else:
            break
    return r


def authors_gpm(features: list[torch.Tensor] | None, activations: list[torch.Tensor], threshold: float):
    """GPM's update_GPM, per layer, on representation matrices R (n x N)."""
    if features is None:  # after the first task
        out = []
        for R in activations:
            U, S, _ = torch.linalg.svd(R, full_matrices=False)
            ratio = S**2 / (S**2).sum()
            r = int(torch.sum(torch.cumsum(ratio, 0) < threshold))
            out.append(U[:, :r])
        return out
    out = []
    for M, R in zip(features, activations, strict=True):
        _, S1, _ = torch.linalg.svd(R, full_matrices=False)
        total = (S1**2).sum()
        R_hat = R - M @ M.T @ R
        U, S, _ = torch.linalg.svd(R_hat, full_matrices=False)
        ratio = S**2 / total
        r = authors_count(ratio, (total - (S**2).sum()) / total, threshold)
        if r == 0:
            out.append(M)
            continue
        stacked = torch.cat([M, U[:, :r]], dim=1)
        out.append(stacked[:, : stacked.shape[0]])
    return out


def authors_dual_gpm(
    feature: torch.Tensor | None, activation: torch.Tensor, threshold: float
) -> torch.Tensor:
    """get_repsentation's update for one layer, on the covariance `activation` (n x n)."""
    if feature is None:
        U, S, _ = torch.linalg.svd(activation, full_matrices=False)
        ratio = S**2 / (S**2).sum()
        r = int(torch.sum(torch.cumsum(ratio, 0) < threshold))
        return U[:, : max(r, 1)]
    _, S1, _ = torch.linalg.svd(activation, full_matrices=False)
    total = (S1**2).sum()
    act_hat = activation - feature @ feature.T @ activation
    U, S, _ = torch.linalg.svd(act_hat, full_matrices=False)
    ratio = S**2 / total
    r = authors_count(ratio, (total - (S**2).sum()) / total, threshold)
    if r == 0:
        return feature
    stacked = torch.cat([feature, U[:, :r]], dim=1)
    return stacked[:, : stacked.shape[0]]


def authors_threshold(eps0: float, task_index: int) -> float:
    """(1 - eps0) * cur_task / total_sessions + eps0, cur_task 0-based, total_sessions 15."""
    return (1.0 - eps0) * (task_index - 1) / 15 + eps0


def authors_design(feature: torch.Tensor | None, matrix: torch.Tensor, r: int) -> torch.Tensor:
    """get_reg_matrix's A: top-r left singular vectors of (C - M M^T C), as rows, divided by sqrt(3)."""
    cur = matrix if feature is None else matrix - feature @ feature.T @ matrix
    U, _, _ = torch.linalg.svd(cur)
    return U[:, :r].T / math.sqrt(3)


def authors_key(
    feature: torch.Tensor | None, outputs_cov: torch.Tensor, previous_norm: float
) -> torch.Tensor:
    """get_reg_matrix's prompt_key: U[:, :1]^T of the (projected) output covariance, times the old norm."""
    cur = outputs_cov if feature is None else outputs_cov - feature @ feature.T @ outputs_cov
    U, _, _ = torch.linalg.svd(cur)
    return U[:, 0] * previous_norm


def authors_projected_step(new: torch.Tensor, old: torch.Tensor, feature_mat: torch.Tensor) -> torch.Tensor:
    """The training loop's projection after optimizer.step() for one of trans_input[0], trans_input[2],
    prompt_key (2-d, rows): new - (new - old) M M^T, each row rescaled to the norm of `new`'s row."""
    norms = new.norm(dim=1, keepdim=True)
    projected = new - torch.mm(new - old, feature_mat)
    return projected * norms / projected.norm(dim=1, keepdim=True)


# -- helpers ------------------------------------------------------------------------------------------------
def spectrum_inputs(n: int, tokens: int, decay: float, seed: int) -> torch.Tensor:
    """tokens x n inputs with a decaying spectrum (a few strong directions, a long tail)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DOUBLE))[0]
    scales = decay ** torch.arange(n, dtype=DOUBLE)
    return (torch.randn(tokens, n, generator=g, dtype=DOUBLE) * scales) @ basis.T


def assert_same_basis(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same number of columns, same span, and each column the same up to sign."""
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.double() @ ours.double().T, theirs @ theirs.T, atol=1e-6, rtol=0)
    cosines = (ours.double() * theirs).sum(0).abs()
    torch.testing.assert_close(cosines, torch.ones_like(cosines), atol=1e-6, rtol=0)


def assert_same_rows_up_to_sign(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> None:
    signs = torch.sign((ours.double() * theirs).sum(1, keepdim=True))
    torch.testing.assert_close(ours.double(), theirs * signs, atol=atol, rtol=0)


# -- GPM --------------------------------------------------------------------------------------------------
def test_gpm_bases_match_the_authors_update_over_three_tasks():
    n, layers = 12, 3
    rule = BasisRule("gpm", 0.97, step=0.003)
    ours: dict[str, torch.Tensor] = {}
    theirs = None
    counts = []
    for task in range(1, 4):
        R = [spectrum_inputs(n, 40, 0.6 + 0.05 * layer, 10 * task + layer).T for layer in range(layers)]
        rule.update_all(ours, {str(layer): vector_gram(R[layer].T) for layer in range(layers)}, task)
        theirs = authors_gpm(theirs, R, 0.97 + 0.003 * (task - 1))
        for layer in range(layers):
            assert_same_basis(ours[str(layer)], theirs[layer])
        counts.append([M.shape[1] for M in theirs])
    assert counts[0] != counts[-1] and all(0 < c < n for c in counts[0])  # the problem exercises both rules


# -- InfLoRA ------------------------------------------------------------------------------------------------
def test_dual_gpm_bases_and_designed_A_match_the_authors_over_three_tasks():
    n, r = 16, 4
    rule = BasisRule("dual_gpm", 0.995, tasks=15)
    ours: dict[str, torch.Tensor] = {}
    theirs = None
    counts = []
    for task in range(1, 5):
        X = spectrum_inputs(n, 60, 0.7, task)
        covariance = X.T @ X / X.shape[0]  # the authors' mean of x x^T; loracl keeps the sum (same rule)
        A = complement_directions(ours.get("q"), vector_gram(X), r) / math.sqrt(3)
        assert_same_rows_up_to_sign(A, authors_design(theirs, covariance, r))
        rule.update_all(ours, {"q": vector_gram(X)}, task)
        theirs = authors_dual_gpm(theirs, covariance, authors_threshold(0.995, task))
        assert_same_basis(ours["q"], theirs)
        counts.append(theirs.shape[1])
    assert counts[0] < counts[-1] < n  # the basis grows and leaves room


def test_inflora_method_designs_and_extends_as_the_authors_on_the_tiny_model(tmp_path):
    """Through InfLoRA's own hooks: A_2 and the bases after tasks 1 and 2, from the layer inputs loracl's
    collector reads (tested in test_subspace), against the transcription."""
    config, method, model, (ctx1, ctx2) = setup("inflora", {}, tmp_path)
    theirs: dict[str, torch.Tensor] = {}
    for ctx in (ctx1, ctx2):
        method.before_task(model, ctx)
        current = task_adapter(ctx.index)
        layers = layer_map(model, current)
        before = collect_input_grams(model, layers, ctx.batches(), lambda b: method.step_context(model, b))
        for name, layer in layers.items():
            expected = authors_design(theirs.get(name), before[name].double(), method.lora.r)
            assert_same_rows_up_to_sign(layer.lora_A[current].weight, expected, atol=2e-5)
        train_task(model, method, ctx.encoded, config.train, ctx.pad_id, seed=ctx.index)
        after = collect_input_grams(model, layers, ctx.batches())
        method.after_task(model, ctx)
        for name in layers:
            theirs[name] = authors_dual_gpm(
                theirs.get(name), after[name].double(), authors_threshold(0.995, ctx.index)
            )
            assert_same_basis(method.bases[name], theirs[name])


# -- GainLoRA ---------------------------------------------------------------------------------------------
def mlp_values(bank: GateBank, j: int, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """The authors' trans_input (Linear, SiLU, Linear, SiLU) by hand: what each projected parameter sees."""
    W1, W2 = bank.mlps[j][0].weight.detach(), bank.mlps[j][2].weight.detach()
    hidden = torch.nn.functional.silu(pooled @ W1.T)
    return {"input": pooled, "hidden": hidden, "output": torch.nn.functional.silu(hidden @ W2.T)}


def test_gainlora_gate_init_bases_and_projected_updates_match_the_authors(tmp_path):
    config, method, model, (ctx1, ctx2) = setup("gainlora", {}, tmp_path)
    bank: GateBank = method.bank(model)
    # Task 1: a random gate whose key is the top direction of its own outputs, with the random key's norm.
    method.before_task(model, ctx1)
    p1 = method.gate_inputs(model, ctx1)
    random_norm = float(bank.keys[0].detach().norm())
    values = mlp_values(bank, 0, p1)
    key1 = authors_key(None, values["output"].T @ values["output"] / len(p1), random_norm)
    assert_same_rows_up_to_sign(bank.keys[0].detach()[None], key1[None], atol=1e-6)
    train_task(model, method, ctx1.encoded, config.train, ctx1.pad_id, seed=1)
    method.after_task(model, ctx1)
    values = mlp_values(bank, 0, p1)
    theirs = {
        name: authors_dual_gpm(None, rows.T @ rows / len(rows), authors_threshold(0.995, 1))
        for name, rows in values.items()
    }
    for name, M in theirs.items():
        assert_same_basis(method.gate_bases[name], M)
    # Task 2: a copy of gate 1, its key off the old outputs' basis, with gate 1's key norm.
    method.before_task(model, ctx2)
    for a, b in zip(bank.mlps[1].parameters(), bank.mlps[0].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    p2 = method.gate_inputs(model, ctx2)
    outputs = mlp_values(bank, 1, p2)["output"]
    key2 = authors_key(theirs["output"], outputs.T @ outputs / len(p2), float(bank.keys[0].detach().norm()))
    assert_same_rows_up_to_sign(bank.keys[1].detach()[None], key2[None], atol=1e-6)
    # One optimizer step's update of W1, W2 and the key, projected as the authors' loop does.
    params = bank.projected_parameters(1)
    method.before_optimizer_step(model)
    old = {name: p.detach().clone() for name, p in params.items()}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    stepped = {name: p.detach().clone() for name, p in params.items()}
    method.after_optimizer_step(model)
    for name, p in params.items():
        rows = (lambda t: t[None]) if p.dim() == 1 else (lambda t: t)
        M = theirs[name]
        expected = authors_projected_step(rows(stepped[name]), rows(old[name]), M @ M.T)
        torch.testing.assert_close(rows(p.detach()), expected, atol=1e-10, rtol=0)
        assert not torch.allclose(rows(p.detach()), rows(stepped[name]))  # the projection did something


# -- O-LoRA -------------------------------------------------------------------------------------------------
def authors_olora(model: torch.nn.Module, lamda_1: float, old: list[str], new: str) -> torch.Tensor:
    """uie_trainer_lora's orthogonal loss: per layer, A_old (all old tasks' A stacked) against the new A."""
    loss = torch.zeros((), dtype=DOUBLE)
    for module in model.modules():
        if hasattr(module, "lora_A") and new in module.lora_A:
            A_old = torch.cat([module.lora_A[name].weight for name in old]).double()
            loss = loss + torch.abs(A_old @ module.lora_A[new].weight.double().T).sum()
    return lamda_1 * loss


def test_olora_loss_matches_the_authors(tmp_path):
    config, method, model, (ctx1, ctx2) = setup("olora", {}, tmp_path)
    for ctx in (ctx1, ctx2):
        method.before_task(model, ctx)
    method.before_task(model, dataclasses.replace(ctx2, index=3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random A for every task (a new O-LoRA branch starts as PEFT initialises it)
        for module in model.modules():
            if hasattr(module, "lora_A"):
                for name in task_adapters(model):
                    module.lora_A[name].weight.copy_(
                        torch.randn(module.lora_A[name].weight.shape, generator=g)
                    )
    *old, new = task_adapters(model)
    assert len(old) == 2
    ours = olora_loss(model, 0.5, 0.0)
    torch.testing.assert_close(ours.double(), authors_olora(model, 0.5, old, new), rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps0", [0.995, 0.9])
def test_threshold_schedule_is_the_authors(eps0):
    rule = BasisRule("dual_gpm", eps0, tasks=15)
    for task in (1, 2, 8, 16, 17):
        assert rule.threshold_at(task) == pytest.approx(authors_threshold(eps0, task))
