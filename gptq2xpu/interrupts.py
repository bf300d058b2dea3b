"""Ctrl-C and SIGTERM, held back for the few steps that must not be cut in two.

Publishing OUTPUT (swapping the finished folder into place) and removing a failed run's partial
folder each finish once started: a SIGINT or SIGTERM arriving meanwhile is recorded and handed to
the caller afterwards, who then knows which state the run left (the old OUTPUT, or the new one).
Signals are only held in the main thread (the only one Python delivers them to); elsewhere the
block runs unguarded.

Once OUTPUT is published the run's outcome is decided (:func:`decide`): the command line's handler
(:func:`on_signal`) then records a late signal instead of failing the run, so that the exit code
keeps saying which output is at OUTPUT.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, wait

from .errors import Interrupted

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


class _Run:
    """The command-line run in progress: whether its outcome is decided, and a signal after that."""

    decided = False
    late: signal.Signals | None = None


def signals_to_the_main_thread() -> None:
    """A worker thread's initializer: SIGINT and SIGTERM are blocked in this thread, so the kernel
    hands them to the main thread, the one Python runs handlers in.  A signal the kernel gives to a
    worker is only acted on once the main thread next runs Python code: while it waits for the
    workers, that can be after they are done (several whole shards).  That happens when a signal
    reaches a stopped process (``kill %1`` sends SIGTERM, then SIGCONT): the first thread to resume
    takes it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


#: How often a main thread waiting for workers runs Python code: a signal a thread that does not
#: block it took (one the run did not start) is acted on within this time.
POLL_S = 0.05


def result_of(future: Future):
    """``future.result()``, the waiting main thread waking every :data:`POLL_S` meanwhile."""
    while not future.done():
        wait([future], timeout=POLL_S)
    return future.result()


def mapped(pool: Executor, fn: Callable, items: Iterable) -> Iterator:
    """``pool.map(fn, items)``: results in order, each waited for as by :func:`result_of`; the
    items not yet started are cancelled when the caller stops early."""
    futures = [pool.submit(fn, item) for item in items]
    try:
        for future in futures:
            yield result_of(future)
    finally:
        for future in futures:
            future.cancel()


def begin() -> None:
    """A new run: nothing decided yet."""
    _Run.decided, _Run.late = False, None


def decide() -> None:
    """OUTPUT is published: a later SIGINT/SIGTERM no longer fails the run."""
    _Run.decided = True


def on_signal(signum, _frame) -> None:
    """The command line's SIGINT/SIGTERM handler: stop the run (exit 130) while nothing is
    published, record the signal once the outcome is decided.  Raises :class:`Interrupted`, not
    KeyboardInterrupt, which typer would turn into a silent ``return 130``."""
    if _Run.decided:
        _Run.late = _Run.late or signal.Signals(signum)
        return
    if signum == signal.SIGTERM:
        raise Interrupted("terminated by SIGTERM")
    raise Interrupted("stopped by SIGINT (Ctrl-C)")


def late_warning() -> str | None:
    """What to say about a signal that arrived after the outcome was decided (None: none did)."""
    if _Run.late is None:
        return None
    return f"{_Run.late.name} arrived after OUTPUT was published; the run completed and OUTPUT is the new output"
