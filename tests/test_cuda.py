"""The same code on a CUDA device: every method end to end, the SLAO maths on GPU tensors, export and predict.

Skipped on machines without CUDA (CI has none); run `pytest tests/test_cuda.py` on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loracl.config import load_config
from loracl.methods import available_methods
from loracl.methods.slao import interpolate, merge_weight, orthogonal_init
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import LoraPair
from loracl.outputs.deploy import predict, resolve_source
from loracl.outputs.export import export
from loracl.recipes.run import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ON_CUDA = [
    "model.device=cuda",
    "benchmark.tasks=[agnews,yelp]",
    "benchmark.max_train=8",
    "benchmark.max_test=4",
    "train.max_length=64",
]


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_runs_on_cuda(method, tmp_path):
    results = run(load_config(TINY, [*ON_CUDA, f"method.name={method}"]), tmp_path / "run")
    assert results["complete"]
    assert len(results["matrix"]) == 2 and all(len(row) == 2 for row in results["matrix"])
    recorded = json.loads((tmp_path / "run" / "results.json").read_text())
    assert recorded["device"].startswith("cuda")


def test_bf16_slao_run_on_cuda_exports_a_stock_adapter(tmp_path):
    run(load_config(TINY, [*ON_CUDA, "model.dtype=bfloat16"]), tmp_path / "run")
    adapter = export(tmp_path / "run", tmp_path / "adapter")
    base, _ = tiny_random_llama()
    model = PeftModel.from_pretrained(base, str(adapter))  # stock PEFT loads what the GPU run saved
    assert any("lora_A" in name for name, _ in model.named_parameters())
    outputs = predict(resolve_source(tmp_path / "run"), ["Is this text about sport?"], device="cuda")
    assert len(outputs) == 1 and isinstance(outputs[0]["output"], str)


def test_slao_maths_agree_between_cpu_and_cuda():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 32, generator=generator), torch.randn(16, 4, generator=generator)
    previous = {"layer": LoraPair(A, B)}
    finetuned = torch.randn(16, 4, generator=generator)
    on_cpu = orthogonal_init(previous)["layer"]
    on_gpu = orthogonal_init({k: LoraPair(p.A.cuda(), p.B.cuda()) for k, p in previous.items()})["layer"]
    torch.testing.assert_close(on_gpu.A.cpu(), on_cpu.A, atol=1e-5, rtol=1e-5)
    weight = merge_weight(3, "inv_sqrt")
    torch.testing.assert_close(
        interpolate(previous["layer"].B.cuda(), finetuned.cuda(), weight).cpu(),
        interpolate(previous["layer"].B, finetuned, weight),
    )
