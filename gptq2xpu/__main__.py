"""``python -m gptq2xpu`` and the ``gptq2xpu`` console script.

SIGINT (Ctrl-C) and SIGTERM are handled from the first line here: the command line's own handler
is installed by :func:`gptq2xpu.cli.main`, but importing it (typer, click, rich, numpy) takes a
noticeable time, and a signal meanwhile ends the run here with one line and exit code 130.  A
signal that arrives before :func:`main` runs is kept and acted on as soon as it does.  After the
run, the process owns its signals until it is gone (:func:`gptq2xpu.cli.main` with
``own_process``), so a late signal cannot change the exit code that says which OUTPUT is in place.

Importing this module installs the start-up handlers: only the two entry points above import it.
"""

import os
import signal
import sys


class _Stopped(BaseException):
    """A signal while starting.  Not KeyboardInterrupt: one raised inside an ``exec`` of a string
    (dataclasses build methods so) makes CPython end ``python -m`` by SIGINT after a clean exit."""


class _Starting:
    """A signal that arrived while starting: raised at once inside :func:`main`, kept before."""

    armed = False
    pending: int | None = None


def _on_signal(signum: int, _frame) -> None:
    """Raise once, inside :func:`main`: a second signal while it reports the first is only kept."""
    if _Starting.armed:
        _Starting.armed = False
        raise _Stopped(signum)
    _Starting.pending = _Starting.pending or signum


def _install() -> None:
    """SIGTERM always (its default would kill the process without a word); SIGINT unless the
    parent ignores it (a background job), as Python itself does."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)


_install()

# numpy's OpenBLAS starts a thread per core at import, each spinning ~0.1 s of CPU waiting for work
# that never comes (the command line calls no BLAS; verify's math runs in torch): 0.11 s of a 2-core
# machine's convert, 1.5 core-seconds on 16 cores.  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> None:
    """Run the command line; a signal before it could take over is one line, exit 130."""
    try:
        _Starting.armed = True
        if _Starting.pending is not None:
            raise _Stopped(_Starting.pending)
        from .cli import main as cli_main

        _hand_over()
        cli_main(argv, own_process=True)
    except (_Stopped, KeyboardInterrupt) as exc:
        _Starting.armed = False
        _interrupted(sys.argv[1:] if argv is None else argv, exc.args[0] if exc.args else signal.SIGINT)


def _hand_over() -> None:
    """SIGINT back to Python's default, which :func:`gptq2xpu.cli.main` replaces by its own handler
    (it leaves any other in place); it replaces SIGTERM's in any case."""
    if signal.getsignal(signal.SIGINT) is _on_signal:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupted(argv: list[str], signum: int) -> None:
    _ignore_signals()
    how = "terminated by SIGTERM" if signum == signal.SIGTERM else "stopped by SIGINT (Ctrl-C)"
    message = f"{how} while starting; nothing was written"
    words = argv[:argv.index("--")] if "--" in argv else argv
    try:
        sys.stderr.write(f"gptq2xpu: interrupted: {message}\n")
        if "--json" in words:
            import json

            from . import __version__

            command = next((w for w in words if not w.startswith("-")), None)
            sys.stdout.write(json.dumps({"status": "error", "exit_code": EXIT_INTERRUPTED, "message": message,
                                         "error": "interrupted", "command": command,
                                         "tool": "gptq2xpu", "version": __version__}, indent=2) + "\n")
            sys.stdout.flush()
    except OSError:
        pass
    raise SystemExit(EXIT_INTERRUPTED)


def _ignore_signals() -> None:
    """The outcome is decided: a later signal must not kill the process with another status."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    main()
