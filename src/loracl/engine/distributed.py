"""Data parallelism across processes started by `accelerate launch` or `torchrun`; no-ops in one process.

loracl does not wrap the model in DDP: every process holds the whole PeftModel (so the methods' hooks see
the plain model), takes its share of each global batch, and the gradients of the trainable parameters are
summed across processes before each optimizer step. With the loss of each share normalised by the global
number of answer tokens, that sum is the one-process gradient, so the parameters stay identical on every
process without any broadcast. The process group is set up by accelerate's `PartialState` (gloo on CPU,
NCCL on GPUs), whose launcher also sets the environment variables read here.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from loracl.errors import ConfigError, LoraclError
from loracl.files import is_write_failure

T = TypeVar("T")

# Set by `accelerate launch` from an accelerate config; loracl replicates the model, it does not shard it.
_SHARDING_FLAGS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_sharding() -> None:
    """A one-line error instead of silently ignoring an FSDP / DeepSpeed accelerate config."""
    for flag, name in _SHARDING_FLAGS.items():
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"accelerate config asks for {name}, which loracl does not support: it trains data-parallel "
                "with a full copy of the model per process (use an accelerate config with "
                "distributed_type MULTI_GPU or MULTI_CPU, or --multi_gpu / --cpu)"
            )


def init() -> None:
    """Join the process group when launched with several processes (idempotent)."""
    refuse_sharding()
    if _launched_world_size() > 1 and not dist.is_initialized():
        from accelerate import PartialState

        state = PartialState()
        if state.device.type == "cuda":
            torch.cuda.set_device(state.device)  # "cuda" now means this process's GPU
        atexit.register(leave)


def leave() -> None:
    """Destroy the process group while the interpreter is still whole. Left to interpreter shutdown, gloo's
    worker threads can outlive the objects they hold and the process dies with SIGABRT ("terminate called
    without an active exception") after all its work is done, which fails the launch."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`, round-robin (item k goes to process k mod world size)."""
    return list(items[rank() :: world_size()])


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) `tensor` over processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= world_size()
    return tensor


def all_reduce_dict_(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of a dict over processes, in place, in sorted key order (same on every process)."""
    for key in sorted(tensors):
        all_reduce_(tensors[key])
    return tensors


def _comm_device() -> torch.device:
    """Where tensors made only to be communicated must live: NCCL moves GPU tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else (
        torch.device("cpu")
    )


def sum_scalar(value: float) -> float:
    if not active():
        return value
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64, device=_comm_device())).item())


def gather_object(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every process."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


_alone_on_main = False  # inside on_main's action on the main process: nested on_main calls just run


def on_main(action: Callable[[], T]) -> T:
    """Run `action` on the main process only and hand its result, its user error or its failed write
    (OSError, e.g. a full disk) to every process, so that all of them stop alike instead of the others
    waiting forever at their next exchange. Every process must call it; called again inside `action`
    (say, an adapter saved while the main process exports), it simply runs there."""
    global _alone_on_main
    if _alone_on_main:
        return action()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        _alone_on_main = True
        try:
            outcome = (True, action())
        except Exception as exc:
            if not (isinstance(exc, LoraclError) or is_write_failure(exc)):
                raise
            outcome = (False, exc)
        finally:
            _alone_on_main = False
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def max_replica_difference(tensors: Sequence[torch.Tensor]) -> float:
    """Largest |x - x_main| over the entries of `tensors` and over processes (0.0 with one process)."""
    if not active():
        return 0.0
    worst = torch.zeros(1, dtype=torch.float64, device=_comm_device())
    for tensor in tensors:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if tensor.numel():
            diff = (tensor.detach() - reference).abs().max().double().to(worst.device)
            worst = torch.maximum(worst, diff.reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())
