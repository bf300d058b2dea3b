"""What the user asked for: the conversion options, validated."""

from __future__ import annotations

from dataclasses import dataclass

from ..contract import ENCODINGS
from ..errors import UsageError

DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' save_pretrained default, "5GB"
SCALE_DTYPE_CHOICES = ("keep", "float16", "bfloat16")


@dataclass(frozen=True)
class ConvertOptions:
    scale_dtype: str = "keep"            # keep | float16 | bfloat16
    nibble_encoding: str = "u4b8"        # u4b8 | s4
    max_shard_size: int = DEFAULT_MAX_SHARD
    keep_unsupported: bool = False
    dequantize_router: bool = False
    tp_size: int = 1
    emit_ranks: bool = False

    def __post_init__(self):
        if self.scale_dtype not in SCALE_DTYPE_CHOICES:
            raise UsageError(f"--scale-dtype {self.scale_dtype!r}: choose keep, float16 or bfloat16")
        if self.nibble_encoding not in ENCODINGS:
            raise UsageError(f"--nibble-encoding {self.nibble_encoding!r}: choose u4b8 or s4")
        if self.tp_size < 1:
            raise UsageError(f"--tp-size {self.tp_size}: must be at least 1")
        if self.emit_ranks and self.tp_size < 2:
            raise UsageError("--emit-ranks needs --tp-size 2 or more")
