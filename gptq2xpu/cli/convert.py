"""``gptq2xpu convert``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..contract import MANIFEST_NAME
from ..errors import UsageError
from .inspect import refuse_as_convert_would
from .options import (
    OUTPUT_ARG,
    SOURCE_ARG,
    EncodingOpt,
    FormatOpt,
    JobsOpt,
    KeepOpt,
    RevisionOpt,
    RouterOpt,
    ScaleDtypeOpt,
    TokenOpt,
    TpOpt,
    convert_options,
    parse_part,
    unused_token,
)
from .output import session_output
from .render import finalize_step, render_convert

EXAMPLES = [
    "gptq2xpu convert Qwen/Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu",
    "gptq2xpu convert ./Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu --scale-dtype bfloat16 --jobs 8",
    "gptq2xpu convert Qwen/Qwen3-30B-A3B-GPTQ-Int4 ./qwen3-xpu-tp4 --tp-size 4 --emit-ranks",
    "gptq2xpu convert SOURCE /shared/out --part 2/4 --max-shard-size 2GB",
]


def convert(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="GPTQ checkpoint: a local folder or a Hugging Face "
                                          "repo id.", parser=SOURCE_ARG)],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Folder to create (appears only when complete; "
                                           "an existing empty folder is accepted).", parser=OUTPUT_ARG)],
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    scale_dtype: ScaleDtypeOpt = "keep",
    output_format: FormatOpt = "xpu",
    nibble_encoding: EncodingOpt = "u4b8",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Largest output shard: "
                                                "5GB (as Hugging Face saves), 500MB, 2GiB, or bytes.")] = "5GB",
    tp_size: TpOpt = 1,
    emit_ranks: Annotated[bool, typer.Option("--emit-ranks", help="Also write tp-ranks/rank-XXX-of-YYY/ folders "
                                             "holding each rank's expert slices (needs --tp-size 2 or more).")] = False,
    keep_unsupported: KeepOpt = False,
    dequantize_router: RouterOpt = False,
    jobs: JobsOpt = None,
    part: Annotated[str | None, typer.Option("--part", metavar="I/N", help="Write only part I of N of the output "
                                             "shards into a shared OUTPUT; run `gptq2xpu finalize OUTPUT` after "
                                             "all parts.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing converted OUTPUT (only once "
                                            "the new one is complete).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (from headers alone) and write "
                                          "nothing; exits 3, as the conversion would, when it refuses a "
                                          "layer.")] = False,
):
    """Convert a GPTQ int4 MoE checkpoint into the XPU fused-MoE layout.

    Every MoE layer's experts become four tensors (w13 and w2, qweight and scales); every other
    tensor is copied byte-identical; config.json gains a "gptq2xpu" block; gptq2xpu-manifest.json
    lists every file with its size and sha256.  The output is byte-identical for every --jobs.
    With --format compressed-tensors, every 4-bit linear is written as compressed-tensors
    pack-quantized instead, which stock vLLM serves without the plugin (docs/formats.md).
    """
    from ..convert import convert as run

    out = session_output()
    options = convert_options(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding, tp_size=tp_size,
                              keep_unsupported=keep_unsupported, dequantize_router=dequantize_router,
                              output_format=output_format,
                              max_shard_size=max_shard_size, emit_ranks=emit_ranks)
    if emit_ranks and part:
        raise UsageError("--emit-ranks cannot be combined with --part (rank folders are cut from the finished shards)")
    with out.progress() as update:
        result = run(source, output, options=options, jobs=jobs, overwrite=overwrite, dry_run=dry_run,
                     part=parse_part(part), revision=revision, token=token,
                     progress=lambda done, total: update("converting", done, total))
    if dry_run and not overwrite and part is None and _holds_files(output):
        unless = ("unless given --overwrite" if os.path.lexists(output / MANIFEST_NAME) else
                  "(it is not a gptq2xpu output: choose a new or empty folder)")
        result.setdefault("warnings", []).append(f"{output}: OUTPUT already exists; the conversion itself will "
                                                 f"refuse it {unless}")
    token_note = unused_token(ctx, source)
    if token_note:
        result.setdefault("warnings", []).insert(0, token_note)
    for w in result.get("warnings", []):
        out.warn(w)
    if dry_run:
        message = f"dry run: {result['converted_layers']} MoE layer(s) would be converted; nothing written"
    else:
        message = (f"converted {result['converted_layers']} MoE layer(s) of {source} into {output}"
                   + (f" (part {result['part']}); {finalize_step(output)}" if result.get("part") else ""))
    out.result(result, render_convert, message)
    if dry_run:
        refuse_as_convert_would(result)


def _holds_files(output: Path) -> bool:
    """Whether OUTPUT is there and is not an empty folder (what the conversion accepts as new)."""
    from ..write.output import is_empty_folder

    return os.path.lexists(output) and not is_empty_folder(output)
