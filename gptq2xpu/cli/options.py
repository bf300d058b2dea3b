"""Options shared by several commands, defined once, and the parsing of their values."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from ..errors import UsageError
from ..plan import ConvertOptions

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and warnings.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")]
TokenOpt = Annotated[str | None, typer.Option(help="Hugging Face token for private or gated repos (default: the cached login).", envvar="HF_TOKEN", show_envvar=True)]
ScaleDtypeOpt = Annotated[str, typer.Option("--scale-dtype", help="Scale dtype: keep, float16 or bfloat16 (the kernel reads scales in the activation dtype).")]
EncodingOpt = Annotated[str, typer.Option("--nibble-encoding", help="u4b8 (offset-8 codes, what vLLM's XPU path feeds the kernel) or s4 (signed nibbles, byte ^ 0x88).")]
TpOpt = Annotated[int, typer.Option("--tp-size", help="Make every tensor-parallel rank's slice of N hold whole supported groups (regroup, else zero-pad).")]
KeepOpt = Annotated[bool, typer.Option("--keep-unsupported", help="Write MoE layers the kernel cannot run (e.g. 8-bit) unchanged instead of refusing.")]
RouterOpt = Annotated[bool, typer.Option("--dequantize-router", help="Write a GPTQ-quantized router as a float weight instead of passing it through.")]
JobsOpt = Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Worker threads (default: the cores available). Output is byte-identical for every value.")]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '500MB', '1048576' (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,15})?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
    unit = (m[2] or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m[1]) * mult)
    if value <= 0:
        raise UsageError(f"--max-shard-size {text!r} must be positive")
    return value


def parse_part(text: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text.strip())
    if not m or not (1 <= int(m[1]) <= int(m[2])):
        raise UsageError(f"--part {text!r}: expected i/n with 1 <= i <= n, e.g. 2/4")
    return int(m[1]), int(m[2])


def convert_options(*, scale_dtype: str, nibble_encoding: str, tp_size: int, keep_unsupported: bool,
                    dequantize_router: bool, max_shard_size: str | int = "5GB",
                    emit_ranks: bool = False) -> ConvertOptions:
    """The :class:`ConvertOptions` of ``convert`` and ``inspect`` from their command-line values."""
    return ConvertOptions(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding,
                          max_shard_size=parse_size(max_shard_size), keep_unsupported=keep_unsupported,
                          dequantize_router=dequantize_router, tp_size=tp_size, emit_ranks=emit_ranks)
