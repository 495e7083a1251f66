"""One tiny end-to-end run per baseline of issue 4 through loracl.recipes.run.run, and what each leaves
behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loracl.config import load_config
from loracl.data import Task
from loracl.methods import create_method, method_class
from loracl.methods.context import TaskContext
from loracl.methods.merging_base import MERGED_ADAPTER
from loracl.models.base_model import tiny_random_llama
from loracl.models.lora import LoraPair, get_lora_state, lora_layers, read_adapter_state
from loracl.models.merging import truncate_to_lora
from loracl.recipes.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TASKS = ["agnews", "yelp"]
SMALL = [
    "benchmark.tasks=[agnews,yelp]",
    "benchmark.max_train=8",
    "benchmark.max_test=2",
    "train.max_length=64",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on demand, once per (method, zero-shot evaluation) for the whole module."""
    cache: dict[tuple[str, bool], tuple[dict, Path]] = {}

    def get(method: str, zero_shot: bool = False) -> tuple[dict, Path]:
        if (method, zero_shot) not in cache:
            out = tmp_path_factory.mktemp(method) / "run"
            overrides = [*SMALL, f"method.name={method}", f"eval.zero_shot={str(zero_shot).lower()}"]
            cache[(method, zero_shot)] = (run(load_config(TINY, overrides), out), out)
        return cache[(method, zero_shot)]

    return get


def read_lora(adapter_dir: Path) -> dict[str, LoraPair]:
    """LoRA factors of a saved adapter (keys: the saved module paths)."""
    return read_adapter_state(adapter_dir)


def adapter_scaling(adapter_dir: Path) -> float:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config["lora_alpha"] / config["r"]


def check_common(results: dict, out: Path, method: str) -> None:
    cls = method_class(method)
    assert results["complete"] and results["method"] == method and results["tasks"] == TASKS
    assert results["data_free"] is cls.data_free and results["role"] == cls.role
    assert len(results["matrix"]) == 2 and all(len(row) == 2 for row in results["matrix"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["method_options"] == cls.Options().model_dump(mode="json")
    report = (out / "report.md").read_text()
    assert ("Data-free: yes" in report) is cls.data_free
    assert ("(not data-free)" in report) is (not cls.data_free)
    base, _ = tiny_random_llama()
    PeftModel.from_pretrained(base, str(out / "adapter"))  # stock PEFT loads the exported adapter


@pytest.mark.parametrize("method", ["magmax", "task_arithmetic", "ties"])
def test_merging_run_exports_the_full_rank_merge_of_the_task_vectors(runs, method):
    results, out = runs(method)
    check_common(results, out, method)
    merger = create_method(method, {}, load_config(TINY).lora)
    dirs = [out / "tasks" / f"{i}-{t}" for i, t in enumerate(TASKS, start=1)]
    finetuned = [read_lora(d / "adapter_ft") for d in dirs]
    s = adapter_scaling(dirs[0] / "adapter_ft")
    exported = read_lora(out / "adapter")
    assert adapter_scaling(out / "adapter") == 1.0
    for layer, pair in exported.items():
        deltas = [s * ft[layer].B @ ft[layer].A for ft in finetuned]
        expected = truncate_to_lora(merger.combine(deltas), merger.rank).pair
        torch.testing.assert_close(pair.B @ pair.A, expected.B @ expected.A, atol=1e-6, rtol=1e-4)
        assert pair.A.shape[0] == results["per_task"][-1]["method_info"]["adapter_rank"]
    assert not torch.equal(finetuned[0][layer].B, finetuned[1][layer].B)  # sequential training went on
    info = json.loads((dirs[-1] / "merge_info.json").read_text())
    assert info.keys() == exported.keys()
    energies = [v["energy_kept"] for v in info.values()]
    assert energies == [1.0] * len(energies)  # full rank: nothing cut
    summary = results["per_task"][-1]["method_info"]
    assert summary["tasks_merged"] == 2 and summary["merged_rank"] == "full"
    assert summary["energy_kept_min"] == pytest.approx(min(energies))
    assert results["stored_adapters"] == [1, 1]
    assert "energy_kept_mean" in (out / "report.md").read_text()


def test_merging_method_evaluates_the_merged_adapter_and_trains_the_sequential_one(tmp_path):
    base, _ = tiny_random_llama()
    magmax = create_method("magmax", {"rank": 3}, load_config(TINY).lora)
    model = magmax.prepare_model(base)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    task = Task("t", [], [], [], None, "exact_match", "test")
    ctx = TaskContext(1, task, tmp_path, [], 0, torch.device("cpu"), 2, 0)
    magmax.after_task(model, ctx)
    assert model.active_adapter == MERGED_ADAPTER
    name, layer = next(iter(lora_layers(model)))
    x = torch.randn(5, layer.in_features)
    merged = get_lora_state(model, MERGED_ADAPTER)[name]
    ft = magmax.task_vectors[0][name]
    with torch.no_grad():
        out = layer(x)
        expected = layer.base_layer(x) + x @ (merged.B @ merged.A).T  # scaling 1 in the merged adapter
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        best = truncate_to_lora(0.5 * layer.scaling["default"] * ft.B @ ft.A, 3).pair
        torch.testing.assert_close(merged.B @ merged.A, best.B @ best.A, atol=1e-6, rtol=1e-4)
    magmax.before_task(model, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_ewc_run_records_its_fisher(runs):
    results, out = runs("ewc")
    check_common(results, out, "ewc")
    infos = [t["method_info"] for t in results["per_task"]]
    assert [i["fisher_examples"] for i in infos] == [8, 8]
    assert infos[1]["accumulated_fisher_mean"] == pytest.approx(
        infos[0]["task_fisher_mean"] + infos[1]["task_fisher_mean"], rel=1e-5
    )
    assert results["per_task"][1]["method_state_bytes"] == 2 * results["adapter_bytes"][1]  # F and θ*


@pytest.mark.parametrize("method", ["replay", "agem"])
def test_memory_runs_are_marked_not_data_free_with_their_buffer(runs, method):
    results, out = runs(method)
    check_common(results, out, method)
    assert results["data_free"] is False
    first, second = (t["method_info"] for t in results["per_task"])
    assert first["memory_size"] == second["memory_size"] == 200
    assert first["memory_stored"] == 8 and second["memory_stored"] == 16
    assert second["memory_by_task"] == "agnews: 8, yelp: 8"
    report = (out / "report.md").read_text()
    assert "(not data-free)" in report and "memory_size=200" in report and "memory_stored" in report
    if method == "replay":
        assert first["replayed_examples"] == 0 and second["replayed_examples"] == 2 * 4  # 2 steps x batch 4
    else:
        assert first["optimizer_steps"] == second["optimizer_steps"] == 2
        assert 0 <= second["projected_steps"] <= 2


def test_mtl_trains_once_on_the_union_and_is_labelled_an_upper_bound(runs):
    results, out = runs("mtl", zero_shot=True)
    check_common(results, out, "mtl")
    assert results["role"] == "upper_bound" and results["matrix_rows"] == "final_model"
    assert len(results["per_task"]) == 1 and results["per_task"][0]["train_examples"] == 16
    assert results["per_task"][0]["train_steps"] == 4  # 16 examples, batch 4, one epoch
    assert results["matrix"][0] == results["matrix"][1]
    assert results["metrics"]["AP"] == pytest.approx(sum(results["matrix"][1]) / 2)
    assert results["metrics"]["BWT"] is None and results["metrics"]["FWT"] is None
    assert results["metrics"]["forgetting"] is None
    report = (out / "report.md").read_text()
    assert "upper bound" in report and "(final, joint)" in report
    assert (out / "tasks" / "joint").is_dir()


def test_zero_shot_trains_nothing_and_repeats_the_base_scores(runs):
    results, out = runs("zero_shot", zero_shot=True)
    check_common(results, out, "zero_shot")
    assert results["matrix_rows"] == "unchanged_model" and results["role"] == "reference"
    assert results["matrix"] == [results["zero_shot"], results["zero_shot"]]
    assert all(t["train_steps"] == 0 and t["final_loss"] is None for t in results["per_task"])
    assert results["metrics"]["FWT"] == 0.0 and results["metrics"]["BWT"] == 0.0
    assert all(torch.count_nonzero(p.B) == 0 for p in read_lora(out / "adapter").values())  # the base model
    assert "reference point (no training)" in (out / "report.md").read_text()
