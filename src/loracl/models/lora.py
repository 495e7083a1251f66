"""Thin helpers over stock PEFT LoRA layers: attach adapters, read and write their A/B matrices, save them.

Notation follows METHODS.md: per adapted linear layer, A is `lora_A` (r x n, acting on the input) and B is
`lora_B` (m x r); the update is s * B @ A with s = alpha / r.

Targets (`lora.target_modules`): layer names, or `[all-linear]` (PEFT's shorthand: every linear layer but
the output head). The default [q_proj, v_proj] names the attention's query and value projections of a
Llama-style model; on a T5-style model, whose attention layers are q, k, v, o, it stands for [q, v] (every
T5 block: encoder self-attention, decoder self-attention and cross-attention, as GainLoRA's authors adapt
T5). An encoder-decoder's adapters are PEFT's SEQ_2_SEQ_LM kind, a decoder-only model's CAUSAL_LM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from loracl.config import LoraSection
from loracl.engine import distributed
from loracl.engine.training import is_encoder_decoder
from loracl.errors import ConfigError
from loracl.models.base_model import quantization_of

DEFAULT_ADAPTER = "default"
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer except the output head
LLAMA_QV = ("q_proj", "v_proj")  # the default targets (LoraSection), named as Llama-style models name them
T5_QV = ("q", "v")  # the same layers of a T5-style attention
# How PEFT names a layer's factors in a saved weights file: <module path><suffix>, the adapter name left out.
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass
class LoraPair:
    """One layer's LoRA factors, detached float32 copies."""

    A: torch.Tensor  # r x n
    B: torch.Tensor  # m x r

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B))


LoraState = dict[str, LoraPair]  # layer name -> factors


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _has_layer(names: list[str], key: str) -> bool:
    return any(name == key or name.endswith("." + key) for name in names)


def target_modules(model: torch.nn.Module | None, lora: LoraSection) -> list[str] | str:
    """What PEFT is given as target_modules on `model` (a base model or a PeftModel): "all-linear" for
    [all-linear]; the default [q_proj, v_proj] as [q, v] on a T5-style model (no q_proj, but q and v
    layers); else the names as configured."""
    names = list(lora.target_modules)
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    if model is not None and sorted(names) == sorted(LLAMA_QV):
        layers = [name for name, _ in _base(model).named_modules()]
        if not _has_layer(layers, LLAMA_QV[0]) and all(_has_layer(layers, key) for key in T5_QV):
            return list(T5_QV)
    return names


def peft_config(lora: LoraSection, model: torch.nn.Module | None = None) -> LoraConfig:
    """PEFT's LoRA config for `model` (a base model or a PeftModel): its targets (`target_modules`) and its
    kind (SEQ_2_SEQ_LM for an encoder-decoder, CAUSAL_LM otherwise; without a model: the names as
    configured, CAUSAL_LM)."""
    seq2seq = model is not None and is_encoder_decoder(_base(model))
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(model, lora),
        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
    )


def _targeted(names: list[str], key: str) -> list[str]:
    """The module names PEFT adapts for one entry of a target_modules list (the name or a dotted suffix)."""
    return [name for name in names if name == key or name.endswith("." + key)]


def _all_linear(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> list[str]:
    """The layers "all-linear" adapts: every linear layer but the output head (PEFT leaves it out)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n and m is not head]


def check_lora_targets(model: torch.nn.Module, lora: LoraSection) -> None:
    """Refuse, before a run folder is written, LoRA targets PEFT would reject when it wraps the model or
    that would crash a later task: a name no layer has, a module that is not a linear layer, or a rank
    above a layer's smaller side (an orthogonal basis of r rows, SLAO's and InfLoRA's, cannot exist there)."""
    modules = dict(model.named_modules())
    linear = sorted(
        {n.rpartition(".")[2] for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n}
    )
    targets = target_modules(model, lora)
    if targets == ALL_LINEAR:
        targets, matches = [ALL_LINEAR], {ALL_LINEAR: _all_linear(model, modules)}
    else:
        matches = {key: _targeted(list(modules), key) for key in targets}
    for key in targets:
        matched = matches[key]
        if not matched:
            raise ConfigError(
                f"lora.target_modules: the model has no layer named {key!r} (its linear layers: "
                f"{', '.join(linear)})"
            )
        for name in matched:
            layer = modules[name]
            if not isinstance(layer, torch.nn.Linear):
                raise ConfigError(
                    f"lora.target_modules: {key!r} names {name}, a {type(layer).__name__}, not a linear "
                    f"layer (linear layers: {', '.join(linear)})"
                )
            width = min(layer.in_features, layer.out_features)
            if lora.r > width:
                raise ConfigError(
                    f"lora.r: {lora.r} is larger than layer {name} ({layer.in_features} -> "
                    f"{layer.out_features}) allows: at most {width}"
                )


def attach_lora(model: PreTrainedModel, lora: LoraSection, adapter: str = DEFAULT_ADAPTER) -> PeftModel:
    """Wrap a base model with one trainable LoRA adapter; the base weights stay frozen. On a quantised base
    (model.quantization) the LoRA weights are float32 whatever the base computes in, as QLoRA's (PEFT
    makes them so; this makes sure)."""
    wrapped = get_peft_model(model, peft_config(lora, model), adapter_name=adapter)
    if quantization_of(model) is not None:
        for name, param in wrapped.named_parameters():
            if "lora_" in name and param.dtype != torch.float32:
                param.data = param.data.float()
    return wrapped


def lora_layers(model: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def lora_weights(layer: LoraLayer, adapter: str = DEFAULT_ADAPTER) -> tuple[torch.nn.Parameter, ...]:
    """The live (A, B) parameters of one layer."""
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def get_lora_state(model: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> LoraState:
    state = {}
    for name, layer in lora_layers(model, adapter):
        A, B = lora_weights(layer, adapter)
        state[name] = LoraPair(A.detach().float().clone(), B.detach().float().clone())
    return state


@torch.no_grad()
def set_lora_state(model: torch.nn.Module, state: LoraState, adapter: str = DEFAULT_ADAPTER) -> None:
    layers = dict(lora_layers(model, adapter))
    if layers.keys() != state.keys():
        raise ValueError("LoRA state does not match the model's adapted layers")
    for name, pair in state.items():
        A, B = lora_weights(layers[name], adapter)
        A.copy_(pair.A.to(A.dtype))
        B.copy_(pair.B.to(B.dtype))


def set_trainable(model: torch.nn.Module, *, A: bool, B: bool, adapter: str = DEFAULT_ADAPTER) -> None:
    for _, layer in lora_layers(model, adapter):
        weight_A, weight_B = lora_weights(layer, adapter)
        weight_A.requires_grad_(A)
        weight_B.requires_grad_(B)


def reset_lora(model: torch.nn.Module, adapter: str = DEFAULT_ADAPTER) -> None:
    """Re-draw every layer's LoRA as PEFT initialises it (A random, B = 0)."""
    for _, layer in lora_layers(model, adapter):
        layer.reset_lora_parameters(adapter, init_lora_weights=True)


def state_nbytes(state: LoraState) -> int:
    return sum(pair.nbytes() for pair in state.values())


def adapter_nbytes(model: torch.nn.Module) -> int:
    """Bytes of every LoRA parameter held by the model (all adapters)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def read_adapter_state(directory: Path) -> LoraState:
    """The LoRA factors of an adapter saved in PEFT format, keyed by the saved module path (float32)."""
    from safetensors.torch import load_file

    return lora_state_of(load_file(str(Path(directory) / "adapter_model.safetensors")))


def lora_state_of(weights: dict[str, torch.Tensor]) -> LoraState:
    """The LoRA factors among the tensors of a PEFT weights file, keyed by the saved module path (float32
    copies); every layer's lora_A must have its lora_B."""
    state = {}
    for key, value in weights.items():
        if key.endswith(LORA_A_SUFFIX):
            layer = key.removesuffix(LORA_A_SUFFIX)
            state[layer] = LoraPair(value.float(), weights[layer + LORA_B_SUFFIX].float())
    return state


def save_adapter(model: PeftModel, directory: Path, adapter: str = DEFAULT_ADAPTER) -> None:
    """Save one adapter in stock PEFT format (adapter_config.json + adapter_model.safetensors); only the
    main process writes (the others hold identical copies), and a failed write stops every process."""
    distributed.on_main(lambda: _write_adapter(model, directory, adapter))


def _write_adapter(model: PeftModel, directory: Path, adapter: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: the adapters never touch embeddings, and PEFT's "auto" check would
    # look the base model up on the Hub.
    model.save_pretrained(str(directory), selected_adapters=[adapter], save_embedding_layers=False)
    if adapter != DEFAULT_ADAPTER:  # PEFT puts non-default adapters in a sub-folder; flatten it
        nested = directory / adapter
        for item in nested.iterdir():
            item.replace(directory / item.name)
        nested.rmdir()
