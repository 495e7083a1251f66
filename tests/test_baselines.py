"""IncLoRA, O-LoRA, InfLoRA, GPM and GainLoRA on the tiny random Llama: protection properties, the gates,
end-to-end runs through loracl.recipes.run.run, and the exported adapter/ reloaded through
loracl.outputs.loading."""

from __future__ import annotations

import warnings

import pytest
import torch
from method_helpers import LAYER0, SHORT, TINY, generation_logits, learn, setup

from loracl.config import load_config
from loracl.data import load_tasks
from loracl.data.text import PromptEncoder
from loracl.engine.evaluation import Evaluator
from loracl.engine.training import train_task
from loracl.methods.gainlora import GateBank, gate_value, masked_mean
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import lora_layers
from loracl.models.subspace import collect_input_grams
from loracl.outputs.loading import load_adapter
from loracl.recipes import run as runner


def layer0_gram(model, ctx, max_examples: int) -> torch.Tensor:
    layers = {LAYER0: dict(model.named_modules())[LAYER0]}
    return collect_input_grams(model, layers, ctx.batches(max_examples))[LAYER0].double()


def test_gpm_keeps_A_x_of_old_inputs_while_A_still_learns(tmp_path):
    # threshold 1: the basis holds the whole span of the (few) old inputs, so protection must be exact.
    opts = {"threshold": 1.0, "threshold_step": 0.0, "max_examples": 2}
    config, method, model, (ctx1, ctx2) = setup("gpm", opts, tmp_path)
    learn(config, method, model, ctx1)
    A = dict(lora_layers(model))[LAYER0].lora_A["default"].weight
    A1 = A.detach().clone().double()
    G_old = layer0_gram(model, ctx1, 2)
    assert method.bases[LAYER0].shape[1] < A.shape[1]  # room left to learn
    learn(config, method, model, ctx2)
    D = A.detach().double() - A1
    assert D.norm() > 1e-3 * A1.norm()  # A was trained on task 2 ...
    change = torch.trace(D @ G_old @ D.T) / torch.trace(A1 @ G_old @ A1.T)
    moved = torch.trace(D @ D.T) / torch.trace(A1 @ A1.T)
    # ... but A x is unchanged for every old input x: what is left is float32 rounding of the projected
    # steps (1e-10 to 1.3e-9, depending on thread count), a millionth of how far A itself moved.
    assert change < 1e-6 * moved


def test_gpm_after_backward_projects_the_gradient(tmp_path):
    config, method, model, (ctx1, _) = setup("gpm", {}, tmp_path)
    learn(config, method, model, ctx1)
    A = dict(lora_layers(model))[LAYER0].lora_A["default"].weight
    A.grad = torch.randn_like(A)
    method.after_backward(model)
    M = method.bases[LAYER0]
    torch.testing.assert_close(A.grad @ M, torch.zeros(A.shape[0], M.shape[1]), atol=1e-5, rtol=0)


def test_inflora_designs_A_in_the_complement_and_trains_only_B(tmp_path):
    opts = {"threshold": 1.0, "max_examples": 2}
    config, method, model, (ctx1, ctx2) = setup("inflora", opts, tmp_path)
    learn(config, method, model, ctx1)
    G_old = layer0_gram(model, ctx1, 2)
    method.before_task(model, ctx2)
    layer = dict(lora_layers(model, "task2"))[LAYER0]
    A2 = layer.lora_A["task2"].weight.detach().double()
    eye = torch.eye(A2.shape[0], dtype=torch.float64)
    torch.testing.assert_close(A2 @ A2.T, eye / 3, atol=1e-5, rtol=0)  # orthogonal rows of norm 1/sqrt(3)
    assert torch.trace(A2 @ G_old @ A2.T) / torch.trace(G_old) < 1e-9  # A_2 x = 0 for old inputs
    assert float(layer.lora_B["task2"].weight.detach().abs().max()) == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B.task2." in n for n in trainable)
    train_task(model, method, ctx2.encoded, config.train, ctx2.pad_id, seed=2)
    torch.testing.assert_close(layer.lora_A["task2"].weight.detach().double(), A2)  # A frozen


def test_gate_formula_on_known_tensors():
    key = torch.tensor([1.0, 0.0, 0.0])
    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = torch.tensor(
        [abs(2 * torch.sigmoid(torch.tensor(4.0)) - 1)] * 1
        + [0.0]
        + [abs(2 * torch.sigmoid(torch.tensor(-4.0)) - 1)]
        + [0.0]
    )
    torch.testing.assert_close(gate_value(out, key), expected)
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(
        masked_mean(emb, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    )


def test_gainlora_new_gate_is_shut_on_old_inputs_open_on_its_own_and_old_gates_are_frozen(tmp_path):
    # threshold 1: the gate bases span nearly every old value (the DualGPM energies are 4th powers, so
    # directions below float resolution of the total still drop out), and without the authors' row-norm
    # rescaling the protection is near exact; the default is measured in tests/test_protection.py.
    opts = {"threshold": 1.0, "gate_threshold": 1.0, "keep_row_norms": False}
    config, method, model, (ctx1, ctx2) = setup("gainlora", opts, tmp_path)
    learn(config, method, model, ctx1)
    bank: GateBank = method.bank(model)
    p_old, p_new = method.gate_inputs(model, ctx1), method.gate_inputs(model, ctx2)
    g1_before = bank(p_old)[:, 0].detach().clone()
    method.before_task(model, ctx2)
    W1_init = bank.mlps[1][0].weight.detach().clone()
    torch.testing.assert_close(W1_init, bank.mlps[0][0].weight)  # gate 2 starts as a copy of gate 1
    assert float(bank(p_old)[:, 1].detach().abs().max()) < 1e-2  # g_2(x) ~ 0 on old inputs from the start
    assert float(bank(p_new)[:, 1].detach().mean()) > 1e-2  # but open on its own task (key on its outputs)
    torch.testing.assert_close(bank.keys[1].norm(), bank.keys[0].norm())  # with the previous key's norm
    train_task(model, method, ctx2.encoded, config.train, ctx2.pad_id, seed=2)
    method.after_task(model, ctx2)
    assert not torch.allclose(bank.mlps[1][0].weight, W1_init)  # the new gate learned ...
    gates = bank(p_old).detach()
    assert float(gates[:, 1].abs().max()) < 1e-2  # ... and still stays (nearly) shut on old inputs
    torch.testing.assert_close(gates[:, 0], g1_before)  # old gate frozen
    assert not any(p.requires_grad for p in bank.mlps[0].parameters())
    info = method.task_info()
    assert info["gate_own_mean"] > 1e-2 and set(info) >= {"gate_basis_input", "gate_old_max"}


# -- end to end --------------------------------------------------------------------------------------------
METHODS = ["inc_lora", "olora", "inflora", "gpm", "gainlora"]


@pytest.fixture(scope="module", params=METHODS)
def finished(request, tmp_path_factory):
    """A 2-task run through loracl.recipes.run.run, with the in-memory model kept for comparison."""
    kept = {}
    original = runner.ContinualRun.finish

    def finish(self, wall_seconds):
        kept["model"] = self.model
        return original(self, wall_seconds)

    out = tmp_path_factory.mktemp("runs") / request.param
    config = load_config(TINY, [*SHORT, f"method.name={request.param}", "train.epochs=2"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.ContinualRun, "finish", finish)
        results = runner.run(config, out)
    return request.param, config, results, out, kept["model"]


def test_results_record_adapter_growth(finished):
    name, config, results, _, _ = finished
    assert results["method"] == name and len(results["matrix"]) == 2
    sizes, counts = results["adapter_bytes"], results["stored_adapters"]
    if name == "gpm":
        assert counts == [1, 1] and sizes[0] == sizes[1]
    else:
        assert counts == [1, 2] and sizes[1] == 2 * sizes[0]
    assert [t["stored_adapters"] for t in results["per_task"]] == counts


def test_gainlora_reports_its_newest_gate_on_its_own_and_on_old_tasks(finished):
    """The gate values come from the runner's evaluations (the `evaluating` hook): after task 2, g_2 on
    task 1's test prompts; after task 1 there is no old task."""
    name, _, results, _, _ = finished
    if name != "gainlora":
        pytest.skip("gainlora only")
    first, second = (t["method_info"] for t in results["per_task"])
    assert first["gate_old_mean"] is None and first["gate_own_mean"] > 0
    assert 0 <= second["gate_old_mean"] <= second["gate_old_max"] <= 1
    assert second["gate_own_mean"] > 0 and second["basis_dims_per_layer"]


def test_exported_adapter_loads_and_reproduces_the_run(finished):
    name, config, results, out, model = finished
    base, tokenizer = tiny_random_llama()
    loaded = load_adapter(out / "adapter", base)
    assert not any(p.requires_grad for p in loaded.parameters())
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    tasks = load_tasks(config)
    prompts = [encoder.prompt_ids(ex.prompt)[0] for ex in tasks[0].test[:3]]
    *_, expected = generation_logits(model, tokenizer, prompts)
    *_, got = generation_logits(loaded, tokenizer, prompts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        *_, plain = generation_logits(model, tokenizer, prompts)
    assert (plain - expected).abs().max() > 1e-4  # the adapters matter, so the comparison means something
    evaluator = Evaluator(tokenizer, encoder, config.eval.batch_size, config.eval.max_new_tokens)
    assert evaluator.evaluate_all(loaded, tasks, "check") == pytest.approx(results["matrix"][-1])


def test_gainlora_cached_generation_equals_teacher_forced_scoring(finished):
    name, config, _, _, model = finished
    if name != "gainlora":
        pytest.skip("gates only")
    torch.manual_seed(0)
    with torch.no_grad():  # large branches so that the gates change the logits visibly
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    _, tokenizer = tiny_random_llama()
    prompts = [list(range(40, 60)), list(range(70, 82))]
    ids, mask, sequences, logits = generation_logits(model, tokenizer, prompts)
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1] :])], dim=1)
    prompt_mask = torch.cat([mask, torch.zeros_like(sequences[:, ids.shape[1] :])], dim=1)
    positions = slice(ids.shape[1] - 1, sequences.shape[1] - 1)
    with torch.no_grad(), model.loracl_gates.prompt_only(prompt_mask):
        forced = model(input_ids=sequences, attention_mask=full_mask).logits[:, positions]
    torch.testing.assert_close(forced, logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # gates pooled over prompt + answer instead: visibly different
        pooled_all = model(input_ids=sequences, attention_mask=full_mask).logits[:, positions]
    assert (pooled_all - logits).abs().max() > 1e-3


@pytest.mark.parametrize("method_name", ["inc_lora", "olora", "inflora", "gainlora"])
def test_finished_tasks_never_require_grad(method_name, tmp_path):
    """Only the current task's branch (and gate) is trainable: a frozen adapter with requires_grad would
    take optimizer steps, and under DDP it would be an unused parameter."""
    config, method, model, (ctx1, ctx2) = setup(method_name, {}, tmp_path)
    learn(config, method, model, ctx1)
    method.before_task(model, ctx2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "task1" in n]
    assert all(".task2." in n or "loracl_gates" in n for n in trainable)
    if method_name == "gainlora":
        bank = method.bank(model)
        assert not any(p.requires_grad for p in [*bank.mlps[0].parameters(), bank.keys[0]])
        assert all(p.requires_grad for p in [*bank.mlps[1].parameters(), bank.keys[1]])


@pytest.mark.parametrize(
    ("method_name", "rise", "updates"),
    [("gpm", {"threshold_step": 0.0}, 2), ("inflora", {"threshold_tasks": 1}, 1)],
)
def test_a_full_input_basis_is_reported_and_warned_about(tmp_path, method_name, rise, updates):
    # At threshold 1 the energy rule keeps every direction the task's inputs span; with enough tokens that
    # is the whole input space, as on a long task sequence where the threshold reaches 1. (GPM's task-1
    # count stops strictly below the threshold, so it takes a second update to add the last direction.)
    opts = {"threshold": 1.0, "max_examples": 8, **rise}
    config, method, model, (ctx1, ctx2) = setup(method_name, opts, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no basis yet: nothing to warn about before task 1
        method.before_task(model, ctx1)
    train_task(model, method, ctx1.encoded, config.train, ctx1.pad_id, seed=1)
    for _ in range(updates):
        method.after_task(model, ctx1)
    info = method.task_info()
    dims = [M.shape[1] for M in method.bases.values()]
    assert info["input_dim"] == method.bases[LAYER0].shape[0]
    assert info["basis_dims_mean"] == pytest.approx(sum(dims) / len(dims), abs=0.05)
    assert info["layers_full"] == sum(k == info["input_dim"] for k in dims) > 0
    with pytest.warns(UserWarning, match=rf"{method_name}, task 2: in \d+ of \d+ layers"):
        method.before_task(model, ctx2)
