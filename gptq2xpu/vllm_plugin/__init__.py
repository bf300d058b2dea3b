"""vLLM plugin: serve gptq2xpu-converted checkpoints (``quant_method: "gptq2xpu"``).

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes; gptq2xpu's points at
:func:`register`, which registers the quantization method :data:`gptq2xpu.serving.QUANT_METHOD`
with vLLM's ``register_quantization_config``.  Nothing here runs outside vLLM processes, and this
module imports vLLM only inside :func:`register`.

* :mod:`.config` -- the ``QuantizationConfig``: converted MoE layers get :mod:`.moe`'s method;
  every other layer gets vLLM's own method for the source's quantization description.
* :mod:`.moe` -- creates the converted shapes, loads the four stacked tensors as they are (one
  tensor-parallel rank's slice of N), hands them to vLLM's WNA16 MoE kernel-format step and backend,
  or, where the platform has no int4 MoE kernel, dequantizes them once and runs vLLM's unquantized MoE.

Supported vLLM releases: :data:`gptq2xpu.serving.SUPPORTED_VLLM`; loading a converted checkpoint
with another release stops with one line saying so.
"""

from __future__ import annotations

import logging


def register() -> None:
    """The ``vllm.general_plugins`` entry point.  Never raises: vLLM calls it for every model."""
    try:
        from ..optional_torch import require_torch

        require_torch("the gptq2xpu vLLM plugin")
        from .config import register_config
    except Exception as exc:  # no torch, or a vLLM whose interfaces this plugin does not know
        from ..serving import QUANT_METHOD, supported_vllm_text

        logging.getLogger("vllm.gptq2xpu").warning(
            "gptq2xpu: cannot register the %r quantization method with this vLLM (%s: %s); "
            "the plugin supports vLLM %s", QUANT_METHOD, type(exc).__name__, exc, supported_vllm_text())
        return
    register_config()
