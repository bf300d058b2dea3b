"""How converted int4 experts are handed to ``vllm_xpu_kernels``' ``XpuFusedMoe``: one place for
``gptq2xpu.load`` and ``verify --backend xpu-kernels``.

Written for, and tested against, the Python interface of the released vllm-xpu-kernels
**0.1.16.2** (``vllm_xpu_kernels/fused_moe_interface.py``, imported on CPU with its native
modules stubbed).  No Intel XPU ran any of this.  What that release does with int4 weights:

* its constructor takes int4 only from a **uint8** ``w13`` (an int8 ``w13`` is taken for a 16-bit
  weight: inter size ``K/4`` instead of N, scales dropped);
* unless ``w13`` carries the attribute ``xpu_fused_moe``, the constructor rewrites both weights
  once from offset-8 nibbles into two's-complement ones (``implement_zp``, per byte ``^ 0x88``)
  into new **int8** buffers, and rebinds ``w13.data`` / ``w2.data`` to them;
* its grouped GEMM reads packed int4 only from an **int8** weight with scales (``docs/contract.md``,
  "What the runtime does at load").

So :func:`build_fused_moe` hands over

* ``"u4b8"`` bytes as uint8: the constructor makes its int8 copy (a second copy of every expert
  weight while the caller still holds the uint8 one);
* ``"s4"`` bytes (already converted) as uint8 with ``xpu_fused_moe`` set, so int4 is detected and
  nothing is rewritten, then gives the instance int8 views of the same storage as its weights:
  no rewrite, no new buffer.

Either way the caller's tensors are neither rebound nor modified (the constructor gets fresh tensor
objects over the same storage), and the built instance is checked to hold what that release's
GEMM reads (int4 detected, inter size N, scales attached, int8 weights); another release that
behaves differently is refused with one line rather than run wrongly.
"""

from __future__ import annotations

import importlib
from importlib import metadata

import torch

from .contract import ENCODINGS
from .errors import UsageError

KERNEL_MODULE = "vllm_xpu_kernels.fused_moe_interface"
KERNEL_CLASS = "XpuFusedMoe"
KERNEL_DIST = "vllm-xpu-kernels"
#: The release whose Python interface this hand-over was written for and tested against.
CHECKED_RELEASE = "0.1.16.2"
#: The attribute ``XpuFusedMoe`` checks on ``w13`` to skip its one-time u4b8 -> s4 rewrite.
SKIP_CONVERSION_ATTR = "xpu_fused_moe"


def kernel_version() -> str | None:
    """The installed vllm-xpu-kernels version, or None."""
    try:
        return metadata.version(KERNEL_DIST)
    except metadata.PackageNotFoundError:
        return None


def load_interface():
    """Import the kernel interface: ``(module, None)`` or ``(None, one-line reason)``."""
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in ("vllm_xpu_kernels", KERNEL_MODULE):
            return None, "vllm_xpu_kernels not installed"
        return None, f"vllm_xpu_kernels failed to import: {_one_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a broken third-party install is reported, not raised
        return None, f"vllm_xpu_kernels failed to import: {_one_line(exc)}"
    if not hasattr(module, KERNEL_CLASS):
        return None, f"the installed vllm_xpu_kernels has no {KERNEL_CLASS}"
    if getattr(module, "FUSEDMOE_AVAILABLE", True) is False:
        why = getattr(module, "FUSEDMOE_UNAVAILABLE_REASON", None) or "its native ops did not load"
        return None, f"vllm_xpu_kernels fused MoE unavailable: {_one_line(why)}"
    return module, None


def kernel_class():
    """The installed ``XpuFusedMoe`` class; :class:`UsageError` (one line) when it cannot be had."""
    module, reason = load_interface()
    if module is None:
        raise UsageError(f"cannot build {KERNEL_CLASS}: {reason}")
    return getattr(module, KERNEL_CLASS)


def _one_line(obj) -> str:
    text = " ".join(str(obj).split())
    return f"{type(obj).__name__}: {text}" if isinstance(obj, BaseException) else text


def _alias(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor object over ``t``'s data (contiguous), so ``.data =`` on it leaves ``t`` alone."""
    t = t.contiguous()
    return t.view(dtype) if dtype is not None else t.view(t.shape)


def build_fused_moe(cls, w13: torch.Tensor, w13_scales: torch.Tensor, w2: torch.Tensor, w2_scales: torch.Tensor, *,
                    encoding: str, n_experts_per_token: int, activation: str = "silu",
                    w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None, **kwargs):
    """``cls(...)`` (an ``XpuFusedMoe``) holding the converted int4 experts the way release
    0.1.16.2 reads them.

    ``w13`` uint8 ``[E, 2N, K/2]``, ``w2`` uint8 ``[E, K, N/2]``, scales ``[E, 2N, K/g]`` /
    ``[E, K, N/g]`` in the activation dtype; ``encoding`` says what the bytes hold (``"u4b8"`` or
    ``"s4"``).  ``kwargs`` go to the constructor unchanged (``ep_rank``, ``expert_map``...).
    :class:`UsageError` when the inputs are not that, or when the built instance does not hold
    what the release's grouped GEMM reads.
    """
    if encoding not in ENCODINGS:
        raise UsageError(f"nibble encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != torch.uint8 or t.dim() != 3:
            raise UsageError(f"{name}: expected 3-D uint8 packed int4, got {tuple(t.shape)} {t.dtype}")
    experts, two_n, _ = w13.shape
    k13, k2 = _alias(w13), _alias(w2)
    if encoding == "s4":
        setattr(k13, SKIP_CONVERSION_ATTR, True)  # uint8 so int4 is detected; marked so nothing is rewritten
    moe = cls(w13=k13, w13_scales=w13_scales.contiguous(), w13_bias=w13_bias, w2=k2,
              w2_scales=w2_scales.contiguous(), w2_bias=w2_bias, n_experts_per_token=n_experts_per_token,
              activation=activation, num_experts=experts, **kwargs)
    if encoding == "s4":
        # the dtype the grouped GEMM reads int4 from, over the same storage (what the rewrite leaves)
        moe.w13, moe.w2 = k13.view(torch.int8), k2.view(torch.int8)
        setattr(moe.w13, SKIP_CONVERSION_ATTR, True)
    confirm_int4(moe, two_n // 2)
    return moe


def confirm_int4(moe, inter: int) -> None:
    """Refuse an instance that does not hold what release 0.1.16.2's grouped GEMM reads as int4."""
    problems = []
    if getattr(moe, "is_int4", None) is not True:
        problems.append(f"is_int4 is {getattr(moe, 'is_int4', 'absent')}")
    if getattr(moe, "inter_size", None) != inter:
        problems.append(f"inter_size is {getattr(moe, 'inter_size', 'absent')}, not N={inter}")
    if getattr(moe, "gemm1_wei_scales", None) is None or getattr(moe, "gemm2_wei_scales", None) is None:
        problems.append("scales not attached")
    dtypes = [getattr(getattr(moe, w, None), "dtype", None) for w in ("w13", "w2")]
    if dtypes != [torch.int8, torch.int8]:
        problems.append(f"weights are {dtypes[0]}/{dtypes[1]}, not int8")
    if problems:
        version = kernel_version() or "unknown version"
        raise UsageError(f"vllm_xpu_kernels {version}: {KERNEL_CLASS} did not take the int4 experts as release "
                         f"{CHECKED_RELEASE} does ({'; '.join(problems)}); gptq2xpu hands weights over as "
                         f"{CHECKED_RELEASE} takes them")
