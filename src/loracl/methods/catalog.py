"""The catalog of methods: what each one is, read without importing torch.

One `MethodSpec` per method: its class-level metadata (summary, data-free, memory growth, role, ...), its
Options class (`loracl.methods.options`) and where its implementation lives. `loracl methods` prints from
here alone, so the command stays fast; the registry (`loracl.methods.base.method_class`) imports an
implementation only when a method is used. The implementation classes keep the same metadata as class
attributes (the training loop and the runner read them); tests/test_cli.py checks that every entry and its
class agree, field by field, so the two cannot drift.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .options import (
    EWCOptions,
    GainLoRAOptions,
    GPMOptions,
    InfLoRAOptions,
    MagMaxOptions,
    MemoryOptions,
    MethodOptions,
    OLoRAOptions,
    SLAOOptions,
    TaskArithmeticOptions,
    TiesOptions,
)

Role = Literal["continual", "upper_bound", "reference"]


@dataclass(frozen=True)
class MethodSpec:
    """A method as `loracl methods` shows it; the fields are the implementation class's attributes of the
    same names (see loracl.methods.base.ContinualMethod), `implementation` is "module:Class"."""

    name: str
    summary: str
    implementation: str
    options: type[MethodOptions] = MethodOptions
    data_free: bool = True
    memory_growth: str = "constant"
    role: Role = "continual"
    trains: bool = True
    joint_training: bool = False
    merge_obstacle: str | None = None

    def load(self) -> type:
        """The implementation class (importing its module, torch included, registers it)."""
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


MERGING_MEMORY = "O(T) (one LoRA's factors per finished task, plus the training and merged LoRAs)"
EPISODIC_MEMORY = "constant (one LoRA + a memory of memory_size examples)"

_SPECS = (
    MethodSpec(
        name="agem",
        summary="one LoRA; gradient projected when it conflicts with the gradient on a memory batch of past "
        "tasks (not data-free)",
        implementation="loracl.methods.agem:AGEM",
        options=MemoryOptions,
        data_free=False,
        memory_growth=EPISODIC_MEMORY,
    ),
    MethodSpec(
        name="ewc",
        summary="one LoRA; quadratic penalty (λ/2) Σ F (θ − θ*)² with a diagonal Fisher accumulated over "
        "tasks",
        implementation="loracl.methods.ewc:EWC",
        options=EWCOptions,
        memory_growth="constant (one LoRA + its Fisher diagonal and anchor)",
    ),
    MethodSpec(
        name="gainlora",
        summary="a LoRA branch + a gate per task; new gates kept ~0 on old inputs (projected gate updates)",
        implementation="loracl.methods.gainlora:GainLoRA",
        options=GainLoRAOptions,
        memory_growth="O(T): one LoRA and one gate MLP per task, plus per-layer input bases",
        merge_obstacle="each task's LoRA is scaled by a gate computed from the input, unlike a fixed weight",
    ),
    MethodSpec(
        name="gpm",
        summary="one LoRA; gradients of A projected off the input subspace of old tasks (GPM bases)",
        implementation="loracl.methods.gpm:GPM",
        options=GPMOptions,
        memory_growth="constant LoRA, plus a per-layer input basis that grows with T up to n x n",
    ),
    MethodSpec(
        name="inc_lora",
        summary="a new LoRA per task, old LoRAs frozen, all summed: W0 + sum_j s B_j A_j",
        implementation="loracl.methods.inc_lora:IncLoRA",
        memory_growth="O(T): one LoRA per task",
    ),
    MethodSpec(
        name="inflora",
        summary="one LoRA per task; A_i designed in the complement of old tasks' input subspace and frozen",
        implementation="loracl.methods.inflora:InfLoRA",
        options=InfLoRAOptions,
        memory_growth="O(T): one LoRA per task, plus a per-layer input basis of at most n x n",
    ),
    MethodSpec(
        name="magmax",
        summary="sequential LoRA fine-tuning; per entry the task-vector value of largest magnitude; full "
        "rank (or SVD to rank k)",
        implementation="loracl.methods.magmax:MagMax",
        options=MagMaxOptions,
        memory_growth=MERGING_MEMORY,
    ),
    MethodSpec(
        name="mtl",
        summary="upper bound, not continual: one LoRA trained once on the shuffled union of all tasks' data",
        implementation="loracl.methods.mtl:MultiTask",
        data_free=False,
        memory_growth="constant (one LoRA), but every task's data at once",
        role="upper_bound",
        joint_training=True,
    ),
    MethodSpec(
        name="olora",
        summary="IncLoRA + L1 penalty on A_j A_i^T keeping each new LoRA's A orthogonal to the old ones",
        implementation="loracl.methods.olora:OLoRA",
        options=OLoRAOptions,
        memory_growth="O(T): one LoRA per task",
    ),
    MethodSpec(
        name="replay",
        summary="one LoRA; each batch mixed with examples drawn from a reservoir memory of past tasks (not "
        "data-free)",
        implementation="loracl.methods.replay:Replay",
        options=MemoryOptions,
        data_free=False,
        memory_growth=EPISODIC_MEMORY,
    ),
    MethodSpec(
        name="seq_lora",
        summary="one LoRA fine-tuned on each task in turn, no protection against forgetting (lower bound)",
        implementation="loracl.methods.seq_lora:SeqLoRA",
        memory_growth="constant (one LoRA)",
    ),
    MethodSpec(
        name="slao",
        summary="single LoRA: orthogonal init of A from the previous A, time-aware 1/sqrt(i) merge of B "
        "(headline)",
        implementation="loracl.methods.slao:SLAO",
        options=SLAOOptions,
        memory_growth="constant (one LoRA + the previous fine-tuned and merged factors)",
    ),
    MethodSpec(
        name="task_arithmetic",
        summary="sequential LoRA fine-tuning; task vectors summed with weight λ (default: their mean); full "
        "rank (or SVD to rank k)",
        implementation="loracl.methods.task_arithmetic:TaskArithmetic",
        options=TaskArithmeticOptions,
        memory_growth=MERGING_MEMORY,
    ),
    MethodSpec(
        name="ties",
        summary="sequential LoRA fine-tuning; TIES merge (trim, elect sign, disjoint mean); full rank (or "
        "SVD)",
        implementation="loracl.methods.ties:Ties",
        options=TiesOptions,
        memory_growth=MERGING_MEMORY,
    ),
    MethodSpec(
        name="zero_shot",
        summary="reference, not continual: the base model without training (b_j of FWT); exports a zero LoRA",
        implementation="loracl.methods.zero_shot:ZeroShot",
        memory_growth="constant (nothing is learned)",
        role="reference",
        trains=False,
    ),
)

CATALOG: dict[str, MethodSpec] = {spec.name: spec for spec in sorted(_SPECS, key=lambda s: s.name)}


def unknown_method(name: object, known: Iterable[str]) -> str:
    """The one-line complaint about a method name that is none of `known`, with the closest as a hint."""
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown method {name!r}{hint}; known: {', '.join(known)}"
