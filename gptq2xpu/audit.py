"""What only the data can tell, checked before anything is published: for every converted layer,
symmetric zero points, input rows in natural order, and finite scales, also after the cast to the
output scale dtype: ``--scale-dtype`` may change a scale by one rounding (what a cast of a number
in the dtype's normal range costs), never more -- float16 overflows above 65504, and below its
smallest normal number (6.1e-05) a scale loses digits or becomes 0.

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

#: Unit roundoff of the output scale dtypes: rounding to nearest changes a number in the dtype's
#: normal range by at most this fraction of itself (float16: 11 significant bits, bfloat16: 8).
UNIT_ROUNDOFF = {"F16": 2.0**-11, "BF16": 2.0**-8}
_SMALLEST_NORMAL = {"F16": 2.0**-14, "BF16": 2.0**-126}


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
    """One quantized projection: symmetric, natural row order, finite scales that a cast to
    ``out_dtype`` keeps (one rounding at most)."""
    fmt.check(ckpt, fields, spec, plan.quant.checkpoint_format)
    s = to_float32(read_scales(ckpt, fmt, fields), spec.scale_dtype)
    name = fields[fmt.scales]
    if not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))[0]
        raise InputError(f"{name}: non-finite scale {s[tuple(bad)]} at output {bad[0]}, group {bad[1]}")
    if out_dtype != spec.scale_dtype:
        _check_cast(s, name, out_dtype)
    zero = s == 0
    if zero.any():
        return [f"{name}: {int(zero.sum())} scale(s) are exactly zero (those weight groups are all zero)"]
    return []


def _lossy_cast(s: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, cast)``: where casting the float32 scales ``s`` to ``dtype`` changes a value by more
    than one rounding of a normal number (``|cast - s| > u * |s|``, computed in float64), and the
    cast values.  Zero stays zero; a nonzero scale that becomes 0, a subnormal that loses digits
    beyond that bound and an overflow to infinity are all in the mask."""
    with np.errstate(over="ignore"):
        cast = to_float32(from_float32(s, dtype), dtype).astype(np.float64)
    exact = s.astype(np.float64)
    with np.errstate(invalid="ignore"):
        return ~(np.abs(cast - exact) <= UNIT_ROUNDOFF[dtype] * np.abs(exact)), cast


def _check_cast(s: np.ndarray, name: str, dtype: str) -> None:
    bad_mask, cast = _lossy_cast(s, dtype)
    if not bad_mask.any():
        return
    bad = tuple(np.argwhere(bad_mask)[0])
    where = f"scale {s[bad]:.6g} at output {bad[0]}, group {bad[1]}"
    other = "keep the stored dtype or choose bfloat16" if dtype == "F16" else "keep the stored dtype"
    if not np.isfinite(cast[bad]):
        raise InputError(f"{name}: {where} does not fit {dtype} (--scale-dtype); {other}")
    raise InputError(f"{name}: {where} becomes {cast[bad]:.6g} in {dtype} (--scale-dtype): below {dtype}'s smallest "
                     f"normal number {_SMALLEST_NORMAL[dtype]:.3g} the cast loses more than one rounding; {other}")
