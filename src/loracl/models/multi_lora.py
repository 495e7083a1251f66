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

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from loracl.config import LoraSection
from loracl.models.lora import lora_layers, peft_config, save_adapter

MANIFEST = "loracl_adapter.json"
FORMAT = "loracl-multi-lora"


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
        model.add_adapter(name, peft_config(lora))


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
    manifest = {"format": FORMAT, "version": 1, "method": method, "adapters": names, "extra": extra or {}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown adapter format {manifest.get('format')!r}")
    return manifest
