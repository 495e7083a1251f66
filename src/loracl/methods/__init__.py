"""Continual-learning methods: one module per method, each registered on import."""

from . import (  # noqa: F401  (registration side effects)
    agem,
    ewc,
    gainlora,
    gpm,
    inc_lora,
    inflora,
    magmax,
    mtl,
    olora,
    replay,
    seq_lora,
    slao,
    task_arithmetic,
    ties,
    zero_shot,
)
from .base import (
    ContinualMethod,
    MethodOptions,
    available_methods,
    create_method,
    method_class,
    register,
)

__all__ = [
    "ContinualMethod",
    "MethodOptions",
    "available_methods",
    "create_method",
    "method_class",
    "register",
]
