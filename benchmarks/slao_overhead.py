"""Figure 2: SLAO's per-task overhead (orthogonal init + merge) and its total over 50 and 200 tasks.

The factors have the shapes of the real model's adapted layers (SmolLM2-135M, r = 8: 30 layers of q_proj
576x576 and v_proj 192x576); their values are synthetic (each task's fine-tuned A and B drawn at random).
Timed, per task of the sequence: `SLAO.initial_state` (reduced QR of each A_ft^T, in float64) and
`SLAO.merge` (the 1/sqrt(i) interpolation of B), the code the method runs; and the same init with a
randomised SVD (`torch.svd_lowrank`) giving the orthonormal basis instead of QR, through the same
`orthogonal_init` function. Also timed: SLAO's complete hooks on the real model (before_task + after_task,
which add the copies into the model and the two adapter saves per task).
Sequences of 50 and 200 tasks (--quick: 10 and 40). The overhead is given as a fraction of one task's
training time: --task-seconds, or else the median step time of the real training loop on the real model
(real prompts) times --task-steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from cost_common import (
    base_parser,
    encode_all,
    load,
    lora_section,
    median,
    model_device,
    print_figures,
    ratio,
    real_examples,
    run_main,
    scratch_dir,
    slao_step_seconds,
    task_context,
    timed,
)

from loracl.config import TrainSection
from loracl.methods import create_method
from loracl.methods.slao import SLAO, orthogonal_init
from loracl.models.lora import LoraPair, LoraState, get_lora_state, set_lora_state

# sequence lengths T, timed sequences, hook repeats, measured step (batch size, max length, steps, passes)
SIZES = {
    "quick": ((10, 40), 1, 3, (1, 32, 1, 1)),
    "full": ((50, 200), 3, 10, (2, 64, 2, 2)),
}
TASK_STEPS = 63  # one epoch of a shared-benchmark task (500 examples) at batch size 8


def randomized_row_basis(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the row space of A (r x n) from a randomised SVD of A^T (no sign fix)."""
    U, _, _ = torch.svd_lowrank(A.T.float(), q=A.shape[0], niter=2)
    return U.T.to(A.dtype)


def subspace_distance(P: torch.Tensor, Q: torch.Tensor) -> float:
    """||P^T P - Q^T Q||_F for two r x n matrices with orthonormal rows (0 when they span the same space),
    as sqrt(2) ||Q - Q P^T P||_F: the residual form does not cancel catastrophically near 0."""
    P, Q = P.double(), Q.double()
    return math.sqrt(2) * torch.linalg.matrix_norm(Q - Q @ P.T @ P).item()


def synthetic_state(shapes: LoraState, generator: torch.Generator) -> LoraState:
    """Fine-tuned factors of one task: random values with the shapes (and device) of the real layers."""
    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator).to(like.device)

    return {name: LoraPair(draw(p.A), draw(p.B) * 0.01) for name, p in shapes.items()}


def sequence_seconds(
    method: SLAO, shapes: LoraState, tasks: int, seed: int, basis: Callable | None
) -> list[float]:
    """Seconds of init + merge for each task of a sequence (`basis` None: SLAO's own QR init)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(shapes.values())).A.device
    method.finetuned, method.merged = {}, {}
    seconds = []
    for index in range(1, tasks + 1):

        def init(i: int = index) -> LoraState | None:
            return method.initial_state(i) if basis is None else orthogonal_init(method.finetuned, basis)

        def merge(i: int = index) -> None:
            method.merged = method.merge(i, method.finetuned)

        init_seconds = timed(init, device) if index > 1 else 0.0  # task 1 starts from PEFT's init
        method.finetuned = synthetic_state(shapes, generator)  # stands for the task's training: not timed
        seconds.append(init_seconds + timed(merge, device))
    return seconds


def hook_seconds(method: SLAO, model: torch.nn.Module, loaded, cfg: TrainSection, repeats: int, seed: int):
    """Median seconds of SLAO's before_task + after_task on the real model, tasks 2..repeats+1."""
    generator = torch.Generator().manual_seed(seed)
    shapes = get_lora_state(model)
    device = model_device(model)
    workdir = scratch_dir("hooks")
    method.finetuned, method.merged = {}, {}
    seconds = []
    for index in range(1, repeats + 2):
        ctx = task_context(index, [], loaded, cfg, workdir / str(index), seed)
        before = timed(lambda c=ctx: method.before_task(model, c), device)
        set_lora_state(model, synthetic_state(shapes, generator))  # what training would leave
        after = timed(lambda c=ctx: method.after_task(model, c), device)
        if index > 1:  # task 1 has no init and no merge
            seconds.append(before + after)
    return median(seconds)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--task-seconds", type=float, help="one task's training time (default: measured)")
    parser.add_argument("--task-steps", type=int, default=TASK_STEPS, help="steps of a task when measured")
    parser.add_argument("--sequences", help="comma-separated lengths T (default: 10,40 quick / 50,200)")
    args = parser.parse_args(argv)
    default_sequences, repeats, hook_repeats, (batch_size, max_length, steps, passes) = SIZES[
        "quick" if args.quick else "full"
    ]
    sequences = sorted(int(t) for t in args.sequences.split(",")) if args.sequences else default_sequences
    loaded = load(args)
    lora = lora_section(args.rank)
    method = create_method("slao", {}, lora)
    model = method.prepare_model(loaded.model)
    shapes = get_lora_state(model)
    layer_shapes = sorted({(tuple(p.B.shape[:1]) + tuple(p.A.shape[1:])) for p in shapes.values()})
    print(f"model {args.model} on {model_device(model)}: {len(shapes)} adapted layers, shapes (out, in) "
          f"{layer_shapes}, r = {args.rank}")

    figures: dict[str, float] = {}
    per_task: dict[str, float] = {}
    for label, basis in (("qr", None), ("rsvd", randomized_row_basis)):
        for tasks in sequences:
            runs = [sequence_seconds(method, shapes, tasks, args.seed, basis) for _ in range(repeats)]
            totals = [sum(run) for run in runs]
            figures[f"slao_{label}_total_seconds_T{tasks}"] = median(totals)
            per_task[f"{label}_T{tasks}"] = median([s for run in runs for s in run[1:]])
            print(f"{label}: {tasks} tasks in {median(totals):.3f} s")
    qr_task, rsvd_task = per_task[f"qr_T{sequences[-1]}"], per_task[f"rsvd_T{sequences[-1]}"]
    hooks = hook_seconds(method, model, loaded, TrainSection(), hook_repeats, args.seed)

    if args.task_seconds is not None:
        task_seconds = args.task_seconds
    else:
        cfg = TrainSection(batch_size=batch_size, max_length=max_length, seed=args.seed)
        encoded = encode_all(loaded, real_examples(args, per_task=-(-batch_size * steps // 4)), max_length)
        encoded = encoded[: batch_size * steps]
        measure = create_method("slao", {}, lora)
        one_pass = slao_step_seconds(measure, model, loaded, encoded, cfg, args.seed)
        step = median([one_pass() for _ in range(passes)])
        task_seconds = step * args.task_steps
        print(f"training step {step:.4f} s (batch {batch_size}, max length {max_length}) x {args.task_steps} "
              f"steps = {task_seconds:.1f} s per task")

    sample = synthetic_state(shapes, torch.Generator().manual_seed(args.seed))
    qr_basis, rsvd_basis = orthogonal_init(sample), orthogonal_init(sample, randomized_row_basis)
    distance = max(subspace_distance(qr_basis[name].A, rsvd_basis[name].A) for name in sample)
    figures |= {
        "slao_qr_init_merge_seconds_per_task": qr_task,
        "slao_rsvd_init_merge_seconds_per_task": rsvd_task,
        "rsvd_vs_qr_time_ratio": ratio(rsvd_task, qr_task),
        "rsvd_vs_qr_subspace_distance_max": distance,
        "slao_hooks_seconds_per_task": hooks,
        "task_train_seconds": task_seconds,
        "slao_overhead_fraction_of_task": ratio(qr_task, task_seconds),
        "slao_rsvd_overhead_fraction_of_task": ratio(rsvd_task, task_seconds),
        "slao_hooks_fraction_of_task": ratio(hooks, task_seconds),
    }
    print_figures(figures)
    return figures


if __name__ == "__main__":
    run_main(main)
