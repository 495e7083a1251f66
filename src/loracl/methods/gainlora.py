"""GainLoRA (Liang et al. 2025; METHODS.md "gainlora"): a LoRA branch and a gate per task,

    output = W0 x + sum_j g_j(x) s B_j A_j x,   g_j(x) = |2 sigma(4 cos(MLP_j(p(x)), k_j)) - 1|,

p(x) the mean input-token embedding of the prompt (non-padding prompt tokens), MLP_j two bias-free linear
layers with SiLU (hidden size 100, as the authors' code), k_j a learned key. Old branches and gates are
frozen. The new gate's first layer (the one acting on p(x)) is initialised, and kept after every update,
off the GPM basis of old tasks' gate inputs p(x): W1 M = 0, so for an old input in span(M) the MLP output is
0, its cosine with k_i is 0 and g_i(x) = 0. Branches are InfLoRA (default) or O-LoRA.

Stock PEFT does the branches; the gates act through forward hooks: a pre-hook on the decoder computes
g(x) (B x T) from the batch, and a forward hook on each `lora_B[task<j>]` scales that branch's output per
example by g_j. During KV-cache generation later steps see one token only, so the gates computed from the
prompt on the first forward are reused for the rest of that generate call. In training and statistics
passes `step_context` hands the gates the batch's prompt mask (labels == -100 on real tokens), so the gate
sees exactly the prompt, as in generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from loracl.engine.training import IGNORE
from loracl.errors import AdapterMismatchError, RunFolderError
from loracl.methods.context import TaskContext
from loracl.models.multi_lora import MANIFEST, layer_map, read_tensors, short, task_adapter, task_adapters
from loracl.models.subspace import gpm_threshold, gpm_update, project_off, vector_gram

from .base import register
from .inc_lora import IncLoRA
from .inflora import InfLoRA, SubspaceOptions
from .olora import olora_loss

GATES_FILE = "gates.safetensors"
ATTRIBUTE = "loracl_gates"  # the GateBank is registered on the PeftModel under this name
# The cosine is scale-invariant: an MLP output that is 0 only up to float32 rounding (~1e-8) still has an
# arbitrary direction and would give an arbitrary gate. The gates (a few d x 100 matrices) therefore live and
# compute in float64, with their GPM basis, so "W1 M = 0" makes g_i(x) = 0 on old inputs to ~1e-9.
GATE_DTYPE = torch.float64


def gate_value(out: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """|2 sigma(4 cos(out, key)) - 1| per row; 0 when out = 0 (cosine taken as 0)."""
    cos = F.cosine_similarity(out, key.expand_as(out), dim=-1, eps=1e-8)
    return (2 * torch.sigmoid(4 * cos) - 1).abs()


def masked_mean(embeddings: torch.Tensor, mask: torch.Tensor, dtype=GATE_DTYPE) -> torch.Tensor:
    """Mean over the positions where mask is 1: (B, L, d), (B, L) -> (B, d)."""
    weights = mask.to(dtype).unsqueeze(-1)
    return (embeddings.to(dtype) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class GateBank(nn.Module):
    """The gates g_1..g_T and the hooks that apply them to the branches of a PeftModel."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.mlps = nn.ModuleList()
        self.keys = nn.ParameterList()
        self.prompt_mask: torch.Tensor | None = None  # set by GainLoRA.step_context
        self.current: torch.Tensor | None = None  # gates of the batch being processed, B x T
        self._handles: list = []

    def add_gate(self) -> None:
        device = self.keys[0].device if len(self.keys) else None
        mlp = nn.Sequential(
            nn.Linear(self.dim, self.hidden, bias=False),
            nn.SiLU(),
            nn.Linear(self.hidden, self.dim, bias=False),
            nn.SiLU(),
        ).to(device=device, dtype=GATE_DTYPE)
        key = nn.Parameter(torch.empty(self.dim, device=device, dtype=GATE_DTYPE).uniform_(-1.0, 1.0))
        self.mlps.append(mlp)
        self.keys.append(key)

    def first_layer(self, j: int) -> torch.nn.Parameter:
        """W1 of gate j (hidden x dim): the layer acting on the gate input p(x)."""
        return self.mlps[j][0].weight

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """g_j(p) for every gate: (B, d) -> (B, T)."""
        if not len(self.mlps):
            return pooled.new_zeros(pooled.shape[0], 0)
        gates = [gate_value(mlp(pooled), key) for mlp, key in zip(self.mlps, self.keys, strict=True)]
        return torch.stack(gates, dim=1)

    # -- hooks on the model ---------------------------------------------------------------------
    def install(self, model: PeftModel) -> None:
        """Register the decoder pre-hook computing g(x) and a scaling hook on every branch present."""
        decoder = model.get_base_model().get_decoder()
        embed = model.get_base_model().get_input_embeddings()

        def pre_hook(_module, args, kwargs):
            cache = kwargs.get("past_key_values")
            if cache is not None and self.current is not None and cache.get_seq_length() > 0:
                return  # a later decoding step: keep the gates of this generate call's prompt
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = kwargs.get("inputs_embeds")
            embeds = embed(ids) if embeds is None else embeds
            mask = self.prompt_mask if self.prompt_mask is not None else kwargs.get("attention_mask")
            if mask is None or mask.dim() != 2:
                mask = torch.ones(embeds.shape[:2], device=embeds.device)
            self.current = self(masked_mean(embeds, mask))

        self._handles.append(decoder.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for j, name in enumerate(task_adapters(model)[: len(self.mlps)]):
            self.hook_branch(model, j, name)

    def hook_branch(self, model: PeftModel, j: int, adapter: str) -> None:
        """Scale the output of branch `adapter` per example by g_j."""

        def hook(_module, _args, output):
            g = self.current[:, j].to(output.dtype)
            return output * g.view(-1, *([1] * (output.dim() - 1)))

        for layer in layer_map(model, adapter).values():
            self._handles.append(layer.lora_B[adapter].register_forward_hook(hook))

    @contextlib.contextmanager
    def prompt_only(self, mask: torch.Tensor) -> Iterator[None]:
        self.prompt_mask = mask
        try:
            yield
        finally:
            self.prompt_mask = None
            self.current = None

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def prompt_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real tokens that carry no loss: the prompt (collate() puts -100 on prompt and padding)."""
    return (batch["labels"] == IGNORE) & batch["attention_mask"].bool()


class GainLoRAOptions(SubspaceOptions):
    branch: Literal["inflora", "olora"] = "inflora"
    gate_hidden: int = 100  # hidden width of each gate's MLP (authors' code)
    lambda1: float = 0.5  # O-LoRA branch only
    lambda2: float = 0.0  # O-LoRA branch only


@register
class GainLoRA(InfLoRA):
    name = "gainlora"
    summary = "a LoRA branch + a gate per task; new gates kept ~0 on old inputs (GPM on gate inputs)"
    data_free = True
    memory_growth = "O(T): one LoRA and one gate MLP per task, plus per-layer input bases"
    merge_obstacle = "each task's LoRA is scaled by a gate computed from the input, unlike a fixed weight"
    Options = GainLoRAOptions
    options: GainLoRAOptions
    state_attributes = (*InfLoRA.state_attributes, "gate_basis")
    manifest_extra = ("gates", "gate_dim", "gate_hidden", "gate_count")  # what export_extra writes

    def __init__(self, options, lora) -> None:
        super().__init__(options, lora)
        self.gate_basis: torch.Tensor | None = None  # GPM basis of old tasks' p(x), d x k

    @staticmethod
    def bank(model: PeftModel) -> GateBank:
        return getattr(model, ATTRIBUTE)

    def prepare_model(self, base) -> PeftModel:
        model = super().prepare_model(base)
        dim = base.get_input_embeddings().weight.shape[1]
        bank = GateBank(dim, self.options.gate_hidden).to(next(model.parameters()).device)
        setattr(model, ATTRIBUTE, bank)
        bank.install(model)
        return model

    def rebuild(self, model: PeftModel, finished: int) -> None:
        """The gates of the finished tasks, frozen and hooked on their branches as add_gate left them."""
        bank = self.bank(model)
        for j in range(finished):
            bank.add_gate()
            bank.hook_branch(model, j, task_adapter(j + 1))
        bank.requires_grad_(False)

    def step_context(self, model: PeftModel, batch: dict[str, torch.Tensor]):
        return self.bank(model).prompt_only(prompt_mask(batch))

    @torch.no_grad()
    def add_gate(self, model: PeftModel, ctx: TaskContext) -> None:
        """Gate i: fresh, W1 projected off old gate inputs; old gates frozen; branch i scaled by it."""
        bank = self.bank(model)
        for p in bank.parameters():
            p.requires_grad_(False)
        bank.add_gate()
        W1 = bank.first_layer(ctx.index - 1)
        W1.copy_(project_off(W1, self.gate_basis))
        bank.hook_branch(model, ctx.index - 1, task_adapter(ctx.index))

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        if self.options.branch == "inflora":
            super().before_task(model, ctx)  # InfLoRA: add branch, design A_i, freeze it
        else:
            IncLoRA.before_task(self, model, ctx)
        self.add_gate(model, ctx)

    def extra_loss(self, model: PeftModel, batch: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if self.options.branch == "olora":
            return olora_loss(model, self.options.lambda1, self.options.lambda2)
        return None

    @torch.no_grad()
    def after_backward(self, model: PeftModel) -> None:
        W1 = self.bank(model).first_layer(-1)
        if W1.grad is not None:
            W1.grad.copy_(project_off(W1.grad, self.gate_basis))

    @torch.no_grad()
    def after_optimizer_step(self, model: PeftModel) -> None:
        W1 = self.bank(model).first_layer(-1)  # AdamW's update is not the projected gradient: re-project
        W1.copy_(project_off(W1, self.gate_basis))

    @torch.no_grad()
    def gate_inputs(self, model: PeftModel, ctx: TaskContext) -> torch.Tensor:
        """p(x) of this process's share of the task's sampled examples (prompt tokens), N x d."""
        embed = model.get_base_model().get_input_embeddings()
        rows = [
            masked_mean(embed(b["input_ids"]), prompt_mask(b)) for b in ctx.batches(self.options.max_examples)
        ]
        dim = embed.weight.shape[1]
        return torch.cat(rows) if rows else torch.zeros(0, dim, dtype=GATE_DTYPE, device=embed.weight.device)

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        if self.options.branch == "inflora":
            super().after_task(model, ctx)  # extend the branches' input bases
        eps = gpm_threshold(ctx.index, self.options.threshold, self.options.threshold_step)
        gram = ctx.all_reduce({"gate": vector_gram(self.gate_inputs(model, ctx))})["gate"]
        self.gate_basis = gpm_update(self.gate_basis, gram, eps)

    def export_extra(self, model: PeftModel, directory: Path) -> dict[str, Any]:
        bank = self.bank(model)
        state = {k: v.detach().contiguous() for k, v in bank.state_dict().items()}
        save_file(state, str(directory / GATES_FILE))
        count = len(bank.mlps)
        return {"gates": GATES_FILE, "gate_dim": bank.dim, "gate_hidden": bank.hidden, "gate_count": count}

    @classmethod
    def check_extra(cls, directory: Path, manifest: dict[str, Any]) -> None:
        """Besides the keys: one gate per adapter, and a gates file whose tensors are exactly those gates."""
        super().check_extra(directory, manifest)
        cls._read_gates(directory, manifest)

    @classmethod
    def _read_gates(cls, directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The gate tensors of an exported folder, checked against the manifest (RunFolderError otherwise)."""
        extra, where = manifest["extra"], Path(directory) / MANIFEST
        if extra["gates"] != GATES_FILE:  # the only name export writes; any other could point anywhere
            raise RunFolderError(f"{where}: extra.gates is {short(extra['gates'])}, expected {GATES_FILE!r}")
        for key in ("gate_dim", "gate_hidden", "gate_count"):
            if type(extra[key]) is not int or extra[key] <= 0:
                raise RunFolderError(
                    f"{where}: extra.{key} is {short(extra[key])}, expected a positive integer"
                )
        count, tasks = extra["gate_count"], len(manifest["adapters"])
        if count != tasks:
            raise RunFolderError(f"{where}: {count} gates for {tasks} adapters (one per task)")
        path = Path(directory) / GATES_FILE
        gates = read_tensors(path)
        expected = {k: list(v.shape) for k, v in cls._gate_bank(extra, "meta").state_dict().items()}
        found = {k: list(v.shape) for k, v in gates.items()}
        if found != expected:
            key = next(k for k in sorted(found.keys() | expected.keys()) if found.get(k) != expected.get(k))
            raise RunFolderError(
                f"{path}: does not hold the {extra['gate_count']} gates the manifest describes "
                f"({short(key)}: {found.get(key)} in the file, {expected.get(key)} expected)"
            )
        return gates

    @staticmethod
    def _gate_bank(extra: dict[str, Any], device: str | None = None) -> GateBank:
        """A GateBank shaped as `extra` describes (on the meta device: shapes only, no memory)."""
        with torch.device(device) if device else contextlib.nullcontext():
            bank = GateBank(extra["gate_dim"], extra["gate_hidden"])
            for _ in range(extra["gate_count"]):
                bank.add_gate()
        return bank

    @classmethod
    def restore(cls, model: PeftModel, directory: Path, manifest: dict[str, Any]) -> None:
        extra = manifest["extra"]
        gates = cls._read_gates(directory, manifest)
        dim = model.get_base_model().get_input_embeddings().weight.shape[1]
        if extra["gate_dim"] != dim:
            raise AdapterMismatchError(
                f"{Path(directory) / MANIFEST}: gates of input size {extra['gate_dim']}, but the base "
                f"model's embeddings have size {dim} (another base model)"
            )
        bank = cls._gate_bank(extra)
        bank.load_state_dict(gates)
        bank.requires_grad_(False)
        bank.to(next(model.parameters()).device)
        setattr(model, ATTRIBUTE, bank)
        bank.install(model)

    def adapter_bytes(self, model: PeftModel) -> int:
        return super().adapter_bytes(model) + self.bank(model).nbytes()

    def state_bytes(self) -> int:
        extra = 0 if self.gate_basis is None else self.gate_basis.numel() * self.gate_basis.element_size()
        return super().state_bytes() + extra
