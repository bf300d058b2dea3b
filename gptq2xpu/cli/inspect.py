"""``gptq2xpu inspect``: the conversion plan from safetensors headers alone."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import InputError
from .options import (
    SOURCE_ARG,
    EncodingOpt,
    FormatOpt,
    KeepOpt,
    RevisionOpt,
    RouterOpt,
    ScaleDtypeOpt,
    TokenOpt,
    TpOpt,
    convert_options,
    unused_token,
)
from .output import session_output
from .render import render_inspect

EXAMPLES = [
    "gptq2xpu inspect Qwen/Qwen3-30B-A3B-GPTQ-Int4",
    "gptq2xpu inspect ./Qwen3-30B-A3B-GPTQ-Int4 --tp-size 4",
    "gptq2xpu inspect Qwen/Qwen3-30B-A3B-GPTQ-Int4 --revision main --json > plan.json",
]


def inspect(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="GPTQ checkpoint: a local folder or a Hugging Face "
                                          "repo id.", parser=SOURCE_ARG)],
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    scale_dtype: ScaleDtypeOpt = "keep",
    output_format: FormatOpt = "xpu",
    nibble_encoding: EncodingOpt = "u4b8",
    tp_size: TpOpt = 1,
    keep_unsupported: KeepOpt = False,
    dequantize_router: RouterOpt = False,
):
    """Show what `convert` would do, per MoE layer, without reading tensor data.

    Family, MoE layers (converted, passed through or refused, with the reason), experts, K, N,
    group sizes, routers kept out of the expert path, bytes in and out, and which tensor-parallel
    sizes work.  For a hub repo id only the configs and the safetensors headers are downloaded
    (HTTP range requests), or the local Hugging Face cache is used when it holds the whole
    repository; the report says which, and how many bytes were fetched.  Exits 3 when `convert`
    would refuse a layer.  docs/inspect.md explains every column.
    """
    from ..convert import make_plan
    from ..read.remote import open_for_inspect

    out = session_output()
    options = convert_options(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding, tp_size=tp_size,
                              keep_unsupported=keep_unsupported, dequantize_router=dequantize_router,
                              output_format=output_format)
    ckpt, hub = open_for_inspect(source, revision=revision, token=token)
    with ckpt:
        plan = make_plan(ckpt, options)
        data = plan.to_dict()
        data["source_fingerprint"] = plan.fingerprint
    if hub is not None:
        data["hub"] = hub.to_dict()
    if hub is not None and hub.range_ignored:
        out.warn(f"{hub.repo_id}: the server ignored HTTP Range for {len(hub.range_ignored)} file(s) "
                 f"({sorted(hub.range_ignored)[0]} ...); only the headers were read from the full responses")
    token_note = unused_token(ctx, source)
    if token_note:
        data["warnings"].insert(0, token_note)
    for w in data["warnings"]:
        out.warn(w)
    out.result(data, render_inspect, f"{data['moe_layers']} MoE layer(s): {data['converted_layers']} to convert, "
               f"{data['passthrough_layers']} passed through, {data['refused_layers']} refused")
    refuse_as_convert_would(data)


def refuse_as_convert_would(plan: dict) -> None:
    """A plan with refused layers ends as ``convert`` would (bad input, exit 3), once it is shown:
    ``inspect`` and ``convert --dry-run`` say what the conversion would do, its exit code included."""
    if plan["refusals"]:
        more = f" (and {len(plan['refusals']) - 1} more)" if len(plan["refusals"]) > 1 else ""
        raise InputError(f"convert would refuse {plan['refusals'][0]}{more}")
