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

from dataclasses import dataclass

import numpy as np

from ..contract import (
    CT_FIELDS,
    W2_QWEIGHT,
    W2_SCALES,
    W13_QWEIGHT,
    W13_SCALES,
    ConvertedBlock,
    ConvertedLayer,
    expert_linear_names,
)
from ..read.checkpoint import Checkpoint
from ..read.quant_config import NESTED_CONFIG_KEYS
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
    out = []
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


#: Source tensor fields a linear written as compressed-tensors must not keep.
_LEFTOVER_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "weight")


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
    return out


def config_problems(config: dict, block: ConvertedBlock) -> tuple[list[str], str]:
    """Every ``quantization_config`` of a compressed-tensors output (at the top of config.json and
    in each nested model config that holds one, where convert writes it after the source): each
    checked by :func:`_one_config_problems`.  Returns (problems, how they were checked)."""
    found = [("quantization_config", config["quantization_config"])] if "quantization_config" in config else []
    found += [(f"{key}.quantization_config", sub["quantization_config"]) for key in NESTED_CONFIG_KEYS
              if isinstance(sub := config.get(key), dict) and "quantization_config" in sub]
    if not found:
        return ["config.json has no quantization_config"], ""
    problems, how = [], ""
    for where, qc in found:
        these, how = _one_config_problems(qc, block)
        problems += [f"{where}: {p}" for p in these] if len(found) > 1 or where != "quantization_config" else these
    return problems, how


def _one_config_problems(qc: object, block: ConvertedBlock) -> tuple[list[str], str]:
    """One ``quantization_config``: compressed-tensors' own pydantic model accepts it (where the
    package is installed), it says 4-bit symmetric pack-quantized groups, and every group size the
    block records has a config group."""
    if not isinstance(qc, dict):
        return [f"expected an object, found {type(qc).__name__}"], ""
    problems = []
    how = "fields read directly"
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        QuantizationConfig = None  # noqa: N806 - the package's class, when installed
    if QuantizationConfig is not None:
        how = "validated by the compressed-tensors package's QuantizationConfig"
        try:
            QuantizationConfig.model_validate(qc)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, reported
            problems.append(f"compressed-tensors rejects it: {str(exc).splitlines()[0]}")
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        problems.append(f"quant_method/format {qc.get('quant_method')!r}/{qc.get('format')!r}, not "
                        "compressed-tensors/pack-quantized")
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    sizes = set()
    for name, grp in groups.items():
        w = grp.get("weights") if isinstance(grp, dict) else None
        if not isinstance(w, dict) or (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) \
                != (4, "int", True, "group"):
            problems.append(f"config_groups.{name}: not a 4-bit symmetric int group scheme")
            continue
        sizes.add(w.get("group_size"))
    wanted = {lyr.w13_group_size for lyr in block.layers.values()} | {lin.group_size for lin in block.linears.values()}
    if wanted - sizes:
        problems.append(f"no config group for group size(s) {sorted(wanted - sizes)}")
    return problems, how
