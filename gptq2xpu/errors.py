"""One error type for everything a user can cause, and the exit codes it maps to.

Every expected failure raises a subclass of :class:`Gptq2XpuError` with a one-line message that
names the file or tensor at fault and what is wrong with it.  The CLI turns it into that line on
stderr and the subclass's exit code; nothing else in the package prints errors.

=====  ==========================  =========================================================
code   class                       meaning
=====  ==========================  =========================================================
0      -                           success
1      (unexpected exception)      a bug in gptq2xpu; re-run with ``--debug`` and report it
2      :class:`UsageError`         bad command line: unknown option, OUTPUT exists, ...
3      :class:`InputError`         the source checkpoint is malformed or cannot be converted
4      :class:`VerificationError`  ``verify`` ran and found the output wrong
5      :class:`OutputError`        an I/O failure writing OUTPUT (disk full, read-only, ...)
130    :class:`Interrupted`        interrupted (Ctrl-C / SIGINT, SIGTERM)
=====  ==========================  =========================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_VERIFY = 4
EXIT_IO = 5
EXIT_INTERRUPTED = 130


class Gptq2XpuError(Exception):
    """Base of every error gptq2xpu reports to a user (message: one line, names the culprit)."""

    exit_code = EXIT_INTERNAL
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(Gptq2XpuError):
    """The command line asks for something impossible (OUTPUT exists, bad option value...)."""

    exit_code = EXIT_USAGE
    kind = "usage error"


class InputError(Gptq2XpuError):
    """The source checkpoint is malformed, untrusted data failed a check, or it cannot be converted."""

    exit_code = EXIT_INPUT
    kind = "bad input"


class VerificationError(Gptq2XpuError):
    """`verify` found the converted checkpoint wrong."""

    exit_code = EXIT_VERIFY
    kind = "verification failed"


class OutputError(Gptq2XpuError):
    """An I/O failure: writing OUTPUT failed (disk full, read-only parent, permission...), or the
    system ran out of a resource or a device failed while reading (:func:`read_error`)."""

    exit_code = EXIT_IO
    kind = "I/O error"


class Interrupted(Gptq2XpuError):
    """The run was interrupted (SIGINT/SIGTERM); partial output has been removed."""

    exit_code = EXIT_INTERRUPTED
    kind = "interrupted"


#: errno values of an OSError that say the system ran out of something (open files, memory,
#: buffers) or a device failed: an I/O error (exit 5), never a judgement of the data being read.
RESOURCE_ERRNOS = frozenset({"EMFILE", "ENFILE", "ENOMEM", "ENOBUFS", "EIO"})


def is_resource_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the system ran out of something: Python's MemoryError, or an OSError
    of :data:`RESOURCE_ERRNOS`."""
    import errno

    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, OSError) and errno.errorcode.get(exc.errno or -1) in RESOURCE_ERRNOS


def read_error(what: str, exc: OSError, action: str = "cannot read") -> Gptq2XpuError:
    """The one-line error for an OSError met reading ``what``: an I/O error (exit 5) when the system
    ran out of a resource or a device failed (:data:`RESOURCE_ERRNOS`), else bad input (exit 3)."""
    text = f"{what}: {action} ({exc.strerror or exc})"
    if not is_resource_error(exc):
        return InputError(text)
    return OutputError(text + resource_hint(exc))


def resource_hint(exc: BaseException) -> str:
    """What to do about a resource error, as the tail of its message ("" when nothing to say)."""
    import errno

    if isinstance(exc, MemoryError):
        return "out of memory; free memory or raise the memory limit (ulimit -v) and run again"
    return "; raise the open-file limit (ulimit -n) and run again" if getattr(exc, "errno", None) in (
        errno.EMFILE, errno.ENFILE) else ""


def io_error(action: str, path, exc: OSError) -> OutputError:
    """Wrap an OSError from writing into a one-line OutputError (ENOSPC gets a plain name)."""
    import errno

    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }.get(exc.errno or -1, exc.strerror or str(exc))
    return OutputError(f"{action} {path}: {reason}")
