"""The one place that builds XPU bytes and scales (numpy only).

Target layout (see ``shared/docs/xpu-int4-contract.md``)::

    w13_qweight  uint8 [E, 2N, K/2]   rows 0..N-1 gate (w1), rows N..2N-1 up (w3)
    w13_scales         [E, 2N, K/g13]
    w2_qweight   uint8 [E, K, N/2]    down projection, input dim N
    w2_scales          [E, K, N/g2]

Byte ``j`` of a row holds input ``2j`` in its low nibble and ``2j+1`` in its high nibble; a code
``q`` means ``(q - 8) * scale`` ("u4b8").  The ``s4`` encoding stores ``(q - 8) & 0xF`` per nibble,
which is ``byte ^ 0x88`` -- the form the kernel converts to once at load time.

Each format hands over one expert's rows as int32 words ``[out, in/8]`` (see
:mod:`gptq2xpu.formats`); here they are placed into the stacked tensors, optionally zero-padded
along N (tensor-parallel padding: code 8 = weight 0, scale 0), re-encoded, and the scales are
transposed, cast and regrouped.  Regrouping is lossless: a group of 128 with scale ``s`` is two
groups of 64 with scale ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Group sizes the XPU kernel runs (it derives g = K / scales.shape[-1] and refuses anything else).
SUPPORTED_GROUPS = (256, 128, 64, 32)
#: Nibble encodings: u4b8 = offset-8 codes (what vLLM feeds the kernel), s4 = signed nibbles.
ENCODINGS = ("u4b8", "s4")
_S4_XOR = np.uint32(0x88888888)
#: An int32 word of eight code-8 nibbles: weight 0 in u4b8.
ZERO_WORD_U4B8 = np.uint32(0x88888888)


def largest_group(source_groups, *, divides=()) -> int | None:
    """Largest supported group size that divides every source group and every value in ``divides``.

    ``largest_group([128])`` -> 128; ``largest_group([512])`` -> 256; ``largest_group([2048])``
    (per-channel over K=2048) -> 256; ``largest_group([128], divides=[192])`` -> 64;
    ``largest_group([48])`` -> None.
    """
    for g in SUPPORTED_GROUPS:
        if all(s % g == 0 for s in source_groups) and all(d % g == 0 for d in divides):
            return g
    return None


# ----------------------------------------------------------------------------- float casts


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Scales in their stored representation (F16/F32 numpy, BF16 as uint16) -> float32."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def from_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> stored representation of ``dtype`` (round to nearest even; BF16 as uint16)."""
    if dtype == "F32":
        return arr.astype(np.float32)
    if dtype == "F16":
        return arr.astype(np.float16)
    if dtype == "BF16":
        u = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        nan = np.isnan(arr)
        if nan.any():
            rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
        return rounded
    raise ValueError(f"unknown scale dtype {dtype}")


def cast_scales(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Change the scales' dtype (identity when equal, so bits are kept exactly)."""
    if src == dst:
        return arr
    return from_float32(to_float32(arr, src), dst)


DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


# ----------------------------------------------------------------------------- layer repack


@dataclass(frozen=True)
class LayerGeometry:
    """Shapes of one converted MoE layer."""

    experts: int
    hidden: int          # K
    intermediate: int    # N (source)
    padded: int          # N after tensor-parallel padding (== intermediate when none)
    g13: int             # output group size along K (w13)
    g2: int              # output group size along N (w2)

    @property
    def w13_shape(self):
        return (self.experts, 2 * self.padded, self.hidden // 2)

    @property
    def w2_shape(self):
        return (self.experts, self.hidden, self.padded // 2)

    @property
    def w13_scales_shape(self):
        return (self.experts, 2 * self.padded, self.hidden // self.g13)

    @property
    def w2_scales_shape(self):
        return (self.experts, self.hidden, self.padded // self.g2)


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for a 2-D ``src``, copied in bands of source rows.

    Same bytes as ``np.copyto(dst, src.T)``, 2-5x faster on GPTQ shapes: a plain transposed copy
    reads one element from every source row in turn, and rows a multiple of 4 KiB apart (K = 2048
    int32 words: 8 KiB) all land in the same L1 sets and evict each other.  A band of 8 such rows
    (16 otherwise) stays in L1 while its columns are written out.
    """
    rows = src.shape[0]
    band = 8 if (src.strides[0] % 4096) == 0 else 16
    if rows <= band:
        np.copyto(dst, src.T)
        return
    for r in range(0, rows, band):
        np.copyto(dst[:, r : r + band], src[r : r + band].T)


def encode_words(words: np.ndarray, encoding: str) -> None:
    """Re-encode u4b8 int32 words in place (s4: every nibble ``(q - 8) & 0xF``)."""
    if encoding == "s4":
        u = words.view(np.uint32)
        np.bitwise_xor(u, _S4_XOR, out=u)
    elif encoding != "u4b8":
        raise ValueError(f"unknown nibble encoding {encoding}")


def fill_w13(out_words: np.ndarray, geo: LayerGeometry, read_gate, read_up, encoding: str) -> None:
    """One expert's w13 rows as int32 words ``[2*padded, K/8]``.

    ``read_gate(dst)`` / ``read_up(dst)`` write ``[N, K/8]`` u4b8 words into ``dst``.
    """
    n, p = geo.intermediate, geo.padded
    read_gate(out_words[:n])
    read_up(out_words[p : p + n])
    if p > n:
        out_words[n:p].view(np.uint32).fill(ZERO_WORD_U4B8)
        out_words[p + n :].view(np.uint32).fill(ZERO_WORD_U4B8)
    encode_words(out_words, encoding)


def fill_w2(out_words: np.ndarray, geo: LayerGeometry, read_down, scratch_rows: np.ndarray, encoding: str) -> None:
    """One expert's w2 rows as int32 words ``[K, padded/8]``.

    ``read_down(dst)`` writes ``[K, N/8]`` u4b8 words.  With padding, the rows are read into
    ``scratch_rows`` first and copied into the wider rows.
    """
    n, p = geo.intermediate, geo.padded
    if p == n:
        read_down(out_words)
    else:
        tmp = scratch_rows[: geo.hidden * n // 8].reshape(geo.hidden, n // 8)
        read_down(tmp)
        out_words[:, : n // 8] = tmp
        out_words[:, n // 8 :].view(np.uint32).fill(ZERO_WORD_U4B8)
    encode_words(out_words, encoding)


def layer_scales(per_expert, geo: LayerGeometry, *, roles: tuple[str, ...], src_groups: dict[str, int],
                 src_dtype: str, dst_dtype: str) -> np.ndarray:
    """Stack, regroup, pad and cast one layer's scales.

    ``per_expert(e, role)`` returns ``[out, in/src_group]`` scales (stored dtype).  For
    ``roles=("gate", "up")`` the result is ``[E, 2*padded, K/g13]``; for ``("down",)`` it is
    ``[E, K, padded/g2]``.
    """
    w13 = roles != ("down",)
    g_out = geo.g13 if w13 else geo.g2
    shape = geo.w13_scales_shape if w13 else geo.w2_scales_shape
    # Nothing regrouped or cast: place the stored bits directly.  The float32 round trip this skips
    # is the identity on every F16 pattern and on every BF16 pattern but signalling NaNs, which
    # from_float32 makes quiet (| 0x40): so does the end of this path.  Padding is 0 bits either way.
    stored = src_dtype == dst_dtype and src_dtype in ("F16", "BF16") and all(src_groups[r] == g_out for r in roles)
    out = None
    for e in range(geo.experts):
        for i, role in enumerate(roles):
            s = per_expert(e, role)
            if not stored:
                s = to_float32(s, src_dtype)
                if src_groups[role] > g_out:
                    s = np.repeat(s, src_groups[role] // g_out, axis=1)
            if out is None:
                out = np.zeros(shape, dtype=s.dtype)
            if w13:
                out[e, i * geo.padded : i * geo.padded + geo.intermediate] = s
            else:
                out[e, :, : s.shape[1]] = s
    if not stored:
        return from_float32(out, dst_dtype)
    if dst_dtype == "BF16":
        u = out.view(np.uint16)
        nan = ((u & 0x7F80) == 0x7F80) & ((u & 0x7F) != 0)
        u[nan] |= 0x40
    return out
