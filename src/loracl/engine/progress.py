"""Progress bars on a terminal; none when output goes to a log file (the per-task lines remain)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from loracl.engine import distributed


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    kwargs.setdefault("disable", not sys.stderr.isatty() or not distributed.is_main())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
