"""A small loader for runtimes: converted MoE layers as the tensors ``XpuFusedMoe`` takes.

>>> from gptq2xpu.load import open_converted
>>> ckpt = open_converted("qwen3-xpu")                                        # doctest: +SKIP
>>> for layer in ckpt.iter_layers(device="xpu", dtype=torch.bfloat16):       # doctest: +SKIP
...     layer.w13, layer.w13_scales, layer.w2, layer.w2_scales              # uint8 / bf16, on xpu

The checkpoint is opened lazily (headers only, validated like any untrusted input); each layer
reads only its own bytes.  For one tensor-parallel rank (``tp_rank``/``tp_size``) it reads the
rank's folder written by ``convert --emit-ranks`` when there is one (contiguous, only that rank's
bytes), else the rank's rows of w13 (contiguous per expert) and each expert's w2 block, keeping
that rank's columns.

Nibble encoding: the kernel rewrites offset-8 (u4b8) nibbles into signed ones once at load time,
making a second copy of every expert weight on the device, unless the w13 tensor carries the
attribute ``xpu_fused_moe``.  With ``signed=True`` (or an ``s4`` checkpoint) the loader hands over
signed nibbles (converted on the host if needed) and sets that attribute, so the kernel skips the
rewrite.  Signed bytes come as ``torch.int8`` by default: that is the buffer the kernel's own
rewrite produces, and current ``XpuFusedMoe`` versions recognise packed int4 in the grouped GEMM by
``B dtype == int8`` (a pre-converted ``uint8`` buffer would skip the rewrite yet not be read as
int4).  Pass ``signed_dtype=torch.uint8`` for older versions that take an explicit ``is_int4=True``
and keep uint8 buffers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import CONFIG_BLOCK
from .errors import InputError, UsageError
from .read.checkpoint import Checkpoint, check_member_name, open_checkpoint
from .torch_io import read_tensor, torch_dtype

#: The attribute vllm_xpu_kernels' XpuFusedMoe checks on w13 to skip its one-time u4b8 -> s4 rewrite.
SKIP_CONVERSION_ATTR = "xpu_fused_moe"


@dataclass
class MoELayerWeights:
    """One MoE layer's expert weights in the XPU layout (one rank's slice when tensor-parallel)."""

    prefix: str
    w13: torch.Tensor            # uint8 [E, 2*N_rank, K/2] (int8 when signed, see signed_dtype)
    w13_scales: torch.Tensor     # [E, 2*N_rank, K/g13]
    w2: torch.Tensor             # uint8 [E, K, N_rank/2] (int8 when signed, see signed_dtype)
    w2_scales: torch.Tensor      # [E, K, N_rank/g2]
    encoding: str                # "u4b8" or "s4" (what the bytes hold now)
    experts: int
    hidden_size: int
    intermediate_size: int       # N per rank (padded when the converter padded for TP)
    w13_group_size: int
    w2_group_size: int
    tp_rank: int = 0
    tp_size: int = 1
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None


class ConvertedCheckpoint:
    """A converted checkpoint opened for loading.  Use :func:`open_converted`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ckpt: Checkpoint = open_checkpoint(self.path)
        block = self._ckpt.config.get(CONFIG_BLOCK)
        if not isinstance(block, dict) or not isinstance(block.get("layers"), dict):
            self._ckpt.close()
            raise InputError(f"{self.path}: config.json has no '{CONFIG_BLOCK}' block: not a gptq2xpu output")
        self.block = block
        self.encoding: str = block["nibble_encoding"]
        self._ranks: dict[int, Checkpoint] = {}

    @property
    def layers(self) -> list[str]:
        """Prefixes of the converted MoE layers, in model order."""
        return list(self.block["layers"])

    @property
    def config(self) -> dict:
        return self._ckpt.config

    @property
    def routing(self) -> dict:
        return dict(self.block.get("routing") or {})

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        """Any other tensor of the checkpoint (router, norms...) as torch."""
        return read_tensor(self._ckpt, name, device)

    def layer(self, prefix: str, *, device="cpu", dtype: torch.dtype = torch.bfloat16, tp_rank: int = 0,
              tp_size: int = 1, signed: bool | None = None, signed_dtype: torch.dtype = torch.int8,
              pin_memory: bool = False) -> MoELayerWeights:
        """The tensors XpuFusedMoe takes for layer ``prefix``.

        ``dtype`` is the activation dtype: scales are handed over in it (the kernel reads them so).
        ``signed``: None keeps the stored encoding; True hands over s4 nibbles marked so the kernel
        skips its conversion; False hands over u4b8.  ``signed_dtype``: the dtype signed bytes are
        handed over in (int8, what current kernels read as int4; uint8 for explicit-flag versions).
        """
        if signed_dtype not in (torch.int8, torch.uint8):
            raise UsageError(f"signed_dtype {signed_dtype}: choose torch.int8 or torch.uint8")
        info = self.block["layers"].get(prefix)
        if info is None:
            raise UsageError(f"{prefix}: not a converted MoE layer of {self.path}")
        if not 0 <= tp_rank < tp_size:
            raise UsageError(f"tp_rank {tp_rank} is not in 0..{tp_size - 1}")
        e, k = int(info["experts"]), int(info["hidden_size"])
        p = int(info["padded_intermediate_size"])
        g13, g2 = int(info["w13_group_size"]), int(info["w2_group_size"])
        if p % tp_size or (p // tp_size) % g2:
            raise UsageError(f"{prefix}: N={p} cannot be split over {tp_size} ranks in whole groups of {g2}; "
                             f"convert with --tp-size {tp_size}")
        pt = p // tp_size
        source = self._rank_ckpt(tp_rank, tp_size)
        names = {w: f"{prefix}.experts.{w}" for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")}
        if tp_size == 1 or source is not None:
            ck = source or self._ckpt
            w13, s13, w2, s2 = (read_tensor(ck, names[w]) for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales"))
        else:
            w13 = _rows(self._ckpt, names["w13_qweight"], e, p, tp_rank, pt)
            s13 = _rows(self._ckpt, names["w13_scales"], e, p, tp_rank, pt)
            w2 = _cols(self._ckpt, names["w2_qweight"], e, tp_rank, tp_size)
            s2 = _cols(self._ckpt, names["w2_scales"], e, tp_rank, tp_size)
        encoding = self.encoding
        want_signed = (encoding == "s4") if signed is None else signed
        for t in (w13, w2):
            if want_signed != (encoding == "s4"):
                t.bitwise_xor_(0x88)  # u4b8 <-> s4 on the host, in place
        encoding = "s4" if want_signed else "u4b8"
        if want_signed:
            w13, w2 = w13.view(signed_dtype), w2.view(signed_dtype)
        s13, s2 = s13.to(dtype), s2.to(dtype)
        if pin_memory and torch.device(device).type != "cpu":
            w13, s13, w2, s2 = (t.pin_memory() for t in (w13, s13, w2, s2))
        nb = pin_memory
        w13, s13, w2, s2 = (t.to(device, non_blocking=nb) for t in (w13, s13, w2, s2))
        if want_signed:
            setattr(w13, SKIP_CONVERSION_ATTR, True)
        return MoELayerWeights(prefix, w13, s13, w2, s2, encoding, e, k, pt, g13, g2, tp_rank, tp_size)

    def iter_layers(self, **kwargs):
        """Yield :class:`MoELayerWeights` for every converted layer (one layer in memory at a time)."""
        for prefix in self.layers:
            yield self.layer(prefix, **kwargs)

    def _rank_ckpt(self, rank: int, size: int) -> Checkpoint | None:
        if size == 1 or int(self.block.get("tp_size", 1)) != size or not self.block.get("tp_ranks"):
            return None
        if rank not in self._ranks:
            rel = check_member_name(self.block["tp_ranks"][rank], "tp_ranks")
            self._ranks[rank] = open_checkpoint(self.path / rel)
        return self._ranks[rank]

    def close(self) -> None:
        self._ckpt.close()
        for c in self._ranks.values():
            c.close()
        self._ranks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_converted(path: str | os.PathLike) -> ConvertedCheckpoint:
    """Open a folder written by ``gptq2xpu convert`` (lazily: headers only)."""
    return ConvertedCheckpoint(path)


def _rows(ckpt: Checkpoint, name: str, e: int, p: int, rank: int, pt: int) -> torch.Tensor:
    """Rank rows of a [E, 2P, C] tensor: gate rows then up rows, two contiguous reads per expert."""
    ref = ckpt.ref(name)
    cols_bytes = ref.nbytes // (e * 2 * p)
    out = torch.empty(e, 2 * pt, cols_bytes, dtype=torch.uint8)
    arr = out.numpy()
    for ex in range(e):
        base = ex * 2 * p * cols_bytes
        for half, row0 in ((0, rank * pt), (1, p + rank * pt)):
            ckpt.read_into(ref, arr[ex, half * pt : (half + 1) * pt], offset=base + row0 * cols_bytes)
    return out.view(torch_dtype(ref.dtype, name)).reshape(e, 2 * pt, -1)


def _cols(ckpt: Checkpoint, name: str, e: int, rank: int, size: int) -> torch.Tensor:
    """Rank columns of a [E, K, C] tensor (each expert's block is read, its rank columns kept)."""
    ref = ckpt.ref(name)
    _, k, c = ref.shape
    isz = ref.nbytes // (e * k * c)
    cr = c // size
    out = np.empty((e, k, cr * isz), dtype=np.uint8)
    block = np.empty((k, c * isz), dtype=np.uint8)
    for ex in range(e):
        ckpt.read_into(ref, block, offset=ex * block.nbytes)
        out[ex] = block[:, rank * cr * isz : (rank + 1) * cr * isz]
    return torch.from_numpy(out).view(torch_dtype(ref.dtype, name)).reshape(e, k, cr)
