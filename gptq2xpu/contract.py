"""The converted checkpoint's on-disk contract: names, shapes, tensor-parallel slices, and the
schema of the config block.

Both sides import this module: the planner and the writer produce what it describes (the shapes,
where gate and up rows go, each rank's slice), the loader and the vLLM plugin read it.  Slices are
data (:class:`RankSlice`: index tuples that numpy and torch arrays both take), so the rank writer
(numpy) and the loader and plugin (torch) cut the same bytes without this module importing
either.  The verifier's math stays its own (:mod:`gptq2xpu.verify.unpack`).

Per converted MoE layer ``<prefix>`` (the module holding ``experts``), with E experts, hidden
size K, expert intermediate size N (padded to P for tensor parallelism) and group sizes g13/g2::

    <prefix>.experts.w13_qweight  uint8 [E, 2P, K/2]   rows 0..N-1 gate (w1), rows P..P+N-1 up (w3)
    <prefix>.experts.w13_scales   F16/BF16 [E, 2P, K/g13]
    <prefix>.experts.w2_qweight   uint8 [E, K, P/2]    down projection, input dim P
    <prefix>.experts.w2_scales    F16/BF16 [E, K, P/g2]

Byte ``j`` of a row holds input ``2j`` in its low nibble and ``2j+1`` in its high nibble; code
``q`` means ``(q - 8) * scale`` ("u4b8"), or the bytes are stored XOR 0x88 ("s4": signed
two's-complement nibbles).  With padding (P > N), gate rows N..P-1, up rows P+N..2P-1 and w2
inputs N..P-1 are zero, and so are their scales.  Rank ``r`` of ``T`` holds the intermediate values
``[r*P/T, (r+1)*P/T)`` (:meth:`LayerGeometry.rank_slices`).  ``config.json`` carries the block
:data:`CONFIG_BLOCK` describing all of it; :func:`parse_block` reads that block from an untrusted
folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import InputError

#: Name of the block gptq2xpu adds to the output ``config.json``.
CONFIG_BLOCK = "gptq2xpu"
#: The file listing every written file with its size and sha256.
MANIFEST_NAME = "gptq2xpu-manifest.json"
MANIFEST_FORMAT = "gptq2xpu-manifest"  # the manifest's "format" field
#: Version of the on-disk format the config block describes.
FORMAT_VERSION = 1
#: The Hugging Face index of a sharded checkpoint.
INDEX_NAME = "model.safetensors.index.json"
#: The folder a split conversion (``convert --part``) keeps its plan and part records in until
#: ``finalize``.
PARTS_DIR = ".gptq2xpu-parts"

W13_QWEIGHT, W13_SCALES, W2_QWEIGHT, W2_SCALES = "w13_qweight", "w13_scales", "w2_qweight", "w2_scales"
#: The four tensors a converted layer has, in this order.
EXPERT_TENSORS = (W13_QWEIGHT, W13_SCALES, W2_QWEIGHT, W2_SCALES)

#: Nibble encodings: u4b8 = offset-8 codes (what vLLM feeds the kernel), s4 = signed nibbles.
ENCODINGS = ("u4b8", "s4")
#: Group sizes the XPU kernel runs (it derives g = K / scales.shape[-1] and refuses any other).
KERNEL_GROUPS = (256, 128, 64, 32)
#: Scale dtypes: the name users type and the config block records -> the safetensors dtype name.
SCALE_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
#: Every float dtype by both names (users and configs say "float32"; safetensors says "F32").
FLOAT_DTYPE_NAMES = {**SCALE_DTYPES, "float32": "F32"}
#: How the router scores experts.
SCORINGS = ("softmax", "sigmoid")

#: Output formats (``convert --format``): the stacked layout above, and compressed-tensors
#: ``pack-quantized`` (every quantized linear on its own: ``<module>.weight_packed`` int32 ``[N,
#: K/8]``, ``weight_scale`` ``[N, K/g]``, ``weight_shape`` ``[N, K]``; a converted MoE layer's
#: experts keep their per-expert names, one group size per layer, never padded).
OUTPUT_XPU, OUTPUT_CT = "xpu", "compressed-tensors"
CT_FIELDS = ("weight_packed", "weight_scale", "weight_shape")

#: Folder holding the per-rank files of ``convert --tp-size T --emit-ranks``.
RANKS_DIR = "tp-ranks"

#: The layout in words, as the config block records it.
LAYOUT_DOC = {
    W13_QWEIGHT: ("uint8 [E, 2P, K/2]; rows 0..N-1 gate (w1), rows P..P+N-1 up (w3); N = intermediate_size, "
                  "P = padded_intermediate_size (P = N unless padded for tensor parallelism; padding rows are zero)"),
    W13_SCALES: "[E, 2P, K/w13_group_size]",
    W2_QWEIGHT: "uint8 [E, K, P/2] (down projection; inputs N..P-1 are zero padding)",
    W2_SCALES: "[E, K, P/w2_group_size]",
    "nibble_order": "byte j of a row: input 2j in the low nibble, input 2j+1 in the high nibble",
    "tensor_names": "<prefix>.experts.{w13_qweight,w13_scales,w2_qweight,w2_scales}",
    "tp_rank_slice": ("rank r of tp_size T holds intermediate values [r*P/T, (r+1)*P/T): those gate rows, then "
                      "those up rows (offset P) of w13 and its scales, and those inputs of w2 and their scale groups"),
}

# Bounds for numbers read from an untrusted block: far above any real model, far below sizes
# whose arithmetic or allocations could hurt.
_MAX_DIM = 1 << 20
_MAX_EXPERTS = 1 << 16
_MAX_TP = 1024


def expert_tensor(prefix: str, what: str) -> str:
    """``<prefix>.experts.<what>``: the name of one of a converted layer's four tensors."""
    return f"{prefix}.experts.{what}"


def tensor_dtype(what: str, scale_dtype: str) -> str:
    """The safetensors dtype of tensor ``what``: U8 for the packed weights, else ``scale_dtype``."""
    return "U8" if what in (W13_QWEIGHT, W2_QWEIGHT) else scale_dtype


def rank_folder(rank: int, size: int) -> str:
    """Relative folder of tensor-parallel rank ``rank`` of ``size`` (``tp-ranks/rank-001-of-004``)."""
    return f"{RANKS_DIR}/rank-{rank:03d}-of-{size:03d}"


def scale_dtype_name(name: object) -> object:
    """``"float16"``/``"F16"`` -> ``"F16"`` (the block records per-layer scale dtypes by the
    safetensors name and the checkpoint-wide one by the torch name); anything else -> itself."""
    return SCALE_DTYPES.get(name, name) if isinstance(name, str) else name


#: The axis a :class:`RankSlice` cuts: rows or columns of ``[..., R, C]``.
ROWS, COLUMNS = -2, -1


@dataclass(frozen=True)
class RankSlice:
    """One rank's part of a converted tensor ``[E, R, C]``, the same for every expert: the
    ``spans`` (``[start, stop)``) of its rows (``axis == -2``) or of its columns (``axis == -1``),
    laid end to end in this order.  Its index tuples fit numpy and torch arrays alike, of all
    experts (``[E, R, C]``) or of one (``[R, C]``)."""

    axis: int
    spans: tuple[tuple[int, int], ...]

    def placed(self):
        """``(span in the full tensor, span in the rank's tensor)`` for each span, in order."""
        at = 0
        for start, stop in self.spans:
            yield (start, stop), (at, at + stop - start)
            at += stop - start

    def key(self, span: tuple[int, int]) -> tuple:
        """The index tuple of a span of rows or columns (``array[key]``)."""
        return (..., slice(*span)) if self.axis == COLUMNS else (..., slice(*span), slice(None))

    def pairs(self):
        """``(full key, rank key)`` per span: ``rank[d] = full[s]`` for each fills the rank's tensor."""
        return [(self.key(src), self.key(dst)) for src, dst in self.placed()]


@dataclass(frozen=True)
class LayerGeometry:
    """The shapes of one converted MoE layer, where its gate and up rows lie, and how tensor
    parallelism slices it."""

    experts: int
    hidden: int          # K
    intermediate: int    # N (source)
    padded: int          # P: N after tensor-parallel padding (== N when none)
    g13: int             # output group size along K (w13)
    g2: int              # output group size along N (w2)

    def shapes(self, tp_size: int = 1) -> dict[str, tuple[int, int, int]]:
        """The four tensors' shapes: of the whole layer, or of each rank's slice over ``tp_size`` ranks."""
        e, k, p = self.experts, self.hidden, self.padded // tp_size
        return {
            W13_QWEIGHT: (e, 2 * p, k // 2),
            W13_SCALES: (e, 2 * p, k // self.g13),
            W2_QWEIGHT: (e, k, p // 2),
            W2_SCALES: (e, k, p // self.g2),
        }

    @property
    def w13_rows(self) -> dict[str, tuple[int, int]]:
        """Role -> its rows ``[start, stop)`` in w13 and its scales: gate ``0..N-1``, up ``P..P+N-1``."""
        n, p = self.intermediate, self.padded
        return {"gate": (0, n), "up": (p, p + n)}

    def splits(self, tp_size: int) -> bool:
        """Whether ``tp_size`` ranks each get whole scale groups of w2 (and whole bytes)."""
        return self.padded % (tp_size * self.g2) == 0 and (self.padded // tp_size) % 2 == 0

    def intermediate_slice(self, rank: int, tp_size: int) -> tuple[int, int]:
        """The intermediate values ``[start, stop)`` rank ``rank`` of ``tp_size`` holds."""
        per = self.padded // tp_size
        return rank * per, (rank + 1) * per

    def rank_slices(self, rank: int, tp_size: int) -> dict[str, RankSlice]:
        """Which rows or columns of each full tensor form rank ``rank``'s slice (see :class:`RankSlice`)."""
        a, b = self.intermediate_slice(rank, tp_size)
        rows = RankSlice(ROWS, ((a, b), (self.padded + a, self.padded + b)))
        return {
            W13_QWEIGHT: rows,
            W13_SCALES: rows,
            W2_QWEIGHT: RankSlice(COLUMNS, ((a // 2, b // 2),)),
            W2_SCALES: RankSlice(COLUMNS, ((a // self.g2, b // self.g2),)),
        }


@dataclass(frozen=True)
class ConvertedLayer:
    """One converted MoE layer as its config block entry describes it (validated)."""

    prefix: str
    experts: int
    hidden_size: int                 # K
    intermediate_size: int           # N of the source
    padded_intermediate_size: int    # P (== N unless padded for tensor parallelism)
    w13_group_size: int
    w2_group_size: int
    scale_dtype: str                 # safetensors name: F16 or BF16
    source_format: str               # gptq | compressed-tensors
    source_projections: dict[str, str]   # role (gate/up/down) -> source projection name
    source_group_size: dict[str, int]    # role -> source group size

    def tensor(self, what: str) -> str:
        return expert_tensor(self.prefix, what)

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry(self.experts, self.hidden_size, self.intermediate_size, self.padded_intermediate_size,
                             self.w13_group_size, self.w2_group_size)

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """The contract shape of each of the four tensors."""
        return self.geometry.shapes()


@dataclass(frozen=True)
class ConvertedLinear:
    """A quantized linear a compressed-tensors output writes outside its MoE layers (validated)."""

    module: str
    in_features: int        # K
    out_features: int       # N
    group_size: int
    source_group_size: int
    scale_dtype: str        # safetensors name: F16 or BF16

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        n, k = self.out_features, self.in_features
        return {"weight_packed": (n, k // 8), "weight_scale": (n, k // self.group_size), "weight_shape": (2,)}


def expert_linear_names(layer: ConvertedLayer) -> list[tuple[int, str, str]]:
    """``(expert, role, module)`` of every expert projection of a converted layer of a
    compressed-tensors output (``<prefix>.experts.<e>.<projection>``)."""
    return [(e, role, f"{layer.prefix}.experts.{e}.{layer.source_projections[role]}")
            for e in range(layer.experts) for role in ("gate", "up", "down")]


@dataclass(frozen=True)
class ConvertedBlock:
    """The config block of a converted checkpoint (validated; see :func:`parse_block`)."""

    nibble_encoding: str
    layers: dict[str, ConvertedLayer]
    tp_size: int = 1
    tp_ranks: tuple[str, ...] = ()
    routing: dict = field(default_factory=dict)
    routers: tuple[str, ...] = ()
    quantized_routers: tuple[str, ...] = ()
    dequantized_routers: tuple[str, ...] = ()
    checkpoint_format: str = "gptq"      # of the source: gptq (v1) | gptq_v2 | pack-quantized
    fingerprint: str | None = None       # of the source's headers
    data_fingerprint: str | None = None  # of the source's sampled data
    passthrough: dict[str, str] = field(default_factory=dict)   # MoE prefix -> kind, experts passed through
    unconverted: tuple[str, ...] = ()    # MoE prefixes kept unchanged (--keep-unsupported)
    output_format: str = OUTPUT_XPU      # xpu | compressed-tensors
    linears: dict[str, ConvertedLinear] = field(default_factory=dict)  # compressed-tensors: outside MoE layers

    @property
    def compressed_tensors(self) -> bool:
        return self.output_format == OUTPUT_CT

    def layer_top_k(self, layer: ConvertedLayer) -> int:
        """Experts per token for ``layer``: the recorded top_k, else 2 (or fewer experts)."""
        return int(self.routing.get("top_k", min(2, layer.experts)))

    @property
    def zero_offset(self) -> int:
        """What the source's stored zero points are offset by: 1 for GPTQ v1 (zero - 1), else 0."""
        return 1 if self.checkpoint_format == "gptq" else 0


def check_format_version(doc: dict, where: str) -> None:
    """Refuse a document (config block, manifest) of a format version this tool does not know:
    its meaning may differ in ways no other check would notice."""
    version = doc.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise InputError(f"{where}: format_version {repr(version)[:40]} is not {FORMAT_VERSION} "
                         "(written by another gptq2xpu?)")


def parse_block(doc: object, where: str = f"config.json:{CONFIG_BLOCK}") -> ConvertedBlock:
    """Validate a config block read from an untrusted folder; :class:`InputError` names the key."""
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected an object, found {type(doc).__name__}")
    check_format_version(doc, where)
    enc = doc.get("nibble_encoding")
    if enc not in ENCODINGS:
        raise InputError(f"{where}: nibble_encoding {enc!r} is not one of {', '.join(ENCODINGS)}")
    tp = _int(doc.get("tp_size", 1), f"{where}.tp_size", 1, _MAX_TP)
    ranks = doc.get("tp_ranks") or []
    if not isinstance(ranks, list) or (ranks and len(ranks) != tp):
        raise InputError(f"{where}.tp_ranks: expected an empty list or {tp} folder names")
    for r, rel in enumerate(ranks):
        if rel != rank_folder(r, tp):  # exact: never a path of the block's choosing
            raise InputError(f"{where}.tp_ranks[{r}]: {rel!r} is not {rank_folder(r, tp)!r}")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, dict) or not layers_doc:
        raise InputError(f"{where}.layers: expected a non-empty object of converted MoE layers")
    layers = {prefix: _parse_layer(prefix, info, f"{where}.layers[{prefix!r}]", tp)
              for prefix, info in layers_doc.items()}
    source = _parse_source(doc.get("source", {}), f"{where}.source")
    routing = _parse_routing(doc.get("routing", {}), f"{where}.routing")
    fewest = min(layer.experts for layer in layers.values())
    if routing.get("top_k", 1) > fewest:
        raise InputError(f"{where}.routing.top_k: {routing['top_k']} is more than the {fewest} experts of a layer")
    output_format = doc.get("output_format", OUTPUT_XPU)
    if output_format not in (OUTPUT_XPU, OUTPUT_CT):
        raise InputError(f"{where}.output_format: {_short(output_format)} is not {OUTPUT_XPU} or {OUTPUT_CT}")
    linears = {}
    if output_format == OUTPUT_CT:
        if enc != "u4b8":
            raise InputError(f"{where}: a {OUTPUT_CT} output stores offset-8 codes, not nibble_encoding {enc!r}")
        for prefix, layer in layers.items():
            if layer.padded_intermediate_size != layer.intermediate_size or \
                    layer.w13_group_size != layer.w2_group_size:
                raise InputError(f"{where}.layers[{prefix!r}]: a {OUTPUT_CT} layer has one group size and no padding")
        linears = {m: _parse_linear(m, v, f"{where}.linears[{m!r}]")
                   for m, v in _layer_map(doc.get("linears"), f"{where}.linears").items()}
    return ConvertedBlock(
        output_format=output_format,
        linears=linears,
        nibble_encoding=enc,
        layers=layers,
        tp_size=tp,
        tp_ranks=tuple(ranks),
        routing=routing,
        routers=_names(doc.get("routers"), f"{where}.routers"),
        quantized_routers=_names(doc.get("quantized_routers"), f"{where}.quantized_routers"),
        dequantized_routers=_names(doc.get("dequantized_routers"), f"{where}.dequantized_routers"),
        checkpoint_format=source["checkpoint_format"],
        fingerprint=source["fingerprint"],
        data_fingerprint=source["data_fingerprint"],
        passthrough={p: _kind(v, f"{where}.passthrough_layers[{p!r}]")
                     for p, v in _layer_map(doc.get("passthrough_layers"), f"{where}.passthrough_layers").items()},
        unconverted=tuple(_layer_map(doc.get("unconverted_layers"), f"{where}.unconverted_layers")),
    )


_PREFIX = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,999}$")


def _parse_layer(prefix: str, info: object, where: str, tp: int) -> ConvertedLayer:
    if not _PREFIX.match(prefix) or ".." in prefix:
        raise InputError(f"{where}: {prefix!r} is not a module name")
    if not isinstance(info, dict):
        raise InputError(f"{where}: expected an object")
    e = _int(info.get("experts"), f"{where}.experts", 1, _MAX_EXPERTS)
    k = _int(info.get("hidden_size"), f"{where}.hidden_size", 2, _MAX_DIM)
    n = _int(info.get("intermediate_size"), f"{where}.intermediate_size", 2, _MAX_DIM)
    p = _int(info.get("padded_intermediate_size", n), f"{where}.padded_intermediate_size", n, _MAX_DIM)
    g13 = _int(info.get("w13_group_size"), f"{where}.w13_group_size", 1, _MAX_DIM)
    g2 = _int(info.get("w2_group_size"), f"{where}.w2_group_size", 1, _MAX_DIM)
    if g13 not in KERNEL_GROUPS or g2 not in KERNEL_GROUPS:
        raise InputError(f"{where}: group sizes {g13}/{g2} are not ones the kernel runs {KERNEL_GROUPS}")
    if k % g13 or k % 2:
        raise InputError(f"{where}: hidden_size {k} is not a multiple of its group size {g13}")
    if n % 2:
        raise InputError(f"{where}: intermediate_size {n} is odd (two inputs a byte)")
    if not LayerGeometry(e, k, n, p, g13, g2).splits(tp):
        raise InputError(f"{where}: padded_intermediate_size {p} does not split into {tp} rank(s) of whole groups "
                         f"of {g2}")
    sd = scale_dtype_name(info.get("scale_dtype"))
    if sd not in SCALE_DTYPES.values():
        raise InputError(f"{where}.scale_dtype: {info.get('scale_dtype')!r} is not float16 or bfloat16")
    fmt = info.get("source_format", "gptq")
    if fmt not in ("gptq", "compressed-tensors"):
        raise InputError(f"{where}.source_format: {fmt!r} is not gptq or compressed-tensors")
    proj = info.get("source_projections")
    if not isinstance(proj, dict) or set(proj) != {"gate", "up", "down"} or not all(
            isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_]{1,100}", v) for v in proj.values()):
        raise InputError(f"{where}.source_projections: expected gate/up/down -> projection name")
    groups = info.get("source_group_size")
    if not isinstance(groups, dict) or set(groups) != {"gate", "up", "down"}:
        raise InputError(f"{where}.source_group_size: expected gate/up/down -> group size")
    src_groups = {r: _int(v, f"{where}.source_group_size.{r}", 1, _MAX_DIM) for r, v in groups.items()}
    return ConvertedLayer(prefix, e, k, n, p, g13, g2, sd, fmt, dict(proj), src_groups)


def _parse_linear(module: str, info: object, where: str) -> ConvertedLinear:
    if not isinstance(info, dict):
        raise InputError(f"{where}: expected an object")
    k = _int(info.get("in_features"), f"{where}.in_features", 8, _MAX_DIM)
    n = _int(info.get("out_features"), f"{where}.out_features", 1, _MAX_DIM)
    g = _int(info.get("group_size"), f"{where}.group_size", 1, _MAX_DIM)
    src_g = _int(info.get("source_group_size"), f"{where}.source_group_size", 1, _MAX_DIM)
    if g not in KERNEL_GROUPS or k % g or k % 8 or src_g % g:
        raise InputError(f"{where}: group size {g} is not one of {KERNEL_GROUPS} dividing in_features {k} and the "
                         f"source group {src_g}")
    sd = scale_dtype_name(info.get("scale_dtype"))
    if sd not in SCALE_DTYPES.values():
        raise InputError(f"{where}.scale_dtype: {_short(info.get('scale_dtype'))} is not float16 or bfloat16")
    return ConvertedLinear(module, k, n, g, src_g, sd)


def _parse_source(doc: object, where: str) -> dict:
    """What the block records of the source: its format and fingerprints (absent: not recorded)."""
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected an object, found {_short(doc)}")
    fmt = doc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2", "pack-quantized"):
        raise InputError(f"{where}.checkpoint_format: {_short(fmt)} is not gptq, gptq_v2 or pack-quantized")
    out = {"checkpoint_format": fmt}
    for key in ("fingerprint", "data_fingerprint"):
        value = doc.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise InputError(f"{where}.{key}: expected a string, found {_short(value)}")
        out[key] = value or None
    return out


def _parse_routing(doc: object, where: str) -> dict:
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected an object")
    out = {}
    if "top_k" in doc:
        out["top_k"] = _int(doc["top_k"], f"{where}.top_k", 1, _MAX_EXPERTS)
    scoring = doc.get("scoring", "softmax")
    if scoring not in SCORINGS:
        raise InputError(f"{where}.scoring: {scoring!r} is not one of {', '.join(SCORINGS)}")
    out["scoring"] = scoring
    renorm = doc.get("renormalize", True)
    if type(renorm) is not bool:
        raise InputError(f"{where}.renormalize: expected true or false, found {renorm!r}")
    out["renormalize"] = renorm
    factor = doc.get("routed_scaling_factor", 1.0)
    if type(factor) not in (int, float) or not math.isfinite(factor):
        raise InputError(f"{where}.routed_scaling_factor: expected a finite number, found {factor!r}")
    out["routed_scaling_factor"] = float(factor)
    return out


def _layer_map(value: object, where: str) -> dict:
    """``{prefix: {...}}`` of passed-through / unconverted layers (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected an object of MoE layer prefixes")
    for prefix in value:
        if not isinstance(prefix, str) or not _PREFIX.match(prefix) or ".." in prefix:
            raise InputError(f"{where}: {_short(prefix)} is not a module name")
    return value


def _kind(info: object, where: str) -> str:
    kind = info.get("kind") if isinstance(info, dict) else None
    if not isinstance(kind, str) or not kind:
        raise InputError(f"{where}.kind: expected a string, found {_short(kind)}")
    return kind


def _names(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: expected a list of tensor names")
    return tuple(value)


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise InputError(f"{where}: expected an integer in {lo}..{hi}, found {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
