"""The int4 formats and the MoE block by their definitions, for the verifier's tests.

Packers written as plain numpy shifts from the contract (so the package's unpackers are checked
against a definition of the formats, not against themselves), the naive loops that define GPTQ
dequantization and the MoE block, and a hypothesis strategy for random int4 layers.  Shared by
``test_verify_math.py`` and ``test_verify_streamed.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

# --------------------------------------------------------------------------- packers


def pack_gptq_rows(codes: np.ndarray) -> torch.Tensor:
    """uint8 codes [..., K, N] -> int32 [..., K/8, N]; row 8r+j in bits 4j.. of row r."""
    k = codes.shape[-2]
    acc = np.zeros(codes.shape[:-2] + (k // 8, codes.shape[-1]), dtype=np.uint32)
    for j in range(8):
        acc |= codes[..., j::8, :].astype(np.uint32) << np.uint32(4 * j)
    return torch.from_numpy(acc.view(np.int32).copy())


def pack_gptq_cols(values: np.ndarray) -> torch.Tensor:
    """uint8 values [..., G, N] -> int32 [..., G, N/8]; column 8c+j in bits 4j.. of column c."""
    n = values.shape[-1]
    acc = np.zeros(values.shape[:-1] + (n // 8,), dtype=np.uint32)
    for j in range(8):
        acc |= values[..., j::8].astype(np.uint32) << np.uint32(4 * j)
    return torch.from_numpy(acc.view(np.int32).copy())


def pack_xpu(codes: np.ndarray, encoding: str) -> torch.Tensor:
    """u4b8 codes [..., R, C] -> uint8 [..., R, C/2]; column 2j low nibble, 2j+1 high nibble."""
    stored = codes if encoding == "u4b8" else (codes.astype(np.int16) - 8) & 0xF
    lo = stored[..., 0::2].astype(np.uint8)
    hi = stored[..., 1::2].astype(np.uint8)
    return torch.from_numpy((lo | (hi << 4)).astype(np.uint8))


def naive_gptq_dequant(codes, zeros, scales, g_idx) -> np.ndarray:
    """[K, N] codes, [G, N] zeros/scales (float64), [K] g_idx -> [N, K] float64, by loops over k."""
    k, n = codes.shape
    out = np.empty((n, k))
    for kk in range(k):
        g = g_idx[kk]
        out[:, kk] = (codes[kk, :].astype(np.float64) - zeros[g, :]) * scales[g, :]
    return out


def naive_moe(x, w13, w2, topk_weights, topk_ids, b13=None, b2=None):
    """Per token, per chosen expert, in float64: the definition of the block."""
    tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            xt = x[t].double()
            h = w13[e].double() @ xt
            if b13 is not None:
                h = h + b13[e].double()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            y = w2[e].double() @ act
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += float(topk_weights[t, j]) * y
    return out


# --------------------------------------------------------------------------- random layers


@st.composite
def int4_layers(draw):
    """Random codes [E, K, N] and scales [E, G, N] with a GPTQ group size or a single group."""
    experts = draw(st.integers(1, 3))
    group = draw(st.sampled_from([8, 16, 32, None]))  # None: one group over all of K (g = -1)
    groups = draw(st.integers(1, 4)) if group else 1
    k = (group or 8 * draw(st.integers(1, 8))) * groups
    n = 8 * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(experts, k, n), dtype=np.uint8)
    mags = np.exp2(rng.uniform(-12, 2, size=(experts, groups, n)))
    scales = torch.from_numpy(mags * rng.choice([-1.0, 1.0], size=mags.shape))
    scale_dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    return codes, scales.to(scale_dtype), group
