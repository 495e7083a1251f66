"""The shared base of the merging methods (magmax, task_arithmetic, ties; METHODS.md, "magmax").

Underneath is sequential fine-tuning: one LoRA (PEFT adapter "default") trained task after task, never
reset. After task i its task vector τ_i = s B_i A_i is stored (as the LoRA factors), and the subclass's merge
rule combines τ_1..τ_i into one dense delta ΔW per layer. That delta lives in a second stock PEFT adapter,
"merged" (scaling 1: lora_alpha = r), which is what gets evaluated after every task (so the T × T matrix is
the merged model's) and exported into `adapter/`.

Why full rank by default: the authors of MagMax, TIES and task arithmetic merge full weights,
θ_0 + λ·merge(τ), and the merged ΔW is in general of full rank, so cutting it back to rank lora.r would
evaluate another model than theirs (METHODS.md: "the default keeps the merged ΔW at full rank (exact)").
With `rank` unset, each layer's ΔW is written exactly as its SVD, B = U Σ, A = Vᵀ with every singular
direction (loracl.models.merging). One adapter has one rank: r is the largest min(m, n) of the adapted
layers, and a layer with a smaller side has its extra factor rows / columns zero, so stock PEFT and loracl's
loader read the folder as any LoRA (a per-layer `rank_pattern` would spare those zeros, but loracl's loader
checks every layer against the config's one `r`). `rank: k` truncates ΔW by SVD to the best rank-k LoRA
instead, the single deployable LoRA of METHODS.md, and reports the energy kept.

Per task, `tasks/<i>-<task>/` holds `adapter_ft/` (the sequential LoRA), `adapter_merged/` and
`merge_info.json` (per layer: rank "full" or k, energy kept, numerical rank of ΔW); results.json summarises
them in `method_info` (merged_rank "full" or k, adapter_rank, energy_kept_mean / _min, dense_rank_max).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import torch
from peft import PeftModel

from loracl.engine import distributed
from loracl.errors import CheckpointError
from loracl.methods.context import TaskContext
from loracl.models.lora import (
    DEFAULT_ADAPTER,
    LoraState,
    get_lora_state,
    lora_layers,
    lora_weights,
    peft_config,
    save_adapter,
    set_lora_state,
    state_nbytes,
)
from loracl.models.merging import Truncation, task_vector, truncate_to_lora

from ..config import LoraSection
from .base import ContinualMethod
from .options import MergingOptions  # torch-free, so that `loracl methods` can list them

MERGED_ADAPTER = "merged"


class MergingMethod(ContinualMethod):
    """Sequential LoRA fine-tuning; after each task, merge the task vectors and evaluate the merged LoRA."""

    data_free = True
    memory_growth = "O(T) (one LoRA's factors per finished task, plus the training and merged LoRAs)"
    Options = MergingOptions
    options: MergingOptions
    state_attributes = ("task_vectors", "scalings", "info")
    init_adapter_obstacle = None  # a task leaves its task vector behind, nothing else (`adopt`)

    def __init__(self, options: MergingOptions, lora: LoraSection) -> None:
        super().__init__(options, lora)
        self.task_vectors: list[LoraState] = []  # LoRA factors after each finished task
        self.scalings: dict[str, float] = {}  # s = alpha / r of each layer of the trained LoRA
        self.info: dict[str, Any] = {}

    @property
    def rank(self) -> int | None:
        """The rank the merged delta is truncated to; None: full rank (exact)."""
        return self.options.rank

    @property
    def merged_rank(self) -> int | str:
        """How results report the merge: "full" or the truncation rank k."""
        return "full" if self.rank is None else self.rank

    def adapter_rank(self, model: PeftModel) -> int:
        """The r of the "merged" adapter: k, or at full rank the largest min(m, n) of the adapted layers."""
        if self.rank is not None:
            return self.rank
        return max(min(layer.in_features, layer.out_features) for _, layer in lora_layers(model))

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The merge rule: the task vectors τ_1..τ_i of one layer -> one dense delta."""
        raise NotImplementedError

    def merge(self, width: int | None = None) -> dict[str, Truncation]:
        """Per layer: merge the stored task vectors, then write the dense result as LoRA factors of `width`
        columns of B (default: as many as the kept rank needs), exact or truncated to rank k."""
        merged = {}
        for name, scaling in self.scalings.items():
            deltas = [task_vector(state[name], scaling) for state in self.task_vectors]
            merged[name] = truncate_to_lora(self.combine(deltas), self.rank, width)
        return merged

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        model.set_adapter(DEFAULT_ADAPTER)  # train the sequential LoRA, from where the last task left it

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        save_adapter(model, ctx.task_dir / "adapter_ft")
        merged = self.conclude(model)
        save_adapter(model, ctx.task_dir / "adapter_merged", MERGED_ADAPTER)
        per_layer = {
            name: {"rank": self.merged_rank, "energy_kept": t.energy_kept, "dense_rank": t.dense_rank}
            for name, t in merged.items()
        }
        if distributed.is_main():
            (ctx.task_dir / "merge_info.json").write_text(json.dumps(per_layer, indent=2), encoding="utf-8")

    def adopt(self, model: PeftModel, state: LoraState) -> None:
        """The adapter as the sequential LoRA after task 1 (the next task trains on from it) and its s B A as
        task 1's task vector τ_1 (METHODS.md, magmax: τ_i = ΔW after task i), merged and installed as after
        task 1. An adapter/ folder of a merging run is
        its merged delta, of another rank: its tasks/<i>-<task>/adapter_ft is the LoRA to start from."""
        set_lora_state(model, state)
        self.conclude(model)

    def conclude(self, model: PeftModel) -> dict[str, Truncation]:
        """What after_task keeps of a task: the sequential LoRA's factors as the next task vector, the merge
        of every task vector so far, installed in the "merged" adapter, and the `info` summary; returns the
        merge."""
        self.scalings = {name: float(layer.scaling[DEFAULT_ADAPTER]) for name, layer in lora_layers(model)}
        self.task_vectors.append(get_lora_state(model))
        width = self.adapter_rank(model)
        merged = self.merge(width)
        self.install(model, {name: t.pair for name, t in merged.items()}, width)
        energies = [t.energy_kept for t in merged.values()]
        self.info = {
            "tasks_merged": len(self.task_vectors),
            "merged_rank": self.merged_rank,
            "adapter_rank": width,
            "energy_kept_mean": statistics.fmean(energies),
            "energy_kept_min": min(energies),
            "dense_rank_max": max(t.dense_rank for t in merged.values()),
        }
        return merged

    def install(self, model: PeftModel, state: LoraState, width: int) -> None:
        """Write the merged factors into the "merged" adapter of rank `width` (created on first use; scaling
        1) and make it active."""
        if MERGED_ADAPTER not in model.peft_config:
            section = self.lora.model_copy(update={"r": width, "alpha": width, "dropout": 0.0})
            model.add_adapter(MERGED_ADAPTER, peft_config(section, model))
        set_lora_state(model, state, MERGED_ADAPTER)
        model.set_adapter(MERGED_ADAPTER, inference_mode=True)  # evaluated from now on; never trained

    def task_info(self) -> dict[str, Any]:
        return dict(self.info)

    def export(self, model: PeftModel, directory) -> None:
        save_adapter(model, directory, MERGED_ADAPTER)

    def rebuild(self, model: PeftModel, finished: int) -> None:
        """Refuse a checkpoint whose "merged" adapter has another rank than this loracl gives it (one written
        when the merge was truncated to lora.r by default): resumed, the run would mix two merges."""
        config = model.peft_config.get(MERGED_ADAPTER)
        if config is not None and config.r != self.adapter_rank(model):
            raise CheckpointError(
                f"the checkpoint's merged adapter has rank {config.r}, but method {self.name!r} with rank "
                f"{self.merged_rank} needs {self.adapter_rank(model)} (written by an older loracl that "
                "truncated the merge to lora.r by default?); start the run again"
            )

    def adapter_bytes(self, model: PeftModel) -> int:
        """The deployed model carries the merged LoRA only (at full rank, with its zero padding)."""
        return sum(
            w.numel() * w.element_size()
            for _, layer in lora_layers(model, MERGED_ADAPTER)
            for w in lora_weights(layer, MERGED_ADAPTER)
        )

    def stored_adapters(self, model: PeftModel) -> int:
        return 1

    def state_bytes(self) -> int:
        return sum(state_nbytes(state) for state in self.task_vectors)
