"""Reading a source checkpoint: resolve it, validate what it claims, read tensors on demand."""

from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .quant_config import QuantConfig, read_quant_config

__all__ = ["Checkpoint", "TensorRef", "open_checkpoint", "QuantConfig", "read_quant_config"]
