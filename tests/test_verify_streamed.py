"""The streamed reference MoE (CPU): its fast unpackers, its per-expert forward, its harness.

The fast paths must compute what the plain ones compute: the dequantized values bit for bit
(same exact products, same single rounding), the MoE within execution noise of the plain
whole-layer forward and of a float64 one, and the numerical check must fail planted defects
exactly as hard as the whole-layer check does. The packers are the test-side numpy ones of
tests/support/int4.py, so everything is anchored to the format definitions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import REPO
from support.int4 import int4_layers, naive_gptq_dequant, naive_moe, pack_gptq_cols, pack_gptq_rows, pack_xpu
from support.planting import BASE, DEFECTS, L0, L1, convert, copy_output

from gptq2xpu.contract import CONFIG_BLOCK, parse_block
from gptq2xpu.read import open_source
from gptq2xpu.read.checkpoint import open_checkpoint
from gptq2xpu.testing.synth import make_checkpoint
from gptq2xpu.verify.experts import ConvertedExperts, SourceExperts
from gptq2xpu.verify.numeric import numeric_layer, numeric_layer_safe
from gptq2xpu.verify.reference import (
    TOLERANCES,
    Expert,
    compare,
    moe_forward,
    moe_forward_streamed,
    route,
    within_tolerance,
)
from gptq2xpu.verify.unpack import (
    GptqKFirst,
    XpuRows,
    gptq_dequant,
    gptq_dequant_kfirst,
    kfirst_order,
    xpu_dequant,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def xpu_dequant_rows(packed: torch.Tensor, scales: torch.Tensor, encoding: str, *, out=None) -> torch.Tensor:
    """:class:`XpuRows` on a single ``[R, C/2]`` layer (``scales [R, G]``): float32 ``[R, C]``."""
    return XpuRows(packed.unsqueeze(0), scales.unsqueeze(0), encoding)(0, out=out)


class DenseExperts:
    """Float weights ``w13 [E, 2N, K]``, ``w2 [E, K, N]`` as the experts object of
    ``moe_forward_streamed`` (what ``ConvertedExperts`` and ``SourceExperts`` are for packed weights)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.num_experts, two_n, self.hidden = w13.shape
        self.inter, self.dtype = two_n // 2, w13.dtype

    def __call__(self, e: int) -> Expert:
        w13, w2, n = self.w13[e], self.w2[e], self.inter
        return Expert(lambda x: (lambda h: (h[:, :n], h[:, n:]))(x @ w13.T), lambda a: a @ w2.T)


# --------------------------------------------------------------------------- fast unpack


def test_kfirst_order_worked_example():
    # row (h*4 + b)*(K/8) + r holds input 8r + 2b + h: low nibbles of bytes 0..3, then high ones
    assert kfirst_order(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert kfirst_order(16).tolist() == [0, 8, 2, 10, 4, 12, 6, 14, 1, 9, 3, 11, 5, 13, 7, 15]
    assert sorted(kfirst_order(2048).tolist()) == list(range(2048))
    with pytest.raises(ValueError, match="multiple of 8"):
        kfirst_order(12)


def test_gptq_dequant_kfirst_worked_example():
    # K = 8, N = 8: output 0 holds codes 0..7 on inputs 0..7, output 1 code 15 everywhere; zero 8
    # (v1 stores 7), scale 0.5 -> (q - 8) / 2
    qweight = torch.tensor([[0x76543210, -1, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    w = gptq_dequant_kfirst(qweight, torch.full((1, 8), 0.5, dtype=torch.float16),
                            torch.tensor([[0x77777777]], dtype=torch.int32), zero_offset=1)
    assert w.shape == (8, 8) and w.dtype == torch.float32
    # rows in kfirst order: inputs 0, 2, 4, 6, 1, 3, 5, 7
    assert w[:, 0].tolist() == [-4.0, -3.0, -2.0, -1.0, -3.5, -2.5, -1.5, -0.5]
    assert w[:, 1].tolist() == [3.5] * 8 and w[:, 2].tolist() == [-4.0] * 8
    # an asymmetric zero (5 in output 0 only) is subtracted per output
    zeros = torch.tensor([[0x77777774]], dtype=torch.int32)  # v1: stored 4 -> zero 5
    w = gptq_dequant_kfirst(qweight, torch.full((1, 8), 0.5, dtype=torch.float16), zeros, zero_offset=1)
    assert w[:, 0].tolist() == [-2.5, -1.5, -0.5, 0.5, -2.0, -1.0, 0.0, 1.0]
    assert w[:, 1].tolist() == [3.5] * 8


def test_xpu_dequant_rows_worked_example():
    packed = torch.tensor([[0x9F, 0x08]], dtype=torch.uint8)  # codes 15, 9, 8, 0
    scales = torch.tensor([[0.25, -2.0]], dtype=torch.float16)
    assert xpu_dequant_rows(packed, scales, "u4b8").tolist() == [[1.75, 0.25, 0.0, 16.0]]
    assert xpu_dequant_rows(packed ^ 0x88, scales, "s4").tolist() == [[1.75, 0.25, 0.0, 16.0]]


@st.composite
def gptq_layers(draw):
    """One GPTQ layer: codes [K, N], zeros and scales [G, N], g_idx [K]; group sizes that do and do
    not allow the grouped fast path (a multiple of 8), act-order g_idx, float32 scales too."""
    group = draw(st.sampled_from([4, 8, 16, 32, None]))
    groups = draw(st.integers(1, 4)) if group else 1
    k = group * groups if group else 8 * draw(st.integers(1, 8))
    if k % 8:
        k *= 2
        groups *= 2
    n = 8 * draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 16, size=(k, n), dtype=np.uint8)
    mags = np.exp2(rng.uniform(-12, 2, size=(groups, n)))
    scales = torch.from_numpy(mags * rng.choice([-1.0, 1.0], size=mags.shape))
    scales = scales.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])))
    zero_format = draw(st.sampled_from(["v1-sym", "v2-sym", "none", "asym"]))
    if zero_format == "asym":
        zeros = rng.integers(0, 16, size=(groups, n), dtype=np.uint8)
    else:
        zeros = np.full((groups, n), 7 if zero_format == "v1-sym" else 8, np.uint8)
    offset = 1 if zero_format in ("v1-sym", "asym") else 0
    qzeros = None if zero_format == "none" else pack_gptq_cols(zeros)
    g_style = draw(st.sampled_from(["none", "natural", "act-order"]))
    natural = np.arange(k) // (k // groups)
    g_idx = None if g_style == "none" else natural if g_style == "natural" else rng.permutation(natural)
    return codes, scales, qzeros, zeros, offset, g_idx


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=gptq_layers())
def test_gptq_dequant_kfirst_equals_plain_bit_for_bit(layer):
    codes, scales, qzeros, zeros, offset, g_idx = layer
    k, n = codes.shape
    gi = None if g_idx is None else torch.from_numpy(g_idx.astype(np.int32))
    plain = gptq_dequant(pack_gptq_rows(codes), scales, qzeros, gi, zero_offset=offset)  # [N, K]
    buf = torch.full((k, n), float("nan"))
    fast = gptq_dequant_kfirst(pack_gptq_rows(codes), scales, qzeros, gi, zero_offset=offset, out=buf)
    assert fast.data_ptr() == buf.data_ptr()
    order = kfirst_order(k)
    assert torch.equal(fast, plain.T[order])
    # and the definition, by loops in float64 (exact for 16-bit scales; float32 scales round once)
    g = np.arange(k) // (k // scales.shape[0]) if g_idx is None else g_idx
    z = np.full(zeros.shape, 8.0) if qzeros is None else zeros.astype(np.float64) + offset
    want = naive_gptq_dequant(codes, z, scales.double().numpy(), g)  # [N, K]
    assert np.array_equal(fast.double().numpy(), torch.from_numpy(want).float().double().numpy().T[order.numpy()])
    # rounded to a compute dtype afterwards, it is the plain function's output in that dtype
    for dtype in DTYPES:
        want_d = gptq_dequant(pack_gptq_rows(codes), scales, qzeros, gi, zero_offset=offset, dtype=dtype)
        assert torch.equal(fast.to(dtype), want_d.T[order])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=int4_layers(), encoding=st.sampled_from(["u4b8", "s4"]), f32_scales=st.booleans())
def test_xpu_dequant_rows_equals_plain_bit_for_bit(layer, encoding, f32_scales):
    codes, scales, _ = layer
    rows = np.ascontiguousarray(codes[0].T)  # [N, K]
    sc = scales[0].transpose(0, 1).contiguous()  # [N, G]
    if f32_scales:
        sc = (sc.float() * (1 + 2.0**-20)).contiguous()  # float32 scales: the product itself rounds
    packed = pack_xpu(rows, encoding)
    buf = torch.full(rows.shape, float("nan"))
    fast = xpu_dequant_rows(packed, sc, encoding, out=buf)
    assert fast.data_ptr() == buf.data_ptr()
    assert torch.equal(fast, xpu_dequant(packed, sc, encoding))
    for dtype in DTYPES:
        assert torch.equal(fast.to(dtype), xpu_dequant(packed, sc, encoding, dtype))


def test_stacked_unpackers_per_expert():
    """GptqKFirst / XpuRows decide per layer (one zero point for all? natural g_idx for all?):
    a layer mixing a natural expert with an act-order one, and a symmetric expert with an
    asymmetric one, still gives each expert its own plain weights."""
    rng = np.random.default_rng(11)
    e, k, n, g = 3, 64, 16, 16
    codes = rng.integers(0, 16, size=(e, k, n), dtype=np.uint8)
    scales = torch.from_numpy(np.exp2(rng.uniform(-8, 0, size=(e, k // g, n)))).half()
    zeros = np.full((e, k // g, n), 7, np.uint8)
    zeros[2] = rng.integers(0, 16, size=(k // g, n))
    g_idx = np.stack([np.arange(k) // g, rng.permutation(np.arange(k) // g), np.arange(k) // g]).astype(np.int32)
    qweight, qzeros = pack_gptq_rows(codes), pack_gptq_cols(zeros)
    stacked = GptqKFirst(qweight, scales, qzeros, torch.from_numpy(g_idx), zero_offset=1)
    assert stacked.uniform is None and not stacked.natural
    order = kfirst_order(k)
    for i in range(e):
        want = gptq_dequant(qweight[i], scales[i], qzeros[i], torch.from_numpy(g_idx[i]), zero_offset=1)
        assert torch.equal(stacked(i), want.T[order])
    rows = rng.integers(0, 256, size=(e, n, k // 2), dtype=np.uint8)
    xs = scales.transpose(1, 2).contiguous()
    for enc in ("u4b8", "s4"):
        unpack = XpuRows(torch.from_numpy(rows), xs, enc)
        for i in range(e):
            assert torch.equal(unpack(i), xpu_dequant(torch.from_numpy(rows[i]), xs[i], enc))


def test_fast_unpack_rejects_bad_arguments():
    q = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        gptq_dequant_kfirst(q.long(), torch.ones(1, 8))
    with pytest.raises(ValueError, match="g_idx"):
        gptq_dequant_kfirst(q, torch.ones(2, 8), g_idx=torch.full((16,), 2))
    with pytest.raises(ValueError, match="out"):
        gptq_dequant_kfirst(q, torch.ones(1, 8), out=torch.empty(8, 16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        gptq_dequant_kfirst(q, torch.ones(1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="encoding"):
        xpu_dequant_rows(torch.zeros(1, 2, dtype=torch.uint8), torch.ones(1, 1), "u4")
    with pytest.raises(ValueError, match="multiple"):
        xpu_dequant_rows(torch.zeros(1, 3, dtype=torch.uint8), torch.ones(1, 4), "u4b8")
    with pytest.raises(ValueError, match="out"):
        xpu_dequant_rows(torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 1), "u4b8", out=torch.empty(4, 2))


# --------------------------------------------------------------------------- the streamed forward


def _dense_moe(seed, experts, tokens, top_k, hidden=32, inter=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    every = torch.randn(experts, hidden, generator=gen)
    tw, ti = route(x, torch.randn(experts, hidden, generator=gen), top_k)
    return x, w13, w2, every, tw, ti


@pytest.mark.parametrize("experts,tokens,top_k", [(8, 5, 2), (4, 16, 4), (16, 3, 1), (6, 1, 6)])
def test_moe_forward_streamed_matches_moe_forward(experts, tokens, top_k):
    x, w13, w2, every, tw, ti = _dense_moe(experts * 100 + tokens, experts, tokens, top_k)
    out, every_out = moe_forward_streamed(x, DenseExperts(w13, w2), tw, ti, every=every)
    assert out.dtype == every_out.dtype == torch.float32
    assert out.shape == (tokens, 32) and every_out.shape == (experts, 32)
    want = moe_forward(x, w13, w2, tw, ti)
    assert compare(out, want)["rel"] < 1e-6
    assert compare(out, naive_moe(x, w13, w2, tw, ti))["rel"] < 1e-6
    ones, ids = torch.ones(experts, 1), torch.arange(experts).unsqueeze(1)
    assert compare(every_out, moe_forward(every, w13, w2, ones, ids))["rel"] < 1e-6
    assert compare(every_out, naive_moe(every, w13, w2, ones, ids))["rel"] < 1e-6
    # the same bits whatever the number of worker threads (summed in expert order on the caller)
    for workers in (1, 3):
        again, again_every = moe_forward_streamed(x, DenseExperts(w13, w2), tw, ti, every=every, workers=workers)
        assert torch.equal(again, out) and torch.equal(again_every, every_out)


def test_moe_forward_streamed_without_every_skips_unused_experts():
    x, w13, w2, _, tw, ti = _dense_moe(7, experts=8, tokens=2, top_k=1)
    called = []

    class Counting(DenseExperts):
        def __call__(self, e):
            called.append(e)
            return super().__call__(e)

    out, every_out = moe_forward_streamed(x, Counting(w13, w2), tw, ti, workers=1)
    assert every_out is None
    assert sorted(called) == sorted(set(ti.flatten().tolist()))
    assert compare(out, naive_moe(x, w13, w2, tw, ti))["rel"] < 1e-6


def test_moe_forward_streamed_computes_in_expert_dtype():
    x, w13, w2, every, tw, ti = _dense_moe(3, experts=4, tokens=8, top_k=2, hidden=64, inter=32)
    out16, every16 = moe_forward_streamed(x, DenseExperts(w13.half(), w2.half()), tw, ti, every=every)
    ref = naive_moe(x, w13.half().float(), w2.half().float(), tw, ti)
    assert out16.dtype == torch.float32
    assert 0 < compare(out16, ref)["rel"] < TOLERANCES["float16"]["rel"]  # fp16 rounding happened, and stayed small
    assert within_tolerance(compare(out16, moe_forward(x, w13.half(), w2.half(), tw, ti)), torch.float16)
    assert every16.dtype == torch.float32
    ones, ids = torch.ones(4, 1), torch.arange(4).unsqueeze(1)
    assert 0 < compare(every16, naive_moe(every, w13.half().float(), w2.half().float(), ones, ids))["rel"] < 2e-3


def test_moe_forward_streamed_rejects_bad_arguments():
    x, w13, w2, every, tw, ti = _dense_moe(1, experts=4, tokens=3, top_k=2)
    experts = DenseExperts(w13, w2)
    with pytest.raises(ValueError, match="expected x"):
        moe_forward_streamed(x[:, :5], experts, tw, ti)
    with pytest.raises(ValueError, match="topk_ids"):
        moe_forward_streamed(x, experts, tw[:2], ti[:2])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        moe_forward_streamed(x, experts, tw, ti + 4)
    with pytest.raises(ValueError, match="every"):
        moe_forward_streamed(x, experts, tw, ti, every=every[:3])


# --------------------------------------------------------------------------- the experts objects

SHAPES = {"gate": lambda h, n: (n, h), "up": lambda h, n: (n, h), "down": lambda h, n: (h, n)}  # (out, in)


def _int4_experts(seed, experts=3, hidden=64, inter=32, group=16, scale_dtype=torch.float16):
    """Random u4b8 codes ``[E, out, in]`` and scales ``[E, out, G]`` per role."""
    rng = np.random.default_rng(seed)
    codes, scales = {}, {}
    for role, shape in SHAPES.items():
        out, inp = shape(hidden, inter)
        codes[role] = rng.integers(0, 16, size=(experts, out, inp), dtype=np.uint8)
        mags = np.exp2(rng.uniform(-10, -4, size=(experts, out, inp // group)))
        scales[role] = torch.from_numpy(mags * rng.choice([-1.0, 1.0], size=mags.shape)).to(scale_dtype)
    return codes, scales


def _as_xpu(codes, scales, encoding="u4b8"):
    """The converted layout: w13 [E, 2N, K/2], s13 [E, 2N, K/g], w2 [E, K, N/2], s2 [E, K, N/g]."""
    return (pack_xpu(np.concatenate([codes["gate"], codes["up"]], axis=1), encoding),
            torch.cat([scales["gate"], scales["up"]], dim=1), pack_xpu(codes["down"], encoding), scales["down"])


def _as_gptq(codes, scales, *, zero_format="v1", act_order=False, seed=0):
    """The same experts as a GPTQ source, as load_source stacks it, and its zero offset.

    ``zero_format``: "v1" (zero 8 stored as 7), "v2" (stored as 8), "none" (no qzeros), or
    "asym" (random zero points: then the weights are the source's own, not the XPU codes'); with
    ``act_order`` each expert gets a permuted ``g_idx`` (the weights then use it).
    """
    rng = np.random.default_rng(seed)
    loaded = {}
    for role, c in codes.items():
        e, out, inp = c.shape
        groups = scales[role].shape[-1]
        natural = np.arange(inp) // (inp // groups)
        g_idx = np.stack([rng.permutation(natural) if act_order else natural for _ in range(e)]).astype(np.int32)
        t = {"qweight": pack_gptq_rows(np.ascontiguousarray(c.transpose(0, 2, 1))),  # [E, in/8, out]
             "scales": scales[role].transpose(1, 2).contiguous(), "g_idx": torch.from_numpy(g_idx)}
        if zero_format != "none":
            zeros = rng.integers(0, 16, size=(e, groups, out), dtype=np.uint8) if zero_format == "asym" else \
                np.full((e, groups, out), 8, np.uint8)
            stored = (zeros.astype(np.int16) - (0 if zero_format == "v2" else 1)) & 0xF  # asym stores zero - 1 too
            t["qzeros"] = pack_gptq_cols(stored.astype(np.uint8))
        loaded[role] = t
    return loaded, 0 if zero_format == "v2" else 1


def _as_compressed(codes, scales):
    """The same experts as a compressed-tensors pack-quantized source (int32 words of XPU rows)."""
    return {role: {"weight_packed": torch.from_numpy(pack_xpu(c, "u4b8").numpy().view(np.int32).copy()),
                   "weight_scale": scales[role].contiguous()} for role, c in codes.items()}


def _weights(experts, e):
    """Expert e's weights as ``(gate.T, up.T, down.T)``, read back through its projections: each
    output of ``identity @ W.T`` is one weight times 1 plus zeros, so exactly the weight."""
    ex = experts(e)
    gate, up = ex.gate_up(torch.eye(experts.hidden, dtype=experts.dtype))
    return gate, up, ex.down(torch.eye(experts.inter, dtype=experts.dtype))


def _same_weights(a, b, experts_count):
    for e in range(experts_count):
        for wa, wb in zip(_weights(a, e), _weights(b, e)):
            assert wa.dtype == wb.dtype
            if not torch.equal(wa, wb):
                return False
    return True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
def test_converted_experts_fast_equals_plain_and_definition(dtype, encoding):
    codes, scales = _int4_experts(1)
    w13, s13, w2, s2 = _as_xpu(codes, scales, encoding)
    fast = ConvertedExperts(w13, s13, w2, s2, encoding, dtype)
    plain = ConvertedExperts(w13, s13, w2, s2, encoding, dtype, fast=False)
    assert fast.fast and not plain.fast
    assert (fast.num_experts, fast.hidden, fast.inter) == (3, 64, 32)
    assert _same_weights(fast, plain, 3)
    for e in range(3):  # and the definition: (q - 8) * scale, rounded once to dtype
        gate, up, down = _weights(fast, e)
        for role, got in (("gate", gate), ("up", up), ("down", down)):
            want = (torch.from_numpy(codes[role][e]).double() - 8) * scales[role][e].double().repeat_interleave(16, -1)
            assert torch.equal(got.T, want.to(dtype)), (role, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_format", ["v1", "v2", "none"])
def test_source_experts_equal_converted_experts(dtype, zero_format):
    """A symmetric GPTQ source and its XPU bytes give the same weights, bit for bit: the GPTQ side
    in its input-major order, the XPU side output-major."""
    codes, scales = _int4_experts(2)
    loaded, offset = _as_gptq(codes, scales, zero_format=zero_format)
    source = SourceExperts(loaded, dtype, zero_offset=offset)
    assert (source.num_experts, source.hidden, source.inter) == (3, 64, 32)
    converted = ConvertedExperts(*_as_xpu(codes, scales), "u4b8", dtype)
    assert _same_weights(source, converted, 3)
    assert _same_weights(SourceExperts(_as_compressed(codes, scales), dtype), converted, 3)
    # one code changed in one expert's up projection is seen
    codes["up"][1, 5, 7] ^= 1
    assert not _same_weights(SourceExperts(*_as_gptq(codes, scales, zero_format=zero_format)[:1], dtype,
                                           zero_offset=offset), converted, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_format,act_order", [("asym", False), ("v1", True), ("asym", True), ("none", True)])
def test_source_experts_fast_equals_plain(dtype, zero_format, act_order):
    """Asymmetric zero points and per-expert act-order g_idx: the fast path gives the plain
    whole-layer function's weights (gptq_dequant on the expert's slice), bit for bit."""
    codes, scales = _int4_experts(3, scale_dtype=torch.bfloat16)
    loaded, offset = _as_gptq(codes, scales, zero_format=zero_format, act_order=act_order, seed=3)
    fast = SourceExperts(loaded, dtype, zero_offset=offset)
    plain = SourceExperts(loaded, dtype, zero_offset=offset, fast=False)
    assert _same_weights(fast, plain, 3)
    for e in range(3):  # the plain path's weights are gptq_dequant's
        down = loaded["down"]
        want = gptq_dequant(down["qweight"][e], down["scales"][e], down.get("qzeros", [None] * 3)[e], down["g_idx"][e],
                            zero_offset=offset, dtype=dtype)
        assert torch.equal(_weights(plain, e)[2].T, want)


def test_source_experts_scale_cast():
    """--scale-dtype bfloat16: the source side takes its fp16 scales through the same cast."""
    codes, scales = _int4_experts(4)
    loaded, offset = _as_gptq(codes, scales)
    cast = SourceExperts(loaded, torch.float32, zero_offset=offset, scale_cast=torch.bfloat16)
    bf16_scales = {r: s.bfloat16() for r, s in scales.items()}
    assert _same_weights(cast, ConvertedExperts(*_as_xpu(codes, bf16_scales), "u4b8", torch.float32), 3)
    assert not _same_weights(cast, ConvertedExperts(*_as_xpu(codes, scales), "u4b8", torch.float32), 3)


def test_experts_reject_mismatched_shapes():
    codes, scales = _int4_experts(5)
    w13, s13, w2, s2 = _as_xpu(codes, scales)
    with pytest.raises(ValueError, match="shape mismatch"):
        ConvertedExperts(w13, s13, w2[:, :, :4], s2, "u4b8", torch.float32)
    loaded, _ = _as_gptq(codes, scales)
    loaded["down"]["qweight"] = loaded["down"]["qweight"][:, :2]
    with pytest.raises(ValueError, match="source down"):
        SourceExperts(loaded, torch.float32)


# --------------------------------------------------------------------------- tolerances


def test_streamed_tolerances_cover_dtype_noise():
    """As tests/test_verify_math.py::test_tolerances_cover_dtype_noise, for the streamed forward of
    both sides: each dtype's output (routed and every-expert) sits within half its tolerance of the
    float64 forward, so the two sides pass against each other; a corrupted expert fails by far."""
    experts, hidden, inter, tokens, top_k = 16, 512, 256, 32, 4
    codes, scales = _int4_experts(6, experts=experts, hidden=hidden, inter=inter, group=128)
    xpu = _as_xpu(codes, scales)
    loaded, offset = _as_gptq(codes, scales)
    gen = torch.Generator().manual_seed(6)
    x, every = torch.randn(tokens, hidden, generator=gen), torch.randn(experts, hidden, generator=gen)
    tw, ti = route(x, torch.randn(experts, hidden, generator=gen) / hidden**0.5, top_k)
    exact, exact_every = moe_forward_streamed(x, ConvertedExperts(*xpu, "u4b8", torch.float64, fast=False), tw, ti,
                                              every=every)
    assert compare(exact, moe_forward(x, xpu_dequant(xpu[0], xpu[1], "u4b8", torch.float64),
                                      xpu_dequant(xpu[2], xpu[3], "u4b8", torch.float64), tw, ti))["rel"] < 1e-15
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        tol = TOLERANCES[name]
        sides = {"source": SourceExperts(loaded, dtype, zero_offset=offset),
                 "converted": ConvertedExperts(*xpu, "u4b8", dtype)}
        outs = {}
        for side, ex in sides.items():
            outs[side] = moe_forward_streamed(x, ex, tw, ti, every=every)
            for got, want in zip(outs[side], (exact, exact_every)):
                stats = compare(got, want)
                assert stats["rel"] <= tol["rel"] / 2, (name, side, stats)
                assert 1 - stats["cosine"] <= (1 - tol["cosine"]) / 4, (name, side, stats)
        for a, b in zip(outs["converted"], outs["source"]):
            assert within_tolerance(compare(a, b), dtype)
        # one expert with its nibbles swapped, an expert no token was routed to if there is one
        unused = sorted(set(range(experts)) - set(ti.flatten().tolist()))
        e = unused[0] if unused else int(ti[0, 0])
        bad = xpu[0].clone()
        bad[e] = (bad[e] >> 4) | (bad[e] << 4)
        _, broken_every = moe_forward_streamed(x, ConvertedExperts(bad, *xpu[1:], "u4b8", dtype), tw, ti, every=every)
        stats = compare(broken_every, outs["source"][1])
        assert stats["rel"] > 10 * tol["rel"] and not within_tolerance(stats, dtype), (name, stats)


# --------------------------------------------------------------------------- the harness: numeric_layer


def _numeric(src_path, out_path, streamed, dtype=torch.float32, tokens=8, seed=0):
    with open_source(src_path) as src, open_checkpoint(out_path) as conv:
        block = parse_block(conv.config[CONFIG_BLOCK])
        rows = {}
        for i, prefix in enumerate(block.layers):
            if streamed is None:
                rows[prefix] = numeric_layer_safe(src, conv, prefix, block, torch.device("cpu"), dtype, tokens,
                                                  seed + i, False)
            else:
                rows[prefix] = numeric_layer(src, conv, prefix, block.layers[prefix], block,
                                             device=torch.device("cpu"), dtype=dtype, tokens=tokens, seed=seed + i,
                                             streamed=streamed)
        return rows


SMALL = dict(hidden=128, moe_intermediate=64, num_experts=8, top_k=2, group_size=32, num_layers=2, vocab=32,
             attention=False)
CASES = {
    "gptq-v1": (dict(SMALL), ()),
    "gptq-v2-bf16-s4": (dict(SMALL, scale_dtype="bfloat16", checkpoint_format="gptq_v2"), ("--nibble-encoding", "s4")),
    "scale-bf16": (dict(SMALL), ("--scale-dtype", "bfloat16")),
    "per-channel": (dict(SMALL, group_size=-1), ()),
    "quantized-router": (dict(SMALL, quantized_router=True), ()),
    "compressed-tensors": (dict(SMALL, quant_format="compressed-tensors"), ()),
    "tp-2": (dict(SMALL, moe_intermediate=192, group_size=64), ("--tp-size", "2")),
    "tp-4-padded": (dict(SMALL, moe_intermediate=192, group_size=64), ("--tp-size", "4", "--nibble-encoding", "s4")),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    made = {}
    for name, (spec, options) in CASES.items():
        info = make_checkpoint(root / f"{name}-src", **spec)
        convert(info.path, root / f"{name}-out", *options)
        made[name] = (info, root / f"{name}-out")
    return made


@pytest.mark.parametrize("case", list(CASES))
def test_numeric_layer_streamed_agrees_with_whole_layer(case, outputs):
    """Same checks, same verdict; the streamed path's errors sit at float32 execution noise, like
    the whole-layer path's (which is bit-exact between the sides when both see one layout)."""
    info, out = outputs[case]
    streamed = _numeric(info.path, out, True)
    whole = _numeric(info.path, out, False)
    default = _numeric(info.path, out, None)  # on a CPU: streamed
    assert streamed.keys() == whole.keys() and len(streamed) == 2
    for prefix in streamed:
        s, w, d = streamed[prefix], whole[prefix], default[prefix]
        assert s["streamed"] and not w["streamed"] and d["streamed"]
        assert s["ok"] and w["ok"] and d["ok"], (s, w)
        assert (s["tokens"], s["top_k"], s["experts_hit"]) == (w["tokens"], w["top_k"], w["experts_hit"])
        for row in (s, w):
            assert row["rel"] <= 2e-6 and row["every_expert_rel"] <= 2e-6, row
            assert ("tp_sum_rel" in row) == case.startswith("tp")
            assert row.get("tp_sum_rel", 0.0) <= 2e-6, row
        assert s["rel"] == d["rel"] and s["every_expert_rel"] == d["every_expert_rel"]  # deterministic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numeric_layer_streamed_in_16_bit_dtypes(dtype, outputs):
    info, out = outputs["gptq-v1"]
    for streamed in (True, False):
        for row in _numeric(info.path, out, streamed, dtype=dtype).values():
            assert row["ok"], row
            assert row["every_expert_rel"] <= TOLERANCES[str(dtype).removeprefix("torch.")]["rel"] / 2


# --------------------------------------------------------------------------- planted defects, both paths
# The planters of tests/support/planting.py (as tests/test_verify_defects.py uses them), on their base
# (K 128, N 64, 8 experts, top-2, group 32); one token, so most experts are reached only by the
# every-expert pass.


@pytest.fixture(scope="module")
def defect_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed_defects")
    info = make_checkpoint(root / "src", **BASE)
    convert(info.path, root / "good")
    convert(info.path, root / "good_bf16", "--scale-dtype", "bfloat16")
    return info, root


NUMERIC_DEFECTS = ["nibble order swapped in one expert", "gate/up halves swapped in one expert",
                   "one expert's scales doubled", "w2 of one expert column-shifted", "w13 of one expert row-shifted",
                   "scales of one expert cast to bf16 by truncation"]


@pytest.mark.parametrize("defect", NUMERIC_DEFECTS)
def test_planted_defects_fail_streamed_as_hard_as_whole_layer(defect, defect_bases, tmp_path):
    planter, bf16, _ = DEFECTS[defect]
    info, root = defect_bases
    out = copy_output(root / ("good_bf16" if bf16 else "good"), tmp_path / "out")
    planter(out, info)
    rows = {streamed: _numeric(info.path, out, streamed, tokens=1) for streamed in (True, False)}
    tol = TOLERANCES["float32"]["rel"]
    bad = set()
    for prefix in (L0, L1):
        s, w = rows[True][prefix], rows[False][prefix]
        assert s["ok"] == w["ok"], (prefix, s, w)
        if not s["ok"]:
            bad.add(prefix)
            # far above the bound, on both paths alike (the same weights, the same tokens)
            assert s["every_expert_rel"] > 50 * tol and w["every_expert_rel"] > 50 * tol, (s, w)
            assert s["every_expert_rel"] == pytest.approx(w["every_expert_rel"], rel=1e-3)
            assert s["rel"] == pytest.approx(w["rel"], rel=1e-3, abs=2e-6)
        else:
            assert max(s["rel"], s["every_expert_rel"]) <= 2e-6
    assert len(bad) == 1, rows


def test_streamed_reference_imports_nothing_of_the_converter():
    """The streamed reference is independent of the converter: computing both sides of a layer
    loads none of repack, formats, write, convert, plan (a fresh interpreter, so nothing the
    test session imported counts)."""
    code = """
import sys, torch
from gptq2xpu.verify.experts import ConvertedExperts, SourceExperts
from gptq2xpu.verify.numeric import numeric_layer, rank_sum
from gptq2xpu.verify.reference import moe_forward_streamed, route
e, k, n = 2, 64, 32
w13 = torch.randint(0, 256, (e, 2 * n, k // 2), dtype=torch.uint8)
w2 = torch.randint(0, 256, (e, k, n // 2), dtype=torch.uint8)
s13, s2 = torch.rand(e, 2 * n, k // 32).half(), torch.rand(e, k, n // 32).half()
loaded = {r: {"qweight": torch.randint(-2**31, 2**31 - 1, (e, i // 8, o), dtype=torch.int32),
              "scales": torch.rand(e, i // 32, o).half(),
              "qzeros": torch.full((e, i // 32, o // 8), 0x77777777, dtype=torch.int32)}
          for r, (i, o) in {"gate": (k, n), "up": (k, n), "down": (n, k)}.items()}
x = torch.randn(3, k)
tw, ti = route(x, torch.randn(e, k), 1)
for experts in (ConvertedExperts(w13, s13, w2, s2, "u4b8", torch.float32), SourceExperts(loaded, torch.float32)):
    out, every = moe_forward_streamed(x, experts, tw, ti, every=torch.randn(e, k))
    assert out.isfinite().all() and every.isfinite().all()
bad = sorted(m for m in sys.modules if m.split(".")[:2] in (["gptq2xpu", "repack"], ["gptq2xpu", "formats"],
             ["gptq2xpu", "write"], ["gptq2xpu", "convert"], ["gptq2xpu", "plan"]))
print(bad)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
