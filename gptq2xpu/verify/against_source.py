"""Prove a converted checkpoint computes what its source computes.

Bit-exact, for every expert of every converted layer (written from the format definitions, not
from the converter's code):

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

Numerical, per layer: a seeded batch of tokens is routed with the checkpoint's own router and run
through the reference MoE (:mod:`.reference`) once with the source experts dequantized by the GPTQ
formula and once with the converted bytes dequantized directly; then every expert once more on
its own (so experts the router did not pick are covered too).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from ..errors import Gptq2XpuError
from ..read.checkpoint import Checkpoint

ROLES = ("gate", "up", "down")
_SYM_ZERO = 8
_SCALE_NAMES = {"float16": "F16", "bfloat16": "BF16"}


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


# ----------------------------------------------------------------------------- numerical


def load_source(src: Checkpoint, prefix: str, info: dict, device) -> dict:
    """The layer's source expert tensors, stacked over experts and moved to ``device`` (packed)."""
    from ..torch_io import read_stacked
    e = int(info["experts"])
    proj = info["source_projections"]
    fields = ("weight_packed", "weight_scale") if info.get("source_format") == "compressed-tensors" \
        else ("qweight", "scales", "qzeros", "g_idx")
    loaded = {}
    for role in ROLES:
        base = [f"{prefix}.experts.{i}.{proj[role]}." for i in range(e)]
        loaded[role] = {f: read_stacked(src, [b + f for b in base], device) for f in fields if base[0] + f in src.tensors}
    return loaded


def dequant_source(loaded: dict, info: dict, block: dict, dtype):
    """Source experts dequantized with the GPTQ formula: w13 [E, 2N, K], w2 [E, K, N]."""
    import torch

    from .unpack import gptq_dequant, xpu_dequant

    offset = 1 if block.get("source", {}).get("checkpoint_format", "gptq") == "gptq" else 0
    # --scale-dtype asked the converter to store the scales in another dtype: that cast (round to
    # nearest even, proven bit for bit by check_scales) is part of the conversion, so the source
    # side takes its scales through the same cast, and the tolerances stay those of execution noise.
    cast = {"F16": torch.float16, "BF16": torch.bfloat16}.get(_SCALE_NAMES.get(info.get("scale_dtype"), info.get("scale_dtype")))
    out = {}
    for role, t in loaded.items():
        if "weight_packed" in t:
            sc = t["weight_scale"] if cast is None else t["weight_scale"].to(cast)
            out[role] = xpu_dequant(t["weight_packed"].view(torch.uint8), sc, "u4b8", dtype)
        else:
            g_idx = t["g_idx"].long() if "g_idx" in t else None
            sc = t["scales"] if cast is None else t["scales"].to(cast)
            out[role] = gptq_dequant(t["qweight"], sc, t.get("qzeros"), g_idx, zero_offset=offset, dtype=dtype)
    return torch.cat([out["gate"], out["up"]], dim=1), out["down"]


def converted_weights(out: Checkpoint, prefix: str, block: dict, dtype, device, raw: bool = False):
    from ..torch_io import read_tensor
    from .unpack import xpu_dequant

    enc = block["nibble_encoding"]
    w13, s13, w2, s2 = (read_tensor(out, f"{prefix}.experts.{w}", device)
                        for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales"))
    if raw:
        return w13, s13, w2, s2
    return xpu_dequant(w13, s13, enc, dtype), xpu_dequant(w2, s2, enc, dtype)


def router_weight(out: Checkpoint, src: Checkpoint, prefix: str, block: dict, device):
    """The layer's router as float32 [E, K] (dequantized if it is GPTQ-quantized)."""
    import torch

    from ..torch_io import read_tensor
    from .unpack import gptq_dequant

    name = f"{prefix}.gate.weight"
    if name in out.tensors:
        return read_tensor(out, name).to(device=device, dtype=torch.float32)
    base = f"{prefix}.gate."
    if base + "qweight" in src.tensors:
        offset = 1 if block.get("source", {}).get("checkpoint_format", "gptq") == "gptq" else 0
        qz = read_tensor(src, base + "qzeros") if base + "qzeros" in src.tensors else None
        gi = read_tensor(src, base + "g_idx").long() if base + "g_idx" in src.tensors else None
        return gptq_dequant(read_tensor(src, base + "qweight"), read_tensor(src, base + "scales"), qz, gi,
                            zero_offset=offset, dtype=torch.float32).to(device)
    raise Gptq2XpuError(f"{prefix}: no router weight ({name}) to route tokens with")


def numeric_layer(src: Checkpoint, out: Checkpoint, prefix: str, info: dict, block: dict, *, device, dtype,
                  tokens: int, seed: int, kernel: bool = False) -> dict:
    import torch

    from ..torch_io import read_tensor
    from .device import synchronize
    from .reference import (
        compare,
        moe_forward,
        route,
        within_kernel_tolerance,
        within_tolerance,
    )
    from .unpack import xpu_dequant

    routing = block.get("routing") or {}
    e = int(info["experts"])
    k = int(info["hidden_size"])
    top_k = int(routing.get("top_k", min(2, e)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device)
    x_cov = torch.randn(e, k, generator=gen).to(device)
    router = router_weight(out, src, prefix, block, device)
    bias_name = f"{prefix}.gate.e_score_correction_bias"
    bias = read_tensor(out, bias_name).to(device=device, dtype=torch.float32) if bias_name in out.tensors else None
    tw, tid = route(x, router, top_k, scoring=routing.get("scoring", "softmax"),
                    renormalize=bool(routing.get("renormalize", True)), correction_bias=bias,
                    routed_scaling_factor=float(routing.get("routed_scaling_factor", 1.0)))
    cov_w = torch.ones(e, 1, device=device)
    cov_id = torch.arange(e, device=device).unsqueeze(1)

    # load: read the packed tensors of both sides and move them to the device
    synchronize(device)
    t0 = time.perf_counter()
    src_packed = load_source(src, prefix, info, device)
    w13, s13, w2, s2 = converted_weights(out, prefix, block, dtype, device, raw=True)
    synchronize(device)
    t1 = time.perf_counter()
    # compute: dequantize both sides, run the reference MoE on routed tokens and on every expert
    enc = block["nibble_encoding"]
    sw13, sw2 = dequant_source(src_packed, info, block, dtype)
    y_src = moe_forward(x.to(dtype), sw13, sw2, tw, tid)
    c_src = moe_forward(x_cov.to(dtype), sw13, sw2, cov_w, cov_id)
    del sw13, sw2
    synchronize(device)
    t_mid = time.perf_counter()
    cw13, cw2 = xpu_dequant(w13, s13, enc, dtype), xpu_dequant(w2, s2, enc, dtype)
    y_conv = moe_forward(x.to(dtype), cw13, cw2, tw, tid)
    synchronize(device)
    t_conv = time.perf_counter()
    c_conv = moe_forward(x_cov.to(dtype), cw13, cw2, cov_w, cov_id)
    del cw13, cw2
    synchronize(device)
    t2 = time.perf_counter()
    packed_bytes = sum(t.numel() * t.element_size() for r in src_packed.values() for t in r.values()) + \
        sum(t.numel() * t.element_size() for t in (w13, s13, w2, s2))
    del src_packed
    tp = int(block.get("tp_size", 1))
    tp_stats = None
    if tp > 1:
        y_ranks = rank_sum(out, prefix, info, block, tp, x.to(dtype), tw, tid, dtype, device)
        tp_stats = compare(y_ranks, y_conv)
    routed = compare(y_conv, y_src)
    every = compare(c_conv, c_src)
    result = {
        "prefix": prefix,
        "tokens": tokens,
        "top_k": top_k,
        "experts_hit": int(torch.unique(tid).numel()),
        "max_abs": routed["max_abs"],
        "rel": routed["rel"],
        "cosine": routed["cosine"],
        "every_expert_rel": every["rel"],
        "every_expert_cosine": every["cosine"],
        "ok": within_tolerance(routed, dtype) and within_tolerance(every, dtype),
        "load_seconds": round(t1 - t0, 5),
        "compute_seconds": round(t2 - t1, 5),
        "source_side_seconds": round(t_mid - t1, 5),           # GPTQ dequant + routed and every-expert MoE
        "converted_dequant_moe_seconds": round(t_conv - t_mid, 5),  # XPU bytes dequant + routed MoE
        "packed_bytes": packed_bytes,
    }
    if tp_stats is not None:
        result["tp_sum_rel"] = tp_stats["rel"]
        result["ok"] = result["ok"] and within_tolerance(tp_stats, dtype)
    if kernel:
        from .xpu_kernels import run_xpu_fused_moe

        y_k = run_xpu_fused_moe(x.to(dtype), w13, s13.to(dtype), w2, s2.to(dtype), tw, tid, None, top_k=top_k,
                                renormalize=bool(routing.get("renormalize", True)), encoding=block["nibble_encoding"])
        kstats = compare(y_k.float(), y_conv.float())
        result["kernel"] = {**kstats, "ok": within_kernel_tolerance(y_k, y_conv, dtype)}
        result["ok"] = result["ok"] and result["kernel"]["ok"]
    return result


def rank_sum(out: Checkpoint, prefix: str, info: dict, block: dict, tp: int, x, tw, tid, dtype, device):
    """Sum over tensor-parallel ranks of each rank's partial MoE output, every rank dequantized
    from its own slice of the packed bytes and scales (as a runtime holding one rank would)."""
    import torch

    from .reference import moe_forward
    from .unpack import xpu_dequant

    enc = block["nibble_encoding"]
    p = int(info["padded_intermediate_size"])
    pt = p // tp
    g2 = int(info["w2_group_size"])
    w13, s13, w2, s2 = converted_weights(out, prefix, block, dtype, device, raw=True)
    total = None
    for r in range(tp):
        rows = torch.cat([torch.arange(r * pt, (r + 1) * pt), torch.arange(p + r * pt, p + (r + 1) * pt)]).to(w13.device)
        r13 = xpu_dequant(w13.index_select(1, rows), s13.index_select(1, rows), enc, dtype)
        r2 = xpu_dequant(w2[:, :, r * pt // 2 : (r + 1) * pt // 2].contiguous(),
                         s2[:, :, r * pt // g2 : (r + 1) * pt // g2].contiguous(), enc, dtype)
        y = moe_forward(x, r13, r2, tw, tid).float()
        total = y if total is None else total + y
    return total
