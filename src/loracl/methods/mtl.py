"""Multi-task learning (METHODS.md, "mtl"): the upper bound, not a continual method.

One LoRA trained once on the union of every task's training data, shuffled (`joint_training`: the runner
builds the union and calls the hooks once). Every row of the accuracy matrix is the final model's scores;
only AP is meaningful. It sees all tasks' data at once, so it is not data-free.
"""

from __future__ import annotations

from .base import ContinualMethod, register


@register
class MultiTask(ContinualMethod):
    name = "mtl"
    summary = "upper bound, not continual: one LoRA trained once on the shuffled union of all tasks' data"
    data_free = False
    memory_growth = "constant (one LoRA), but every task's data at once"
    joint_training = True
    role = "upper_bound"
    init_adapter_obstacle = "it trains once on every task's data jointly: no task comes before the others"
