"""Figure 3: adapter bytes, method state and peak memory after T tasks, for SLAO and the multi-LoRA methods.

The real methods train through the real run code (`ContinualRun.context` and `ContinualRun.train`: the
method's before_task, the shared training loop, after_task) on synthetic tiny classification tasks built in
memory; evaluation is skipped (it does not change what is stored). Reported after task T:
  - adapter bytes: `method.adapter_bytes(model)`, the LoRA weights the deployed model carries;
  - state bytes: `method.state_bytes()`, what the method keeps between tasks beside them (SLAO: the previous
    fine-tuned and merged factors; InfLoRA/GainLoRA: input bases and gates);
  - versions bytes: the sum of the adapter bytes after tasks 1..T, what `versions/v1..vT` hold when every
    version is kept (`versions.keep` unset; loracl.outputs.versions): T x one adapter for SLAO, about T^2/2
    adapters for the methods that add one LoRA per task;
  - peak memory during task T: on CUDA `torch.cuda.max_memory_allocated` (reset before the task); on CPU the
    process's peak resident set (VmHWM of /proc/self/status, reset before the task through
    /proc/self/clear_refs), which includes the model, Python and the allocator's caches;
  - one training step on a long batch after task T (`--step-length` tokens x batch 8, as a Long-grid task's
    prompts at the demo's max_length 384): the activations autograd keeps for backward (distinct storages
    that are not parameters, through `torch.autograd.graph.saved_tensors_hooks`) and the peak memory of the
    forward and backward. The tasks' own prompts are short, so this is where an activation cost per old
    task shows (GainLoRA's gated branches kept every old branch's output before the gates of frozen tasks
    were detached).
SLAO must stay flat in T; the others grow with one LoRA per task.
"""

from __future__ import annotations

from pathlib import Path

import torch
from cost_common import (
    base_parser,
    load,
    lora_section,
    model_device,
    print_figures,
    ratio,
    run_main,
    scratch_dir,
    synthetic_tasks,
)

from loracl.config import build_config
from loracl.engine.training import IGNORE, answer_loss
from loracl.methods import create_method
from loracl.models.base_model import TINY, resolve_device
from loracl.recipes.run import ContinualRun

METHODS = ("slao", "inc_lora", "olora", "inflora", "gainlora")
CHECKPOINTS = {"quick": (1, 3, 5), "full": (1, 5, 15, 50)}
TRAIN = {"epochs": 1, "lr": 1e-3, "batch_size": 4, "max_length": 64}
TRAIN_EXAMPLES, TEST_EXAMPLES = 8, 2
STEP_BATCH, STEP_ANSWER_TOKENS = 8, 4
_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM line in /proc/self/status")


def long_batch(model: torch.nn.Module, length: int, seed: int) -> dict[str, torch.Tensor]:
    """STEP_BATCH random sequences of `length` tokens whose last STEP_ANSWER_TOKENS are the answer."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (STEP_BATCH, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE)
    labels[:, -STEP_ANSWER_TOKENS:] = ids[:, -STEP_ANSWER_TOKENS:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(model_device(model)) for key, value in batch.items()}


def step_memory(method, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """MiB of activations saved for backward by one training forward, and the step's peak memory in MiB."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = model_device(model)
    reset_peak(device)
    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with keep, method.step_context(model, batch):
        loss = answer_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20, peak_mib(device)


def grow(args, name: str, tasks, checkpoints: tuple[int, ...]) -> dict[str, float]:
    """Train `name` over the tasks; the figures at each checkpoint T."""
    config = build_config(
        {
            "model": {"name": args.model, "device": args.device},
            "lora": lora_section(args.rank).model_dump(),
            "method": {"name": name},
            "benchmark": {"name": "synthetic", "tasks": [t.name for t in tasks]},
            "train": TRAIN | {"seed": args.seed},
            "eval": {"zero_shot": False},
        }
    )
    method = create_method(name, config.method_options(), config.lora)
    run_dir = scratch_dir(f"growth-{name}")
    cl = ContinualRun(config, method, tasks, load(args), run_dir)
    device = model_device(cl.model)
    figures = {}
    versions_bytes = 0
    for index, task in enumerate(tasks, start=1):
        ctx = cl.context(index, task, f"{index}-{task.name}")
        reset_peak(device)
        cl.train(ctx, f"{name} task {index}")
        versions_bytes += method.adapter_bytes(cl.model)  # version `index`: the adapter served after it
        if index in checkpoints:
            figures[f"{name}_adapter_bytes_T{index}"] = method.adapter_bytes(cl.model)
            figures[f"{name}_versions_bytes_T{index}"] = versions_bytes
            figures[f"{name}_state_bytes_T{index}"] = method.state_bytes()
            figures[f"{name}_peak_mib_T{index}"] = peak_mib(device)
            saved, peak = step_memory(method, cl.model, long_batch(cl.model, args.step_length, args.seed))
            figures[f"{name}_step_saved_mib_T{index}"] = saved
            figures[f"{name}_step_peak_mib_T{index}"] = peak
            print(f"{name} T={index}: " + ", ".join(f"{k.split('_T')[0][len(name) + 1:]} {v:.0f}"
                                                    for k, v in figures.items() if k.endswith(f"_T{index}")))
    first, last = checkpoints[0], checkpoints[-1]
    figures[f"{name}_adapter_growth_T{last}_over_T{first}"] = ratio(
        figures[f"{name}_adapter_bytes_T{last}"], figures[f"{name}_adapter_bytes_T{first}"]
    )
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = base_parser(__doc__.splitlines()[0], default_model=TINY)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument(
        "--step-length", type=int, default=128, help="tokens per sequence of the long step (default 128)"
    )
    parser.add_argument("--tasks", help="comma-separated checkpoints T (default: 1,3,5 quick / 1,5,15,50)")
    args = parser.parse_args(argv)
    checkpoints = tuple(sorted(int(t) for t in args.tasks.split(","))) if args.tasks else CHECKPOINTS[
        "quick" if args.quick else "full"
    ]
    tasks = synthetic_tasks(checkpoints[-1], TRAIN_EXAMPLES, TEST_EXAMPLES, args.seed)
    cuda = resolve_device(args.device).type == "cuda"
    memory = "torch.cuda.max_memory_allocated" if cuda else "the process's peak RSS (VmHWM)"
    print(f"model {args.model}, r = {args.rank}, T = {checkpoints}, peak memory: {memory}")
    figures: dict[str, float] = {}
    for name in args.methods.split(","):
        figures |= grow(args, name.strip(), tasks, checkpoints)
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
