"""Optional backend: run the real Intel XPU fused-MoE kernel (``vllm_xpu_kernels``) on converted weights.

Only usable where ``vllm_xpu_kernels`` is installed and the device is an Intel XPU; everywhere
else :func:`kernels_status` says why not, in one plain line, and the verifier uses the reference
MoE alone.

The interface, as in the released vllm-xpu-kernels 0.1.16.2 (``vllm_xpu_kernels/fused_moe_interface.py``,
class ``XpuFusedMoe``)::

    XpuFusedMoe(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                n_experts_per_token, activation, num_experts,
                ep_rank=0, ep_size=1, expert_map=None, ...)
    .apply(output, hidden_states, topk_weights, topk_ids, expert_map=None, ...)

int4 weights are ``w13 [E, 2N, K/2]`` and ``w2 [E, K, N/2]`` (byte j: column 2j low nibble, 2j+1
high nibble, value ``(q - 8) * scale``), scales ``[E, 2N, K/g]`` / ``[E, K, N/g]`` in the
activation dtype with ``g`` in {32, 64, 128, 256}. The forward takes the already-routed
``topk_weights`` / ``topk_ids`` and writes into ``output``; it never sees router logits.
``activation="silu"`` is ``silu(gate) * up`` with gate = rows ``0..N-1``.

How the weights are handed over (uint8 u4b8 for the constructor to convert; s4 as uint8 marked
``xpu_fused_moe``, then int8 views of the same storage) is :func:`gptq2xpu.xpu_handover.build_fused_moe`,
shared with ``gptq2xpu.load``. It was tested against that release's Python interface on CPU with
its native ops faked; no Intel XPU ran it.

The tolerances against the reference come from that package's own int4 test
(``tests/fused_moe/test_fused_moe.py``, ``test_fused_moe_int4``: rtol = atol = 2e-2 for fp16,
2e-1 for bf16); see ``reference.KERNEL_TOLERANCES``. The kernel is routing-agnostic: when no
``topk_weights``/``topk_ids`` are given, ``router_logits`` are routed with softmax -> top-k ->
optional renormalisation (Qwen-MoE / Mixtral style). Give explicit top-k for anything else.
"""

from __future__ import annotations

import torch

from ..xpu_handover import KERNEL_CLASS, build_fused_moe, load_interface
from .unpack import ENCODINGS

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


def _is_xpu(device: torch.device) -> bool:
    """Whether ``device`` is an Intel XPU."""
    return device.type == "xpu"


def kernels_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the real kernel can run on ``device``: ``(available, reason)``.

    Available only when ``device`` is an Intel XPU and ``vllm_xpu_kernels.fused_moe_interface``
    imports with its native ops. The reason is one plain line either way.
    """
    device = torch.device(device)
    if not _is_xpu(device):
        return False, f"device is {device.type}, the kernel runs only on xpu"
    module, reason = load_interface()
    if module is None:
        return False, reason
    return True, f"vllm_xpu_kernels {KERNEL_CLASS} on {device}"


def _check_inputs(x, w13, w13_scales, w2, w2_scales) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be 2-D fp16/bf16 [T, K], got {tuple(x.shape)} {x.dtype}")
    tokens, hidden = x.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.dtype != torch.uint8 or w2.dtype != torch.uint8:
        raise ValueError(
            f"w13 and w2 must be 3-D uint8, got {tuple(w13.shape)} {w13.dtype}, {tuple(w2.shape)} {w2.dtype}"
        )
    experts, two_n, half_k = w13.shape
    inter = two_n // 2
    if two_n % 2 or half_k * 2 != hidden or tuple(w2.shape) != (experts, hidden, inter // 2) or inter % 2:
        raise ValueError(
            f"expected w13 [E, 2N, {hidden // 2}] and w2 [E, {hidden}, N/2] for x [T, {hidden}]; "
            f"got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    for name, scales, rows, cols in (("w13_scales", w13_scales, two_n, hidden),
                                     ("w2_scales", w2_scales, hidden, inter)):
        if scales.dim() != 3 or scales.shape[:2] != (experts, rows):
            raise ValueError(f"{name} must be [{experts}, {rows}, G], got {tuple(scales.shape)}")
        if scales.dtype != x.dtype:
            raise ValueError(
                f"{name} are {scales.dtype} but activations are {x.dtype}: the kernel reads scales as "
                f"the activation dtype"
            )
        groups = scales.shape[-1]
        if groups == 0 or cols % groups or cols // groups not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"{name}: group size {cols}/{groups} is not one of {SUPPORTED_GROUP_SIZES} (kernel limit)"
            )
    return tokens, experts, inter


def run_xpu_fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_weights: torch.Tensor | None,
    topk_ids: torch.Tensor | None,
    router_logits: torch.Tensor | None,
    *,
    top_k: int,
    renormalize: bool,
    encoding: str,
) -> torch.Tensor:
    """Run ``vllm_xpu_kernels`` ``XpuFusedMoe`` on converted int4 weights; returns ``[T, K]`` in x's dtype.

    - ``x`` ``[T, K]`` fp16/bf16 on the xpu device;
    - ``w13`` uint8 ``[E, 2N, K/2]``, ``w13_scales`` ``[E, 2N, K/g]``; ``w2`` uint8 ``[E, K, N/2]``,
      ``w2_scales`` ``[E, K, N/g]``; scales in x's dtype; ``encoding`` says how the bytes store
      nibbles ("u4b8" offset-8, or "s4" already converted as by the kernel's ``implement_zp``);
    - ``topk_weights`` / ``topk_ids`` ``[T, top_k]``: the routing. When both are None it is
      computed from ``router_logits`` ``[T, E]`` as softmax -> top-k (-> renormalised when
      ``renormalize``). The kernel itself only ever sees top-k weights and ids.

    The weights are handed over as :func:`gptq2xpu.xpu_handover.build_fused_moe` does (as release
    0.1.16.2 takes them); the caller's tensors are neither rebound nor modified. Raises
    RuntimeError when the kernel is not available (see :func:`kernels_status`), ValueError on
    shapes/dtypes it would refuse, :class:`~gptq2xpu.errors.UsageError` when the installed version
    does not take int4 weights as 0.1.16.2 does.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown int4 encoding {encoding!r}; expected one of {ENCODINGS}")
    available, reason = kernels_status(x.device)
    if not available:
        raise RuntimeError(f"cannot run the XPU fused-MoE kernel: {reason}")
    module, _ = load_interface()
    tokens, experts, _ = _check_inputs(x, w13, w13_scales, w2, w2_scales)

    if topk_weights is None and topk_ids is None:
        if router_logits is None:
            raise ValueError("give topk_weights and topk_ids, or router_logits to route")
        if tuple(router_logits.shape) != (tokens, experts):
            raise ValueError(f"router_logits must be [{tokens}, {experts}], got {tuple(router_logits.shape)}")
        scores = router_logits.to(torch.float32).softmax(dim=-1)
        topk_weights, topk_ids = scores.topk(top_k, dim=-1)
        if renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    elif topk_weights is None or topk_ids is None:
        raise ValueError("give both topk_weights and topk_ids, or neither")
    if tuple(topk_weights.shape) != (tokens, top_k) or tuple(topk_ids.shape) != (tokens, top_k):
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must be [{tokens}, {top_k}]"
        )

    impl = build_fused_moe(getattr(module, KERNEL_CLASS), w13, w13_scales, w2, w2_scales, encoding=encoding,
                           n_experts_per_token=top_k, activation="silu")
    output = torch.empty_like(x)
    impl.apply(
        output=output,
        hidden_states=x.contiguous(),
        topk_weights=topk_weights.to(device=x.device, dtype=torch.float32).contiguous(),
        topk_ids=topk_ids.to(device=x.device, dtype=torch.int64).contiguous(),
    )
    return output
