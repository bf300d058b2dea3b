"""``--format compressed-tensors``: every 4-bit linear as compressed-tensors ``pack-quantized``.

What llm-compressor writes for W4A16 and stock vLLM serves on every platform (its
``CompressedTensorsWNA16`` linear and MoE methods), so no plugin is needed.  Per quantized linear
``<module>`` (output N, input K, group g)::

    <module>.weight_packed  int32 [N, K/8]   input 8c+j in bits 4j..4j+3 of word [n, c], code q = w/scale + 8
    <module>.weight_scale   F16/BF16 [N, K/g]
    <module>.weight_shape   int64 [2] = [N, K]

Worked example (the same one as :mod:`gptq2xpu.formats.gptq`): a GPTQ linear with K=8, N=1 whose
codes for inputs 0..7 are [1, 2, 3, 4, 5, 6, 7, 15] stores ``qweight = [[0xF7654321]]`` (``[K/8,
N]``); compressed-tensors packs the same codes of output row 0 LSB first into
``weight_packed = [[0xF7654321]]`` (``[N, K/8]``).  So ``weight_packed = qweight.T``, word for
word: GPTQ packs along K too, and the offset is the same 8 (a symmetric GPTQ zero point).  Viewed
as little-endian bytes (``F7654321`` -> ``21 43 65 F7``) every row is the XPU row layout ``[N,
K/2]``: an expert's gate/up ``weight_packed`` are exactly its rows of the ``xpu`` format's
``w13_qweight``, its down ``weight_packed`` its ``w2_qweight``.  ``tests/test_ct_output.py`` checks
this against the compressed-tensors package's own ``pack_to_int32`` / ``unpack_from_int32``.

Which linears, which groups:

* every quantized linear of the source (routed experts, attention, dense MLPs, shared experts, a
  quantized router unless ``--dequantize-router`` writes it as a float weight): a checkpoint has
  one quantization method.  Its data is checked as for the
  ``xpu`` format (:mod:`gptq2xpu.audit`: zero point 8, natural ``g_idx``, finite scales);
* group sizes: the largest of 256/128/64/32 that divides the source group and the input; for a
  linear vLLM splits along its input (row-parallel: ``o_proj``, ``down_proj``, ``w2``...) the
  input of one tensor-parallel rank (``--tp-size``).  A MoE layer's three projections share one
  group (vLLM's MoE method takes one scheme per layer).  Never zero-padded: a padded
  ``weight_shape`` would disagree with the model's config;
* float linears (routers, ``lm_head``, float or excluded experts, float MTP layers) go into
  ``ignore``; one ``config_groups`` entry per group size: the commonest targets ``Linear``, the
  others name their modules (``re:`` patterns for a layer's experts).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from ..contract import FLOAT_DTYPE_NAMES, KERNEL_GROUPS
from ..errors import InputError
from ..formats import format_for_fields
from ..naming import ROLES, natural_key
from ..plan.model import LinearPlan, OutputItem, expert_linear
from ..repack import largest_group
from ..safetensors_io import PlannedTensor
from .base import OutputFormat

#: The compressed-tensors release whose config schema this output follows (the one vLLM 0.34 pins).
CT_VERSION = "0.17.0"
#: Tensor fields of a quantized linear in either source format (consumed; ``bias`` stays).
QUANT_FIELDS = frozenset({"qweight", "scales", "qzeros", "g_idx",
                          "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"})
#: Last name component of the linears vLLM splits along their input (RowParallelLinear).
ROW_PARALLEL = frozenset({"o_proj", "down_proj", "w2", "out_proj", "dense", "dense_4h_to_h", "wo", "c_proj"})
#: Projection names of fused float experts (transformers' 3-D ``experts.gate_up_proj``), as vLLM asks.
DEFAULT_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FLOAT = frozenset({"F16", "BF16", "F32", "F64"})
#: 2-D float weights that are not linears (never listed in ``ignore``).
_NOT_LINEAR = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|norm|[a-z_]*layernorm"
                         r"|[a-z_]*_norm)$")


class CompressedTensorsOutput(OutputFormat):
    name = "compressed-tensors"
    serves = "stock vLLM of any current release and platform (no plugin): compressed-tensors W4A16 pack-quantized"

    def items(self, ckpt, layers, options, quant):
        from ..plan.build import float_dtype

        kept = [lyr.prefix for lyr in layers if lyr.kind == "unsupported" and lyr.action == "passthrough"]
        if kept:
            raise InputError(f"{kept[0]}: layers kept unchanged (--keep-unsupported) cannot be written as "
                             "compressed-tensors pack-quantized 4-bit; use --format xpu")
        consumed = set()
        items: list[OutputItem] = []
        written: list[LinearPlan] = []
        routers: list[str] = []  # dequantized (--dequantize-router)
        for layer in layers:
            if layer.action == "refuse":  # convert stops on it before writing; inspect lists it
                consumed.update(layer.source_tensors)
            if not layer.converts:
                continue
            if layer.router_quantized and options.dequantize_router:  # a float router, hence ignored
                consumed.update(layer.routers)
                fields = {n.rsplit(".", 1)[1]: n for n in layer.routers}
                n_out = ckpt.ref(fields["qweight"]).shape[1]
                weight = PlannedTensor(f"{layer.prefix}.gate.weight", float_dtype(ckpt.config), (n_out, layer.hidden))
                items.append(OutputItem(weight, "router", layer.prefix))
                routers.append(f"{layer.prefix}.gate")
            consumed.update(layer.source_tensors)
            written += [expert_linear(layer, e, role) for e in range(layer.experts) for role in ROLES]
        linears = _other_linears(ckpt, consumed, quant, options)
        for lin in linears.values():
            consumed.update(lin.fields.values())
        written += linears.values()
        for lin in written:
            items += [OutputItem(t, what, lin.module) for what, t in linear_tensors(lin).items()]
        passthrough = [n for n in ckpt.tensors if n not in consumed]
        for n in passthrough:
            ref = ckpt.tensors[n]
            items.append(OutputItem(PlannedTensor(n, ref.dtype, ref.shape), "copy", n))
        items.sort(key=lambda it: natural_key(it.tensor.name))
        ignore = {n.rsplit(".", 1)[0] for n in passthrough if _float_linear_weight(ckpt, n)} | set(routers)
        for layer in layers:  # float MoE layers, also fused 3-D ones: vLLM asks for <prefix>.experts.<e>.<proj>
            if layer.action == "passthrough" and layer.kind in ("float", "excluded"):
                projs = [layer.proj_names.get(r, DEFAULT_PROJ[r]) for r in ROLES]
                ignore.update(f"{layer.prefix}.experts.{e}.{p}" for e in range(layer.experts) for p in projs)
        ignore = sorted(ignore, key=natural_key)
        return items, passthrough, linears, ignore

    def quantization_config(self, plan) -> dict:
        return quantization_config(plan)


def linear_tensors(lin: LinearPlan) -> dict[str, PlannedTensor]:
    """The three tensors of one linear, by field."""
    n, k = lin.out_features, lin.in_features
    return {"weight_packed": PlannedTensor(f"{lin.module}.weight_packed", "I32", (n, k // 8)),
            "weight_scale": PlannedTensor(f"{lin.module}.weight_scale", lin.scale_dtype, (n, k // lin.group)),
            "weight_shape": PlannedTensor(f"{lin.module}.weight_shape", "I64", (2,))}


def _float_linear_weight(ckpt, name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    ref = ckpt.tensors[name]
    return ref.dtype in _FLOAT and len(ref.shape) == 2 and not _NOT_LINEAR.search(name[: -len(".weight")])


def _other_linears(ckpt, consumed: set[str], quant, options) -> dict[str, LinearPlan]:
    """Every quantized linear outside the converted MoE layers, planned (InputError: not writable)."""
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for name in ckpt.tensors:
        if name in consumed:
            continue
        module, _, field = name.rpartition(".")
        if field in QUANT_FIELDS:
            by_module[module][field] = name
    out = {}
    for module in sorted(by_module, key=natural_key):
        fields = by_module[module]
        fmt = format_for_fields(fields)
        if fmt is None:
            raise InputError(f"{module}: quantized tensors {sorted(fields)} without packed weights and scales")
        out[module] = _plan_linear(ckpt, module, fields, fmt, quant, options)
    return out


def _plan_linear(ckpt, module, fields, fmt, quant, options) -> LinearPlan:
    bits = quant.module(module).bits
    k_hint, n = fmt.in_out(ckpt, fields)
    packed = ckpt.ref(fields[fmt.packed]).shape
    cols = packed[0] if fmt.input_major else packed[-1]
    k = k_hint if k_hint is not None else cols * 32 // max(bits, 1)
    spec = fmt.describe(ckpt, fields, k, module)
    if spec.bits != 4:
        raise InputError(f"{module}: {spec.bits}-bit weights; --format compressed-tensors writes 4-bit linears "
                         "only (use --format xpu, which keeps other layers unchanged)")
    row_parallel = module.rsplit(".", 1)[-1] in ROW_PARALLEL
    tp = options.tp_size
    share = k // tp if row_parallel and k % tp == 0 else (k if not row_parallel else None)
    group = largest_group([spec.group_size], divides=[k, share]) if share else None
    if group is None:
        per = f" ({k} inputs split over {tp} ranks)" if row_parallel and tp > 1 else ""
        raise InputError(f"{module}: no group size of {'/'.join(map(str, sorted(KERNEL_GROUPS)))} divides its "
                         f"source group {spec.group_size} and input {k}{per}; compressed-tensors output is never "
                         "zero-padded (--format xpu pads experts)")
    if spec.scale_dtype == "F32" and options.scale_dtype == "keep":
        raise InputError(f"{fields[fmt.scales]}: scales are float32; pass --scale-dtype float16 or bfloat16")
    dst = spec.scale_dtype if options.scale_dtype == "keep" else FLOAT_DTYPE_NAMES[options.scale_dtype]
    used = {f: name for f, name in fields.items() if f in QUANT_FIELDS}
    return LinearPlan(module, fmt.name, used, spec, group, dst, row_parallel)


# ------------------------------------------------------------------------------ quantization_config


def _weights(group: int) -> dict:
    """A 4-bit symmetric group scheme, every field as llm-compressor writes it."""
    return {"num_bits": 4, "type": "int", "symmetric": True, "group_size": group, "strategy": "group",
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def group_targets(plan) -> dict[int, list[str]]:
    """Output group size -> targets: a converted MoE layer's experts as one ``re:`` pattern, other
    linears by name."""
    out: dict[int, list[str]] = defaultdict(list)
    counts: Counter = Counter()
    for layer in plan.converted:
        projs = "|".join(re.escape(layer.proj_names[r]) for r in ("gate", "up", "down"))
        out[layer.geometry.g13].append(f"re:^{re.escape(layer.prefix)}\\.experts\\.\\d+\\.(?:{projs})$")
        counts[layer.geometry.g13] += 3 * layer.experts
    for lin in plan.linears.values():
        out[lin.group].append(lin.module)
        counts[lin.group] += 1
    return {g: out[g] for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0]))}


def quantization_config(plan) -> dict:
    """``quantization_config`` as llm-compressor writes it for W4A16 pack-quantized."""
    groups = {}
    for i, (g, targets) in enumerate(group_targets(plan).items()):
        # "Linear" matches vLLM's linear classes by name, not its ParallelLMHead: a quantized lm_head is named
        default = ["Linear"] + [t for t in targets if t.rsplit(".", 1)[-1] == "lm_head"]
        groups[f"group_{i}"] = {"targets": default if i == 0 else targets, "weights": _weights(g),
                                "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {
        "config_groups": groups,
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": list(plan.ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
