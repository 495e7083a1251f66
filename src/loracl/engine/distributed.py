"""Data parallelism, and sharding of the frozen base, across processes started by `accelerate launch` or
`torchrun`; no-ops in one process.

loracl does not wrap the model in DDP: every process holds the PeftModel (whole, with `train.parallel:
data`; so the methods' hooks see the plain model), takes its share of each global batch, and the gradients
of the trainable parameters are summed across processes before each optimizer step. With the loss of each
share normalised by the global number of answer tokens, that sum is the one-process gradient, so the
parameters stay identical on every process without any broadcast. The process group is set up by
accelerate's `PartialState` (gloo on CPU, NCCL on GPUs), whose launcher also sets the environment variables
read here.

With `train.parallel: fsdp` (`shard_frozen_base`) the frozen base's decoder blocks are sharded across the
processes with torch's FSDP2 (`fully_shard`), each block all-gathered for its forward (and again for its
backward) and freed after. Every LoRA parameter (and anything else trainable), the embeddings and the LM
head are left out of the sharding (`ignored_params`): they stay ordinary tensors, replicated, so every
method's math on them and the gradient exchange above are unchanged, and checkpoints and exported adapters
are full PEFT tensors. What FSDP adds is lockstep: every forward (and backward) through the blocks is a
collective, so all processes must run the same passes. Where their shares differ in number (the batches of
a statistics pass or of an evaluation, an empty share of a small training batch) a process runs extra
passes on a real batch inside `padding()`, and whatever accumulates per batch skips them
(`padding_pass()`).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from loracl.errors import ConfigError, LoraclError
from loracl.files import is_write_failure

T = TypeVar("T")

# Set by `accelerate launch` from an accelerate config. loracl shards the frozen base itself
# (train.parallel: fsdp); accelerate's FSDP plugin and DeepSpeed are refused, each with its reason.
_LAUNCHER = "launch with an accelerate config of distributed_type MULTI_GPU or MULTI_CPU, or --multi_gpu"
_SHARDING_FLAGS = {
    "ACCELERATE_USE_FSDP": (
        "accelerate config asks for FSDP through accelerate's plugin, which loracl does not use: set "
        "train.parallel: fsdp in the loracl config instead (loracl shards the frozen base itself) and "
        f"{_LAUNCHER}"
    ),
    "ACCELERATE_USE_DEEPSPEED": (
        "accelerate config asks for DeepSpeed, which loracl does not support: its engine owns the optimizer "
        "step and partitions the LoRA factors that loracl's methods read and rewrite between steps (a "
        "projection, a QR, a merge); to shard a base that does not fit one device set train.parallel: fsdp "
        f"and {_LAUNCHER}"
    ),
}


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_sharding() -> None:
    """A one-line error instead of silently ignoring an FSDP-plugin / DeepSpeed accelerate config."""
    for flag, message in _SHARDING_FLAGS.items():
        if os.environ.get(flag, "").lower() in ("1", "true", "yes"):
            raise ConfigError(message)


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


# -- sharding the frozen base (train.parallel: fsdp) -----------------------------------------------------

_padding = False  # inside padding(): the pass being run only keeps the processes in step


@contextlib.contextmanager
def padding() -> Iterator[None]:
    """Around a pass run only so that this process takes part in the collectives of a sharded model's
    forward (and backward) as the others do; statistics and records must not count it (`padding_pass`)."""
    global _padding
    before, _padding = _padding, True
    try:
        yield
    finally:
        _padding = before


def padding_pass() -> bool:
    """Whether the pass now running is a padding pass (see `padding`): skip it in any accumulation."""
    return _padding


def padding_count(items: int) -> int:
    """How many padding passes this process adds to its `shard` of `items` items so that every process runs
    as many passes as the largest share (0 with one process)."""
    if not active() or items <= 0:
        return 0
    return math.ceil(items / world_size()) - len(range(rank(), items, world_size()))


def max_int(value: int) -> int:
    """The largest of the processes' `value`."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def lockstep(model: torch.nn.Module) -> bool:
    """Whether the processes must run the same forward and backward passes through `model`: several
    processes and weights of it sharded (FSDP2)."""
    cls = _fsdp_module_class()
    return active() and cls is not None and any(isinstance(m, cls) for m in model.modules())


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _blocks(base: torch.nn.Module, decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's transformer blocks: the outermost modules of the classes transformers never splits
    across devices (`_no_split_modules`, e.g. LlamaDecoderLayer)."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks: dict[str, torch.nn.Module] = {}
    for name, module in decoder.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in blocks)
        if type(module).__name__ in names and name and not inside:
            blocks[name] = module
    return list(blocks.values())


def check_shardable(model: torch.nn.Module) -> None:
    """Refuse (ConfigError) a model whose base `shard_frozen_base` cannot shard: an encoder-decoder, a
    quantised base, or one whose decoder blocks cannot be found."""
    base = _base_of(model)
    kind = type(base).__name__
    if getattr(base.config, "is_encoder_decoder", False):
        raise ConfigError(
            f"train.parallel: fsdp shards decoder-only models; {kind} is an encoder-decoder: use "
            "train.parallel: data"
        )
    if getattr(base, "is_quantized", False) or getattr(base.config, "quantization_config", None):
        raise ConfigError(
            "train.parallel: fsdp cannot shard a quantised base (FSDP shards floating-point weights): "
            "use model.quantization with train.parallel: data, or fsdp without quantisation"
        )
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or not _blocks(base, decoder):
        raise ConfigError(
            f"train.parallel: fsdp cannot find the decoder blocks of {kind} to shard: use "
            "train.parallel: data"
        )


def shard_frozen_base(model: torch.nn.Module, device: torch.device | None = None) -> None:
    """Shard the frozen weights of `model`'s decoder blocks across the processes (FSDP2 `fully_shard`, one
    unit per block and the decoder as the root unit), everything else left whole (see the module's
    docstring); then move the model to `device` (default: this process's communication device). The model
    may come on the CPU: each block's weights reach `device` as this process's shard only. A no-op but for
    the checks with one process."""
    check_shardable(model)
    if not active():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = device or _comm_device()
    base = _base_of(model)
    decoder = base.get_decoder()
    kept = {p for name, p in model.named_parameters() if p.requires_grad or "lora_" in name}
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        if module is not None:  # used outside the decoder's forward (the head; GainLoRA's gates)
            kept |= set(module.parameters())
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in _blocks(base, decoder):
        fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params=kept)
    fully_shard(decoder, mesh=mesh, reshard_after_forward=True, ignored_params=kept)
    base._is_fsdp_managed_module = True  # transformers' generate then keeps the processes in step
    model.to(device)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds (a sharded parameter: its local shard only)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
