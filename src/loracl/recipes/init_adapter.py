"""`lora.init_adapter` (`loracl run --init-adapter DIR`): a run that starts from an existing PEFT LoRA folder,
taken as the result of a task 0 trained before the run and never evaluated.

After the method's `prepare_model` the folder's factors go to the method's `adopt` hook
(loracl.methods.base), which leaves the adapter as training task 0 would have and the method's state as its
`after_task` would have, as far as that needs no data of task 0: a method that needs it (input bases, a
Fisher, a memory of examples) says why in `init_adapter_obstacle` and the run is refused. For the method the
adopted task is its task 1, so the run's first task is its task 2 (ContinualRun.tasks_before).

Everything is checked before the run directory is written (`read_init_adapter` before the model loads,
`adopt_init_adapter` before `prepare_run` creates the directory), each refusal one line: a method that
cannot, a folder that is missing, not a readable PEFT LoRA folder or a LoRA variant, another rank or alpha
than lora.r / lora.alpha, another base model than the run's, other layers than the run adapts, or factors of
other shapes than the model's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from peft import PeftModel

from loracl.config import LoraSection, RunConfig
from loracl.errors import AdapterMismatchError, ConfigError, RunFolderError
from loracl.files import UnsafeFileError, read_bytes_limited
from loracl.methods import ContinualMethod, available_methods
from loracl.models.base_model import LoadedModel
from loracl.models.lora import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LoraState,
    lora_layers,
    lora_state_of,
    lora_weights,
    target_modules,
)
from loracl.models.multi_lora import MANIFEST, read_manifest, short
from loracl.outputs.loading import PEFT_WEIGHTS, PeftFolder, read_peft_folder

# LoRA variants a run does not train: DoRA's magnitudes, rsLoRA's scaling alpha / sqrt(r), per-layer ranks
# or alphas, extra trained modules. Taken as plain LoRA, they would be another model than the one saved.
VARIANT_KEYS = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")


class Adopter(Protocol):
    """What adoption reads of the run (a ContinualRun, right after the method's prepare_model)."""

    config: RunConfig
    method: ContinualMethod
    loaded: LoadedModel
    model: PeftModel


@dataclass
class InitAdapter:
    """The folder of `lora.init_adapter`, read and checked without the model, and its weights' sha256."""

    folder: PeftFolder
    sha256: str

    @property
    def where(self) -> str:
        return f"lora.init_adapter: {self.folder.directory}"

    def record(self) -> dict[str, str]:
        """What results.json keeps of it."""
        return {"folder": str(self.folder.directory), "sha256": self.sha256}


def read_init_adapter(config: RunConfig, method: ContinualMethod) -> InitAdapter | None:
    """The init adapter of the run (None without one), refused in one line when the method cannot start
    from an adapter or the folder is no readable LoRA of the run's rank and alpha."""
    if config.lora.init_adapter is None:
        return None
    check_method(method)
    init = InitAdapter(*_read_folder(Path(config.lora.init_adapter)))
    check_lora_config(init, config.lora)
    return init


def check_method(method: ContinualMethod) -> None:
    obstacle = method.init_adapter_obstacle
    if obstacle:
        able = sorted(name for name, cls in available_methods().items() if cls.init_adapter_obstacle is None)
        raise ConfigError(
            f"lora.init_adapter: method {method.name!r} cannot start from an adapter ({obstacle}); "
            f"methods that can: {', '.join(able)}"
        )


def _read_folder(directory: Path) -> tuple[PeftFolder, str]:
    """The folder's config and tensors, and the sha256 of its weights file."""
    if not directory.is_dir():
        raise ConfigError(f"lora.init_adapter: {directory} is not a folder")
    try:
        if read_manifest(directory) is not None:
            raise AdapterMismatchError(
                f"{directory} holds several adapters ({MANIFEST}); give one PEFT LoRA folder, e.g. "
                f"{directory / 'task1'}"
            )
        folder = read_peft_folder(directory)
        digest = hashlib.sha256(read_bytes_limited(directory / PEFT_WEIGHTS)).hexdigest()
    except (AdapterMismatchError, RunFolderError, UnsafeFileError) as exc:
        raise AdapterMismatchError(f"lora.init_adapter: {exc}") from None
    return folder, digest


def check_lora_config(init: InitAdapter, lora: LoraSection) -> None:
    """A plain LoRA (PEFT type LORA, no variant) of rank lora.r and alpha lora.alpha."""
    config = init.folder.config
    if config.get("peft_type") != "LORA":
        raise AdapterMismatchError(
            f"{init.where} is not a LoRA adapter (peft_type {short(config.get('peft_type'))})"
        )
    variant = next((key for key in VARIANT_KEYS if config.get(key)), None)
    if variant is not None:
        raise AdapterMismatchError(f"{init.where}: a LoRA variant ({variant}) that this run does not train")
    if config["r"] != lora.r:
        # the likeliest larger rank: a merging run's adapter/, its full-rank merge (METHODS.md), not a LoRA
        # that run trained; that one is in its tasks/<k>-<task>/adapter_ft
        hint = "; from a merging run, give its tasks/<k>-<task>/adapter_ft" if config["r"] > lora.r else ""
        raise AdapterMismatchError(
            f"{init.where}: LoRA rank {config['r']}, but this run's lora.r is {lora.r}{hint}"
        )
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha != lora.alpha:
        raise AdapterMismatchError(
            f"{init.where}: lora_alpha {short(alpha)}, but this run's lora.alpha is {lora.alpha:g}"
        )


def adopt_init_adapter(init: InitAdapter, run: Adopter) -> None:
    """Check the adapter against the model the method's `prepare_model` wrapped (base model, adapted layers,
    shapes), then hand its factors, on the device of the model's LoRA, to the method's `adopt`."""
    check_base_model(init, run.loaded)
    adapter = next(iter(run.model.peft_config))  # the LoRA prepare_model attached: what task 0 trained
    layers = dict(lora_layers(run.model, adapter))
    state = _lora_factors(init)
    check_layers(init, set(state), set(layers), target_modules(run.model, run.config.lora))
    for name, pair in state.items():
        A, B = lora_weights(layers[name], adapter)
        for factor, given, live in (("lora_A", pair.A, A), ("lora_B", pair.B, B)):
            if given.shape != live.shape:
                raise AdapterMismatchError(
                    f"{init.where}: {name}.{factor} is {list(given.shape)}, but this run's model needs "
                    f"{list(live.shape)} (another base model?)"
                )
        pair.A, pair.B = pair.A.to(A.device), pair.B.to(B.device)
    run.method.adopt(run.model, state)


def check_base_model(init: InitAdapter, loaded: LoadedModel) -> None:
    """The base model the adapter names (when it names one) is the run's: its name in the config, the path
    it was loaded from (what loracl's own adapters record), or the same folder by another path."""
    recorded = init.folder.config.get("base_model_name_or_path")
    if recorded is None or recorded == "":
        return
    ours = {loaded.name, loaded.path, getattr(loaded.model, "name_or_path", "") or loaded.name}
    if isinstance(recorded, str) and (recorded in ours or any(_same_folder(recorded, p) for p in ours)):
        return
    raise AdapterMismatchError(
        f"{init.where}: made for base model {short(recorded)}, but this run's model is {loaded.name!r}"
    )


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is no existing path
        return False


def _lora_factors(init: InitAdapter) -> LoraState:
    """The folder's tensors as LoRA factors by layer: refused when a tensor is no LoRA factor (a trained
    bias, an embedding) or a layer lacks lora_A or lora_B."""
    tensors: dict[str, Any] = init.folder.tensors
    for key in sorted(tensors):
        if not key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
            raise AdapterMismatchError(f"{init.where}: {key} in {PEFT_WEIGHTS} is no LoRA factor")
        twin = key[: -len(LORA_A_SUFFIX)] + (LORA_B_SUFFIX if key.endswith(LORA_A_SUFFIX) else LORA_A_SUFFIX)
        if twin not in tensors:
            raise AdapterMismatchError(f"{init.where}: {PEFT_WEIGHTS} has {key} but no {twin}")
    return lora_state_of(tensors)


def check_layers(init: InitAdapter, given: set[str], adapted: set[str], targets: list[str] | str) -> None:
    """The adapter's layers are exactly those the run adapts (lora.target_modules on this model)."""
    if given == adapted:
        return
    missing, extra = sorted(adapted - given), sorted(given - adapted)
    example = (
        f"no LoRA on {missing[0]}" if missing else f"a LoRA on {extra[0]}, which this run does not adapt"
    )
    on = targets if isinstance(targets, str) else ", ".join(targets)
    raise AdapterMismatchError(
        f"{init.where}: it adapts {_kinds(given)}, this run {_kinds(adapted)} (lora.target_modules: {on}): "
        f"{example}"
    )


def _kinds(layers: set[str]) -> str:
    """E.g. "q_proj, v_proj (4 layers)": the adapted layers' names without their paths, and how many."""
    names = ", ".join(sorted({name.rpartition(".")[2] for name in layers})) or "nothing"
    return f"{names} ({len(layers)} layers)"
