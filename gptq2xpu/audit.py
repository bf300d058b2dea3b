"""What only the data can tell, checked before anything is published: for every converted layer,
symmetric zero points, input rows in natural order, and finite scales, also after the cast to the
output scale dtype (``--scale-dtype float16`` overflows above 65504).

This is the one step of ``convert`` that reads source tensors other than to copy them: the small
metadata tensors (qzeros, g_idx, scales) of every expert.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .formats import FORMATS
from .naming import ROLES
from .plan import LayerPlan, Plan
from .read import Checkpoint
from .repack import from_float32, read_scales, to_float32


def audit(plan: Plan, ckpt: Checkpoint, layers: list[LayerPlan] | None = None) -> list[str]:
    """Raise InputError on data the kernel cannot run; return warnings (all-zero scale groups).
    ``layers``: these converted layers only (default: all)."""
    warnings: list[str] = []
    for layer in plan.converted if layers is None else layers:
        for e in range(layer.experts):
            warnings.extend(_audit_expert(plan, ckpt, layer, e))
    return warnings


def audit_linears(plan: Plan, ckpt: Checkpoint) -> list[str]:
    """The same checks for the linears a compressed-tensors output writes outside the MoE layers."""
    warnings: list[str] = []
    for lin in plan.linears.values():
        warnings.extend(_audit_projection(plan, ckpt, FORMATS[lin.format], lin.fields, lin.spec, lin.scale_dtype))
    return warnings


def _audit_expert(plan: Plan, ckpt: Checkpoint, layer: LayerPlan, e: int) -> list[str]:
    fmt = FORMATS[layer.format]
    warn = []
    for role in ROLES:
        warn += _audit_projection(plan, ckpt, fmt, layer.fields(e, role), layer.specs[role], layer.scale_dtype)
    return warn


def _audit_projection(plan: Plan, ckpt: Checkpoint, fmt, fields: dict[str, str], spec, out_dtype: str) -> list[str]:
    """One quantized projection: symmetric, natural row order, finite scales (also in ``out_dtype``)."""
    fmt.check(ckpt, fields, spec, plan.quant.checkpoint_format)
    s = to_float32(read_scales(ckpt, fmt, fields), spec.scale_dtype)
    name = fields[fmt.scales]
    if not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))[0]
        raise InputError(f"{name}: non-finite scale {s[tuple(bad)]} at output {bad[0]}, group {bad[1]}")
    if out_dtype != spec.scale_dtype:
        with np.errstate(over="ignore"):
            cast = to_float32(from_float32(s, out_dtype), out_dtype)
        if not np.isfinite(cast).all():
            bad = np.argwhere(~np.isfinite(cast))[0]
            raise InputError(f"{name}: scale {s[tuple(bad)]} at output {bad[0]}, group {bad[1]} does not fit "
                             f"{out_dtype} (--scale-dtype); keep the stored dtype or choose bfloat16")
    zero = s == 0
    if zero.any():
        return [f"{name}: {int(zero.sum())} scale(s) are exactly zero (those weight groups are all zero)"]
    return []
