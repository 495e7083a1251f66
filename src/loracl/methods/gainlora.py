"""GainLoRA (Liang et al. 2025; METHODS.md "gainlora"): a LoRA branch and a gate per task,

    output = W0 x + sum_j g_j(x) s B_j A_j x,   g_j(x) = |2 sigma(4 cos(MLP_j(p(x)), k_j)) - 1|,

p(x) the mean input-token embedding of the prompt (non-padding prompt tokens), MLP_j two bias-free linear
layers with SiLU (hidden size 100, as the authors' code), k_j a learned key. Old branches and gates are
frozen. Branches are InfLoRA (default) or O-LoRA. The gate of task i, as the authors' code
(liangyanshuo/gainlora, `cl_trainer_gainlora_inflora.py`) builds it:
  - its MLP starts as a copy of gate i-1's (random for task 1), so on old inputs it answers as gate i-1;
  - its key starts as the top singular direction of the MLP's outputs on task i's prompts, projected off
    the old tasks' output basis, with the norm of the previous key: the gate opens on its own task from the
    first step (|cos| near 1) and stays shut on old inputs, whose outputs are orthogonal to it;
  - after every optimizer step the updates of W1, W2 and the key are projected off three bases of old tasks'
    values: gate inputs p(x), hidden activations SiLU(W1 p) and MLP outputs, each row then rescaled to the
    norm the step gave it (the authors' code does); the bases follow the DualGPM rule (METHODS.md) with
    epsilon_0 `gate_threshold` (the authors' `transthreshold`, 0.995).
So on an old input the MLP output stays (up to the rescaling) what gate i-1 gave, inside the old outputs'
span, and its cosine with k_i stays near 0: g_i(x) is near 0. `method_info` reports g_i on its own task's
training prompts and, from the evaluations after the task, on every old task's test prompts.

Stock PEFT does the branches; the gates act through forward hooks: a pre-hook on the decoder computes
g(x) (B x T) from the batch, and a forward hook on each `lora_B[task<j>]` scales that branch's output per
example by g_j. During KV-cache generation later steps see one token only, so the gates computed from the
prompt on the first forward are reused for the rest of that generate call. In training and statistics
passes `step_context` hands the gates the batch's prompt mask (labels == -100 on real tokens), so the gate
sees exactly the prompt, as in generation.

On an encoder-decoder (T5, as the authors' `t5_large.py`) the pre-hook sits on the encoder: p(x) is the
mean of the encoder's input embeddings over its attention mask (the prompt is all the encoder reads), and
the gates scale the branches of both stacks. Generation runs the encoder once per generate call, so the
gates it computes there serve every decoding step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from loracl.engine import distributed
from loracl.engine.training import IGNORE, is_encoder_decoder, is_seq2seq_batch
from loracl.errors import AdapterMismatchError, RunFolderError
from loracl.methods.context import TaskContext
from loracl.models.multi_lora import MANIFEST, layer_map, read_tensors, short, task_adapter, task_adapters
from loracl.models.subspace import (
    basis_nbytes,
    complement_directions,
    vector_gram,
)

from .base import register
from .inc_lora import IncLoRA
from .inflora import InfLoRA
from .olora import olora_loss
from .options import GainLoRAOptions  # torch-free, so that `loracl methods` can list them

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
        self.recorded: list[torch.Tensor] | None = None  # when a list: every prompt's gates are appended
        self.pooled_trains = False  # whether p(x) of the batch being processed requires a gradient
        self._handles: list = []

    def add_gate(self, copy_previous: bool = False) -> None:
        """A new gate: random, or (copy_previous) with the MLP and key of the last gate."""
        device = self.keys[0].device if len(self.keys) else None
        mlp = nn.Sequential(
            nn.Linear(self.dim, self.hidden, bias=False),
            nn.SiLU(),
            nn.Linear(self.hidden, self.dim, bias=False),
            nn.SiLU(),
        ).to(device=device, dtype=GATE_DTYPE)
        key = nn.Parameter(torch.empty(self.dim, device=device, dtype=GATE_DTYPE).uniform_(-1.0, 1.0))
        if copy_previous and len(self.mlps):
            mlp.load_state_dict(self.mlps[-1].state_dict())
            key.data.copy_(self.keys[-1].detach())
        self.mlps.append(mlp)
        self.keys.append(key)

    def projected_parameters(self, j: int) -> dict[str, torch.nn.Parameter]:
        """The parameters of gate j whose updates are projected, by the name of the basis of their inputs:
        W1 acts on p(x), W2 on the hidden activations, and the key is compared with the MLP's outputs."""
        return {"input": self.mlps[j][0].weight, "hidden": self.mlps[j][2].weight, "output": self.keys[j]}

    @staticmethod
    def values(mlp: nn.Module, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each projected parameter of a gate sees on the pooled prompts p: p, SiLU(W1 p), MLP(p)."""
        hidden = mlp[1](mlp[0](pooled))
        return {"input": pooled, "hidden": hidden, "output": mlp[3](mlp[2](hidden))}

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """g_j(p) for every gate: (B, d) -> (B, T)."""
        if not len(self.mlps):
            return pooled.new_zeros(pooled.shape[0], 0)
        gates = [gate_value(mlp(pooled), key) for mlp, key in zip(self.mlps, self.keys, strict=True)]
        return torch.stack(gates, dim=1)

    # -- hooks on the model ---------------------------------------------------------------------
    def install(self, model: PeftModel) -> None:
        """Register the pre-hook computing g(x), on the decoder (the encoder of an encoder-decoder), and a
        scaling hook on every branch present."""
        base = model.get_base_model()
        first = base.get_encoder() if is_encoder_decoder(base) else base.get_decoder()
        embed = base.get_input_embeddings()

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
            pooled = masked_mean(embeds, mask)
            self.pooled_trains = pooled.requires_grad
            self.current = self(pooled)
            if self.recorded is not None and not distributed.padding_pass():
                self.recorded.append(self.current.detach())

        self._handles.append(first.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for j, name in enumerate(task_adapters(model)[: len(self.mlps)]):
            self.hook_branch(model, j, name)

    def hook_branch(self, model: PeftModel, j: int, adapter: str) -> None:
        """Scale the output of branch `adapter` per example by g_j."""

        def hook(_module, _args, output):
            g = self.current[:, j]
            if not self.gate_trains(j):
                # No gradient through g_j reaches a trainable parameter, but as a column of the stacked
                # gates it still asks for one, and autograd would then keep this branch's whole output
                # (B x T x out) until backward: about 270 MiB per old branch at 8 x 384 tokens on
                # SmolLM2-135M in float32 (benchmarks/adapter_growth.py, step_saved_mib).
                g = g.detach()
            g = g.to(output.dtype)
            return output * g.view(-1, *([1] * (output.dim() - 1)))

        for layer in layer_map(model, adapter).values():
            self._handles.append(layer.lora_B[adapter].register_forward_hook(hook))

    def gate_trains(self, j: int) -> bool:
        """Whether a gradient of g_j can reach a trainable parameter: gate j's own, or the embeddings that
        p(x) is computed from (frozen under LoRA, checked in case a user trains them)."""
        own = any(p.requires_grad for p in self.mlps[j].parameters()) or self.keys[j].requires_grad
        return own or self.pooled_trains

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
    """Real tokens that carry no loss: the prompt (collate() puts -100 on prompt and padding); in an
    encoder-decoder's batch, the encoder's input (its attention mask)."""
    if is_seq2seq_batch(batch):
        return batch["attention_mask"].bool()
    return (batch["labels"] == IGNORE) & batch["attention_mask"].bool()


def project_update(
    new: torch.Tensor, old: torch.Tensor, basis: torch.Tensor | None, keep_row_norms: bool
) -> torch.Tensor:
    """new - (new - old) M M^T: the step's update with its component in span(M) removed, row by row (a 1-d
    tensor is one row); with keep_row_norms each row is rescaled to the norm it had in `new`."""
    if basis is None or basis.shape[1] == 0:
        return new
    rows, old_rows = new.reshape(-1, new.shape[-1]), old.reshape(-1, old.shape[-1])
    M = basis.to(new.dtype)
    projected = rows - ((rows - old_rows) @ M) @ M.T
    if keep_row_norms:
        scale = rows.norm(dim=1, keepdim=True) / projected.norm(dim=1, keepdim=True).clamp(min=1e-30)
        projected = projected * scale
    return projected.reshape(new.shape)


def gathered(values: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor's values from every process, concatenated (itself with one process)."""
    parts = distributed.gather_object(values.detach().cpu().double().tolist())
    return torch.tensor([v for part in parts for v in part], dtype=torch.float64)


def gate_summary(gates: torch.Tensor) -> dict[str, float | None]:
    """Mean and max of a gate's values (None when there were none)."""
    if not gates.numel():
        return {"mean": None, "max": None}
    return {"mean": round(float(gates.mean()), 4), "max": round(float(gates.max()), 4)}


@register
class GainLoRA(InfLoRA):
    name = "gainlora"
    summary = "a LoRA branch + a gate per task; new gates kept ~0 on old inputs (projected gate updates)"
    data_free = True
    memory_growth = "O(T): one LoRA and one gate MLP per task, plus per-layer input bases"
    merge_obstacle = "each task's LoRA is scaled by a gate computed from the input, unlike a fixed weight"
    Options = GainLoRAOptions
    options: GainLoRAOptions
    state_attributes = (*InfLoRA.state_attributes, "gate_bases")
    init_adapter_obstacle = "task 0's gate and the input bases of its branches and gates need task 0's inputs"
    manifest_extra = ("gates", "gate_dim", "gate_hidden", "gate_count")  # what export_extra writes

    def __init__(self, options, lora) -> None:
        super().__init__(options, lora)
        self.gate_bases: dict[str, torch.Tensor] = {}  # "input" | "hidden" | "output" -> old values' basis
        self.before_step: dict[str, torch.Tensor] = {}  # the newest gate's projected parameters before a step
        self.own_gates: dict[str, float | None] = {}  # g_i on task i's training prompts, after task i
        self.evaluated_gates: dict[int, torch.Tensor] = {}  # task position -> g_i on its test prompts
        self.task_index = 0  # the task whose gate is the newest

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
    def gate_inputs(self, model: PeftModel, ctx: TaskContext) -> torch.Tensor:
        """p(x) of this process's share of the task's sampled examples (prompt tokens), N x d (the embeddings
        are never sharded: no pass through the model, padding batches are skipped)."""
        embed = model.get_base_model().get_input_embeddings()
        rows = [
            masked_mean(embed(b["input_ids"]), prompt_mask(b))
            for b in ctx.batches(self.options.max_examples)
            if not distributed.padding_pass()
        ]
        dim = embed.weight.shape[1]
        return torch.cat(rows) if rows else torch.zeros(0, dim, dtype=GATE_DTYPE, device=embed.weight.device)

    @torch.no_grad()
    def gate_statistics(
        self, model: PeftModel, ctx: TaskContext
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Over the task's sampled prompts, for the newest gate: the Grams of what its three projected
        parameters act on (summed over processes), and its values g_i(x) on this process's share."""
        bank = self.bank(model)
        values = bank.values(bank.mlps[-1], self.gate_inputs(model, ctx))
        grams = ctx.all_reduce({name: vector_gram(rows) for name, rows in values.items()})
        return grams, gate_value(values["output"], bank.keys[-1])

    @torch.no_grad()
    def add_gate(self, model: PeftModel, ctx: TaskContext) -> None:
        """Gate i: a copy of gate i-1 (random for task 1) whose key is the top direction of its outputs on
        task i off the old outputs' basis, with the previous key's norm; old gates frozen; branch i scaled."""
        bank = self.bank(model)
        bank.requires_grad_(False)
        bank.add_gate(copy_previous=True)
        key = bank.keys[-1]
        grams, _ = self.gate_statistics(model, ctx)
        direction = complement_directions(self.gate_bases.get("output"), grams["output"], 1)[0]
        key.copy_(direction.to(key) * key.norm())
        bank.hook_branch(model, ctx.index - 1, task_adapter(ctx.index))
        self.evaluated_gates, self.own_gates, self.task_index = {}, {}, ctx.index

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
    def before_optimizer_step(self, model: PeftModel) -> None:
        if self.gate_bases:  # task 1 has no old values to protect
            params = self.bank(model).projected_parameters(-1)
            self.before_step = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def after_optimizer_step(self, model: PeftModel) -> None:
        """Project the step's update of W1, W2 and the key off the old tasks' values they act on."""
        if not self.gate_bases:
            return
        keep = self.options.keep_row_norms
        for name, p in self.bank(model).projected_parameters(-1).items():
            p.copy_(project_update(p, self.before_step[name], self.gate_bases[name], keep))

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        if self.options.branch == "inflora":
            super().after_task(model, ctx)  # extend the branches' input bases
        grams, own = self.gate_statistics(model, ctx)
        self.options.gate_rule().update_all(self.gate_bases, grams, ctx.index)
        self.own_gates = gate_summary(gathered(own))

    @contextlib.contextmanager
    def evaluating(self, model: PeftModel, position: int) -> Iterator[None]:
        """Record the newest gate's values on the prompts of the task at `position` (0-based) while it is
        evaluated, for `task_info`."""
        bank = self.bank(model)
        if not len(bank.mlps):
            yield
            return
        bank.recorded = []
        try:
            yield
            mine = [g[:, -1] for g in bank.recorded]
            self.evaluated_gates[position] = gathered(torch.cat(mine) if mine else torch.zeros(0))
        finally:
            bank.recorded = None

    def task_info(self) -> dict[str, Any]:
        """Besides the branch bases: the sizes of the gate bases, and the newest gate g_i on its own task
        (training prompts) and on the old tasks (test prompts, from the evaluation after the task)."""
        info = super().task_info() if self.options.branch == "inflora" else {}
        for name, M in self.gate_bases.items():
            info[f"gate_basis_{name}"] = M.shape[1]
        info["gate_own_mean"], info["gate_own_max"] = self.own_gates.get("mean"), self.own_gates.get("max")
        old = [g for j, g in self.evaluated_gates.items() if j < self.task_index - 1]
        summary = gate_summary(torch.cat(old)) if old else {"mean": None, "max": None}
        info["gate_old_mean"], info["gate_old_max"] = summary["mean"], summary["max"]
        return info

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
        return super().state_bytes() + basis_nbytes(self.gate_bases)
