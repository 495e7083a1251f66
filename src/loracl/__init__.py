"""loracl: continual learning of large language models with LoRA.

The Python API (loracl.api), loaded on first use so that `import loracl` stays light:
- `loracl.run(config, tasks=..., model=..., output_dir=...)`: a run, as `loracl run`; returns its results;
- `loracl.continue_run(run_dir, tasks=[...])`: more tasks for a run, as `loracl continue`;
- `loracl.register`, `loracl.unregister`, `loracl.register_state_class`: methods and their checkpointed
  state classes defined outside the package (see loracl.methods for plugins' entry points).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# bitsandbytes' CPU backend warns on import when a fused kernel is missing; loracl does not use that kernel,
# and the line would precede every command's output (and its one-line errors).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import continue_run, register, register_state_class, run, unregister

_API = ("continue_run", "register", "register_state_class", "run", "unregister")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api  # the top layer (it runs recipes): the package root only forwards to it

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "continue_run", "register", "register_state_class", "run", "unregister"]
