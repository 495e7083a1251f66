"""Data parallelism for real: 2 CPU processes (gloo) started by `accelerate launch` against 1 process with
the same global batch, for slao and gpm (a projection method: statistics summed across processes before
its eigen-decomposition). Tolerances, float32: final losses relative 1e-4, adapter entries 1e-5 absolute;
accuracy matrices, metrics, evaluation predictions exactly equal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracl.cli import main
from loracl.config import load_config
from loracl.data import load_tasks
from loracl.data.text import PromptEncoder
from loracl.engine import distributed
from loracl.engine.training import answer_loss, answer_tokens, collate, share_loss
from loracl.errors import ConfigError
from loracl.methods import create_method
from loracl.models.base_model import tiny_random_llama
from loracl.recipes.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
METHODS = ["slao", "gpm"]
# Uneven shares: a global batch of 3 is split 2 + 1, so the token weighting of the loss matters; eval
# batches of 2 give each process a different number of batches.
OVERRIDES = ["train.batch_size=3", "eval.batch_size=2"]
LOSS_RTOL, ADAPTER_ATOL = 1e-4, 1e-5


def launch_two_processes(
    out: Path, methods: list[str] = METHODS, overrides: list[str] = OVERRIDES, **env: str
) -> subprocess.CompletedProcess[str]:
    """The worker under `accelerate launch` with 2 CPU processes: a run per method with `overrides`."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even on a GPU machine
        **env,
    }
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(ROOT / "tests" / "distributed_worker.py"), str(out), str(TINY), ",".join(methods), *overrides,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    done = launch_two_processes(root / "two")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # gloo left to interpreter shutdown can abort a process after its work is done (SIGABRT)
    assert done.stdout.count("process group left before exit: True") == 2, done.stdout[-3000:]
    (root / "two.stdout").write_text(done.stdout)
    for method in METHODS:
        run(load_config(TINY, [f"method.name={method}", *OVERRIDES]), root / "one" / method)
    assert main(["eval", str(root / "one" / "slao"), "--output", str(root / "one" / "eval.json")]) == 0
    return root / "one", root / "two"


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one(runs, method):
    one, two = (results(folder / method) for folder in runs)
    assert one["distributed"]["processes"] == 1 and two["distributed"]["processes"] == 2
    assert two["distributed"]["replica_max_abs_diff"] <= ADAPTER_ATOL  # copies agree across processes
    assert two["matrix"] == one["matrix"] and two["zero_shot"] == one["zero_shot"]
    assert two["metrics"] == one["metrics"]
    for a, b in zip(one["per_task"], two["per_task"], strict=True):
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=LOSS_RTOL)
        assert (b["train_steps"], b["train_tokens"]) == (a["train_steps"], a["train_tokens"])
    files = sorted((runs[0] / method).rglob("*.safetensors"))  # final adapter and per-task SLAO factors
    assert files
    for file in files:
        ours = load_file(str(file))
        theirs = load_file(str(runs[1] / method / file.relative_to(runs[0] / method)))
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert (value - theirs[key]).abs().max() <= ADAPTER_ATOL, (file, key)


def test_gpm_bases_protect_the_same_subspace(runs):
    """GPM's per-task info (from the summed statistics) is the same, so the same basis sizes were kept."""
    one, two = (results(folder / "gpm") for folder in runs)
    sizes = [[t["method_state_bytes"] for t in r["per_task"]] for r in (one, two)]
    assert sizes[0] == sizes[1] and sizes[0][-1] > 0


def test_only_the_main_process_wrote(runs):
    one, two = (sorted(str(p.relative_to(r)) for p in r.rglob("*")) for r in runs)
    assert one == two  # same files, and no stray temporary or per-rank files


def test_evaluation_split_across_processes_is_gathered_exactly(runs):
    one, two = (json.loads((folder / "eval.json").read_text()) for folder in runs)
    assert two["processes"] == 2
    assert two["predictions"] == one["predictions"] and two["scores"] == one["scores"]
    assert two["scores"] == results(runs[0] / "slao")["matrix"][-1]


def test_a_failed_write_on_the_main_process_stops_every_process(tmp_path):
    """Only the main process writes; when that fails (a full disk at task 2's results.json), the other one
    must stop with it rather than wait forever at the next exchange."""
    done = launch_two_processes(tmp_path, ["slao"], FULL_DISK_AT="2")  # times out if a process hangs
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("cannot write the files of task 2") == 2, output[-3000:]  # both processes
    assert "No space left on device" in output and "checkpoint after task 1 is intact" in output
    checkpoint = json.loads((tmp_path / "slao" / "checkpoint" / "latest.json").read_text())
    assert checkpoint["finished"] == 1


def test_predict_prints_each_answer_once(runs, capsys):
    printed = (runs[1].parent / "two.stdout").read_text().splitlines()
    together = [json.loads(line) for line in printed if line.startswith('{"prompt": "Predict-check')]
    prompts = [item["prompt"] for item in together]
    assert len(prompts) == len(set(prompts)) == 3  # the worker's three prompts, not once per process
    assert main(["predict", str(runs[0] / METHODS[0]), *prompts]) == 0
    alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert together == alone  # the same answers as one process gives


@pytest.mark.parametrize(
    ("flag", "reason"),
    [
        ("ACCELERATE_USE_FSDP", "FSDP through accelerate's plugin, which loracl does not use"),
        ("ACCELERATE_USE_DEEPSPEED", "owns the optimizer step and partitions the LoRA factors"),
    ],
)
def test_sharding_configs_are_refused_in_one_line(flag, reason, monkeypatch, capsys, tmp_path):
    """accelerate's FSDP plugin and DeepSpeed are refused, pointing at train.parallel: fsdp (loracl's own
    sharding of the frozen base, tests/test_fsdp.py)."""
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ConfigError, match="train.parallel: fsdp"):
        distributed.refuse_sharding()
    assert main(["run", str(TINY), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert reason in err and "set train.parallel: fsdp" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_token_weighted_shares_add_up_to_the_whole_batch(monkeypatch):
    """Uneven shares of one global batch: the weighted share losses, and their gradients, sum to the
    one-process loss and gradient (what summing gradients across processes relies on)."""
    config = load_config(TINY)
    base, tokenizer = tiny_random_llama()
    method = create_method("seq_lora", {}, config.lora)
    model = method.prepare_model(base)
    encoder = PromptEncoder(tokenizer, config.train.max_length)
    examples = [encoder.encode(ex) for ex in load_tasks(config)[0].train[:3]]
    params = method.trainable_parameters(model)
    device = next(model.parameters()).device

    def gradient(loss) -> list:
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    whole = answer_loss(model, collate(examples, tokenizer.pad_token_id, device))
    expected = gradient(whole)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    total_tokens = answer_tokens(examples)
    parts = [examples[0::2], examples[1::2]]  # 2 examples and 1, of different lengths
    pad = tokenizer.pad_token_id
    losses = [share_loss(model, method, part, total_tokens, pad, device)[0] for part in parts]
    assert sum(loss.item() for loss in losses) == pytest.approx(whole.item(), rel=1e-6)
    summed = [a + b for a, b in zip(*(gradient(loss) for loss in losses), strict=True)]
    for ours, theirs in zip(summed, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
