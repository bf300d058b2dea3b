"""One vLLM MoE layer built and loaded the way vLLM's model loader does it, inside a release's process.

:func:`build` makes the layer with the release's own ``FusedMoEFactory`` (its router, its
``RoutedExperts``, the quantization method the given ``QuantizationConfig`` picks for the prefix);
:func:`load` hands checkpoint tensors to ``RoutedExperts.load_weights`` (the loader vLLM's models call)
and runs the method's ``process_weights_after_loading``; :func:`checkpoint_tensors` reads a layer's
tensors from a checkpoint folder.  Tensor, data and pipeline-context parallel sizes are 1, so no
distributed set-up is needed.  Needs a current ``VllmConfig`` (``xpu_branch.XpuBranch`` sets one).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def build(quant_config, prefix: str, *, num_experts: int, hidden: int, intermediate: int, top_k: int,
          dtype: torch.dtype = torch.bfloat16, renormalize: bool = True):
    """vLLM's MoE runner for the experts module ``prefix`` (e.g. ``model.layers.0.mlp.experts``)."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    return FusedMoEFactory(num_experts=num_experts, top_k=top_k, hidden_size=hidden, intermediate_size=intermediate,
                           params_dtype=dtype, renormalize=renormalize, quant_config=quant_config, tp_size=1,
                           dp_size=1, pcp_size=1, prefix=prefix)


def load(runner, tensors) -> list[str]:
    """``tensors``: (name relative to the experts module, tensor) pairs.  Returns the names vLLM's
    loader reported as loaded; then runs ``process_weights_after_loading``."""
    experts = runner.routed_experts
    loaded = list(experts.load_weights(list(tensors)))
    experts.quant_method.process_weights_after_loading(experts)
    return loaded


def checkpoint_tensors(folder: Path, module: str, quant_config=None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``folder``'s safetensors files under ``module.``, named relative to it; with
    ``quant_config``, names first go through its ``get_checkpoint_weight_mapper()`` as vLLM's loader
    does (tensors it maps to None are dropped, e.g. GPTQ's ``g_idx``)."""
    mapper = quant_config.get_checkpoint_weight_mapper() if quant_config is not None else None
    out = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not name.startswith(module + "."):
                    continue
                mapped = mapper.map_name(name) if mapper is not None else name
                if mapped is not None:
                    out.append((mapped[len(module) + 1:], fh.get_tensor(name)))
    return out


def config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def router_logits(folder: Path, layer_prefix: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ gate.T`` in float32 from the checkpoint's float router (``<layer_prefix>.gate.weight``)."""
    (_, gate), = checkpoint_tensors(folder, f"{layer_prefix}.gate")
    return x.float() @ gate.float().T
