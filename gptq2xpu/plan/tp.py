"""Tensor parallelism: which w2 group size (or padding of N) gives every rank whole scale groups."""

from __future__ import annotations

import math

from ..contract import KERNEL_GROUPS, LayerGeometry, tensor_dtype
from ..repack import largest_group
from ..safetensors_io import DTYPE_SIZES

#: Tensor-parallel sizes ``inspect`` reports on.
REPORTED_SIZES = (1, 2, 4, 8, 16)


def choose_w2_groups(n: int, g_down: int, tp: int) -> tuple[int, int | None]:
    """(padded N, w2 group size) for ``tp`` ranks: the largest supported group that divides the
    source group and every rank's slice; only when none does, the smallest zero-padded N that
    works (ties: the larger group)."""
    if n % tp == 0:
        g = largest_group([g_down], divides=[n // tp])
        if g is not None:
            return n, g
    if tp == 1:
        return n, None
    best = None
    for g in KERNEL_GROUPS:
        if g_down % g == 0:
            cand = math.ceil(n / (tp * g)) * tp * g
            if best is None or cand < best[0]:
                best = (cand, g)
    return best if best is not None else (n, None)


def tp_report(converted, sizes=REPORTED_SIZES, requested: int = 1) -> list[dict]:
    """Which tensor-parallel sizes work as-is, by regrouping, or only by padding, and what each
    costs: the exact extra bytes of the converted tensors against a conversion for one rank
    (``--tp-size 1``), whatever ``--tp-size`` this plan was made for.  ``requested`` (the plan's
    own size) is reported too when it is not one of ``sizes``."""
    out = []
    for t in sorted({*sizes, requested}):
        how, extra = "as-is", 0
        for layer in converted:
            one = _geometry(layer, 1)
            geo = _geometry(layer, t)
            if one is None or geo is None:
                how = "impossible"
                break
            extra += _layer_bytes(geo, layer.scale_dtype) - _layer_bytes(one, layer.scale_dtype)
            if geo.padded != one.padded:
                how = "pad"
            elif geo.g2 != one.g2 and how == "as-is":
                how = "regroup"
        out.append({"tp_size": t, "how": how, "extra_bytes": int(extra) if how != "impossible" else 0})
    return out


def _geometry(layer, tp: int) -> LayerGeometry | None:
    """The layer's converted shapes for ``tp`` ranks (None: no supported group fits)."""
    base = layer.geometry
    padded, g2 = choose_w2_groups(layer.intermediate, layer.source_groups["down"], tp)
    if g2 is None:
        return None
    return LayerGeometry(base.experts, base.hidden, base.intermediate, padded, base.g13, g2)


def _layer_bytes(geo: LayerGeometry, scale_dtype: str) -> int:
    return sum(math.prod(shape) * DTYPE_SIZES[tensor_dtype(what, scale_dtype)] for what, shape in geo.shapes().items())
