"""train.gradient_checkpointing: the same losses and gradients as without it, for a plain LoRA and for the
methods with hooks (InfLoRA's input statistics, GainLoRA's gates), and statistics passes that see each layer
once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from method_helpers import LAYER0, learn, setup

from loracl.config import load_config
from loracl.engine.training import answer_tokens, gradient_checkpointing, step_losses, train_task
from loracl.errors import ConfigError
from loracl.models.multi_lora import layer_map, task_adapter
from loracl.models.subspace import collect_input_grams

CPU = torch.device("cpu")
# method, options, tasks learnt before the step compared (GainLoRA and InfLoRA at task 2: old branches,
# old gates and bases in place)
METHODS = [("seq_lora", {}, 0), ("inflora", {}, 1), ("gainlora", {}, 1), ("gainlora", {"branch": "olora"}, 1)]


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def count_forwards(model: torch.nn.Module) -> tuple[Counter, list]:
    """Calls of every q_proj (the layers' LoRA-adapted input projections) by name."""
    calls: Counter = Counter()
    handles = []
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj"):
            handles.append(module.register_forward_hook(lambda *_, n=name: calls.update([n])))
    return calls, handles


def step_gradients(model, method, examples, pad_id: int, checkpointing: bool):
    """One training step's loss and gradients through the loop's own step path (train mode)."""
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(1)  # LoRA dropout draws the same masks in both passes
    calls, handles = count_forwards(model)
    try:
        with gradient_checkpointing(model, checkpointing):
            assert checkpointing_on(model) == checkpointing
            with step_losses(model, method, examples, answer_tokens(examples), pad_id, CPU) as (loss, extra):
                total = sum(t for t in (loss, extra) if t is not None)
                total.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.eval()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return total.detach(), grads, calls


@pytest.mark.parametrize(("name", "options", "before"), METHODS)
def test_same_loss_and_gradients_with_checkpointing(name, options, before, tmp_path):
    config, method, model, contexts = setup(name, options, tmp_path, ("lora.dropout=0.1",))
    for ctx in contexts[:before]:
        learn(config, method, model, ctx)
    ctx = contexts[before]
    method.before_task(model, ctx)
    with torch.no_grad():  # B starts at 0: give it values, so that A's and the gates' gradients are not 0
        generator = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n and p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    examples = ctx.encoded[:4]
    plain_loss, plain, plain_calls = step_gradients(model, method, examples, ctx.pad_id, False)
    ckpt_loss, ckpt, ckpt_calls = step_gradients(model, method, examples, ctx.pad_id, True)
    assert not checkpointing_on(model)  # off again after the block
    # the layers did run again in the backward pass (and the hooks inside them with them)
    assert ckpt_calls and all(ckpt_calls[n] == 2 * plain_calls[n] for n in plain_calls)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert plain.keys() == ckpt.keys() == trainable  # every trainable weight is reached, layer 0's too
    assert any(LAYER0 in n and "lora_" in n for n in trainable)
    for n in trainable:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-8, msg=n)
    assert all(g.abs().sum() > 0 for g in plain.values())
    if name == "gainlora":  # the newest gate learns through the scaling hooks inside the checkpointed layers
        assert any("loracl_gates" in n for n in trainable)


@pytest.mark.parametrize("name", ["seq_lora", "gainlora"])
def test_train_task_with_checkpointing_trains_the_same_adapters(name, tmp_path):
    """Two tasks through the hooks (GainLoRA: bases and gate bases from statistics passes in between), once
    with train.gradient_checkpointing and once without: the same losses and weights."""
    runs = []
    for flag in ("false", "true"):
        config, method, model, contexts = setup(
            name, {}, tmp_path / flag, (f"train.gradient_checkpointing={flag}",)
        )
        calls, handles = count_forwards(model)
        losses = []
        for ctx in contexts:
            method.before_task(model, ctx)
            stats = train_task(model, method, ctx.encoded, config.train, ctx.pad_id, seed=ctx.index)
            method.after_task(model, ctx)
            losses.append([entry["loss"] for entry in stats.log])
        for handle in handles:
            handle.remove()
        assert not checkpointing_on(model)  # train_task leaves the model as it found it
        state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or "loracl_gates" in k}
        runs.append((losses, state, sum(calls.values())))
    (plain_losses, plain, plain_calls), (ckpt_losses, ckpt, ckpt_calls) = runs
    assert ckpt_calls > plain_calls  # checkpointing was on during training
    assert len(plain_losses[0]) > 1
    torch.testing.assert_close(torch.tensor(ckpt_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-7)
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["inflora", "gainlora"])
def test_input_grams_are_the_same_with_checkpointing_enabled(name, tmp_path):
    """collect_input_grams runs in eval mode under no_grad: with checkpointing enabled on the model (and the
    model left in train mode) every hooked layer is seen once per batch and the Grams are identical."""
    config, method, model, contexts = setup(name, {}, tmp_path)
    learn(config, method, model, contexts[0])
    ctx = contexts[1]
    method.before_task(model, ctx)
    layers = layer_map(model, task_adapter(2))

    def grams(checkpointing: bool) -> tuple[dict[str, torch.Tensor], Counter]:
        calls: Counter = Counter()
        handles = [m.register_forward_hook(lambda *_, n=n: calls.update([n])) for n, m in layers.items()]
        model.train()
        try:
            with gradient_checkpointing(model, checkpointing):
                found = collect_input_grams(
                    model, layers, ctx.batches(), context=lambda b: method.step_context(model, b)
                )
                assert model.training  # left as it was found
        finally:
            for handle in handles:
                handle.remove()
        return found, calls

    plain, plain_calls = grams(False)
    ckpt, ckpt_calls = grams(True)
    batches = len(list(ctx.batches()))
    assert set(plain_calls.values()) == set(ckpt_calls.values()) == {batches}
    assert plain.keys() == ckpt.keys() == layers.keys()
    for key in plain:
        assert torch.equal(ckpt[key], plain[key]), key


def test_checkpointing_is_off_by_default_and_a_bad_value_is_one_line():
    assert load_config(None).train.gradient_checkpointing is False
    assert load_config(None, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing is True
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.gradient_checkpointing=maybe"])
    assert "train.gradient_checkpointing" in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_checkpointing_support_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with gradient_checkpointing(model, False):  # off: nothing asked of the model
        pass
    with pytest.raises(ConfigError, match="does not support it"), gradient_checkpointing(model, True):
        pass
