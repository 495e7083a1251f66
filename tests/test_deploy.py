"""`loracl export / eval / predict` on tiny runs: reloaded models (PEFT, or transformers alone after --merge)
predict exactly what the in-memory final model of the run predicts; clear one-line refusals."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loracl.cli import main
from loracl.config import load_config
from loracl.models.base_model import tiny_random_llama
from loracl.recipes.run import prepare_run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PROMPTS = ["Title: Ajax. Content: a Dutch football club. Topic? Answer:", "Is this review good? Answer:"]


def finished_run(tmp_path_factory, method: str):
    """A tiny run, finished, with its final model still in memory."""
    out = tmp_path_factory.mktemp(method) / "run"
    config = load_config(TINY, [f"method.name={method}"])
    cl = prepare_run(config, out)
    cl.run_all(time.perf_counter())
    return cl


@pytest.fixture(scope="module")
def slao(tmp_path_factory):
    return finished_run(tmp_path_factory, "slao")


@pytest.fixture(scope="module")
def inc_lora(tmp_path_factory):
    return finished_run(tmp_path_factory, "inc_lora")


def prompt_batch(cl) -> dict[str, torch.Tensor]:
    ids = [cl.encoder.prompt_ids(p)[0] for p in PROMPTS]
    width = max(len(i) for i in ids)
    pad = cl.loaded.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return {"input_ids": input_ids, "attention_mask": mask}


def generations(cl, model) -> list[str]:
    ids = [cl.encoder.prompt_ids(p, reserve=8)[0] for p in PROMPTS]
    return cl.evaluator.generate(model, ids, 8)


@torch.no_grad()
def assert_same_model(cl, reloaded: torch.nn.Module) -> None:
    """Same logits (float32 rounding apart) and the same greedy generations as the run's final model."""
    batch = prompt_batch(cl)
    expected = cl.model(**batch).logits
    torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    assert generations(cl, reloaded) == generations(cl, cl.model)


def test_export_writes_the_stock_peft_adapter(slao, tmp_path):
    target = tmp_path / "adapter"
    assert main(["export", str(slao.run_dir), "--to", str(target)]) == 0
    assert sorted(p.name for p in target.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loracl_export.json",  # the export marker: PEFT, transformers and vLLM ignore unknown files
    ]
    base, _ = tiny_random_llama()
    assert_same_model(slao, PeftModel.from_pretrained(base, str(target)).eval())


@pytest.mark.parametrize("fixture", ["slao", "inc_lora"])
def test_merged_export_loads_with_transformers_alone(fixture, request, tmp_path):
    cl = request.getfixturevalue(fixture)
    target = tmp_path / "merged"
    assert main(["export", str(cl.run_dir), "--to", str(target), "--merge"]) == 0
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert_same_model(cl, merged)  # inc_lora: every task's LoRA summed into the weights


def test_eval_on_a_run_reproduces_its_last_row(slao, tmp_path):
    output = tmp_path / "eval.json"
    assert main(["eval", str(slao.run_dir), "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    results = json.loads((slao.run_dir / "results.json").read_text())
    assert saved["tasks"] == results["tasks"] and saved["method"] == "slao"
    assert saved["scores"] == results["matrix"][-1]
    for task in slao.tasks:
        assert saved["predictions"][task.name] == slao.evaluator.evaluate(slao.model, task).predictions


def test_eval_of_an_adapter_folder_on_other_tasks(slao, tmp_path):
    output = tmp_path / "other.json"
    args = ["eval", str(slao.run_dir / "adapter"), "--tasks", "yahoo,dbpedia", "--max-test", "3"]
    assert main([*args, "--set", "train.max_length=256", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert saved["model"] == "tiny-random-llama"  # the base recorded in adapter_config.json
    assert saved["tasks"] == ["yahoo", "dbpedia"] and saved["test_examples"] == [3, 3]
    assert saved["average"] == pytest.approx(sum(saved["scores"]) / 2)


def test_predict_prints_one_json_line_per_prompt(slao, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[1]}) + "\n\n" + json.dumps(PROMPTS[0]) + "\n")
    code = main(["predict", str(slao.run_dir), PROMPTS[0], "--file", str(prompts), "--max-new-tokens", "8"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    expected = dict(zip(PROMPTS, generations(slao, slao.model), strict=True))
    assert all(line["output"] == expected[line["prompt"]] for line in lines)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_refusals_are_one_line(slao, tmp_path, capsys):
    missing = ["export", str(tmp_path / "nope"), "--to", "x"]
    assert "neither a run directory" in one_line_error(capsys, missing)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("keep me")
    assert "not empty" in one_line_error(capsys, ["export", str(slao.run_dir), "--to", str(busy)])
    assert (busy / "file").read_text() == "keep me"
    assert "give a prompt" in one_line_error(capsys, ["predict", str(slao.run_dir)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert "bad.jsonl:1" in one_line_error(capsys, ["predict", str(slao.run_dir), "--file", str(bad)])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(slao.run_dir / "config.yaml", unfinished / "config.yaml")
    assert "no final adapter" in one_line_error(capsys, ["eval", str(unfinished)])


def test_merged_export_keeps_the_dtype_the_run_trained_in(slao, tmp_path):
    """`dtype: auto` resolves to float32 on the CPU where export merges; a run whose base weights were
    bfloat16 (auto on a GPU) must come out in bfloat16 all the same."""
    results = json.loads((slao.run_dir / "results.json").read_text())
    assert results["base_dtype"] == "float32"
    run = Path(shutil.copytree(slao.run_dir, tmp_path / "run"))  # made into a bf16 run with `dtype: auto`
    config = (run / "config.yaml").read_text()
    assert "dtype: float32" in config
    (run / "config.yaml").write_text(config.replace("dtype: float32", "dtype: auto"))
    (run / "results.json").write_text(json.dumps({**results, "base_dtype": "bfloat16"}))
    assert main(["export", str(run), "--to", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_merge_refused_for_input_dependent_gates(slao, tmp_path, capsys):
    """GainLoRA's gates depend on the input: no single weight matrix equals its model."""
    fake = tmp_path / "gainlora-run"
    shutil.copytree(slao.run_dir, fake)
    results = json.loads((fake / "results.json").read_text())
    (fake / "results.json").write_text(json.dumps({**results, "method": "gainlora"}))
    err = one_line_error(capsys, ["export", str(fake), "--to", str(tmp_path / "out"), "--merge"])
    assert "gainlora adapters cannot be merged" in err and "gate" in err
    assert not (tmp_path / "out").exists()
