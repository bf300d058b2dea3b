"""The ``gptq2xpu`` command line: the app, its commands registered in one place, one error path.

Usage examples::

    gptq2xpu demo                                        # make, convert and verify a small model
    gptq2xpu inspect Qwen/Qwen3-30B-A3B-GPTQ-Int4        # what would happen, from headers only
    gptq2xpu convert ./Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu --jobs 8
    gptq2xpu verify ./qwen3-xpu --source ./Qwen3-30B-A3B-GPTQ-Int4
    gptq2xpu convert SRC OUT --part 2/4                  # one of 4 parts, over a job runner
    gptq2xpu finalize OUT                                # once all 4 parts have finished

``--json``, ``--quiet`` and ``--debug`` work on every command, before or after the command name.
Errors are one line on stderr (``gptq2xpu: bad input: <file/tensor>: <what is wrong>``) with an
exit code from :mod:`gptq2xpu.errors`: 0 ok, 1 internal error, 2 usage, 3 bad input,
4 verification failed, 5 I/O error, 130 interrupted.  ``--debug`` shows the traceback.  With
``--json`` every outcome, failures included, is one JSON object on stdout (:data:`JSON_CONTRACT`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import typer

from .. import __version__, interrupts
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_USAGE,
    Gptq2XpuError,
    OutputError,
    UsageError,
    is_resource_error,
    resource_hint,
)
from .options import GLOBAL_FLAGS
from .output import SESSION, Flags, envelope, print_json

#: The ``--json`` contract, shown in ``gptq2xpu --help`` and the README.
JSON_CONTRACT = (
    "With --json every run prints exactly one JSON object on stdout, whatever the outcome: "
    '"status" ("ok", "fail" when verification failed, "error" otherwise), "exit_code", '
    '"message" (one line), "error" (the kind of error, null when ok), "command", "tool" '
    '("gptq2xpu") and "version", followed by the command\'s own data (also on failure, when the '
    "command got that far).  Progress, warnings and error lines go to stderr."
)
EXIT_CODES = ("Exit codes: 0 ok, 1 internal error (a bug: re-run with --debug), 2 usage, 3 bad input, "
              "4 verification failed, 5 I/O error, 130 interrupted.")


def _epilog(examples: list[str], *paragraphs: str) -> str:
    """Examples and the global flags kept line by line (click's ``\\b``), then paragraphs click
    wraps to the terminal."""
    width = max(len(", ".join(names)) for names, _ in GLOBAL_FLAGS) + 2
    flags = [f"  {', '.join(names):<{width}}{text}" for names, text in GLOBAL_FLAGS]
    lines = ["Examples:", "", "\b", *(f"  $ {e}" for e in examples), "", "Global options (any position):", "",
             "\b", *flags]
    return "\n".join(lines) + "".join(f"\n\n{p}" for p in paragraphs)


app = typer.Typer(
    name="gptq2xpu",
    help="Convert GPTQ int4 Mixture-of-Experts checkpoints to the Intel XPU fused-MoE layout, offline, and prove "
         "the result right.\n\n--json, --quiet and --debug work on every command, before or after its name.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wrapped to the terminal, examples kept line by line
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool):
    if value:
        if SESSION.flags.json:
            from .version import versions

            print_json(envelope(exit_code=0, message=f"gptq2xpu {__version__}", error=None, command=None,
                                data=versions()))
        else:
            typer.echo(f"gptq2xpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    _show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit (with --json: an object with the versions of "
                                      "Python and the packages used)."),
):
    pass


# Every command, registered in one place: the modules define plain functions and their EXAMPLES.
from . import convert, demo, finalize, inspect, verify, version  # noqa: E402

COMMANDS = {
    "convert": (convert.convert, convert.EXAMPLES, "Convert a GPTQ checkpoint for XPU (or to compressed-tensors)."),
    "inspect": (inspect.inspect, inspect.EXAMPLES, "Show the conversion plan, from headers alone."),
    "verify": (verify.verify, verify.EXAMPLES, "Check a converted checkpoint (against its source)."),
    "finalize": (finalize.finalize, finalize.EXAMPLES, "Finish a split conversion (convert --part)."),
    "demo": (demo.demo, demo.EXAMPLES, "Make, convert and verify a small synthetic model."),
    "version": (version.version, version.EXAMPLES, "Print the versions of gptq2xpu and what it uses."),
}
for _name, (_function, _examples, _short) in COMMANDS.items():
    app.command(_name, short_help=_short, epilog=_epilog(_examples))(_function)
ROOT_EXAMPLES = [
    "gptq2xpu demo",
    "gptq2xpu inspect Qwen/Qwen3-30B-A3B-GPTQ-Int4",
    "gptq2xpu convert Qwen/Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu",
    "gptq2xpu verify ./qwen3-xpu --source Qwen/Qwen3-30B-A3B-GPTQ-Int4",
    "gptq2xpu convert --help",
]
app.info.epilog = _epilog(ROOT_EXAMPLES, JSON_CONTRACT, EXIT_CODES)


def _message(exc: Gptq2XpuError) -> str:
    return exc.message + (f" ({exc.hint})" if exc.hint else "")


_GLOBAL_WORDS = frozenset(name for names, _ in GLOBAL_FLAGS for name in names)


def scan_flags(argv: list[str]) -> tuple[Flags, list[str]]:
    """The one place --json, --quiet/-q and --debug are read: anywhere before a ``--``, so that they
    hold in any position and even when parsing fails (a usage error still gets its JSON object).
    Returns the flags and the command line without them (what the commands parse)."""
    end = argv.index("--") if "--" in argv else len(argv)
    words = argv[:end]
    flags = Flags(json="--json" in words, quiet="--quiet" in words or "-q" in words,
                  debug="--debug" in words or os.environ.get("GPTQ2XPU_DEBUG") == "1")
    return flags, [w for w in words if w not in _GLOBAL_WORDS] + argv[end:]


def _command_name(argv: list[str]) -> str | None:
    """The command: the first word that is not an option (the root options take no value), when it
    names one (an unknown word is no command: ``--json`` reports ``null`` for it)."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in COMMANDS else None


def _traceback() -> None:
    if SESSION.flags.debug:
        import traceback

        traceback.print_exc()


def main(argv: list[str] | None = None, *, own_process: bool = False) -> None:
    """Console entry point: runs the app and turns every outcome into an exit code, every failure
    into one line on stderr, and, with --json, every outcome into one JSON object on stdout.

    ``own_process``: the run is the whole process (``gptq2xpu.__main__``), which exits right after.
    SIGINT and SIGTERM are then ignored from the moment the exit code is set instead of handed back:
    Python's own dispositions would let a signal during interpreter teardown kill the process with
    another status than the one that says which OUTPUT is in place.  In-process callers (tests, other
    programs) get their handlers back."""
    given = list(sys.argv[1:] if argv is None else argv)
    flags, argv = scan_flags(given)
    SESSION.reset(flags)
    command = _command_name(argv)
    saved = {}
    interrupts.begin()
    try:
        saved[signal.SIGTERM] = signal.signal(signal.SIGTERM, interrupts.on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            saved[signal.SIGINT] = signal.signal(signal.SIGINT, interrupts.on_signal)
    except ValueError:  # not the main thread (embedded use)
        pass
    code, kind, message = 0, None, None   # kind and message: the error, when there is one
    report = True                         # whether --json prints an object
    try:
        if not given:  # bare `gptq2xpu`: the help, on stderr, and a usage exit
            with contextlib.redirect_stdout(sys.stderr):
                app(args=["--help"], prog_name="gptq2xpu", standalone_mode=False)
            raise typer.Exit(EXIT_USAGE)
        rv = app(args=argv, prog_name="gptq2xpu", standalone_mode=False)
        if isinstance(rv, int) and rv == EXIT_INTERRUPTED:  # typer turned a KeyboardInterrupt into this
            code, kind, message = rv, "interrupted", "partial output removed"
        elif SESSION.output is None:  # --help printed text: nothing to report
            report = False
    except Gptq2XpuError as exc:
        _traceback()
        code, kind, message = exc.exit_code, exc.kind, _message(exc)
    except (KeyboardInterrupt, typer.Abort):
        code, kind, message = EXIT_INTERRUPTED, "interrupted", "partial output removed"
    except typer.Exit as exc:  # --help, --version: they printed what was asked
        code, report = exc.exit_code, False
    except typer.TyperException as exc:  # bad option / missing argument: one line, like every other error
        _traceback()
        help_command = "gptq2xpu" + (f" {command}" if command else "")
        code, kind, message = (exc.exit_code or EXIT_USAGE, UsageError.kind,
                               " ".join(exc.format_message().split()) + f" (see `{help_command} --help`)")
    except BrokenPipeError:
        code, report = 0, False
    except Exception as exc:  # a bug (one line unless --debug), or the system out of a resource
        _traceback()
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        if is_resource_error(exc):  # no bug and no judgement of the data: an I/O error
            code, kind, message = EXIT_IO, OutputError.kind, " ".join(str(exc).split()) + resource_hint(exc)
            if isinstance(exc, MemoryError):  # its text is empty or a size: say what ran out
                message = resource_hint(exc)
        else:
            code, kind, message = EXIT_INTERNAL, "internal error", f"{detail} (re-run with --debug and report it)"
    interrupts.decide()  # the code is set: a signal from here on only gets a warning
    late = interrupts.late_warning()
    if late and code == 0:
        sys.stderr.write(f"warning: {late}\n")
    if kind is not None:
        sys.stderr.write(f"gptq2xpu: {kind}: {message}\n")
    try:
        if report and SESSION.flags.json:
            out = SESSION.output
            print_json(envelope(exit_code=code, message=message if kind else (out.message if out else ""),
                                error=kind, command=command, data=out.data if out else None))
        sys.stdout.flush()
    except BrokenPipeError:  # `gptq2xpu ... --json | head`: the reader left
        pass
    _release_signals(saved, own_process)
    raise SystemExit(code)


def _release_signals(saved: dict, own_process: bool) -> None:
    """The run's signal handlers back to the caller's, or ignored until a whole process exits."""
    if own_process:
        saved = dict.fromkeys(interrupts.HELD_SIGNALS, signal.SIG_IGN)
    for sig, handler in saved.items():
        signal.signal(sig, handler)
