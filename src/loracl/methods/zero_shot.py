"""Zero-shot (METHODS.md, "zero_shot"): the base model, no training; its scores are the b_j of FWT.

Nothing is trained (`trains = False`): the model is evaluated once and that row fills the matrix. The
exported adapter is PEFT's untouched LoRA (B = 0), i.e. exactly the base model, so the run directory keeps
the usual layout.
"""

from __future__ import annotations

from .base import ContinualMethod, register


@register
class ZeroShot(ContinualMethod):
    name = "zero_shot"
    summary = "reference, not continual: the base model without training (b_j of FWT); exports a zero LoRA"
    data_free = True
    memory_growth = "constant (nothing is learned)"
    trains = False
    role = "reference"
    init_adapter_obstacle = "it trains nothing: it scores the base model alone"
