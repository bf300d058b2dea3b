"""One output helper for every command: rich text on a terminal, one JSON object with ``--json``.

Results go to stdout; progress, warnings and errors go to stderr, so ``--json`` output stays
machine-readable.  Progress bars appear only on an interactive terminal and never in CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from rich.console import Console


def _in_ci() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        # piped / CI output is read by people in logs: do not fold tables to 80 columns
        wide = None if sys.stdout.isatty() else max(int(os.environ.get("COLUMNS") or 0), 200)
        self.out = Console(highlight=False, soft_wrap=True, width=wide)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, width=wide)

    def result(self, data: dict, render=None) -> None:
        """Print the command's result: JSON, or ``render(console, data)`` for people."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None and not self.quiet:
            render(self.out, data)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}", markup=True)

    @contextlib.contextmanager
    def progress(self, description: str):
        """Yields ``update(done, total)``; a rich bar on a terminal, silent in CI or with --json."""
        if self.json_mode or self.quiet or _in_ci():
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
