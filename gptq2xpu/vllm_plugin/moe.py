"""The MoE method of a converted layer: load the four stacked tensors as they are, then hand them to
vLLM's own int4 MoE kernel-format step and backend.

Why this is cheaper than vLLM's GPTQ path: vLLM stacks per-expert GPTQ tensors into K-first
``[E, K/8, 2N]`` int32 and transposes them into its canonical N-first ``[E, 2N, K/8]`` (full
copies) before ``convert_to_wna16_moe_kernel_format``.  A converted ``w13_qweight`` uint8
``[E, 2N, K/2]`` viewed as int32 *is* that canonical tensor (little-endian), so here nothing is
stacked or transposed: each tensor-parallel rank copies its slice of N (gate rows, up rows, w2
columns, their scales) straight from the checkpoint tensor into its parameter, and the views go to
vLLM's step for the platform's backend (XPU first, then whatever vLLM offers: Marlin and others on
CUDA/ROCm, the AMX int4 kernel on x86 CPUs).  On XPU the kernel then gets the layer's own bytes, made
signed in place, instead of making its own int8 copy (:mod:`.xpu_experts`).  What differs between the
supported vLLM releases is in :mod:`.compat`.

Everything else is vLLM's :class:`AutoGPTQMoEMethod` (quant config, kernel set-up, ``apply``), so
a converted layer computes exactly what vLLM computes for the same source layer.

Where vLLM has no int4 MoE backend for the platform (x86 CPUs without AMX) -- or when
``GPTQ2XPU_VLLM_EXPERTS=dequantize`` -- the experts are dequantized once at load into the activation
dtype, ``(q - 8) * scale`` rounded once, and vLLM's unquantized MoE runs them; the log says so.
"""

from __future__ import annotations

import functools
import os

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoEConfig, FusedMoEMethodBase, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import select_wna16_moe_backend
from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig, AutoGPTQMoEMethod
from vllm.model_executor.layers.quantization.utils.quant_utils import QuantKey, kInt4StaticGroupScale
from vllm.model_executor.utils import replace_parameter
from vllm.scalar_type import scalar_types

from ..contract import CONFIG_BLOCK, EXPERT_TENSORS, W2_QWEIGHT, W13_QWEIGHT, ConvertedBlock, ConvertedLayer
from ..damage import refuse_nonfinite, refuse_nonzero_padding
from ..errors import InputError
from ..serving import EXPERTS_ENV
from .compat import marlin_input_dtype, to_kernel_format
from .slices import copy_rank_slice, rank_shape
from .xpu_experts import hand_over_signed

logger = init_logger("vllm.gptq2xpu")

_SCALE_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}
#: GPTQ v1 qzeros of a symmetric 4-bit checkpoint: every nibble stores zero - 1 = 7.  vLLM's
#: kernels that read zero points (the CPU one) get what they get from such a source.
_V1_SYMMETRIC_QZEROS = 0x77777777
#: Backends whose conversion rewrites the layer's GPTQ-layout parameters in place instead of
#: taking canonical tensors (convert_to_wna16_moe_kernel_format returns None for them).
_IN_PLACE_BACKENDS = ("HUMMING",)
#: vLLM's XPU int4 MoE backend: the experts go to it as signed nibbles (see .xpu_experts).
_XPU_BACKEND = "XPU"


def experts_mode() -> str:
    mode = os.environ.get(EXPERTS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "dequantize"):
        raise InputError(f"{EXPERTS_ENV}={mode!r}: expected auto or dequantize")
    return mode


class ConvertedMoEMethod(AutoGPTQMoEMethod):
    """One converted MoE layer (``entry``) for one tensor-parallel rank."""

    def __init__(self, entry: ConvertedLayer, block: ConvertedBlock, moe: FusedMoEConfig, prefix: str):
        FusedMoEMethodBase.__init__(self, moe)  # AutoGPTQMoEMethod.__init__ would pick a backend for K-first tensors
        self.entry = entry
        self.prefix = prefix
        self.encoding = block.nibble_encoding
        self.converted_tp = block.tp_size
        # One group size for the kernels: the finer of w13's and w2's (w2's may have been regrouped
        # for tensor parallelism); the coarser side's scales are repeated at load (lossless, scales only).
        self.group = min(entry.w13_group_size, entry.w2_group_size)
        self.quant_config = AutoGPTQConfig(
            weight_bits=4, group_size=self.group, desc_act=False, is_sym=True, lm_head_quantized=False,
            dynamic={}, full_config={"quant_method": "gptq", "bits": 4, "group_size": self.group,
                                     "sym": True, "desc_act": False})
        self.input_dtype = marlin_input_dtype(prefix)
        self.use_marlin = True
        self.wna16_moe_backend = self.experts_cls = None
        self.fallback: UnquantizedFusedMoEMethod | None = None
        self._loaded: set[str] = set()
        reason = f"{EXPERTS_ENV}=dequantize"
        if experts_mode() == "auto":
            try:
                self.wna16_moe_backend, self.experts_cls = select_wna16_moe_backend(
                    moe, QuantKey(scalar_types.uint4b8, kInt4StaticGroupScale), quant_config=self.quant_config,
                    may_have_zp=False, may_have_bias=False, allow_tile_padding=True)
            except NotImplementedError as exc:  # no int4 MoE kernel on this platform
                reason = f"vLLM: {exc}"
        if self.wna16_moe_backend is not None and self.wna16_moe_backend.name in _IN_PLACE_BACKENDS:
            raise InputError(f"{prefix}: vLLM chose the {self.wna16_moe_backend.value} MoE backend, which reads the "
                             "GPTQ checkpoint layout; choose another one with --moe-backend (e.g. marlin)")
        if self.wna16_moe_backend is None:
            self.fallback = UnquantizedFusedMoEMethod(moe)
            logger.warning_once(
                f"gptq2xpu: no int4 MoE kernel is used ({reason}): the experts of every converted MoE layer are "
                f"dequantized once at load to {moe.in_dtype} and run by vLLM's unquantized MoE "
                "(4x the expert memory of int4)")
        else:
            logger.info_once(f"gptq2xpu: converted MoE layers run on vLLM's {self.wna16_moe_backend.value} "
                             "int4 (WNA16) MoE backend")

    # ------------------------------------------------------------------------------ shapes

    # vLLM's signature: the size per rank is the config block's, not intermediate_size_per_partition
    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition,  # noqa: ARG002 (vLLM's signature)
                            act_dtype, moe_parallel_config):
        e, par = self.entry, moe_parallel_config
        if par.use_ep:
            raise InputError(f"{self.prefix}: expert parallelism is not supported for gptq2xpu checkpoints; "
                             "serve without --enable-expert-parallel")
        if self.moe.intermediate_size != e.intermediate_size or hidden_size != e.hidden_size:
            raise InputError(f"{self.prefix}: the model config says hidden {hidden_size}, expert intermediate "
                             f"{self.moe.intermediate_size}; the converted layer has {e.hidden_size}, "
                             f"{e.intermediate_size}")
        t, p = par.tp_size, e.padded_intermediate_size
        if p % t or (p // t) % e.w2_group_size or (p // t) % 8:
            raise InputError(
                f"{self.prefix}: converted for tensor-parallel size {self.converted_tp}: N={p} does not split into "
                f"{t} rank slices of whole w2 scale groups of {e.w2_group_size}; convert again with --tp-size {t}")
        rounded = super().maybe_roundup_sizes(hidden_size, p // t, act_dtype, moe_parallel_config)
        if self.fallback is not None:
            rounded = self.fallback.maybe_roundup_sizes(*rounded, act_dtype, moe_parallel_config)
        if rounded != (hidden_size, p // t):
            raise InputError(f"{self.prefix}: this vLLM set-up pads the MoE sizes to {rounded} (from "
                             f"{(hidden_size, p // t)}), which gptq2xpu's loader does not support")
        # N may be zero-padded to P by `convert --tp-size`: those rows are weights (zero), not the
        # per-rank padding vLLM adds and zeroes itself.
        self.moe.intermediate_size_per_partition_unpadded = p // t
        return rounded

    # vLLM's signature: the dtypes are the converted checkpoint's, and no extra attributes are set
    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                       params_dtype, **extra_weight_attrs):  # noqa: ARG002 (vLLM's signature)
        e = self.entry
        if num_experts != e.experts:
            raise InputError(f"{self.prefix}: the model has {num_experts} experts, the converted layer {e.experts}")
        if self.moe.has_bias:
            raise InputError(f"{self.prefix}: the model declares expert biases; converted checkpoints have none")
        t = self.moe.tp_size
        if (hidden_size, intermediate_size_per_partition) != (e.hidden_size, e.padded_intermediate_size // t):
            raise InputError(f"{self.prefix}: vLLM asks for hidden {hidden_size}, intermediate "
                             f"{intermediate_size_per_partition} per rank; the converted layer has "
                             f"{e.hidden_size}, {e.padded_intermediate_size // t}")
        sd = _SCALE_DTYPES[e.scale_dtype]
        for name in EXPERT_TENSORS:
            dtype = torch.uint8 if name in (W13_QWEIGHT, W2_QWEIGHT) else sd
            param = torch.nn.Parameter(torch.empty(rank_shape(e, name, t), dtype=dtype), requires_grad=False)
            param.weight_loader = self._loader(name)
            layer.register_parameter(name, param)
        layer.input_dtype = self.input_dtype
        _route_stacked_tensors(layer)

    # ------------------------------------------------------------------------------ loading

    def _loader(self, name: str):
        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, **per_expert) -> None:
            if per_expert:  # vLLM's loader mapped a per-expert checkpoint tensor onto this stacked parameter
                raise InputError(
                    f"{self.prefix}: the checkpoint holds a per-expert tensor (expert {per_expert.get('expert_id')}, "
                    f"which vLLM's loader maps onto {per_expert.get('weight_name')}) for a MoE layer that "
                    f"config.json's {CONFIG_BLOCK!r} block lists as converted (four stacked tensors only): the "
                    "checkpoint mixes layouts; check it with `gptq2xpu verify`")
            self.load_rank_slice(name, param.data, loaded_weight)
            self._loaded.add(name)

        return load

    def load_rank_slice(self, name: str, dst: torch.Tensor, full: torch.Tensor) -> None:
        """Copy this rank's slice of the checkpoint tensor ``full`` (contract shape) into ``dst``."""
        e = self.entry
        want = e.shapes[name]
        dtype = torch.uint8 if name in (W13_QWEIGHT, W2_QWEIGHT) else _SCALE_DTYPES[e.scale_dtype]
        if tuple(full.shape) != want or full.dtype != dtype:
            raise InputError(f"{e.tensor(name)}: {full.dtype} {list(full.shape)} in the checkpoint, expected {dtype} "
                             f"{list(want)} (config.json block); check the folder with `gptq2xpu verify`")
        if dtype != torch.uint8:
            refuse_nonfinite(e.tensor(name), full)
        else:
            refuse_nonzero_padding(e.tensor(name), full, w13=name == W13_QWEIGHT, valid=e.intermediate_size,
                                   n=e.intermediate_size, p=e.padded_intermediate_size, encoding=self.encoding)
        copy_rank_slice(e, name, full, dst, self.moe.tp_rank, self.moe.tp_size)

    # ------------------------------------------------------------------------------ after loading

    def process_weights_after_loading(self, layer) -> None:
        missing = [name for name in EXPERT_TENSORS if name not in self._loaded]
        if missing:
            raise InputError(f"{self.entry.tensor(missing[0])}: was not loaded (vLLM's weight loader for this model "
                             "did not hand it to gptq2xpu, or the checkpoint lacks it: check it with "
                             "`gptq2xpu verify`)")
        if self.encoding == "s4":  # signed nibbles -> the offset-8 codes vLLM's kernels take, in place
            for name in (W13_QWEIGHT, W2_QWEIGHT):
                getattr(layer, name).data.bitwise_xor_(0x88)
        if self.fallback is not None:
            self._dequantize(layer)
            return
        dtype = layer.params_dtype  # vLLM's GPTQ path holds scales in the activation dtype
        w13 = layer.w13_qweight.data.view(torch.int32)  # [E, 2N, K/8]: vLLM's canonical N-first layout
        w2 = layer.w2_qweight.data.view(torch.int32)    # [E, K, N/8]
        s13 = _repeat_groups(layer.w13_scales.data, self.entry.w13_group_size // self.group).to(dtype)
        s2 = _repeat_groups(layer.w2_scales.data, self.entry.w2_group_size // self.group).to(dtype)
        num, rows, _ = w13.shape
        k, n = w2.shape[1], rows // 2
        z13 = z2 = None  # vLLM's XPU step reads no zero points (the kernel's int4 is symmetric)
        if self.wna16_moe_backend.name != _XPU_BACKEND:
            z13 = torch.full((num, rows // 8, k // self.group), _V1_SYMMETRIC_QZEROS, dtype=torch.int32,
                             device=w13.device)
            z2 = torch.full((num, k // 8, n // self.group), _V1_SYMMETRIC_QZEROS, dtype=torch.int32, device=w13.device)
        converted = to_kernel_format(
            backend=self.wna16_moe_backend, layer=layer, quant_config=self.quant_config,
            input_dtype=self.input_dtype, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2,
            w13_qzeros=z13, w2_qzeros=z2, w13_bias=None, w2_bias=None)
        if converted is None:  # pragma: no cover - in-place backends are refused in __init__
            raise InputError(f"{self.prefix}: vLLM's {self.wna16_moe_backend.value} backend rewrote the layer in place")
        for name in EXPERT_TENSORS:
            replace_parameter(layer, name, converted.pop(name))
        for name, value in converted.items():  # zero points, input global scales where the release has them
            if value is not None:
                layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        layer.w13_weight = layer.w13_qweight  # the modular kernel reads w13_weight/w2_weight
        layer.w2_weight = layer.w2_qweight
        self._setup_kernel(layer)
        if self.wna16_moe_backend.name == _XPU_BACKEND:
            hand_over_signed(self.moe_kernel, layer.w13_qweight, layer.w2_qweight)

    def _dequantize(self, layer) -> None:
        """Dequantize into vLLM's unquantized MoE parameters, then hand the layer to that method."""
        e = self.entry
        w13, s13 = layer.w13_qweight.data, layer.w13_scales.data
        w2, s2 = layer.w2_qweight.data, layer.w2_scales.data
        num, rows, _ = w13.shape
        k, n = w2.shape[1], rows // 2
        self.fallback.create_weights(layer, num_experts=num, hidden_size=k, intermediate_size_per_partition=n,
                                     params_dtype=layer.params_dtype)
        for x in range(num):  # one expert at a time: the only extra memory is one expert in float32
            layer.w13_weight.data[x].copy_(dequantize_u4b8(w13[x], s13[x], e.w13_group_size))
            layer.w2_weight.data[x].copy_(dequantize_u4b8(w2[x], s2[x], e.w2_group_size))
        for name in EXPERT_TENSORS:
            delattr(layer, name)
        self.fallback.process_weights_after_loading(layer)
        layer._replace_quant_method(self.fallback)


def dequantize_u4b8(packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """uint8 rows ``[R, C/2]`` (input 2j low nibble, 2j+1 high) and scales ``[R, C/group]`` ->
    float32 ``[R, C]`` = ``(q - 8) * scale``, exact in float32 (callers round once to their dtype)."""
    rows = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(rows, -1, group).to(torch.float32).sub_(8)
    return codes.mul_(scales.to(torch.float32).unsqueeze(-1)).view(rows, -1)


def _repeat_groups(scales: torch.Tensor, factor: int) -> torch.Tensor:
    return scales if factor == 1 else scales.repeat_interleave(factor, dim=-1)


@functools.cache
def routed_experts_child() -> str:
    """The attribute under which vLLM's MoE runner keeps its ``RoutedExperts`` module (read from
    the installed vLLM: the prefix its expert-mapping helper puts before ``w13_*``), "" if none."""
    import inspect

    from vllm.model_executor.layers.fused_moe import RoutedExperts

    param = inspect.signature(RoutedExperts.make_expert_params_mapping).parameters.get("routed_experts_prefix")
    return param.default if param is not None and isinstance(param.default, str) else ""


def _stacked_names() -> dict[str, str]:
    """The names under which an experts module receives a converted layer's four tensors -> the tensor."""
    child = routed_experts_child()
    return {**{n: n for n in EXPERT_TENSORS}, **({f"{child}.{n}": n for n in EXPERT_TENSORS} if child else {})}


def refuse_stacked_tensors(layer, prefix: str, listed: list[str], method):
    """``method`` (vLLM's own, for an experts module the config block does not list as converted), made to
    refuse a converted layer's stacked tensors with one line.  vLLM's GPTQ MoE method has parameters of
    the same names: module by module (Qwen, Mixtral, GLM) its loader took them as fused tensors and the
    layer ran as garbage (NaN); by parameter name (DeepSeek) its parameters' loaders were called without
    the per-expert arguments they need (TypeError inside vLLM)."""
    def refuse(name: str):
        return InputError(
            f"{prefix}.{name}: a converted expert tensor, but config.json's {CONFIG_BLOCK!r} block does not list "
            f"MoE layer {prefix} as converted (it lists {', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''})"
            "; the block or the tensors were changed: check the folder with `gptq2xpu verify`")

    original_load, ours = layer.load_weights, _stacked_names()

    def load_weights(weights):  # module by module: vLLM's loader for the experts module
        def checked():
            for name, tensor in weights:
                if name in ours:
                    raise refuse(ours[name])
                yield name, tensor

        yield from original_load(checked())

    layer.load_weights = load_weights
    original_create = method.create_weights

    def create_weights(layer, *args, **kwargs):  # by parameter name: a stacked tensor comes with no expert
        original_create(layer, *args, **kwargs)
        for name in EXPERT_TENSORS:
            param = getattr(layer, name, None)
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                param.weight_loader = _per_expert_only(loader, refuse(name))

    method.create_weights = create_weights
    return method


def _per_expert_only(loader, error: InputError):
    """vLLM's per-expert ``weight_loader`` (its attributes kept: vLLM's loaders read some); a call without
    any expert (a whole stacked tensor, by parameter name) raises ``error``."""
    @functools.wraps(loader)
    def load(param, loaded_weight, *args, **kwargs):
        if not args and not kwargs:
            raise error
        return loader(param, loaded_weight, *args, **kwargs)

    return load


def _route_stacked_tensors(layer) -> None:
    """Send the four converted tensors straight to their parameters' loaders.

    vLLM hands an experts module's checkpoint tensors to ``RoutedExperts.load_weights``, which knows
    per-expert and fused HF layouts only; wrap it (on this layer only) so that the names of our four
    parameters go to ``param.weight_loader`` and everything else to vLLM's loader unchanged.  The
    names may arrive qualified by the runner's attribute for this module (see
    ``Gptq2XpuConfig.get_checkpoint_weight_mapper``).
    """
    original = layer.load_weights
    ours = _stacked_names()

    def load_weights(weights):
        loaded = []

        def others():
            for name, tensor in weights:
                if name in ours:
                    param = getattr(layer, ours[name])
                    param.weight_loader(param, tensor)
                    loaded.append(ours[name])
                else:
                    yield name, tensor

        yield from original(others())
        yield from loaded

    layer.load_weights = load_weights
