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
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, Gptq2XpuError, Interrupted

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


from . import convert as _convert  # noqa: E402,F401  (registers commands)
from . import demo as _demo  # noqa: E402,F401
from . import inspect as _inspect  # noqa: E402,F401
from . import verify as _verify  # noqa: E402,F401


def _on_sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM")


def _error_line(exc: Gptq2XpuError) -> str:
    line = f"gptq2xpu: {exc.kind}: {exc.message}"
    if exc.hint:
        line += f" ({exc.hint})"
    return line


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the app and turns every expected failure into one line + exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _state["debug"] = "--debug" in argv or os.environ.get("GPTQ2XPU_DEBUG") == "1"
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use)
        pass
    code = 0
    try:
        rv = app(args=argv, prog_name="gptq2xpu", standalone_mode=False)
        if isinstance(rv, int):
            code = rv
    except Gptq2XpuError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        sys.stderr.write(_error_line(exc) + "\n")
        code = exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.stderr.write("gptq2xpu: interrupted; partial output removed\n")
        code = EXIT_INTERRUPTED
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
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
    sys.stdout.flush()
    raise SystemExit(code)
