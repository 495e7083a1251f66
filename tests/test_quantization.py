"""A quantised base (`model.quantization`: QLoRA's 4-bit NF4, LLM.int8's 8-bit) through bitsandbytes.

Without bitsandbytes (CI need not have the `quantization` extra), the config and the refusals are tested
and the rest is skipped; with it, its CPU backend (bitsandbytes >= 0.46) trains the tiny Llama here.

  config: 4bit / 8bit / null, bad values one line, left out of dumps at null ... test_config_*
  missing package, no backend for the device: one line, before any weight ..... test_refused_*
  quantised tiny models: bitsandbytes layers, frozen base, float32 LoRA ....... test_quantised_tiny_models
  seq_lora and slao (QR init, merge) train on a 4-bit / 8-bit tiny Llama ....... test_methods_train_*
  gradients reach the lower layers' LoRA after an evaluation (CPU repacking) ... test_lora_gradients_*
  export --merge de-quantises, then merges: the run's model in plain weights ... test_merge_*
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from method_helpers import LAYER0, learn, setup
from safety import one_line

from loracl.cli import main
from loracl.config import dump_config, load_config
from loracl.errors import ConfigError, ModelError
from loracl.models import base_model
from loracl.models.base_model import check_quantization, load_model, quantization_of
from loracl.models.lora import get_lora_state
from loracl.outputs.export import export
from loracl.outputs.loading import load_adapter

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CPU = torch.device("cpu")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (the `quantization` extra)")


def bnb_runs_on_cpu(mode: str) -> bool:
    try:
        check_quantization(mode, CPU)
    except ModelError:
        return False
    return True


def needs_cpu_backend(mode: str):
    if not HAS_BNB:
        return needs_bnb
    return pytest.mark.skipif(not bnb_runs_on_cpu(mode), reason=f"bitsandbytes cannot run {mode} on this CPU")


# -- config -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected", [("4bit", "4bit"), ("8bit", "8bit"), ("null", None), ("none", None)]
)
def test_config_accepts_the_modes(value, expected) -> None:
    assert load_config(None, [f"model.quantization={value}"]).model.quantization == expected


@pytest.mark.parametrize("value", ["3bit", "4", "nf4", "[4bit]"])
def test_config_refuses_other_values_in_one_line(value) -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization: Input should be '4bit' or '8bit'") as err:
        load_config(None, [f"model.quantization={value}"])
    assert "\n" not in str(err.value)


def test_config_leaves_quantization_out_of_dumps_at_its_default() -> None:
    """config.yaml, checkpoint hashes and zero-shot cache keys of older runs (which lack the key) hold."""
    plain = load_config(TINY)
    assert "quantization" not in plain.model.model_dump(mode="json")
    assert "quantization" not in dump_config(plain)
    quantised = load_config(TINY, ["model.quantization=4bit"])
    assert quantised.model.model_dump(mode="json")["quantization"] == "4bit"
    again = [f"model.{key}={json.dumps(value)}" for key, value in quantised.model.model_dump().items()]
    assert load_config(None, again).model.quantization == "4bit"


# -- refusals ---------------------------------------------------------------------------------------------
def test_refused_without_bitsandbytes_before_any_weight(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    monkeypatch.setitem(base_model.TINY_MODELS, "tiny-random-llama", pytest.fail)  # nothing may be built
    with pytest.raises(ModelError) as err:
        load_model("tiny-random-llama", device="cpu", quantization="4bit")
    assert str(err.value) == (
        "model.quantization: 4bit needs the package bitsandbytes: pip install 'loracl[quantization]'"
    )


@needs_bnb
def test_refused_where_bitsandbytes_has_no_backend(monkeypatch) -> None:
    def no_backend(*_args) -> None:
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nmore detail")

    monkeypatch.setattr(base_model, "_probe", no_backend)
    monkeypatch.setattr(base_model, "_from_pretrained", pytest.fail)
    with pytest.raises(ModelError) as err:
        load_model(str(ROOT / "no-such-model"), device="cpu", quantization="8bit")
    message = str(err.value)
    assert message.startswith("model.quantization: bitsandbytes ")
    assert "cannot run 8bit on cpu here" in message
    assert "CUDA Setup failed" in message and "\n" not in message


def test_refused_unknown_mode() -> None:
    with pytest.raises(ModelError, match="unknown mode '2bit'"):
        check_quantization("2bit", CPU)
    check_quantization(None, CPU)  # no quantisation: nothing to check, bitsandbytes or not


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny seq_lora run whose config asks for a 4-bit base (one task, a second)."""
    out = tmp_path_factory.mktemp("quantised") / "run"
    sets = [
        "model.quantization=4bit", "method.name=seq_lora", "benchmark.tasks=[agnews]", "eval.zero_shot=false",
        "benchmark.max_train=4", "benchmark.max_test=2", "train.max_length=64", "train.lr=1e-2",
    ]
    if not HAS_BNB or not run_quantises():
        sets[0] = "model.quantization=null"  # the run itself needs no bitsandbytes...
    assert main(["run", str(TINY), *(a for s in sets for a in ("--set", s)), "--output", str(out)]) == 0
    config = out / "config.yaml"
    # ...its config records the 4-bit base, which is what `export --merge` reads
    text = config.read_text()
    if "quantization: 4bit" not in text:
        config.write_text(text.replace("chat_template: false", "chat_template: false\n  quantization: 4bit"))
    assert load_config(config).model.quantization == "4bit"
    return out


def test_refused_merge_without_bitsandbytes(tiny_run, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    target = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--to", str(target), "--merge"]) == 2
    assert one_line(capsys) == (
        "error: model.quantization: 4bit needs the package bitsandbytes: pip install 'loracl[quantization]'"
    )
    assert not target.exists()
    assert main(["export", str(tiny_run), "--to", str(target)]) == 0  # the adapter alone needs nothing
    assert (target / "adapter_model.safetensors").is_file()


# -- with bitsandbytes ------------------------------------------------------------------------------------
@needs_cpu_backend("4bit")
@pytest.mark.parametrize("mode, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-t5"])
def test_quantised_tiny_models(name, mode, layer_type) -> None:
    if not bnb_runs_on_cpu(mode):
        pytest.skip(f"bitsandbytes cannot run {mode} on this CPU")
    loaded = load_model(name, device="cpu", dtype="float32", quantization=mode)
    assert quantization_of(loaded.model) == mode
    assert layer_type in {type(m).__name__ for m in loaded.model.modules()}
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.name_or_path == name


def quantised_setup(mode: str, method: str, tmp_path: Path, monkeypatch):
    """method_helpers.setup (two tiny tasks) on the quantised tiny Llama."""

    def quantised_llama():
        loaded = load_model("tiny-random-llama", device="cpu", quantization=mode)
        return loaded.model, loaded.tokenizer

    monkeypatch.setattr(sys.modules[setup.__module__], "tiny_random_llama", quantised_llama)
    return setup(method, {}, tmp_path)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
@pytest.mark.parametrize("method", ["seq_lora", "slao"])
def test_methods_train_on_a_quantised_tiny_llama(mode, method, tmp_path, monkeypatch) -> None:
    """One task for seq_lora; two for slao, whose second task starts from the QR of A and ends with the
    merge of B, in float32 on the LoRA tensors whatever the base computes in (bfloat16 here)."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes not installed (the `quantization` extra)")
    if not bnb_runs_on_cpu(mode):
        pytest.skip(f"bitsandbytes cannot run {mode} on this CPU")
    config, cl_method, model, contexts = quantised_setup(mode, method, tmp_path, monkeypatch)
    assert quantization_of(model) == mode
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    before = get_lora_state(model)
    for ctx in contexts[: 2 if method == "slao" else 1]:
        learn(config, cl_method, model, ctx)
    after = get_lora_state(model)
    assert all(torch.isfinite(p.A).all() and torch.isfinite(p.B).all() for p in after.values())
    assert any(not torch.equal(after[k].B, before[k].B) for k in after)  # B starts at 0 and was trained
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    if method == "slao":
        A = cl_method.finetuned[LAYER0].A  # task 2 started from the orthonormal rows of task 1's A
        assert A.dtype == torch.float32
        assert (tmp_path / "2" / "adapter_merged" / "adapter_model.safetensors").is_file()


@needs_cpu_backend("4bit")
def test_lora_gradients_reach_the_lower_layers_after_an_evaluation(tmp_path, monkeypatch) -> None:
    """bitsandbytes' CPU kernel for 4-bit evaluation has no backward; the loader keeps it off, so training
    after an evaluation pass gives the first layer's LoRA the same gradient as without the pass."""

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        config, method, model, contexts = quantised_setup("4bit", "seq_lora", tmp_path, monkeypatch)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        ids = torch.tensor([contexts[0].encoded[0].input_ids[:24]])
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_A" in n and p.grad is not None}

    plain, after_eval = gradients(False), gradients(True)
    first = f"{LAYER0}.lora_A.default.weight"
    assert first in after_eval and float(after_eval[first].abs().max()) > 0
    for name, grad in plain.items():
        torch.testing.assert_close(after_eval[name], grad)


@needs_cpu_backend("4bit")
def test_merge_dequantises_the_base_then_merges(tiny_run, tmp_path) -> None:
    """`export --merge` of a 4-bit run: plain float32 weights (model.dtype of configs/tiny.yaml) whose
    logits are those of the quantised base with the adapter, as the run evaluated it."""
    from transformers import AutoModelForCausalLM

    target = export(tiny_run, tmp_path / "merged", merge=True)
    saved = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in saved
    merged = AutoModelForCausalLM.from_pretrained(str(target))
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    quantised = load_model("tiny-random-llama", dtype="float32", device="cpu", quantization="4bit")
    reference = load_adapter(tiny_run / "adapter", quantised.model)
    ids = torch.tensor([[5, 40, 77, 91, 120, 33, 8, 64]])
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        bare = load_model("tiny-random-llama", dtype="float32", device="cpu", quantization="4bit").model
        base_logits = bare(input_ids=ids).logits
    assert float((expected - base_logits).abs().max()) > 1e-3  # the adapter changes the output...
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # ...and the merge keeps that change


def run_quantises() -> bool:
    """Whether `loracl run` passes model.quantization to the loader (recipes/run.py)."""
    from loracl.recipes import run

    return "quantization=" in inspect.getsource(run.prepare_run)


@needs_cpu_backend("4bit")
@pytest.mark.skipif(not run_quantises(), reason="recipes/run.py does not pass model.quantization yet")
def test_a_run_on_a_4bit_base_records_it(tiny_run) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    assert results["complete"] and results["config"]["model"]["quantization"] == "4bit"
