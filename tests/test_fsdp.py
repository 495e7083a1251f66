"""Sharded training (train.parallel: fsdp) for real: 2 CPU processes (gloo) started by `accelerate launch`,
the frozen base's decoder blocks sharded across them (FSDP2), against 1 process with the same global batch,
for seq_lora, slao, inflora and gainlora (ewc, gradient checkpointing and a resumed run: slow). Tolerances as
tests/test_distributed.py: final losses relative 1e-4, adapter entries 1e-5 absolute; accuracy matrices,
metrics and predictions exactly equal.

The overrides make every path that keeps the processes in step run: 13 training examples in batches of 3
(the batch of 1 leaves process 1 an empty share: a padding step of weight 0), 6 test examples in batches of 2
(3 batches: process 1 makes a padding generate call), statistics passes over 13 examples in batches of 3
(5 batches: process 1 gets a padding batch), EWC's one-example Fisher batches likewise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import ADAPTER_ATOL, LOSS_RTOL, TINY, launch_two_processes

from loracl.cli import main
from loracl.config import load_config
from loracl.engine import distributed
from loracl.errors import ConfigError
from loracl.methods import create_method
from loracl.methods.context import TaskContext
from loracl.methods.ewc import squared_gradient_sums
from loracl.methods.slao import SLAO
from loracl.models.base_model import tiny_random_llama, tiny_random_t5
from loracl.models.lora import lora_layers
from loracl.models.subspace import collect_input_grams
from loracl.recipes.run import run

METHODS = ["seq_lora", "slao", "inflora", "gainlora"]
SLOW_METHODS = ["ewc", "slao", "gainlora"]  # ewc; slao and gainlora again with gradient checkpointing
OVERRIDES = ["train.batch_size=3", "eval.batch_size=2", "benchmark.max_train=13", "train.parallel=fsdp"]
CHECKPOINTING = [*OVERRIDES, "train.gradient_checkpointing=true"]


def one_process_runs(root: Path, methods: list[str], overrides: list[str]) -> None:
    for method in methods:
        run(load_config(TINY, [f"method.name={method}", *overrides]), root / method)


def launch(out: Path, methods: list[str], overrides: list[str], **env: str) -> str:
    done = launch_two_processes(out, methods, overrides, RUNS_ONLY="1", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("process group left before exit: True") == 2, done.stdout[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    stdout = launch(root / "two", METHODS, OVERRIDES)
    assert stdout.count("frozen base sharded (FSDP)") == len(METHODS)
    one_process_runs(root / "one", METHODS, OVERRIDES)
    return root / "one", root / "two"


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def flat_numbers(info: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            flat.update(flat_numbers(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def assert_same_run(one_dir: Path, two_dir: Path) -> None:
    one, two = results(one_dir), results(two_dir)
    assert one["distributed"]["processes"] == 1 and two["distributed"]["processes"] == 2
    assert two["distributed"]["parallel"] == "fsdp"
    assert two["distributed"]["replica_max_abs_diff"] <= ADAPTER_ATOL
    assert two["matrix"] == one["matrix"] and two["zero_shot"] == one["zero_shot"]
    assert two["metrics"] == one["metrics"]
    for a, b in zip(one["per_task"], two["per_task"], strict=True):
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=LOSS_RTOL)
        assert (b["train_steps"], b["train_tokens"]) == (a["train_steps"], a["train_tokens"])
        assert b["method_state_bytes"] == a["method_state_bytes"]
        ours, theirs = flat_numbers(a["method_info"]), flat_numbers(b["method_info"])
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():  # basis sizes, gate values (padding passes must not count)
            assert theirs[key] == (value if isinstance(value, int) else pytest.approx(value, abs=2e-4)), key
    files = sorted(one_dir.rglob("*.safetensors"))  # final adapter(s), per-task factors, gates
    assert files
    for file in files:
        ours, theirs = load_file(str(file)), load_file(str(two_dir / file.relative_to(one_dir)))
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert (value - theirs[key]).abs().max() <= ADAPTER_ATOL, (file, key)
    predictions = sorted(one_dir.rglob("predictions.jsonl"))
    assert len(predictions) == len(one["per_task"])
    for file in predictions:  # generated under synced steps and padding calls: the same answers
        assert (two_dir / file.relative_to(one_dir)).read_text() == file.read_text()


@pytest.mark.parametrize("method", METHODS)
def test_sharded_runs_match_one_process(runs, method):
    assert_same_run(runs[0] / method, runs[1] / method)


def test_exported_adapters_are_stock_peft(runs):
    """The exported adapter of a sharded run loads into a plain model with PEFT: whole tensors, not shards."""
    from peft import PeftModel

    base, _ = tiny_random_llama()
    model = PeftModel.from_pretrained(base, str(runs[1] / "slao" / "adapter"))
    saved = load_file(str(runs[1] / "slao" / "adapter" / "adapter_model.safetensors"))
    layers = dict(lora_layers(model))
    assert len(layers) == 4  # q and v of 2 layers
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)["default"].weight
            assert torch.equal(weight, saved[f"{name}.{part}.weight"])
            whole = layer.in_features if part == "lora_A" else layer.out_features
            assert weight.shape[1 if part == "lora_A" else 0] == whole


def test_each_process_holds_half_of_the_blocks(runs):
    """Per process: the embeddings (tied head), the LoRA factors and the final norm's shard stay as they are,
    each frozen block weight is split in two along its first dimension."""
    one, two = (results(folder / "slao")["distributed"]["parameter_bytes"] for folder in runs)
    base, _ = tiny_random_llama()
    model = create_method("slao", {}, load_config(TINY).lora).prepare_model(base)
    decoder = base.get_decoder()
    embed = set(base.get_input_embeddings().parameters())
    sharded = [
        p for name, p in decoder.named_parameters() if p not in embed and "lora_" not in name
    ]  # every block weight and the final norm
    full = sum(p.numel() * p.element_size() for p in sharded)
    half = sum(math.ceil(p.shape[0] / 2) * (p.numel() // p.shape[0]) * p.element_size() for p in sharded)
    assert one == sum(p.numel() * p.element_size() for p in model.parameters())
    assert two == one - full + half
    assert two < 0.7 * one  # the tiny model's embeddings are a fifth of its weights


def test_only_the_main_process_wrote(runs):
    one, two = (sorted(str(p.relative_to(r)) for p in r.rglob("*")) for r in runs)
    assert one == two


@pytest.mark.slow
def test_ewc_and_gradient_checkpointing_under_fsdp(tmp_path):
    """EWC's Fisher (a backward per example, with a padding example), and gradient checkpointing (blocks
    gathered again when their forward is recomputed in the backward; GainLoRA's gate hooks run again)."""
    launch(tmp_path / "two", ["ewc"], OVERRIDES)
    one_process_runs(tmp_path / "one", ["ewc"], OVERRIDES)
    assert_same_run(tmp_path / "one" / "ewc", tmp_path / "two" / "ewc")
    launch(tmp_path / "two-gc", SLOW_METHODS[1:], CHECKPOINTING)
    one_process_runs(tmp_path / "one-gc", SLOW_METHODS[1:], CHECKPOINTING)
    for method in SLOW_METHODS[1:]:
        assert_same_run(tmp_path / "one-gc" / method, tmp_path / "two-gc" / method)


@pytest.mark.slow
def test_a_sharded_run_resumes(tmp_path):
    """Stopped by a failed write after task 1, the sharded run resumes from its (whole-tensor) checkpoint
    into a freshly sharded model and ends as one process does."""
    done = launch_two_processes(tmp_path / "two", ["inflora"], OVERRIDES, RUNS_ONLY="1", FULL_DISK_AT="2")
    assert done.returncode != 0 and "checkpoint after task 1 is intact" in done.stdout + done.stderr
    launch(tmp_path / "two", ["inflora"], OVERRIDES, RESUME="1")
    one_process_runs(tmp_path / "one", ["inflora"], OVERRIDES)
    assert results(tmp_path / "two" / "inflora")["resumed_after"] == [1]
    assert_same_run(tmp_path / "one" / "inflora", tmp_path / "two" / "inflora")


# -- in one process: refusals, and what padding passes must (not) do ---------------------------------------


def test_an_unknown_parallel_mode_is_refused(tmp_path, capsys):
    assert main(["run", str(TINY), "--set", "train.parallel=zero3", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.parallel" in err and "'data' or 'fsdp'" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=tiny-random-t5"], "is an encoder-decoder"),
        (["model.quantization=4bit"], "cannot shard a quantised base"),
    ],
)
def test_bases_fsdp_cannot_shard_are_refused_in_one_line(overrides, message, tmp_path, capsys):
    sets = [arg for item in ["train.parallel=fsdp", *overrides] for arg in ("--set", item)]
    assert main(["run", str(TINY), *sets, "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "train.parallel: data" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_method_that_cannot_shard_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SLAO, "fsdp_obstacle", "it reads the base weights")
    out = tmp_path / "r"
    assert main(["run", str(TINY), "--set", "train.parallel=fsdp", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "method 'slao' cannot run on a sharded base (it reads the base weights)" in err
    assert err.count("\n") == 1 and not out.exists()
    monkeypatch.setattr(SLAO, "fsdp_obstacle", None)


def test_the_checks_of_shardable_bases():
    llama, _ = tiny_random_llama()
    distributed.check_shardable(llama)  # decoder blocks found: LlamaDecoderLayer
    t5, _ = tiny_random_t5()
    with pytest.raises(ConfigError, match="encoder-decoder"):
        distributed.check_shardable(t5)
    llama._no_split_modules = []
    with pytest.raises(ConfigError, match="cannot find the decoder blocks"):
        distributed.check_shardable(llama)


def as_process(monkeypatch, rank: int, world: int = 2) -> None:
    """Make this process look like process `rank` of `world` (no exchange is made by what is tested)."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


@pytest.mark.parametrize(
    ("items", "rank", "expected"), [(5, 0, 0), (5, 1, 1), (4, 1, 0), (1, 1, 1), (0, 1, 0)]
)
def test_padding_count(monkeypatch, items, rank, expected):
    as_process(monkeypatch, rank)
    assert distributed.padding_count(items) == expected
    assert len(distributed.shard(range(items))) + expected == math.ceil(items / 2)


def contexts(lockstep: bool) -> tuple[TaskContext, object]:
    config = load_config(TINY)
    base, tokenizer = tiny_random_llama()
    from loracl.data import load_tasks
    from loracl.data.text import PromptEncoder

    task = load_tasks(config)[0]
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    encoded = [encoder.encode(ex) for ex in task.train[:5]]
    pad, cpu = tokenizer.pad_token_id, torch.device("cpu")
    ctx = TaskContext(1, task, Path("."), encoded, pad, cpu, batch_size=2, seed=0, lockstep=lockstep)
    return ctx, base


def test_task_batches_pad_a_smaller_share(monkeypatch):
    """5 examples in batches of 2 are 3 batches: process 1 gets one, plus a padding batch (one example,
    flagged while it is processed) when the model is sharded; process 0 gets two and no padding."""
    ctx, _ = contexts(lockstep=True)
    as_process(monkeypatch, 1)
    seen = [(batch["input_ids"].shape[0], distributed.padding_pass()) for batch in ctx.batches()]
    assert seen == [(2, False), (1, True)] and not distributed.padding_pass()
    as_process(monkeypatch, 0)
    assert [distributed.padding_pass() for _ in ctx.batches()] == [False, False]
    ctx.lockstep = False
    as_process(monkeypatch, 1)
    assert [distributed.padding_pass() for _ in ctx.batches()] == [False]


def test_padding_batches_count_for_nothing(monkeypatch):
    """Input Grams and EWC's squared gradients over a process's share are the same with a padding batch."""
    ctx, base = contexts(lockstep=True)
    method = create_method("ewc", {}, load_config(TINY).lora)
    model = method.prepare_model(base).eval()  # no dropout: the two passes must draw alike
    layers = dict(lora_layers(model))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    as_process(monkeypatch, 1)
    padded_grams = collect_input_grams(model, layers, ctx.batches())
    padded_fisher, padded_count = squared_gradient_sums(model, params, ctx.batches(batch_size=2))
    ctx.lockstep = False
    grams = collect_input_grams(model, layers, ctx.batches())
    fisher, count = squared_gradient_sums(model, params, ctx.batches(batch_size=2))
    assert (padded_count, count) == (1, 1)
    for name in grams:
        torch.testing.assert_close(padded_grams[name], grams[name], rtol=0, atol=0)
    for name in fisher:
        torch.testing.assert_close(padded_fisher[name], fisher[name], rtol=0, atol=0)


# -- the README's memory formulas, against measurements ------------------------------------------------------


def saved_activation_bytes(hidden: int, mlp: int, heads: int, layers: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward of one training step (a 64-token sequence, 8 answer tokens) of a
    random bfloat16 Llama with LoRA r 8 on q and v, parameters left out (saved-tensor hooks, by storage)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loracl.config import LoraSection
    from loracl.engine.training import answer_loss, gradient_checkpointing
    from loracl.models.lora import attach_lora

    config = LlamaConfig(
        vocab_size=300, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = attach_lora(LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16), LoraSection())
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(3, 300, (1, 64))
    labels = torch.where(torch.arange(64) < 56, -100, ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with gradient_checkpointing(model, checkpointing), hooks:
        answer_loss(model, batch).backward()
    return sum(saved.values())


@pytest.mark.parametrize(("hidden", "mlp", "heads"), [(64, 172, 2), (128, 344, 4)])
def test_activation_bytes_per_layer_and_token(hidden, mlp, heads):
    """README: a layer keeps 24 h + 6 f + 4 n + 72 bytes per token for the backward of a bfloat16 base with
    LoRA on q and v (float32 norm and LoRA inputs; q, k, v, attention output; the MLP's gate, SiLU and up
    outputs; per head the attention's log-sum-exp), 2 h with gradient checkpointing (the layer's input)."""
    for checkpointing, expected in ((False, 24 * hidden + 6 * mlp + 4 * heads + 72), (True, 2 * hidden)):
        one, two = (saved_activation_bytes(hidden, mlp, heads, n, checkpointing) for n in (1, 2))
        assert (two - one) / 64 == expected
