"""Every request gptq2xpu makes to a Hugging Face hub (or a mirror) goes through one bounded client.

huggingface_hub does the talking (its session, token, ``HF_ENDPOINT``, retries, cache); this
module gives it an ``httpx2`` client (:func:`huggingface_hub.set_client_factory`) whose transport
puts the limits a hub that is not trusted needs, and runs each hub operation (:func:`bounded`) so
that the command can always stop:

* **time**: an operation fails once :func:`hub_timeout` seconds (``GPTQ2XPU_HUB_TIMEOUT``, default
  60) pass without it finishing or receiving another MiB; single reads time out after the same
  bound.  A server trickling a byte a second is stopped after the bound, a large download that
  keeps moving is not;
* **retries**: huggingface_hub's own (at most 5 per request); a ``Retry-After`` longer than the
  bound is not waited for: the operation fails at once and says what the server asked;
* **what the server says**: ``X-Repo-Commit`` must be a commit id (40 hex digits) and ``ETag`` a
  plain token, before huggingface_hub builds cache paths from them; error bodies are read at most
  :data:`MAX_ERROR_BODY` bytes;
* **signals**: the operation runs in a daemon thread while the main thread waits for it, so
  SIGINT/SIGTERM are handled at once; the transport then stops the abandoned work at its next
  chunk (nothing waits for it at exit).

It also counts requests and bytes per file for ``inspect``'s report (:class:`Meter`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import InputError, UsageError
from ..interrupts import POLL_S

ENV_TIMEOUT = "GPTQ2XPU_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
#: Each MiB received gives a running operation another :func:`hub_timeout` seconds.
RENEW_BYTES = 1 << 20
#: Bytes of an error answer handed to huggingface_hub (for its message); the rest is dropped.
MAX_ERROR_BODY = 64 * 1024
COMMIT = re.compile(r"[0-9a-f]{40}")
#: Largest file size a server may claim (a file offset must fit in a signed 64-bit integer).
MAX_SIZE = 2**63 - 1
_ETAG = re.compile(r'(?:W/)?"?([A-Za-z0-9._+=-]{1,200})"?')
#: huggingface_hub's own user-agent registry lookup (at most once a day): bounded, not counted as
#: reading the repository.
_NOT_COUNTED = "/api/agent-harnesses"

T = TypeVar("T")


def hub_timeout() -> float:
    """Seconds a hub operation may go without finishing or receiving another MiB (``GPTQ2XPU_HUB_TIMEOUT``)."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise UsageError(f"{ENV_TIMEOUT}={raw[:40]!r}: give seconds, a number above 0 and at most 86400")
    return value


@dataclass
class Meter:
    """Requests sent and response bytes received, in total and per file (thread-safe)."""

    requests: int = 0
    bytes: int = 0
    files: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, file: str, n: int, request: bool = False) -> None:
        with self._lock:
            self.requests += request
            self.bytes += n
            self.files[file] = self.files.get(file, 0) + n


class HubTimeout(InputError):
    """A hub operation passed its bound (time without progress, or a Retry-After past it)."""


class _Cancelled(BaseException):
    """Raised inside abandoned work (another thread) to unwind it; never reaches a user.  A
    BaseException so that no ``except Exception`` in a library can swallow it."""


@dataclass
class _Op:
    """One running hub operation: what to name in errors, its bound, and its progress."""

    label: str
    bound: float
    meter: Meter | None = None
    file: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    limit: int | None = None          # the most bytes the operation may receive, every answer together
    url: str = ""                     # the last URL asked for
    stamp: float = field(default_factory=time.monotonic)
    _since_renew: int = 0
    _total: int = 0

    def received(self, n: int) -> None:
        self._total += n
        if self.limit is not None and self._total > self.limit:
            raise InputError(f"{self.label}: the server sent more than {self.limit} bytes")
        if self.meter is not None:
            self.meter.count(self.file, n)
        self.progressed(n)

    def progressed(self, n: int) -> None:
        self._since_renew += n
        if self._since_renew >= RENEW_BYTES:
            self._since_renew = 0
            self.stamp = time.monotonic()

    def check(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled()


_OP: contextvars.ContextVar[_Op | None] = contextvars.ContextVar("gptq2xpu_hub_op", default=None)
_BARS: contextvars.ContextVar[bool] = contextvars.ContextVar("gptq2xpu_hub_bars", default=True)


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Whether huggingface_hub may draw its download bars for hub operations started in the block."""
    token = _BARS.set(shown)
    try:
        yield
    finally:
        _BARS.reset(token)


def bars_shown() -> bool:
    return _BARS.get()


def progress_class():
    """A tqdm class for ``hf_hub_download(tqdm_class=...)`` whose updates count as progress of the
    operation that made it: a Xet download (hf_xet) moves no bytes through this client, only
    through its progress bar.  Hidden bars are updated too."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Progress(hub_tqdm):
        def __init__(self, *args, **kwargs):
            self._op = _OP.get()
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._op is not None and n:
                self._op.progressed(int(n))
            return super().update(n)

    return Progress


# ------------------------------------------------------------------------------------- running


def bounded(fn: Callable[[], T], label: str, *, meter: Meter | None = None, file: str = "",
            cancel: threading.Event | None = None, limit: int | None = None) -> T:
    """``fn()`` as one hub operation: see the module docstring.  ``label`` names the repository or
    file in a timeout's message; setting ``cancel`` abandons the operation; ``limit`` caps the bytes
    it may receive.  Works from any thread; from the main thread the wait is interruptible."""
    install()
    op = _Op(label, hub_timeout(), meter, file, cancel or threading.Event(), limit)
    outcome: list = []
    done = threading.Event()

    def work() -> None:
        _OP.set(op)
        try:
            outcome.append((True, fn()))
        except _Cancelled:
            outcome.append((False, None))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append((False, exc))
        finally:
            done.set()

    ctx = contextvars.copy_context()
    threading.Thread(target=ctx.run, args=(work,), name="gptq2xpu-hub", daemon=True).start()
    try:
        while not done.wait(POLL_S):
            if op.cancel.is_set():
                raise _Cancelled()
            if time.monotonic() - op.stamp > op.bound:
                asked = f" from {op.url}" if op.url else ""
                raise HubTimeout(f"{label}: no answer{asked} within {op.bound:g} s ({ENV_TIMEOUT}; a hub request "
                                 f"may go {op.bound:g} s without finishing or receiving another MiB)")
    except BaseException:
        op.cancel.set()  # the abandoned work stops at its next request or chunk
        raise
    ok, value = outcome[0]
    if ok:
        return value
    if value is None:
        raise HubTimeout(f"{label}: stopped")
    raise value.with_traceback(None) if isinstance(value, InputError) else value


def bounded_each(fn: Callable[[str], T], files: list[str], label: Callable[[str], str], workers: int,
                 meter: Meter | None = None) -> dict[str, T]:
    """``{file: fn(file)}``, each call one :func:`bounded` operation, ``workers`` at a time in
    daemon threads.  The first failure abandons the others and is raised; so is a signal that
    arrives while the calling thread waits (the waits are short, so it is handled at once)."""
    todo = list(files)
    out: dict[str, T] = {}
    failed: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()  # set: every operation still running is abandoned

    def worker() -> None:
        while True:
            with lock:
                if not todo or failed:
                    return
                file = todo.pop(0)
            try:
                out[file] = bounded(lambda f=file: fn(f), label(file), meter=meter, file=file, cancel=stop)
            except BaseException as exc:
                with lock:
                    failed.append(exc)
                stop.set()
                return

    threads = [threading.Thread(target=worker, name="gptq2xpu-hub", daemon=True)
               for _ in range(min(workers, len(files)))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(POLL_S)
    except BaseException:
        stop.set()
        raise
    if failed:
        raise failed[0]
    return out


# ------------------------------------------------------------------------------------- the client

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Make huggingface_hub's shared client the bounded one (once per process).  It keeps the
    event hooks of the client it replaces (huggingface_hub's own: offline mode, request ids)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        from huggingface_hub import get_session, set_client_factory

        hooks = {k: list(v) for k, v in get_session().event_hooks.items()}
        set_client_factory(lambda: _client(hooks))
        _installed = True


def _client(hooks: dict[str, list]):
    import httpx2

    class _Stream(httpx2.SyncByteStream):
        """A response body that counts what arrives, stops when its operation is abandoned, and
        gives at most ``cap`` bytes (error answers)."""

        def __init__(self, inner, op: _Op, cap: int | None, counted: bool):
            self.inner, self.op, self.cap, self.counted = inner, op, cap, counted

        def __iter__(self):
            given = 0
            for chunk in self.inner:
                self.op.check()
                if self.counted:
                    self.op.received(len(chunk))
                else:
                    self.op.progressed(len(chunk))
                if self.cap is not None:
                    chunk = chunk[: max(0, self.cap - given)]
                    given += len(chunk)
                    if not chunk:
                        break
                yield chunk

        def close(self) -> None:
            self.inner.close()

    def on_request(request) -> None:
        op = _OP.get()
        if op is None:
            return
        op.check()
        op.url = str(request.url).split("?")[0][:200]
        limit = {"connect": op.bound, "read": op.bound, "write": op.bound, "pool": op.bound}
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: min(v, given.get(k) or v) for k, v in limit.items()}

    def on_response(response) -> None:
        op = _OP.get()
        if op is None:
            return
        request = response.request
        counted = request.url.path != _NOT_COUNTED
        if counted and op.meter is not None:
            op.meter.count(op.file, 0, request=True)
        _check_answer(response, op, str(request.url))
        cap = MAX_ERROR_BODY if response.status_code >= 400 else None
        response.stream = _Stream(response.stream, op, cap, counted)

    # event hooks, not a transport of our own: the client keeps its transports (proxies from the environment)
    return httpx2.Client(event_hooks={"request": [*hooks.get("request", []), on_request],
                                      "response": [*hooks.get("response", []), on_response]},
                         follow_redirects=True, timeout=None)


def _check_answer(response, op: _Op, url: str) -> None:
    """Refuse what huggingface_hub would build cache paths from, and a wait past the bound."""
    where = f"{op.label}: {url.split('?')[0][:200]}"
    commit = response.headers.get("X-Repo-Commit")
    if commit is not None and not COMMIT.fullmatch(commit):
        raise InputError(f"{where}: the server's X-Repo-Commit {commit[:60]!r} is not a commit id (40 hex digits)")
    for name in ("X-Linked-Etag", "ETag"):
        etag = response.headers.get(name)
        if etag is not None and not _ETAG.fullmatch(etag.strip()):
            raise InputError(f"{where}: the server's {name} {etag[:60]!r} is not a plain tag (letters, digits, ._+=-)")
    for name in ("Content-Length", "X-Linked-Size"):
        size = response.headers.get(name, "0").strip()
        if not (size.isascii() and size.isdigit() and len(size) <= 19 and int(size) <= MAX_SIZE):
            raise InputError(f"{where}: the server's {name} {size[:40]!r} is not a size a file can have "
                             f"(0 to 2^63-1 bytes)")
    if response.status_code in (429, 503):
        # the waits huggingface_hub honours: Retry-After in seconds, and a spent RateLimit's reset
        from huggingface_hub.utils import parse_ratelimit_headers

        wait = response.headers.get("Retry-After", "").strip()
        seconds = int(wait) if wait.isascii() and wait.isdigit() else 0
        limit = parse_ratelimit_headers(response.headers) if response.status_code == 429 else None
        if limit is not None and limit.remaining == 0:
            seconds, wait = max(seconds, limit.reset_in_seconds), str(max(seconds, limit.reset_in_seconds))
        if seconds > op.bound:
            raise HubTimeout(f"{where}: HTTP {response.status_code}, the server asks to retry after {wait[:40]} s, "
                             f"more than the {op.bound:g} s gptq2xpu waits ({ENV_TIMEOUT})")
