"""``gptq2xpu.load`` and ``verify --backend xpu-kernels`` against the released vllm-xpu-kernels 0.1.16.2.

The release's own ``fused_moe_interface.py`` / ``moe_utils.py`` run unchanged on CPU; only the
native ops are replaced (``tests/support/released_kernel.py``, fixture ``released_kernel``). Asserted on
the object the release builds, i.e. what its kernel would be given: int4 recognised, inter size
N, scales attached, int8 weights whose bytes equal the release's own ``implement_zp`` of the u4b8
bytes, and for s4 no call to ``implement_zp`` and no new buffer. The forward then runs through the
release's ``apply`` and is compared with the reference MoE. No Intel XPU exists here.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from support.helpers import REPO
from support.planting import convert, reference_moe, router_weight, verify_json
from support.released_kernel import implement_zp_all, readme_block

from gptq2xpu.errors import UsageError
from gptq2xpu.load import make_xpu_fused_moe, open_converted
from gptq2xpu.testing.synth import make_checkpoint
from gptq2xpu.verify import xpu_kernels
from gptq2xpu.verify.reference import compare, route
from gptq2xpu.xpu_handover import build_fused_moe

K, N, E, G, TOP_K = 128, 192, 4, 64, 2
PREFIXES = ("model.layers.0.mlp", "model.layers.1.mlp")
SPEC = dict(family="qwen3_moe", hidden=K, moe_intermediate=N, num_experts=E, top_k=TOP_K, group_size=G,
            num_layers=2, attention=False, vocab=32)
LOADING_DOC = REPO / "docs" / "loading.md"


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    info = make_checkpoint(root / "src", **SPEC)
    out = {"u4b8": root / "u4b8", "s4": root / "s4", "t2": root / "t2"}
    convert(info.path, out["u4b8"])
    convert(info.path, out["s4"], "--nibble-encoding", "s4")
    convert(info.path, out["t2"], "--tp-size", "2", "--emit-ranks")
    return types.SimpleNamespace(src=info.path, out=out)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _x(dtype=torch.bfloat16, tokens=16, seed=1) -> torch.Tensor:
    return (torch.randn(tokens, K, generator=torch.Generator().manual_seed(seed)) / 4).to(dtype)


# ----------------------------------------------------------------------------- what the release builds


def test_u4b8_layer_the_constructor_converts(conv, released_kernel):
    with open_converted(conv.out["u4b8"]) as ck:
        assert ck.encoding == "u4b8"
        for prefix in PREFIXES:
            lw = ck.layer(prefix, dtype=torch.bfloat16)
            u13, u2 = lw.w13.clone(), lw.w2.clone()
            moe = make_xpu_fused_moe(lw, TOP_K)
            assert isinstance(moe, released_kernel.module.XpuFusedMoe)
            assert moe.is_int4 is True and moe.recipe == "int4" and moe.inter_size == N
            assert moe.gemm1_wei_scales is lw.w13_scales and moe.gemm2_wei_scales is lw.w2_scales
            assert moe.w13.dtype == moe.w2.dtype == torch.int8
            assert torch.equal(moe.w13.view(torch.uint8), implement_zp_all(released_kernel, u13))
            assert torch.equal(moe.w2.view(torch.uint8), implement_zp_all(released_kernel, u2))
            assert moe.num_experts == E and moe.n_experts_per_token == TOP_K and moe.activation == "silu"
            # the layer's own tensors were neither rewritten nor rebound: the release made its copy
            assert lw.w13.dtype == torch.uint8 and torch.equal(lw.w13, u13) and torch.equal(lw.w2, u2)
            assert _storage(moe.w13) != _storage(lw.w13)
        assert released_kernel.zp_calls == 2 * E * len(PREFIXES)


@pytest.mark.parametrize("which,signed", [("s4", None), ("u4b8", True)])
def test_s4_layer_no_rewrite_no_new_buffer(conv, released_kernel, which, signed):
    with open_converted(conv.out[which]) as ck:
        for prefix in PREFIXES:
            u = ck.layer(prefix, signed=False)                       # the u4b8 bytes of the same layer
            lw = ck.layer(prefix, dtype=torch.float16, signed=signed)
            assert lw.encoding == "s4" and lw.w13.dtype == torch.uint8
            moe = make_xpu_fused_moe(lw, TOP_K)
            assert moe.is_int4 is True and moe.recipe == "int4" and moe.inter_size == N
            assert moe.gemm1_wei_scales is lw.w13_scales and moe.gemm2_wei_scales is lw.w2_scales
            assert moe.w13.dtype == moe.w2.dtype == torch.int8
            # bytes: what the release's own implement_zp makes of the u4b8 bytes
            assert torch.equal(moe.w13.view(torch.uint8), implement_zp_all(released_kernel, u.w13))
            assert torch.equal(moe.w2.view(torch.uint8), implement_zp_all(released_kernel, u.w2))
            # no new buffer: the object's weights are the layer's storage
            for mine, theirs in ((lw.w13, moe.w13), (lw.w2, moe.w2)):
                assert theirs.data_ptr() == mine.data_ptr() and _storage(theirs) == _storage(mine)
            assert lw.w13.dtype == lw.w2.dtype == torch.uint8      # not rebound
    assert released_kernel.zp_calls == 0                               # the one-time rewrite never ran


# ------------------------------------------------------------------ the loading guide's example


@pytest.mark.parametrize("which", ["u4b8", "s4"])
def test_loading_guide_example_runs_against_the_release(conv, released_kernel, which):
    code = readme_block(LOADING_DOC, "# For runtimes: `gptq2xpu.load`")
    out = conv.out[which]
    for old, new in (('"qwen3-xpu"', repr(str(out))), ('"xpu"', '"cpu"')):
        assert old in code
        code = code.replace(old, new)
    x = _x()
    env = {"prefix": PREFIXES[1], "x": x}
    exec(compile(code, "docs/loading.md example", "exec"), env)
    moe = env["moe"]
    assert set(moe) == set(PREFIXES)
    assert all(isinstance(m, released_kernel.module.XpuFusedMoe) and m.is_int4 and m.inter_size == N
               for m in moe.values())
    assert released_kernel.zp_calls == 0                        # signed=True: nothing rewritten
    gemms = released_kernel.ops.gemm_calls
    assert [(c["B_dtype"], c["N"], c["K"]) for c in gemms] == [(torch.int8, 2 * N, K), (torch.int8, K, N)]
    assert gemms[0]["B_ptr"] == moe[PREFIXES[1]].w13.data_ptr() and gemms[0]["scales"] is not None
    y = env["out"]
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    want = reference_moe(out, PREFIXES[1], x, TOP_K)
    assert compare(y.float(), want)["rel"] < 8e-3
    env["ckpt"].close()


# ----------------------------------------------------------------------------- verify --backend xpu-kernels


@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_run_xpu_fused_moe_through_the_release(conv, released_kernel, monkeypatch, encoding, dtype):
    monkeypatch.setattr(xpu_kernels, "_is_xpu", lambda device: True)
    out = conv.out[encoding]
    with open_converted(out) as ck:
        lw = ck.layer(PREFIXES[0], dtype=dtype)                      # as stored
    kept = [t.clone() for t in (lw.w13, lw.w2)]
    x = _x(dtype, seed=5)
    tw, ti = route(x, router_weight(out, PREFIXES[0]), TOP_K)
    y = xpu_kernels.run_xpu_fused_moe(x, lw.w13, lw.w13_scales, lw.w2, lw.w2_scales, tw, ti, None, top_k=TOP_K,
                                      renormalize=True, encoding=encoding)
    assert released_kernel.zp_calls == (2 * E if encoding == "u4b8" else 0)
    b_dtypes = {c["B_dtype"] for c in released_kernel.ops.gemm_calls}
    assert b_dtypes == {torch.int8} and len(released_kernel.ops.gemm_calls) == 2
    if encoding == "s4":
        assert released_kernel.ops.gemm_calls[0]["B_ptr"] == lw.w13.data_ptr()
    assert torch.equal(lw.w13, kept[0]) and torch.equal(lw.w2, kept[1]) and lw.w13.dtype == torch.uint8
    bound = 2e-3 if dtype == torch.float16 else 8e-3
    assert compare(y.float(), reference_moe(out, PREFIXES[0], x, TOP_K))["rel"] < bound


@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
def test_verify_backend_xpu_kernels_runs_the_release(conv, released_kernel, monkeypatch, encoding):
    """``gptq2xpu verify --backend xpu-kernels`` end to end, the CPU posing as an XPU device."""
    monkeypatch.setattr(xpu_kernels, "_is_xpu", lambda device: True)
    code, report = verify_json(conv.out[encoding], "--source", conv.src, "--dtype", "bfloat16",
                               "--backend", "xpu-kernels")
    assert code == 0 and report["status"] == "ok", report.get("failures")
    assert report["backend"]["kernel_ran"] is True
    assert report["device"]["vllm_xpu_kernels"] == "0.1.16.2"
    assert [r["prefix"] for r in report["layers"]] == list(PREFIXES)
    assert all(r["kernel"]["ok"] and r["kernel"]["rel"] < 8e-3 for r in report["layers"]), report["layers"]
    assert released_kernel.zp_calls == (2 * E * len(PREFIXES) if encoding == "u4b8" else 0)
    assert {c["B_dtype"] for c in released_kernel.ops.gemm_calls} == {torch.int8}


# ----------------------------------------------------------------------------- the wrong hand-over, planted


def test_planted_int8_into_the_constructor_is_refused(conv, released_kernel):
    """A wrong hand-over planted inside build_fused_moe (int8 s4 bytes marked xpu_fused_moe, straight
    into the constructor, see test_release_takes_int4_only_from_uint8): the object is refused."""
    with open_converted(conv.out["s4"]) as ck:
        lw = ck.layer(PREFIXES[0])

    class IntoInt8(released_kernel.module.XpuFusedMoe):
        def __init__(self, w13, w2, **kw):
            w13_i8 = w13.view(torch.int8)
            w13_i8.xpu_fused_moe = True
            super().__init__(w13=w13_i8, w2=w2.view(torch.int8), **kw)

    with pytest.raises(UsageError) as info:
        build_fused_moe(IntoInt8, lw.w13, lw.w13_scales, lw.w2, lw.w2_scales, encoding="s4", n_experts_per_token=TOP_K)
    assert str(info.value) == (
        f"vllm_xpu_kernels 0.1.16.2: XpuFusedMoe did not take the int4 experts as release 0.1.16.2 does "
        f"(is_int4 is False; inter_size is {K // 4}, not N={N}; scales not attached); gptq2xpu hands weights "
        f"over as 0.1.16.2 takes them")


def test_make_xpu_fused_moe_without_the_package(conv, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm_xpu_kernels", None)
    with open_converted(conv.out["s4"]) as ck:
        lw = ck.layer(PREFIXES[0])
    with pytest.raises(UsageError, match="^cannot build XpuFusedMoe: vllm_xpu_kernels not installed$"):
        make_xpu_fused_moe(lw, TOP_K)


# ----------------------------------------------------------------------------- the release itself


def test_release_implement_zp_is_xor_0x88(released_kernel):
    """The contract's s4 encoding (byte ^ 0x88) is the release's own implement_zp, on every byte."""
    every = torch.arange(256, dtype=torch.uint8).view(16, 16)
    got = released_kernel.implement_zp(every)
    assert got.dtype == torch.uint8 and torch.equal(got, every ^ 0x88)


def test_release_takes_int4_only_from_uint8(released_kernel):
    """uint8 w13: int4, inter size N, scales kept, an int8 copy rewritten by implement_zp; int8 w13
    (s4 bytes handed over as they are stored): a 16-bit weight, inter size K/4, scales dropped."""
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randint(0, 256, (E, 2 * N, K // 2), dtype=torch.uint8, generator=gen)
    w2 = torch.randint(0, 256, (E, K, N // 2), dtype=torch.uint8, generator=gen)
    s13 = torch.randn(E, 2 * N, K // G, generator=gen).to(torch.bfloat16)
    s2 = torch.randn(E, K, N // G, generator=gen).to(torch.bfloat16)
    cls = released_kernel.module.XpuFusedMoe

    def build(a, b):
        return cls(w13=a, w13_scales=s13, w13_bias=None, w2=b, w2_scales=s2, w2_bias=None,
                   n_experts_per_token=TOP_K, activation="silu", num_experts=E)

    moe = build(w13.clone(), w2.clone())
    assert moe.is_int4 is True and moe.inter_size == N and moe.gemm1_wei_scales is s13
    assert moe.w13.dtype == torch.int8 and torch.equal(moe.w13.view(torch.uint8), w13 ^ 0x88)
    assert released_kernel.zp_calls == 2 * E
    s4_13, s4_2 = (w13 ^ 0x88).view(torch.int8), (w2 ^ 0x88).view(torch.int8)
    s4_13.xpu_fused_moe = True
    moe = build(s4_13, s4_2)
    assert moe.is_int4 is False and moe.recipe == "bf16"
    assert moe.inter_size == K // 4 and moe.gemm1_wei_scales is None and moe.gemm2_wei_scales is None
