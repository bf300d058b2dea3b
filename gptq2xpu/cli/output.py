"""One output helper for every command: rich text for people, one JSON object with ``--json``.

Results go to stdout; progress, warnings and errors go to stderr.  With ``--json`` the command's
result is not printed by the command: :func:`gptq2xpu.cli.main` prints it once the outcome is
known, as one object (:func:`envelope`), whether the command succeeded, failed verification or
never ran (a usage error).  Progress bars appear only when stderr is an interactive terminal, never
in CI (``CI`` set) and never with ``--quiet``; they are drawn on stderr, so stdout holds nothing but
the result.  ``NO_COLOR`` is honoured (by rich).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, TimeRemainingColumn
from rich.text import Text

from .. import __version__
from ..read.hubclient import progress_bars


@dataclass
class Flags:
    """The flags every command takes, in any position (``main`` reads them before parsing)."""

    json: bool = False
    quiet: bool = False
    debug: bool = False


class Session:
    """What one invocation of the command line has said so far (read by ``main`` at the end)."""

    def __init__(self) -> None:
        self.flags = Flags()
        self.output: Output | None = None

    def reset(self, flags: Flags) -> None:
        self.flags = flags
        self.output = None


SESSION = Session()


def _in_ci() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


def _width() -> int | None:
    # piped / CI output is read by people in logs: do not fold tables to 80 columns
    return None if sys.stdout.isatty() else max(int(os.environ.get("COLUMNS") or 0), 200)


def as_text(value):
    """``value`` with every string escaped for rich's markup, recursively: a path, a tensor name or
    a config pattern holding ``[...]`` (``./models/[v2]``, ``--[no-]numeric``) is printed as it is,
    not taken for a style tag and dropped.  The renderings add their own tags around such values."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_text(v) for v in value)
    return value


def error_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True, width=_width())


class Output:
    """The output of one command.  Create it with :func:`session_output`."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.data: dict | None = None
        self.message = ""
        self.out = Console(highlight=False, soft_wrap=True, width=_width())
        self.err = error_console()

    def result(self, data: dict, render: Callable | None = None, message: str = "") -> None:
        """The command's result: ``render(console, data)`` for people now; kept for ``--json``.

        ``message`` is the one-line summary the JSON object carries on success."""
        self.data = data
        self.message = message
        if not self.json_mode and not self.quiet and render is not None:
            render(self.out, as_text(data))

    def warn(self, message: str) -> None:
        """A warning on stderr (shown with ``--quiet`` too)."""
        self.err.print(f"[yellow]warning:[/] {as_text(message)}", markup=True)

    @contextlib.contextmanager
    def progress(self):
        """Yields ``update(what, done, total, unit="bytes")``: one bar per ``what`` with its amount
        (binary units for bytes, ``3/48 layers`` otherwise) and the time remaining.  A bar appears
        only once its total is known; nothing is drawn off a terminal, in CI or with ``--quiet``."""
        if self.quiet or _in_ci():
            with progress_bars(False):  # nor huggingface_hub's download bars
                yield _no_progress
            return
        bar = Progress("[progress.description]{task.description}", BarColumn(), _AmountColumn(),
                       TimeRemainingColumn(), console=self.err, transient=True, redirect_stdout=False)
        tasks: dict[str, int] = {}

        def update(what: str, done: int, total: int, unit: str = "bytes") -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total, unit=unit)
            bar.update(tasks[what], completed=done, total=total)

        with bar:
            yield update


def _no_progress(*_args, **_kwargs) -> None:
    return None


class _AmountColumn(ProgressColumn):
    """``1.20/3.40 GiB`` (the units of every summary) or ``3/48 layers``."""

    _bytes = DownloadColumn(binary_units=True)

    def render(self, task):
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            return self._bytes.render(task)
        return Text(f"{int(task.completed)}/{int(task.total or 0)} {unit}", style="progress.download")


def session_output() -> Output:
    """The :class:`Output` of the running command, under the flags ``main`` read from the command line."""
    SESSION.output = Output(SESSION.flags.json, SESSION.flags.quiet)
    return SESSION.output


# ------------------------------------------------------------------------------ the JSON contract

#: Keys every ``--json`` object carries, first, in this order.
ENVELOPE_KEYS = ("status", "exit_code", "message", "error", "command", "tool", "version")


def envelope(*, exit_code: int, message: str, error: str | None, command: str | None,
             data: dict | None = None) -> dict:
    """The one JSON object of a run: status ``ok`` (exit 0), ``fail`` (exit 4, verification
    failed) or ``error`` (anything else); the command's own data follows the fixed keys."""
    status = "ok" if exit_code == 0 else "fail" if exit_code == 4 else "error"
    doc = {"status": status, "exit_code": exit_code, "message": message, "error": error,
           "command": command, "tool": "gptq2xpu", "version": __version__}
    for key, value in (data or {}).items():
        if key not in doc:
            doc[key] = value
    return doc


def _finite(value):
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(_finite(doc), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def human_bytes(n: int) -> str:
    """Binary units, as the progress bars show them: ``512 B``, ``1.19 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
