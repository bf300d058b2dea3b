"""One expert at a time: the dequantized weights the streamed reference MoE runs on (CPU).

:func:`gptq2xpu.verify.reference.moe_forward_streamed` asks an *experts* object for one expert
at a time (``experts(e)``) and runs all the rows that expert sees through it: the tokens routed
to it and the every-expert coverage token. The objects here dequantize that one expert, with the
verifier's own unpackers (:mod:`.unpack`), into float32 buffers allocated once per layer and
reused, so a layer never holds more than one expert's float weights (a full-width Qwen3-30B-A3B
expert: 19 MB in float32, against 2.4 GB for the whole layer).

* :class:`ConvertedExperts`: the converted XPU bytes ``w13 [E, 2N, K/2]``, ``w2 [E, K, N/2]``
  with their scales; weights output-major, ``x @ W.T``.
* :class:`SourceExperts`: the source as loaded by :func:`.numeric.load_source`. GPTQ projections
  are dequantized in their stored input-major order (:func:`.unpack.gptq_dequant_kfirst`) and the
  activations' columns are permuted to match (``x[:, order] @ W_t``) instead of transposing the
  weights; zero points and ``g_idx`` are honoured as in :func:`.unpack.gptq_dequant`.
  compressed-tensors rows are XPU rows (``u4b8``).

The dequantized values equal those of the plain whole-layer functions bit for bit (the
lookup-table paths are tested against them); the GEMMs see another layout and, for GPTQ, another
order of the input dimension, so their float sums may round differently: that is the execution
noise :data:`.reference.TOLERANCES` is sized for.

Every object also has a plain mode (``fast=False``): the whole-layer functions applied to one
expert's slice, for hosts the lookup tables do not support (big-endian), and the definition the
fast paths are checked against.

The objects may be called from several threads at once (``moe_forward_streamed`` runs experts
on worker threads): each thread gets its own buffers; the packed tensors are only read.
"""

from __future__ import annotations

import threading

import torch

from .reference import Expert
from .unpack import GptqKFirst, XpuRows, fast_unpack_supported, gptq_dequant, kfirst_order, xpu_dequant

ROLES = ("gate", "up", "down")


def _out_major(w: torch.Tensor):
    """``x @ w.T`` for an output-major ``w [out, in]``."""
    return lambda x: x @ w.T


def _in_first(w_t: torch.Tensor, order: torch.Tensor):
    """``x @ W.T`` for ``w_t = W.T[order]`` (input-major, inputs in ``order``).

    In float32 the sum over the inputs is split into up to 32 contiguous blocks: one batched GEMM
    of the blocks, then a sum of the partial products. With the weights input-major, a plain GEMM
    adds all K products of an output in one chain, and for few rows (one, for an expert that
    only the every-expert token reaches) that measured 5.5e-7 relative error at K = 2048 against
    3.3e-7 with 2+ rows and 2.1e-7 for the output-major XPU side; split, 1.1e-7 .. 1.6e-7, at the
    same speed. (16-bit GEMMs accumulate in float32 and round once; splitting them would add a
    rounding per block, so they are left whole.)
    """
    k = w_t.shape[0]
    parts = next(p for p in (32, 16, 8, 4, 2, 1) if k % p == 0) if w_t.dtype == torch.float32 else 1
    if parts == 1:
        return lambda x: x.index_select(1, order) @ w_t
    blocks = w_t.view(parts, k // parts, w_t.shape[1])
    return lambda x: torch.bmm(x.index_select(1, order).view(-1, parts, k // parts).transpose(0, 1), blocks).sum(0)


class _Buffers:
    """float32 scratch of a fixed shape, plus its copy in the compute dtype when that is not float32."""

    def __init__(self, shape, dtype, device):
        self.f32 = torch.empty(shape, dtype=torch.float32, device=device)
        self.cast = None if dtype == torch.float32 else torch.empty(shape, dtype=dtype, device=device)

    def result(self) -> torch.Tensor:
        """The buffer in the compute dtype: one rounding of the exact float32 values (copy_ rounds
        to nearest even, as ``.to(dtype)`` does)."""
        return self.f32 if self.cast is None else self.cast.copy_(self.f32)


class ConvertedExperts:
    """Experts of a converted layer: ``w13 [E, 2N, K/2]`` / ``s13 [E, 2N, K/g13]``, ``w2 [E, K, N/2]``
    / ``s2 [E, K, N/g2]`` (uint8 bytes in ``encoding``), dequantized to ``dtype`` one at a time."""

    def __init__(self, w13, s13, w2, s2, encoding: str, dtype: torch.dtype, *, fast: bool | None = None):
        if w13.dim() != 3 or w2.dim() != 3 or s13.dim() != 3 or s2.dim() != 3:
            raise ValueError(f"expected 3-D expert tensors, got w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
        self.num_experts, two_n, half_k = w13.shape
        self.hidden, self.inter = 2 * half_k, two_n // 2
        if two_n % 2 or tuple(w2.shape) != (self.num_experts, self.hidden, self.inter // 2) or \
                s13.shape[:2] != w13.shape[:2] or s2.shape[:2] != w2.shape[:2]:
            raise ValueError(f"shape mismatch: w13 {tuple(w13.shape)}, s13 {tuple(s13.shape)}, "
                             f"w2 {tuple(w2.shape)}, s2 {tuple(s2.shape)}")
        self.w13, self.s13, self.w2, self.s2 = w13, s13, w2, s2
        self.encoding, self.dtype = encoding, dtype
        self.fast = fast_unpack_supported() if fast is None else fast
        if self.fast:
            self._rows13, self._rows2 = XpuRows(w13, s13, encoding), XpuRows(w2, s2, encoding)
        self._local = threading.local()

    def _buffers(self):
        """This thread's (w13, w2, index) buffers, allocated on its first expert."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            dev, two_n = self.w13.device, 2 * self.inter
            bufs = self._local.bufs = (
                _Buffers((two_n, self.hidden), self.dtype, dev),
                _Buffers((self.hidden, self.inter), self.dtype, dev),
                torch.empty(max(self.w13[0].numel(), self.w2[0].numel()), dtype=torch.int32, device=dev),
            )
        return bufs

    def __call__(self, e: int) -> Expert:
        if not self.fast:
            w13 = xpu_dequant(self.w13[e], self.s13[e], self.encoding, self.dtype)
            w2 = xpu_dequant(self.w2[e], self.s2[e], self.encoding, self.dtype)
        else:
            b13, b2, index = self._buffers()
            self._rows13(e, out=b13.f32, index=index[: self.w13[e].numel()])
            self._rows2(e, out=b2.f32, index=index[: self.w2[e].numel()])
            w13, w2 = b13.result(), b2.result()
        n = self.inter
        gate_up = _out_major(w13)
        return Expert(lambda x: (lambda h: (h[:, :n], h[:, n:]))(gate_up(x)), _out_major(w2))


class SourceExperts:
    """Experts of a source layer as :func:`.numeric.load_source` stacks them: per role, GPTQ
    ``qweight [E, in/8, out]``, ``scales [E, G, out]``, optional ``qzeros [E, G, out/8]`` and
    ``g_idx [E, in]``; or compressed-tensors ``weight_packed [E, out, in/8]`` (int32, XPU rows)
    and ``weight_scale [E, out, G]``. ``zero_offset``: 1 for GPTQ v1, 0 for v2. ``scale_cast``:
    the dtype the converter was asked to store scales in (``--scale-dtype``), or None."""

    def __init__(self, loaded: dict, dtype: torch.dtype, *, zero_offset: int = 1, scale_cast=None,
                 fast: bool | None = None):
        self.loaded, self.dtype, self.offset, self.cast = loaded, dtype, int(zero_offset), scale_cast
        self.compressed = "weight_packed" in loaded["gate"]
        self.fast = fast_unpack_supported() if fast is None else fast
        if self.compressed:
            e, out_gate, in8 = loaded["gate"]["weight_packed"].shape
            self.hidden, self.inter = 8 * in8, out_gate
        else:
            e, k8, n_gate = loaded["gate"]["qweight"].shape
            self.hidden, self.inter = 8 * k8, n_gate
        self.num_experts = e
        shapes = {"gate": (self.inter, self.hidden), "up": (self.inter, self.hidden), "down": (self.hidden, self.inter)}
        for role, (rows, cols) in shapes.items():
            t = loaded[role]
            got = t["weight_packed"].shape if self.compressed else t["qweight"].shape
            want = (e, rows, cols // 8) if self.compressed else (e, cols // 8, rows)
            if tuple(got) != want:
                raise ValueError(f"source {role} is {tuple(got)}, expected {want}")
        self._shapes = shapes
        self._device = loaded["gate"]["weight_packed" if self.compressed else "qweight"].device
        if self.fast:  # the per-layer work (validation, zero points, g_idx, scale casts) once
            if self.compressed:
                self._unpack = {r: XpuRows(t["weight_packed"].view(torch.uint8), self._scales(t["weight_scale"]),
                                           "u4b8") for r, t in loaded.items()}
            else:
                self._unpack = {r: GptqKFirst(t["qweight"], self._scales(t["scales"]), t.get("qzeros"), t.get("g_idx"),
                                              zero_offset=self.offset) for r, t in loaded.items()}
                self._order13 = kfirst_order(self.hidden).to(self._device)
                self._order2 = kfirst_order(self.inter).to(self._device)
        self._local = threading.local()

    def _buffers(self):
        """This thread's ({role: buffers}, index), allocated on its first expert: output-major
        for compressed-tensors rows, input-major (transposed shapes) for GPTQ."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = (
                {r: _Buffers(shape if self.compressed else shape[::-1], self.dtype, self._device)
                 for r, shape in self._shapes.items()},
                torch.empty(self.hidden * self.inter // 2, dtype=torch.int32, device=self._device),
            )
        return bufs

    def _scales(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cast is None else t.to(self.cast)

    def _plain(self, role: str, e: int) -> torch.Tensor:
        """Output-major ``[out, in]`` in the compute dtype, by the whole-layer functions."""
        t = self.loaded[role]
        if self.compressed:
            return xpu_dequant(t["weight_packed"][e].view(torch.uint8), self._scales(t["weight_scale"][e]), "u4b8",
                               self.dtype)
        return gptq_dequant(t["qweight"][e], self._scales(t["scales"][e]),
                            t["qzeros"][e] if "qzeros" in t else None,
                            t["g_idx"][e].long() if "g_idx" in t else None, zero_offset=self.offset, dtype=self.dtype)

    def _fast(self, role: str, e: int) -> torch.Tensor:
        bufs, index = self._buffers()
        buf = bufs[role]
        self._unpack[role](e, out=buf.f32, index=index)
        return buf.result()

    def __call__(self, e: int) -> Expert:
        if not self.fast:
            gate, up, down = (_out_major(self._plain(r, e)) for r in ROLES)
        elif self.compressed:
            gate, up, down = (_out_major(self._fast(r, e)) for r in ROLES)
        else:
            gate, up = (_in_first(self._fast(r, e), self._order13) for r in ("gate", "up"))
            down = _in_first(self._fast("down", e), self._order2)
        return Expert(lambda x: (gate(x), up(x)), down)
