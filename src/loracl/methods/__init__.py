"""Continual-learning methods: one module per method, each declared in `catalog` (torch-free metadata and
Options) and imported only when used (`method_class`, `create_method`). Methods of other packages come in
through entry points of the group `loracl.methods` (see `catalog`), or `register` at run time.

Importing this package imports no torch: the names that need it (`ContinualMethod` and the registry of
`base`) are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .catalog import CATALOG, ENTRY_POINT_GROUP, MethodSpec, PluginFailure
from .options import MethodOptions

if TYPE_CHECKING:
    from .base import (
        ContinualMethod,
        available_methods,
        create_method,
        method_class,
        register,
        register_state_class,
        state_classes,
        unregister,
    )

_FROM_BASE = (
    "ContinualMethod",
    "available_methods",
    "create_method",
    "method_class",
    "register",
    "register_state_class",
    "state_classes",
    "unregister",
)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CATALOG",
    "ENTRY_POINT_GROUP",
    "ContinualMethod",
    "MethodOptions",
    "MethodSpec",
    "PluginFailure",
    "available_methods",
    "create_method",
    "method_class",
    "register",
    "register_state_class",
    "state_classes",
    "unregister",
]
