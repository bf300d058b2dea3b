"""Bit-exact proof that a converted checkpoint holds its source's codes, zero points and scales.

Written from the format definitions, not from the converter's code, for every expert of every
converted layer:

* GPTQ word ``qweight[r, n]`` holds inputs ``8r..8r+7`` of output ``n``, input ``8r+j`` in bits
  ``4j..4j+3``; as little-endian bytes, byte ``b`` holds inputs ``8r+2b`` (low nibble) and
  ``8r+2b+1`` (high).  The XPU row ``n`` byte ``j`` holds inputs ``2j`` (low) and ``2j+1`` (high).
  So XPU byte ``[n, 4r+b]`` must equal GPTQ byte ``b`` of word ``[r, n]`` -- both nibbles at once
  (``^ 0x88`` for the s4 encoding).  compressed-tensors rows are already XPU rows.
* the source's zero points, unpacked nibble by nibble, must all be 8 after the format's offset
  (v1 stores zero-1), and ``g_idx`` must be ``arange(K)//g``;
* scales: XPU ``[n, j]`` must equal the source scale of the group that holds input ``j*g_out``,
  cast to the recorded dtype by torch (round to nearest even); where the dtypes differ, each
  output scale, decoded from its bits, must also lie within one rounding of the source's own
  value (``|out - src| <= u * |src|``, float64): a cast that loses a scale (one that underflows
  to 0 in float16) is a failure even where torch's cast agrees bit for bit;
* padding rows/columns (tensor-parallel padding) must be code 8 with scale 0;
* a sample of experts (``--exhaustive``: every expert) is also decoded nibble by nibble through
  :mod:`.unpack`, every output and input, and the codes compared: a second, independent reading
  of the layout beside the byte comparison of every byte of every expert;
* every other tensor must be byte-identical to the source tensor of the same name.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from ..contract import EXPERT_TENSORS, ConvertedBlock, ConvertedLayer
from ..errors import InputError
from ..read.checkpoint import Checkpoint
from ..safetensors_io import NUMPY_DTYPES

ROLES = ("gate", "up", "down")
_SYM_ZERO = 8
#: Outputs decoded at a time by the nibble cross-check (bounds its temporary tensors).
CROSS_CHECK_BAND = 256


def _read_slice(ckpt: Checkpoint, name: str, index: int, shape: tuple[int, ...],
                buf: np.ndarray | None = None) -> np.ndarray:
    """Row ``index`` of the leading dim of a U8 tensor, as ``shape`` (into ``buf`` when it fits)."""
    ref = ckpt.ref(name)
    size = int(np.prod(shape))
    if buf is None or buf.nbytes != size:
        buf = np.empty(size, dtype=np.uint8)
    ckpt.read_into(ref, buf, offset=index * size)
    return buf.reshape(shape)


def _transpose_words(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` in bands of 32 source rows: a plain transposed copy reads a word from
    every source row in turn, and rows 4 KiB apart (K = 2048: 8 KiB) evict each other from L1."""
    band = 32
    for r in range(0, src.shape[0], band):
        np.copyto(dst[:, r : r + band], src[r : r + band].T)


def _same_bytes_2d(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` of two uint8 matrices, four bytes at a time where the rows allow it."""
    if a.shape == b.shape and a.shape[1] % 4 == 0 and a.strides[1] == 1 and b.strides[1] == 1:
        return np.array_equal(a.view(np.uint32), b.view(np.uint32))
    return np.array_equal(a, b)


def _stacked_raw(ckpt: Checkpoint, names: list[str]) -> tuple[str, np.ndarray]:
    """Several tensors of one dtype and shape, stored values ``[len(names), *shape]`` (BF16 as
    uint16), and that dtype."""
    ref0 = ckpt.ref(names[0])
    item = np.dtype("<u2") if ref0.dtype == "BF16" else NUMPY_DTYPES[ref0.dtype]
    raw = np.empty((len(names),) + tuple(ref0.shape), dtype=item)
    for i, name in enumerate(names):
        ref = ckpt.ref(name)
        if (ref.dtype, ref.shape) != (ref0.dtype, ref0.shape):
            raise ValueError(f"{name}: {ref.dtype}{list(ref.shape)} differs from {ref0.name}")
        ckpt.read_into(ref, raw[i])
    return ref0.dtype, raw


def _finite_16(values: np.ndarray, dtype: str) -> bool:
    """No infinity or NaN among F16/BF16 ``values`` (stored bits: all exponent bits set)."""
    exponent = np.uint16(0x7C00 if dtype == "F16" else 0x7F80)
    return not bool(((values.view(np.uint16) & exponent) == exponent).any())


def _scales_f32_from_raw(dtype: str, raw: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        torch = _torch()
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()
    return raw.astype(np.float32)


def _scales_f32(ckpt: Checkpoint, name: str) -> np.ndarray:
    torch = _torch()

    ref = ckpt.ref(name)
    raw = ckpt.read(name)
    if ref.dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16).reshape(ref.shape).copy()).view(torch.bfloat16).float().numpy()
    return raw.astype(np.float32)


#: Unit roundoff of the recorded scale dtypes (float16: 11 significant bits, bfloat16: 8).
_ROUNDOFF = {"F16": 2.0**-11, "BF16": 2.0**-8}


def _decode_16(bits: np.ndarray, dtype: str) -> np.ndarray:
    """F16/BF16 bit patterns (uint16) -> their values in float64, by the formats' definitions."""
    if dtype == "F16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _beyond_one_rounding(got_bits: np.ndarray, dtype: str, source: np.ndarray) -> np.ndarray:
    """Where output scales ``got_bits`` (``dtype``) differ from the source's own values ``source``
    (any float dtype) by more than one rounding to ``dtype`` of a number in its normal range."""
    got = _decode_16(np.ascontiguousarray(got_bits), dtype)
    src = source.astype(np.float64)
    with np.errstate(invalid="ignore"):
        return ~((got == src) | (np.abs(got - src) <= _ROUNDOFF[dtype] * np.abs(src)))


def _cast_bits(values_f32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the 16-bit patterns torch produces for ``dtype`` (F16/BF16)."""
    torch = _torch()

    t = torch.from_numpy(np.ascontiguousarray(values_f32))
    t = t.to(torch.float16 if dtype == "F16" else torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


class LayerBits:
    """Bit-exact comparison of one converted layer against its source tensors."""

    def __init__(self, src: Checkpoint, out: Checkpoint, prefix: str, info: ConvertedLayer, block: ConvertedBlock):
        self.src, self.out, self.prefix, self.info = src, out, prefix, info
        self.e, self.k = info.experts, info.hidden_size
        self.n, self.p = info.intermediate_size, info.padded_intermediate_size
        self.g13, self.g2 = info.w13_group_size, info.w2_group_size
        self.fmt = info.source_format
        self.proj = info.source_projections
        self.xor = 0x88 if block.nibble_encoding == "s4" else 0
        self.ckpt_format = block.checkpoint_format
        self.scale_dtype = info.scale_dtype
        self.problems: list[str] = []
        self._words: dict[tuple[int, int], np.ndarray] = {}   # expected-rows buffers, by shape
        self._bufs: dict[str, np.ndarray] = {}                # read buffers, reused expert after expert
        self._aranges: dict[tuple[int, int], np.ndarray] = {}

    def _buffer(self, key: str, nbytes: int) -> np.ndarray:
        buf = self._bufs.get(key)
        if buf is None or buf.nbytes != nbytes:
            buf = self._bufs[key] = np.empty(nbytes, dtype=np.uint8)
        return buf

    def _read_src(self, name: str) -> np.ndarray:
        """A source tensor into a buffer reused for the next one (compare before reading again)."""
        ref = self.src.ref(name)
        buf = self._buffer("src", ref.nbytes)
        self.src.read_into(ref, buf)
        dt = NUMPY_DTYPES.get(ref.dtype)
        return buf if dt is None else buf.view(dt).reshape(ref.shape)

    def name(self, e: int, role: str, field: str) -> str:
        return f"{self.prefix}.experts.{e}.{self.proj[role]}.{field}"

    def bad(self, msg: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"{self.prefix}: {msg}")

    # --- codes ----------------------------------------------------------------------
    def expected_rows(self, e: int, role: str, out: np.ndarray | None = None) -> np.ndarray:
        """XPU bytes [out, in/2] derived from the source's own bit layout (into ``out`` when given:
        a uint32 buffer of the transposed shape, reused across experts)."""
        if self.fmt == "compressed-tensors":
            wp = self._read_src(self.name(e, role, "weight_packed"))
            rows = wp.view(np.uint8).reshape(wp.shape[0], wp.shape[1] * 4)
        else:
            q = self._read_src(self.name(e, role, "qweight"))         # [in/8, out] int32 (the planner's check)
            # byte b of word [r, n] goes to [n, 4r+b]: the four bytes of a word move together,
            # so as little-endian words the XPU row n is column n of the source words
            words = out if out is not None and out.shape == q.shape[::-1] else np.empty(q.shape[::-1], np.uint32)
            _transpose_words(words, q.view(np.uint32))
            if self.xor:
                np.bitwise_xor(words, np.uint32(self.xor * 0x01010101), out=words)
            return words.view(np.uint8).reshape(q.shape[1], q.shape[0] * 4)
        return rows ^ np.uint8(self.xor) if self.xor else rows

    def check_codes(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        k, n, p = self.k, self.n, self.p
        w13 = _read_slice(self.out, f"{self.prefix}.experts.w13_qweight", e, (2 * p, k // 2),
                          self._bufs.get("w13"))
        w2 = _read_slice(self.out, f"{self.prefix}.experts.w2_qweight", e, (k, p // 2), self._bufs.get("w2"))
        self._bufs["w13"], self._bufs["w2"] = w13.reshape(-1), w2.reshape(-1)
        pad = np.uint8(0x88 ^ self.xor)
        for role, got in (("gate", w13[:n]), ("up", w13[p : p + n]), ("down", w2[:, : n // 2])):
            buf = self._words.get(got.shape)
            if buf is None and got.shape[1] % 4 == 0:
                buf = self._words[got.shape] = np.empty((got.shape[0], got.shape[1] // 4), np.uint32)
            want = self.expected_rows(e, role, buf)
            if want.shape != got.shape:
                self.bad(f"expert {e} {role}: shape {got.shape} vs source {want.shape}")
                continue
            if not _same_bytes_2d(want, got):
                r, c = np.argwhere(want != got)[0]
                self.bad(f"expert {e} {role}: byte [{r}, {c}] is 0x{int(got[r, c]):02X}, "
                         f"source says 0x{int(want[r, c]):02X}")
        if p > n and not all((rows == pad).all() for rows in (w13[n:p], w13[p + n :], w2[:, n // 2 :])):
            self.bad(f"expert {e}: padding is not code 8 (weight 0)")
        return w13, w2

    def check_zero_points(self, e: int) -> None:
        ct = self.fmt == "compressed-tensors"
        if self.fmt != "gptq" and not ct:
            return
        offset = 1 if self.ckpt_format == "gptq" else 0
        for role in ROLES:
            zname = self.name(e, role, "weight_zero_point" if ct else "qzeros")
            if zname in self.src.tensors:
                z = self.src.read(zname)
                if ct and z.dtype != np.int32:  # unpacked: the zero point itself, symmetric = 0
                    if z.dtype == np.uint8 or (z != 0).any():
                        self.bad(f"{zname}: zero points are not the symmetric 0 (compressed-tensors)")
                    continue
                # GPTQ: v1 stores zero - 1; compressed-tensors packs zero + 8 (symmetric zero 0 -> 8).
                # Every nibble of every word must be 8 - offset: the word is that nibble 8 times.
                nibble = _SYM_ZERO - (0 if ct else offset)
                if not (z.view(np.uint32) == np.uint32(nibble * 0x11111111)).all():
                    self.bad(f"{zname}: zero points are not the symmetric 8 ({self.ckpt_format})")
            gname = self.name(e, role, "weight_g_idx" if ct else "g_idx")
            if gname in self.src.tensors:
                gi = self.src.read(gname)
                k_in = gi.shape[0] if gi.ndim else 0
                groups = self.info.source_group_size[role]
                want = self._aranges.get((k_in, groups))
                if want is None:
                    want = self._aranges[(k_in, groups)] = np.arange(k_in) // groups
                if not np.array_equal(gi, want):
                    self.bad(f"{gname}: rows reordered; cannot be converted")

    # --- scales ---------------------------------------------------------------------
    def check_scales(self) -> None:
        s13 = self.out.read(f"{self.prefix}.experts.w13_scales")
        s2 = self.out.read(f"{self.prefix}.experts.w2_scales")
        s13 = s13.view(np.uint16).reshape(self.out.ref(f"{self.prefix}.experts.w13_scales").shape)
        s2 = s2.view(np.uint16).reshape(self.out.ref(f"{self.prefix}.experts.w2_scales").shape)
        field = "weight_scale" if self.fmt == "compressed-tensors" else "scales"
        if self._scales_all_equal(s13, s2, field):
            return
        n, p = self.n, self.p  # something differs: expert by expert, for the messages
        for e in range(self.e):
            for role, got, g_out, cols in (("gate", s13[e, :n], self.g13, self.k),
                                           ("up", s13[e, p : p + n], self.g13, self.k),
                                           ("down", s2[e, :, : n // self.g2], self.g2, n)):
                src = _scales_f32(self.src, self.name(e, role, field))
                per_out = src if self.fmt == "compressed-tensors" else src.T      # [out, groups_in]
                g_in = cols // per_out.shape[1]
                # XPU group j starts at input j*g_out, which lies in source group (j*g_out)//g_in
                idx = (np.arange(cols // g_out) * g_out) // g_in
                want = _cast_bits(per_out[:, idx], self.scale_dtype)
                if not np.array_equal(want, got):
                    r, c = np.argwhere(want != got)[0]
                    self.bad(f"expert {e} {role} scales [{r}, {c}]: 0x{int(got[r, c]):04X}, "
                             f"source gives 0x{int(want[r, c]):04X}")
                elif self.src.ref(self.name(e, role, field)).dtype != self.scale_dtype:
                    lost = _beyond_one_rounding(got, self.scale_dtype, per_out[:, idx])
                    if lost.any():
                        r, c = np.argwhere(lost)[0]
                        value = _decode_16(got[r, c : c + 1], self.scale_dtype)[0]
                        self.bad(f"expert {e} {role} scales [{r}, {c}]: {value:.6g} where the source's own "
                                 f"scale is {float(per_out[r, idx[c]]):.6g}: more than one "
                                 f"rounding to {self.scale_dtype} apart (the cast lost it)")
            if p > n and any((pad != 0).any() for pad in (s13[e, n:p], s13[e, p + n :], s2[e, :, n // self.g2 :])):
                self.bad(f"expert {e}: padding scales are not 0")

    def _scales_all_equal(self, s13: np.ndarray, s2: np.ndarray, field: str) -> bool:
        """The same comparison as the per-expert loop, one projection of every expert at once.

        Where the source stores the recorded dtype already, casting a finite value to float32 and
        back gives its own bits (F16 and BF16 both embed exactly in float32): those are compared as
        they are, without torch.  Anything else (another dtype, a NaN or infinity) takes torch's
        cast, as the per-expert loop does."""
        n, p = self.n, self.p
        if p > n and ((s13[:, n:p] != 0).any() or (s13[:, p + n :] != 0).any()
                      or (s2[:, :, n // self.g2 :] != 0).any()):
            return False
        for role, got, g_out, cols in (("gate", s13[:, :n], self.g13, self.k),
                                       ("up", s13[:, p : p + n], self.g13, self.k),
                                       ("down", s2[:, :, : n // self.g2], self.g2, n)):
            try:
                dtype, raw = _stacked_raw(self.src, [self.name(e, role, field) for e in range(self.e)])
            except (InputError, KeyError, ValueError):  # missing, or shaped differently: the loop says which
                return False
            per_out = raw if self.fmt == "compressed-tensors" else raw.transpose(0, 2, 1)  # [E, out, groups_in]
            if per_out.shape[1] != got.shape[1] or per_out.shape[2] == 0 or cols % per_out.shape[2]:
                return False
            g_in = cols // per_out.shape[2]
            idx = (np.arange(cols // g_out) * g_out) // g_in
            if idx.size and idx[-1] >= per_out.shape[2]:
                return False
            if dtype == self.scale_dtype and _finite_16(raw, dtype):
                want = per_out[:, :, idx].view(np.uint16)
            else:
                own = _scales_f32_from_raw(dtype, per_out)[:, :, idx]
                want = _cast_bits(own, self.scale_dtype)
                if dtype != self.scale_dtype and _beyond_one_rounding(got, self.scale_dtype, own).any():
                    return False
            if not np.array_equal(want, got):
                return False
        return True

    def cross_check_nibbles(self, e: int, w13: np.ndarray, w2: np.ndarray, encoding: str) -> None:
        """Decode expert ``e`` nibble by nibble on both sides (independent unpack path), every output
        of each projection, a band of :data:`CROSS_CHECK_BAND` outputs at a time."""
        torch = _torch()

        from .unpack import gptq_codes, xpu_codes

        n, p = self.n, self.p
        for role, got in (("gate", w13[:n]), ("up", w13[p : p + n]), ("down", w2[:, : n // 2])):
            rows = got.shape[0]
            bands = [(r, min(r + CROSS_CHECK_BAND, rows)) for r in range(0, rows, CROSS_CHECK_BAND)]
            if self.fmt == "compressed-tensors":
                packed = self.src.read(self.name(e, role, "weight_packed")).view(np.uint8)
            else:
                qweight = self.src.read(self.name(e, role, "qweight"))
            for r0, r1 in bands:
                conv = xpu_codes(torch.from_numpy(np.ascontiguousarray(got[r0:r1])), encoding)  # [rows, in]
                if self.fmt == "compressed-tensors":
                    src = xpu_codes(torch.from_numpy(np.ascontiguousarray(packed[r0:r1])), "u4b8")
                else:
                    src = gptq_codes(torch.from_numpy(np.ascontiguousarray(qweight[:, r0:r1]))).T  # [rows, in]
                if not torch.equal(conv, src):
                    r, c = (conv != src).nonzero()[0].tolist()
                    self.bad(f"expert {e} {role}: code [{r0 + r}, {c}] decodes to {int(conv[r, c])}, "
                             f"source {int(src[r, c])}")
                    break


_FLOAT_SCALES = ("F16", "BF16", "F32")


def source_header_problems(src: Checkpoint, layer: ConvertedLayer) -> list[str]:
    """Where SOURCE's headers disagree with what the config block says of ``layer`` (experts, K, N,
    projection names, source format and group sizes): the shapes every later read and every
    reshape of the byte checks and the reference MoE rely on.  Empty when they agree."""
    k, n = layer.hidden_size, layer.intermediate_size
    ct = layer.source_format == "compressed-tensors"
    problems: list[str] = []
    for e in range(layer.experts):
        for role, (ins, outs) in (("gate", (k, n)), ("up", (k, n)), ("down", (n, k))):
            base = f"{layer.prefix}.experts.{e}.{layer.source_projections[role]}."
            g = layer.source_group_size[role]
            if ins % 8 or ins % g:
                return [f"{base}*: input size {ins} is not a multiple of 8 and of the group size {g} the block records"]
            want = ({"weight_packed": (("I32",), (outs, ins // 8)), "weight_scale": (_FLOAT_SCALES, (outs, ins // g))}
                    if ct else
                    {"qweight": (("I32",), (ins // 8, outs)), "scales": (_FLOAT_SCALES, (ins // g, outs)),
                     "qzeros": (("I32",), (ins // g, outs // 8)), "g_idx": (("I32", "I64"), (ins,))})
            for field, (dtypes, shape) in want.items():
                ref = src.tensors.get(base + field)
                if ref is None:
                    if field in ("qzeros", "g_idx"):
                        continue
                    problems.append(f"{base + field}: missing from SOURCE")
                elif ref.dtype not in dtypes or tuple(ref.shape) != shape:
                    problems.append(f"{base + field}: {ref.dtype}{list(ref.shape)} in SOURCE, the config block "
                                    f"implies {'/'.join(dtypes)}{list(shape)}")
            if problems:
                return problems[:3]
    extra = f"{layer.prefix}.experts.{layer.experts}.{layer.source_projections['gate']}."
    if extra + ("weight_packed" if ct else "qweight") in src.tensors:
        problems.append(f"{layer.prefix}: SOURCE has more experts than the {layer.experts} the config block records")
    return problems


def sample_experts(num: int, count: int = 4) -> list[int]:
    """A deterministic spread of expert ids: first, last and evenly spaced ones between."""
    if num <= count or count < 2:
        return list(range(min(num, count)))
    return sorted({round(i * (num - 1) / (count - 1)) for i in range(count)})


_torch_prefetch = threading.Lock()
_torch_threads_lock = threading.Lock()
_torch_threads: int | None = None   # torch's intra-op threads before the byte checks set them to 1


def _torch():
    """torch, running its operations on the calling thread only.

    The byte checks run one layer per thread and hand torch small tensors (a band of rows, one
    layer's scales): there torch's own thread pool costs far more than it brings -- 2.1 ms against
    0.15 ms per decode on 2 cores, and 16 checking threads each waking 16 pool threads on 16 cores.
    :func:`restore_torch_threads` puts the pool back for what follows (the reference MoE)."""
    global _torch_threads
    import torch

    if _torch_threads is None:
        with _torch_threads_lock:
            if _torch_threads is None:
                _torch_threads = torch.get_num_threads()
                torch.set_num_threads(1)
    return torch


def restore_torch_threads() -> None:
    """Undo :func:`_torch` once the byte checks are done."""
    global _torch_threads
    with _torch_threads_lock:
        if _torch_threads is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(_torch_threads)
        _torch_threads = None


def _import_torch_in_background() -> None:
    """Start importing torch (about a second) while the numpy byte checks run."""
    if "torch" in sys.modules or not _torch_prefetch.acquire(blocking=False):
        return  # imported, or already being imported; the lock is never released: once is enough

    def run():
        # an error here is raised again by the foreground import, where torch is used
        with contextlib.suppress(Exception):
            _torch()

    threading.Thread(target=run, name="gptq2xpu-import-torch", daemon=True).start()


def check_layer_bits(src, out, prefix, info, block, *, exhaustive=False) -> list[str]:
    lb = LayerBits(src, out, prefix, info, block)
    if exhaustive:
        for e in range(lb.e):
            lb.check_zero_points(e)
            w13, w2 = lb.check_codes(e)
            lb.cross_check_nibbles(e, w13, w2, block.nibble_encoding)
        lb.check_scales()
        return lb.problems
    # The few sampled experts are decoded (torch) after every expert's bytes are compared (numpy),
    # so the torch import overlaps the byte checks.  Messages keep the per-expert order (and the
    # first-20 cap) of checking each expert completely in turn.
    _import_torch_in_background()
    sampled = set(sample_experts(lb.e))
    per_expert: list[list[str]] = []
    kept = {}
    for e in range(lb.e):
        lb.problems = per_expert_msgs = []
        lb.check_zero_points(e)
        w13, w2 = lb.check_codes(e)
        per_expert.append(per_expert_msgs)
        if e in sampled:
            kept[e] = (w13.copy(), w2.copy())  # the buffers are read into again for the next expert
    for e, (w13, w2) in kept.items():
        lb.problems = per_expert[e]
        lb.cross_check_nibbles(e, w13, w2, block.nibble_encoding)
    lb.problems = [m for msgs in per_expert for m in msgs][:20]
    lb.check_scales()
    return lb.problems


def check_passthrough(src: Checkpoint, out: Checkpoint, block: ConvertedBlock) -> list[str]:
    """Every tensor outside the converted experts: present in both, byte-identical."""
    layers = block.layers
    converted_out = {layer.tensor(w) for layer in layers.values() for w in EXPERT_TENSORS}
    # a router recorded as dequantized is exempt from the byte comparison only where the source
    # holds no float tensor of that name (it was quantized there)
    dequantized = {d for d in block.dequantized_routers if d not in src.tensors}
    dequant_prefixes = {d.rsplit(".", 1)[0] + "." for d in dequantized}
    expert_prefixes = tuple(f"{p}.experts." for p in layers)
    # compressed-tensors: the linears outside the MoE layers changed form (check_linear_bits)
    source_fields = ("qweight", "scales", "qzeros", "g_idx", "weight_packed", "weight_scale", "weight_shape",
                     "weight_zero_point", "weight_g_idx")
    converted_src = {f"{m}.{f}" for m in block.linears for f in source_fields}
    converted_out |= {f"{m}.{f}" for m in block.linears for f in ("weight_packed", "weight_scale", "weight_shape")}
    problems = []
    for name in src.tensors:
        if name.startswith(expert_prefixes) or any(name.startswith(d) for d in dequant_prefixes) \
                or name in converted_src:
            continue
        if name not in out.tensors:
            problems.append(f"{name}: in the source but missing from the output")
    for name, ref in out.tensors.items():
        if name in converted_out or name in dequantized:
            continue
        sref = src.tensors.get(name)
        if sref is None:
            problems.append(f"{name}: in the output but not in the source")
            continue
        if (sref.dtype, sref.shape) != (ref.dtype, ref.shape):
            problems.append(f"{name}: {ref.dtype}{list(ref.shape)} but the source has {sref.dtype}{list(sref.shape)}")
            continue
        if not _same_bytes(src, sref, out, ref):
            problems.append(f"{name}: bytes differ from the source")
    return problems


def _same_bytes(src, sref, out, ref, chunk: int = 8 << 20) -> bool:
    a = np.empty(min(chunk, max(sref.nbytes, 1)), dtype=np.uint8)
    b = np.empty_like(a)
    for off in range(0, sref.nbytes, chunk):
        size = min(chunk, sref.nbytes - off)
        src.read_into(sref, a[:size], offset=off)
        out.read_into(ref, b[:size], offset=off)
        if not np.array_equal(a[:size], b[:size]):
            return False
    return True


def check_linear_bits(src: Checkpoint, out: Checkpoint, block: ConvertedBlock) -> list[str]:
    """A compressed-tensors output's linears outside the MoE layers against the source: packed
    words are the source's (GPTQ ``qweight`` transposed: ``weight_packed[n, c] == qweight[c, n]``),
    the source's zero points are the symmetric 8 and its rows in natural order, and every scale is
    its source group's scale, cast as recorded."""
    ct = block.checkpoint_format == "pack-quantized"
    nibble = _SYM_ZERO - (0 if ct else block.zero_offset)
    problems: list[str] = []
    for module, lin in block.linears.items():
        fields = {"packed": "weight_packed", "scales": "weight_scale", "zeros": "weight_zero_point",
                  "g_idx": "weight_g_idx"} if ct else {"packed": "qweight", "scales": "scales", "zeros": "qzeros",
                                                        "g_idx": "g_idx"}
        src_name = {k: f"{module}.{v}" for k, v in fields.items()}
        missing = [n for k, n in src_name.items() if k in ("packed", "scales") and n not in src.tensors]
        if missing:
            problems.append(f"{missing[0]}: missing from the source")
            continue
        unfit = _linear_shape_problem(src, out, module, lin, src_name, ct)
        if unfit:
            problems.append(f"{module}: not compared: {unfit}")
            continue
        words = src.read(src_name["packed"])
        words = words if ct else words.T
        if not np.array_equal(out.read(f"{module}.weight_packed"), words):
            problems.append(f"{module}.weight_packed: differs from the source's "
                            f"{'weight_packed' if ct else 'qweight transposed'}")
        if src_name["zeros"] in src.tensors:
            z = src.read(src_name["zeros"])
            if (z.dtype == np.int32 and not (z.view(np.uint32) == np.uint32(nibble * 0x11111111)).all()) or \
                    (z.dtype != np.int32 and (z.dtype == np.uint8 or (z != 0).any())):
                problems.append(f"{src_name['zeros']}: zero points are not the symmetric 8")
        if src_name["g_idx"] in src.tensors and not np.array_equal(
                src.read(src_name["g_idx"]), np.arange(lin.in_features) // lin.source_group_size):
            problems.append(f"{src_name['g_idx']}: rows reordered")
        s = _scales_f32(src, src_name["scales"])
        s = s if ct else s.T
        want = _cast_bits(np.repeat(s, lin.source_group_size // lin.group_size, axis=1), lin.scale_dtype)
        got = out.read(f"{module}.weight_scale").view(np.uint16).reshape(want.shape)
        if not np.array_equal(got, want):
            problems.append(f"{module}.weight_scale: differs from the source's scales (regrouped "
                            f"{lin.source_group_size} -> {lin.group_size}, cast to {lin.scale_dtype})")
    return problems


def _linear_shape_problem(src: Checkpoint, out: Checkpoint, module: str, lin, src_name: dict[str, str],
                          ct: bool) -> str | None:
    """Why a linear's tensors (the output's, the source's packed words and scales) do not have the
    shapes the config block gives it, so nothing may read them by those shapes (None: they do)."""
    n, k = lin.out_features, lin.in_features
    groups = k // lin.source_group_size

    def oriented(rows: int, cols: int) -> tuple[int, int]:
        return (rows, cols) if ct else (cols, rows)

    want = {f"{module}.{field}": (out, shape) for field, shape in lin.shapes.items() if field != "weight_shape"}
    want[src_name["packed"]] = (src, oriented(n, k // 8))
    want[src_name["scales"]] = (src, oriented(n, groups))
    for name, (ckpt, shape) in want.items():
        ref = ckpt.tensors.get(name)
        if ref is None or tuple(ref.shape) != shape or ref.dtype not in ("I32", "F16", "BF16", "F32"):
            found = f"{ref.dtype}{list(ref.shape)}" if ref is not None else "missing"
            return f"{name} is {found}, the config block says {list(shape)}"
    return None
