"""`loracl run --init-adapter DIR` (lora.init_adapter) on the tiny random Llama and three tiny jsonl tasks.

(a) A run of [t1, t2] from the adapter a run of [t0] alone exported is the run of [t0, t1, t2] less its first
row and column: the same final adapter tensors, training losses, predictions and scores, for every kind of
adoption (one LoRA, SLAO's merge, a frozen LoRA per task, a task vector of a merge).
(b) Every mismatch (rank, alpha, targets, base model, not a LoRA folder, a method that cannot) is refused in
one line with exit status 2, before the run directory is created or changed.
(c) An init-adapter run stopped mid-task resumes to the same end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_data import make_jsonl_task

from loracl.cli import main
from loracl.config import load_config
from loracl.methods import available_methods
from loracl.recipes import run as runner
from loracl.recipes.run import result_relevant_config, run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TASKS = ["t0", "t1", "t2"]
# Six training steps per task (8 examples, batch 4, 3 epochs) at a high rate: enough for each task to change
# the adapters and what the model generates.
SMALL = [
    "benchmark.name=jsonl",
    "benchmark.max_test=2",
    "eval.zero_shot=false",
    "eval.max_new_tokens=4",
    "train.max_length=64",
    "train.lr=3e-2",
    "train.epochs=3",
]
# Where a run of [t0] alone leaves the LoRA that task 0 trained, per method: its exported adapter/, the
# task's adapter in a multi-adapter folder, or (merging: adapter/ holds the merged delta, of another rank)
# the sequential LoRA of tasks/1-t0/.
TRAINED_LORA = {
    "seq_lora": "adapter",
    "slao": "adapter",
    "olora": "adapter/task1",
    "magmax": "tasks/1-t0/adapter_ft",
}
CAN_ADOPT = {"seq_lora", "slao", "inc_lora", "olora", "magmax", "task_arithmetic", "ties"}


class Runs:
    """Finished runs on the same three tasks, made on first use and shared by the tests of the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        for name in TASKS:
            make_jsonl_task(self.data, name, n_train=8)
        self.made: dict[str, Path] = {}

    def overrides(self, method: str, tasks: list[str]) -> list[str]:
        return [*SMALL, f"benchmark.data_dir={self.data}", f"benchmark.tasks=[{','.join(tasks)}]",
                f"method.name={method}"]  # fmt: skip

    def args(self, method: str, tasks: list[str], out: Path, *extra: str) -> list[str]:
        sets = [arg for item in self.overrides(method, tasks) for arg in ("--set", item)]
        return ["run", str(TINY), *sets, "--output", str(out), *extra]

    def get(self, method: str, kind: str) -> Path:
        """kind "first": [t0]; "full": [t0, t1, t2]; "adopted": [t1, t2] from the first run's LoRA (CLI)."""
        key = f"{method}-{kind}"
        if key not in self.made:
            out = self.root / key
            if kind == "adopted":
                assert main(self.args(method, TASKS[1:], out, "--init-adapter", str(self.init(method)))) == 0
            else:
                run(load_config(TINY, self.overrides(method, TASKS if kind == "full" else TASKS[:1])), out)
            self.made[key] = out
        return self.made[key]

    def init(self, method: str) -> Path:
        return self.get(method, "first") / TRAINED_LORA[method]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("init_adapter"))


def results_of(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] is True
    return results


def adapter_tensors(run_dir: Path, folder: str = "adapter") -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file under run_dir/folder (the final adapter; or a task's folder: its method's
    adapters after that task)."""
    root = run_dir / folder
    return {str(f.relative_to(root)): load_file(str(f)) for f in sorted(root.rglob("*.safetensors"))}


def predictions(run_dir: Path, index: int, task: str) -> list[dict]:
    """The evaluation after task `index` (as the run numbers it) on the tasks t1 and t2."""
    path = run_dir / "tasks" / f"{index}-{task}" / "predictions.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["task"] != "t0"]


def assert_same_tensors(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]], some: bool = True
) -> None:
    assert a.keys() == b.keys() and (a or not some)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


# -- (a) equivalence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(TRAINED_LORA))
def test_starting_from_task_0s_adapter_is_the_longer_run(runs: Runs, method: str) -> None:
    """The runner numbers the run's first task as the method's task 2 and seeds it so (tasks_before): were it
    task 1, SLAO would not merge with λ(2), IncLoRA/O-LoRA would overwrite task1, and every per-task seed
    (data order, new LoRA inits) would differ; each of these breaks an equality below."""
    full, adopted = runs.get(method, "full"), runs.get(method, "adopted")
    long, short = results_of(full), results_of(adopted)
    assert short["tasks"] == ["t1", "t2"] and len(short["matrix"]) == 2  # task 0 is not evaluated
    assert short["matrix"] == [row[1:] for row in long["matrix"][1:]]
    keys = ("train_steps", "train_tokens", "final_loss", "method_info")
    assert [{k: p[k] for k in keys} for p in short["per_task"]] == [
        {k: p[k] for k in keys} for p in long["per_task"][1:]
    ]
    for index, task in enumerate(TASKS[1:], start=1):  # after each task: its predictions, its adapters
        assert predictions(adopted, index, task) == predictions(full, index + 1, task)
        here, there = f"tasks/{index}-{task}", f"tasks/{index + 1}-{task}"
        assert_same_tensors(adapter_tensors(adopted, here), adapter_tensors(full, there), some=False)
    assert_same_tensors(adapter_tensors(full), adapter_tensors(adopted))
    weights = runs.init(method) / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert short["init_adapter"] == {"folder": str(runs.init(method)), "sha256": digest}
    assert long["init_adapter"] is None
    assert load_config(adopted / "config.yaml").lora.init_adapter == str(runs.init(method))
    assert f"Started from the adapter `{runs.init(method)}`" in (adopted / "report.md").read_text()


def test_the_methods_that_adopt_an_adapter() -> None:
    """Only methods whose state after a task is its weights adopt one; the others say why they cannot."""
    methods = available_methods()
    assert {name for name, cls in methods.items() if cls.init_adapter_obstacle is None} >= CAN_ADOPT
    for name in ("gpm", "inflora", "gainlora", "ewc", "replay", "agem", "mtl", "zero_shot"):
        assert methods[name].init_adapter_obstacle, name


def test_the_config_hash_of_runs_without_it_is_unchanged(runs: Runs) -> None:
    """Unset, lora.init_adapter is left out of what a checkpoint's hash covers (older checkpoints resume);
    set, it is in it (another adapter is another run)."""
    plain = load_config(TINY)
    assert "init_adapter" not in result_relevant_config(plain)
    given = load_config(TINY, ["lora.init_adapter=/some/adapter"])
    assert "/some/adapter" in result_relevant_config(given)


# -- (b) refusals --------------------------------------------------------------------------------------------


def edited_copy(source: Path, target: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of an adapter folder with some adapter_config.json keys replaced and/or its tensors edited."""
    shutil.copytree(source, target)
    if config:
        path = target / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        weights = target / "adapter_model.safetensors"
        save_file(tensors(load_file(str(weights))), str(weights))
    return target


def narrower_first_a(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(k for k in weights if k.endswith("lora_A.weight"))[0]
    return {**weights, key: weights[key][:, :32].contiguous()}


def with_stray_tensor(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**weights, "base_model.model.lm_head.weight": torch.zeros(2, 2)}


def multi_adapter_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target / "task1")
    manifest = {"format": "loracl-multi-lora", "version": 1, "method": "inc_lora", "adapters": ["task1"]}
    (target / "loracl_adapter.json").write_text(json.dumps(manifest))
    return target


def config_edit(**keys):
    return lambda source, target: edited_copy(source, target, keys)


def tensor_edit(edit):
    return lambda source, target: edited_copy(source, target, tensors=edit)


def empty_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    return target


REFUSALS = {
    # case: (--set overrides, how the adapter given is made from seq_lora's t0 LoRA, words of the message)
    "rank": (["lora.r=2"], None, ["LoRA rank 4", "lora.r is 2"]),
    "alpha": (["lora.alpha=4"], None, ["lora_alpha 8.0", "lora.alpha is 4"]),
    "targets": (["lora.target_modules=[q_proj,k_proj]"], None, ["lora.target_modules", "no LoRA on"]),
    "base model": (["model.name=tiny-random-t5"], None, ["made for base model 'tiny-random-llama'"]),
    "recorded base": ([], config_edit(base_model_name_or_path="org/other"), ["base model 'org/other'"]),
    "not LoRA": ([], config_edit(peft_type="IA3"), ["not a LoRA adapter", "IA3"]),
    "variant": ([], config_edit(use_rslora=True), ["LoRA variant (use_rslora)"]),
    "shape": ([], tensor_edit(narrower_first_a), ["is [4, 32]", "needs [4, 64]"]),
    "stray": ([], tensor_edit(with_stray_tensor), ["lm_head.weight", "no LoRA factor"]),
    "no folder": ([], lambda source, target: target / "missing", ["missing is not a folder"]),
    "no PEFT": ([], empty_folder, ["not a readable PEFT adapter folder"]),
    "several": ([], multi_adapter_folder, ["holds several adapters", "task1"]),
    "method": (["method.name=gpm"], None, ["method 'gpm' cannot start from an adapter", "task 0's inputs",
                                          "methods that can: inc_lora, magmax, olora, seq_lora, slao"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_mismatch_is_refused_in_one_line_before_anything_is_written(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    overrides, make, words = REFUSALS[case]
    adapter = runs.init("seq_lora")
    given = make(adapter, tmp_path / "given") if make else adapter
    out = tmp_path / "out"
    args = runs.args("seq_lora", TASKS[1:], out, "--init-adapter", str(given))
    capsys.readouterr()
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: lora.init_adapter: ")
    assert str(given) in err or case == "method"
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_a_refusal_leaves_the_run_it_would_overwrite(runs: Runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(runs.get("seq_lora", "first"), out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    args = runs.args("seq_lora", TASKS[1:], out, "--overwrite", "--init-adapter", str(runs.init("seq_lora")))
    assert main([*args, "--set", "lora.r=2"]) == 2
    assert "lora.r is 2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


# -- (c) resume ----------------------------------------------------------------------------------------------


class SimulatedCrash(Exception):
    pass


def test_an_init_adapter_run_resumes_to_the_same_end(runs: Runs, tmp_path: Path, monkeypatch) -> None:
    """Crashed after the first optimizer step of its task 2 (t2), the run resumes from the checkpoint after
    t1 (the adapter is read and adopted again, then the checkpoint replaces it) and ends as the run that was
    never stopped."""
    real = runner.train_task

    def train_task(model, method, *args, **kwargs):
        if kwargs["description"].startswith("task 2/"):

            def crash(model) -> None:
                raise SimulatedCrash

            method.after_optimizer_step = crash
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", train_task)
    out = tmp_path / "stopped"
    args = runs.args("slao", TASKS[1:], out, "--init-adapter", str(runs.init("slao")))
    with pytest.raises(SimulatedCrash):
        main(args)
    monkeypatch.undo()
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["finished"] == 1
    assert main(["run", "--resume", "--output", str(out)]) == 0
    reference = runs.get("slao", "adopted")
    resumed, uninterrupted = results_of(out), results_of(reference)
    assert resumed["resumed_after"] == [1]
    keys = ("matrix", "per_task", "init_adapter")
    strip = ("train_seconds", "eval_seconds", "train_tokens_per_s")
    for key in keys:
        a, b = resumed[key], uninterrupted[key]
        if key == "per_task":
            a, b = ([{k: v for k, v in p.items() if k not in strip} for p in x] for x in (a, b))
        assert a == b, key
    assert_same_tensors(adapter_tensors(out), adapter_tensors(reference))


def test_a_run_from_an_init_adapter_continues_as_the_longer_run(runs: Runs, tmp_path: Path) -> None:
    """[t1] from task 0's adapter, then `loracl continue` with t2: the method's task numbering (tasks_before)
    survives the extension, so the end is the run of [t0, t1, t2]."""
    out = tmp_path / "grown"
    init = str(runs.init("slao"))
    assert main(runs.args("slao", TASKS[1:2], out, "--init-adapter", init)) == 0
    assert main(["continue", str(out), "--tasks", "t2"]) == 0
    full = results_of(runs.get("slao", "full"))
    grown = results_of(out)
    assert grown["tasks"] == ["t1", "t2"] and grown["matrix"][-1] == full["matrix"][-1][1:]
    assert [p["final_loss"] for p in grown["per_task"]] == [p["final_loss"] for p in full["per_task"][1:]]
    assert_same_tensors(adapter_tensors(runs.get("slao", "full")), adapter_tensors(out))
