"""The shared base of the merging methods (magmax, task_arithmetic, ties; METHODS.md, "magmax").

Underneath is sequential fine-tuning: one LoRA (PEFT adapter "default") trained task after task, never
reset. After task i its task vector τ_i = s B_i A_i is stored (as the LoRA factors), the subclass's merge
rule combines τ_1..τ_i into one dense delta per layer, and loracl.models.merging truncates it back to a
LoRA of
rank k. That LoRA lives in a second stock PEFT adapter, "merged" (r = lora_alpha = k), which is what gets
evaluated after every task (so the T × T matrix is the merged model's) and exported into `adapter/`.
Per task, `tasks/<i>-<task>/` holds `adapter_ft/` (the sequential LoRA), `adapter_merged/` and
`merge_info.json` (rank and energy kept per layer); results.json summarises them in `method_info`.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import torch
from peft import PeftModel
from pydantic import Field

from loracl.engine import distributed
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
from .base import ContinualMethod, MethodOptions

MERGED_ADAPTER = "merged"


class MergingOptions(MethodOptions):
    rank: int | None = Field(
        None, gt=0, description="rank of the exported LoRA after SVD truncation (default: lora.r, as PEFT)"
    )


class MergingMethod(ContinualMethod):
    """Sequential LoRA fine-tuning; after each task, merge the task vectors and evaluate the merged LoRA."""

    data_free = True
    memory_growth = "O(T) (one LoRA's factors per finished task, plus the training and merged LoRAs)"
    Options = MergingOptions
    options: MergingOptions
    state_attributes = ("task_vectors", "scalings", "info")

    def __init__(self, options: MergingOptions, lora: LoraSection) -> None:
        super().__init__(options, lora)
        self.task_vectors: list[LoraState] = []  # LoRA factors after each finished task
        self.scalings: dict[str, float] = {}  # s = alpha / r of each layer of the trained LoRA
        self.info: dict[str, Any] = {}

    @property
    def rank(self) -> int:
        return self.options.rank or self.lora.r

    def combine(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The merge rule: the task vectors τ_1..τ_i of one layer -> one dense delta."""
        raise NotImplementedError

    def merge(self) -> dict[str, Truncation]:
        """Per layer: merge the stored task vectors, then truncate the dense result to a rank-k LoRA."""
        merged = {}
        for name, scaling in self.scalings.items():
            deltas = [task_vector(state[name], scaling) for state in self.task_vectors]
            merged[name] = truncate_to_lora(self.combine(deltas), self.rank)
        return merged

    def before_task(self, model: PeftModel, ctx: TaskContext) -> None:
        model.set_adapter(DEFAULT_ADAPTER)  # train the sequential LoRA, from where the last task left it

    def after_task(self, model: PeftModel, ctx: TaskContext) -> None:
        self.scalings = {name: float(layer.scaling[DEFAULT_ADAPTER]) for name, layer in lora_layers(model)}
        self.task_vectors.append(get_lora_state(model))
        save_adapter(model, ctx.task_dir / "adapter_ft")
        merged = self.merge()
        self.install(model, {name: t.pair for name, t in merged.items()})
        save_adapter(model, ctx.task_dir / "adapter_merged", MERGED_ADAPTER)
        per_layer = {
            name: {"rank": self.rank, "energy_kept": t.energy_kept, "dense_rank": t.dense_rank}
            for name, t in merged.items()
        }
        if distributed.is_main():
            (ctx.task_dir / "merge_info.json").write_text(json.dumps(per_layer, indent=2), encoding="utf-8")
        energies = [t.energy_kept for t in merged.values()]
        self.info = {
            "tasks_merged": len(self.task_vectors),
            "merged_rank": self.rank,
            "energy_kept_mean": statistics.fmean(energies),
            "energy_kept_min": min(energies),
            "dense_rank_max": max(t.dense_rank for t in merged.values()),
        }

    def install(self, model: PeftModel, state: LoraState) -> None:
        """Write the merged factors into the "merged" adapter (created on first use) and make it active."""
        if MERGED_ADAPTER not in model.peft_config:
            section = self.lora.model_copy(update={"r": self.rank, "alpha": self.rank, "dropout": 0.0})
            model.add_adapter(MERGED_ADAPTER, peft_config(section))
        set_lora_state(model, state, MERGED_ADAPTER)
        model.set_adapter(MERGED_ADAPTER, inference_mode=True)  # evaluated from now on; never trained

    def task_info(self) -> dict[str, Any]:
        return dict(self.info)

    def export(self, model: PeftModel, directory) -> None:
        save_adapter(model, directory, MERGED_ADAPTER)

    def adapter_bytes(self, model: PeftModel) -> int:
        """The deployed model carries the merged LoRA only."""
        return sum(
            w.numel() * w.element_size()
            for _, layer in lora_layers(model, MERGED_ADAPTER)
            for w in lora_weights(layer, MERGED_ADAPTER)
        )

    def stored_adapters(self, model: PeftModel) -> int:
        return 1

    def state_bytes(self) -> int:
        return sum(state_nbytes(state) for state in self.task_vectors)
