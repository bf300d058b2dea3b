"""Helpers shared by the tests: fixture paths, raw safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptq2xpu.safetensors_io import PlannedTensor, ShardLayout, dtype_name

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3moe-g128"



def write_arrays(path: str | os.PathLike, arrays: dict[str, tuple[str, np.ndarray]] | dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> None:
    """Small convenience writer: ``{name: array}`` or ``{name: (dtype_name, raw_array)}`` to a file.

    ``(dtype_name, array)`` lets callers store dtypes numpy lacks (``("BF16", uint16_array)``).
    Holds nothing beyond the arrays given; used by tests, the demo and benchmarks.
    """
    items: list[tuple[PlannedTensor, np.ndarray]] = []
    for name, value in arrays.items():
        if isinstance(value, tuple):
            dtype, arr = value
        else:
            arr = value
            dtype = dtype_name(arr.dtype)
        arr = np.ascontiguousarray(arr)
        items.append((PlannedTensor(name, dtype, tuple(arr.shape)), arr))
        if items[-1][0].nbytes != arr.nbytes:
            raise ValueError(f"{name}: {dtype}{list(arr.shape)} does not match {arr.nbytes} bytes")
    layout = ShardLayout([t for t, _ in items], metadata or {"format": "pt"})
    with open(path, "wb") as fh:
        fh.write(layout.header)
        for _, arr in items:
            fh.write(memoryview(arr.reshape(-1).view(np.uint8)))


