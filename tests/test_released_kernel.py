"""What the released vllm-xpu-kernels 0.1.16.2 does with int4 weights, on its own Python interface.

The release's own ``fused_moe_interface.py`` / ``moe_utils.py`` run unchanged on CPU; only the
native ops are replaced (``tests/_released_kernel.py``, fixture ``released_kernel``). No Intel XPU
exists here.
"""

from __future__ import annotations

import torch

K, N, E, G, TOP_K = 128, 192, 4, 64, 2


def test_release_implement_zp_is_xor_0x88(released_kernel):
    """The contract's s4 encoding (byte ^ 0x88) is the release's own implement_zp, on every byte."""
    every = torch.arange(256, dtype=torch.uint8).view(16, 16)
    got = released_kernel.implement_zp(every)
    assert got.dtype == torch.uint8 and torch.equal(got, every ^ 0x88)


def test_release_takes_int4_only_from_uint8(released_kernel):
    """uint8 w13: int4, inter size N, scales kept, an int8 copy rewritten by implement_zp; int8 w13
    (what gptq2xpu.load handed over for s4 so far): a 16-bit weight, inter size K/4, scales dropped."""
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
