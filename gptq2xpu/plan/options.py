"""What the user asked for: the conversion options, validated."""

from __future__ import annotations

from dataclasses import dataclass

from ..contract import ENCODINGS
from ..errors import UsageError

DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' save_pretrained default, "5GB"
SCALE_DTYPE_CHOICES = ("keep", "float16", "bfloat16")
#: Output formats (``--format``): the stacked XPU layout (the default) and compressed-tensors
#: pack-quantized (see :mod:`gptq2xpu.outputs`).
OUTPUT_FORMATS = ("xpu", "compressed-tensors")


@dataclass(frozen=True)
class ConvertOptions:
    scale_dtype: str = "keep"            # keep | float16 | bfloat16
    nibble_encoding: str = "u4b8"        # u4b8 | s4
    max_shard_size: int = DEFAULT_MAX_SHARD
    keep_unsupported: bool = False
    dequantize_router: bool = False
    tp_size: int = 1
    emit_ranks: bool = False
    output_format: str = "xpu"           # xpu | compressed-tensors

    @property
    def compressed_tensors(self) -> bool:
        return self.output_format == "compressed-tensors"

    def __post_init__(self):
        if self.scale_dtype not in SCALE_DTYPE_CHOICES:
            raise UsageError(f"--scale-dtype {self.scale_dtype!r}: choose keep, float16 or bfloat16")
        if self.nibble_encoding not in ENCODINGS:
            raise UsageError(f"--nibble-encoding {self.nibble_encoding!r}: choose u4b8 or s4")
        if self.tp_size < 1:
            raise UsageError(f"--tp-size {self.tp_size}: must be at least 1")
        if self.emit_ranks and self.tp_size < 2:
            raise UsageError("--emit-ranks needs --tp-size 2 or more")
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(f"--format {self.output_format!r}: choose xpu or compressed-tensors")
        if self.compressed_tensors and self.nibble_encoding != "u4b8":
            raise UsageError("--nibble-encoding s4 cannot be used with --format compressed-tensors (its packed "
                             "weights are offset-8 codes by definition)")
        if self.compressed_tensors and self.emit_ranks:
            raise UsageError("--emit-ranks cannot be used with --format compressed-tensors (vLLM slices its "
                             "tensors itself)")
