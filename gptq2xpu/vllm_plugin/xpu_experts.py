"""vLLM's XPU int4 experts handed the converted experts without a second copy.

vLLM's ``XPUExpertsWNA16`` builds ``vllm_xpu_kernels``' ``XpuFusedMoe`` from the layer's weights at the
first forward.  Given offset-8 (``u4b8``) uint8 weights, that constructor rewrites them into signed
nibbles in new int8 buffers (``implement_zp``): a second copy of every expert weight on the device
while it runs (vLLM issue #57008).  The plugin instead makes the layer's bytes signed in place
(``byte ^ 0x88``; ``--nibble-encoding s4`` outputs already are), marks ``w13`` with the attribute the
constructor checks to skip its rewrite (``gptq2xpu.xpu_handover.SKIP_CONVERSION_ATTR``), and makes
vLLM's experts object of the layer's kernel an instance of :func:`signed_experts_cls` (vLLM accepts
only its own class when it builds the kernel, so the class is changed after): the same class, except
that the ``XpuFusedMoe`` it builds is handed int8 views of the same storage, the dtype the released
kernel's grouped GEMM reads int4 from, and is checked to hold int4 as release 0.1.16.2 takes it
(``gptq2xpu.xpu_handover.confirm_int4``).  Where the kernel holds no such experts object (a release
built otherwise), nothing changes: vLLM's own rewrite runs.
"""

from __future__ import annotations

import functools

import torch

from ..xpu_handover import SKIP_CONVERSION_ATTR, confirm_int4

#: Set on a layer's ``w13`` whose bytes the plugin made signed: the built kernel gets int8 views of them.
SIGNED_ATTR = "gptq2xpu_signed"
#: vLLM's XPU int4 experts class (``fused_moe/experts/xpu_moe.py``), the one this hand-over knows.
XPU_EXPERTS = "XPUExpertsWNA16"


def experts_object(moe_kernel):
    """vLLM's experts object inside a layer's ``moe_kernel`` (``FusedMoEKernel``), or None."""
    impl = getattr(moe_kernel, "impl", moe_kernel)
    return getattr(impl, "fused_experts", None)


def hand_over_signed(moe_kernel, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Make the layer's offset-8 ``w13``/``w2`` signed in place and have ``moe_kernel``'s XPU experts hand
    them to ``XpuFusedMoe`` as they are.  False (nothing changed) where the kernel holds no ``XPUExpertsWNA16``."""
    experts = experts_object(moe_kernel)
    if experts is None or type(experts).__name__ != XPU_EXPERTS or experts.fused_moe_impl is not None:
        return False
    for t in (w13, w2):
        t.data.bitwise_xor_(0x88)  # offset-8 code q -> signed q - 8, per nibble, in place
    setattr(w13, SKIP_CONVERSION_ATTR, True)  # uint8 so int4 is detected; marked so nothing is rewritten
    setattr(w13, SIGNED_ATTR, True)
    experts.__class__ = signed_experts_cls(type(experts))
    return True


@functools.cache
def signed_experts_cls(base: type) -> type:
    """``base`` (vLLM's ``XPUExpertsWNA16``) whose lazily built ``fused_moe_impl`` holds int8 views of
    the signed weights :func:`hand_over_signed` marked."""

    def get_impl(self):
        return self.__dict__.get("_gptq2xpu_impl")

    def set_impl(self, impl):
        if impl is not None and getattr(impl.w13, SIGNED_ATTR, False):
            impl.w13, impl.w2 = impl.w13.view(torch.int8), impl.w2.view(torch.int8)
            setattr(impl.w13, SKIP_CONVERSION_ATTR, True)
            confirm_int4(impl, impl.w13.shape[-2] // 2)
        self.__dict__["_gptq2xpu_impl"] = impl

    return type(f"Gptq2Xpu{base.__name__}", (base,), {
        "__doc__": f"{base.__name__}, handed signed int4 weights without a rewrite (gptq2xpu)",
        "fused_moe_impl": property(get_impl, set_impl)})
