"""Continual-learning methods: one module per method, each registered on import."""

from . import seq_lora, slao  # noqa: F401  (registration side effects)
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
