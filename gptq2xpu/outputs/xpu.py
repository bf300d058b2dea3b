"""``--format xpu``: the stacked XPU layout (``docs/contract.md``), served by vLLM with the gptq2xpu plugin."""

from __future__ import annotations

from ..naming import natural_key
from ..plan.model import OutputItem
from ..safetensors_io import PlannedTensor
from .base import OutputFormat


class XpuOutput(OutputFormat):
    name = "xpu"

    @property
    def serves(self) -> str:
        from ..serving import supported_vllm_text

        return (f"vLLM {supported_vllm_text()} with the gptq2xpu plugin (XPU: the kernel takes the experts without a "
                "copy; CUDA, ROCm, CPU: vLLM's int4 MoE backend)")

    def items(self, ckpt, layers, options, quant):  # noqa: ARG002 (one signature for every format)
        """Each converted layer's four tensors (and a dequantized router); every other tensor copied."""
        from ..plan.build import float_dtype

        consumed = set()
        items: list[OutputItem] = []
        for layer in layers:
            if not layer.converts:
                continue
            consumed.update(layer.source_tensors)
            for t in layer.output_tensors():
                items.append(OutputItem(t, t.name.rsplit(".", 1)[1], layer.prefix))
            if layer.router_quantized and options.dequantize_router:
                consumed.update(layer.routers)
                fields = {n.rsplit(".", 1)[1]: n for n in layer.routers}
                n_out = ckpt.ref(fields["qweight"]).shape[1]
                weight = PlannedTensor(f"{layer.prefix}.gate.weight", float_dtype(ckpt.config), (n_out, layer.hidden))
                items.append(OutputItem(weight, "router", layer.prefix))
        passthrough = [n for n in ckpt.tensors if n not in consumed]
        for n in passthrough:
            ref = ckpt.tensors[n]
            items.append(OutputItem(PlannedTensor(n, ref.dtype, ref.shape), "copy", n))
        items.sort(key=lambda it: natural_key(it.tensor.name))
        return items, passthrough, {}, []

    def quantization_config(self, plan) -> dict:
        from ..serving import xpu_quantization_config

        return xpu_quantization_config(plan)
