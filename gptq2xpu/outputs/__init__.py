"""Output formats, one module each, behind a tiny registry (``convert --format``).

* ``xpu`` (:mod:`.xpu`, the default): every converted MoE layer's experts as four stacked tensors
  in the layout the Intel XPU fused-MoE kernel takes without a copy; served by vLLM with the
  gptq2xpu plugin.
* ``compressed-tensors`` (:mod:`.compressed_tensors`): every 4-bit linear as compressed-tensors
  ``pack-quantized`` (what llm-compressor writes for W4A16); served by stock vLLM of any current
  release and platform, no plugin.

A format decides the output tensors of the plan (:meth:`OutputFormat.items`) and the
``quantization_config`` serving reads (:meth:`OutputFormat.quantization_config`).  The plan as data
(:class:`gptq2xpu.plan.Plan`) stays the single source of truth; the writer builds every byte from it.
"""

from __future__ import annotations

from .base import OutputFormat
from .compressed_tensors import CompressedTensorsOutput
from .xpu import XpuOutput

#: Registry: ``--format`` value -> format.
OUTPUTS: dict[str, OutputFormat] = {f.name: f for f in (XpuOutput(), CompressedTensorsOutput())}


def output_format(name: str) -> OutputFormat:
    return OUTPUTS[name]


__all__ = ["OUTPUTS", "OutputFormat", "output_format", "XpuOutput", "CompressedTensorsOutput"]
