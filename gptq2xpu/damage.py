"""Damage a converted layer's headers cannot show, checked on its expert tensors once they are read
(torch): non-finite scales, and padding that is not weight 0.  Used by the vLLM plugin and
:mod:`gptq2xpu.load`; each raises :class:`~gptq2xpu.errors.InputError` with one line naming the tensor.
"""

from __future__ import annotations

import torch

from .errors import InputError

_VERIFY = "the checkpoint is damaged: check it with `gptq2xpu verify`"


def refuse_nonfinite(name: str, scales: torch.Tensor, where: str = "") -> None:
    """``scales`` holds no NaN or infinity: every weight of its group would come out non-finite, and
    so would every token routed to that expert."""
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InputError(f"{name}: {int(bad.sum())} scale(s) are not finite (NaN or infinity), the first "
                         f"{float(scales[first])} at {list(first)}{where}; {_VERIFY}")


def refuse_nonzero_padding(name: str, packed: torch.Tensor, *, w13: bool, valid: int, n: int, p: int,
                           encoding: str, where: str = "") -> None:
    """``packed`` (uint8 ``[E, 2R, K/2]`` w13 or ``[E, K, R/2]`` w2 of R intermediate values, the first
    ``valid`` of them real, the rest padding of N to P by ``convert --tp-size``) holds weight 0 in its
    padding: anything else would add to the output wherever its scale is nonzero."""
    if p == n:
        return
    zero = 0x00 if encoding == "s4" else 0x88  # code 8 = weight 0, in both nibbles
    if w13:
        half = packed.shape[1] // 2
        parts = ((packed[:, valid:half], (0, valid, 0)), (packed[:, half + valid:], (0, half + valid, 0)))
    else:
        parts = ((packed[:, :, valid // 2:], (0, 0, valid // 2)),)
    for part, origin in parts:
        bad = part != zero
        if bool(bad.any()):
            first = tuple(int(i) + o for i, o in zip(bad.nonzero()[0], origin, strict=True))
            raise InputError(f"{name}: byte {list(first)}{where} lies in the padding (intermediate values "
                             f"{n}..{p - 1}) and is 0x{int(packed[first]):02X}, not weight 0 (0x{zero:02X}); {_VERIFY}")
