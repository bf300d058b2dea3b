"""torch is an optional dependency: ``pip install gptq2xpu`` converts, inspects, finalizes and
verifies a converted checkpoint on its own with numpy alone; ``verify --source``, the loader
(:mod:`gptq2xpu.load`) and the vLLM plugin need torch, which ``pip install 'gptq2xpu[torch]'``
(or any torch build for your device) brings."""

from __future__ import annotations

from .errors import UsageError

INSTALL_HINT = "pip install 'gptq2xpu[torch]' (or any torch build for your device)"


class TorchMissing(UsageError, ImportError):
    """What needs torch, in one line with how to get it: a usage error (exit 2) on the command
    line, an ImportError to a program that imports the loader."""


def require_torch(what: str):
    """The torch module, or :class:`TorchMissing` naming ``what`` needs it."""
    try:
        import torch
    except ImportError as exc:
        raise TorchMissing(f"{what} needs torch, which cannot be imported ({exc}): {INSTALL_HINT}") from None
    return torch
