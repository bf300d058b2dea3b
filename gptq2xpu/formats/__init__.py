"""On-disk quantization formats, one module each, behind a tiny registry.

A format answers, for one quantized projection of one expert: its shape and group size from the
headers alone (:meth:`QuantFormat.describe`), whether its data is something the XPU kernel can run
(:meth:`QuantFormat.check`: symmetric zero point, rows in natural order), and where its packed
int32 words and scales are and in which orientation (:attr:`QuantFormat.input_major`).
:mod:`gptq2xpu.repack` turns them into XPU rows: row ``n`` of ``[out, in/8]`` int32 words holds
output channel ``n``, input ``8w+j`` in bits ``4j..4j+3`` of word ``w``; viewed as little-endian
bytes that is ``[out, in/2]`` uint8 with input ``2j`` in the low and ``2j+1`` in the high nibble of
byte ``j``.
"""

from __future__ import annotations

from .base import ProjSpec, QuantFormat
from .compressed_tensors import CompressedTensorsFormat
from .gptq import GptqFormat

#: Registry, in detection order.
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (GptqFormat(), CompressedTensorsFormat())}


def format_for_fields(fields) -> QuantFormat | None:
    """The format whose required tensor fields are all present in ``fields`` (None: not quantized)."""
    fields = set(fields)
    for fmt in FORMATS.values():
        if fmt.required <= fields:
            return fmt
    return None


__all__ = ["FORMATS", "ProjSpec", "QuantFormat", "format_for_fields", "GptqFormat", "CompressedTensorsFormat"]
