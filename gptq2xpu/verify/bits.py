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
  cast to the recorded dtype by torch (round to nearest even);
* padding rows/columns (tensor-parallel padding) must be code 8 with scale 0;
* a sample of experts is also decoded nibble by nibble through :mod:`.unpack` (``--exhaustive``:
  every expert) and the codes compared;
* every other tensor must be byte-identical to the source tensor of the same name.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from ..read.checkpoint import Checkpoint

ROLES = ("gate", "up", "down")
_SYM_ZERO = 8

def _read_slice(ckpt: Checkpoint, name: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """Row ``index`` of the leading dim of a U8 tensor, as ``shape``."""
    ref = ckpt.ref(name)
    size = int(np.prod(shape))
    buf = np.empty(size, dtype=np.uint8)
    ckpt.read_into(ref, buf, offset=index * size)
    return buf.reshape(shape)


def _transpose_words(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` in bands of source rows: a plain transposed copy reads a word from every
    source row in turn, and rows 4 KiB apart (K = 2048: 8 KiB) evict each other from L1."""
    band = 8 if src.strides[0] % 4096 == 0 else 16
    for r in range(0, src.shape[0], band):
        np.copyto(dst[:, r : r + band], src[r : r + band].T)


def _same_bytes_2d(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` of two uint8 matrices, four bytes at a time where the rows allow it."""
    if a.shape == b.shape and a.shape[1] % 4 == 0 and a.strides[1] == 1 and b.strides[1] == 1:
        return np.array_equal(a.view(np.uint32), b.view(np.uint32))
    return np.array_equal(a, b)


def _scales_f32(ckpt: Checkpoint, name: str) -> np.ndarray:
    import torch

    ref = ckpt.ref(name)
    raw = ckpt.read(name)
    if ref.dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16).reshape(ref.shape).copy()).view(torch.bfloat16).float().numpy()
    return raw.astype(np.float32)


def _cast_bits(values_f32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the 16-bit patterns torch produces for ``dtype`` (F16/BF16)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values_f32))
    t = t.to(torch.float16 if dtype == "F16" else torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


class LayerBits:
    """Bit-exact comparison of one converted layer against its source tensors."""

    def __init__(self, src: Checkpoint, out: Checkpoint, prefix: str, info: dict, block: dict):
        self.src, self.out, self.prefix, self.info = src, out, prefix, info
        self.e = int(info["experts"])
        self.k = int(info["hidden_size"])
        self.n = int(info["intermediate_size"])
        self.p = int(info["padded_intermediate_size"])
        self.g13 = int(info["w13_group_size"])
        self.g2 = int(info["w2_group_size"])
        self.fmt = info.get("source_format", "gptq")
        self.proj = info["source_projections"]
        self.xor = 0x88 if block["nibble_encoding"] == "s4" else 0
        self.ckpt_format = block.get("source", {}).get("checkpoint_format", "gptq")
        self.scale_dtype = {"float16": "F16", "bfloat16": "BF16"}.get(info["scale_dtype"], info["scale_dtype"])
        self.problems: list[str] = []
        self._words: dict[tuple[int, int], np.ndarray] = {}   # expected-rows buffers, by shape

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
            wp = self.src.read(self.name(e, role, "weight_packed"))
            rows = wp.view(np.uint8).reshape(wp.shape[0], wp.shape[1] * 4)
        else:
            q = self.src.read(self.name(e, role, "qweight"))          # [in/8, out] int32 (the planner's check)
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
        w13 = _read_slice(self.out, f"{self.prefix}.experts.w13_qweight", e, (2 * p, k // 2))
        w2 = _read_slice(self.out, f"{self.prefix}.experts.w2_qweight", e, (k, p // 2))
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
                self.bad(f"expert {e} {role}: byte [{r}, {c}] is 0x{int(got[r, c]):02X}, source says 0x{int(want[r, c]):02X}")
        if p > n:
            if not ((w13[n:p] == pad).all() and (w13[p + n :] == pad).all() and (w2[:, n // 2 :] == pad).all()):
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
                z = z.view(np.uint32)
                nib = np.stack([(z >> (4 * j)) & 0xF for j in range(8)], axis=-1)
                # GPTQ: v1 stores zero - 1; compressed-tensors packs zero + 8 (symmetric zero 0 -> 8)
                if not (nib.astype(np.int64) + (0 if ct else offset) == _SYM_ZERO).all():
                    self.bad(f"{zname}: zero points are not the symmetric 8 ({self.ckpt_format})")
            gname = self.name(e, role, "weight_g_idx" if ct else "g_idx")
            if gname in self.src.tensors:
                gi = self.src.read(gname).astype(np.int64)
                k_in = gi.shape[0]
                groups = self.info["source_group_size"][role]
                if not np.array_equal(gi, np.arange(k_in) // groups):
                    self.bad(f"{gname}: rows reordered; cannot be converted")

    # --- scales ---------------------------------------------------------------------
    def check_scales(self) -> None:
        s13 = self.out.read(f"{self.prefix}.experts.w13_scales")
        s2 = self.out.read(f"{self.prefix}.experts.w2_scales")
        s13 = s13.view(np.uint16).reshape(self.out.ref(f"{self.prefix}.experts.w13_scales").shape)
        s2 = s2.view(np.uint16).reshape(self.out.ref(f"{self.prefix}.experts.w2_scales").shape)
        field = "weight_scale" if self.fmt == "compressed-tensors" else "scales"
        n, p = self.n, self.p
        for e in range(self.e):
            for role, got, g_out, cols in (("gate", s13[e, :n], self.g13, self.k), ("up", s13[e, p : p + n], self.g13, self.k),
                                           ("down", s2[e, :, : n // self.g2], self.g2, n)):
                src = _scales_f32(self.src, self.name(e, role, field))
                per_out = src if self.fmt == "compressed-tensors" else src.T      # [out, groups_in]
                g_in = cols // per_out.shape[1]
                # XPU group j starts at input j*g_out, which lies in source group (j*g_out)//g_in
                idx = (np.arange(cols // g_out) * g_out) // g_in
                want = _cast_bits(per_out[:, idx], self.scale_dtype)
                if not np.array_equal(want, got):
                    r, c = np.argwhere(want != got)[0]
                    self.bad(f"expert {e} {role} scales [{r}, {c}]: 0x{int(got[r, c]):04X}, source gives 0x{int(want[r, c]):04X}")
            if p > n and ((s13[e, n:p] != 0).any() or (s13[e, p + n :] != 0).any() or (s2[e, :, n // self.g2 :] != 0).any()):
                self.bad(f"expert {e}: padding scales are not 0")

    def cross_check_nibbles(self, e: int, w13: np.ndarray, w2: np.ndarray, encoding: str) -> None:
        """Decode expert ``e`` nibble by nibble on both sides (independent unpack path)."""
        import torch

        from .unpack import gptq_codes, xpu_codes

        n, p = self.n, self.p
        for role, got in (("gate", w13[:n]), ("up", w13[p : p + n]), ("down", w2[:, : n // 2])):
            conv = xpu_codes(torch.from_numpy(np.ascontiguousarray(got)), encoding)  # [out, in]
            if self.fmt == "compressed-tensors":
                src = xpu_codes(torch.from_numpy(self.src.read(self.name(e, role, "weight_packed")).view(np.uint8).copy()), "u4b8")
            else:
                src = gptq_codes(torch.from_numpy(self.src.read(self.name(e, role, "qweight")))).T  # [out, in]
            if not torch.equal(conv, src):
                r, c = (conv != src).nonzero()[0].tolist()
                self.bad(f"expert {e} {role}: code [{r}, {c}] decodes to {int(conv[r, c])}, source {int(src[r, c])}")


def sample_experts(num: int, count: int = 4) -> list[int]:
    """A deterministic spread of expert ids: first, last and evenly spaced ones between."""
    if num <= count:
        return list(range(num))
    return sorted({round(i * (num - 1) / (count - 1)) for i in range(count)})


_torch_prefetch = threading.Lock()


def _import_torch_in_background() -> None:
    """Start importing torch (about a second) while the numpy byte checks run."""
    if "torch" in sys.modules or not _torch_prefetch.acquire(blocking=False):
        return  # imported, or already being imported; the lock is never released: once is enough

    def run():
        try:
            import torch  # noqa: F401
        except Exception:  # pragma: no cover - the foreground import raises it where torch is used
            pass

    threading.Thread(target=run, name="gptq2xpu-import-torch", daemon=True).start()


def check_layer_bits(src, out, prefix, info, block, *, exhaustive=False) -> list[str]:
    lb = LayerBits(src, out, prefix, info, block)
    if exhaustive:
        for e in range(lb.e):
            lb.check_zero_points(e)
            w13, w2 = lb.check_codes(e)
            lb.cross_check_nibbles(e, w13, w2, block["nibble_encoding"])
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
            kept[e] = (w13, w2)
    for e, (w13, w2) in kept.items():
        lb.problems = per_expert[e]
        lb.cross_check_nibbles(e, w13, w2, block["nibble_encoding"])
    lb.problems = [m for msgs in per_expert for m in msgs][:20]
    lb.check_scales()
    return lb.problems


def check_passthrough(src: Checkpoint, out: Checkpoint, block: dict) -> list[str]:
    """Every tensor outside the converted experts: present in both, byte-identical."""
    layers = block.get("layers", {})
    converted_out = {f"{p}.experts.{w}" for p in layers for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")}
    dequantized = set(block.get("dequantized_routers", []))
    dequant_prefixes = {d.rsplit(".", 1)[0] + "." for d in dequantized}
    expert_prefixes = tuple(f"{p}.experts." for p in layers)
    problems = []
    for name in src.tensors:
        if name.startswith(expert_prefixes) or any(name.startswith(d) for d in dequant_prefixes):
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
