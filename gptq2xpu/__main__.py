"""``python -m gptq2xpu`` and the ``gptq2xpu`` console script.

Ctrl-C is handled from the first moment: the command line's own handler is installed by
:func:`gptq2xpu.cli.main`, but importing it (typer, click, rich, numpy) takes a noticeable time,
and a Ctrl-C meanwhile ends the run here with the same one line and exit code 130.
"""

import os
import sys

# numpy's OpenBLAS starts a thread per core at import, each spinning ~0.1 s of CPU waiting for work
# that never comes (the command line calls no BLAS; verify's math runs in torch): 0.11 s of a 2-core
# machine's convert, 1.5 core-seconds on 16 cores.  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> None:
    """Run the command line; a Ctrl-C before it could take over is one line, exit 130."""
    try:
        from .cli import main as cli_main

        cli_main(argv)
    except KeyboardInterrupt:
        _interrupted(sys.argv[1:] if argv is None else argv)


def _interrupted(argv: list[str]) -> None:
    message = "stopped by SIGINT (Ctrl-C) while starting; nothing was written"
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
    except (KeyboardInterrupt, OSError):
        pass
    raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
