"""Stopping a long job cleanly: SIGINT and SIGTERM ask it to stop at the next safe point.

A training step is all or nothing: an optimizer step cut in half would leave some parameters
updated and others not, and a checkpoint saved then could not resume exactly. So while
`deferred_signals` is active, the first SIGINT (Ctrl-C) or SIGTERM only records the request;
the loop finishes its step, saves, and raises `Interrupted`. A second signal stops at once,
without saving (the checkpoint on disk is still the last consistent one).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from musicgpt.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first stop signal received while deferred (None until one comes)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def deferred_signals(announce: str = "finishing the current step, then saving") -> Iterator[StopRequest]:
    """Record the first SIGINT / SIGTERM instead of acting on it; a second one raises at once.

    Off the main thread (where Python cannot install handlers) signals keep their usual effect.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request:
            raise Interrupted(signum, "stopped without saving the step in progress")
        request.signum = signum
        print(f"\nmusicgpt: {signal.Signals(signum).name}: {announce} "
              "(send it again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """While active, SIGTERM raises `Interrupted` like Ctrl-C raises KeyboardInterrupt, so a
    terminated command cleans up (temporary files, a training run's checkpoint) and says so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise Interrupted(signum, "terminated")
