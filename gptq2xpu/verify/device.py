"""Where the verifier's math runs: Intel XPU, CUDA or CPU, and what the runtime is.

Older Intel stacks register the ``xpu`` device through ``intel_extension_for_pytorch`` (IPEX), so
:func:`import_ipex` imports it, when installed, before anything probes ``torch.xpu``. It is never
required: torch 2.4+ ships native XPU support.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib import metadata

import torch

from gptq2xpu.errors import UsageError

DEVICE_CHOICES = ("auto", "xpu", "cuda", "cpu")
IPEX_MODULE = "intel_extension_for_pytorch"
KERNELS_DIST = "vllm_xpu_kernels"

# Why the last import_ipex() found no usable IPEX (None when it imported, or was not installed).
ipex_error: str | None = None


def import_ipex() -> str | None:
    """Import IPEX when it is installed; return its version, or None.

    Returns None when IPEX is not installed, and also when importing it fails for any reason (a
    broken install, an ABI mismatch with torch...): the failure is kept, one line, in
    :data:`ipex_error` for the caller to report; it never propagates.
    """
    global ipex_error
    ipex_error = None
    try:
        if importlib.util.find_spec(IPEX_MODULE) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        module = importlib.import_module(IPEX_MODULE)
    except Exception as exc:  # noqa: BLE001 - any failure in a third-party import is reported
        ipex_error = f"{IPEX_MODULE} failed to import: {type(exc).__name__}: {' '.join(str(exc).split())}"
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = metadata.version(IPEX_MODULE)
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def xpu_available() -> bool:
    """Whether torch sees a usable Intel XPU (False on builds without ``torch.xpu``)."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not hasattr(xpu, "is_available"):
        return False
    try:
        return bool(xpu.is_available())
    except Exception:  # noqa: BLE001 - a half-installed driver must not crash the probe
        return False


def cuda_available() -> bool:
    """Whether torch sees a usable CUDA device."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def select_device(preference: str = "auto") -> torch.device:
    """Pick the device for the verifier's math.

    ``"auto"``: xpu if available, else cuda, else cpu. ``"xpu"`` / ``"cuda"`` / ``"cpu"``: that
    device; an unavailable one raises :class:`~gptq2xpu.errors.UsageError`. IPEX, when installed,
    is imported first so that older stacks get to register the xpu device.
    """
    if preference not in DEVICE_CHOICES:
        raise UsageError(f"--device {preference!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if preference in ("auto", "xpu"):
        import_ipex()
    if preference == "auto":
        if xpu_available():
            return torch.device("xpu")
        if cuda_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if preference == "xpu" and not xpu_available():
        why = f" ({ipex_error})" if ipex_error else ""
        raise UsageError(f"--device xpu: no Intel XPU is available to torch {torch.__version__}{why}; "
                         "--device auto takes the best device there is")
    if preference == "cuda" and not cuda_available():
        raise UsageError(f"--device cuda: no CUDA device is available to torch {torch.__version__}; "
                         "--device auto takes the best device there is")
    return torch.device(preference)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """A human name for ``device`` (the GPU model, or the CPU's processor string)."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_name(device)
        if device.type == "xpu":
            return torch.xpu.get_device_name(device)
    except Exception:  # noqa: BLE001
        return device.type
    import platform

    return platform.processor() or platform.machine() or "cpu"


def runtime_info(device: torch.device | str) -> dict[str, str | None]:
    """What the math ran on: torch, IPEX and vllm_xpu_kernels versions, device type and name.

    Versions come from package metadata (nothing heavy is imported, apart from IPEX when it is
    installed, which :func:`import_ipex` does anyway); an absent package is None.
    """
    device = torch.device(device)
    return {
        "torch": torch.__version__,
        "ipex": import_ipex(),
        "vllm_xpu_kernels": _dist_version(KERNELS_DIST) or _dist_version(KERNELS_DIST.replace("_", "-")),
        "device_type": device.type,
        "device_name": device_name(device),
    }


def synchronize(device: torch.device | str) -> None:
    """Wait until all queued work on ``device`` has finished (a no-op on the CPU), for timing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
