"""SeqLoRA: one LoRA trained task after task with no protection (the lower bound of METHODS.md)."""

from __future__ import annotations

from .base import ContinualMethod, register


@register
class SeqLoRA(ContinualMethod):
    name = "seq_lora"
    summary = "one LoRA fine-tuned on each task in turn, no protection against forgetting (lower bound)"
    data_free = True
    memory_growth = "constant (one LoRA)"
