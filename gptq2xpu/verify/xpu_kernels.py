"""Optional backend: run the real Intel XPU fused-MoE kernel (``vllm_xpu_kernels``) on converted weights.

Only usable where ``vllm_xpu_kernels`` is installed and the device is an Intel XPU; everywhere
else :func:`kernels_status` says why not, in one plain line, and the verifier uses the reference
MoE alone.

The interface, as read in vllm-project/vllm-xpu-kernels:

* ``vllm_xpu_kernels/fused_moe_interface.py``, class ``XpuFusedMoe``::

      XpuFusedMoe(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                  n_experts_per_token, activation, num_experts,
                  ep_rank=0, ep_size=1, expert_map=None, ...)
      .apply(output, hidden_states, topk_weights, topk_ids, expert_map=None, ...)

  int4 weights are uint8 ``w13 [E, 2N, K/2]`` and ``w2 [E, K, N/2]`` (byte j: column 2j low
  nibble, 2j+1 high nibble, value ``(q - 8) * scale``), scales ``[E, 2N, K/g]`` / ``[E, K, N/g]``
  in the activation dtype, biases optional (``[E, 2N]``, ``[E, K]``). The forward takes the
  already-routed ``topk_weights`` / ``topk_ids`` (the upstream test passes float32 weights and
  int64 ids from ``torch.topk``) and writes into ``output`` (same shape as ``hidden_states``);
  it never sees router logits. ``activation="silu"`` is ``silu(gate) * up`` with gate = rows
  ``0..N-1``.
* At construction, unless ``w13`` carries the attribute ``xpu_fused_moe``, the constructor
  rewrites every byte once with ``implement_zp`` (offset-8 nibbles -> two's-complement nibbles,
  i.e. ``byte ^ 0x88``) and assigns the result to ``w13.data`` / ``w2.data``. We always hand it
  fresh tensor objects (views), so the caller's tensors are never rebound or rewritten.
* ``csrc/xpu/grouped_gemm/xe_2/grouped_gemm_xe2_interface.hpp``: scales must be contiguous 3-D
  ``[E, N, K/g]`` with ``g`` in {32, 64, 128, 256}; the kernel reads them as the activation type
  (bf16 or fp16).
* ``tests/fused_moe/test_fused_moe.py`` (``test_fused_moe_int4``): builds ``XpuFusedMoe(...)``
  from random uint8 bytes and ``2^-5`` scales, calls ``.apply(output=, hidden_states=,
  topk_weights=, topk_ids=)`` and checks against a dequantize-then-matmul reference with
  rtol = atol = 2e-2 (fp16) / 2e-1 (bf16); see ``reference.KERNEL_TOLERANCES``.

Uncertain, because the file changed shape many times upstream (120 stored versions), and no XPU
was available to check against:

* How int4 is signalled. Older versions take ``is_int4=True`` explicitly and keep uint8 buffers
  (the GEMM gets an ``is_B_int4`` flag); later ones drop the flag and infer int4 from a uint8
  ``w13`` with scales, rewriting into an **int8** buffer because the GEMM recognises packed int4
  by ``B dtype == int8`` (``at::kChar``); the newest accept ``is_int4`` again (default None,
  inferred) and take uint8 or int8. :func:`run_xpu_fused_moe` passes ``is_int4=True`` only when
  the constructor has that parameter.
* Pre-converted ``"s4"`` bytes (the ``xpu_fused_moe`` skip). They are handed over with the
  attribute set as uint8 where the constructor has an explicit ``is_int4`` flag and no dtype
  inference, or as int8 where ``_get_weights_dtype`` recognises int8 as int4. Where inference
  knows only uint8 yet the GEMM wants int8 (one intermediate version), no spelling of
  pre-converted bytes is accepted; we then XOR them back to ``"u4b8"`` (exact: the constructor's
  ``implement_zp`` reproduces the very same s4 bytes) and let the constructor convert.
* Which router the caller's model uses. The kernel is routing-agnostic; when no
  ``topk_weights``/``topk_ids`` are given we route ``router_logits`` with softmax -> top-k ->
  optional renormalisation (Qwen-MoE / Mixtral style). Give explicit top-k for anything else.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from .unpack import ENCODINGS

KERNEL_MODULE = "vllm_xpu_kernels.fused_moe_interface"
KERNEL_CLASS = "XpuFusedMoe"
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


def _is_xpu(device: torch.device) -> bool:
    """Whether ``device`` is an Intel XPU (a function of its own so tests can fake a device)."""
    return device.type == "xpu"


def _load_interface():
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
        return None, f"the installed vllm_xpu_kernels has no {KERNEL_CLASS} (too old)"
    if getattr(module, "FUSEDMOE_AVAILABLE", True) is False:
        why = getattr(module, "FUSEDMOE_UNAVAILABLE_REASON", None) or "its native ops did not load"
        return None, f"vllm_xpu_kernels fused MoE unavailable: {_one_line(why)}"
    return module, None


def _one_line(obj) -> str:
    text = " ".join(str(obj).split())
    return f"{type(obj).__name__}: {text}" if isinstance(obj, BaseException) else text


def kernels_status(device: torch.device | str) -> tuple[bool, str]:
    """Whether the real kernel can run on ``device``: ``(available, reason)``.

    Available only when ``device`` is an Intel XPU and ``vllm_xpu_kernels.fused_moe_interface``
    imports with its native ops. The reason is one plain line either way.
    """
    device = torch.device(device)
    if not _is_xpu(device):
        return False, f"device is {device.type}, the kernel runs only on xpu"
    module, reason = _load_interface()
    if module is None:
        return False, reason
    return True, f"vllm_xpu_kernels {KERNEL_CLASS} on {device}"


def _constructor_params(cls) -> set[str]:
    try:
        return set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return set()


def _s4_handover(module, params: set[str]) -> tuple[torch.dtype, dict] | None:
    """How this kernel version accepts pre-converted s4 bytes: ``(dtype, extra kwargs)`` or None."""
    infer = getattr(module, "_get_weights_dtype", None)
    if infer is None:
        # Explicit-flag generation: uint8 buffers, the GEMM is told is_B_int4.
        return (torch.uint8, {"is_int4": True}) if "is_int4" in params else None
    try:
        flags = infer(torch.empty(0, dtype=torch.int8), torch.empty(0, 1, 1, dtype=torch.float16))
        int8_is_int4 = bool(flags[1])
    except Exception:  # noqa: BLE001 - an unexpected private helper: take the safe path
        return None
    return (torch.int8, {}) if int8_is_int4 else None


def _alias(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor object over ``t``'s (contiguous) data, so ``.data =`` on it leaves ``t`` alone."""
    t = t.contiguous()
    return t.view(dtype) if dtype is not None else t.view(t.shape)


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
    for name, scales, rows, cols in (("w13_scales", w13_scales, two_n, hidden), ("w2_scales", w2_scales, hidden, inter)):
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

    The caller's tensors are neither rebound nor modified. Raises RuntimeError when the kernel is
    not available (see :func:`kernels_status`), ValueError on shapes/dtypes it would refuse.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown int4 encoding {encoding!r}; expected one of {ENCODINGS}")
    available, reason = kernels_status(x.device)
    if not available:
        raise RuntimeError(f"cannot run the XPU fused-MoE kernel: {reason}")
    module, _ = _load_interface()
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

    cls = getattr(module, KERNEL_CLASS)
    params = _constructor_params(cls)
    extra: dict = {}
    handover = _s4_handover(module, params) if encoding == "s4" else None
    if handover is not None:
        dtype, extra = handover
        w13_k, w2_k = _alias(w13, dtype), _alias(w2, dtype)
        w13_k.xpu_fused_moe = True  # bytes are already two's-complement nibbles: skip implement_zp
    else:
        if encoding == "s4":  # this version takes no pre-converted bytes: hand over u4b8
            w13_k, w2_k = w13.contiguous() ^ 0x88, w2.contiguous() ^ 0x88
        else:
            w13_k, w2_k = _alias(w13), _alias(w2)
        if "is_int4" in params:
            extra["is_int4"] = True

    impl = cls(
        w13=w13_k,
        w13_scales=_alias(w13_scales),
        w13_bias=None,
        w2=w2_k,
        w2_scales=_alias(w2_scales),
        w2_bias=None,
        n_experts_per_token=top_k,
        activation="silu",
        num_experts=experts,
        **extra,
    )
    output = torch.empty_like(x)
    impl.apply(
        output=output,
        hidden_states=x.contiguous(),
        topk_weights=topk_weights.to(device=x.device, dtype=torch.float32).contiguous(),
        topk_ids=topk_ids.to(device=x.device, dtype=torch.int64).contiguous(),
    )
    return output
