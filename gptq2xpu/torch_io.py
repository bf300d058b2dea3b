"""Checkpoint tensors into torch: one dtype table and one reader for the verifier and the loader.

Imported only where math runs (``verify``, ``gptq2xpu.load``): it imports torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import InputError
from .read.checkpoint import Checkpoint

#: safetensors dtype name -> torch dtype (the ones converted and source checkpoints carry).
TORCH_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
}
_PIECE = 32 << 20


def torch_dtype(name: str, what: str = "") -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise InputError(f"{what}: dtype {name} cannot be loaded into torch") from None


def read_stacked(ckpt: Checkpoint, names: list[str], device=None) -> torch.Tensor:
    """``torch.stack`` of same-shaped tensors, read straight into one buffer (pinned when the
    target is a CUDA device) by parallel ``pread``s of at most 32 MB, then moved to ``device``."""
    refs = [ckpt.ref(n) for n in names]
    r0 = refs[0]
    if any((r.dtype, r.shape) != (r0.dtype, r0.shape) for r in refs):
        raise ValueError(f"{names[0]}: the stacked tensors differ in dtype or shape")
    dtype = torch_dtype(r0.dtype, names[0])
    dev = torch.device(device) if device is not None else torch.device("cpu")
    pin = dev.type == "cuda" and torch.cuda.is_available()
    buf = torch.empty(len(refs) * r0.nbytes, dtype=torch.uint8, pin_memory=pin)
    arr = buf.numpy().reshape(len(refs), r0.nbytes)
    tasks = [(i, off) for i in range(len(refs)) for off in range(0, r0.nbytes, _PIECE)]

    def one(task):
        i, off = task
        ckpt.read_into(refs[i], arr[i, off : off + _PIECE], offset=off)

    if len(tasks) > 1:
        with ThreadPoolExecutor(min(8, len(tasks))) as pool:
            list(pool.map(one, tasks))
    else:
        for task in tasks:
            one(task)
    t = buf.view(dtype).reshape((len(refs),) + tuple(r0.shape))
    return t.to(dev, non_blocking=pin) if device is not None else t


def read_tensor(ckpt: Checkpoint, name: str, device=None) -> torch.Tensor:
    """One tensor of the checkpoint as torch (on ``device`` when given)."""
    return read_stacked(ckpt, [name], device)[0]
