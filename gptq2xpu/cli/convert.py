"""``gptq2xpu convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .options import (
    EncodingOpt,
    JobsOpt,
    JsonOpt,
    KeepOpt,
    QuietOpt,
    RevisionOpt,
    RouterOpt,
    ScaleDtypeOpt,
    TokenOpt,
    TpOpt,
    convert_options,
    parse_part,
)
from .output import Output
from .render import render_convert


def convert(
    source: Annotated[str, typer.Argument(help="GPTQ checkpoint: a local folder or a Hugging Face repo id.")],
    output: Annotated[Path, typer.Argument(help="Folder to create (appears only when complete).")],
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    scale_dtype: ScaleDtypeOpt = "keep",
    nibble_encoding: EncodingOpt = "u4b8",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB (the default, as Hugging Face saves), 500MB, 2GiB.")] = "5GB",
    tp_size: TpOpt = 1,
    emit_ranks: Annotated[bool, typer.Option("--emit-ranks", help="Also write tp-ranks/rank-XXX-of-YYY/ folders holding each rank's expert slices (needs --tp-size).")] = False,
    keep_unsupported: KeepOpt = False,
    dequantize_router: RouterOpt = False,
    jobs: JobsOpt = None,
    part: Annotated[str | None, typer.Option("--part", help="Write only part i of n of the output shards into a shared OUTPUT; run `gptq2xpu finalize OUTPUT` after all parts.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT (only once the new one is complete).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (from headers alone) and write nothing.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Convert a GPTQ int4 MoE checkpoint into the XPU fused-MoE layout.

    Every MoE layer's experts become four tensors (w13/w2 qweight and scales); every other tensor is
    copied byte-identical; config.json gains a "gptq2xpu" block; gptq2xpu-manifest.json lists every
    file with its sha256.
    """
    from ..convert import convert as run

    out = Output(json_out, quiet)
    options = convert_options(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding, tp_size=tp_size,
                              keep_unsupported=keep_unsupported, dequantize_router=dequantize_router,
                              max_shard_size=max_shard_size, emit_ranks=emit_ranks)
    if emit_ranks and part:
        raise UsageError("--emit-ranks cannot be combined with --part (rank folders are cut from the finished shards)")
    with out.progress("converting") as update:
        result = run(source, output, options=options, jobs=jobs, overwrite=overwrite, dry_run=dry_run,
                     part=parse_part(part), revision=revision, token=token, progress=update)
    for w in result.get("warnings", []):
        out.warn(w)
    out.result(result, render_convert)
