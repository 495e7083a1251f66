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

A damaged folder is refused before any model is touched (`read_adapter_folder`): a manifest that is not
the layout, names no adapter folder that exists, or whose `extra` does not fit its method (the method's
`check_extra`), an adapter whose files are unreadable or truncated (every tensor is read). After PEFT has
loaded the adapters, every saved LoRA tensor must sit, with its saved value, in the module PEFT built for
it, and no LoRA module may lack a saved tensor: PEFT drops whatever an edited `target_modules` does not
cover with no more than a warning, and would silently evaluate (or merge) the bare base model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from transformers import PreTrainedModel

from loracl.errors import AdapterMismatchError, ConfigError, RunFolderError
from loracl.files import UnsafeFileError, read_json_limited
from loracl.methods import ContinualMethod, method_class
from loracl.models.lora import DEFAULT_ADAPTER
from loracl.models.multi_lora import MANIFEST, activate_all, read_manifest, read_tensors, short

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of the base model's module names in saved keys
# What PEFT raises for a config it cannot apply (target modules not found, unknown PEFT type, values of
# the wrong type, tensors that do not fit): all mean the folder does not fit, reported as one line.
PEFT_LOAD_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, OSError)


@dataclass
class PeftFolder:
    """One stock PEFT adapter folder as saved: its config and every tensor of its weights file."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class AdapterFolder:
    """An adapter folder read and checked without a model: its manifest (None for a plain PEFT folder), the
    method that restores its extra state, and its PEFT folders by adapter name, in loading order."""

    directory: Path
    manifest: dict[str, Any] | None
    method: type[ContinualMethod] | None
    adapters: dict[str, PeftFolder]


def read_peft_folder(directory: Path) -> PeftFolder:
    """An adapter folder's config (it must give the LoRA rank) and every saved tensor."""
    try:
        config = read_json_limited(directory / PEFT_CONFIG)
    except UnsafeFileError as exc:
        raise AdapterMismatchError(f"{directory}: not a readable PEFT adapter folder ({exc})") from None
    if not isinstance(config, dict) or type(config.get("r")) is not int or config["r"] <= 0:
        raise AdapterMismatchError(f"{directory}/{PEFT_CONFIG}: no LoRA rank 'r'")
    return PeftFolder(directory, config, read_tensors(directory / PEFT_WEIGHTS))


def _manifest_method(directory: Path, manifest: dict[str, Any]) -> type[ContinualMethod]:
    try:
        return method_class(manifest["method"])
    except ConfigError:
        raise RunFolderError(f"{directory / MANIFEST}: unknown method {short(manifest['method'])}") from None


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Read and check everything in an adapter folder that can be checked without the base model."""
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest is None:
        return AdapterFolder(directory, None, None, {DEFAULT_ADAPTER: read_peft_folder(directory)})
    method = _manifest_method(directory, manifest)
    for name in manifest["adapters"]:
        if not (directory / name).is_dir():
            raise RunFolderError(f"{directory / MANIFEST}: adapter folder {name}/ is missing")
    method.check_extra(directory, manifest)
    adapters = {name: read_peft_folder(directory / name) for name in manifest["adapters"]}
    return AdapterFolder(directory, manifest, method, adapters)


def _expected_shape(layer: torch.nn.Module, factor: str, rank: int) -> list[int] | None:
    """The shape lora_A (r x in) or lora_B (out x r) must have on `layer`; None if it is no linear layer."""
    if not isinstance(layer, torch.nn.Linear):
        return None
    return [rank, layer.in_features] if factor == "lora_A" else [layer.out_features, rank]


def _check_fits(adapter: PeftFolder, base_model: PreTrainedModel, rank: int | None) -> None:
    directory, config = adapter.directory, adapter.config
    r = config["r"]
    if rank is not None and r != rank:
        raise AdapterMismatchError(f"{directory}: adapter of rank {r}, expected rank {rank}")
    modules = dict(base_model.named_modules())
    origin = f"made for {short(config.get('base_model_name_or_path'))}"
    here = getattr(base_model, "name_or_path", "") or type(base_model).__name__
    for key, tensor in sorted(adapter.tensors.items()):
        module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".")[0].rpartition(".")
        if factor not in ("lora_A", "lora_B"):
            continue
        if module not in modules:
            raise AdapterMismatchError(f"{directory}: {origin}; base model {here!r} has no layer {module}")
        layer = getattr(modules[module], "base_layer", modules[module])  # a layer PEFT already wrapped
        expected, shape = _expected_shape(layer, factor, r), list(tensor.shape)
        if expected != shape:
            raise AdapterMismatchError(
                f"{directory}: {origin}; {module}.{factor} is {shape} but the base model {here!r} needs "
                f"{expected} (another base model or rank)"
            )


@contextlib.contextmanager
def _peft_loading(directory: Path) -> Iterator[None]:
    """PEFT's exceptions as one line; its warning about keys it did not load is left to `_check_loaded`,
    which refuses the folder instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*missing adapter keys")
        try:
            yield
        except PEFT_LOAD_ERRORS as exc:
            reason = " ".join(str(exc).strip("'\"").split())[:200]  # KeyError quotes its message
            raise AdapterMismatchError(f"{directory}: PEFT cannot load this adapter: {reason}") from None


def _layer(key: str) -> str:
    return key.removeprefix(PEFT_PREFIX).removesuffix(".weight")


def _check_loaded(model: PeftModel, name: str, adapter: PeftFolder) -> None:
    """Every tensor of the adapter's file loaded, with its value, and no LoRA module the file did not give."""
    loaded = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    saved, where = adapter.tensors, adapter.directory
    missing = sorted(saved.keys() - loaded.keys())
    if missing:
        raise AdapterMismatchError(
            f"{where}: {_layer(missing[0])} saved in {PEFT_WEIGHTS} was not loaded ({len(missing)} tensors "
            f"dropped; does {PEFT_CONFIG}'s target_modules still name its layers?)"
        )
    added = sorted(loaded.keys() - saved.keys())
    if added:
        raise AdapterMismatchError(
            f"{where}: {PEFT_CONFIG} puts LoRA on {_layer(added[0])}, which {PEFT_WEIGHTS} does not provide "
            f"({len(added)} tensors; was target_modules edited?)"
        )
    for key, value in saved.items():
        here = loaded[key].detach().cpu()
        if not torch.equal(here, value.to(here.dtype)):
            raise AdapterMismatchError(f"{where}: {_layer(key)} loaded with other values than {PEFT_WEIGHTS}")


def _load_peft(folder: AdapterFolder, base_model: PreTrainedModel) -> PeftModel:
    """Every adapter of the folder on `base_model` by name, through stock PEFT."""
    model: PeftModel | None = None
    for name, adapter in folder.adapters.items():
        with _peft_loading(adapter.directory):
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(adapter.directory), adapter_name=name)
            else:
                model.load_adapter(str(adapter.directory), adapter_name=name)
        _check_loaded(model, name, adapter)
    assert model is not None  # read_manifest refuses a manifest without adapters
    return model


def load_adapter(path: str | Path, base_model: PreTrainedModel, rank: int | None = None) -> PeftModel:
    """The exported model of a run: `base_model` wrapped with the adapter(s) in `path`, in eval mode.

    `rank`, when given, is the LoRA rank every adapter must have."""
    folder = read_adapter_folder(path)
    for adapter in folder.adapters.values():
        _check_fits(adapter, base_model, rank)
    model = _load_peft(folder, base_model)
    if folder.manifest is not None:
        activate_all(model, trainable=None)
        folder.method.restore(model, folder.directory, folder.manifest)
    return model.eval()
