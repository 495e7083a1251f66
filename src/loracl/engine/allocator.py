"""Keep glibc's heap from holding on to freed activations (CPU training).

glibc serves an allocation above its mmap threshold with its own mapping, returned to the system when freed;
below it, from the heap, where freed memory stays with the process. The threshold starts at 128 KiB and
rises to the size of every mapped block that is freed (up to 32 MiB), so after the first training step the
few-MiB activations of a step (7 MiB for 8 x 384 tokens x 576 features in float32) all come from the heap,
and they fragment it: on SmolLM2-135M in bfloat16 one training step with 8 LoRA branches peaked at 6.0 GB
resident against 2.3 GB with a fixed threshold, with the same tensors alive (benchmarks/adapter_growth.py,
`--dtype bfloat16 --step-length 384`; docs/results.md). A Long-grid InfLoRA cell held 14.5 GB at its 14th
task. Fixing the threshold (which also stops its rise) gives each such tensor its own mapping.

Only the CLI, the bench's worker processes and the benchmarks/ scripts call this: a library imported into
someone's process leaves that process's allocator alone (a Python user calls `fix_mmap_threshold()` or
sets MALLOC_MMAP_THRESHOLD_=1048576 before starting Python). A threshold the user set is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
THRESHOLD_BYTES = 1 << 20  # above glibc's 128 KiB start: small tensors and Python objects stay on the heap
USER_SETTING = "MALLOC_MMAP_THRESHOLD_"


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (musl and macOS have no mallopt parameter of this meaning)."""
    name = ctypes.util.find_library("c")
    if not name or not os.confstr_names.get("CS_GNU_LIBC_VERSION"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(name)
    except (OSError, ValueError):
        return None


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold to `threshold` bytes (and so stop its rise); True if it was set. Does
    nothing where the C library is not glibc or where the user set MALLOC_MMAP_THRESHOLD_."""
    if os.environ.get(USER_SETTING):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
