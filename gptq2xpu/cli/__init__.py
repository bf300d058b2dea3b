"""The ``gptq2xpu`` command line.

Usage examples::

    gptq2xpu demo                                        # make, convert and verify a small model
    gptq2xpu inspect Qwen/Qwen3-30B-A3B-GPTQ-Int4        # what would happen, from headers only
    gptq2xpu convert ./Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu --jobs 8
    gptq2xpu convert org/model ./out --revision main --scale-dtype bfloat16 --json
    gptq2xpu verify ./qwen3-xpu                          # standalone: manifest, layout, config block
    gptq2xpu verify ./qwen3-xpu --source ./Qwen3-30B-A3B-GPTQ-Int4 --device auto
    gptq2xpu convert SRC OUT --part 2/4 && gptq2xpu finalize OUT   # split over a job runner

Errors are one line on stderr (``gptq2xpu: bad input: <file/tensor>: <what is wrong>``) with an
exit code from :mod:`gptq2xpu.errors`: 0 ok, 1 internal error, 2 usage, 3 bad input,
4 verification failed, 5 I/O error, 130 interrupted.  ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import click
import typer

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, Gptq2XpuError, Interrupted, UsageError

# typer >= 0.20 vendors click as ``typer._click``: its exceptions are not click's, so catch both.
try:
    from typer._click import exceptions as _tclick
except ImportError:  # older typer: plain click
    _tclick = click.exceptions
_CLICK_ERRORS = tuple({click.ClickException, _tclick.ClickException})
_NO_ARGS_HELP = tuple(c for c in {getattr(click.exceptions, "NoArgsIsHelpError", None),
                                  getattr(_tclick, "NoArgsIsHelpError", None)} if c is not None)
_EXITS = tuple({click.exceptions.Exit, typer.Exit, getattr(_tclick, "Exit", click.exceptions.Exit)})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort, getattr(_tclick, "Abort", click.exceptions.Abort)})

app = typer.Typer(
    name="gptq2xpu",
    help="Convert GPTQ int4 Mixture-of-Experts checkpoints to the Intel XPU fused-MoE layout, and prove the result right.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}


def _version(value: bool):
    if value:
        typer.echo(f"gptq2xpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show a Python traceback for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    _state["debug"] = debug or _state["debug"]


# Every command, registered in one place (the modules define plain functions).
from .convert import convert  # noqa: E402
from .demo import demo  # noqa: E402
from .finalize import finalize  # noqa: E402
from .inspect import inspect  # noqa: E402
from .verify import verify  # noqa: E402

for _command in (convert, inspect, verify, finalize, demo):
    app.command()(_command)


def _on_sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM")


def _on_sigint(signum, frame):
    # Not KeyboardInterrupt: typer turns that into a silent ``return 130``; this reaches main().
    raise Interrupted("stopped by SIGINT (Ctrl-C)")


def _error_line(exc: Gptq2XpuError) -> str:
    line = f"gptq2xpu: {exc.kind}: {exc.message}"
    if exc.hint:
        line += f" ({exc.hint})"
    return line


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns every expected failure into one line + exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv or os.environ.get("GPTQ2XPU_DEBUG") == "1"
    saved = {}
    try:
        saved[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            saved[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread (embedded use)
        pass
    code = 0
    try:
        rv = app(args=argv, prog_name="gptq2xpu", standalone_mode=False)
        if isinstance(rv, int):
            code = rv
            if code == EXIT_INTERRUPTED:  # typer turned a KeyboardInterrupt into this return value
                sys.stderr.write("gptq2xpu: interrupted; partial output removed\n")
    except Gptq2XpuError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        sys.stderr.write(_error_line(exc) + "\n")
        code = exc.exit_code
    except (KeyboardInterrupt, *_ABORTS):
        sys.stderr.write("gptq2xpu: interrupted; partial output removed\n")
        code = EXIT_INTERRUPTED
    except _EXITS as exc:
        code = exc.exit_code
    except _NO_ARGS_HELP as exc:  # bare `gptq2xpu` / `gptq2xpu convert`: the help was printed
        exc.show()
        code = EXIT_USAGE
    except _CLICK_ERRORS as exc:  # bad option / missing argument: one line, like every other error
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        sys.stderr.write(_error_line(UsageError(exc.format_message())) + "\n")
        code = exc.exit_code if exc.exit_code else EXIT_USAGE
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # a bug: one line unless --debug
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        sys.stderr.write(f"gptq2xpu: internal error: {detail} (re-run with --debug and report it)\n")
        code = EXIT_INTERNAL
    for sig, handler in saved.items():  # embedded callers (tests) get their handlers back
        signal.signal(sig, handler)
    sys.stdout.flush()
    raise SystemExit(code)
