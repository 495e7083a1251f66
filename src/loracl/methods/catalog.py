"""The catalog of methods: what each one is, read without importing torch.

One `MethodSpec` per method: its class-level metadata (summary, data-free, memory growth, role, ...), its
Options class (`loracl.methods.options`) and where its implementation lives. `loracl methods` prints from
here alone, so the command stays fast; the registry (`loracl.methods.base.method_class`) imports an
implementation only when a method is used. The implementation classes keep the same metadata as class
attributes (the training loop and the runner read them); tests/test_cli.py checks that every entry and its
class agree, field by field, so the two cannot drift.

Methods from other packages (plugins) are declared by an entry point of the group `loracl.methods`
(ENTRY_POINT_GROUP), named like the method, naming either a MethodSpec (best: a module that imports no
torch, so that `loracl methods` stays fast; its `implementation` names the class) or the ContinualMethod
subclass itself (its module is imported, torch included, to list it). Entry points are discovered per
process, so `loracl bench` workers see the same plugins. Nothing here reads them until asked:
`plugin(name)` loads one method's entry point (a run), `listing()` all of them (`loracl methods`). A plugin
that fails to load is a `PluginFailure` (one line), never an exception that stops a listing. A plugin may
not take the name of a built-in method; a class registered at run time (loracl.methods.base.register) may,
and is listed here from then on (`note_registered`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

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
    origin: str = field(default="", compare=False)  # "" for a built-in; a plugin's "distribution version"

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


# --- methods from outside the package ----------------------------------------------------------------------

ENTRY_POINT_GROUP = "loracl.methods"
# The class attributes a MethodSpec repeats (besides name and options); a plugin's spec and class must agree.
METADATA = ("summary", "data_free", "memory_growth", "role", "trains", "joint_training", "merge_obstacle")
# A method's name becomes a folder name (`loracl bench`) and is parsed in `--methods NAME:KEY=VALUE`.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a method (None when it can)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 100:
        return (
            f"{name!r} is not a valid method name (letters, digits, '_', '.', '-'; starting with a letter "
            "or digit; at most 100 characters)"
        )
    return None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin method that could not be loaded, as one line."""

    name: str
    origin: str  # "entry point NAME = module:attribute of DIST VERSION"
    reason: str

    def line(self) -> str:
        return f"plugin method {self.name!r} cannot be loaded ({self.origin}): {self.reason}"


def spec_from_class(cls: type) -> MethodSpec:
    """The catalog entry of an implementation class, from its class attributes."""
    return MethodSpec(
        name=cls.name,
        summary=cls.summary,
        implementation=class_path(cls),
        options=cls.Options,
        **{key: getattr(cls, key) for key in METADATA if key != "summary"},
    )


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def spec_mismatch(spec: MethodSpec, cls: type) -> str | None:
    """How an implementation class disagrees with its spec (None when it does not): the runner reads the
    class, `loracl methods` the spec."""
    if getattr(cls, "name", None) != spec.name:
        return f"its class {class_path(cls)} is named {getattr(cls, 'name', None)!r}"
    if getattr(cls, "Options", None) is not spec.options:
        return f"its class {class_path(cls)} has other Options than its spec ({spec.options.__name__})"
    for key in METADATA:
        if getattr(cls, key, None) != getattr(spec, key):
            ours, theirs = getattr(cls, key, None), getattr(spec, key)
            return f"its class {class_path(cls)} has {key} {ours!r}, its spec {theirs!r}"
    return None


def _error_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points of every installed distribution (read afresh: cheap, and a notebook may
    install a plugin after loracl was imported)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _origin(entry: metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    where = f" of {dist.metadata['Name']} {dist.version}" if dist is not None else ""
    return f"entry point {entry.name} = {entry.value}{where}"


# Plugin specs loaded in this process, and specs of classes registered at run time, by name.
_PLUGINS: dict[str, MethodSpec] = {}
_REGISTERED: dict[str, MethodSpec] = {}


def _load_entry(entry: metadata.EntryPoint) -> MethodSpec | PluginFailure:
    origin = _origin(entry)
    if entry.name in CATALOG:
        return PluginFailure(entry.name, origin, "the name of a built-in method; choose another")
    if problem := name_problem(entry.name):
        return PluginFailure(entry.name, origin, problem)
    try:
        found: Any = entry.load()
    except Exception as exc:  # noqa: BLE001  (whatever a plugin's import raises, it is reported, not raised)
        return PluginFailure(entry.name, origin, _error_line(exc))
    if isinstance(found, type):
        base = sys.modules.get("loracl.methods.base")  # imported by any module defining a method
        if base is None or not issubclass(found, base.ContinualMethod):
            return PluginFailure(entry.name, origin, f"{class_path(found)} is not a ContinualMethod subclass")
        try:
            found = spec_from_class(found)
        except AttributeError as exc:
            return PluginFailure(entry.name, origin, _error_line(exc))
    if not isinstance(found, MethodSpec):
        what = f"names a {type(found).__name__}, not a MethodSpec or a ContinualMethod subclass"
        return PluginFailure(entry.name, origin, what)
    if found.name != entry.name:
        return PluginFailure(entry.name, origin, f"its method is named {found.name!r}")
    if not (isinstance(found.options, type) and issubclass(found.options, MethodOptions)):
        return PluginFailure(entry.name, origin, "its options are not a MethodOptions subclass")
    dist = getattr(entry, "dist", None)
    return dataclasses.replace(found, origin=f"{dist.metadata['Name']} {dist.version}" if dist else "plugin")


def _declared() -> dict[str, list[metadata.EntryPoint]]:
    named: dict[str, list[metadata.EntryPoint]] = {}
    for entry in _entry_points():
        named.setdefault(entry.name, []).append(entry)
    return named


def plugin(name: str) -> MethodSpec | PluginFailure | None:
    """The spec of plugin method `name` (its entry point loaded on first use; no other plugin is imported),
    a failure, or None when no plugin declares that name."""
    if name in _PLUGINS:
        return _PLUGINS[name]
    entries = _declared().get(name)
    if not entries:
        return None
    if len(entries) > 1:  # two distributions claim the name: neither is picked silently
        others = "; ".join(_origin(e) for e in entries[1:])
        return PluginFailure(name, _origin(entries[0]), f"the name is also declared by {others}")
    found = _load_entry(entries[0])
    if isinstance(found, MethodSpec):
        _PLUGINS[name] = found
    return found


def plugin_names() -> list[str]:
    """The names plugins declare (nothing loaded)."""
    return sorted(_declared())


def declared_implementation(name: str) -> str | None:
    """The implementation the catalog or a loaded plugin names for `name` (None: neither)."""
    spec = CATALOG.get(name) or _PLUGINS.get(name)
    return spec.implementation if spec else None


def note_registered(spec: MethodSpec | None, name: str) -> None:
    """Record (or, with None, forget) the spec of a class registered at run time under `name`."""
    if spec is None:
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = spec


def forget_plugin(name: str) -> None:
    """Drop a loaded plugin's spec: its entry point is read again on next use."""
    _PLUGINS.pop(name, None)


def listing() -> tuple[dict[str, MethodSpec], list[PluginFailure]]:
    """Every method (built-in, plugin, registered at run time; the last wins) and every plugin that failed
    to load. Loads every plugin's entry point (a spec's module only, when the entry point names a spec)."""
    specs = dict(CATALOG)
    failures = []
    for name in _declared():
        found = plugin(name)
        if isinstance(found, PluginFailure):
            failures.append(found)
        elif found is not None:
            specs[name] = found
    for name, spec in _REGISTERED.items():  # a plugin's class registering itself stays the plugin's
        if name not in specs or specs[name].implementation != spec.implementation:
            specs[name] = spec
    return dict(sorted(specs.items())), sorted(failures, key=lambda f: f.name)


def lookup(name: str) -> MethodSpec | PluginFailure | None:
    """One method's spec (a class registered at run time first; a plugin's entry point loaded, no other),
    the failure of the plugin of that name, or None when nothing has that name."""
    found = CATALOG.get(name) or plugin(name)
    registered = _REGISTERED.get(name)
    if registered is None:
        return found
    own = isinstance(found, MethodSpec) and found.implementation == registered.implementation
    return found if own else registered  # a plugin's class registering itself stays the plugin's


def known_names() -> list[str]:
    """Every name a run may give (plugins' declared names included, none of them loaded)."""
    return sorted({*CATALOG, *_PLUGINS, *_REGISTERED, *plugin_names()})
