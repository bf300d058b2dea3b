"""A small loader for runtimes: converted MoE layers, and ``XpuFusedMoe`` objects built from them.

>>> import torch
>>> from gptq2xpu.load import make_xpu_fused_moe, open_converted
>>> ckpt = open_converted("qwen3-xpu")                                              # doctest: +SKIP
>>> for layer in ckpt.iter_layers(device="xpu", dtype=torch.bfloat16, signed=True):  # doctest: +SKIP
...     moe = make_xpu_fused_moe(layer, ckpt.routing["top_k"])

The checkpoint is opened lazily (headers only, validated like any untrusted input); each layer
reads only its own bytes.  For one tensor-parallel rank (``tp_rank``/``tp_size``) it reads the
rank's folder written by ``convert --emit-ranks`` when there is one (contiguous, only that rank's
bytes), else the rank's slice as :meth:`gptq2xpu.contract.LayerGeometry.rank_slices` names it: its
rows of w13 (contiguous per expert) and each expert's w2 block, keeping that rank's columns.

A layer's packed weights are uint8, the on-disk dtype; ``encoding`` says what the bytes hold:
offset-8 nibbles (``"u4b8"``) or signed ones (``"s4"``, already converted as the kernel's
``implement_zp`` would).  ``signed=True`` hands over s4 (converted on the host if stored as u4b8),
``signed=False`` u4b8, the default keeps what is stored.

:func:`make_xpu_fused_moe` builds the kernel object the way the released vllm-xpu-kernels 0.1.16.2
takes int4 (see :mod:`gptq2xpu.xpu_handover`): u4b8 goes in as uint8 and its constructor converts
it into an int8 copy; s4 goes in as uint8 marked ``xpu_fused_moe`` (int4 detected, nothing
rewritten) and the instance then holds int8 views of the same storage (no second copy on the
device).  Do not pass a layer's tensors to ``XpuFusedMoe`` yourself: that release recognises int4
only from a uint8 ``w13`` in its constructor and only from int8 weights in its grouped GEMM, and
its constructor rebinds the tensors it converts.  This was tested against that release's Python
interface on CPU with its native ops replaced; no Intel XPU ran it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import torch
except ImportError:  # one line with how to get it, as verify --source and the plugin say it
    from .optional_torch import require_torch

    require_torch("gptq2xpu.load (the loader)")

from .contract import (
    CONFIG_BLOCK,
    EXPERT_TENSORS,
    ROWS,
    ConvertedBlock,
    ConvertedLayer,
    RankSlice,
    parse_block,
    tensor_dtype,
)
from .damage import refuse_nonfinite, refuse_nonzero_padding
from .errors import InputError, UsageError
from .read.checkpoint import Checkpoint, open_checkpoint
from .safetensors_io import BITS_DTYPES
from .torch_io import read_tensor, torch_dtype
from .xpu_handover import SKIP_CONVERSION_ATTR, build_fused_moe, kernel_class


@dataclass
class MoELayerWeights:
    """One MoE layer's expert weights in the XPU layout (one rank's slice when tensor-parallel).

    An ``"s4"`` layer's ``w13`` carries the attribute ``xpu_fused_moe`` (its bytes must not be
    converted again).  Build the kernel object with :func:`make_xpu_fused_moe`.
    """

    prefix: str
    w13: torch.Tensor            # uint8 [E, 2*N_rank, K/2]
    w13_scales: torch.Tensor     # [E, 2*N_rank, K/g13], in the requested activation dtype
    w2: torch.Tensor             # uint8 [E, K, N_rank/2]
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
        self._ckpt: Checkpoint = open_checkpoint(self.path, links="none")
        try:
            doc = self._ckpt.config.get(CONFIG_BLOCK)
            if doc is None:
                raise InputError(f"{self.path}: config.json has no '{CONFIG_BLOCK}' block: not a gptq2xpu output")
            self.block: ConvertedBlock = parse_block(doc, f"{self.path}/config.json:{CONFIG_BLOCK}")
            if self.block.compressed_tensors:
                raise InputError(f"{self.path}: a compressed-tensors output (convert --format compressed-tensors): "
                                 "serve it with vLLM, which loads it without the plugin; gptq2xpu.load reads "
                                 "--format xpu outputs")
        except BaseException:
            self._ckpt.close()
            raise
        self.encoding: str = self.block.nibble_encoding
        self._ranks: dict[int, Checkpoint] = {}

    @property
    def layers(self) -> list[str]:
        """Prefixes of the converted MoE layers, in model order."""
        return list(self.block.layers)

    @property
    def config(self) -> dict:
        return self._ckpt.config

    @property
    def routing(self) -> dict:
        """The block's routing (``top_k`` when recorded, ``scoring``, ``renormalize``, ``routed_scaling_factor``)."""
        return dict(self.block.routing)

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        """Any other tensor of the checkpoint (router, norms...) as torch."""
        return read_tensor(self._ckpt, name, device)

    def layer(self, prefix: str, *, device="cpu", dtype: torch.dtype = torch.bfloat16, tp_rank: int = 0,
              tp_size: int = 1, signed: bool | None = None, pin_memory: bool = False) -> MoELayerWeights:
        """Layer ``prefix``'s expert weights: packed uint8 bytes and scales, on ``device``.

        ``dtype`` is the activation dtype: scales are handed over in it (the kernel reads them so).
        ``signed``: None keeps the stored encoding; True gives s4 bytes, False u4b8 bytes
        (converted on the host, ``byte ^ 0x88``, when stored the other way).
        """
        info = self.block.layers.get(prefix)
        if info is None:
            raise UsageError(f"{prefix}: not a converted MoE layer of {self.path}")
        if not 0 <= tp_rank < tp_size:
            raise UsageError(f"tp_rank {tp_rank} is not in 0..{tp_size - 1}")
        geo = info.geometry
        if not geo.splits(tp_size):
            raise UsageError(f"{prefix}: N={geo.padded} cannot be split over {tp_size} ranks in whole groups of "
                             f"{geo.g2}; convert with --tp-size {tp_size}")
        source = self._rank_ckpt(tp_rank, tp_size)
        names = {w: info.tensor(w) for w in EXPERT_TENSORS}
        if tp_size == 1 or source is not None:
            ck = source or self._ckpt
            _check_headers(ck, info, names, tp_size)
            w13, s13, w2, s2 = (read_tensor(ck, names[w]) for w in EXPERT_TENSORS)
        else:
            _check_headers(self._ckpt, info, names, 1)
            parts = geo.rank_slices(tp_rank, tp_size)
            shapes = geo.shapes(tp_size)
            w13, s13, w2, s2 = (_rank_part(self._ckpt, names[w], parts[w], shapes[w]) for w in EXPERT_TENSORS)
        where = "" if tp_size == 1 else f" of rank {tp_rank}'s slice of {tp_size}"
        if source is not None:
            where += f" (read from {self.block.tp_ranks[tp_rank]})"
        for what, scales in (("w13_scales", s13), ("w2_scales", s2)):
            refuse_nonfinite(names[what], scales, where)
        share = geo.padded // tp_size  # this rank's intermediate values [tp_rank*share, +share); real ones < N
        valid = min(max(geo.intermediate - tp_rank * share, 0), share)
        for what, packed in (("w13_qweight", w13), ("w2_qweight", w2)):
            refuse_nonzero_padding(names[what], packed, w13=what == "w13_qweight", valid=valid, n=geo.intermediate,
                                   p=geo.padded, encoding=self.encoding, where=where)
        want_signed = (self.encoding == "s4") if signed is None else bool(signed)
        if want_signed != (self.encoding == "s4"):
            for t in (w13, w2):
                t.bitwise_xor_(0x88)  # u4b8 <-> s4 on the host, in place
        encoding = "s4" if want_signed else "u4b8"
        s13, s2 = s13.to(dtype), s2.to(dtype)
        if pin_memory and torch.device(device).type != "cpu":
            w13, s13, w2, s2 = (t.pin_memory() for t in (w13, s13, w2, s2))
        w13, s13, w2, s2 = (t.to(device, non_blocking=pin_memory) for t in (w13, s13, w2, s2))
        if want_signed:
            setattr(w13, SKIP_CONVERSION_ATTR, True)
        return MoELayerWeights(prefix, w13, s13, w2, s2, encoding, geo.experts, geo.hidden, geo.padded // tp_size,
                               geo.g13, geo.g2, tp_rank, tp_size)

    def iter_layers(self, **kwargs):
        """Yield :class:`MoELayerWeights` for every converted layer (one layer in memory at a time)."""
        for prefix in self.layers:
            yield self.layer(prefix, **kwargs)

    def _rank_ckpt(self, rank: int, size: int) -> Checkpoint | None:
        if size == 1 or self.block.tp_size != size or not self.block.tp_ranks:
            return None
        if rank not in self._ranks:
            # parse_block accepted only the exact folder names tp-ranks/rank-RRR-of-TTT; no link on the way
            rel = self.block.tp_ranks[rank]
            self._ckpt.folder.check(rel)
            ckpt = open_checkpoint(self.path / rel, links="none")
            try:
                _check_rank_doc(ckpt, self.path / rel, rank, size)
            except BaseException:
                ckpt.close()
                raise
            self._ranks[rank] = ckpt
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


def make_xpu_fused_moe(layer: MoELayerWeights, n_experts_per_token: int, *, activation: str = "silu", **kwargs):
    """A ``vllm_xpu_kernels`` ``XpuFusedMoe`` holding ``layer``'s experts, built as release 0.1.16.2
    takes int4 weights.

    ``"u4b8"`` layers: the constructor converts the bytes into its own int8 copy (the layer's
    tensors stay as they are; drop the layer to free them).  ``"s4"`` layers (``signed=True``): no
    conversion and no copy, the object holds int8 views of the layer's own storage.  ``kwargs`` go
    to ``XpuFusedMoe`` unchanged (``ep_rank``, ``ep_size``, ``expert_map``...).  Raises
    :class:`~gptq2xpu.errors.UsageError` (one line) when ``vllm_xpu_kernels`` cannot be imported or
    the installed version does not take the weights as 0.1.16.2 does.  Checked against that
    release's Python interface on CPU, never on an Intel XPU.
    """
    return build_fused_moe(kernel_class(), layer.w13, layer.w13_scales, layer.w2, layer.w2_scales,
                           encoding=layer.encoding, n_experts_per_token=n_experts_per_token, activation=activation,
                           w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, **kwargs)


def _check_rank_doc(ckpt: Checkpoint, folder: Path, rank: int, size: int) -> None:
    """A rank folder says which rank it holds (``rank.json``): folders renamed or swapped would
    otherwise hand one rank another rank's weights, which have the very same shapes.  Each shard
    says so too (its safetensors metadata), so one copied in from another rank's folder is caught."""
    try:
        doc = ckpt.folder.read_json("rank.json")
    except InputError as exc:
        raise InputError(f"{folder}: {exc.message}") from None
    found = (doc.get("tp_rank"), doc.get("tp_size"))
    if found != (rank, size) or not all(type(v) is int for v in found):
        raise InputError(f"{folder}: its rank.json names rank {str(found[0])[:20]} of {str(found[1])[:20]}, "
                         f"but the config block puts rank {rank} of {size} in this folder")
    for file, header in sorted(ckpt.shards.items()):
        meta = (header.metadata.get("tp_rank"), header.metadata.get("tp_size"))
        if meta != (str(rank), str(size)):
            raise InputError(f"{folder}/{file}: its metadata names rank {str(meta[0])[:20]} of {str(meta[1])[:20]}, "
                             f"but it lies in the folder of rank {rank} of {size}")


def _check_headers(ckpt: Checkpoint, info: ConvertedLayer, names: dict[str, str], tp_size: int) -> None:
    """The four tensors' headers hold the dtypes and shapes the config block promises (``tp_size``:
    1 for the whole checkpoint's tensors, else that of the rank files read)."""
    for what, shape in info.geometry.shapes(tp_size).items():
        dtype = tensor_dtype(what, info.scale_dtype)
        ref = ckpt.ref(names[what])
        if ref.dtype != dtype or tuple(ref.shape) != shape:
            raise InputError(f"{names[what]}: {ref.dtype} {list(ref.shape)} in the checkpoint, but the config block "
                             f"says {dtype} {list(shape)}")



def _rank_part(ckpt: Checkpoint, name: str, part: RankSlice, shape: tuple[int, int, int]) -> torch.Tensor:
    """One rank's slice (``part``, of ``shape``) of a whole [E, R, C] tensor.  Spans of rows are
    contiguous on disk and read as they are (two reads per expert for w13); for spans of columns
    each expert's block is read and its columns kept."""
    ref = ckpt.ref(name)
    e, rows, cols = ref.shape
    bits = BITS_DTYPES[ref.dtype]
    out = np.empty(shape, dtype=bits)
    block = None if part.axis == ROWS else np.empty((rows, cols), dtype=bits)
    for ex in range(e):
        base = ex * rows * cols * out.itemsize
        if block is None:
            for (start, _), dst in part.placed():
                ckpt.read_into(ref, out[ex, slice(*dst)], offset=base + start * cols * out.itemsize)
        else:
            ckpt.read_into(ref, block, offset=base)
            for src_key, dst_key in part.pairs():
                out[ex][dst_key] = block[src_key]
    return torch.from_numpy(out).view(torch_dtype(ref.dtype, name))
