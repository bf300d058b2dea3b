"""compressed-tensors ``pack-quantized`` (llm-compressor W4A16), symmetric, group strategy.

Per linear layer (output N, input K, group g)::

    weight_packed  int32 [N, K/8]   packed along K, LSB first, values offset by +8 before packing
    weight_scale   fp16/bf16 [N, K/g]
    weight_shape   int [2]          = [N, K]
    weight_zero_point               only for asymmetric schemes (refused)
    weight_g_idx   int32 [K]        only with actorder (refused unless arange(K)//g)

Viewed as little-endian bytes, ``weight_packed`` already is the XPU row layout ``[N, K/2]``: the
repack is a plain copy, no transpose (see the contract doc, section 4).

Worked example: codes (already +8) for inputs 0..7 = [8, 9, 10, 11, 12, 13, 14, 7] (weights
0, 1, 2, 3, 4, 5, 6, -1 times the scale) pack into ``0x7EDCBA98``; byte 0 = 0x98 holds input 0
(low nibble 8) and input 1 (high nibble 9).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import ProjSpec, QuantFormat


class CompressedTensorsFormat(QuantFormat):
    name = "compressed-tensors"
    required = frozenset({"weight_packed", "weight_scale"})
    packed, scales = "weight_packed", "weight_scale"
    input_major = False

    def in_out(self, ckpt, fields):
        wp = ckpt.ref(fields["weight_packed"])
        g_idx = fields.get("weight_g_idx")
        return (ckpt.ref(g_idx).shape[0] if g_idx else None), wp.shape[0]

    def describe(self, ckpt, fields, in_features, where):  # noqa: ARG002 (messages name tensors)
        wp = ckpt.ref(fields["weight_packed"])
        sc = ckpt.ref(fields["weight_scale"])
        if wp.dtype != "I32" or len(wp.shape) != 2:
            raise InputError(f"{wp.name}: weight_packed must be 2-D int32, found {wp.dtype}{list(wp.shape)}")
        n_out, cols = wp.shape
        if in_features <= 0 or (32 * cols) % in_features:
            raise InputError(f"{wp.name}: {cols} packed columns do not fit input size {in_features}")
        bits = 32 * cols // in_features
        if len(sc.shape) != 2 or sc.shape[0] != n_out or sc.shape[1] == 0:
            raise InputError(f"{sc.name}: weight_scale {list(sc.shape)} should be [{n_out}, groups]")
        if sc.dtype not in ("F16", "BF16", "F32"):
            raise InputError(f"{sc.name}: weight_scale dtype {sc.dtype} is not a float type")
        if in_features % sc.shape[1]:
            raise InputError(f"{sc.name}: {sc.shape[1]} scale groups do not divide input size {in_features}")
        if "weight_shape" in fields:
            ws = ckpt.ref(fields["weight_shape"])
            if ws.dtype not in ("I32", "I64") or list(ws.shape) != [2]:
                raise InputError(f"{ws.name}: weight_shape should be a 2-element integer tensor")
        return ProjSpec(in_features, n_out, bits, in_features // sc.shape[1], sc.dtype)

    def check(self, ckpt, fields, spec, checkpoint_format):  # noqa: ARG002 (one format, no variants)
        if "weight_shape" in fields:
            shape = [int(v) for v in ckpt.read(fields["weight_shape"]).reshape(-1)]
            if shape != [spec.out_features, spec.in_features]:
                raise InputError(f"{fields['weight_shape']}: says {shape}, tensors say "
                                 f"[{spec.out_features}, {spec.in_features}]")
        if "weight_zero_point" in fields:
            name = fields["weight_zero_point"]
            zp = ckpt.read(name)
            if zp.dtype == np.uint8:
                raise InputError(f"{name}: asymmetric zero points; the XPU kernel runs symmetric int4 only")
            if zp.dtype == np.int32 and zp.ndim == 2 and zp.shape[0] * 32 // spec.bits == spec.out_features:
                # packed along N like the weights (pack_to_int32(zp, packed_dim=0)): value + 8 per
                # field, so a zero point of 0 is stored as 8 and 0x00000000 means -8 everywhere
                u = zp.view(np.uint32)
                per, mask = 32 // spec.bits, (1 << spec.bits) - 1
                fields_ = np.stack([(u >> (spec.bits * j)) & mask for j in range(per)], axis=1)
                zp = fields_.astype(np.int64) - (1 << (spec.bits - 1))
            if np.any(zp != 0):
                raise InputError(f"{name}: asymmetric zero points; the XPU kernel runs symmetric int4 only")
        if "weight_g_idx" in fields:
            gi = ckpt.read(fields["weight_g_idx"])
            if not np.array_equal(gi, np.arange(spec.in_features) // spec.group_size):
                raise InputError(f"{fields['weight_g_idx']}: input rows are reordered (actorder); the XPU kernel has "
                                 "no g_idx support")
