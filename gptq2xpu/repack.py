"""The one place that builds XPU bytes and scales (numpy only).

Target layout (see :mod:`gptq2xpu.contract`, which also says where the rows go)::

    w13_qweight  uint8 [E, 2P, K/2]   rows 0..N-1 gate (w1), rows P..P+N-1 up (w3)
    w13_scales         [E, 2P, K/g13]
    w2_qweight   uint8 [E, K, P/2]    down projection, input dim P
    w2_scales          [E, K, P/g2]

Byte ``j`` of a row holds input ``2j`` in its low nibble and ``2j+1`` in its high nibble; a code
``q`` means ``(q - 8) * scale`` ("u4b8").  The ``s4`` encoding stores ``(q - 8) & 0xF`` per nibble,
which is ``byte ^ 0x88`` -- the form the kernel converts to once at load time.

Each format says where one expert's packed int32 words and scales are and whether they are
stored input-major (GPTQ ``[in/8, out]``: transposed here into rows ``[out, in/8]``) or already as
rows (compressed-tensors); see :mod:`gptq2xpu.formats`.  The rows are placed into the stacked
tensors, optionally zero-padded along N (tensor-parallel padding: code 8 = weight 0, scale 0),
re-encoded, and the scales are transposed, cast and regrouped.  Regrouping is lossless: a group
of 128 with scale ``s`` is two groups of 64 with scale ``s``.  A GPTQ-quantized router is
dequantized here too (``--dequantize-router``).
"""

from __future__ import annotations

import numpy as np

from .contract import KERNEL_GROUPS, W2_SCALES, W13_SCALES, LayerGeometry
from .safetensors_io import NUMPY_DTYPES

_S4_XOR = np.uint32(0x88888888)
#: An int32 word of eight code-8 nibbles: weight 0 in u4b8.
ZERO_WORD_U4B8 = np.uint32(0x88888888)


def largest_group(source_groups, *, divides=()) -> int | None:
    """Largest supported group size that divides every source group and every value in ``divides``.

    ``largest_group([128])`` -> 128; ``largest_group([512])`` -> 256; ``largest_group([2048])``
    (per-channel over K=2048) -> 256; ``largest_group([128], divides=[192])`` -> 64;
    ``largest_group([48])`` -> None.
    """
    for g in KERNEL_GROUPS:
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


# ----------------------------------------------------------------------------- layer repack


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for a 2-D ``src``, copied in bands of 32 source rows.

    Same bytes as ``np.copyto(dst, src.T)``, 2-5x faster on GPTQ shapes: a plain transposed copy
    reads one element from every source row in turn, and rows a multiple of 4 KiB apart (K = 2048
    int32 words: 8 KiB) all land in the same L1 sets and evict each other.  A band of rows stays in
    cache while its columns are written out.  32 rows beat 8 or 16 by 15-25 % when ``dst`` is not in
    cache (a buffer from the pool) and need a quarter of the Python calls (measured on Qwen3-30B
    shapes, [256, 768] and [96, 2048] words).
    """
    rows = src.shape[0]
    band = 32
    if rows <= band:
        np.copyto(dst, src.T)
        return
    for r in range(0, rows, band):
        np.copyto(dst[:, r : r + band], src[r : r + band].T)


def read_rows(ckpt, fmt, fields: dict[str, str], out_words: np.ndarray, scratch: np.ndarray) -> None:
    """One projection's codes as XPU rows: int32 ``[out, in/8]`` into ``out_words`` (u4b8).

    Input-major formats (GPTQ) are read into ``scratch`` (int32, at least ``out*in/8`` elements)
    and transposed; row formats are read straight into ``out_words``.
    """
    ref = ckpt.ref(fields[fmt.packed])
    if not fmt.input_major:
        ckpt.read_into(ref, out_words)
        return
    src = scratch[: ref.entry.numel].reshape(ref.shape)
    ckpt.read_into(ref, src)
    transpose_into(out_words, src)


def read_scales(ckpt, fmt, fields: dict[str, str]) -> np.ndarray:
    """One projection's scales as ``[out, in/group]`` in the stored dtype (BF16 as raw uint16)."""
    name = fields[fmt.scales]
    sc = ckpt.read(name)
    if sc.dtype == np.uint8:  # BF16: raw bytes -> uint16 words
        sc = sc.view(np.uint16).reshape(ckpt.ref(name).shape)
    return np.ascontiguousarray(sc.T if fmt.input_major else sc)


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
    rows = geo.w13_rows
    read_gate(out_words[slice(*rows["gate"])])
    read_up(out_words[slice(*rows["up"])])
    if geo.padded > geo.intermediate:
        padding = np.ones(len(out_words), dtype=bool)
        for start, stop in rows.values():
            padding[start:stop] = False
        out_words.view(np.uint32)[padding] = ZERO_WORD_U4B8
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


def read_role_scales(ckpt, fmt, names: list[str]) -> np.ndarray:
    """Several experts' scales of one projection as ``[n, out, in/group]`` in the stored dtype (BF16
    as raw uint16; a transposed view for input-major formats), one read per expert."""
    ref0 = ckpt.ref(names[0])
    dtype = np.dtype("<u2") if ref0.dtype == "BF16" else NUMPY_DTYPES[ref0.dtype]
    raw = np.empty((len(names),) + tuple(ref0.shape), dtype=dtype)
    for i, name in enumerate(names):
        ref = ckpt.ref(name)
        if (ref.dtype, ref.shape) != (ref0.dtype, ref0.shape):  # pragma: no cover - the planner checked
            raise AssertionError(f"{name}: {ref.dtype}{list(ref.shape)}, expected {ref0.dtype}{list(ref0.shape)}")
        ckpt.read_into(ref, raw[i])
    return raw.transpose(0, 2, 1) if fmt.input_major else raw


def layer_scales(stacks: dict[str, np.ndarray], geo: LayerGeometry, *, roles: tuple[str, ...],
                 src_groups: dict[str, int], src_dtype: str, dst_dtype: str) -> np.ndarray:
    """Stack, regroup, pad and cast the scales of some experts of one layer.

    ``stacks[role]`` holds those experts' scales as ``[n, out, in/src_group]`` (stored dtype).  For
    ``roles=("gate", "up")`` the result is ``[n, 2*padded, K/g13]``; for ``("down",)`` it is
    ``[n, K, padded/g2]``.  Experts are independent: any split of a layer gives the same bytes.
    """
    w13 = roles != ("down",)
    g_out = geo.g13 if w13 else geo.g2
    count = len(stacks[roles[0]])
    shape = (count,) + geo.shapes()[W13_SCALES if w13 else W2_SCALES][1:]
    # Nothing regrouped or cast: place the stored bits directly.  The float32 round trip this skips
    # is the identity on every F16 pattern and on every BF16 pattern but signalling NaNs, which
    # from_float32 makes quiet (| 0x40): so does the end of this path.  Padding is 0 bits either way.
    stored = src_dtype == dst_dtype and src_dtype in ("F16", "BF16") and all(src_groups[r] == g_out for r in roles)
    out = None
    for role in roles:
        s = stacks[role]
        if not stored:
            s = to_float32(s, src_dtype)
            if src_groups[role] > g_out:
                s = np.repeat(s, src_groups[role] // g_out, axis=2)
        if out is None:
            out = np.zeros(shape, dtype=s.dtype)
        if w13:
            out[:, slice(*geo.w13_rows[role])] = s
        else:
            out[:, :, : s.shape[2]] = s
    if not stored:
        return from_float32(out, dst_dtype)
    if dst_dtype == "BF16":
        u = out.view(np.uint16)
        nan = ((u & 0x7F80) == 0x7F80) & ((u & 0x7F) != 0)
        u[nan] |= 0x40
    return out


def linear_scales(stored: np.ndarray, *, src_group: int, group: int, src_dtype: str, dst_dtype: str) -> np.ndarray:
    """One linear's scales ``[out, in/src_group]`` (stored dtype, BF16 as uint16) as ``[out,
    in/group]`` in ``dst_dtype``: :func:`layer_scales` for one projection of one expert."""
    stacks = {"down": stored[None]}
    geo = LayerGeometry(1, stored.shape[0], stored.shape[1] * src_group, stored.shape[1] * src_group, group, group)
    return layer_scales(stacks, geo, roles=("down",), src_groups={"down": src_group}, src_dtype=src_dtype,
                        dst_dtype=dst_dtype)[0]


# ----------------------------------------------------------------------------- routers


def dequantize_router(qweight: np.ndarray, scales: np.ndarray, qzeros: np.ndarray | None, g_idx: np.ndarray | None,
                      checkpoint_format: str) -> np.ndarray:
    """A GPTQ-quantized router (``--dequantize-router``) as a float32 ``[out, in]`` weight.

    ``qweight`` int32 ``[in/8, out]``, ``scales`` float32 ``[groups, out]``, ``qzeros`` int32
    ``[groups, out/8]`` (v1 ``gptq`` stores zero - 1), ``g_idx`` ``[in]``:
    ``W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``.
    """
    qw = qweight.view(np.uint32)
    rows, n_out = qw.shape
    k = rows * 8
    codes = np.empty((k, n_out), dtype=np.float32)
    for j in range(8):
        codes[j::8] = (qw >> (4 * j)) & 0xF
    group = k // scales.shape[0]
    idx = np.arange(k) // group if g_idx is None else g_idx.astype(np.int64)
    if qzeros is None:
        zeros = np.full((scales.shape[0], n_out), 8, dtype=np.float32)
    else:
        qz = qzeros.view(np.uint32)
        zeros = np.empty((qz.shape[0], n_out), dtype=np.float32)
        for j in range(8):
            zeros[:, j::8] = (qz >> (4 * j)) & 0xF
        zeros += 1 if checkpoint_format == "gptq" else 0
    return ((codes - zeros[idx]) * scales[idx]).T
