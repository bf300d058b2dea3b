"""Ctrl-C and SIGTERM, held back for the few steps that must not be cut in two.

Publishing OUTPUT (swapping the finished folder into place) and removing a failed run's partial
folder each finish once started: a SIGINT or SIGTERM arriving meanwhile is recorded and handed to
the caller afterwards, who then knows which state the run left (the old OUTPUT, or the new one).
Signals are only held in the main thread (the only one Python delivers them to); elsewhere the
block runs unguarded.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Held:
    """What :func:`held` saw: the first signal that arrived while holding (None when none did)."""

    signal: signal.Signals | None = None

    @property
    def name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


@contextlib.contextmanager
def held():
    """Run a block with SIGINT/SIGTERM held: they are recorded in the yielded :class:`Held`."""
    state = Held()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def record(signum, _frame):
        if state.signal is None:
            state.signal = signum

    previous = {}
    try:
        for sig in HELD_SIGNALS:
            previous[sig] = signal.signal(sig, record)
        yield state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
