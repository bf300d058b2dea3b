"""The verifier's own unpacking of int4 weights: GPTQ on one side, the XPU layout on the other.

This is the second, independent path of gptq2xpu: it is written from the layout contract
(``docs/contract.md``) alone and never imports the converter's repack code, so a mistake in one
path shows up as a disagreement with the other.

Every function takes torch tensors with any number of leading dimensions (usually experts) and
works on whatever device they live on.

Layouts, for one linear layer with input size K and output size N:

* **GPTQ** ``qweight`` is int32 ``[K/8, N]``: input row ``8r+j`` is bits ``4j..4j+3`` of row r.
  ``qzeros`` is int32 ``[G, N/8]`` packed the same way along N; ``scales`` is ``[G, N]``.
  Weight ``W[n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``.
* **XPU** packed bytes are uint8 ``[R, C/2]`` (output-major: R outputs, C inputs): byte j holds
  column ``2j`` in its low nibble and ``2j+1`` in its high nibble. Code q (0..15) means
  ``(q - 8) * scale``; ``scales`` is ``[R, C/group]``. The *encoding* says how nibbles are
  stored: ``"u4b8"`` stores q itself, ``"s4"`` stores the signed two's-complement nibble of
  ``q - 8``, which per byte is ``u4b8_byte ^ 0x88`` (what the kernel's ``implement_zp`` does).

Exactness: the dequantized value is computed so that it is the exact product rounded once to
the requested dtype. ``(q - zero)`` is an integer of at most 5 bits and an fp16/bf16 scale has at
most 11 significant bits, so the product is exact in float32; it is then rounded once. Both
dequantizers below follow that rule, so for the same codes and scales they agree bit for bit
(float32 scales are the one case where the float32 product itself rounds, identically on both).
So do their one-expert forms at the end of this module (:func:`gptq_dequant_kfirst`,
:class:`XpuRows`: byte lookup tables, reused buffers), which the streamed CPU reference
uses; they return float32, and rounding that once to the compute dtype gives the same bits.
"""

from __future__ import annotations

import torch

ENCODINGS = ("u4b8", "s4")

# Bit offsets of the 8 nibbles of an int32 word, lowest first.
_SHIFTS_32 = tuple(range(0, 32, 4))


def _nibbles_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Split each int32 into its 8 nibbles (lowest first), inserting the new axis after ``dim``.

    The input is read as unsigned bits. ``>>`` on int32 is an arithmetic shift (the sign bit is
    copied in from the left), but masking with ``0xF`` afterwards keeps exactly bits
    ``4j..4j+3`` of the original word, so the sign never leaks into a code.
    """
    if words.dtype != torch.int32:
        raise ValueError(f"packed GPTQ tensor must be int32, got {words.dtype}")
    shifts = torch.tensor(_SHIFTS_32, dtype=torch.int32, device=words.device)
    dim = dim % words.dim()
    w = words.unsqueeze(dim + 1)  # [..., X, 1, ...]
    view = [1] * w.dim()
    view[dim + 1] = 8
    return ((w >> shifts.view(view)) & 0xF).to(torch.uint8)


def gptq_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Unpack GPTQ ``qweight`` int32 ``[..., K/8, N]`` into uint8 codes ``[..., K, N]`` (0..15).

    Input row ``8r+j`` of the result is bits ``4j..4j+3`` of packed row r.

    Example, one word (K = 8, N = 1)::

        >>> gptq_codes(torch.tensor([[0x76543210]], dtype=torch.int32)).flatten().tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> # 0xFEDCBA98 is negative as int32; its bits still unpack as unsigned nibbles
        >>> gptq_codes(torch.tensor([[0xFEDCBA98 - 2**32]], dtype=torch.int32)).flatten().tolist()
        [8, 9, 10, 11, 12, 13, 14, 15]
    """
    if qweight.dim() < 2:
        raise ValueError(f"qweight must be at least 2-D [..., K/8, N], got shape {tuple(qweight.shape)}")
    nib = _nibbles_int32(qweight, dim=-2)  # [..., K/8, 8, N]
    *lead, rows, eight, n = nib.shape
    return nib.reshape(*lead, rows * eight, n)


def gptq_zeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """Unpack GPTQ ``qzeros`` int32 ``[..., G, N/8]`` into int32 zero points ``[..., G, N]``.

    Column ``8c+j`` is bits ``4j..4j+3`` of packed column c; ``zero_offset`` is added to every
    value: checkpoints in the v1 ``"gptq"`` format store ``zero - 1`` (offset 1), ``"gptq_v2"``
    stores the zero itself (offset 0).

    Example: a symmetric v1 checkpoint stores ``0x77777777``, which is zero 8 in every column::

        >>> gptq_zeros(torch.tensor([[0x77777777]], dtype=torch.int32), 1).tolist()
        [[8, 8, 8, 8, 8, 8, 8, 8]]
    """
    if qzeros.dim() < 2:
        raise ValueError(f"qzeros must be at least 2-D [..., G, N/8], got shape {tuple(qzeros.shape)}")
    nib = _nibbles_int32(qzeros, dim=-1)  # [..., G, N/8, 8]
    return nib.flatten(-2).to(torch.int32) + int(zero_offset)


def gptq_dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    *,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize a GPTQ layer into an output-major weight ``[..., N, K]`` (like ``nn.Linear.weight``).

    ``W[..., n, k] = (code[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]``, computed exactly in
    float32 and rounded once to ``dtype``.

    - ``qweight`` int32 ``[..., K/8, N]``; ``scales`` ``[..., G, N]`` (any float dtype);
    - ``qzeros`` int32 ``[..., G, N/8]``, or None for a symmetric layer with zero 8 everywhere;
    - ``g_idx`` ``[K]`` or ``[..., K]`` (the group of each input row), or None for
      ``arange(K) // (K / G)``; G = 1 is the "group -1" case (one group spanning all of K);
    - ``zero_offset``: added to the unpacked ``qzeros`` (1 for v1 "gptq", 0 for "gptq_v2").

    Example, one word with zero 8 and scale 0.5 (K = 8, N = 1)::

        >>> gptq_dequant(torch.tensor([[0x76543210]], dtype=torch.int32),
        ...              torch.tensor([[0.5]], dtype=torch.float16)).tolist()
        [[-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]]
    """
    codes = gptq_codes(qweight)  # [..., K, N]
    k, n = codes.shape[-2], codes.shape[-1]
    if scales.dim() < 2 or scales.shape[-1] != n:
        raise ValueError(f"scales must be [..., G, {n}], got shape {tuple(scales.shape)}")
    groups = scales.shape[-2]
    if g_idx is None:
        if groups == 0 or k % groups:
            raise ValueError(f"K={k} is not a multiple of the {groups} scale groups")
        g_idx = torch.arange(k, device=codes.device) // (k // groups)
    else:
        if g_idx.shape[-1] != k:
            raise ValueError(f"g_idx must have {k} entries along its last dim, got shape {tuple(g_idx.shape)}")
        g_idx = g_idx.to(device=codes.device, dtype=torch.int64)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"g_idx values must lie in [0, {groups}), got {int(g_idx.min())}..{int(g_idx.max())}")

    natural = g_idx.dim() == 1 and k % groups == 0 and torch.equal(
        g_idx, torch.arange(k, device=codes.device) // (k // groups))
    if natural:
        return _dequant_grouped(codes, scales, None if qzeros is None else gptq_zeros(qzeros, zero_offset), dtype)

    # Work output-major: [..., N, K].
    codes_t = codes.transpose(-1, -2).to(torch.int32)
    scales_t = scales.transpose(-1, -2).to(torch.float32)  # [..., N, G]
    if qzeros is None:
        zeros_t = None
    else:
        zeros = gptq_zeros(qzeros, zero_offset)  # [..., G, N]
        if zeros.shape[-2:] != scales.shape[-2:]:
            raise ValueError(
                f"qzeros unpack to {tuple(zeros.shape[-2:])} but scales are {tuple(scales.shape[-2:])}"
            )
        zeros_t = zeros.transpose(-1, -2)  # [..., N, G]

    def per_k(t: torch.Tensor) -> torch.Tensor:  # [..., N, G] -> [..., N, K]
        if g_idx.dim() == 1:
            return t.index_select(-1, g_idx)
        idx = g_idx.unsqueeze(-2).expand(*t.shape[:-1], k)
        return torch.gather(t, -1, idx)

    centred = codes_t - (8 if zeros_t is None else per_k(zeros_t))
    return (centred.to(torch.float32) * per_k(scales_t)).to(dtype)


def _dequant_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """Fast path of :func:`gptq_dequant` for rows in natural order (``g_idx == arange(K)//g``).

    The same exact float32 product ``(code - zero) * scale``, rounded once to ``dtype``, formed on
    a ``[..., N, G, g]`` view instead of gathering per-row scales: no index tensors, in-place ops.
    """
    groups = scales.shape[-2]
    grouped = codes.transpose(-1, -2).unflatten(-1, (groups, codes.shape[-2] // groups))  # [..., N, G, g]
    out = grouped.to(torch.float32)
    out -= 8.0 if zeros is None else zeros.transpose(-1, -2).unsqueeze(-1).to(torch.float32)
    out *= scales.transpose(-1, -2).unsqueeze(-1).to(torch.float32)
    return out.to(dtype).flatten(-2)


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown int4 encoding {encoding!r}; expected one of {ENCODINGS}")


def _signed_nibbles(packed: torch.Tensor, encoding: str) -> torch.Tensor:
    """XPU bytes ``[..., R, C/2]`` -> int8 ``q - 8`` values ``[..., R, C]`` (-8..7)."""
    _check_encoding(encoding)
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"packed XPU weights must be uint8, got {packed.dtype}")
    if packed.dim() < 2:
        raise ValueError(f"packed XPU weights must be at least 2-D [..., R, C/2], got {tuple(packed.shape)}")
    b = packed.view(torch.uint8)
    if encoding == "u4b8":
        b = b ^ 0x88  # offset-8 nibbles -> two's-complement nibbles of q - 8
    s = b.view(torch.int8)
    hi = s >> 4  # arithmetic shift: sign-extends the high nibble
    lo = (s << 4) >> 4  # move the low nibble up, then sign-extend it back down
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def xpu_codes(packed: torch.Tensor, encoding: str) -> torch.Tensor:
    """Unpack XPU bytes uint8 ``[..., R, C/2]`` into uint8 codes ``[..., R, C]`` (u4b8: 0..15).

    Byte j holds column ``2j`` in its low nibble and ``2j+1`` in its high nibble. Whatever the
    stored ``encoding`` ("u4b8" or "s4"), the result is in the u4b8 convention (value ``q - 8``).

    Example::

        >>> xpu_codes(torch.tensor([[0x21, 0xF0]], dtype=torch.uint8), "u4b8").tolist()
        [[1, 2, 0, 15]]
        >>> # the same codes stored as signed nibbles: 0x21 ^ 0x88 = 0xA9, 0xF0 ^ 0x88 = 0x78
        >>> xpu_codes(torch.tensor([[0xA9, 0x78]], dtype=torch.uint8), "s4").tolist()
        [[1, 2, 0, 15]]
    """
    _check_encoding(encoding)
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"packed XPU weights must be uint8, got {packed.dtype}")
    b = packed.view(torch.uint8)
    if encoding == "s4":
        b = b ^ 0x88
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


def xpu_dequant(
    packed: torch.Tensor,
    scales: torch.Tensor,
    encoding: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize XPU bytes uint8 ``[..., R, C/2]`` with ``scales`` ``[..., R, C/group]`` to ``[..., R, C]``.

    Value ``(q - 8) * scale`` with group ``C / scales.shape[-1]``, rounded once to ``dtype``.
    When ``scales`` already has ``dtype`` the product is formed directly in that dtype (torch
    multiplies 16-bit floats in float32 and rounds once, so this is the same single rounding of
    the exact product, without a float32 intermediate); otherwise it goes through float32.

    Example, one byte, scale 0.25::

        >>> xpu_dequant(torch.tensor([[0x9F]], dtype=torch.uint8),
        ...             torch.tensor([[0.25]], dtype=torch.float16), "u4b8").tolist()
        [[1.75, 0.25]]
    """
    vals = _signed_nibbles(packed, encoding)  # int8 [..., R, C]
    c = vals.shape[-1]
    if scales.dim() != vals.dim() or scales.shape[:-1] != vals.shape[:-1]:
        raise ValueError(
            f"scales {tuple(scales.shape)} do not match packed weights {tuple(packed.shape)}: "
            f"expected [..., {vals.shape[-2]}, C/group]"
        )
    groups = scales.shape[-1]
    if groups == 0 or c % groups:
        raise ValueError(f"C={c} is not a multiple of the {groups} scale groups")
    grouped = vals.unflatten(-1, (groups, c // groups))  # [..., R, G, group]
    if scales.dtype == dtype:
        out = grouped * scales.unsqueeze(-1)
    else:
        out = (grouped * scales.to(torch.float32).unsqueeze(-1)).to(dtype)
    return out.flatten(-2)


# --------------------------------------------------------------------------- one expert, fast
#
# The reference MoE on a CPU dequantizes one expert at a time into buffers it reuses (see
# :mod:`gptq2xpu.verify.experts`). These two functions compute the same values as
# :func:`gptq_dequant` and :func:`xpu_dequant` (float32 output), bit for bit, with fewer passes:
#
# * a byte -> value lookup table replaces the shift / mask / stack passes: every packed byte is
#   widened to an int32 index once and ``index_select`` reads its two nibbles' values (small
#   integers, exact in float32) from a 256-entry table;
# * the result is written into a caller's buffer (``out``), so no fresh allocation per expert.
#
# The exactness argument above holds unchanged: the table entries are the exact integers
# ``q - 8`` (XPU) or ``q - zero`` (GPTQ, when one zero point holds for the whole expert;
# otherwise ``q`` and the zero points are subtracted as float32, exactly), and they are then
# multiplied by the float32 scale once: the same single rounding as the plain functions, which
# the tests check bit for bit (tests/test_verify_streamed.py).
#
# GPTQ words are read as their four little-endian bytes (byte b of word ``qweight[r, n]`` holds
# inputs ``8r+2b`` (low nibble) and ``8r+2b+1`` (high)), so these paths need a little-endian
# host; :func:`fast_unpack_supported` says whether they apply.

_FAST_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fast_unpack_supported() -> bool:
    """Whether the lookup-table dequantizers below may be used here (little-endian host)."""
    import sys

    return sys.byteorder == "little"


def _nibble_tables(minus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float32 tables (viewed as int32 for ``index_select``): byte -> low nibble - minus, high nibble - minus."""
    b = torch.arange(256, dtype=torch.int32)
    lo = ((b & 0xF) - minus).to(torch.float32)
    hi = ((b >> 4) - minus).to(torch.float32)
    return lo.view(torch.int32), hi.view(torch.int32)


def _pair_table(encoding: str) -> torch.Tensor:
    """XPU byte -> its two values ``(q_low - 8, q_high - 8)`` as adjacent float32s, viewed as int64."""
    _check_encoding(encoding)
    b = torch.arange(256, dtype=torch.int32)
    if encoding == "s4":
        b = b ^ 0x88  # stored two's-complement nibbles of q - 8 -> the u4b8 codes q
    pairs = torch.stack(((b & 0xF) - 8, (b >> 4) - 8), dim=-1).to(torch.float32).contiguous()  # [256, 2]
    return pairs.view(torch.int64).view(256)


_TABLES: dict = {}


def _table(kind: str, arg, device):
    """A cached lookup table (``"nibbles"``: :func:`_nibble_tables`, ``"pairs"``: :func:`_pair_table`) on ``device``."""
    key = (kind, arg, str(device))
    if key not in _TABLES:
        table = _nibble_tables(arg) if kind == "nibbles" else _pair_table(arg)
        _TABLES[key] = tuple(t.to(device) for t in table) if kind == "nibbles" else table.to(device)
    return _TABLES[key]


def kfirst_order(k: int) -> torch.Tensor:
    """The input index of each row of :func:`gptq_dequant_kfirst`'s output (int64 ``[K]``).

    Row ``(h * 4 + b) * (K/8) + r`` holds input ``8r + 2b + h``: the low nibbles (h = 0) of byte
    b of every packed row r, then the high nibbles, so each row is one ``index_select`` over the
    bytes in their stored order. ``x[:, kfirst_order(K)] @ w_t`` is then ``x @ W.T``.
    """
    if k % 8:
        raise ValueError(f"K={k} is not a multiple of 8")
    h, b, r = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(k // 8), indexing="ij")
    return (8 * r + 2 * b + h).flatten()


def gptq_dequant_kfirst(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    *,
    zero_offset: int = 1,
    out: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One GPTQ layer dequantized in its own input-major order: float32 ``[K, N]``, rows in
    :func:`kfirst_order` (``out[i] == gptq_dequant(...)[:, kfirst_order(K)[i]]``, bit for bit).

    Same arguments as :func:`gptq_dequant` for one layer (``qweight [K/8, N]``, ``scales [G, N]``,
    ``qzeros [G, N/8]`` or None, ``g_idx [K]`` or None). ``out`` (float32 ``[K, N]``, contiguous)
    and ``index`` (int32 ``[K/2 * N]``) are optional buffers to reuse. :class:`GptqKFirst` does the
    same expert after expert of a stacked layer, with the per-layer work done once.

    No transposition of the weights: GEMMs use ``x[:, kfirst_order(K)] @ out`` instead, which
    permutes the (few) activation columns rather than the (many) weight values.
    """
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [K/8, N], got {qweight.dtype} {tuple(qweight.shape)}")
    one = GptqKFirst(qweight.unsqueeze(0), scales.unsqueeze(0) if scales.dim() == 2 else scales,
                     None if qzeros is None else qzeros.unsqueeze(0),
                     None if g_idx is None else g_idx.unsqueeze(0) if g_idx.dim() == 1 else g_idx,
                     zero_offset=zero_offset)
    return one(0, out=out, index=index)


class GptqKFirst:
    """:func:`gptq_dequant_kfirst` for one expert at a time of a stacked GPTQ projection:
    ``qweight [E, K/8, N]``, ``scales [E, G, N]``, ``qzeros [E, G, N/8]`` or None, ``g_idx [E, K]``
    or None. What holds for the whole layer is worked out once, here: the zero points (and
    whether one value holds for all of them, then folded into the byte table), whether ``g_idx``
    is the natural ``arange(K) // g`` (then rows are scaled as groups), else each row's group."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None = None,
                 g_idx: torch.Tensor | None = None, *, zero_offset: int = 1):
        if qweight.dtype != torch.int32 or qweight.dim() != 3:
            raise ValueError(f"qweight must be int32 [E, K/8, N], got {qweight.dtype} {tuple(qweight.shape)}")
        if not fast_unpack_supported():
            raise RuntimeError("GptqKFirst reads int32 words as little-endian bytes")
        e, rows, n = qweight.shape
        k = rows * 8
        if scales.dim() != 3 or scales.shape[0] != e or scales.shape[-1] != n:
            raise ValueError(f"scales must be [{e}, G, {n}], got shape {tuple(scales.shape)}")
        if scales.dtype not in _FAST_SCALE_DTYPES:
            raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
        groups = scales.shape[1]
        if groups == 0 or (g_idx is None and k % groups):
            raise ValueError(f"K={k} is not a multiple of the {groups} scale groups")
        dev = qweight.device
        natural_idx = torch.arange(k, device=dev) // (k // groups) if k % groups == 0 else None
        if g_idx is not None:
            if g_idx.shape != (e, k):
                raise ValueError(f"g_idx must have shape ({e}, {k}), got {tuple(g_idx.shape)}")
            g_idx = g_idx.to(device=dev, dtype=torch.int64)
            if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise ValueError(f"g_idx values must lie in [0, {groups}), got {int(g_idx.min())}..{int(g_idx.max())}")
        zeros = None if qzeros is None else gptq_zeros(qzeros, zero_offset)  # int32 [E, G, N]
        if zeros is not None and zeros.shape != scales.shape:
            raise ValueError(f"qzeros unpack to {tuple(zeros.shape)} but scales are {tuple(scales.shape)}")
        # one zero point for the whole layer (symmetric checkpoints): fold it into the table
        first = None if zeros is None else zeros.flatten()[:1]
        self.uniform = 8 if zeros is None else (int(first) if bool((zeros == first).all()) else None)
        self.zeros = None if self.uniform is not None else zeros.to(torch.float32)
        self.lo, self.hi = _table("nibbles", 0 if self.uniform is None else self.uniform, dev)
        self.natural = (k // groups) % 8 == 0 and natural_idx is not None and (
            g_idx is None or torch.equal(g_idx, natural_idx.expand(e, k)))
        self.per_row = None
        if not self.natural:  # the group of each output row, per expert
            per_k = natural_idx.expand(e, k) if g_idx is None else g_idx
            self.per_row = per_k.index_select(1, kfirst_order(k).to(dev))
        self.qweight, self.scales = qweight, scales.to(torch.float32)
        self.shape, self.groups = (k, n), groups

    def __call__(self, e: int, *, out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e``: float32 ``[K, N]``, rows in :func:`kfirst_order`, into ``out`` if given."""
        (k, n), groups = self.shape, self.groups
        rows = k // 8
        dev = self.qweight.device
        if out is None:
            out = torch.empty(k, n, dtype=torch.float32, device=dev)
        if out.shape != (k, n) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [{k}, {n}] buffer")
        if index is None or index.numel() != k // 2 * n:
            index = torch.empty(k // 2 * n, dtype=torch.int32, device=dev)
        # bytes [K/8, N, 4] (byte b of each word) -> int32 indices in row order (b, r, n)
        index.view(4, rows, n).copy_(self.qweight[e].view(torch.uint8).view(rows, n, 4).permute(2, 0, 1))
        flat = out.view(torch.int32).view(2, k // 2 * n)
        torch.index_select(self.lo, 0, index, out=flat[0])
        torch.index_select(self.hi, 0, index, out=flat[1])
        sc = self.scales[e]  # float32 [G, N]
        if self.natural:
            # row (h, b, r) holds input 8r+2b+h, whose group is r // (g/8): a [.., G, g/8, N] view
            grouped = out.view(8, groups, rows // groups, n)
            if self.zeros is not None:
                grouped -= self.zeros[e].unsqueeze(1)
            grouped *= sc.unsqueeze(1)
        else:
            per_row = self.per_row[e]
            if self.zeros is not None:
                out -= self.zeros[e].index_select(0, per_row)
            out *= sc.index_select(0, per_row)
        return out


class XpuRows:
    """:func:`xpu_dequant` to float32, one expert at a time of stacked XPU bytes ``[E, R, C/2]`` with
    ``scales [E, R, G]``, by a byte table (validated, scales made float32 and the table chosen once);
    equal to ``xpu_dequant`` bit for bit."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, encoding: str):
        if packed.dtype not in (torch.uint8, torch.int8) or packed.dim() != 3:
            raise ValueError(f"packed XPU weights must be uint8 [E, R, C/2], got {packed.dtype} {tuple(packed.shape)}")
        e, r, half = packed.shape
        if scales.dim() != 3 or scales.shape[:2] != (e, r):
            raise ValueError(f"scales {tuple(scales.shape)} do not match packed weights {tuple(packed.shape)}")
        if scales.dtype not in _FAST_SCALE_DTYPES:
            raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
        groups = scales.shape[2]
        if groups == 0 or 2 * half % groups:
            raise ValueError(f"C={2 * half} is not a multiple of the {groups} scale groups")
        self.table = _table("pairs", encoding, packed.device)
        self.packed, self.scales = packed.view(torch.uint8), scales.to(torch.float32)
        self.shape, self.groups = (r, 2 * half), groups

    def __call__(self, e: int, *, out: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e``: float32 ``[R, C]``, into ``out`` if given."""
        (r, c), groups = self.shape, self.groups
        dev = self.packed.device
        if out is None:
            out = torch.empty(r, c, dtype=torch.float32, device=dev)
        if out.shape != (r, c) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [{r}, {c}] buffer")
        if index is None or index.numel() != r * c // 2:
            index = torch.empty(r * c // 2, dtype=torch.int32, device=dev)
        index.view(r, c // 2).copy_(self.packed[e])
        torch.index_select(self.table, 0, index, out=out.view(torch.int64).view(r * c // 2))
        out.view(r, groups, c // groups).mul_(self.scales[e].unsqueeze(-1))
        return out
