"""The verifier's math: independent unpackers, the reference MoE, routing, tolerances, the fixture.

The packers and the naive loops used here (``tests/support/int4.py``) are plain numpy shifts and loops
written from the contract, so that the unpackers are checked against a definition of the formats
and not against themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import FIXTURE
from support.int4 import int4_layers, naive_gptq_dequant, naive_moe, pack_gptq_cols, pack_gptq_rows, pack_xpu

from gptq2xpu.verify.reference import (
    KERNEL_TOLERANCES,
    TOLERANCES,
    compare,
    moe_forward,
    route,
    within_kernel_tolerance,
    within_tolerance,
)
from gptq2xpu.verify.unpack import (
    gptq_codes,
    gptq_dequant,
    gptq_zeros,
    xpu_codes,
    xpu_dequant,
)

# --------------------------------------------------------------------------- unpack: worked examples


def test_gptq_codes_worked_example():
    q = torch.tensor([[0x76543210, 0x01234567], [0x0F0F0F0F, 0xFEDCBA98 - 2**32]], dtype=torch.int32)
    codes = gptq_codes(q)
    assert codes.dtype == torch.uint8 and codes.shape == (16, 2)
    assert codes[:8, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert codes[:8, 1].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert codes[8:, 0].tolist() == [15, 0, 15, 0, 15, 0, 15, 0]
    # a negative int32 (sign bit set) still unpacks as unsigned nibbles
    assert codes[8:, 1].tolist() == [8, 9, 10, 11, 12, 13, 14, 15]


def test_gptq_codes_batched_over_experts():
    q = torch.tensor([[[0x11111111]], [[0x22222222]], [[-1]]], dtype=torch.int32)  # [3, 1, 1]
    assert gptq_codes(q).squeeze(-1).tolist() == [[1] * 8, [2] * 8, [15] * 8]


def test_gptq_zeros_worked_example_and_offsets():
    z = torch.tensor([[0x76543210], [0x77777777], [0x88888888 - 2**32]], dtype=torch.int32)
    assert gptq_zeros(z, 0).tolist() == [list(range(8)), [7] * 8, [8] * 8]
    assert gptq_zeros(z, 1).tolist() == [list(range(1, 9)), [8] * 8, [9] * 8]
    assert gptq_zeros(z, 0).dtype == torch.int32


def test_gptq_dequant_worked_example():
    # K = 8, N = 8 (qzeros pack 8 columns per word), one group, zero 8 everywhere (v1 stores 7),
    # scale -0.5 (negative is fine); column 0 holds codes 0..7, column 1 codes 15 (all ones)
    qweight = torch.tensor([[0x76543210, -1, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    w = gptq_dequant(
        qweight,
        torch.full((1, 8), -0.5, dtype=torch.float16),
        torch.tensor([[0x77777777]], dtype=torch.int32),
        zero_offset=1,
    )
    assert w.shape == (8, 8) and w.dtype == torch.float32
    assert w[0].tolist() == [4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5]
    assert w[1].tolist() == [-3.5] * 8
    assert w[2].tolist() == [4.0] * 8
    # the same with v2 zeros (stored as 8, offset 0) and with no qzeros at all (symmetric)
    v2 = torch.tensor([[0x88888888 - 2**32]], dtype=torch.int32)
    assert torch.equal(gptq_dequant(qweight, torch.full((1, 8), -0.5), v2, zero_offset=0), w)
    assert torch.equal(gptq_dequant(qweight, torch.full((1, 8), -0.5)), w)


def test_gptq_dequant_is_output_major_and_uses_g_idx():
    # K = 16, N = 8, two groups; code of (k, n) = k % 16 ^ n; g_idx reorders rows (act-order)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(16, 8), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(2, 8), dtype=np.uint8)
    scales = rng.standard_normal((2, 8)).astype(np.float16)
    g_idx = rng.permutation(np.arange(16) // 8).astype(np.int32)
    got = gptq_dequant(
        pack_gptq_rows(codes),
        torch.from_numpy(scales),
        pack_gptq_cols(zeros),
        torch.from_numpy(g_idx),
        zero_offset=0,
    )
    want = naive_gptq_dequant(codes, zeros.astype(np.float64), scales.astype(np.float64), g_idx)
    assert got.shape == (8, 16)
    assert np.array_equal(got.numpy().astype(np.float64), want)


def test_gptq_dequant_per_expert_g_idx():
    # stacked experts each with their own act-order g_idx [E, K], as a loader stacks them
    rng = np.random.default_rng(2)
    experts, k, n, groups = 3, 32, 16, 2
    codes = rng.integers(0, 16, size=(experts, k, n), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(experts, groups, n), dtype=np.uint8)
    scales = rng.standard_normal((experts, groups, n)).astype(np.float16)
    g_idx = np.stack([rng.permutation(np.arange(k) // (k // groups)) for _ in range(experts)]).astype(np.int32)
    got = gptq_dequant(pack_gptq_rows(codes), torch.from_numpy(scales), pack_gptq_cols(zeros),
                       torch.from_numpy(g_idx), zero_offset=1)
    for e in range(experts):
        want = naive_gptq_dequant(codes[e], zeros[e].astype(np.float64) + 1, scales[e].astype(np.float64), g_idx[e])
        assert np.array_equal(got[e].numpy().astype(np.float64), want)


def test_xpu_codes_worked_example():
    packed = torch.tensor([[0x21, 0xF0], [0x88, 0x07]], dtype=torch.uint8)
    assert xpu_codes(packed, "u4b8").tolist() == [[1, 2, 0, 15], [8, 8, 7, 0]]
    s4 = packed ^ 0x88  # the same codes, as signed nibbles of q - 8
    assert s4.tolist() == [[0xA9, 0x78], [0x00, 0x8F]]
    assert xpu_codes(s4, "s4").tolist() == [[1, 2, 0, 15], [8, 8, 7, 0]]


def test_xpu_dequant_worked_example():
    packed = torch.tensor([[0x9F, 0x08]], dtype=torch.uint8)  # codes 15, 9, 8, 0
    scales = torch.tensor([[0.25, -2.0]], dtype=torch.float16)  # group 2
    assert xpu_dequant(packed, scales, "u4b8").tolist() == [[1.75, 0.25, 0.0, 16.0]]
    assert xpu_dequant(packed ^ 0x88, scales, "s4").tolist() == [[1.75, 0.25, 0.0, 16.0]]
    assert xpu_dequant(packed, scales, "u4b8", torch.float16).dtype == torch.float16


def test_unpack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="encoding"):
        xpu_codes(torch.zeros(1, 1, dtype=torch.uint8), "u4")
    with pytest.raises(ValueError, match="int32"):
        gptq_codes(torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple"):
        xpu_dequant(torch.zeros(1, 3, dtype=torch.uint8), torch.ones(1, 4), "u4b8")
    with pytest.raises(ValueError, match="g_idx"):
        gptq_dequant(torch.zeros(1, 8, dtype=torch.int32), torch.ones(1, 8), g_idx=torch.full((8,), 1))


# --------------------------------------------------------------------------- unpack: properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=int4_layers(), encoding=st.sampled_from(["u4b8", "s4"]))
def test_codes_round_trip(layer, encoding):
    codes, _, _ = layer
    assert torch.equal(gptq_codes(pack_gptq_rows(codes)), torch.from_numpy(codes))
    xpu_rows = np.ascontiguousarray(codes.transpose(0, 2, 1))  # [E, N, K]
    assert torch.equal(xpu_codes(pack_xpu(xpu_rows, encoding), encoding), torch.from_numpy(xpu_rows))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layer=int4_layers(),
    zero_format=st.sampled_from(["v1", "v2", "none"]),
    with_g_idx=st.booleans(),
    encoding=st.sampled_from(["u4b8", "s4"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_gptq_and_xpu_dequant_agree_exactly(layer, zero_format, with_g_idx, encoding, dtype):
    codes, scales, group = layer
    experts, k, n = codes.shape
    groups = scales.shape[-2]
    if zero_format == "v1":  # symmetric v1 stores zero - 1 = 7 in every nibble
        qzeros, offset = pack_gptq_cols(np.full((experts, groups, n), 7, np.uint8)), 1
        assert int(qzeros.flatten()[0]) == 0x77777777
    elif zero_format == "v2":  # v2 stores the zero itself, 8
        qzeros, offset = pack_gptq_cols(np.full((experts, groups, n), 8, np.uint8)), 0
        assert int(qzeros.flatten()[0]) == 0x88888888 - 2**32
    else:
        qzeros, offset = None, 1
    g_idx = torch.arange(k, dtype=torch.int32) // (k // groups) if with_g_idx else None

    from_gptq = gptq_dequant(pack_gptq_rows(codes), scales, qzeros, g_idx, zero_offset=offset, dtype=dtype)
    xpu_rows = np.ascontiguousarray(codes.transpose(0, 2, 1))
    xpu_scales = scales.transpose(-1, -2).contiguous()  # [E, N, G]
    from_xpu = xpu_dequant(pack_xpu(xpu_rows, encoding), xpu_scales, encoding, dtype)

    assert from_gptq.shape == from_xpu.shape == (experts, n, k)
    assert from_gptq.dtype == from_xpu.dtype == dtype
    assert torch.equal(from_gptq, from_xpu)  # bit for bit, including the final rounding
    # and both equal the definition, (q - 8) * scale, rounded once
    exact = (torch.from_numpy(xpu_rows).double() - 8) * xpu_scales.double().repeat_interleave(k // groups, -1)
    assert torch.equal(from_xpu, exact.to(dtype))


# --------------------------------------------------------------------------- reference MoE


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("experts,tokens,top_k", [(8, 5, 2), (4, 16, 4), (16, 3, 1)])
def test_moe_forward_matches_naive_loop(experts, tokens, top_k, with_bias):
    gen = torch.Generator().manual_seed(experts * 100 + tokens)
    hidden, inter = 32, 24
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    b13 = torch.randn(experts, 2 * inter, generator=gen) if with_bias else None
    b2 = torch.randn(experts, hidden, generator=gen) if with_bias else None
    topk_weights, topk_ids = route(x, torch.randn(experts, hidden, generator=gen), top_k)
    got = moe_forward(x, w13, w2, topk_weights, topk_ids, b13=b13, b2=b2)
    want = naive_moe(x, w13, w2, topk_weights, topk_ids, b13, b2)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    stats = compare(got, want)
    assert stats["rel"] < 1e-6 and stats["max_abs"] < 1e-5


def test_moe_forward_unused_experts_and_skewed_load():
    # expert 2 takes every token, expert 0 one, expert 1 none: padding must not leak
    gen = torch.Generator().manual_seed(4)  # fixed data: the bound below is not left to chance
    x = torch.randn(6, 16, generator=gen)
    w13, w2 = torch.randn(3, 20, 16, generator=gen), torch.randn(3, 16, 10, generator=gen)
    ids = torch.tensor([[2, 0], [2, 0], [2, 0], [2, 0], [2, 0], [0, 2]])[:, :1]
    ids[3, 0] = 0
    weights = torch.rand(6, 1, generator=gen)
    got = moe_forward(x, w13, w2, weights, ids)
    assert compare(got, naive_moe(x, w13, w2, weights, ids))["rel"] < 1e-6


def test_moe_forward_computes_in_weight_dtype_and_sums_in_fp32():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=gen)
    w13, w2 = torch.randn(4, 64, 64, generator=gen) / 8, torch.randn(4, 64, 32, generator=gen) / 6
    tw, ti = route(x, torch.randn(4, 64, generator=gen), 2)
    out16 = moe_forward(x, w13.half(), w2.half(), tw, ti)
    assert out16.dtype == torch.float32
    ref = naive_moe(x, w13.half().float(), w2.half().float(), tw, ti)
    rel = compare(out16, ref)["rel"]
    assert 0 < rel < TOLERANCES["float16"]["rel"]  # fp16 rounding happened, and stayed small


def test_moe_forward_rejects_bad_shapes():
    x = torch.randn(2, 8)
    ids = torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe_forward(x, torch.randn(2, 6, 8), torch.randn(2, 8, 4), torch.ones(2, 1), ids)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        moe_forward(x, torch.randn(2, 6, 8), torch.randn(2, 8, 3), torch.ones(2, 1), ids + 5)


# --------------------------------------------------------------------------- routing


def test_route_softmax_renormalise_on_and_off():
    x = torch.eye(3)
    router = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [0.5, 0.5, 0.5]])
    w, ids = route(x, router, 2, renormalize=False)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    probs = (x @ router.T).softmax(-1)
    assert torch.allclose(w, probs.gather(-1, ids))
    assert ids[0].tolist() == [0, 3] and ids[2].tolist() == [2, 3]
    assert not torch.allclose(w.sum(-1), torch.ones(3))
    w_norm, ids_norm = route(x, router, 2, renormalize=True)
    assert torch.equal(ids_norm, ids)
    assert torch.allclose(w_norm.sum(-1), torch.ones(3))
    assert torch.allclose(w_norm, w / w.sum(-1, keepdim=True))
    w_scaled, _ = route(x, router, 2, routed_scaling_factor=2.5)
    assert torch.allclose(w_scaled, 2.5 * w_norm)


def test_route_sigmoid_bias_selects_but_does_not_weigh():
    x = torch.ones(1, 1)
    router = torch.tensor([[3.0], [2.0], [1.0], [0.0]])  # sigmoid scores descend 0 > 1 > 2 > 3
    scores = torch.sigmoid(router.T)
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])  # pushes expert 3 into the top 2 by selection only
    w, ids = route(x, router, 2, scoring="sigmoid", renormalize=False, correction_bias=bias)
    assert sorted(ids[0].tolist()) == [0, 3]
    assert torch.allclose(w, scores.gather(-1, ids))  # weights are the un-biased scores
    w_n, ids_n = route(x, router, 2, scoring="sigmoid", renormalize=True, correction_bias=bias)
    assert torch.equal(ids_n, ids) and torch.allclose(w_n, w / w.sum())
    _, ids_plain = route(x, router, 2, scoring="sigmoid")
    assert sorted(ids_plain[0].tolist()) == [0, 1]


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scoring"):
        route(torch.ones(1, 2), torch.ones(3, 2), 1, scoring="softplus")
    with pytest.raises(ValueError, match="top_k"):
        route(torch.ones(1, 2), torch.ones(3, 2), 4)


# --------------------------------------------------------------------------- compare, tolerances


def test_compare_values():
    a = torch.tensor([3.0, 4.0])
    assert compare(a, a) == {"max_abs": 0.0, "rel": 0.0, "cosine": pytest.approx(1.0)}
    s = compare(torch.tensor([3.0, 5.0]), a)
    assert s["max_abs"] == 1.0 and s["rel"] == pytest.approx(0.2)
    assert s["cosine"] == pytest.approx((9 + 20) / (5 * 34**0.5))
    assert compare(torch.zeros(2), torch.zeros(2))["cosine"] == 1.0
    assert compare(torch.zeros(2), a)["cosine"] == 0.0
    assert all(isinstance(v, float) for v in s.values())
    with pytest.raises(ValueError):
        compare(torch.zeros(2), torch.zeros(3))


def test_tolerance_helpers():
    assert within_tolerance({"rel": 1e-3, "cosine": 1 - 1e-6}, torch.float16)
    assert not within_tolerance({"rel": 3e-3, "cosine": 1.0}, "float16")
    assert not within_tolerance({"rel": float("nan"), "cosine": float("nan")}, "float32")
    ref = torch.full((4,), 0.1)
    assert within_kernel_tolerance(ref + 0.02, ref, torch.float16)  # 0.02 <= 2e-2 + 2e-2 * 0.1
    assert not within_kernel_tolerance(ref + 0.03, ref, torch.float16)
    assert KERNEL_TOLERANCES["bfloat16"] == {"rtol": 2e-1, "atol": 2e-1}
    with pytest.raises(ValueError, match="float32"):
        within_kernel_tolerance(ref, ref, torch.float32)


def _random_int4_moe(seed, experts, hidden, inter, tokens, top_k):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randint(0, 256, (experts, 2 * inter, hidden // 2), dtype=torch.uint8, generator=gen)
    w2 = torch.randint(0, 256, (experts, hidden, inter // 2), dtype=torch.uint8, generator=gen)
    s13 = ((torch.rand(experts, 2 * inter, hidden // 128, generator=gen) * 0.02 + 0.005) * 2 - 0.025).half()
    s2 = (torch.rand(experts, hidden, inter // 128, generator=gen) * 0.02 + 0.005).half()
    x = torch.randn(tokens, hidden, generator=gen)
    tw, ti = route(x, torch.randn(experts, hidden, generator=gen) / hidden**0.5, top_k)
    return x, w13, s13, w2, s2, tw, ti


def test_tolerances_cover_dtype_noise():
    """Each dtype's forward sits within half its tolerance of the exact (float64) forward, so two
    valid implementations pass against each other; a single corrupted expert fails by far."""
    x, w13, s13, w2, s2, tw, ti = _random_int4_moe(0, experts=16, hidden=512, inter=256, tokens=32, top_k=4)
    exact = moe_forward(x, xpu_dequant(w13, s13, "u4b8", torch.float64), xpu_dequant(w2, s2, "u4b8", torch.float64),
                        tw, ti)
    outs = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        outs[dtype] = moe_forward(x, xpu_dequant(w13, s13, "u4b8", dtype), xpu_dequant(w2, s2, "u4b8", dtype), tw, ti)
        stats = compare(outs[dtype], exact)
        name = str(dtype).removeprefix("torch.")
        assert stats["rel"] <= TOLERANCES[name]["rel"] / 2, (name, stats)
        assert 1 - stats["cosine"] <= (1 - TOLERANCES[name]["cosine"]) / 4, (name, stats)
    # bf16-rounded scales (what a bf16 checkpoint stores) stay within the bf16 bound too
    bf16_scales = moe_forward(
        x,
        xpu_dequant(w13, s13.bfloat16(), "u4b8", torch.bfloat16),
        xpu_dequant(w2, s2.bfloat16(), "u4b8", torch.bfloat16),
        tw,
        ti,
    )
    assert within_tolerance(compare(bf16_scales, outs[torch.bfloat16]), torch.bfloat16)
    # one used expert with its nibbles swapped is a layout bug that must fail every dtype's bound
    bad = w13.clone()
    e = int(ti[0, 0])
    bad[e] = (bad[e] >> 4) | (bad[e] << 4)
    broken = moe_forward(x, xpu_dequant(bad, s13, "u4b8", torch.bfloat16), xpu_dequant(w2, s2, "u4b8", torch.bfloat16),
                         tw, ti)
    stats = compare(broken, outs[torch.bfloat16])
    assert stats["rel"] > 10 * TOLERANCES["bfloat16"]["rel"]
    assert not within_tolerance(stats, torch.bfloat16)


# --------------------------------------------------------------------------- the AutoRound fixture
#
# tests/fixtures/qwen3moe-g128 (see its README.md): a tiny Qwen3-MoE
# (K = 256, N = 256, 8 experts, top-2, 2 layers) quantized by AutoRound 0.16.1 to GPTQ v1
# (qzeros 0x77777777, group 128, about half the scales negative). reference.safetensors holds:
#   layers.0.expert0.{gate,up,down}  expert 0 dequantized by the tool's own kernel, [N, K] fp32;
#   layers.L.hidden                  the block's input, fp32 [16, 256];
#   layers.L.block_out               the tool's MoE output composed from its quantized expert
#                                    modules in fp16 (softmax -> top-2 -> renormalise), with the
#                                    weighted sum in fp32 (the values are not fp16-representable);
#   layers.L.module_forward_out      the output of the HF Qwen3MoeSparseMoeBlock.forward itself,
#                                    all in fp16: router logits in fp16, expert outputs times
#                                    fp16 routing weights accumulated in an fp16 buffer. We
#                                    reproduce it bit for bit (rel 0 here) by doing exactly that;
#                                    it differs from block_out by rel 3.7e-4 .. 3.9e-4, about one
#                                    fp16 unit roundoff (2^-11), from the fp16 accumulation alone.


def _fixture():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = safetensors_torch.load_file(str(FIXTURE / "model.safetensors"))
    ref = safetensors_torch.load_file(str(FIXTURE / "reference.safetensors"))
    return model, ref


def _source_expert(model, layer, expert, proj, dtype):
    p = f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj."
    return gptq_dequant(
        model[p + "qweight"], model[p + "scales"], model[p + "qzeros"], model[p + "g_idx"], zero_offset=1, dtype=dtype
    )


def _source_layer(model, layer, dtype):
    w13 = torch.stack([torch.cat([_source_expert(model, layer, e, "gate", dtype),
                                  _source_expert(model, layer, e, "up", dtype)]) for e in range(8)])
    w2 = torch.stack([_source_expert(model, layer, e, "down", dtype) for e in range(8)])
    return w13, w2


def test_fixture_dequant_matches_the_tools_own_kernel_exactly():
    model, ref = _fixture()
    for proj in ("gate", "up", "down"):
        want = ref[f"layers.0.expert0.{proj}"]
        assert want.shape == (256, 256)
        # bit for bit in float32, and fp16 output loses nothing (every value is fp16-exact)
        assert torch.equal(_source_expert(model, 0, 0, proj, torch.float32), want)
        assert torch.equal(_source_expert(model, 0, 0, proj, torch.float16).float(), want)
        # bf16 output is a genuine rounding of those values, by at most half a bf16 ulp
        bf16 = _source_expert(model, 0, 0, proj, torch.bfloat16).float()
        assert not torch.equal(bf16, want)
        assert torch.all((bf16 - want).abs() <= want.abs() * 2.0**-8)


@pytest.mark.parametrize("layer", [0, 1])
def test_fixture_block_out_reproduced(layer):
    model, ref = _fixture()
    hidden, block_out = ref[f"layers.{layer}.hidden"], ref[f"layers.{layer}.block_out"]
    tw, ti = route(hidden, model[f"model.layers.{layer}.mlp.gate.weight"], 2, scoring="softmax", renormalize=True)
    # The tool computed in fp16. Our fp16 forward: measured rel 3.2e-5 .. 6.2e-5, max_abs <= 3.8e-6
    # (outputs are ~3e-3 rms): GEMM accumulation-order noise, a fraction of one fp16 ulp per
    # expert output. Bound: rel 1e-4, max_abs 1e-5 -- well inside TOLERANCES["float16"].
    w13, w2 = _source_layer(model, layer, torch.float16)
    stats16 = compare(moe_forward(hidden, w13, w2, tw, ti), block_out)
    assert stats16["rel"] < 1e-4 and stats16["max_abs"] < 1e-5, stats16
    assert within_tolerance(stats16, torch.float16)
    # Our fp32 forward differs from the tool's fp16 by its fp16 rounding: measured rel 5.6e-4.
    w13, w2 = _source_layer(model, layer, torch.float32)
    stats32 = compare(moe_forward(hidden, w13, w2, tw, ti), block_out)
    assert 1e-4 < stats32["rel"] < 1e-3, stats32
    # and the HF module's all-fp16 output is a further ~1 fp16 ulp away from block_out
    assert compare(ref[f"layers.{layer}.module_forward_out"], block_out)["rel"] < 5e-4


@pytest.mark.parametrize("layer", [0, 1])
def test_fixture_module_forward_out_is_the_all_fp16_hf_block(layer):
    model, ref = _fixture()
    x = ref[f"layers.{layer}.hidden"].half()
    router = model[f"model.layers.{layer}.mlp.gate.weight"].half()
    probs = torch.nn.functional.linear(x, router).float().softmax(-1)  # fp16 logits, fp32 softmax
    weights, ids = probs.topk(2, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).half()
    w13, w2 = _source_layer(model, layer, torch.float16)
    out = torch.zeros_like(x)  # fp16 accumulator, as in Qwen3MoeSparseMoeBlock.forward
    for t in range(x.shape[0]):  # one token at a time: the GEMV path the tool's run took
        for slot in range(2):
            e, xt = int(ids[t, slot]), x[t : t + 1]
            act = torch.nn.functional.silu(xt @ w13[e, :256].T) * (xt @ w13[e, 256:].T)
            out[t] += ((act @ w2[e].T) * weights[t, slot])[0]
    stats = compare(out.float(), ref[f"layers.{layer}.module_forward_out"])
    # Bit for bit on the development machine (rel 0). Batching each expert's tokens into one GEMM
    # instead already moves it to rel 8e-5 (another CPU kernel, another accumulation order), so
    # the bound leaves room for other CPUs while staying well below the 3.8e-4 that separates
    # this output from block_out.
    assert stats["rel"] < 1.5e-4, stats
    assert compare(ref[f"layers.{layer}.module_forward_out"], ref[f"layers.{layer}.block_out"])["rel"] > 3e-4


def test_unpack_docstring_examples_hold():
    import doctest

    from gptq2xpu.verify import unpack

    result = doctest.testmod(unpack, extraglobs={"torch": torch})
    assert result.attempted >= 7 and result.failed == 0
