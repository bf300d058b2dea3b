"""The whole conversion, decided from safetensors headers and configs alone, before a byte is written.

:func:`build_plan` returns a :class:`Plan`: per MoE layer what happens to it (convert, pass through,
refuse) and why, the shapes and group sizes, and every output shard with its exact byte layout.
``inspect`` prints it; ``convert`` executes it.  :func:`audit` then reads the small metadata tensors
(qzeros, g_idx, scales) to check what only the data can tell (symmetry, row order, finite scales).
"""

from __future__ import annotations

import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from . import FORMAT_VERSION, __version__
from .errors import InputError, UsageError
from .formats import FORMATS, ProjSpec, format_for_fields
from .naming import (
    PROJECTION_ROLES,
    ROLES,
    ExpertGroup,
    detect_family,
    natural_key,
    nested_text_config,
    routing_params,
    classify,
)
from .repack import DTYPE_NAMES, SUPPORTED_GROUPS, LayerGeometry, largest_group, to_float32
from .safetensors_io import DTYPE_SIZES, PlannedTensor, ShardLayout
from .read import Checkpoint, QuantConfig, read_quant_config

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
OUTPUT_FIELDS = ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")
DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' save_pretrained default, "5GB"


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '500MB', '1048576' (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
    unit = (m[2] or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m[1]) * mult)
    if value <= 0:
        raise UsageError(f"--max-shard-size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class ConvertOptions:
    scale_dtype: str = "keep"            # keep | float16 | bfloat16
    nibble_encoding: str = "u4b8"        # u4b8 | s4
    max_shard_size: int = DEFAULT_MAX_SHARD
    keep_unsupported: bool = False
    dequantize_router: bool = False
    tp_size: int = 1
    emit_ranks: bool = False

    def __post_init__(self):
        if self.scale_dtype not in ("keep", "float16", "bfloat16"):
            raise UsageError(f"--scale-dtype {self.scale_dtype!r}: choose keep, float16 or bfloat16")
        if self.nibble_encoding not in ("u4b8", "s4"):
            raise UsageError(f"--nibble-encoding {self.nibble_encoding!r}: choose u4b8 or s4")
        if self.tp_size < 1:
            raise UsageError(f"--tp-size {self.tp_size}: must be at least 1")
        if self.emit_ranks and self.tp_size < 2:
            raise UsageError("--emit-ranks needs --tp-size 2 or more")


@dataclass
class LayerPlan:
    """What happens to one MoE layer (the module holding ``experts``)."""

    prefix: str
    action: str                       # convert | passthrough | refuse
    kind: str                         # gptq | compressed-tensors | float | excluded | unsupported | broken
    reason: str
    experts: int = 0
    hidden: int = 0                   # K
    intermediate: int = 0             # N
    bits: int | None = None
    format: str | None = None
    proj_names: dict[str, str] = field(default_factory=dict)     # role -> source projection name
    source_groups: dict[str, int] = field(default_factory=dict)  # role -> source group size
    source_scale_dtype: str | None = None
    scale_dtype: str | None = None
    geometry: LayerGeometry | None = None
    expert_fields: list[dict[str, dict[str, str]]] = field(default_factory=list, repr=False)
    specs: dict[str, ProjSpec] = field(default_factory=dict, repr=False)
    source_tensors: list[str] = field(default_factory=list, repr=False)
    routers: list[str] = field(default_factory=list)
    router_quantized: bool = False
    shared: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converts(self) -> bool:
        return self.action == "convert"

    def output_name(self, what: str) -> str:
        return f"{self.prefix}.experts.{what}"

    def output_tensors(self) -> list[PlannedTensor]:
        geo = self.geometry
        sd = self.scale_dtype
        return [
            PlannedTensor(self.output_name("w13_qweight"), "U8", geo.w13_shape),
            PlannedTensor(self.output_name("w13_scales"), sd, geo.w13_scales_shape),
            PlannedTensor(self.output_name("w2_qweight"), "U8", geo.w2_shape),
            PlannedTensor(self.output_name("w2_scales"), sd, geo.w2_scales_shape),
        ]

    def fields(self, e: int, role: str) -> dict[str, str]:
        return self.expert_fields[e][role]

    def summary(self) -> dict:
        out = {
            "prefix": self.prefix,
            "action": self.action,
            "kind": self.kind,
            "reason": self.reason,
            "experts": self.experts,
        }
        if self.hidden:
            out.update(hidden_size=self.hidden, intermediate_size=self.intermediate, bits=self.bits)
        if self.source_groups:
            out["source_group_size"] = dict(self.source_groups)
        if self.geometry is not None:
            g = self.geometry
            out.update(w13_group_size=g.g13, w2_group_size=g.g2, padded_intermediate_size=g.padded,
                       source_scale_dtype=self.source_scale_dtype, scale_dtype=self.scale_dtype)
        if self.routers:
            out["routers"] = list(self.routers)
            out["router_quantized"] = self.router_quantized
        if self.shared:
            out["shared_expert_tensors"] = len(self.shared)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class OutputItem:
    """Where one output tensor's bytes come from."""

    tensor: PlannedTensor
    source: str          # "copy" | "w13_qweight" | "w13_scales" | "w2_qweight" | "w2_scales" | "router"
    ref: str             # source tensor name (copy) or layer prefix


@dataclass
class ShardPlan:
    name: str
    items: list[OutputItem]
    layout: ShardLayout


@dataclass
class Plan:
    origin: str
    family: str
    quant: QuantConfig
    options: ConvertOptions
    layers: list[LayerPlan]
    passthrough: list[str]               # source tensors written unchanged
    shards: list[ShardPlan]
    bytes_in: int
    warnings: list[str] = field(default_factory=list)
    routing: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def converted(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.converts]

    @property
    def refused(self) -> list[LayerPlan]:
        return [l for l in self.layers if l.action == "refuse"]

    @property
    def bytes_out(self) -> int:
        return sum(s.layout.file_size for s in self.shards)

    def layer(self, prefix: str) -> LayerPlan:
        for l in self.layers:
            if l.prefix == prefix:
                return l
        raise KeyError(prefix)

    def raise_refusals(self) -> None:
        refused = self.refused
        if refused:
            first = refused[0]
            more = f" (and {len(refused) - 1} more layer(s); `gptq2xpu inspect` lists them)" if len(refused) > 1 else ""
            raise InputError(f"{first.prefix}: {first.reason}{more}")

    def config_block(self) -> dict:
        """The block added to the output config.json, documenting the converted expert format."""
        conv = self.converted
        groups13 = sorted({l.geometry.g13 for l in conv})
        groups2 = sorted({l.geometry.g2 for l in conv})
        scale_dtypes = sorted({l.scale_dtype for l in conv})
        return {
            "format": "xpu-int4-moe",
            "format_version": FORMAT_VERSION,
            "tool": "gptq2xpu",
            "tool_version": __version__,
            "layout": {
                "w13_qweight": "uint8 [E, 2N, K/2]; rows 0..N-1 gate (w1), rows N..2N-1 up (w3)",
                "w13_scales": "[E, 2N, K/group]",
                "w2_qweight": "uint8 [E, K, N/2] (down projection)",
                "w2_scales": "[E, K, N/group]",
                "nibble_order": "byte j of a row: input 2j in the low nibble, input 2j+1 in the high nibble",
                "tensor_names": "<prefix>.experts.{w13_qweight,w13_scales,w2_qweight,w2_scales}",
            },
            "nibble_encoding": self.options.nibble_encoding,
            "nibble_encoding_doc": ("u4b8: code q in 0..15 means (q - 8) * scale" if self.options.nibble_encoding == "u4b8"
                                    else "s4: signed two's-complement nibbles, (q - 8) & 0xF, i.e. u4b8 byte ^ 0x88"),
            "symmetric": True,
            "zero_point": 8,
            "act_order": False,
            "bits": 4,
            "group_size": groups13[0] if len(groups13) == 1 and groups13 == groups2 else None,
            "w13_group_sizes": groups13,
            "w2_group_sizes": groups2,
            "scale_dtype": {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(scale_dtypes[0]) if len(scale_dtypes) == 1 else None,
            "tp_size": self.options.tp_size,
            "tp_ranks": ([f"tp-ranks/rank-{r:03d}-of-{self.options.tp_size:03d}" for r in range(self.options.tp_size)]
                         if self.options.emit_ranks else []),
            "routing": dict(self.routing),
            "layers": {l.prefix: _layer_block(l) for l in conv},
            "passthrough_layers": {l.prefix: {"kind": l.kind, "reason": l.reason} for l in self.layers if l.action == "passthrough" and l.kind != "unsupported"},
            "unconverted_layers": {l.prefix: {"kind": l.kind, "reason": l.reason} for l in self.layers if l.kind == "unsupported"},
            "routers": sorted((r for l in self.layers if not l.router_quantized for r in l.routers), key=natural_key),
            "quantized_routers": sorted((r for l in self.layers if l.router_quantized and not (l.converts and self.options.dequantize_router)
                                         for r in l.routers), key=natural_key),
            "dequantized_routers": [f"{l.prefix}.gate.weight" for l in self.layers
                                    if l.router_quantized and l.converts and self.options.dequantize_router],
            "source": {
                "origin": self.origin,
                "family": self.family,
                "fingerprint": self.fingerprint,
                "quant_method": self.quant.method,
                "checkpoint_format": self.quant.checkpoint_format,
                "found_in": self.quant.found_in,
                "dropped_tensors": "per-expert qzeros and g_idx: symmetric zero point 8 and rows in natural order, checked from the data",
            },
        }

    def to_dict(self) -> dict:
        return {
            "source": self.origin,
            "family": self.family,
            "quantization": self.quant.describe(),
            "options": asdict(self.options),
            "layers": [l.summary() for l in self.layers],
            "moe_layers": len(self.layers),
            "converted_layers": len(self.converted),
            "passthrough_layers": sum(1 for l in self.layers if l.action == "passthrough"),
            "refused_layers": len(self.refused),
            "routers_excluded": sorted({r for l in self.layers for r in l.routers}, key=natural_key),
            "passthrough_tensors": len(self.passthrough),
            "shards": [{"name": s.name, "tensors": len(s.items), "bytes": s.layout.file_size} for s in self.shards],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "warnings": list(self.warnings),
            "refusals": [f"{l.prefix}: {l.reason}" for l in self.refused],
            "tp": tp_report(self) if self.converted else [],
        }


def _layer_block(l: LayerPlan) -> dict:
    g = l.geometry
    return {
        "experts": l.experts,
        "hidden_size": l.hidden,
        "intermediate_size": l.intermediate,
        "padded_intermediate_size": g.padded,
        "w13_group_size": g.g13,
        "w2_group_size": g.g2,
        "source_group_size": dict(l.source_groups),
        "source_format": l.format,
        "source_projections": dict(l.proj_names),
        "scale_dtype": l.scale_dtype,
    }


# --------------------------------------------------------------------------------- planning


def build_plan(ckpt: Checkpoint, options: ConvertOptions | None = None) -> Plan:
    """Decide the conversion from headers alone.  Raises InputError for checkpoint-wide problems;
    per-layer problems become ``refuse`` entries (see :meth:`Plan.raise_refusals`)."""
    options = options or ConvertOptions()
    if sys.byteorder != "little":
        raise InputError("this host is big-endian; the int32 -> uint8 reinterpretation needs a little-endian host")
    quant = read_quant_config(ckpt.root, ckpt.config)
    if quant.method == "gptq" and quant.bits != 4 and not quant.dynamic and not quant.extra:
        raise InputError(f"{quant.found_in}: bits {quant.bits} is not supported; the XPU kernel runs 4-bit weights only")
    tmap = classify(ckpt.tensors)
    if not tmap.moe:
        raise InputError(f"{ckpt.origin}: no MoE layers found (no '<prefix>.experts.<e>.<proj>' tensors); nothing to convert")
    family = detect_family(ckpt.config, ckpt.tensors)
    layers = [
        _plan_layer(ckpt, tmap.moe[p], tmap.routers.get(p, []), tmap.shared.get(p, []), quant, options)
        for p in sorted(tmap.moe, key=natural_key)
    ]
    warnings = []
    for l in layers:
        if not l.routers and l.action != "refuse":
            warnings.append(f"{l.prefix}: no router tensor ({l.prefix}.gate.*) found")
        if l.router_quantized and l.action == "convert":
            note = ("dequantized to a float weight (--dequantize-router)" if options.dequantize_router
                    else "passed through unchanged (--dequantize-router writes it as a float weight)")
            warnings.append(f"{l.prefix}.gate: router is GPTQ-quantized in the source; {note}")
    if not any(l.converts for l in layers) and not any(l.action == "refuse" for l in layers):
        raise InputError(f"{ckpt.origin}: no quantized MoE layers to convert (every MoE layer is float or kept unchanged)")

    converted = {l.prefix: l for l in layers if l.converts}
    consumed = set()
    items: list[OutputItem] = []
    for l in converted.values():
        consumed.update(l.source_tensors)
        for t in l.output_tensors():
            items.append(OutputItem(t, t.name.rsplit(".", 1)[1], l.prefix))
        if l.router_quantized and options.dequantize_router:
            consumed.update(l.routers)
            dtype = _float_dtype(ckpt.config)
            fields = {n.rsplit(".", 1)[1]: n for n in l.routers}
            n_out = ckpt.ref(fields["qweight"]).shape[1]
            items.append(OutputItem(PlannedTensor(f"{l.prefix}.gate.weight", dtype, (n_out, l.hidden)), "router", l.prefix))
    passthrough = [n for n in ckpt.tensors if n not in consumed]
    for n in passthrough:
        ref = ckpt.tensors[n]
        items.append(OutputItem(PlannedTensor(n, ref.dtype, ref.shape), "copy", n))
    items.sort(key=lambda it: natural_key(it.tensor.name))
    plan = Plan(
        origin=ckpt.origin,
        family=family,
        quant=quant,
        options=options,
        layers=layers,
        passthrough=sorted(passthrough, key=natural_key),
        shards=_shard(items, options.max_shard_size),
        bytes_in=ckpt.total_bytes,
        warnings=warnings,
        routing=routing_params(ckpt.config, family, max((l.experts for l in layers), default=1)).to_dict(),
    )
    return plan


def _float_dtype(config: dict) -> str:
    cfg = nested_text_config(config)
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(name, "BF16")


def _shard(items: list[OutputItem], max_size: int) -> list[ShardPlan]:
    groups: list[list[OutputItem]] = [[]]
    size = 0
    for it in items:
        if groups[-1] and size + it.tensor.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.tensor.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        # widest dtype first keeps every tensor naturally aligned in the file
        group.sort(key=lambda it: (-DTYPE_SIZES[it.tensor.dtype], natural_key(it.tensor.name)))
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shards.append(ShardPlan(name, group, ShardLayout([it.tensor for it in group], {"format": "pt"})))
    return shards


def _refuse(prefix, kind, reason, **kw) -> LayerPlan:
    return LayerPlan(prefix=prefix, action="refuse", kind=kind, reason=reason, **kw)


def _plan_layer(ckpt: Checkpoint, group: ExpertGroup, routers, shared, quant: QuantConfig,
                options: ConvertOptions) -> LayerPlan:
    p = group.prefix
    router_q = any(n.endswith(".qweight") for n in routers)
    common = dict(routers=sorted(routers, key=natural_key), router_quantized=router_q,
                  shared=sorted(shared, key=natural_key), source_tensors=list(group.names))
    if group.fused and group.experts:
        return _refuse(p, "broken", "has both fused 3-D expert tensors and per-expert tensors", **common)
    if group.fused:
        bad = [n for n in group.fused.values() if ckpt.tensors[n].dtype not in FLOAT_DTYPES]
        if bad:
            return _refuse(p, "broken", f"fused expert tensor {bad[0]} is not a float tensor", **common)
        e = ckpt.tensors[group.fused.get("gate_up_proj") or next(iter(group.fused.values()))].shape[0]
        return LayerPlan(p, "passthrough", "float", _float_reason(p, quant, f"{p}.experts", "fused float experts"),
                         experts=e, **common)

    indices = sorted(group.experts)
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        return _refuse(p, "broken", f"expert {missing[0]} is missing (found experts {indices[0]}..{indices[-1]}, {len(indices)} in all)", **common)
    n_exp = len(indices)

    proj0 = group.experts[0]
    unknown = sorted(set(proj0) - set(PROJECTION_ROLES))
    if unknown:
        return _refuse(p, "broken", f"unknown expert projection {unknown[0]!r} (known: {', '.join(PROJECTION_ROLES)})", **common)
    role_proj: dict[str, str] = {}
    for proj in proj0:
        role = PROJECTION_ROLES[proj]
        if role in role_proj:
            return _refuse(p, "broken", f"both {role_proj[role]} and {proj} act as the {role} projection", **common)
        role_proj[role] = proj
    for role in ROLES:
        if role not in role_proj:
            return _refuse(p, "broken", f"expert 0 has no {role} projection", **common)

    kinds: dict[str, int] = {}
    expert_fields: list[dict[str, dict[str, str]]] = []
    for e in indices:
        projs = group.experts[e]
        if set(projs) != set(role_proj.values()):
            diff = sorted(set(role_proj.values()) ^ set(projs))
            return _refuse(p, "broken", f"expert {e} projections differ from expert 0 ({', '.join(diff)})", **common)
        fields_e = {}
        for role, proj in role_proj.items():
            fields = {f: n for f, n in projs[proj].items()}
            kind = _proj_kind(ckpt, fields)
            if kind.startswith("missing"):
                return _refuse(p, "broken", f"expert {e} {proj}: {kind}", **common)
            kinds.setdefault(kind, e)
            fields_e[role] = fields
        expert_fields.append(fields_e)
    if len(kinds) > 1:
        desc = ", ".join(f"{k} (expert {e})" for k, e in kinds.items())
        return _refuse(p, "broken", f"mixes expert storage kinds: {desc}; a MoE layer must be all quantized or all float", **common)
    kind = next(iter(kinds))
    if kind == "float":
        return LayerPlan(p, "passthrough", "float", _float_reason(p, quant, f"{p}.experts.0.{role_proj['gate']}", "float experts"),
                         experts=n_exp, proj_names=role_proj, **common)

    fmt = FORMATS[kind]
    if (quant.method == "compressed-tensors") != (kind == "compressed-tensors"):
        return _refuse(p, "broken", f"experts are stored as {kind} but the config says quant_method {quant.method!r}", **common)
    # dimensions: K from down's output, N from gate's output
    k_in_hint, _ = fmt.in_out(ckpt, expert_fields[0]["gate"])
    _, k = fmt.in_out(ckpt, expert_fields[0]["down"])
    _, n = fmt.in_out(ckpt, expert_fields[0]["gate"])
    if k_in_hint is not None and k_in_hint != k:
        return _refuse(p, "broken", f"gate input size {k_in_hint} (g_idx) differs from down output size {k}", **common)
    specs: dict[str, ProjSpec] = {}
    try:
        for role, in_f in (("gate", k), ("up", k), ("down", n)):
            specs[role] = fmt.describe(ckpt, expert_fields[0][role], in_f, f"{p} expert 0 {role_proj[role]}")
    except InputError as exc:
        return _refuse(p, "broken", str(exc), **common)
    if specs["up"].out_features != n:
        return _refuse(p, "broken", f"up projection has {specs['up'].out_features} outputs but gate has {n}", **common)
    # every expert must match expert 0 exactly (header-only)
    for e in indices[1:]:
        for role in ROLES:
            for f, name in expert_fields[e][role].items():
                ref0 = ckpt.tensors.get(expert_fields[0][role].get(f, ""))
                ref = ckpt.tensors[name]
                if ref0 is None or (ref.dtype, ref.shape) != (ref0.dtype, ref0.shape):
                    want = f"{ref0.dtype}{list(ref0.shape)}" if ref0 else "absent"
                    return _refuse(p, "broken", f"experts have different shapes: {name} is {ref.dtype}{list(ref.shape)}, expert 0 has {want}", **common)
    bits = {s.bits for s in specs.values()}
    if len(bits) > 1:
        return _refuse(p, "broken", f"projections have different bit widths {sorted(bits)}", **common)
    bits_v = bits.pop()
    src_groups = {r: s.group_size for r, s in specs.items()}
    info = dict(experts=n_exp, hidden=k, intermediate=n, bits=bits_v, format=kind, proj_names=role_proj,
                source_groups=src_groups, expert_fields=expert_fields, specs=specs, **common)

    # the config's rules must agree with the tensors
    for role in ROLES:
        for e in (indices if quant.dynamic or quant.extra or quant.ignore else [0]):
            module = f"{p}.experts.{e}.{role_proj[role]}"
            mq = quant.module(module)
            if not mq.quantized:
                return _refuse(p, "broken", f"{module} is quantized in the tensors but the config excludes it ({mq.rule})", **info)
            if mq.bits != bits_v:
                return _refuse(p, "broken", f"{module} holds {bits_v}-bit weights but the config says {mq.bits} bits ({mq.rule or quant.found_in})", **info)
            spec = specs[role]
            cfg_g = mq.group_size
            agrees = cfg_g == spec.group_size or (spec.groups == 1 and (cfg_g <= 0 or cfg_g >= spec.in_features))
            if not agrees:
                return _refuse(p, "broken", f"{module}: scales imply group size {spec.group_size} but the config says {cfg_g} ({mq.rule or quant.found_in})", **info)
    if bits_v != 4:
        reason = f"{bits_v}-bit experts; the XPU kernel runs int4 only"
        if options.keep_unsupported:
            return LayerPlan(p, "passthrough", "unsupported", reason + "; kept unchanged (--keep-unsupported)", **info)
        return _refuse(p, "unsupported", reason + " (pass --keep-unsupported to keep this layer unchanged)", **info)

    # scale dtype
    src_dtypes = {s.scale_dtype for s in specs.values()}
    if len(src_dtypes) > 1:
        if options.scale_dtype == "keep":
            return _refuse(p, "broken", f"projections store scales as {sorted(src_dtypes)}; pass --scale-dtype float16 or bfloat16", **info)
    src_dtype = specs["gate"].scale_dtype if len(src_dtypes) == 1 else "F32"
    dst_dtype = src_dtype if options.scale_dtype == "keep" else DTYPE_NAMES[options.scale_dtype]
    if dst_dtype == "F32":
        return _refuse(p, "broken", "scales are float32; the kernel reads scales in the activation dtype: pass --scale-dtype float16 or bfloat16", **info)

    # group sizes the kernel runs, regrouped losslessly, tensor-parallel aware
    notes = []
    g13 = largest_group([src_groups["gate"], src_groups["up"]], divides=[k])
    if g13 is None:
        return _refuse(p, "unsupported", f"group size {src_groups['gate']} along K={k} cannot be expressed as groups of {'/'.join(map(str, sorted(SUPPORTED_GROUPS)))} (the only sizes the kernel runs)", **info)
    tp = options.tp_size
    padded, g2 = choose_w2_groups(n, src_groups["down"], tp)
    if g2 is None:
        return _refuse(p, "unsupported", f"group size {src_groups['down']} along N={n} cannot be expressed as groups of {'/'.join(map(str, sorted(SUPPORTED_GROUPS)))}" + (f" split over {tp} ranks" if tp > 1 else ""), **info)
    if padded != n:
        notes.append(f"N padded {n} -> {padded} with zero rows so each of {tp} ranks holds whole groups of {g2}")
    for role, g_out in (("gate", g13), ("up", g13), ("down", g2)):
        if src_groups[role] != g_out:
            label = "per-channel" if specs[role].groups == 1 else f"group {src_groups[role]}"
            notes.append(f"{role}: {label} re-expressed as groups of {g_out} (scales repeated, lossless)")
    if src_dtype != dst_dtype:
        notes.append(f"scales cast {src_dtype} -> {dst_dtype}")
    geo = LayerGeometry(n_exp, k, n, padded, g13, g2)
    return LayerPlan(p, "convert", kind, "quantized experts", source_scale_dtype=src_dtype, scale_dtype=dst_dtype,
                     geometry=geo, notes=notes, **info)


def _proj_kind(ckpt: Checkpoint, fields: dict[str, str]) -> str:
    fmt = format_for_fields(fields)
    if fmt is not None:
        return fmt.name
    if "weight" in fields and set(fields) <= {"weight", "bias"}:
        if ckpt.tensors[fields["weight"]].dtype in FLOAT_DTYPES:
            return "float"
        return f"missing: weight tensor is {ckpt.tensors[fields['weight']].dtype}, not float"
    if "qweight" in fields and "scales" not in fields:
        return "missing scales tensor (qweight without scales)"
    if "weight_packed" in fields and "weight_scale" not in fields:
        return "missing weight_scale tensor"
    return f"missing: unrecognised tensor fields {sorted(fields)}"


def _float_reason(prefix: str, quant: QuantConfig, module: str, what: str) -> str:
    mq = quant.module(module)
    if not mq.quantized and mq.rule:
        return f"{what}, excluded by {mq.rule}; passed through unchanged"
    where = "MTP layer: " if prefix.startswith("mtp.") or ".mtp." in prefix else ""
    return f"{where}{what} (not quantized in the source); passed through unchanged"


# ----------------------------------------------------------------------------- tensor parallel


def choose_w2_groups(n: int, g_down: int, tp: int) -> tuple[int, int | None]:
    """(padded N, w2 group size) for ``tp`` ranks: the largest supported group that divides the
    source group and every rank's slice; only when none does, the smallest zero-padded N that
    works (ties: the larger group)."""
    if n % tp == 0:
        g = largest_group([g_down], divides=[n // tp])
        if g is not None:
            return n, g
    if tp == 1:
        return n, None
    best = None
    for g in SUPPORTED_GROUPS:
        if g_down % g == 0:
            cand = math.ceil(n / (tp * g)) * tp * g
            if best is None or cand < best[0]:
                best = (cand, g)
    return best if best is not None else (n, None)


def tp_report(plan: Plan, sizes=(1, 2, 4, 8, 16)) -> list[dict]:
    """Which tensor-parallel sizes work as-is, by regrouping, or only by padding, and what each
    costs: the exact extra bytes of the converted tensors against ``--tp-size 1``."""
    out = []
    for t in sizes:
        how, extra = "as-is", 0
        for l in plan.converted:
            base = l.geometry
            padded, g2 = choose_w2_groups(l.intermediate, l.source_groups["down"], t)
            if g2 is None:
                how = "impossible"
                break
            geo = LayerGeometry(base.experts, base.hidden, base.intermediate, padded, base.g13, g2)
            extra += _layer_bytes(geo, l.scale_dtype) - _layer_bytes(base, l.scale_dtype)
            if padded != base.padded:
                how = "pad"
            elif g2 != base.g2 and how == "as-is":
                how = "regroup"
        out.append({"tp_size": t, "how": how, "extra_bytes": int(extra)})
    return out


def _layer_bytes(geo: LayerGeometry, scale_dtype: str) -> int:
    s = DTYPE_SIZES[scale_dtype]
    return (math.prod(geo.w13_shape) + math.prod(geo.w2_shape)
            + s * (math.prod(geo.w13_scales_shape) + math.prod(geo.w2_scales_shape)))


# ---------------------------------------------------------------------------------- the audit


def audit(plan: Plan, ckpt: Checkpoint, jobs: int = 1) -> list[str]:
    """Check what only the data tells, for every converted layer: symmetric zero points, natural
    row order, finite scales.  Raises InputError; returns warnings (all-zero scale groups)."""
    # one task per layer: per-expert checks are too small to pay for a thread hand-off each
    tasks = plan.converted

    def one(l):
        warn = []
        for e in range(l.experts):
            warn.extend(_audit_expert(plan, ckpt, l, e))
        return warn

    warnings: list[str] = []
    if jobs > 1 and len(tasks) > 1:
        pool = ThreadPoolExecutor(jobs)
        try:
            for w in pool.map(one, tasks):
                warnings.extend(w)
        finally:
            # on an error or Ctrl-C, drop the queued checks instead of running them all first
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        for t in tasks:
            warnings.extend(one(t))
    return warnings


def _audit_expert(plan: Plan, ckpt: Checkpoint, l: LayerPlan, e: int) -> list[str]:
    fmt = FORMATS[l.format]
    warn = []
    for role in ROLES:
        fields = l.fields(e, role)
        fmt.check(ckpt, fields, l.specs[role], plan.quant.checkpoint_format, l.prefix)
        s = to_float32(fmt.read_scales(ckpt, fields, l.specs[role]), l.specs[role].scale_dtype)
        if not np.isfinite(s).all():
            bad = np.argwhere(~np.isfinite(s))[0]
            name = fields.get("scales") or fields.get("weight_scale")
            raise InputError(f"{name}: non-finite scale {s[tuple(bad)]} at output {bad[0]}, group {bad[1]}")
        zero = s == 0
        if zero.any():
            name = fields.get("scales") or fields.get("weight_scale")
            warn.append(f"{name}: {int(zero.sum())} scale(s) are exactly zero (those weight groups are all zero)")
    return warn
