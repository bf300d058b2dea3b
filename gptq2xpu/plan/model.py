"""The plan as data: per MoE layer what happens and why, and where every output byte comes from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..contract import (
    EXPERT_TENSORS,
    FLOAT_DTYPE_NAMES,
    FORMAT_VERSION,
    LAYOUT_DOC,
    LayerGeometry,
    expert_tensor,
    rank_folder,
    tensor_dtype,
)
from ..errors import InputError
from ..formats import ProjSpec
from ..naming import natural_key
from ..read import QuantConfig
from ..read.paths import text_name
from ..safetensors_io import PlannedTensor, ShardLayout
from .options import OUTPUT_FORMATS, ConvertOptions
from .tp import tp_report

_TORCH_NAME = {v: k for k, v in FLOAT_DTYPE_NAMES.items()}


class ExpertFields:
    """Per expert, role -> field -> source tensor name, kept as one list of names per (role, field)
    (the checkpoint's own strings, None where an expert lacks the field): a pointer per tensor
    instead of three dicts per expert.  ``expert_fields[e]`` and :meth:`fields` build dicts."""

    __slots__ = ("count", "columns")

    def __init__(self, count: int, columns: dict[str, dict[str, list[str | None]]]):
        self.count = count
        self.columns = columns

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, e: int) -> dict[str, dict[str, str]]:
        if not -self.count <= e < self.count:
            raise IndexError(e)
        return {role: self.fields(e, role) for role in self.columns}

    def __iter__(self):
        return (self[e] for e in range(self.count))

    def fields(self, e: int, role: str) -> dict[str, str]:
        return {f: names[e] for f, names in self.columns[role].items() if names[e] is not None}


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
    expert_fields: ExpertFields | list[dict[str, dict[str, str]]] = field(default_factory=list, repr=False)
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
        return expert_tensor(self.prefix, what)

    def output_tensors(self) -> list[PlannedTensor]:
        """The four tensors of the converted layer (names, dtypes and shapes of the contract)."""
        shapes = self.geometry.shapes()
        return [PlannedTensor(self.output_name(what), tensor_dtype(what, self.scale_dtype), shapes[what])
                for what in EXPERT_TENSORS]

    def fields(self, e: int, role: str) -> dict[str, str]:
        ef = self.expert_fields
        return ef.fields(e, role) if isinstance(ef, ExpertFields) else ef[e][role]

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
class LinearPlan:
    """One quantized linear written on its own (``--format compressed-tensors``): where its packed
    words and scales are in the source and the group size it is written with."""

    module: str                  # e.g. model.layers.0.self_attn.o_proj, model.layers.0.mlp.experts.3.down_proj
    format: str                  # source format: gptq | compressed-tensors
    fields: dict[str, str]       # source field -> tensor name
    spec: ProjSpec               # as the source stores it
    group: int                   # output group size
    scale_dtype: str             # output scale dtype (safetensors name)
    row_parallel: bool = False   # vLLM splits its input across tensor-parallel ranks

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def summary(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group,
                "source_group_size": self.spec.group_size, "source_scale_dtype": self.spec.scale_dtype,
                "scale_dtype": self.scale_dtype, "row_parallel": self.row_parallel}


def expert_linear(layer: LayerPlan, e: int, role: str) -> LinearPlan:
    """Expert ``e``'s ``role`` projection of a converted MoE layer as a linear of its own."""
    return LinearPlan(f"{layer.prefix}.experts.{e}.{layer.proj_names[role]}", layer.format, layer.fields(e, role),
                      layer.specs[role], layer.geometry.g2 if role == "down" else layer.geometry.g13,
                      layer.scale_dtype, row_parallel=role == "down")


@dataclass(frozen=True)
class OutputItem:
    """Where one output tensor's bytes come from."""

    tensor: PlannedTensor
    source: str          # "copy" | "w13_qweight" | "w13_scales" | "w2_qweight" | "w2_scales" | "router"
    #                      | "weight_packed" | "weight_scale" | "weight_shape" (compressed-tensors)
    ref: str             # source tensor name (copy), layer prefix, or linear module (compressed-tensors)


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
    #: sampled data of the source (:meth:`gptq2xpu.read.Checkpoint.data_fingerprint`), set by convert
    data_fingerprint: str = ""
    #: where the source came from, publishable (:func:`gptq2xpu.read.resolve.provenance`)
    provenance: dict = field(default_factory=dict)
    #: compressed-tensors: the quantized linears outside converted MoE layers, by module
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    #: compressed-tensors: float linear modules (the quantization_config's ``ignore``)
    ignore: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerPlan]:
        return [lyr for lyr in self.layers if lyr.converts]

    @property
    def refused(self) -> list[LayerPlan]:
        return [lyr for lyr in self.layers if lyr.action == "refuse"]

    @property
    def bytes_out(self) -> int:
        return sum(s.layout.file_size for s in self.shards)

    def _tp_report(self) -> list[dict]:
        """:func:`tp_report`; a compressed-tensors output is never padded: sizes that need it cannot be
        written in that format."""
        rows = tp_report(self.converted, requested=self.options.tp_size) if self.converted else []
        if self.options.compressed_tensors:
            for row in rows:
                if row["how"] == "pad":
                    row.update(how="impossible (needs zero-padding: --format xpu)", extra_bytes=0)
        return rows

    def layer(self, prefix: str) -> LayerPlan:
        for lyr in self.layers:
            if lyr.prefix == prefix:
                return lyr
        raise KeyError(prefix)

    def linear(self, module: str) -> LinearPlan:
        """A linear written on its own: one of :attr:`linears`, or an expert projection of a converted
        MoE layer (``<prefix>.experts.<e>.<proj>``, built here so that no plan holds one object per
        expert) with the layer's single group size."""
        found = self.linears.get(module)
        if found is not None:
            return found
        head, e, proj = module.rsplit(".", 2)
        layer = self.layer(head.removesuffix(".experts"))
        return expert_linear(layer, int(e), next(r for r, p in layer.proj_names.items() if p == proj))

    def raise_refusals(self) -> None:
        refused = self.refused
        if refused:
            first = refused[0]
            more = f" (and {len(refused) - 1} more layer(s); `gptq2xpu inspect` lists them)" if len(refused) > 1 else ""
            raise InputError(f"{first.prefix}: {first.reason}{more}")

    def config_block(self) -> dict:
        """The block added to the output config.json, documenting the converted expert format."""
        conv = self.converted
        groups13 = sorted({lyr.geometry.g13 for lyr in conv})
        groups2 = sorted({lyr.geometry.g2 for lyr in conv})
        scale_dtypes = sorted({lyr.scale_dtype for lyr in conv})
        block = {
            "format": "xpu-int4-moe",
            "format_version": FORMAT_VERSION,
            "tool": "gptq2xpu",
            "tool_version": __version__,
            "layout": dict(LAYOUT_DOC),
            "nibble_encoding": self.options.nibble_encoding,
            "nibble_encoding_doc": ("u4b8: code q in 0..15 means (q - 8) * scale"
                                    if self.options.nibble_encoding == "u4b8"
                                    else "s4: signed two's-complement nibbles, (q - 8) & 0xF, i.e. u4b8 byte ^ 0x88"),
            "symmetric": True,
            "zero_point": 8,
            "act_order": False,
            "bits": 4,
            "group_size": groups13[0] if len(groups13) == 1 and groups13 == groups2 else None,
            "w13_group_sizes": groups13,
            "w2_group_sizes": groups2,
            "scale_dtype": _TORCH_NAME.get(scale_dtypes[0]) if len(scale_dtypes) == 1 else None,
            "tp_size": self.options.tp_size,
            "tp_ranks": ([rank_folder(r, self.options.tp_size) for r in range(self.options.tp_size)]
                         if self.options.emit_ranks else []),
            "routing": dict(self.routing),
            "layers": {lyr.prefix: _layer_block(lyr) for lyr in conv},
            "passthrough_layers": {lyr.prefix: {"kind": lyr.kind, "reason": lyr.reason} for lyr in self.layers
                                   if lyr.action == "passthrough" and lyr.kind != "unsupported"},
            "unconverted_layers": {lyr.prefix: {"kind": lyr.kind, "reason": lyr.reason} for lyr in self.layers
                                   if lyr.kind == "unsupported"},
            "routers": sorted((r for lyr in self.layers if not lyr.router_quantized for r in lyr.routers),
                              key=natural_key),
            "quantized_routers": sorted((r for lyr in self.layers if lyr.router_quantized
                                         and not (lyr.converts and self.options.dequantize_router)
                                         for r in lyr.routers), key=natural_key),
            "dequantized_routers": [f"{lyr.prefix}.gate.weight" for lyr in self.layers
                                    if lyr.router_quantized and lyr.converts and self.options.dequantize_router],
            "output_format": self.options.output_format,
            "source": {
                **self.published_origin(),
                "family": self.family,
                "fingerprint": self.fingerprint,
                **({"data_fingerprint": self.data_fingerprint} if self.data_fingerprint else {}),
                "quant_method": self.quant.method,
                "checkpoint_format": self.quant.checkpoint_format,
                "found_in": self.quant.found_in,
                "dropped_tensors": ("per-expert qzeros and g_idx: symmetric zero point 8 and rows in natural order, "
                                    "checked from the data"),
            },
        }
        if self.options.compressed_tensors:
            _ct_block(self, block)
        return block

    def published_origin(self) -> dict:
        """The source as the config block records it: the repo id (with the revision asked for and
        the commit it resolved to) or the folder's name, never a local path, so that published
        outputs leak nothing and identical conversions write identical files on every machine."""
        prov = dict(self.provenance) or {"folder": text_name(Path(self.origin).name)}
        origin = prov.get("repo_id") or prov.get("folder") or ""
        return {"origin": origin, **prov}

    def to_dict(self) -> dict:
        return {
            "source": self.origin,
            "family": self.family,
            "quantization": self.quant.describe(),
            "options": asdict(self.options),
            "layers": [lyr.summary() for lyr in self.layers],
            "moe_layers": len(self.layers),
            "converted_layers": len(self.converted),
            "passthrough_layers": sum(1 for lyr in self.layers if lyr.action == "passthrough"),
            "refused_layers": len(self.refused),
            "routers_excluded": sorted({r for lyr in self.layers for r in lyr.routers}, key=natural_key),
            "passthrough_tensors": len(self.passthrough),
            "shards": [{"name": s.name, "tensors": len(s.items), "bytes": s.layout.file_size} for s in self.shards],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "warnings": list(self.warnings),
            "refusals": [f"{lyr.prefix}: {lyr.reason}" for lyr in self.refused],
            "output_format": self.options.output_format,
            "serves": _serves(self.options.output_format),
            "formats": {name: _serves(name) for name in OUTPUT_FORMATS},
            **({"linears": len(self.linears), "ignore": list(self.ignore)} if self.options.compressed_tensors else {}),
            "tp": self._tp_report(),
        }


def _serves(name: str) -> str:
    from ..outputs import output_format

    return output_format(name).serves


#: What the ``layout`` of a compressed-tensors output's block says.
CT_LAYOUT = {
    "weight_packed": "int32 [N, K/8] per linear: input 8c+j in bits 4j..4j+3 of word [n, c]; code q means "
                     "(q - 8) * scale (the source's GPTQ qweight transposed)",
    "weight_scale": "[N, K/group]",
    "weight_shape": "int64 [2] = [N, K]",
    "tensor_names": "<module>.{weight_packed,weight_scale,weight_shape}; a converted MoE layer's experts: "
                    "<prefix>.experts.<e>.<gate/up/down projection>",
    "experts_as_xpu_rows": "an expert's gate then up weight_packed, as little-endian bytes, are its w13 rows of "
                           "the xpu format; its down weight_packed its w2 rows",
}


def _ct_block(plan: Plan, block: dict) -> None:
    """A compressed-tensors output's block: its layout, the linears outside the MoE layers, and the
    source's own quantization description (``source.quantization_config``: the output's
    ``quantization_config`` is compressed-tensors')."""
    block["layout"] = dict(CT_LAYOUT)
    block["linears"] = {m: lin.summary() for m, lin in sorted(plan.linears.items(), key=lambda kv: natural_key(kv[0]))}
    block["quantized_routers"] = []
    block["source"]["quantization_config"] = json.loads(json.dumps(plan.quant.raw))


def _layer_block(lyr: LayerPlan) -> dict:
    g = lyr.geometry
    return {
        "experts": lyr.experts,
        "hidden_size": lyr.hidden,
        "intermediate_size": lyr.intermediate,
        "padded_intermediate_size": g.padded,
        "w13_group_size": g.g13,
        "w2_group_size": g.g2,
        "source_group_size": dict(lyr.source_groups),
        "source_format": lyr.format,
        "source_projections": dict(lyr.proj_names),
        "scale_dtype": lyr.scale_dtype,
    }
