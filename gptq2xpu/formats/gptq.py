"""GPTQ (AutoGPTQ / GPTQModel / AutoRound ``auto_gptq`` export), checkpoint_format v1 and v2.

Per linear layer with input size K, output size N and group size g::

    qweight  int32 [K/8, N]    input row 8r+j sits in bits 4j..4j+3 of word [r, n]
    scales   fp16  [K/g, N]    (bf16 and fp32 also seen)
    qzeros   int32 [K/g, N/8]  zero points packed along N; v1 stores zero-1, v2 the zero itself
    g_idx    int32 [K]         group of each input row; arange(K)//g unless act-order reordered them

Worked example (K=8, N=1): codes for inputs 0..7 = [1, 2, 3, 4, 5, 6, 7, 15] pack into the single
word ``0xF7654321``.  The XPU row for output 0 is the same word: as little-endian bytes
``21 43 65 F7`` -> byte 0 holds input 0 (low nibble 1) and input 1 (high nibble 2).  That is why the
repack is only a transpose of the int32 matrix: ``rows = qweight.T`` (:mod:`gptq2xpu.repack` does it).

Only 4-bit symmetric data is accepted: every qzeros nibble must be 7 (v1) or 8 (v2), and g_idx
(when present) must be ``arange(K)//g``.  The data decides, not only the config.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .base import ProjSpec, QuantFormat

_SYMMETRIC_WORD = {"gptq": 0x77777777, "gptq_v2": 0x88888888}


class GptqFormat(QuantFormat):
    name = "gptq"
    required = frozenset({"qweight", "scales"})
    packed, scales = "qweight", "scales"
    input_major = True

    def in_out(self, ckpt, fields):
        n_out = ckpt.ref(fields["qweight"]).shape[-1]
        g_idx = fields.get("g_idx")
        return (ckpt.ref(g_idx).shape[0] if g_idx else None), n_out

    def describe(self, ckpt, fields, in_features, where):
        qw = ckpt.ref(fields["qweight"])
        sc = ckpt.ref(fields["scales"]) if "scales" in fields else None
        if sc is None:
            raise InputError(f"{where}: missing scales tensor")
        if qw.dtype != "I32" or len(qw.shape) != 2:
            raise InputError(f"{qw.name}: GPTQ qweight must be 2-D int32, found {qw.dtype}{list(qw.shape)}")
        rows, n_out = qw.shape
        if in_features <= 0 or (32 * rows) % in_features:
            raise InputError(f"{qw.name}: {rows} packed rows do not fit input size {in_features}")
        bits = 32 * rows // in_features
        if len(sc.shape) != 2 or sc.shape[1] != n_out or sc.shape[0] == 0:
            raise InputError(f"{sc.name}: scales {list(sc.shape)} do not match qweight {list(qw.shape)} "
                             f"(want [groups, {n_out}])")
        if sc.dtype not in ("F16", "BF16", "F32"):
            raise InputError(f"{sc.name}: scales dtype {sc.dtype} is not a float type")
        n_groups = sc.shape[0]
        if in_features % n_groups:
            raise InputError(f"{sc.name}: {n_groups} scale groups do not divide input size {in_features}")
        group = in_features // n_groups
        zeros = fields.get("qzeros")
        if zeros:
            qz = ckpt.ref(zeros)
            want = [n_groups, n_out * bits // 32]
            if qz.dtype != "I32" or list(qz.shape) != want:
                raise InputError(f"{qz.name}: qzeros {qz.dtype}{list(qz.shape)} should be I32{want}")
        g_idx = fields.get("g_idx")
        if g_idx:
            gi = ckpt.ref(g_idx)
            if gi.dtype not in ("I32", "I64") or list(gi.shape) != [in_features]:
                raise InputError(f"{gi.name}: g_idx {gi.dtype}{list(gi.shape)} should be I32[{in_features}]")
        return ProjSpec(in_features, n_out, bits, group, sc.dtype)

    def check(self, ckpt, fields, spec, checkpoint_format):
        if "qzeros" in fields:
            qz = ckpt.read(fields["qzeros"]).view(np.uint32)
            want = _SYMMETRIC_WORD[checkpoint_format]
            if not (qz == want).all():
                other = {v: k for k, v in _SYMMETRIC_WORD.items() if k != checkpoint_format}
                first = int(qz.reshape(-1)[0])
                if (qz == first).all() and first in other:
                    raise InputError(
                        f"{fields['qzeros']}: zero points are 0x{first:08X}, the {other[first]} convention, but the "
                        f"config says checkpoint_format {checkpoint_format!r}; the checkpoint is mislabelled"
                    )
                bad = np.flatnonzero(qz.reshape(-1) != want)[0]
                raise InputError(
                    f"{fields['qzeros']}: asymmetric zero points (word {bad} is 0x{int(qz.reshape(-1)[bad]):08X}, "
                    f"symmetric {checkpoint_format} stores 0x{want:08X}); the XPU kernel runs symmetric int4 only"
                )
        if "g_idx" in fields:
            gi = ckpt.read(fields["g_idx"])
            if not np.array_equal(gi, np.arange(spec.in_features) // spec.group_size):
                raise InputError(
                    f"{fields['g_idx']}: input rows are reordered (act-order / desc_act); the XPU kernel "
                    "has no g_idx support"
                )
