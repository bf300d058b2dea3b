"""Options shared by several commands, defined once, and the parsing and bounds of their values.

Every option names its value (``--tp-size T``) and every choice lists its values; a choice is
checked here, so that a wrong one is a one-line usage error naming the option and the choices.
Every number has bounds: a value outside them is a usage error.  ``--json``, ``--quiet`` and
``--debug`` are no options of a command: :func:`gptq2xpu.cli.main` takes them from anywhere on
the command line (:data:`GLOBAL_FLAGS`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from ..contract import ENCODINGS
from ..errors import UsageError
from ..plan import ConvertOptions
from ..plan.options import OUTPUT_FORMATS, SCALE_DTYPE_CHOICES
from ..read.resolve import check_revision

DEVICES = ("auto", "xpu", "cuda", "cpu")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("auto", "reference", "xpu-kernels")

#: The flags of every command, in any position: (names, help).  Parsed by ``main`` alone.
GLOBAL_FLAGS = (
    (("--json",), "One JSON object on stdout, whatever the outcome."),
    (("-q", "--quiet"), "Nothing but errors and warnings."),
    (("--debug",), "A Python traceback for errors (or GPTQ2XPU_DEBUG=1)."),
)


def choice(flag: str, values, help: str):  # noqa: A002 - typer's own name for it
    """A choice option: ``[a|b|c]`` in the help, and a value not among them refused as a usage
    error that names the option and the choices."""
    values = tuple(values)

    def parse(text: str) -> str:
        if text not in values:
            raise UsageError(f"{flag} {_shown(text)}: expected one of {', '.join(values)}")
        return text

    return typer.Option(flag, metavar="[" + "|".join(values) + "]", parser=parse, help=help)


#: bounds of the numeric options (inclusive)
MAX_JOBS = 1024
MAX_TP = 1024  # what a config block may record (gptq2xpu.contract)
MAX_PARTS = 10_000
MAX_SHARD_BYTES = 2**50  # 1 PiB

def nonempty(name: str, hint: str, convert=str):
    """The parser of a text option or argument that refuses an empty value: typed as ``""`` a path
    would mean the current folder and an option would be taken as left out, neither of which the
    user can have meant."""
    def parse(text: str):
        if text == "":
            raise UsageError(f"{name} is empty: {hint}")
        return convert(text)
    return parse


def _limit(name: str, default: int) -> int:
    try:
        return os.pathconf("/", name)
    except (OSError, ValueError):
        return default


def usable_path(name: str, text: str, *, relative_to_cwd: bool = True) -> str:
    """``text`` as given, refused (usage error, one line) where no system call could take it: longer
    than the system's PATH_MAX or with a name longer than NAME_MAX, or -- ``relative_to_cwd`` --
    relative to a current folder that was deleted.  Checked here, once for every path argument,
    so that no command meets it later as an unexplained OSError."""
    size = len(os.fsencode(text))
    path_max = _limit("PC_PATH_MAX", 4096)
    if size >= path_max:
        raise UsageError(f"{name} is {size} bytes long, more than the {path_max - 1} a path may have on this system")
    name_max = _limit("PC_NAME_MAX", 255)
    long = next((part for part in text.split("/") if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise UsageError(f"{name}: the name {long[:40]}... is {len(os.fsencode(long))} bytes, more than the "
                         f"{name_max} a file name may have")
    if relative_to_cwd and not os.path.isabs(text):
        try:
            os.getcwd()
        except OSError:
            raise UsageError(f"{name} {text[:200]!r} is relative to the current folder, which no longer exists; give "
                             "an absolute path or change to an existing folder") from None
    return text


def path_arg(name: str, hint: str):
    """The parser of a path argument: not empty (:func:`nonempty`), and :func:`usable_path`."""
    return nonempty(name, hint, lambda text: Path(usable_path(name, text)))


def source_arg(name: str, hint: str):
    """The parser of SOURCE (a folder or a repo id, which never needs the current folder)."""
    return nonempty(name, hint, lambda text: usable_path(name, text, relative_to_cwd=False))


# --- where a source comes from
SOURCE_ARG = source_arg("SOURCE", "name a checkpoint folder or a Hugging Face repo id")
SOURCE_OPT = source_arg("--source", "name the GPTQ checkpoint OUTPUT was made from, or leave it out")
OUTPUT_ARG = path_arg("OUTPUT", "name a folder (. for the current one)")
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="REV",
    parser=nonempty("--revision", "name a branch, tag or commit, or leave it out", check_revision),
    help="Hub revision (branch, tag or commit) when SOURCE is a repo id; refused for a local folder.")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", metavar="TOKEN", envvar="HF_TOKEN", show_envvar=True,
    parser=nonempty("--token", "leave it out to use the cached login (an empty HF_TOKEN counts as unset)"),
    help="Hugging Face token for private or gated repos (default: the cached login).")]

# --- what the converted experts look like (convert and inspect)
ScaleDtypeOpt = Annotated[str, choice("--scale-dtype", SCALE_DTYPE_CHOICES, help="Dtype of the written scales: "
                                      "keep (the source's) or a cast, refused where it would lose a scale; the "
                                      "kernel reads scales in the activation dtype, so pick the one the model runs "
                                      "in.")]
EncodingOpt = Annotated[str, choice("--nibble-encoding", ENCODINGS, help="u4b8: offset-8 codes, what vLLM's XPU "
                                    "path feeds the kernel; s4: signed nibbles (byte ^ 0x88).")]
DeviceOpt = Annotated[str, choice("--device", DEVICES, help="Where the reference MoE runs (auto: xpu, else cuda, "
                                  "else cpu).")]
FormatOpt = Annotated[str, choice("--format", OUTPUT_FORMATS, help="xpu: stacked expert tensors the XPU kernel "
                                  "takes without a copy (vLLM with the gptq2xpu plugin); compressed-tensors: "
                                  "pack-quantized W4A16, served by stock vLLM of any current release and platform.")]
TpOpt = Annotated[int, typer.Option("--tp-size", metavar="T", min=1, max=MAX_TP, help="Make every tensor-parallel "
                                    "rank's slice of N hold whole supported groups (regroup, else zero-pad); serve "
                                    "the output with vLLM's --tensor-parallel-size T.")]
KeepOpt = Annotated[bool, typer.Option("--keep-unsupported", help="Write MoE layers the kernel cannot run (e.g. "
                                       "8-bit) unchanged instead of refusing.")]
RouterOpt = Annotated[bool, typer.Option("--dequantize-router", help="Write a GPTQ-quantized router as a float "
                                         "weight instead of passing it through.")]
#: ``convert``'s --jobs (its default is capped at gptq2xpu.convert.MAX_DEFAULT_JOBS, not imported here: that
#: would load the converter for every command's help).
JobsOpt = Annotated[int | None, typer.Option("--jobs", "-j", metavar="N", min=1, max=MAX_JOBS,
                                             help="Worker threads (default: the cores available, at most 8; the "
                                                  "page cache, not the cores, bounds the writing).")]


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}
_SIZE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([KMGTP]i?B|B)?\s*", re.IGNORECASE | re.ASCII)
_SIZE_DIGITS = 30  # more digits than any size up to the bound needs, fewer than Python's int limit


def _shown(text: str) -> str:
    """A typed value as an error message repeats it: quoted, and cut short when long."""
    text = str(text)
    return repr(text) if len(text) <= 40 else f"{text[:37]!r}... ({len(text)} characters)"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '500MB', '1PiB', '1048576' (bytes), exact
    (no float rounding), fractions of a byte rounded down; more than 0 and at most 1 PiB."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise UsageError(f"--max-shard-size {_shown(text)}: expected a byte count or a size such as 5GB, 500MB, "
                         "2GiB (units B, KB to PB, KiB to PiB)")
    whole, fraction = m[1].lstrip("0") or "0", (m[2] or "")[:_SIZE_DIGITS]
    mult = _UNITS[(m[3] or "B").upper()]
    value = 0 if len(whole) > _SIZE_DIGITS else (int(whole + fraction) * mult) // 10 ** len(fraction)
    if len(whole) > _SIZE_DIGITS or not 0 < value <= MAX_SHARD_BYTES:
        raise UsageError(f"--max-shard-size {_shown(text)}: expected more than 0 bytes and at most 1 PiB "
                         f"({MAX_SHARD_BYTES} bytes)")
    return value


def parse_part(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4)."""
    if text is None:
        return None
    m = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", text.strip())
    if not m or not (1 <= int(m[1]) <= int(m[2]) <= MAX_PARTS):
        raise UsageError(f"--part {_shown(text)}: expected i/n with 1 <= i <= n <= {MAX_PARTS}, e.g. 2/4")
    return int(m[1]), int(m[2])


def convert_options(*, scale_dtype: str, nibble_encoding: str, tp_size: int,
                    keep_unsupported: bool, dequantize_router: bool, max_shard_size: str | int = "5GB",
                    emit_ranks: bool = False, output_format: str = "xpu") -> ConvertOptions:
    """The :class:`ConvertOptions` of ``convert`` and ``inspect`` from their command-line values."""
    return ConvertOptions(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding,
                          max_shard_size=parse_size(max_shard_size), keep_unsupported=keep_unsupported,
                          dequantize_router=dequantize_router, tp_size=tp_size, emit_ranks=emit_ranks,
                          output_format=output_format)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether parameter ``name`` was typed on the command line (not a default, not an env var)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def unused_token(ctx: typer.Context, source: str | None) -> str | None:
    """The warning for a ``--token`` typed with a local SOURCE folder, which needs none (the
    ``HF_TOKEN`` variable is not warned about: it is set for every command alike)."""
    if source is None or not given(ctx, "token") or not Path(source).expanduser().is_dir():
        return None
    return f"--token ignored: SOURCE {source} is a local folder (the token is for Hugging Face repo ids)"
