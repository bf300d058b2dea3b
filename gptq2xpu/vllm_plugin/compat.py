"""What differs between the vLLM releases the plugin supports (0.32.x, 0.33.x, 0.34.x), and nothing else.

The plugin has one code path; the two interfaces of vLLM's int4 MoE step that changed between these
releases are wrapped here, each decided from the installed vLLM's own signature (so a patch release
that keeps an interface keeps working):

* ``marlin_utils.get_marlin_input_dtype(prefix)`` (0.32, 0.33: the activation dtype some Marlin
  kernels quantize to) is gone in 0.34, where activations are never quantized for GPTQ MoE:
  :func:`marlin_input_dtype` gives ``None`` there, as 0.34's own ``AutoGPTQMoEMethod`` assumes.
* ``int_wna16.convert_to_wna16_moe_kernel_format`` takes ``input_dtype`` and returns ten tensors
  (0.32, 0.33: ``..., w13_input_global_scale, w2_input_global_scale, w13_bias, w2_bias``) or takes
  no ``input_dtype`` and returns eight (0.34: no input global scales).  :func:`to_kernel_format`
  calls either and returns the results by name.
"""

from __future__ import annotations

import inspect

import torch
from vllm.model_executor.layers.fused_moe.oracle import int_wna16
from vllm.model_executor.layers.quantization.utils import marlin_utils

#: The names of ``convert_to_wna16_moe_kernel_format``'s results, by how many it returns.
_RESULTS = {
    10: ("w13_qweight", "w2_qweight", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros",
         "w13_input_global_scale", "w2_input_global_scale", "w13_bias", "w2_bias"),
    8: ("w13_qweight", "w2_qweight", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros", "w13_bias", "w2_bias"),
}


def marlin_input_dtype(prefix: str) -> torch.dtype | None:
    """The activation dtype vLLM's Marlin MoE kernels quantize to for layer ``prefix`` (None: not quantized)."""
    get = getattr(marlin_utils, "get_marlin_input_dtype", None)
    return None if get is None else get(prefix)


def takes_input_dtype() -> bool:
    return "input_dtype" in inspect.signature(int_wna16.convert_to_wna16_moe_kernel_format).parameters


def to_kernel_format(*, input_dtype: torch.dtype | None, **tensors) -> dict[str, torch.Tensor | None] | None:
    """vLLM's ``convert_to_wna16_moe_kernel_format(backend=, layer=, quant_config=, w13=, w2=, w13_scale=,
    w2_scale=, w13_qzeros=, w2_qzeros=, w13_bias=, w2_bias=)``; its results by parameter name (None where
    the backend rewrote the layer in place)."""
    if takes_input_dtype():
        tensors["input_dtype"] = input_dtype
    elif input_dtype is not None:
        raise ValueError(f"this vLLM's int4 MoE step takes no activation dtype (asked for {input_dtype})")
    out = int_wna16.convert_to_wna16_moe_kernel_format(**tensors)
    if out is None:
        return None
    names = _RESULTS.get(len(out))
    if names is None:  # a release whose interface this module does not know
        raise TypeError(f"vLLM's convert_to_wna16_moe_kernel_format returned {len(out)} values; gptq2xpu knows "
                        f"{sorted(_RESULTS)}")
    return dict(zip(names, out, strict=True))
