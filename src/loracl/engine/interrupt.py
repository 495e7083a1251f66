"""Stop a run cleanly on SIGINT/SIGTERM: the signal only sets a flag, and the training loop, which checks it
between steps, raises RunInterrupted there, so no half-done step or half-written file is left behind."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from loracl.errors import RunInterrupted

_received: list[str] = []  # names of the signals received while a guard is active
_at_once: list[str] = []  # what is being done where a signal stops at once (innermost last)
_depth = [0]  # nested guards: only the outermost installs and restores handlers


def _handler(signum: int, _frame) -> None:
    if _received:  # a second signal: the user will not wait for the step to end
        raise KeyboardInterrupt
    name = signal.Signals(signum).name
    _received.append(name)
    if _at_once:
        raise RunInterrupted(f"stopped by {name} while {_at_once[-1]}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGINT/SIGTERM request a stop instead of killing the process (a second one stops at
    once); the previous handlers are restored on exit. Outside the main thread (where Python cannot install
    handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or _depth[0]:
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received.clear()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


@contextmanager
def stop_at_once(what: str) -> Iterator[None]:
    """Inside a stop_on_signals guard, a phase with no step to wait for (loading a model, writing final
    files that a resume writes again): SIGINT/SIGTERM raise RunInterrupted("stopped by ... while <what>")
    at once instead of waiting, so a stopped process always says so in one line."""
    if _received:  # a stop asked just before this phase began
        raise RunInterrupted(f"stopped by {_received[0]} while {what}")
    _at_once.append(what)
    try:
        yield
    finally:
        _at_once.pop()


def check_interrupt() -> None:
    """Raise RunInterrupted if a stop was requested (called by the training loop at every step)."""
    if _received:
        raise RunInterrupted(f"stopped by {_received[0]}")


def requested_signal() -> str | None:
    """The name of the signal that asked for a stop (e.g. "SIGTERM"), or None."""
    return _received[0] if _received else None
