"""A compressed-tensors output seen as the stacked layout, so every check of the ``xpu`` format
runs on it unchanged.

An expert's gate and up ``weight_packed`` (int32 ``[N, K/8]``), as little-endian bytes, are its
rows ``0..N-1`` and ``N..2N-1`` of the stacked ``w13_qweight`` (uint8 ``[E, 2N, K/2]``), its
``weight_scale`` its rows of ``w13_scales``; its down projection's are its ``w2_qweight`` /
``w2_scales`` (``docs/formats.md``).  So each stacked tensor is the concatenation, expert after
expert, of per-expert tensors' bytes: :class:`StackedView` presents those concatenations under the
stacked names (read by offset like any tensor, nothing copied up front) and hides the per-expert
tensors they are made of.  Written from the format's definition, independently of the converter
(nothing here imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..contract import (
    CT_FIELDS,
    EXPERT_TENSORS,
    W2_QWEIGHT,
    W2_SCALES,
    W13_QWEIGHT,
    W13_SCALES,
    ConvertedBlock,
    ConvertedLayer,
    expert_linear_names,
)
from ..read.checkpoint import Checkpoint
from ..safetensors_io import DTYPE_SIZES


@dataclass(frozen=True)
class StackedRef:
    """A stacked tensor made of other tensors' bytes, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPE_SIZES[self.dtype]


def part_problems(ckpt: Checkpoint, layer: ConvertedLayer) -> list[str]:
    """Why the layer's per-expert tensors cannot be stacked by the block's shapes (empty: they can)."""
    k, n, g, sd = layer.hidden_size, layer.intermediate_size, layer.w13_group_size, layer.scale_dtype
    # the view presents the per-expert tensors under the stacked names: a real tensor there would be hidden by it
    out = [f"{name}: a stacked tensor of the xpu format in a compressed-tensors output"
           for name in (layer.tensor(what) for what in EXPERT_TENSORS) if name in ckpt.tensors]
    for _e, role, module in expert_linear_names(layer):
        rows, cols = (k, n) if role == "down" else (n, k)
        want = {"weight_packed": ("I32", (rows, cols // 8)), "weight_scale": (sd, (rows, cols // g)),
                "weight_shape": (None, (2,))}
        for field, (dtype, shape) in want.items():
            ref = ckpt.tensors.get(f"{module}.{field}")
            if ref is None:
                out.append(f"{module}.{field}: missing")
            elif tuple(ref.shape) != shape or (dtype and ref.dtype != dtype) or \
                    (dtype is None and ref.dtype not in ("I32", "I64")):
                out.append(f"{module}.{field}: {ref.dtype}{list(ref.shape)}, the block says "
                           f"{dtype or 'I64'}{list(shape)}")
        if len(out) > 20:
            break
    return out


class StackedView:
    """``ckpt`` with each converted layer's per-expert compressed-tensors tensors replaced by the
    four stacked tensors they make up (layers in ``skip`` are left as they are)."""

    def __init__(self, ckpt: Checkpoint, block: ConvertedBlock, skip=()):
        self._ckpt = ckpt
        virtual: dict[str, StackedRef] = {}
        hidden: set[str] = set()
        for prefix, layer in block.layers.items():
            if prefix in skip:
                continue
            names = expert_linear_names(layer)
            per = {(e, role): module for e, role, module in names}
            hidden.update(f"{m}.{f}" for _, _, m in names for f in CT_FIELDS)
            shapes = layer.shapes
            experts = range(layer.experts)
            sd = layer.scale_dtype
            spec = {
                W13_QWEIGHT: ("U8", [f"{per[e, r]}.weight_packed" for e in experts for r in ("gate", "up")]),
                W13_SCALES: (sd, [f"{per[e, r]}.weight_scale" for e in experts for r in ("gate", "up")]),
                W2_QWEIGHT: ("U8", [f"{per[e, 'down']}.weight_packed" for e in experts]),
                W2_SCALES: (sd, [f"{per[e, 'down']}.weight_scale" for e in experts]),
            }
            for what, (dtype, parts) in spec.items():
                name = layer.tensor(what)
                virtual[name] = StackedRef(name, dtype, shapes[what], tuple(ckpt.ref(p) for p in parts))
        self._virtual = virtual
        self.tensors = {n: r for n, r in ckpt.tensors.items() if n not in hidden}
        self.tensors.update(virtual)

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)

    def ref(self, name: str):
        return self._virtual.get(name) or self._ckpt.ref(name)

    read = Checkpoint.read  # Checkpoint's own: it needs only ref() and read_into(), which this view overrides

    def read_into(self, ref, out: np.ndarray, *, offset: int = 0) -> None:
        if not isinstance(ref, StackedRef):
            self._ckpt.read_into(ref, out, offset=offset)
            return
        dst = out.reshape(-1).view(np.uint8)
        end = offset + dst.nbytes
        pos = 0
        for part in ref.parts:
            lo, hi = max(offset, pos), min(end, pos + part.nbytes)
            if lo < hi:
                self._ckpt.read_into(part, dst[lo - offset : hi - offset], offset=lo - pos)
            pos += part.nbytes
            if pos >= end:
                break


def _shape_value(ckpt: Checkpoint, name: str) -> list[int]:
    return [int(v) for v in ckpt.read(name).reshape(-1)]


def shape_problems(ckpt: Checkpoint, layer: ConvertedLayer) -> list[str]:
    """Every expert's ``weight_shape`` holds ``[N, K]`` of its projection."""
    k, n = layer.hidden_size, layer.intermediate_size
    out = []
    for _e, role, module in expert_linear_names(layer):
        want = [k, n] if role == "down" else [n, k]
        got = _shape_value(ckpt, f"{module}.weight_shape")
        if got != want:
            out.append(f"{module}.weight_shape: {got}, the block says {want}")
            if len(out) > 10:
                break
    return out


#: Tensor fields a linear written as compressed-tensors must not have beside its three: the GPTQ
#: source's, a float weight, and the zero points and row order of the asymmetric or act-order
#: compressed-tensors schemes (a runtime loading this symmetric one has no place for them).
_LEFTOVER_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "weight", "weight_zero_point", "weight_g_idx")


def linear_problems(ckpt: Checkpoint, block: ConvertedBlock, finite) -> list[str]:
    """The linears outside the MoE layers: their three tensors as the block says (dtype, shape,
    ``weight_shape`` value, finite scales) and nothing of the source's form left beside them."""
    out = []
    for module, lin in block.linears.items():
        dtypes = {"weight_packed": ("I32",), "weight_scale": (lin.scale_dtype,), "weight_shape": ("I32", "I64")}
        for field, shape in lin.shapes.items():
            name = f"{module}.{field}"
            ref = ckpt.tensors.get(name)
            if ref is None:
                out.append(f"{name}: missing")
            elif ref.dtype not in dtypes[field] or tuple(ref.shape) != shape:
                out.append(f"{name}: {ref.dtype}{list(ref.shape)}, the block says {dtypes[field][0]}{list(shape)}")
            elif field == "weight_shape" and _shape_value(ckpt, name) != [lin.out_features, lin.in_features]:
                out.append(f"{name}: {_shape_value(ckpt, name)}, the block says "
                           f"{[lin.out_features, lin.in_features]}")
            elif field == "weight_scale" and not finite(ckpt, name):
                out.append(f"{name}: non-finite scales")
        out += [f"{module}.{f}: left beside its compressed-tensors form" for f in _LEFTOVER_FIELDS
                if f"{module}.{f}" in ckpt.tensors]
    unknown = sorted({name for name in ckpt.tensors if name.rpartition(".")[2] in CT_FIELDS
                      and name.rpartition(".")[0] not in block.linears and not _expert_module(name.rpartition(".")[0],
                                                                                               block)})
    out += [f"{name}: a compressed-tensors linear the config block does not describe" for name in unknown[:10]]
    return out


_EXPERT_MODULE = re.compile(r"(?P<prefix>.+)\.experts\.(?P<e>\d{1,6})\.(?P<proj>[^.]+)")


def _expert_module(module: str, block: ConvertedBlock) -> bool:
    """Whether ``module`` is an expert projection of a converted layer (``<prefix>.experts.<e>.<proj>``)."""
    m = _EXPERT_MODULE.fullmatch(module)
    layer = block.layers.get(m["prefix"]) if m else None
    return layer is not None and int(m["e"]) < layer.experts and m["proj"] in layer.source_projections.values()
