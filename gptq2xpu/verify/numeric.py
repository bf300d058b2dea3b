"""The numerical check: the same tokens through a reference int4 MoE, from both sides.

Per layer, a seeded batch of tokens is routed with the checkpoint's own router and run through
the reference MoE (:mod:`.reference`) once with the source experts dequantized by the GPTQ formula
(zero points and ``g_idx`` honoured) and once with the converted bytes dequantized directly; then
every expert once more on its own, so experts the router did not pick are covered too.  With
tensor parallelism, the sum of the ranks' partial outputs is compared with the full layer.

On a CPU (``streamed``) each side is computed one expert at a time
(:func:`.reference.moe_forward_streamed` over :mod:`.experts`): an expert is dequantized into
reused buffers and runs its routed tokens and its coverage token in one GEMM pair, experts spread
over ``torch.get_num_threads()`` worker threads, so the layer's float weights never exist as a
whole (2.4 GB per side at full width). Elsewhere (GPU / XPU) the
whole layer is dequantized and run as two batched GEMMs (:func:`.reference.moe_forward`), where a
Python loop over experts would cost more than the GEMMs.
"""

from __future__ import annotations

import time

from ..contract import EXPERT_TENSORS, ConvertedBlock, ConvertedLayer
from ..errors import VerificationError
from ..read.checkpoint import Checkpoint

ROLES = ("gate", "up", "down")


def load_source(src: Checkpoint, prefix: str, info: ConvertedLayer, device) -> dict:
    """The layer's source expert tensors, stacked over experts and moved to ``device`` (packed)."""
    from ..torch_io import read_stacked
    e = info.experts
    proj = info.source_projections
    fields = ("weight_packed", "weight_scale") if info.source_format == "compressed-tensors" \
        else ("qweight", "scales", "qzeros", "g_idx")
    loaded = {}
    for role in ROLES:
        base = [f"{prefix}.experts.{i}.{proj[role]}." for i in range(e)]
        loaded[role] = {f: read_stacked(src, [b + f for b in base], device)
                        for f in fields if base[0] + f in src.tensors}
    return loaded


def _source_offset_and_cast(info: ConvertedLayer, block: ConvertedBlock):
    """The source's zero-point offset (1 for GPTQ v1, 0 for v2) and the dtype the converter cast
    its scales to (None when they were kept)."""
    import torch

    offset = block.zero_offset
    # --scale-dtype asked the converter to store the scales in another dtype: that cast (round to
    # nearest even, proven bit for bit by check_scales) is part of the conversion, so the source
    # side takes its scales through the same cast, and the tolerances stay those of execution noise.
    cast = {"F16": torch.float16, "BF16": torch.bfloat16}.get(info.scale_dtype)
    return offset, cast


def dequant_source(loaded: dict, info: ConvertedLayer, block: ConvertedBlock, dtype):
    """Source experts dequantized with the GPTQ formula: w13 [E, 2N, K], w2 [E, K, N]."""
    import torch

    from .unpack import gptq_dequant, xpu_dequant

    offset, cast = _source_offset_and_cast(info, block)
    out = {}
    for role, t in loaded.items():
        if "weight_packed" in t:
            sc = t["weight_scale"] if cast is None else t["weight_scale"].to(cast)
            out[role] = xpu_dequant(t["weight_packed"].view(torch.uint8), sc, "u4b8", dtype)
        else:
            g_idx = t["g_idx"].long() if "g_idx" in t else None
            sc = t["scales"] if cast is None else t["scales"].to(cast)
            out[role] = gptq_dequant(t["qweight"], sc, t.get("qzeros"), g_idx, zero_offset=offset, dtype=dtype)
    return torch.cat([out["gate"], out["up"]], dim=1), out["down"]


def converted_weights(out: Checkpoint, prefix: str, block: ConvertedBlock, dtype, device, raw: bool = False):
    from ..torch_io import read_tensor
    from .unpack import xpu_dequant

    enc = block.nibble_encoding
    w13, s13, w2, s2 = (read_tensor(out, f"{prefix}.experts.{w}", device) for w in EXPERT_TENSORS)
    if raw:
        return w13, s13, w2, s2
    return xpu_dequant(w13, s13, enc, dtype), xpu_dequant(w2, s2, enc, dtype)


def router_weight(out: Checkpoint, src: Checkpoint, prefix: str, block: ConvertedBlock, device):
    """The layer's router as float32 [E, K] (dequantized if it is GPTQ-quantized)."""
    import torch

    from ..torch_io import read_tensor
    from .unpack import gptq_dequant

    name = f"{prefix}.gate.weight"
    if name in out.tensors:
        return read_tensor(out, name).to(device=device, dtype=torch.float32)
    base = f"{prefix}.gate."
    if base + "qweight" in src.tensors:
        offset = block.zero_offset
        qz = read_tensor(src, base + "qzeros") if base + "qzeros" in src.tensors else None
        gi = read_tensor(src, base + "g_idx").long() if base + "g_idx" in src.tensors else None
        return gptq_dequant(read_tensor(src, base + "qweight"), read_tensor(src, base + "scales"), qz, gi,
                            zero_offset=offset, dtype=torch.float32).to(device)
    raise VerificationError(f"{prefix}: no router weight ({name}) to route tokens with")


def layer_inputs(src: Checkpoint, out: Checkpoint, prefix: str, info: ConvertedLayer, block: ConvertedBlock, *,
                 device, tokens: int, seed: int):
    """The seeded tokens of one layer's check and their routing: ``(x [T, K], x_cov [E, K], topk
    weights [T, k], topk ids [T, k])``, x_cov holding the every-expert pass's token per expert."""
    import torch

    from ..torch_io import read_tensor
    from .reference import route

    routing = block.routing
    e, k = info.experts, info.hidden_size
    top_k = block.layer_top_k(info)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device)
    x_cov = torch.randn(e, k, generator=gen).to(device)
    router = router_weight(out, src, prefix, block, device)
    bias_name = f"{prefix}.gate.e_score_correction_bias"
    bias = read_tensor(out, bias_name).to(device=device, dtype=torch.float32) if bias_name in out.tensors else None
    for what, tensor, want in (("router", router, (e, k)), (bias_name, bias, (e,))):
        if tensor is not None and tuple(tensor.shape) != want:
            raise VerificationError(f"{what} has shape {list(tensor.shape)} but the layer has {e} experts of hidden "
                                    f"size {k} (needs {list(want)}): tokens cannot be routed")
    tw, tid = route(x, router, top_k, scoring=routing["scoring"], renormalize=routing["renormalize"],
                    correction_bias=bias, routed_scaling_factor=routing["routed_scaling_factor"])
    return x, x_cov, tw, tid


def numeric_layer(src: Checkpoint, out: Checkpoint, prefix: str, info: ConvertedLayer, block: ConvertedBlock, *,
                  device, dtype,
                  tokens: int, seed: int, kernel: bool = False, streamed: bool | None = None) -> dict:
    """The numerical check of one layer. ``streamed``: one expert at a time (default on a CPU),
    or the whole layer at once (default elsewhere); both compute the same checks."""
    import torch

    from .device import synchronize
    from .reference import (
        compare,
        moe_forward,
        within_kernel_tolerance,
        within_tolerance,
    )
    from .unpack import xpu_dequant

    e = info.experts
    x, x_cov, tw, tid = layer_inputs(src, out, prefix, info, block, device=device, tokens=tokens, seed=seed)
    top_k = tid.shape[1]
    cov_w = torch.ones(e, 1, device=device)
    cov_id = torch.arange(e, device=device).unsqueeze(1)

    # load: read the packed tensors of both sides and move them to the device
    synchronize(device)
    t0 = time.perf_counter()
    src_packed = load_source(src, prefix, info, device)
    w13, s13, w2, s2 = converted_weights(out, prefix, block, dtype, device, raw=True)
    synchronize(device)
    t1 = time.perf_counter()
    # compute: dequantize both sides, run the reference MoE on routed tokens and on every expert
    enc = block.nibble_encoding
    if streamed is None:
        streamed = torch.device(device).type == "cpu"
    if streamed:
        from .experts import ConvertedExperts, SourceExperts
        from .reference import moe_forward_streamed

        offset, cast = _source_offset_and_cast(info, block)
        y_src, c_src = moe_forward_streamed(x, SourceExperts(src_packed, dtype, zero_offset=offset, scale_cast=cast),
                                            tw, tid, every=x_cov)
        synchronize(device)
        t_mid = time.perf_counter()
        y_conv, c_conv = moe_forward_streamed(x, ConvertedExperts(w13, s13, w2, s2, enc, dtype), tw, tid, every=x_cov)
        synchronize(device)
        t2 = t_conv = time.perf_counter()
    else:
        sw13, sw2 = dequant_source(src_packed, info, block, dtype)
        y_src = moe_forward(x.to(dtype), sw13, sw2, tw, tid)
        c_src = moe_forward(x_cov.to(dtype), sw13, sw2, cov_w, cov_id)
        del sw13, sw2
        synchronize(device)
        t_mid = time.perf_counter()
        cw13, cw2 = xpu_dequant(w13, s13, enc, dtype), xpu_dequant(w2, s2, enc, dtype)
        y_conv = moe_forward(x.to(dtype), cw13, cw2, tw, tid)
        synchronize(device)
        t_conv = time.perf_counter()
        c_conv = moe_forward(x_cov.to(dtype), cw13, cw2, cov_w, cov_id)
        del cw13, cw2
        synchronize(device)
        t2 = time.perf_counter()
    packed_bytes = sum(t.numel() * t.element_size() for r in src_packed.values() for t in r.values()) + \
        sum(t.numel() * t.element_size() for t in (w13, s13, w2, s2))
    del src_packed
    tp = block.tp_size
    tp_stats = None
    if tp > 1:
        y_ranks = rank_sum(out, prefix, info, block, tp, x.to(dtype), tw, tid, dtype, device, streamed=streamed)
        tp_stats = compare(y_ranks, y_conv)
    routed = compare(y_conv, y_src)
    every = compare(c_conv, c_src)
    result = {
        "prefix": prefix,
        "tokens": tokens,
        "top_k": top_k,
        "experts_hit": int(torch.unique(tid).numel()),
        "max_abs": routed["max_abs"],
        "rel": routed["rel"],
        "cosine": routed["cosine"],
        "every_expert_rel": every["rel"],
        "every_expert_cosine": every["cosine"],
        "ok": within_tolerance(routed, dtype) and within_tolerance(every, dtype),
        "load_seconds": round(t1 - t0, 5),
        "compute_seconds": round(t2 - t1, 5),
        "source_side_seconds": round(t_mid - t1, 5),           # GPTQ dequant + routed and every-expert MoE
        # XPU bytes dequant + routed MoE (streamed: + every-expert MoE, which runs in the same GEMMs)
        "converted_dequant_moe_seconds": round(t_conv - t_mid, 5),
        "streamed": bool(streamed),
        "packed_bytes": packed_bytes,
    }
    if tp_stats is not None:
        result["tp_sum_rel"] = tp_stats["rel"]
        result["ok"] = result["ok"] and within_tolerance(tp_stats, dtype)
    if kernel:
        from .xpu_kernels import run_xpu_fused_moe

        y_k = run_xpu_fused_moe(x.to(dtype), w13, s13.to(dtype), w2, s2.to(dtype), tw, tid, None, top_k=top_k,
                                renormalize=block.routing["renormalize"], encoding=enc)
        kstats = compare(y_k.float(), y_conv.float())
        result["kernel"] = {**kstats, "ok": within_kernel_tolerance(y_k, y_conv, dtype)}
        result["ok"] = result["ok"] and result["kernel"]["ok"]
    return result


def rank_sum(out: Checkpoint, prefix: str, info: ConvertedLayer, block: ConvertedBlock, tp: int, x, tw, tid, dtype,
             device, streamed: bool = False):
    """Sum over tensor-parallel ranks of each rank's partial MoE output, every rank dequantized
    from its own slice of the packed bytes and scales (as a runtime holding one rank would);
    ``streamed``: one expert at a time, as :func:`numeric_layer` does on a CPU."""
    import torch

    from .experts import ConvertedExperts
    from .reference import moe_forward, moe_forward_streamed
    from .unpack import xpu_dequant

    enc = block.nibble_encoding
    p = info.padded_intermediate_size
    pt = p // tp
    g2 = info.w2_group_size
    w13, s13, w2, s2 = converted_weights(out, prefix, block, dtype, device, raw=True)
    total = None
    for r in range(tp):
        rows = torch.cat([torch.arange(r * pt, (r + 1) * pt), torch.arange(p + r * pt, p + (r + 1) * pt)])
        rows = rows.to(w13.device)
        p13, q13 = w13.index_select(1, rows), s13.index_select(1, rows)
        p2 = w2[:, :, r * pt // 2 : (r + 1) * pt // 2].contiguous()
        q2 = s2[:, :, r * pt // g2 : (r + 1) * pt // g2].contiguous()
        if streamed:
            y, _ = moe_forward_streamed(x, ConvertedExperts(p13, q13, p2, q2, enc, dtype), tw, tid)
        else:
            y = moe_forward(x, xpu_dequant(p13, q13, enc, dtype), xpu_dequant(p2, q2, enc, dtype), tw, tid).float()
        total = y if total is None else total + y
    return total


def numeric_layer_safe(src, out, prefix, block, dev, tdtype, tokens, seed, run_kernel) -> dict:
    try:
        return numeric_layer(src, out, prefix, block.layers[prefix], block, device=dev, dtype=tdtype,
                             tokens=tokens, seed=seed, kernel=run_kernel)
    except (ValueError, RuntimeError, KeyError, VerificationError) as exc:  # shapes a planted defect broke
        return {"prefix": prefix, "ok": False, "error": " ".join(str(exc).split()), "rel": float("nan"),
                "cosine": float("nan"), "max_abs": float("nan")}
