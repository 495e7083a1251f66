"""Reservoir memory, replay's batches, A-GEM's projection and EWC's Fisher and penalty, on small tensors and
on the tiny random Llama through the method objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loracl.config import LoraSection
from loracl.data import Example, Task
from loracl.data.text import Encoded, PromptEncoder
from loracl.engine.training import answer_loss, collate
from loracl.methods import create_method
from loracl.methods.agem import agem_project
from loracl.methods.context import TaskContext
from loracl.methods.ewc import diagonal_fisher, ewc_penalty
from loracl.methods.memory import ReservoirMemory
from loracl.models.base_model import tiny_random_llama

LORA = LoraSection(r=2, alpha=4)


def encoded(i: int) -> Encoded:
    return Encoded([1, 2, i], 2, False)


# --- reservoir memory ------------------------------------------------------------------------------------


def test_reservoir_keeps_everything_below_capacity_then_stays_bounded():
    memory = ReservoirMemory(3, seed=0)
    memory.extend([encoded(i) for i in range(2)], "a")
    assert [e.input_ids[-1] for e in memory.items] == [0, 1] and memory.seen == 2
    memory.extend([encoded(i) for i in range(2, 10)], "b")
    assert len(memory) == 3 and memory.seen == 10
    assert sum(memory.composition().values()) == 3
    assert len(memory.sample(10)) == 3 and len(memory.sample(2)) == 2
    assert memory.nbytes() == 8 * 3 * 3


def test_reservoir_keeps_each_example_with_probability_capacity_over_seen():
    counts = [0] * 10
    trials = 2000
    for seed in range(trials):
        memory = ReservoirMemory(3, seed=seed)
        memory.extend([encoded(i) for i in range(10)], "t")
        for item in memory.items:
            counts[item.input_ids[-1]] += 1
    # each of the 10 examples kept with probability 3/10; 5 standard deviations is about 0.05
    assert all(abs(c / trials - 0.3) < 0.05 for c in counts), counts


# --- replay ----------------------------------------------------------------------------------------------


def context(index: int, name: str, examples: list[Encoded], batch_size: int = 2, **extra) -> TaskContext:
    task = Task(name, [], [], [], None, "exact_match", "test")
    defaults = {"task_dir": Path("/nonexistent"), "pad_id": 0, "device": torch.device("cpu"), "seed": 0}
    return TaskContext(index, task, encoded=examples, batch_size=batch_size, **(defaults | extra))


def test_replay_mixes_only_past_tasks_examples_into_batches():
    replay = create_method("replay", {"memory_size": 5, "memory_batch_size": 3}, LORA)
    first = [encoded(i) for i in range(4)]
    replay.before_task(None, context(1, "a", first))
    batch = [encoded(100)]
    assert replay.augment_batch(batch) == batch  # task 1: the memory is empty
    replay.after_task(None, context(1, "a", first))
    replay.before_task(None, context(2, "b", [encoded(50)]))
    mixed = replay.augment_batch(batch)
    assert mixed[0] is batch[0] and len(mixed) == 4
    assert all(any(e is f for f in first) for e in mixed[1:])  # drawn from task 1's examples
    assert len({id(e) for e in mixed[1:]}) == 3  # without repetition
    assert replay.task_info()["replayed_examples"] == 3 and not replay.data_free


# --- A-GEM -----------------------------------------------------------------------------------------------


def test_agem_projection_removes_the_conflicting_component():
    g, ref = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    projected, changed = agem_project(g, ref)
    assert changed
    torch.testing.assert_close(projected, torch.tensor([0.5, 0.5]))  # g - (g.r / r.r) r = g + r / 2
    assert float(projected @ ref) == pytest.approx(0.0)
    same, changed = agem_project(torch.tensor([1.0, 2.0]), ref)  # g.r = 1 >= 0: untouched
    assert not changed and torch.equal(same, torch.tensor([1.0, 2.0]))


vectors = st.lists(st.floats(-10, 10), min_size=5, max_size=5)


@settings(max_examples=100, deadline=None)
@given(vectors, vectors)
def test_agem_projected_gradient_never_opposes_the_reference(g, ref):
    g, ref = torch.tensor(g, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    projected, changed = agem_project(g, ref)
    assert float(projected @ ref) >= -1e-9 * (1 + float(g.norm() * ref.norm()))
    if changed:  # only the component along ref moved
        residual = projected - g
        along = (residual @ ref) / (ref @ ref) * ref
        torch.testing.assert_close(residual - along, torch.zeros(5, dtype=g.dtype))
    else:
        assert torch.equal(projected, g)


def tiny_examples(tokenizer, texts: list[tuple[str, str]]) -> list[Encoded]:
    encoder = PromptEncoder(tokenizer, 64)
    return [encoder.encode(Example(prompt, (answer,))) for prompt, answer in texts]


def test_agem_step_projects_the_model_gradient():
    base, tokenizer = tiny_random_llama()
    agem = create_method("agem", {"memory_size": 4, "memory_batch_size": 4}, LORA)
    model = agem.prepare_model(base)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    old = tiny_examples(tokenizer, [("2+2 Answer:", "four"), ("red? Answer:", "color")])
    agem.before_task(model, context(1, "old", old, pad_id=tokenizer.pad_token_id))
    agem.after_task(model, context(1, "old", old, pad_id=tokenizer.pad_token_id))
    agem.before_task(model, context(2, "new", [], pad_id=tokenizer.pad_token_id))
    params = agem.trainable_parameters(model)
    ref_loss = answer_loss(model, collate(old, tokenizer.pad_token_id, torch.device("cpu")))
    reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, params)])
    conflicting = -reference + 0.1 * torch.randn_like(reference)
    offset = 0
    for p in params:
        p.grad = conflicting[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    agem.before_optimizer_step(model)
    after = torch.cat([p.grad.reshape(-1) for p in params])
    expected = conflicting - (conflicting @ reference) / (reference @ reference) * reference
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)
    assert float(after @ reference) >= -1e-5 * float(reference @ reference)
    assert agem.task_info()["projected_steps"] == 1


# --- EWC -------------------------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_around_it():
    fisher = {"w": torch.tensor([[1.0, 2.0]])}
    anchor = {"w": torch.tensor([[0.0, 3.0]])}
    at_anchor = {"w": anchor["w"].clone().requires_grad_()}
    zero = ewc_penalty(at_anchor, fisher, anchor, lam=2.0)
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert torch.count_nonzero(at_anchor["w"].grad) == 0
    theta = {"w": torch.tensor([[1.0, 1.0]], requires_grad=True)}
    penalty = ewc_penalty(theta, fisher, anchor, lam=2.0)
    assert float(penalty.detach()) == pytest.approx(0.5 * 2.0 * (1.0 * 1.0 + 2.0 * 4.0))
    penalty.backward()
    torch.testing.assert_close(theta["w"].grad, 2.0 * fisher["w"] * (theta["w"] - anchor["w"]))  # λ F Δθ


def manual_log_likelihood(model, example: Encoded) -> torch.Tensor:
    """Σ over answer tokens of log p(token | prefix), from the full logits (an independent computation)."""
    ids = torch.tensor([example.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    positions = torch.arange(example.prompt_len - 1, len(example.input_ids) - 1)
    return torch.log_softmax(logits, -1)[positions, targets[positions]].sum()


def test_fisher_is_the_mean_squared_gradient_of_each_examples_log_likelihood():
    base, tokenizer = tiny_random_llama()
    ewc = create_method("ewc", {}, LORA)
    model = ewc.prepare_model(base)
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    examples = tiny_examples(tokenizer, [("a Answer:", "yes"), ("bb Answer:", "no way"), ("c Answer:", "x")])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batches = (collate([e], tokenizer.pad_token_id, torch.device("cpu")) for e in examples)
    fisher, count = diagonal_fisher(model, params, batches)
    assert count == 3
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for example in examples:
        grads = torch.autograd.grad(manual_log_likelihood(model, example), list(params.values()))
        for name, grad in zip(params, grads, strict=True):
            expected[name] += grad**2 / 3
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name], atol=1e-6, rtol=1e-4)


def test_ewc_accumulates_fisher_over_tasks_and_anchors_at_the_latest_task():
    base, tokenizer = tiny_random_llama()
    ewc = create_method("ewc", {"lam": 3.0, "fisher_samples": 2}, LORA)
    model = ewc.prepare_model(base)
    torch.manual_seed(2)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    pad = tokenizer.pad_token_id
    ctx1 = context(1, "t1", tiny_examples(tokenizer, [("a Answer:", "yes"), ("b Answer:", "no")]), pad_id=pad)
    ctx2 = context(2, "t2", tiny_examples(tokenizer, [("cc Answer:", "blue")]), pad_id=pad)
    assert ewc.extra_loss(model, {}) is None  # nothing to protect during task 1
    ewc.after_task(model, ctx1)
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    torch.testing.assert_close(ewc.extra_loss(model, {}), torch.tensor(0.0))  # still at θ*
    for p in ewc.params.values():
        p.data.add_(0.05)  # "train" task 2
    params = dict(ewc.params)
    moved = ewc.extra_loss(model, {})
    expected = 0.5 * 3.0 * sum((first[n] * 0.05**2).sum() for n in params)
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-8)
    ewc.after_task(model, ctx2)
    second, _ = diagonal_fisher(model, params, ctx2.batches(2, batch_size=1))
    for name, p in params.items():
        torch.testing.assert_close(ewc.fisher[name], first[name] + second[name])
        torch.testing.assert_close(ewc.anchor[name], p.detach())
    assert ewc.task_info()["fisher_examples"] == 1
