"""Progress of long steps: a bar on a terminal; a plain line every LORACL_PROGRESS_SECONDS (30 s) when stderr
goes to a log file (nohup, a batch scheduler, a bench worker), where a bar's carriage returns would pile up
into one unreadable line and nothing would show between the per-task lines for many minutes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from loracl.engine import distributed

INTERVAL_ENV = "LORACL_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


class LogProgress:
    """The part of tqdm's interface loracl uses, writing `desc: done/total unit (pct), postfix, elapsed,
    left` to stderr at most every `interval` seconds (and never on a process other than the main one)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float = DEFAULT_INTERVAL,
        **_: Any,
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.n, self.postfix = 0, ""
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}s"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"{elapsed:.0f} s elapsed")
        if self.total and self.n:
            parts.append(f"~{elapsed * (self.total - self.n) / self.n:.0f} s left")
        return ", ".join(parts)

    def close(self) -> None:
        pass


def log_interval() -> float:
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm | LogProgress:
    if not distributed.is_main():
        return tqdm(iterable, disable=True, **kwargs)
    if not sys.stderr.isatty():
        return LogProgress(iterable, interval=log_interval(), **kwargs)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
