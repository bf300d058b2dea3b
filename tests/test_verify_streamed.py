"""The streamed reference MoE (CPU): its fast unpackers, its per-expert forward, its harness.

The fast paths must compute what the plain ones compute: the dequantized values bit for bit
(same exact products, same single rounding), the MoE within execution noise of the plain
whole-layer forward and of a float64 one, and the numerical check must fail planted defects
exactly as hard as the whole-layer check does. The packers are the test-side numpy ones of
tests/test_verify_math.py, so everything is anchored to the format definitions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq2xpu.verify.unpack import (
    gptq_dequant,
    gptq_dequant_kfirst,
    kfirst_order,
    xpu_dequant,
    xpu_dequant_rows,
)
from test_verify_math import int4_layers, naive_gptq_dequant, pack_gptq_cols, pack_gptq_rows, pack_xpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
