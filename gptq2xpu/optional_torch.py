"""torch is an optional dependency: ``pip install -e .`` converts, inspects, finalizes and
verifies a converted checkpoint on its own with numpy alone; ``verify --source``, the loader
(:mod:`gptq2xpu.load`) and the vLLM plugin need torch, which ``pip install -e '.[torch]'``
(or any torch build for your device) brings."""

from __future__ import annotations

from .errors import UsageError

#: gptq2xpu is installed from its clone, not a package index: what is missing is torch alone (the
#: ``torch`` extra holds nothing else), and ``pip install 'gptq2xpu[torch]'`` would ask an index for
#: a gptq2xpu that is not this one
INSTALL_HINT = ("pip install torch (any build >= 2.1 for your device; on a CPU: --index-url "
                "https://download.pytorch.org/whl/cpu), or pip install -e '.[torch]' in gptq2xpu's clone")


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
