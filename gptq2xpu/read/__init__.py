"""Reading a source checkpoint: resolve it, validate what it claims, read tensors on demand."""

from __future__ import annotations

import os

from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .quant_config import QuantConfig, read_quant_config
from .resolve import provenance, resolve_source


def open_source(source: str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> Checkpoint:
    """Resolve SOURCE (a folder or a hub repo id) and open it from its headers."""
    folder, trusted, origin = resolve_source(str(source), revision=revision, token=token)
    ckpt = open_checkpoint(folder, origin, trusted_root=trusted, revision=revision)
    ckpt.provenance = provenance(str(source), folder, revision)
    return ckpt


__all__ = ["Checkpoint", "TensorRef", "open_checkpoint", "open_source", "QuantConfig", "read_quant_config"]
