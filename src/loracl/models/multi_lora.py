"""Several LoRAs on one model through stock PEFT named adapters (IncLoRA, O-LoRA, InfLoRA, GainLoRA).

All task adapters are active at once, so each adapted layer computes W0 x + sum_j s B_j A_j x (PEFT adds the
outputs of every active adapter); only the current task's adapter is trainable.

Export layout of a multi-adapter run's `adapter/` folder (read back by `loracl.outputs.loading.load_adapter`):

    adapter/
      loracl_adapter.json     {"format": "loracl-multi-lora", "version": 1, "method": <name>,
                               "adapters": ["task1", "task2", ...], "extra": {...method-specific files...}}
      task1/                  stock PEFT folder (adapter_config.json + adapter_model.safetensors)
      task2/
      ...                     plus any extra state files the manifest's "extra" names (e.g. GainLoRA's gates)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import PeftModel

from loracl.config import LoraSection
from loracl.errors import RunFolderError
from loracl.files import UnsafeFileError, read_bytes_limited, read_json_object, write_json_atomic
from loracl.models.lora import lora_layers, peft_config, save_adapter

MANIFEST = "loracl_adapter.json"
FORMAT = "loracl-multi-lora"
VERSION = 1


def task_adapter(index: int) -> str:
    """Name of the adapter of task `index` (1-based)."""
    return f"task{index}"


def task_adapters(model: PeftModel) -> list[str]:
    """The model's task adapters in task order."""
    names = [n for n in model.peft_config if n.startswith("task") and n[4:].isdigit()]
    return sorted(names, key=lambda n: int(n[4:]))


def add_task_adapter(model: PeftModel, lora: LoraSection, name: str) -> None:
    """A fresh PEFT LoRA (A random, B = 0) under `name`, unless it exists already."""
    if name not in model.peft_config:
        model.add_adapter(name, peft_config(lora, model))


def activate_all(model: PeftModel, trainable: str | None) -> None:
    """Make every task adapter active (the model is W0 + sum_j s B_j A_j) and only `trainable` trainable."""
    names = task_adapters(model)
    model.base_model.set_adapter(names, inference_mode=True)  # active, all frozen
    if trainable is not None:
        model.set_requires_grad(trainable, requires_grad=True)


def layer_map(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Module]:
    """Layer name -> LoraLayer for the layers that carry `adapter`."""
    return dict(lora_layers(model, adapter))


def save_task_adapters(
    model: PeftModel, directory: Path, method: str, extra: dict[str, Any] | None = None
) -> None:
    """Write every task adapter as a stock PEFT folder plus the manifest (layout in the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = task_adapters(model)
    for name in names:
        save_adapter(model, directory / name, name)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "adapters": names,
        "extra": extra or {},
    }
    write_json_atomic(manifest, directory / MANIFEST)  # never a torn manifest beside complete adapters


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The validated manifest of a multi-adapter folder; None when the folder has none (a plain PEFT folder).

    Refused with one RunFolderError line naming the file: unreadable or non-JSON content, another format or
    version, no adapters, adapter names that are not task1..taskN (a name with a path separator or `..`
    would point outside the folder; other names would not be activated by `activate_all`), a method name or
    `extra` of the wrong type. Whether the method exists and what `extra` must hold is the method's to say
    (`loracl.outputs.loading`)."""
    path = Path(directory) / MANIFEST
    manifest = read_json_object(path, RunFolderError)
    if manifest is None:
        return None
    version = manifest.get("version")
    if manifest.get("format") != FORMAT or type(version) is not int or version != VERSION:
        found = f"format {short(manifest.get('format'))}, version {short(version)}"
        raise RunFolderError(
            f"{path}: unknown adapter format ({found}; expected {FORMAT!r}, version {VERSION})"
        )
    if not isinstance(manifest.get("method"), str) or not manifest["method"]:
        raise RunFolderError(f"{path}: 'method' must be a method name")
    if not isinstance(manifest.setdefault("extra", {}), dict):
        raise RunFolderError(f"{path}: 'extra' must be a JSON object")
    _check_adapter_names(path, manifest.get("adapters"))
    return manifest


def _check_adapter_names(path: Path, names: Any) -> None:
    if not isinstance(names, list) or not names:
        raise RunFolderError(f"{path}: 'adapters' must be a non-empty list of adapter folder names")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise RunFolderError(
                f"{path}: adapter name {short(name)} is not a folder name inside the adapter folder"
            )
        if name in seen:
            raise RunFolderError(f"{path}: adapter {short(name)} is listed twice")
        seen.add(name)
    for index, name in enumerate(names, start=1):
        if name != task_adapter(index):
            raise RunFolderError(
                f"{path}: adapter {index} is {short(name)}; expected task1..task{len(names)} in order"
            )


def read_tensors(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file of an adapter folder (adapters, GainLoRA's gates), read whole so
    that a truncated or empty file is one RunFolderError line instead of a torn model later (`data`: the
    file's bytes, when the caller has read them already)."""
    try:
        return safetensors.torch.load(read_bytes_limited(path) if data is None else data)
    except UnsafeFileError as exc:
        raise RunFolderError(str(exc)) from None
    except Exception as exc:  # a torn header or data: SafetensorError, or OSError/ValueError from torch
        raise RunFolderError(
            f"{path}: not a readable safetensors file (truncated?): {short(exc, 120)}"
        ) from None


def short(value: Any, limit: int = 60) -> str:
    """repr() of a value read from a file, cut to `limit` characters: error lines stay short and single."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
