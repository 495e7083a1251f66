"""SeqLoRA: one LoRA trained task after task with no protection (the lower bound of METHODS.md)."""

from __future__ import annotations

from peft import PeftModel

from loracl.models.lora import LoraState, set_lora_state

from .base import ContinualMethod, register


@register
class SeqLoRA(ContinualMethod):
    name = "seq_lora"
    summary = "one LoRA fine-tuned on each task in turn, no protection against forgetting (lower bound)"
    data_free = True
    memory_growth = "constant (one LoRA)"
    init_adapter_obstacle = None

    def adopt(self, model: PeftModel, state: LoraState) -> None:
        """After a task the one LoRA holds what it trained and nothing else is kept: the adapter's factors."""
        set_lora_state(model, state)
