"""Continual-learning methods: one module per method, each registered on import."""

from . import gainlora, gpm, inc_lora, inflora, olora, seq_lora, slao  # noqa: F401  (registration)
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
