"""``gptq2xpu convert`` and ``gptq2xpu finalize``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..plan import ConvertOptions, parse_size
from . import app
from ._output import Output
from ._render import render_convert

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors and warnings.")]
RevisionOpt = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")]
TokenOpt = Annotated[Optional[str], typer.Option(help="Hugging Face token for private or gated repos (default: the cached login).", envvar="HF_TOKEN", show_envvar=True)]
ScaleDtypeOpt = Annotated[str, typer.Option("--scale-dtype", help="Scale dtype: keep, float16 or bfloat16 (the kernel reads scales in the activation dtype).")]
EncodingOpt = Annotated[str, typer.Option("--nibble-encoding", help="u4b8 (offset-8 codes, what vLLM's XPU path feeds the kernel) or s4 (signed nibbles, byte ^ 0x88).")]
TpOpt = Annotated[int, typer.Option("--tp-size", help="Make every tensor-parallel rank's slice of N hold whole supported groups (regroup, else zero-pad).")]
KeepOpt = Annotated[bool, typer.Option("--keep-unsupported", help="Write MoE layers the kernel cannot run (e.g. 8-bit) unchanged instead of refusing.")]
RouterOpt = Annotated[bool, typer.Option("--dequantize-router", help="Write a GPTQ-quantized router as a float weight instead of passing it through.")]


def parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (1 <= int(m[1]) <= int(m[2])):
        raise UsageError(f"--part {text!r}: expected i/n with 1 <= i <= n, e.g. 2/4")
    return int(m[1]), int(m[2])


@app.command()
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
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="Worker threads (default: the cores available). Output is byte-identical for every value.")] = None,
    part: Annotated[Optional[str], typer.Option("--part", help="Write only part i of n of the output shards into a shared OUTPUT; run `gptq2xpu finalize OUTPUT` after all parts.")] = None,
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
    options = ConvertOptions(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding,
                             max_shard_size=parse_size(max_shard_size), keep_unsupported=keep_unsupported,
                             dequantize_router=dequantize_router, tp_size=tp_size, emit_ranks=emit_ranks)
    if emit_ranks and part:
        raise UsageError("--emit-ranks cannot be combined with --part (rank folders are cut from the finished shards)")
    with out.progress("converting") as update:
        result = run(source, output, options=options, jobs=jobs, overwrite=overwrite, dry_run=dry_run,
                     part=parse_part(part), revision=revision, token=token, progress=update)
    for w in result.get("warnings", []):
        out.warn(w)
    out.result(result, render_convert)


@app.command()
def finalize(
    output: Annotated[Path, typer.Argument(help="The shared OUTPUT folder that every `convert --part i/n` wrote into.")],
    json_out: JsonOpt = False,
):
    """Finish a split conversion: write index, config.json and manifest once every part is there.

    The result is byte-identical to a single `gptq2xpu convert` run.
    """
    from ..writer import finalize as run

    out = Output(json_out)
    files = run(output)
    out.result({"output": str(output), "files": len(files), "finalized": True},
               lambda c, d: c.print(f"[green]finalized[/] {d['output']}: {d['files']} files"))
