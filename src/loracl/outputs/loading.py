"""One loader for the `adapter/` folder of every method's run.

- A single-adapter folder (SLAO, SeqLoRA, GPM, ...) is a stock PEFT folder: `PeftModel.from_pretrained`.
- A multi-adapter folder (IncLoRA, O-LoRA, InfLoRA, GainLoRA) has a `loracl_adapter.json` manifest (layout in
  `loracl.models.multi_lora`): every task adapter is loaded by name through stock PEFT, all are made
  active, and the
  method named in the manifest restores its extra state (e.g. GainLoRA's gates) through its `restore` hook.

Before PEFT sees a folder, every adapter in it is checked against the base model: each adapted layer must
exist there with the shapes the LoRA factors need, and (when asked) the rank must be the expected one, so a
mismatch is one clear AdapterMismatchError instead of PEFT's size-mismatch traceback. The base model's name is
not compared: the same model loaded from another path (e.g. a GGUF cache folder) is still the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from loracl.errors import AdapterMismatchError
from loracl.models.multi_lora import activate_all, read_manifest

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names in saved keys


def _read_peft_folder(directory: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """An adapter folder's config and the shape of each saved tensor."""
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text(encoding="utf-8"))
        with safe_open(str(directory / PEFT_WEIGHTS), framework="pt") as weights:
            shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as exc:
        raise AdapterMismatchError(f"{directory}: not a readable PEFT adapter folder ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise AdapterMismatchError(f"{directory}/{PEFT_CONFIG}: no LoRA rank 'r'")
    return config, shapes


def _expected_shape(layer: torch.nn.Module, factor: str, rank: int) -> list[int] | None:
    """The shape lora_A (r x in) or lora_B (out x r) must have on `layer`; None if it is no linear layer."""
    if not isinstance(layer, torch.nn.Linear):
        return None
    return [rank, layer.in_features] if factor == "lora_A" else [layer.out_features, rank]


def check_adapter_fits(directory: Path, base_model: PreTrainedModel, rank: int | None = None) -> None:
    """Refuse (AdapterMismatchError) an adapter folder whose layers or rank do not fit `base_model`."""
    config, shapes = _read_peft_folder(directory)
    r = config["r"]
    if rank is not None and r != rank:
        raise AdapterMismatchError(f"{directory}: adapter of rank {r}, expected rank {rank}")
    modules = dict(base_model.named_modules())
    origin = f"made for {config.get('base_model_name_or_path')!r}"
    here = getattr(base_model, "name_or_path", "") or type(base_model).__name__
    for key, shape in shapes.items():
        module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".")[0].rpartition(".")
        if factor not in ("lora_A", "lora_B"):
            continue
        if module not in modules:
            raise AdapterMismatchError(f"{directory}: {origin}; base model {here!r} has no layer {module}")
        layer = getattr(modules[module], "base_layer", modules[module])  # a layer PEFT already wrapped
        expected = _expected_shape(layer, factor, r)
        if expected != shape:
            raise AdapterMismatchError(
                f"{directory}: {origin}; {module}.{factor} is {shape} but the base model {here!r} needs "
                f"{expected} (another base model or rank)"
            )


def load_adapter(path: str | Path, base_model: PreTrainedModel, rank: int | None = None) -> PeftModel:
    """The exported model of a run: `base_model` wrapped with the adapter(s) in `path`, in eval mode.

    `rank`, when given, is the LoRA rank every adapter must have."""
    from loracl.methods import method_class

    directory = Path(path)
    manifest = read_manifest(directory)
    folders = [directory] if manifest is None else [directory / name for name in manifest["adapters"]]
    for folder in folders:
        check_adapter_fits(folder, base_model, rank)
    if manifest is None:
        return PeftModel.from_pretrained(base_model, str(directory)).eval()
    first, *rest = manifest["adapters"]
    model = PeftModel.from_pretrained(base_model, str(directory / first), adapter_name=first)
    for name in rest:
        model.load_adapter(str(directory / name), adapter_name=name)
    activate_all(model, trainable=None)
    method_class(manifest["method"]).restore(model, directory, manifest)
    return model.eval()
