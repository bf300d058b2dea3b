"""Synthetic GPTQ (and compressed-tensors) Mixture-of-Experts checkpoints, with ground truth.

Used by the tests, ``gptq2xpu demo`` and ``scripts/bench.py``.  It is an *independent* GPTQ packer:
nothing here uses the converter's code, so a converter bug cannot hide behind a shared helper.  It
does not import torch; safetensors files are written through :mod:`gptq2xpu.safetensors_io`
(``ShardLayout`` plans every file, then each tensor is generated and written in order, so even a
multi-GiB benchmark checkpoint streams with a few MiB of memory).

Encoding (the ground truth the converter is tested against)
-----------------------------------------------------------
A GPTQ linear with input size ``K``, output size ``N``, group ``g`` (``-1`` = one group of ``K``)
and codes ``q[n, k]`` in ``0..15`` (``weight = (q - 8) * scale``, "uint4b8") is stored as

* ``qweight`` int32 ``[K/8, N]``: input row ``8r+j`` sits in bits ``4j..4j+3`` of word ``[r, n]``;
* ``scales``  ``[ceil(K/g), N]`` (fp16 or bf16), about half of them negative (AutoRound does that);
* ``qzeros``  int32 ``[ceil(K/g), N/8]`` packed along N in the same nibble order; symmetric:
  every nibble 7 (``checkpoint_format`` "gptq", v1 stores zero-1: ``0x77777777``) or 8 ("gptq_v2",
  ``0x88888888``);
* ``g_idx``   int32 ``[K]`` = ``arange(K) // g`` (act-order: ``permutation(K) // g``).

8-bit modules (a ``dynamic`` ``{"bits": 8}`` override) pack 4 fields of 8 bits per word
(``qweight [K/4, N]``, zero 128, v1 stores 127).  Expert gate/up: in = hidden (K), out =
moe_intermediate (N); down: in = N, out = K.

compressed-tensors "pack-quantized" (``quant_format="compressed-tensors"``) stores
``weight_packed`` int32 ``[N, K/8]`` (codes packed along K, LSB first; the codes already carry the
+8 offset), ``weight_scale [N, K/g]``, ``weight_shape`` int64 ``[N, K]``, and, for act-order /
asymmetric cases, ``weight_g_idx [K]`` / ``weight_zero_point [N/8, K/g]`` (packed along N).

Everything is deterministic: each tensor's content comes from a random generator seeded by
``(spec.seed, tensor/module name)``, so the same spec gives byte-identical files and the content of a
tensor does not depend on which shard or position it ends up in (``shuffle_index``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..safetensors_io import DTYPE_SIZES, PlannedTensor, ShardLayout

__all__ = [
    "FAMILIES", "FamilyInfo", "ROLES", "SynthSpec", "SynthLayer", "SynthInfo",
    "make_checkpoint",
    "pack_int32", "pack_gptq_qweight", "pack_gptq_qzeros", "pack_ct_weight", "gptq_g_idx",
    "round_to_dtype", "bf16_bits", "bf16_to_float32", "SAFETENSORS_DTYPE",
]

ROLES = ("gate", "up", "down")

#: spec dtype name -> safetensors dtype name
SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


# ------------------------------------------------------------------------------------ families


@dataclass(frozen=True)
class FamilyInfo:
    """How one model family names things and writes its config.

    ``expert_keys`` maps the generic meaning (``num_experts``, ``top_k``, ``intermediate``) to the
    family's config key.  ``proj`` maps role -> projection module name.  ``shared_style``:
    ``"shared_expert"`` = Qwen (``mlp.shared_expert.{gate,up,down}_proj`` GPTQ + float
    ``mlp.shared_expert_gate.weight [1, K]``), ``"shared_experts"`` = DeepSeek/GLM
    (``mlp.shared_experts.{gate,up,down}_proj`` GPTQ), ``None`` = the family has none.
    ``mtp_style``: ``"mtp"`` = ``mtp.layers.0.*`` (+ ``mtp.fc``/``mtp.norm``...),
    ``"layer"`` = an ordinary ``model.layers.{num_layers}.*`` layer (+ ``eh_proj``/``enorm``...),
    ``None`` = no MTP.  ``attention`` picks the attention tensor set; ``hybrid`` families alternate
    linear-attention (Gated DeltaNet) layers with full attention every ``full_attention_interval``.
    ``nested`` = the language-model params live in ``config["text_config"]``.
    """

    model_type: str
    architectures: tuple[str, ...]
    expert_keys: dict
    moe_module: str
    proj: dict
    layer_prefix: str
    embed_name: str
    norm_name: str
    shared_style: str | None
    shared_default: bool
    router_bias: bool          # mlp.gate.e_score_correction_bias [E] float32
    mtp_style: str | None
    attention: str
    hybrid: bool = False
    nested: bool = False
    text_model_type: str | None = None
    dense_style: str | None = None   # "first_k_dense_replace" | "mlp_only_layers" | None
    extra: dict = field(default_factory=dict)   # fixed config keys of the family


_QWEN_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_QWEN_KEYS = {"num_experts": "num_experts", "top_k": "num_experts_per_tok",
              "intermediate": "moe_intermediate_size", "norm_topk_prob": "norm_topk_prob"}
_DS_KEYS = {"num_experts": "n_routed_experts", "top_k": "num_experts_per_tok",
            "intermediate": "moe_intermediate_size", "first_dense": "first_k_dense_replace",
            "shared": "n_shared_experts", "scoring_func": "scoring_func",
            "routed_scaling_factor": "routed_scaling_factor", "norm_topk_prob": "norm_topk_prob",
            "topk_method": "topk_method", "n_group": "n_group", "topk_group": "topk_group"}

#: The model families synth can write.  Keys are ``SynthSpec.family`` values.
FAMILIES: dict[str, FamilyInfo] = {
    "qwen2_moe": FamilyInfo(
        model_type="qwen2_moe", architectures=("Qwen2MoeForCausalLM",),
        expert_keys=dict(_QWEN_KEYS, shared_intermediate="shared_expert_intermediate_size"),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_expert", shared_default=True, router_bias=False, mtp_style=None,
        attention="qwen2", dense_style="mlp_only_layers",
        extra={"norm_topk_prob": False, "decoder_sparse_step": 1, "use_sliding_window": False,
               "router_aux_loss_coef": 0.001, "rope_theta": 1000000.0}),
    "qwen3_moe": FamilyInfo(
        model_type="qwen3_moe", architectures=("Qwen3MoeForCausalLM",),
        expert_keys=dict(_QWEN_KEYS), moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_expert", shared_default=False, router_bias=False, mtp_style=None,
        attention="qwen3", dense_style="mlp_only_layers",
        extra={"norm_topk_prob": True, "decoder_sparse_step": 1, "use_sliding_window": False,
               "router_aux_loss_coef": 0.001, "rope_theta": 1000000.0, "attention_bias": False}),
    "qwen3_next": FamilyInfo(
        model_type="qwen3_next", architectures=("Qwen3NextForCausalLM",),
        expert_keys=dict(_QWEN_KEYS, shared_intermediate="shared_expert_intermediate_size"),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_expert", shared_default=True, router_bias=False, mtp_style="mtp",
        attention="qwen3_gated", hybrid=True, dense_style="mlp_only_layers",
        extra={"norm_topk_prob": True, "decoder_sparse_step": 1, "router_aux_loss_coef": 0.001,
               "rope_theta": 10000000.0, "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4}),
    "qwen3_5_moe": FamilyInfo(
        model_type="qwen3_5_moe", architectures=("Qwen3_5MoeForConditionalGeneration",),
        expert_keys=dict(_QWEN_KEYS, shared_intermediate="shared_expert_intermediate_size"),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.language_model.layers",
        embed_name="model.language_model.embed_tokens.weight",
        norm_name="model.language_model.norm.weight",
        shared_style="shared_expert", shared_default=True, router_bias=False, mtp_style="mtp",
        attention="qwen3_gated", hybrid=True, nested=True, text_model_type="qwen3_5_moe_text",
        dense_style="mlp_only_layers",
        extra={"norm_topk_prob": True, "router_aux_loss_coef": 0.001,
               "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
               "rope_parameters": {"rope_theta": 10000000.0, "rope_type": "default",
                                   "mrope_interleaved": True, "mrope_section": [11, 11, 10]}}),
    "mixtral": FamilyInfo(
        model_type="mixtral", architectures=("MixtralForCausalLM",),
        expert_keys={"num_experts": "num_local_experts", "top_k": "num_experts_per_tok",
                     "intermediate": "intermediate_size"},
        moe_module="block_sparse_moe", proj={"gate": "w1", "up": "w3", "down": "w2"},
        layer_prefix="model.layers", embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style=None, shared_default=False, router_bias=False, mtp_style=None, attention="mixtral",
        extra={"router_aux_loss_coef": 0.02, "output_router_logits": False, "sliding_window": None,
               "rope_theta": 1000000.0}),
    "deepseek_v2": FamilyInfo(
        model_type="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), expert_keys=dict(_DS_KEYS),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_experts", shared_default=True, router_bias=False, mtp_style=None,
        attention="deepseek_v2", dense_style="first_k_dense_replace",
        extra={"scoring_func": "softmax", "topk_method": "group_limited_greedy",
               "routed_scaling_factor": 1.0, "norm_topk_prob": False, "moe_layer_freq": 1,
               "aux_loss_alpha": 0.001, "seq_aux": True, "rope_theta": 10000.0}),
    "deepseek_v3": FamilyInfo(
        model_type="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), expert_keys=dict(_DS_KEYS),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_experts", shared_default=True, router_bias=True, mtp_style="layer",
        attention="deepseek_v3", dense_style="first_k_dense_replace",
        extra={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "routed_scaling_factor": 2.5,
               "norm_topk_prob": True, "moe_layer_freq": 1, "aux_loss_alpha": 0.001, "seq_aux": True,
               "rope_theta": 10000.0}),
    "glm4_moe": FamilyInfo(
        model_type="glm4_moe", architectures=("Glm4MoeForCausalLM",), expert_keys=dict(_DS_KEYS),
        moe_module="mlp", proj=_QWEN_PROJ, layer_prefix="model.layers",
        embed_name="model.embed_tokens.weight", norm_name="model.norm.weight",
        shared_style="shared_experts", shared_default=True, router_bias=True, mtp_style="layer",
        attention="glm4", dense_style="first_k_dense_replace",
        extra={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "routed_scaling_factor": 2.5,
               "norm_topk_prob": True, "attention_bias": True, "use_qk_norm": False,
               "partial_rotary_factor": 0.5, "rope_theta": 1000000.0}),
}


# ----------------------------------------------------------------------------------- the spec


#: DeepSeek's multi-head latent attention: vLLM's MLA kernels take kv_lora_rank + qk_rope_head_dim
#: of 320, 512 or 576 only, so the synthetic models use 256 + 64 (vLLM can serve them).
MLA_KV_RANK, MLA_ROPE, MLA_NOPE, MLA_V = 256, 64, 32, 32


@dataclass
class SynthSpec:
    family: str = "qwen3_moe"   # a key of FAMILIES
    hidden: int = 256            # K
    moe_intermediate: int = 128  # N
    num_experts: int = 8
    top_k: int = 2
    num_layers: int = 2          # decoder layers (incl. dense ones)
    first_dense: int = 0         # first k layers are dense MLPs (mlp.gate_proj/up_proj/down_proj, GPTQ)
    group_size: int = 128        # -1 = per-channel (one group spanning K)
    checkpoint_format: str = "gptq"   # "gptq" (v1, qzeros store zero-1 -> 0x77777777) or "gptq_v2"
    scale_dtype: str = "float16"      # or "bfloat16"
    float_dtype: str = "bfloat16"     # norms/embeddings/router/float experts
    vocab: int = 64
    attention: bool = True       # GPTQ attention projections + norms per layer
    shared_experts: bool | None = None   # None = family default
    mtp: bool = False            # an MTP layer whose experts are FLOAT
    fused_float_mtp: bool = False  # MTP experts as fused 3-D experts.gate_up_proj / experts.down_proj
    vision: bool = False         # model.visual.* float tower (with mlp.gate_proj names)
    shard_size: int | None = None   # bytes of tensor data per shard (HF max_shard_size semantics)
    shuffle_index: bool = False  # scramble tensor->shard assignment, file order and weight_map order
    dynamic: dict | None = None  # quantization_config["dynamic"], applied to what is written
    old_autogptq: bool = False   # only quantize_config.json; single gptq_model-4bit-<g>g.safetensors
    config_location: str = "config"  # "config" | "text_config" | "quantization_config_json" | "quantize_config_json"
    quantized_router: bool = False   # router mlp.gate stored as GPTQ
    act_order: bool = False      # g_idx from a permutation (not monotonic), desc_act true
    asymmetric: bool = False     # zero points vary per group, sym false
    quant_format: str = "gptq"   # or "compressed-tensors" (pack-quantized)
    fast: bool = False           # benchmarks: random qweight words, no ground truth
    seed: int = 0
    write_checkpoint_format: bool = True   # False: omit "checkpoint_format" (AutoRound does; means v1)
    metadata: dict | None = None           # safetensors __metadata__ (default {"format": "pt"})


@dataclass
class SynthLayer:
    """Ground truth for one MoE layer (arrays only when the spec is not ``fast``).

    ``codes[role]`` uint8 ``[E, out, in]`` (u4b8: weight = (q - 8) * scale; for 8-bit, q - 128);
    ``scales[role]`` float32 ``[E, out, ceil(in/group)]`` (exact copies of the stored values);
    ``group_size[role]`` the group actually used (``in`` for per-channel); ``g_idx[role]`` int32
    ``[E, in]``; ``zeros[role]`` uint8 ``[E, out, groups]`` (the real zero point, 8 when symmetric);
    ``float_weights[role]`` float32 ``[E, out, in]`` for float / excluded experts.

    ``kind``: ``"gptq"`` (uniform 4-bit), ``"int8"`` (uniform 8-bit), ``"float"`` (MTP: float from
    the start), ``"excluded"`` (every expert excluded by a ``dynamic`` ``-:`` rule, hence float),
    ``"mixed"`` (experts of one layer differ in bits / float-ness / group size).
    """

    prefix: str
    kind: str
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    group_size: dict[str, int] = field(default_factory=dict)
    bits: int = 4
    g_idx: dict[str, np.ndarray] = field(default_factory=dict)
    zeros: dict[str, np.ndarray] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    num_experts: int = 0
    fused: bool = False            # float experts stored as fused 3-D tensors
    expert_names: list[str] = field(default_factory=list)   # every tensor under <prefix>.experts

    def dequant(self, role: str) -> np.ndarray:
        """float32 ``[E, out, in]`` weights of ``role`` from the ground truth."""
        if role in self.float_weights:
            return self.float_weights[role]
        codes = self.codes[role].astype(np.float32)
        idx = self.g_idx[role][:, None, :].astype(np.int64)
        s = np.take_along_axis(self.scales[role], idx, axis=2)
        z = np.take_along_axis(self.zeros[role].astype(np.float32), idx, axis=2)
        return (codes - z) * s


@dataclass
class SynthInfo:
    path: Path
    spec: SynthSpec
    moe_layers: list[SynthLayer]           # in layer order (MTP last)
    router_names: list[str]                # every router tensor name (weight / GPTQ fields / e_score_correction_bias)
    passthrough_names: list[str]           # every tensor that is NOT a converted GPTQ expert tensor
    expected_kinds: dict[str, str]         # MoE prefix -> "gptq" | "float" | "unsupported"
    # --- extras ---
    config: dict = field(default_factory=dict)              # config.json as written
    quant_config: dict | None = None                        # the quantization description written
    quant_config_file: str | None = None                    # where it went, e.g. "config.json:quantization_config"
    files: list[str] = field(default_factory=list)          # safetensors file names, in order
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor -> file name
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (dtype, shape)
    expect_refusal: str | None = None                      # why a converter must refuse, if it must
    total_size: int = 0                                     # bytes of tensor data


# ---------------------------------------------------------------------------------- packing


def pack_int32(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide fields along ``axis``: element ``per*r + j`` -> bits ``bits*j..``
    of word ``r`` (LSB first).  Returns int32 (two's complement view of the uint32 words)."""
    per = 32 // bits
    v = np.moveaxis(np.asarray(values), axis, -1)
    if v.shape[-1] % per:
        raise ValueError(f"cannot pack {v.shape[-1]} values {per} per word")
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value does not fit in {bits} bits")
    v = v.astype(np.uint32).reshape(*v.shape[:-1], v.shape[-1] // per, per)
    out = np.zeros(v.shape[:-1], dtype=np.uint32)
    for j in range(per):
        out |= v[..., j] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(out.view(np.int32), -1, axis))


def pack_gptq_qweight(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """codes ``[out, in]`` -> GPTQ ``qweight`` int32 ``[in*bits/32, out]``."""
    return pack_int32(np.asarray(codes).T, bits, axis=0)


def pack_gptq_qzeros(stored_zeros: np.ndarray, bits: int = 4) -> np.ndarray:
    """stored zero points ``[groups, out]`` (already v1-adjusted) -> ``qzeros`` ``[groups, out*bits/32]``."""
    return pack_int32(stored_zeros, bits, axis=1)


def pack_ct_weight(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """codes ``[out, in]`` (offset already applied) -> compressed-tensors ``weight_packed`` ``[out, in*bits/32]``."""
    return pack_int32(codes, bits, axis=1)


def gptq_g_idx(in_features: int, group: int, perm: np.ndarray | None = None) -> np.ndarray:
    """``arange(K) // g``, or ``perm // g`` for act-order."""
    src = np.arange(in_features) if perm is None else np.asarray(perm)
    return (src // group).astype(np.int32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (no NaNs expected)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return r.astype(np.uint16)


def bf16_to_float32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_dtype(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``x`` -> (array holding the stored bytes, float32 copy of the stored values)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        raw = bf16_bits(x)
        return raw, bf16_to_float32(raw)
    if dtype == "float16":
        raw = x.astype(np.float16)
        return raw, raw.astype(np.float32)
    if dtype == "float32":
        return x.copy(), x.copy()
    raise ValueError(f"unknown dtype {dtype!r}")


# ------------------------------------------------------------------------------- the planner


@dataclass
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray | Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class _Linear:
    """One linear module as written."""

    name: str
    in_f: int
    out_f: int
    kind: str                 # "gptq" | "float"
    bits: int = 4
    group: int = 128          # effective group (in_f for per-channel)
    tensors: list[str] = field(default_factory=list)


_SAFE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
               "I32", "U32", "F32", "F64", "I64", "U64"]


class _Builder:
    def __init__(self, spec: SynthSpec):
        self.spec = spec
        self.fam = FAMILIES[spec.family]
        self.tensors: list[_Tensor] = []
        self.names: set[str] = set()
        self.linears: dict[str, _Linear] = {}
        self.routers: list[str] = []
        self.moe: list[dict] = []   # {"prefix", "experts": [{role: _Linear}], "mtp": bool, "fused": [...]}
        self.float_linear_modules: list[str] = []   # for the compressed-tensors "ignore" list
        self.ct_settings: dict[tuple[int, int], list[str]] = {}
        self.ct = spec.quant_format == "compressed-tensors"
        self.fdt = SAFETENSORS_DTYPE[spec.float_dtype]
        self.sdt = SAFETENSORS_DTYPE[spec.scale_dtype]
        self.dynamic = _compile_dynamic(spec.dynamic)

    # ----- randomness
    def rng(self, *parts: str) -> np.random.Generator:
        digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()
        words = [int(w) for w in np.frombuffer(digest, dtype="<u4")]
        seed = int(self.spec.seed)
        return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, *words]))

    # ----- primitive tensors
    def add(self, name: str, dtype: str, shape, make) -> str:
        if name in self.names:
            raise AssertionError(f"duplicate tensor {name}")
        self.names.add(name)
        self.tensors.append(_Tensor(name, dtype, tuple(int(s) for s in shape), make))
        return name

    def float_values(self, name: str, shape, style: str = "normal", dtype: str | None = None) -> np.ndarray:
        """float32 values (exactly representable in the stored dtype)."""
        dtype = dtype or self.spec.float_dtype
        rng = self.rng(name, "float")
        n = math.prod(shape)
        if style == "norm":
            v = 1.0 + rng.standard_normal(n, dtype=np.float32) * np.float32(0.05)
        elif style == "bias":
            v = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
        else:
            v = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
        return round_to_dtype(v.reshape(shape), dtype)[1]

    def float_raw(self, name: str, shape, style: str, dtype: str) -> np.ndarray:
        if self.spec.fast and style == "normal" and dtype == "bfloat16" and math.prod(shape) >= 1 << 16:
            # fast: random bf16 bit patterns with magnitudes ~2^-11..2^-4 (no per-value math)
            u = np.frombuffer(self.rng(name, "float").bytes(2 * math.prod(shape)), dtype="<u2")
            return ((u & np.uint16(0x83FF)) | np.uint16(116 << 7)).reshape(shape)
        return round_to_dtype(self.float_values(name, shape, style, dtype), dtype)[0]

    def add_float(self, name: str, shape, style: str = "normal", dtype: str | None = None) -> str:
        dtype = dtype or self.spec.float_dtype
        st = SAFETENSORS_DTYPE[dtype]
        return self.add(name, st, shape, lambda: self.float_raw(name, shape, style, dtype))

    # ----- quantization decisions
    def decide(self, module: str, force_float: bool = False) -> tuple[str, int, int]:
        """("gptq", bits, config_group) or ("float", 0, 0) for a quantizable linear."""
        if force_float:
            return ("float", 0, 0)
        bits, group = 4, self.spec.group_size
        for sign, regex, overrides in self.dynamic:
            if regex.match(module):
                if sign == "-":
                    return ("float", 0, 0)
                bits = int(overrides.get("bits", bits))
                group = int(overrides.get("group_size", group))
                break
        if bits >= 16:
            return ("float", 0, 0)
        return ("gptq", bits, group)

    # ----- ground-truth generators for a quantized linear
    def codes(self, lin: _Linear) -> np.ndarray:
        return self.rng(lin.name, "codes").integers(0, 1 << lin.bits, size=(lin.out_f, lin.in_f), dtype=np.uint8)

    def scales(self, lin: _Linear) -> tuple[np.ndarray, np.ndarray]:
        """(stored raw [out, groups], float32 copy [out, groups])"""
        groups = -(-lin.in_f // lin.group)
        rng = self.rng(lin.name, "scales")
        mag = np.exp(rng.uniform(math.log(1e-3), math.log(1e-2), size=(lin.out_f, groups))).astype(np.float32)
        if self.ct:
            sign = np.float32(1.0)
        else:
            sign = np.where(rng.integers(0, 2, size=mag.shape) == 1, np.float32(-1), np.float32(1))
        return round_to_dtype(mag * sign, self.spec.scale_dtype)

    def zeros(self, lin: _Linear) -> np.ndarray:
        """the real zero points, uint8 [out, groups]"""
        groups = -(-lin.in_f // lin.group)
        mid = 1 << (lin.bits - 1)
        if not self.spec.asymmetric:
            return np.full((lin.out_f, groups), mid, dtype=np.uint8)
        z = self.rng(lin.name, "zeros").integers(mid - 3, mid + 4, size=(lin.out_f, groups))
        z.flat[0] = mid - 2   # at least one zero point that is not the symmetric one
        return z.astype(np.uint8)

    def g_idx(self, lin: _Linear) -> np.ndarray:
        perm = None
        if self.spec.act_order:
            perm = self.rng(lin.name, "perm").permutation(lin.in_f)
            if lin.in_f > 1 and np.all(np.diff(perm // lin.group) >= 0):
                perm = perm[::-1].copy()   # make sure it is not monotonic
        return gptq_g_idx(lin.in_f, lin.group, perm)

    def random_words(self, lin: _Linear, what: str, shape) -> np.ndarray:
        return np.frombuffer(self.rng(lin.name, what).bytes(4 * math.prod(shape)), dtype="<i4").reshape(shape)

    # ----- linear modules
    def linear(self, module: str, in_f: int, out_f: int, *, force_float: bool = False,
               bias: bool = False, ignore_listed: bool = True, style: str = "normal") -> _Linear:
        kind, bits, cgroup = self.decide(module, force_float)
        if kind == "float":
            lin = _Linear(module, in_f, out_f, "float", 0, 0)
            lin.tensors.append(self.add_float(f"{module}.weight", (out_f, in_f), style))
            if ignore_listed:
                self.float_linear_modules.append(module)
        else:
            group = in_f if cgroup == -1 else cgroup
            if cgroup != -1 and cgroup <= 0:
                raise ValueError(f"{module}: bad group size {cgroup}")
            per = 32 // bits
            if in_f % per or out_f % per:
                raise ValueError(f"{module}: {in_f}x{out_f} cannot be packed {per} per int32")
            lin = _Linear(module, in_f, out_f, "gptq", bits, group)
            if self.ct:
                self._ct_tensors(lin)
                self.ct_settings.setdefault((bits, cgroup), []).append(module)
            else:
                self._gptq_tensors(lin)
        if bias:
            lin.tensors.append(self.add_float(f"{module}.bias", (out_f,), "bias"))
        self.linears[module] = lin
        return lin

    def _gptq_tensors(self, lin: _Linear) -> None:
        m, per = lin.name, 32 // lin.bits
        groups = -(-lin.in_f // lin.group)
        fast = self.spec.fast
        v1 = self.spec.checkpoint_format == "gptq"
        mask = (1 << lin.bits) - 1

        def qweight():
            if fast:
                return self.random_words(lin, "qweight", (lin.in_f // per, lin.out_f))
            return pack_gptq_qweight(self.codes(lin), lin.bits)

        def qzeros():
            z = self.zeros(lin).T.astype(np.int64)          # [groups, out]
            stored = ((z - 1) & mask) if v1 else z
            return pack_gptq_qzeros(stored, lin.bits)

        def scales():
            return np.ascontiguousarray(self.scales(lin)[0].T)

        def g_idx():
            return self.g_idx(lin)

        lin.tensors += [
            self.add(f"{m}.qweight", "I32", (lin.in_f // per, lin.out_f), qweight),
            self.add(f"{m}.qzeros", "I32", (groups, lin.out_f // per), qzeros),
            self.add(f"{m}.scales", self.sdt, (groups, lin.out_f), scales),
            self.add(f"{m}.g_idx", "I32", (lin.in_f,), g_idx),
        ]

    def _ct_tensors(self, lin: _Linear) -> None:
        m, per = lin.name, 32 // lin.bits
        groups = -(-lin.in_f // lin.group)
        fast = self.spec.fast

        def packed():
            if fast:
                return self.random_words(lin, "weight_packed", (lin.out_f, lin.in_f // per))
            return pack_ct_weight(self.codes(lin), lin.bits)

        lin.tensors += [
            self.add(f"{m}.weight_packed", "I32", (lin.out_f, lin.in_f // per), packed),
            self.add(f"{m}.weight_scale", self.sdt, (lin.out_f, groups), lambda: self.scales(lin)[0]),
            self.add(f"{m}.weight_shape", "I64", (2,), lambda: np.array([lin.out_f, lin.in_f], dtype=np.int64)),
        ]
        if self.spec.act_order:
            lin.tensors.append(self.add(f"{m}.weight_g_idx", "I32", (lin.in_f,), lambda: self.g_idx(lin)))
        if self.spec.asymmetric:
            if lin.out_f % per:
                raise ValueError(f"{m}: out {lin.out_f} cannot be packed {per} per int32")
            lin.tensors.append(self.add(f"{m}.weight_zero_point", "I32", (lin.out_f // per, groups),
                                        lambda: pack_int32(self.zeros(lin), lin.bits, axis=0)))

    # ----- model pieces
    def attention(self, p: str, layer: int, K: int, float_all: bool = False, full: bool = False) -> None:
        fam, s = self.fam, self.spec
        H, kvh, hd = _heads(K)

        def lin(name, i, o, **kw):
            return self.linear(f"{p}.{name}", i, o, force_float=float_all, **kw)

        style = fam.attention
        linear_attention = fam.hybrid and not full and not _is_full_attention(layer, s.num_layers)
        if style in ("qwen3_gated", "qwen3") and linear_attention:
            la = f"{p}.linear_attn"
            nv = max(1, K // 128)
            if fam.model_type == "qwen3_next":
                lin("linear_attn.in_proj_qkvz", K, 2 * K)
                self.add_float(f"{la}.in_proj_ba.weight", (2 * nv, K))
            else:
                lin("linear_attn.in_proj_qkv", K, 3 * K // 2 if (3 * K // 2) % 8 == 0 else 2 * K)
                lin("linear_attn.in_proj_z", K, K)
                self.add_float(f"{la}.in_proj_b.weight", (nv, K))
                self.add_float(f"{la}.in_proj_a.weight", (nv, K))
            self.add_float(f"{la}.conv1d.weight", (K, 1, 4))
            self.add_float(f"{la}.A_log", (nv,), "bias", dtype="float32")
            self.add_float(f"{la}.dt_bias", (nv,), "norm")
            self.add_float(f"{la}.norm.weight", (hd,), "norm", dtype="float32")
            lin("linear_attn.out_proj", K, K)
            return
        if style in ("qwen2", "qwen3", "qwen3_gated", "mixtral", "glm4"):
            qbias = style in ("qwen2", "glm4")
            lin("self_attn.q_proj", K, H * hd * (2 if style == "qwen3_gated" else 1), bias=qbias)
            lin("self_attn.k_proj", K, kvh * hd, bias=qbias)
            lin("self_attn.v_proj", K, kvh * hd, bias=qbias)
            lin("self_attn.o_proj", H * hd, K)
            if style in ("qwen3", "qwen3_gated"):
                self.add_float(f"{p}.self_attn.q_norm.weight", (hd,), "norm")
                self.add_float(f"{p}.self_attn.k_norm.weight", (hd,), "norm")
        elif style in ("deepseek_v2", "deepseek_v3"):
            nope, rope, vhd = MLA_NOPE, MLA_ROPE, MLA_V
            kv_rank = MLA_KV_RANK
            if style == "deepseek_v2":
                lin("self_attn.q_proj", K, H * (nope + rope))
            else:
                q_rank = K // 2
                lin("self_attn.q_a_proj", K, q_rank)
                self.add_float(f"{p}.self_attn.q_a_layernorm.weight", (q_rank,), "norm")
                lin("self_attn.q_b_proj", q_rank, H * (nope + rope))
            lin("self_attn.kv_a_proj_with_mqa", K, kv_rank + rope)
            self.add_float(f"{p}.self_attn.kv_a_layernorm.weight", (kv_rank,), "norm")
            lin("self_attn.kv_b_proj", kv_rank, H * (nope + vhd))
            lin("self_attn.o_proj", H * vhd, K)
        else:  # pragma: no cover
            raise AssertionError(style)

    def mlp3(self, p: str, K: int, inter: int, *, float_all: bool = False) -> dict[str, _Linear]:
        """gate/up/down projections named the Qwen way (dense MLPs, shared experts)."""
        return {
            "gate": self.linear(f"{p}.gate_proj", K, inter, force_float=float_all),
            "up": self.linear(f"{p}.up_proj", K, inter, force_float=float_all),
            "down": self.linear(f"{p}.down_proj", inter, K, force_float=float_all),
        }

    def moe_block(self, p: str, *, mtp: bool) -> None:
        """router, experts and shared experts of one MoE layer ``p`` = <layer>.<moe_module>."""
        s, fam = self.spec, self.fam
        K, N, E = s.hidden, s.moe_intermediate, s.num_experts
        # router
        rl = self.linear(f"{p}.gate", K, E, force_float=mtp or not s.quantized_router)
        self.routers += rl.tensors
        if fam.router_bias:
            self.routers.append(self.add_float(f"{p}.gate.e_score_correction_bias", (E,), "bias", dtype="float32"))
        block = {"prefix": p, "mtp": mtp, "experts": [], "fused": []}
        if mtp and s.fused_float_mtp:
            gu = f"{p}.experts.gate_up_proj"
            dn = f"{p}.experts.down_proj"
            block["fused"] = [
                self.add(gu, self.fdt, (E, 2 * N, K), lambda: self._fused_chunks(p, "gate_up")),
                self.add(dn, self.fdt, (E, K, N), lambda: self._fused_chunks(p, "down")),
            ]
        else:
            for e in range(E):
                roles = {}
                for role in ROLES:
                    i, o = (N, K) if role == "down" else (K, N)
                    roles[role] = self.linear(f"{p}.experts.{e}.{fam.proj[role]}", i, o, force_float=mtp)
                block["experts"].append(roles)
        self.moe.append(block)
        # shared experts
        shared = fam.shared_default if s.shared_experts is None else s.shared_experts
        if shared:
            if fam.shared_style is None:
                raise ValueError(f"family {s.family} has no shared experts")
            if fam.shared_style == "shared_expert":
                self.mlp3(f"{p}.shared_expert", K, N, float_all=mtp)
                self.linear(f"{p}.shared_expert_gate", K, 1, force_float=True)
            else:
                self.mlp3(f"{p}.shared_experts", K, N, float_all=mtp)

    def _expert_float(self, p: str, e: int, role: str) -> np.ndarray:
        """float32 weights [out, in] of float expert e (per-expert or fused storage share them)."""
        s = self.spec
        K, N = s.hidden, s.moe_intermediate
        shape = (K, N) if role == "down" else (N, K)
        name = f"{p}.experts.{e}.{self.fam.proj[role]}.weight"
        if s.fast:
            return bf16_to_float32(self.float_raw(name, shape, "normal", "bfloat16")) if s.float_dtype == "bfloat16" \
                else self.float_values(name, shape)
        return self.float_values(name, shape)

    def _fused_chunks(self, p: str, which: str) -> Iterator[np.ndarray]:
        for e in range(self.spec.num_experts):
            if which == "gate_up":
                w = np.concatenate([self._expert_float(p, e, "gate"), self._expert_float(p, e, "up")], axis=0)
            else:
                w = self._expert_float(p, e, "down")
            yield round_to_dtype(w, self.spec.float_dtype)[0]

    def layer(self, i: int, prefix: str, *, mtp: bool = False) -> None:
        s, fam = self.spec, self.fam
        K, N = s.hidden, s.moe_intermediate
        p = f"{prefix}.{i}" if not prefix.endswith(".") else f"{prefix}{i}"
        self.add_float(f"{p}.input_layernorm.weight", (K,), "norm")
        if s.attention:
            self.attention(p, i, K, float_all=mtp, full=mtp)
        self.add_float(f"{p}.post_attention_layernorm.weight", (K,), "norm")
        if i < s.first_dense and not mtp:
            self.mlp3(f"{p}.mlp", K, 2 * N)
        else:
            self.moe_block(f"{p}.{fam.moe_module}", mtp=mtp)

    def build(self) -> None:
        s, fam = self.spec, self.fam
        K = s.hidden
        self.add_float(fam.embed_name, (s.vocab, K))
        for i in range(s.num_layers):
            self.layer(i, fam.layer_prefix)
        self.add_float(fam.norm_name, (K,), "norm")
        self.linear("lm_head", K, s.vocab, force_float=True)
        if s.mtp:
            if fam.mtp_style == "mtp":
                self.linear("mtp.fc", 2 * K, K, force_float=True)
                self.add_float("mtp.pre_fc_norm_embedding.weight", (K,), "norm")
                self.add_float("mtp.pre_fc_norm_hidden.weight", (K,), "norm")
                self.layer(0, "mtp.layers", mtp=True)
                self.add_float("mtp.norm.weight", (K,), "norm")
            elif fam.mtp_style == "layer":
                L = s.num_layers
                p = f"{fam.layer_prefix}.{L}"
                self.add_float(f"{p}.embed_tokens.weight", (s.vocab, K))
                self.add_float(f"{p}.enorm.weight", (K,), "norm")
                self.add_float(f"{p}.hnorm.weight", (K,), "norm")
                self.linear(f"{p}.eh_proj", 2 * K, K, force_float=True)
                self.layer(L, fam.layer_prefix, mtp=True)
                self.add_float(f"{p}.shared_head.norm.weight", (K,), "norm")
                self.linear(f"{p}.shared_head.head", K, s.vocab, force_float=True)
            else:
                raise ValueError(f"family {s.family} has no MTP layers")
        if s.vision:
            self.vision()

    def vision(self) -> None:
        vh, vi, depth = 64, 128, 2
        v = "model.visual"
        self.add_float(f"{v}.patch_embed.proj.weight", (vh, 3, 2, 16, 16))
        for b in range(depth):
            p = f"{v}.blocks.{b}"
            self.add_float(f"{p}.norm1.weight", (vh,), "norm")
            self.add_float(f"{p}.norm2.weight", (vh,), "norm")
            self.linear(f"{p}.attn.qkv", vh, 3 * vh, force_float=True, bias=True)
            self.linear(f"{p}.attn.proj", vh, vh, force_float=True, bias=True)
            self.linear(f"{p}.mlp.gate_proj", vh, vi, force_float=True, bias=True)
            self.linear(f"{p}.mlp.up_proj", vh, vi, force_float=True, bias=True)
            self.linear(f"{p}.mlp.down_proj", vi, vh, force_float=True, bias=True)
        self.add_float(f"{v}.merger.ln_q.weight", (vh,), "norm")
        self.linear(f"{v}.merger.mlp.0", 4 * vh, 4 * vh, force_float=True, bias=True)
        self.linear(f"{v}.merger.mlp.2", 4 * vh, self.spec.hidden, force_float=True, bias=True)

    # ----- ground truth
    def ground_truth(self) -> tuple[list[SynthLayer], dict[str, str], set[str], str | None]:
        s = self.spec
        layers, kinds, converted = [], {}, set()
        refusal = None
        for block in self.moe:
            p = block["prefix"]
            names = [n for n in self.names if n.startswith(p + ".experts.")]
            names.sort(key=_natural_key)
            if block["fused"]:
                lay = SynthLayer(p, "float", bits=16, num_experts=s.num_experts, fused=True, expert_names=names)
                if not s.fast:
                    for role in ROLES:
                        lay.float_weights[role] = np.stack(
                            [self._expert_float(p, e, role) for e in range(s.num_experts)])
                layers.append(lay)
                kinds[p] = "float"
                continue
            experts: list[dict[str, _Linear]] = block["experts"]
            all_lins = [lin for ex in experts for lin in ex.values()]
            kinds_set = {lin.kind for lin in all_lins}
            bits_set = {lin.bits for lin in all_lins if lin.kind == "gptq"}
            if kinds_set == {"float"}:
                kind = "float" if block["mtp"] else "excluded"
            elif kinds_set == {"gptq"} and len(bits_set) == 1:
                kind = "gptq" if bits_set == {4} else "int8" if bits_set == {8} else "mixed"
            else:
                kind = "mixed"
            bits = (bits_set.pop() if len(bits_set) == 1 else 0) if kind not in ("float", "excluded") else 16
            lay = SynthLayer(p, kind, num_experts=len(experts), expert_names=names, bits=bits)
            for role in ROLES:
                groups = {ex[role].group for ex in experts if ex[role].kind == "gptq"}
                if len(groups) == 1:
                    lay.group_size[role] = groups.pop()
                if s.fast:
                    continue
                if kind in ("float", "excluded"):
                    lay.float_weights[role] = np.stack([self.float_values(f"{ex[role].name}.weight",
                                                                          (ex[role].out_f, ex[role].in_f))
                                                        for ex in experts])
                elif kind in ("gptq", "int8") and role in lay.group_size:
                    lay.codes[role] = np.stack([self.codes(ex[role]) for ex in experts])
                    lay.scales[role] = np.stack([self.scales(ex[role])[1] for ex in experts])
                    lay.g_idx[role] = np.stack([self.g_idx(ex[role]) for ex in experts])
                    lay.zeros[role] = np.stack([self.zeros(ex[role]) for ex in experts])
            layers.append(lay)
            if kind == "gptq" and not (s.act_order or s.asymmetric):
                kinds[p] = "gptq"
                converted.update(names)
            elif kind in ("float", "excluded"):
                kinds[p] = "float"
            else:
                kinds[p] = "unsupported"
                why = {"int8": "8-bit experts", "mixed": "experts of one layer quantized differently"}.get(kind)
                if kind == "gptq":
                    why = "act-order g_idx" if s.act_order else "asymmetric zero points"
                refusal = refusal or f"{p}: {why}"
        return layers, kinds, converted, refusal


def _natural_key(name: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


def _heads(K: int) -> tuple[int, int, int]:
    hd = 64
    H = max(1, K // hd)
    return H, max(1, H // 2), hd


def _full_attention_interval(num_layers: int) -> int:
    return max(1, min(4, num_layers))


def _is_full_attention(layer: int, num_layers: int) -> bool:
    return (layer + 1) % _full_attention_interval(num_layers) == 0


def _compile_dynamic(dynamic: dict | None) -> list[tuple[str, re.Pattern, dict]]:
    out = []
    for key, overrides in (dynamic or {}).items():
        if key.startswith("-:"):
            out.append(("-", re.compile(key[2:]), overrides or {}))
        elif key.startswith("+:"):
            out.append(("+", re.compile(key[2:]), overrides or {}))
        else:
            out.append(("+", re.compile(key), overrides or {}))
    return out


# ------------------------------------------------------------------------------------ configs


def _n_group(E: int) -> tuple[int, int]:
    for n in (8, 4, 2):
        if E % n == 0 and E // n >= 2:
            return n, max(1, n // 2)
    return 1, 1


def _text_config(spec: SynthSpec, fam: FamilyInfo) -> dict:
    K, N, E = spec.hidden, spec.moe_intermediate, spec.num_experts
    H, kvh, hd = _heads(K)
    shared = fam.shared_default if spec.shared_experts is None else spec.shared_experts
    cfg: dict = {
        "model_type": fam.text_model_type or fam.model_type,
        "hidden_size": K, "num_hidden_layers": spec.num_layers, "vocab_size": spec.vocab,
        "num_attention_heads": H, "num_key_value_heads": kvh, "head_dim": hd,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": spec.float_dtype,
    }
    cfg.update(fam.extra)
    keys = fam.expert_keys
    cfg[keys["num_experts"]] = E
    cfg[keys["top_k"]] = spec.top_k
    cfg[keys["intermediate"]] = N
    if fam.model_type == "mixtral":
        pass
    elif fam.dense_style == "first_k_dense_replace":
        cfg["intermediate_size"] = 2 * N
        cfg["first_k_dense_replace"] = spec.first_dense
        cfg["n_shared_experts"] = 1 if shared else None
        if fam.model_type == "glm4_moe":
            cfg["n_group"], cfg["topk_group"] = 1, 1
        else:
            cfg["n_group"], cfg["topk_group"] = _n_group(E)
        if fam.attention.startswith("deepseek"):
            cfg.update(kv_lora_rank=MLA_KV_RANK, q_lora_rank=(K // 2 if fam.attention == "deepseek_v3" else None),
                       qk_nope_head_dim=MLA_NOPE, qk_rope_head_dim=MLA_ROPE, v_head_dim=MLA_V)
            cfg.pop("head_dim")
        if fam.mtp_style == "layer":
            cfg["num_nextn_predict_layers"] = 1 if spec.mtp else 0
    else:  # qwen
        cfg["intermediate_size"] = 2 * N
        cfg["mlp_only_layers"] = list(range(spec.first_dense))
        cfg["decoder_sparse_step"] = 1
        if shared:
            cfg["shared_expert_intermediate_size"] = N
        elif fam.model_type == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = 0
        if fam.hybrid:
            interval = _full_attention_interval(spec.num_layers)
            cfg["full_attention_interval"] = interval
            cfg["layer_types"] = ["full_attention" if _is_full_attention(i, spec.num_layers) else "linear_attention"
                                  for i in range(spec.num_layers)]
            nv = max(1, K // 128)
            cfg.update(linear_num_key_heads=nv, linear_num_value_heads=nv,
                       linear_key_head_dim=hd, linear_value_head_dim=hd)
            cfg["mtp_num_hidden_layers"] = 1 if spec.mtp else 0
    return cfg


def _model_config(spec: SynthSpec, fam: FamilyInfo) -> dict:
    text = _text_config(spec, fam)
    if not fam.nested:
        cfg = dict(text)
        cfg["architectures"] = list(fam.architectures)
        cfg["transformers_version"] = "4.57.0"
        return cfg
    cfg = {
        "architectures": list(fam.architectures), "model_type": fam.model_type,
        "text_config": text, "tie_word_embeddings": False, "torch_dtype": spec.float_dtype,
        "image_token_id": spec.vocab - 3, "video_token_id": spec.vocab - 2,
        "vision_start_token_id": spec.vocab - 4, "vision_end_token_id": spec.vocab - 5,
        "transformers_version": "5.2.0",
    }
    if spec.vision:
        cfg["vision_config"] = {"model_type": "qwen3_5_moe", "depth": 2, "hidden_size": 64,
                                "intermediate_size": 128, "num_heads": 2, "patch_size": 16,
                                "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                                "out_hidden_size": spec.hidden}
    return cfg


def _gptq_quant_config(spec: SynthSpec) -> dict:
    q = {
        "bits": 4, "group_size": spec.group_size, "desc_act": spec.act_order, "sym": not spec.asymmetric,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "lm_head": False,
        "quant_method": "gptq",
        "meta": {"quantizer": ["gptq2xpu-synth:0"], "damp_auto_increment": 0.0025},
    }
    if spec.write_checkpoint_format:
        q["checkpoint_format"] = spec.checkpoint_format
    if spec.dynamic is not None:
        q["dynamic"] = spec.dynamic
    return q


def _ct_weights(bits: int, group: int, spec: SynthSpec) -> dict:
    return {
        "num_bits": bits, "type": "int", "symmetric": not spec.asymmetric,
        "strategy": "channel" if group == -1 else "group",
        "group_size": None if group == -1 else group,
        "block_structure": None, "dynamic": False,
        "actorder": "group" if spec.act_order else None,
        "observer": "minmax", "observer_kwargs": {},
    }


def _ct_quant_config(spec: SynthSpec, b: _Builder) -> dict:
    """Mimics what llm-compressor saves (compressed-tensors QuantizationConfig, format pack-quantized):
    group_0 targets "Linear" with the base scheme; modules with other bits/group (dynamic overrides)
    get further groups targeting their concrete names; "ignore" lists every float Linear by name."""
    base = (4, spec.group_size)
    groups: dict = {}

    def scheme(bits, group, targets):
        return {"targets": targets, "weights": _ct_weights(bits, group, spec),
                "input_activations": None, "output_activations": None, "format": "pack-quantized"}

    groups["group_0"] = scheme(*base, ["Linear"])
    for i, (setting, modules) in enumerate(sorted((k, v) for k, v in b.ct_settings.items() if k != base), 1):
        groups[f"group_{i}"] = scheme(*setting, sorted(modules, key=_natural_key))
    return {
        "config_groups": groups, "format": "pack-quantized", "global_compression_ratio": None,
        "ignore": sorted(set(b.float_linear_modules), key=_natural_key), "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.12.2",
    }


# ----------------------------------------------------------------------------------- writing


def _as_chunks(value) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    else:
        yield from value


def _write_file(path: Path, tensors: list[_Tensor], metadata: dict) -> None:
    layout = ShardLayout([PlannedTensor(t.name, t.dtype, t.shape) for t in tensors], metadata)
    with open(path, "wb") as fh:
        fh.write(layout.header)
        for t in tensors:
            written = 0
            for chunk in _as_chunks(t.make()):
                mv = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                fh.write(mv)
                written += len(mv)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: generated {written} bytes, planned {t.nbytes}")
        if fh.tell() != layout.file_size:
            raise AssertionError(f"{path}: wrote {fh.tell()} bytes, planned {layout.file_size}")


def _safetensors_sort(tensors: list[_Tensor]) -> list[_Tensor]:
    """The order the reference safetensors writer uses: dtype descending, then name."""
    return sorted(tensors, key=lambda t: (-_SAFE_ORDER.index(t.dtype), t.name))


def _dump_json(path: Path, obj, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _side_files(root: Path, spec: SynthSpec) -> None:
    fam = FAMILIES[spec.family]
    _dump_json(root / "generation_config.json",
               {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.7,
                "top_p": 0.8, "top_k": 20, "transformers_version": "4.57.0"})
    specials = ["<unk>", "<eos>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), max(spec.vocab, 8)):
        vocab[f"tok{i}"] = i
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(specials)],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    _dump_json(root / "tokenizer.json", tokenizer, sort_keys=False)
    _dump_json(root / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "<eos>",
        "pad_token": "<pad>", "model_max_length": 4096,
        "chat_template": ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<eos>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    })
    (root / "README.md").write_text(
        f"---\nlicense: apache-2.0\nlibrary_name: transformers\ntags: [gptq, moe, synthetic]\n---\n\n"
        f"# Synthetic {fam.model_type} checkpoint\n\nRandom weights written by `gptq2xpu.testing.synth` "
        f"(seed {spec.seed}). Not a model: a test fixture. Ünïcödé is fine here.\n", encoding="utf-8")
    (root / "LICENSE").write_text(
        "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n\n"
        "(Synthetic test fixture; the full license text is not reproduced.)\n", encoding="utf-8")
    if spec.vision:
        _dump_json(root / "preprocessor_config.json",
                   {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16,
                    "temporal_patch_size": 2, "merge_size": 2})


def _validate(spec: SynthSpec) -> FamilyInfo:
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown family {spec.family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILIES[spec.family]
    K, N, g = spec.hidden, spec.moe_intermediate, spec.group_size
    if K <= 0 or K % 16 or N <= 0 or N % 8:
        raise ValueError("hidden must be a positive multiple of 16 and moe_intermediate of 8")
    if g != -1 and (g <= 0 or K % g or N % g):
        raise ValueError(f"group_size {g} must divide hidden {K} and moe_intermediate {N} (or be -1)")
    if spec.checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format {spec.checkpoint_format!r}")
    for name in ("scale_dtype", "float_dtype"):
        if getattr(spec, name) not in SAFETENSORS_DTYPE:
            raise ValueError(f"{name} {getattr(spec, name)!r}")
    if spec.quant_format not in ("gptq", "compressed-tensors"):
        raise ValueError(f"quant_format {spec.quant_format!r}")
    if spec.config_location not in ("config", "text_config", "quantization_config_json", "quantize_config_json"):
        raise ValueError(f"config_location {spec.config_location!r}")
    if not 0 <= spec.first_dense <= spec.num_layers:
        raise ValueError("first_dense must be in 0..num_layers")
    if spec.first_dense and fam.dense_style is None:
        raise ValueError(f"family {spec.family} has no dense layers")
    if spec.mtp and fam.mtp_style is None:
        raise ValueError(f"family {spec.family} has no MTP layers")
    if spec.fused_float_mtp and not spec.mtp:
        raise ValueError("fused_float_mtp needs mtp=True")
    if spec.old_autogptq and (spec.quant_format != "gptq" or spec.shard_size or spec.dynamic is not None):
        raise ValueError("old_autogptq: gptq only, one file, no dynamic")
    if spec.quantized_router and spec.num_experts % 8:
        raise ValueError("quantized_router needs num_experts % 8 == 0")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ValueError("top_k must be in 1..num_experts")
    return fam


def make_checkpoint(path, spec: SynthSpec | None = None, **overrides) -> SynthInfo:
    """Write a synthetic checkpoint into directory ``path`` (created; must be empty) and return its
    ground truth."""
    spec = replace(spec or SynthSpec(), **overrides)
    fam = _validate(spec)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty")

    b = _Builder(spec)
    b.build()
    layers, kinds, converted, refusal = b.ground_truth()
    order_rng = b.rng("layout", "shuffle")

    # ----- which tensor goes in which file, in which order
    tensors = list(b.tensors)
    if spec.shuffle_index:
        tensors = [tensors[i] for i in order_rng.permutation(len(tensors))]
    shards: list[list[_Tensor]] = []
    if spec.shard_size is None:
        shards = [tensors]
    else:
        if spec.shard_size <= 0:
            raise ValueError("shard_size must be positive")
        cur, size = [], 0
        for t in tensors:
            if cur and size + t.nbytes > spec.shard_size:
                shards.append(cur)
                cur, size = [], 0
            cur.append(t)
            size += t.nbytes
        if cur:
            shards.append(cur)
    if not spec.shuffle_index:
        shards = [_safetensors_sort(s) for s in shards]

    if spec.old_autogptq:
        g = spec.group_size
        base = f"gptq_model-4bit-{g}g"
        files = [f"{base}.safetensors"]
    elif spec.shard_size is None:
        files = ["model.safetensors"]
    else:
        n = len(shards)
        files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    metadata = dict(spec.metadata) if spec.metadata is not None else {"format": "pt"}
    weight_map: dict[str, str] = {}
    for fname, shard in zip(files, shards):
        _write_file(root / fname, shard, metadata)
        for t in shard:
            weight_map[t.name] = fname
    total = sum(t.nbytes for t in b.tensors)
    if spec.shard_size is not None and not spec.old_autogptq:
        keys = sorted(weight_map)
        if spec.shuffle_index:
            keys = [keys[i] for i in order_rng.permutation(len(keys))]
        _dump_json(root / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": {k: weight_map[k] for k in keys}},
                   sort_keys=False)

    # ----- configs
    config = _model_config(spec, fam)
    qcfg = _ct_quant_config(spec, b) if b.ct else _gptq_quant_config(spec)
    where = None
    if spec.old_autogptq:
        qcfg = {"bits": 4, "group_size": spec.group_size, "damp_percent": 0.01, "desc_act": spec.act_order,
                "static_groups": False, "sym": not spec.asymmetric, "true_sequential": True,
                "model_name_or_path": None, "model_file_base_name": base}
        if spec.checkpoint_format != "gptq":
            qcfg["checkpoint_format"] = spec.checkpoint_format
        _dump_json(root / "quantize_config.json", qcfg)
        where = "quantize_config.json"
    elif spec.config_location == "config":
        config["quantization_config"] = qcfg
        where = "config.json:quantization_config"
    elif spec.config_location == "text_config":
        config.setdefault("text_config", {})["quantization_config"] = qcfg
        where = "config.json:text_config.quantization_config"
    elif spec.config_location == "quantization_config_json":
        _dump_json(root / "quantization_config.json", qcfg)
        where = "quantization_config.json"
    else:
        _dump_json(root / "quantize_config.json", qcfg)
        where = "quantize_config.json"
    _dump_json(root / "config.json", config)
    _side_files(root, spec)

    all_names = [t.name for t in b.tensors]
    return SynthInfo(
        path=root, spec=spec, moe_layers=layers,
        router_names=list(b.routers),
        passthrough_names=[n for n in all_names if n not in converted],
        expected_kinds=kinds, config=config, quant_config=qcfg, quant_config_file=where,
        files=files, weight_map=weight_map,
        tensors={t.name: (t.dtype, t.shape) for t in b.tensors},
        expect_refusal=refusal, total_size=total,
    )
