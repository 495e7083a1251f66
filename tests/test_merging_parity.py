"""Parity of loracl's merging methods with plain transcriptions of the algorithms as their authors state them.

MagMax (Marczak et al., ECCV 2024), TIES (Yadav et al., NeurIPS 2023) and task arithmetic (Ilharco et al.,
ICLR 2023) merge full weights: with θ_0 the pretrained weights and θ_t those after sequential fine-tuning up
to task t, the task vectors are τ_t = θ_t − θ_0 and the merged model is θ_0 + λ · merge(τ_1..τ_i). Here the
fine-tuning is a LoRA, so θ_t = W_0 + s B_t A_t on the adapted layers. Each transcription below works on the
models' state dicts in float64 with plain torch, written independently of loracl (MagMax's "later task
wins on equal magnitudes" as an argmax over the reversed task order; TIES's top-k as a sort), and the dense
weights the merged PEFT adapter gives (live after each task, and exported, reloaded and merged into the
weights at the end) must equal them.

Two deliberate differences from upstream, both documented in loracl.methods.ties: TIES trims per layer (not
over the whole flattened model) and keeps int(density · numel) entries.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from loracl.config import LoraSection
from loracl.data import Task
from loracl.methods import create_method
from loracl.methods.context import TaskContext
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import DEFAULT_ADAPTER, LoraPair, get_lora_state, lora_layers, set_lora_state
from loracl.outputs.loading import load_adapter

LORA = LoraSection(r=2, alpha=4)  # s = 2; a rank far below the merged deltas'
TASKS = 3
PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names
ATOL = 1e-5

StateDict = dict[str, torch.Tensor]


# -- the transcriptions: full weights in, merged full weights out --


def task_vectors(theta0: StateDict, thetas: list[StateDict]) -> list[StateDict]:
    return [{key: theta[key] - theta0[key] for key in theta0} for theta in thetas]


def magmax_reference(theta0: StateDict, thetas: list[StateDict], lam: float = 0.5) -> StateDict:
    """MagMax: per parameter entry, the task-vector value of largest magnitude (the latest task on equal
    magnitudes), scaled by λ and added to θ_0."""
    taus = task_vectors(theta0, thetas)
    merged = {}
    for key, base in theta0.items():
        stacked = torch.stack([tau[key] for tau in taus])  # T × ...
        # argmax returns the first maximum: over the reversed order, that is the latest task's
        latest_largest = len(taus) - 1 - stacked.abs().flip(0).argmax(dim=0)
        chosen = stacked.gather(0, latest_largest.unsqueeze(0)).squeeze(0)
        merged[key] = base + lam * chosen
    return merged


def task_arithmetic_reference(theta0: StateDict, thetas: list[StateDict], lam: float) -> StateDict:
    """Task arithmetic: θ_0 + λ Σ_t τ_t."""
    taus = task_vectors(theta0, thetas)
    return {key: base + lam * sum(tau[key] for tau in taus) for key, base in theta0.items()}


def ties_reference(theta0: StateDict, thetas: list[StateDict], density: float, lam: float) -> StateDict:
    """TIES, per parameter tensor: keep each task vector's int(density · numel) entries of largest
    magnitude (trim), elect each entry's sign as that of the kept values' sum (total mass; + on a zero sum),
    average the kept values of that sign (disjoint mean), scale by λ and add to θ_0."""
    taus = task_vectors(theta0, thetas)
    merged = {}
    for key, base in theta0.items():
        trimmed = []
        for tau in taus:
            flat = tau[key].flatten()
            order = torch.sort(flat.abs(), descending=True, stable=True).indices
            kept = torch.zeros_like(flat)
            top = order[: int(density * flat.numel())]
            kept[top] = flat[top]
            trimmed.append(kept.view_as(tau[key]))
        stacked = torch.stack(trimmed)
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agrees = (stacked != 0) & (torch.sign(stacked) == elected)
        total = (stacked * agrees).sum(dim=0)
        count = agrees.sum(dim=0).clamp(min=1)
        merged[key] = base + lam * total / count
    return merged


# -- the problem: random LoRA factors of sequential fine-tuning on the tiny random Llama --


def fine_tuned_factors(model: PeftModel, seed: int = 0) -> list[dict[str, LoraPair]]:
    """The LoRA after each of TASKS tasks of sequential fine-tuning: each task moves the previous factors."""
    generator = torch.Generator().manual_seed(seed)
    current = get_lora_state(model)
    states = []
    for _ in range(TASKS):
        current = {
            name: LoraPair(
                pair.A + 0.3 * torch.randn(pair.A.shape, generator=generator),
                pair.B + 0.1 * torch.randn(pair.B.shape, generator=generator),
            )
            for name, pair in current.items()
        }
        states.append(current)
    return states


def fine_tuned_weights(theta0: StateDict, factors: dict[str, LoraPair], scaling: float) -> StateDict:
    """θ_t: the full weights of the model fine-tuned with these LoRA factors (W_0 + s B A), float64."""
    theta = dict(theta0)
    for name, pair in factors.items():
        key = name.removeprefix(PREFIX) + ".weight"
        theta[key] = theta0[key] + scaling * pair.B.double() @ pair.A.double()
    return theta


def live_weights(model: PeftModel, theta0: StateDict, adapter: str) -> StateDict:
    """The full weights the active adapter gives the model: W_0 + s B A on every adapted layer."""
    theta = dict(theta0)
    state = get_lora_state(model, adapter)
    for name, layer in lora_layers(model, adapter):
        pair = state[name]
        delta = layer.scaling[adapter] * pair.B @ pair.A
        theta[name.removeprefix(PREFIX) + ".weight"] = (
            layer.base_layer.weight.detach().double() + delta.double()
        )
    return theta


def assert_same_weights(ours: StateDict, reference: StateDict) -> None:
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(
            ours[key].double(), reference[key], atol=ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


CASES = {
    "magmax": ({}, lambda theta0, thetas: magmax_reference(theta0, thetas, lam=0.5)),
    "task_arithmetic": (
        {},
        lambda theta0, thetas: task_arithmetic_reference(theta0, thetas, 1 / len(thetas)),
    ),
    "ties": ({}, lambda theta0, thetas: ties_reference(theta0, thetas, density=0.2, lam=0.55)),
    "ties_dense": ({"density": 0.5, "scale": 1.0}, lambda t0, ts: ties_reference(t0, ts, 0.5, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_default_merge_gives_the_authors_merged_full_weights(case, tmp_path):
    """After every task, and exported then reloaded, the merged adapter with default options gives
    exactly the full-weight merge of the transcription (no truncation to lora.r)."""
    options, reference = CASES[case]
    method = create_method(case.removesuffix("_dense"), options, LORA)
    base, _ = tiny_random_llama()
    theta0 = {key: value.detach().double().clone() for key, value in base.state_dict().items()}
    model = method.prepare_model(base)
    scaling = float(next(iter(lora_layers(model)))[1].scaling[DEFAULT_ADAPTER])
    factors = fine_tuned_factors(model)
    thetas = []
    task = Task("t", [], [], [], None, "exact_match", "test")
    for index, state in enumerate(factors, start=1):
        ctx = TaskContext(index, task, tmp_path / f"task-{index}", [], 0, torch.device("cpu"), 2, 0)
        method.before_task(model, ctx)
        set_lora_state(model, state)  # what training task `index` left in the sequential LoRA
        method.after_task(model, ctx)
        thetas.append(fine_tuned_weights(theta0, state, scaling))
        expected = reference(theta0, thetas)
        assert_same_weights(live_weights(model, theta0, model.active_adapter), expected)

    method.export(model, tmp_path / "adapter")
    fresh, _ = tiny_random_llama()
    reloaded = load_adapter(
        tmp_path / "adapter", fresh
    ).merge_and_unload()  # through PeftModel.from_pretrained
    assert_same_weights(dict(reloaded.state_dict()), expected)
    stock = PeftModel.from_pretrained(copy.deepcopy(tiny_random_llama()[0]), str(tmp_path / "adapter"))
    assert_same_weights(dict(stock.merge_and_unload().state_dict()), expected)


def test_magmax_transcription_breaks_ties_towards_the_latest_task():
    theta0 = {"w": torch.zeros(3, dtype=torch.float64)}
    thetas = [{"w": torch.tensor([2.0, -1.0, 0.0])}, {"w": torch.tensor([-2.0, 3.0, 0.5])}]
    thetas = [{"w": t["w"].double()} for t in thetas]
    merged = magmax_reference(theta0, thetas, lam=1.0)["w"]
    torch.testing.assert_close(merged, torch.tensor([-2.0, 3.0, 0.5], dtype=torch.float64))
