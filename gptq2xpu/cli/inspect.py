"""``gptq2xpu inspect``: the conversion plan from safetensors headers alone."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import InputError
from .options import (
    EncodingOpt,
    JsonOpt,
    KeepOpt,
    RevisionOpt,
    RouterOpt,
    ScaleDtypeOpt,
    TokenOpt,
    TpOpt,
    convert_options,
)
from .output import Output
from .render import render_plan


def inspect(
    source: Annotated[str, typer.Argument(help="GPTQ checkpoint: a local folder or a Hugging Face repo id.")],
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    scale_dtype: ScaleDtypeOpt = "keep",
    nibble_encoding: EncodingOpt = "u4b8",
    tp_size: TpOpt = 1,
    keep_unsupported: KeepOpt = False,
    dequantize_router: RouterOpt = False,
    json_out: JsonOpt = False,
):
    """Show what `convert` would do, per MoE layer, without reading tensor data.

    Family, MoE layers (converted / passed through / refused, with the reason), experts, K, N,
    group sizes, routers kept out of the expert path, bytes in and out, tensor-parallel sizes that
    work.  Exits 3 when `convert` would refuse a layer.
    """
    from ..convert import make_plan
    from ..read import open_source

    options = convert_options(scale_dtype=scale_dtype, nibble_encoding=nibble_encoding, tp_size=tp_size,
                              keep_unsupported=keep_unsupported, dequantize_router=dequantize_router)
    with open_source(source, revision=revision, token=token) as ckpt:
        data = make_plan(ckpt, options).to_dict()
    out = Output(json_out)
    for w in data["warnings"]:
        out.warn(w)
    out.result(data, render_plan)
    if data["refusals"]:
        more = f" (and {len(data['refusals']) - 1} more)" if len(data["refusals"]) > 1 else ""
        raise InputError(f"convert would refuse {data['refusals'][0]}{more}")
