"""A compressed-tensors output seen as the stacked layout, so every check of the ``xpu`` format
runs on it unchanged.

An expert's gate and up ``weight_packed`` (int32 ``[N, K/8]``), as little-endian bytes, are its
rows ``0..N-1`` and ``N..2N-1`` of the stacked ``w13_qweight`` (uint8 ``[E, 2N, K/2]``), its
``weight_scale`` its rows of ``w13_scales``; its down projection's are its ``w2_qweight`` /
``w2_scales`` (``docs/formats.md``).  So each stacked tensor is the concatenation, expert after
expert, of per-expert tensors' bytes: :class:`StackedView` presents those concatenations under the
stacked names (read by offset like any tensor, nothing copied up front) and hides the per-expert
tensors they are made of.  Written from the format's definition, independently of the converter
(nothing here imports it).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

from ..contract import (
    CT_FIELDS,
    EXPERT_TENSORS,
    W2_QWEIGHT,
    W2_SCALES,
    W13_QWEIGHT,
    W13_SCALES,
    ConvertedBlock,
    ConvertedLayer,
    expert_linear_names,
)
from ..read.checkpoint import Checkpoint
from ..read.quant_config import NESTED_CONFIG_KEYS
from ..read.regex import Budget, Regex, Unsupported
from ..safetensors_io import DTYPE_SIZES


@dataclass(frozen=True)
class StackedRef:
    """A stacked tensor made of other tensors' bytes, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPE_SIZES[self.dtype]


def part_problems(ckpt: Checkpoint, layer: ConvertedLayer) -> list[str]:
    """Why the layer's per-expert tensors cannot be stacked by the block's shapes (empty: they can)."""
    k, n, g, sd = layer.hidden_size, layer.intermediate_size, layer.w13_group_size, layer.scale_dtype
    # the view presents the per-expert tensors under the stacked names: a real tensor there would be hidden by it
    out = [f"{name}: a stacked tensor of the xpu format in a compressed-tensors output"
           for name in (layer.tensor(what) for what in EXPERT_TENSORS) if name in ckpt.tensors]
    for _e, role, module in expert_linear_names(layer):
        rows, cols = (k, n) if role == "down" else (n, k)
        want = {"weight_packed": ("I32", (rows, cols // 8)), "weight_scale": (sd, (rows, cols // g)),
                "weight_shape": (None, (2,))}
        for field, (dtype, shape) in want.items():
            ref = ckpt.tensors.get(f"{module}.{field}")
            if ref is None:
                out.append(f"{module}.{field}: missing")
            elif tuple(ref.shape) != shape or (dtype and ref.dtype != dtype) or \
                    (dtype is None and ref.dtype not in ("I32", "I64")):
                out.append(f"{module}.{field}: {ref.dtype}{list(ref.shape)}, the block says "
                           f"{dtype or 'I64'}{list(shape)}")
        if len(out) > 20:
            break
    return out


class StackedView:
    """``ckpt`` with each converted layer's per-expert compressed-tensors tensors replaced by the
    four stacked tensors they make up (layers in ``skip`` are left as they are)."""

    def __init__(self, ckpt: Checkpoint, block: ConvertedBlock, skip=()):
        self._ckpt = ckpt
        virtual: dict[str, StackedRef] = {}
        hidden: set[str] = set()
        for prefix, layer in block.layers.items():
            if prefix in skip:
                continue
            names = expert_linear_names(layer)
            per = {(e, role): module for e, role, module in names}
            hidden.update(f"{m}.{f}" for _, _, m in names for f in CT_FIELDS)
            shapes = layer.shapes
            experts = range(layer.experts)
            sd = layer.scale_dtype
            spec = {
                W13_QWEIGHT: ("U8", [f"{per[e, r]}.weight_packed" for e in experts for r in ("gate", "up")]),
                W13_SCALES: (sd, [f"{per[e, r]}.weight_scale" for e in experts for r in ("gate", "up")]),
                W2_QWEIGHT: ("U8", [f"{per[e, 'down']}.weight_packed" for e in experts]),
                W2_SCALES: (sd, [f"{per[e, 'down']}.weight_scale" for e in experts]),
            }
            for what, (dtype, parts) in spec.items():
                name = layer.tensor(what)
                virtual[name] = StackedRef(name, dtype, shapes[what], tuple(ckpt.ref(p) for p in parts))
        self._virtual = virtual
        self.tensors = {n: r for n, r in ckpt.tensors.items() if n not in hidden}
        self.tensors.update(virtual)

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)

    def ref(self, name: str):
        return self._virtual.get(name) or self._ckpt.ref(name)

    read = Checkpoint.read  # Checkpoint's own: it needs only ref() and read_into(), which this view overrides

    def read_into(self, ref, out: np.ndarray, *, offset: int = 0) -> None:
        if not isinstance(ref, StackedRef):
            self._ckpt.read_into(ref, out, offset=offset)
            return
        dst = out.reshape(-1).view(np.uint8)
        end = offset + dst.nbytes
        pos = 0
        for part in ref.parts:
            lo, hi = max(offset, pos), min(end, pos + part.nbytes)
            if lo < hi:
                self._ckpt.read_into(part, dst[lo - offset : hi - offset], offset=lo - pos)
            pos += part.nbytes
            if pos >= end:
                break


def _shape_value(ckpt: Checkpoint, name: str) -> list[int]:
    return [int(v) for v in ckpt.read(name).reshape(-1)]


def shape_problems(ckpt: Checkpoint, layer: ConvertedLayer) -> list[str]:
    """Every expert's ``weight_shape`` holds ``[N, K]`` of its projection."""
    k, n = layer.hidden_size, layer.intermediate_size
    out = []
    for _e, role, module in expert_linear_names(layer):
        want = [k, n] if role == "down" else [n, k]
        got = _shape_value(ckpt, f"{module}.weight_shape")
        if got != want:
            out.append(f"{module}.weight_shape: {got}, the block says {want}")
            if len(out) > 10:
                break
    return out


#: Tensor fields a linear written as compressed-tensors must not have beside its three: the GPTQ
#: source's, a float weight, and the zero points and row order of the asymmetric or act-order
#: compressed-tensors schemes (a runtime loading this symmetric one has no place for them).
_LEFTOVER_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "weight", "weight_zero_point", "weight_g_idx")


def linear_problems(ckpt: Checkpoint, block: ConvertedBlock, finite) -> list[str]:
    """The linears outside the MoE layers: their three tensors as the block says (dtype, shape,
    ``weight_shape`` value, finite scales) and nothing of the source's form left beside them."""
    out = []
    for module, lin in block.linears.items():
        dtypes = {"weight_packed": ("I32",), "weight_scale": (lin.scale_dtype,), "weight_shape": ("I32", "I64")}
        for field, shape in lin.shapes.items():
            name = f"{module}.{field}"
            ref = ckpt.tensors.get(name)
            if ref is None:
                out.append(f"{name}: missing")
            elif ref.dtype not in dtypes[field] or tuple(ref.shape) != shape:
                out.append(f"{name}: {ref.dtype}{list(ref.shape)}, the block says {dtypes[field][0]}{list(shape)}")
            elif field == "weight_shape" and _shape_value(ckpt, name) != [lin.out_features, lin.in_features]:
                out.append(f"{name}: {_shape_value(ckpt, name)}, the block says "
                           f"{[lin.out_features, lin.in_features]}")
            elif field == "weight_scale" and not finite(ckpt, name):
                out.append(f"{name}: non-finite scales")
        out += [f"{module}.{f}: left beside its compressed-tensors form" for f in _LEFTOVER_FIELDS
                if f"{module}.{f}" in ckpt.tensors]
    unknown = sorted({name for name in ckpt.tensors if name.rpartition(".")[2] in CT_FIELDS
                      and name.rpartition(".")[0] not in block.linears and not _expert_module(name.rpartition(".")[0],
                                                                                               block)})
    out += [f"{name}: a compressed-tensors linear the config block does not describe" for name in unknown[:10]]
    return out


_EXPERT_MODULE = re.compile(r"(?P<prefix>.+)\.experts\.(?P<e>\d{1,6})\.(?P<proj>[^.]+)")


def _expert_module(module: str, block: ConvertedBlock) -> bool:
    """Whether ``module`` is an expert projection of a converted layer (``<prefix>.experts.<e>.<proj>``)."""
    m = _EXPERT_MODULE.fullmatch(module)
    layer = block.layers.get(m["prefix"]) if m else None
    return layer is not None and int(m["e"]) < layer.experts and m["proj"] in layer.source_projections.values()


def config_problems(config: dict, block: ConvertedBlock, broken=()) -> tuple[list[str], str]:
    """Every ``quantization_config`` of a compressed-tensors output (at the top of config.json and
    in each nested model config that holds one, where convert writes it after the source): each
    checked by :func:`_one_config_problems`; the layers in ``broken`` (whose tensors disagree with the
    block, reported elsewhere) are not matched to its targets.  Returns (problems, how they were checked)."""
    found = [("quantization_config", config["quantization_config"])] if "quantization_config" in config else []
    found += [(f"{key}.quantization_config", sub["quantization_config"]) for key in NESTED_CONFIG_KEYS
              if isinstance(sub := config.get(key), dict) and "quantization_config" in sub]
    if not found:
        return ["config.json has no quantization_config"], ""
    problems, how = [], ""
    for where, qc in found:
        these, how = _one_config_problems(qc, block, broken)
        problems += [f"{where}: {p}" for p in these] if len(found) > 1 or where != "quantization_config" else these
    return problems, how


def _one_config_problems(qc: object, block: ConvertedBlock, broken=()) -> tuple[list[str], str]:
    """One ``quantization_config``: compressed-tensors' own pydantic model accepts it (where the
    package is installed), it says weight-only 4-bit symmetric pack-quantized groups and nothing
    else a runtime would apply (activation or KV-cache quantization, sparsity, transforms), and
    its targets and ignore list give every quantized module the group size its tensors hold
    (:func:`_target_problems`)."""
    if not isinstance(qc, dict):
        return [f"expected an object, found {type(qc).__name__}"], ""
    problems = []
    how = "fields read directly"
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        QuantizationConfig = None  # noqa: N806 - the package's class, when installed
    if QuantizationConfig is not None:
        how = "validated by the compressed-tensors package's QuantizationConfig"
        try:
            with warnings.catch_warnings():  # its warnings are not ours to print: the checks below judge
                warnings.simplefilter("ignore")
                QuantizationConfig.model_validate(qc)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, reported
            problems.append(f"compressed-tensors rejects it: {str(exc).splitlines()[0]}")
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != "pack-quantized":
        problems.append(f"quant_method/format {_short(qc.get('quant_method'))}/{_short(qc.get('format'))}, not "
                        "compressed-tensors/pack-quantized")
    if qc.get("quantization_status") != "compressed":
        problems.append(f"quantization_status {_short(qc.get('quantization_status'))}, not 'compressed'")
    problems += [f"{key}: {_short(qc[key])}; a 4-bit weight-only output sets none" for key in _UNSET_TOP
                 if qc.get(key) not in (None, {})]
    groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
    schemes = {}
    for name, grp in groups.items():
        w = grp.get("weights") if isinstance(grp, dict) else None
        if not isinstance(w, dict) or (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) \
                != (4, "int", True, "group"):
            problems.append(f"config_groups.{name[:60]}: not a 4-bit symmetric int group scheme")
            continue
        extra = [f"{key} {_short(grp[key])}" for key in _UNSET_GROUP if grp.get(key) is not None]
        extra += [f"weights.{key} {_short(w[key])}" for key, unset in _UNSET_WEIGHTS.items()
                  if w.get(key, unset) != unset]
        if grp.get("format") not in (None, "pack-quantized"):
            extra.append(f"format {_short(grp['format'])}")
        if extra:
            problems.append(f"config_groups.{name[:60]}: {', '.join(extra)}; the output is weight-only "
                            "pack-quantized")
            continue
        schemes[name] = w.get("group_size")
    wanted = {lyr.w13_group_size for lyr in block.layers.values()} | {lin.group_size for lin in block.linears.values()}
    if wanted - set(schemes.values()):
        problems.append(f"no config group for group size(s) {sorted(wanted - set(schemes.values()))}")
    elif not problems:
        problems += _target_problems(qc, groups, block, broken)
    return problems, how


#: Top-level fields that would make a runtime apply more than the 4-bit weights (unset: None or {}).
_UNSET_TOP = ("sparsity_config", "transform_config", "kv_cache_scheme")
#: Config-group fields that quantize activations (unset: None).
_UNSET_GROUP = ("input_activations", "output_activations")
#: Weight-scheme fields and their one value for static groups in natural row order.
_UNSET_WEIGHTS = {"actorder": None, "dynamic": False, "block_structure": None}
#: The class-name target that matches every linear (vLLM and compressed-tensors match class names).
LINEAR_TARGET = "Linear"


def _short(value: object) -> str:
    return repr(value)[:60]


#: Class names of the modules a runtime quantizes (vLLM's linear, MoE and LM-head classes): it
#: matches a target to them by containment (a name) or by pattern when no target names the module.
RUNTIME_CLASSES = ("Linear", "LinearBase", "ReplicatedLinear", "ColumnParallelLinear", "MergedColumnParallelLinear",
                   "QKVParallelLinear", "RowParallelLinear", "FusedMoE", "SharedFusedMoE", "RoutedExperts",
                   "ParallelLMHead", "VocabParallelEmbedding")


def _class_targets(targets: dict, modules: set[str]) -> list[str]:
    """Targets other than ``Linear`` a runtime could match to module classes rather than names: a
    name without dots that is no 4-bit module of the output, a pattern that matches a class name.  The
    output's own are the class target ``Linear`` and names and patterns of its modules, so
    matching by class is ``Linear``'s alone."""
    out = []
    for t, (compiled, _) in targets.items():
        if t == LINEAR_TARGET:
            continue
        if isinstance(compiled, Regex):
            hit = next((c for c in RUNTIME_CLASSES if compiled.match(c)), None)
            if hit:
                out.append(f"target {t[:80]!r} matches the module class {hit} (a runtime would apply it to every such "
                           "module)")
        elif t not in modules and "." not in t:  # a module path has dots, a class name none
            out.append(f"target {t[:80]!r} names no 4-bit module of this output (a runtime matches it to module "
                       "class names)")
    return out


def _target_problems(qc: dict, groups: dict, block: ConvertedBlock, broken=()) -> list[str]:
    """What a runtime would load each module as, by the config's targets and ignore list, against
    what the tensors hold: every 4-bit module (each expert projection, each linear of the block)
    not ignored and matched first by a group of its group size, every float router ignored.

    Matched as vLLM's compressed-tensors config does: a target maps to the last group naming it;
    a module takes the first target equal to its name or ``re:`` pattern matching it (``re.match``)
    and else the class target ``Linear``; ``ignore`` entries are names (also a name's last
    components) or ``re:`` patterns.  Patterns are untrusted: matched by RE2 (linear time)."""
    budget = Budget()
    errors: list[str] = []

    def compile_(entry: object, where: str):
        if not isinstance(entry, str):
            errors.append(f"{where}: {_short(entry)} is not a string")
            return None
        if not entry.startswith("re:"):
            return entry
        try:
            return Regex(entry[3:], budget)
        except Unsupported as exc:
            errors.append(f"{where}: regular expression {entry[:80]!r}: {exc}")
            return None

    targets: dict[str, tuple[object, int]] = {}
    for gname, grp in groups.items():
        listed = grp.get("targets")
        if not isinstance(listed, list):
            errors.append(f"config_groups.{gname[:60]}.targets: {_short(listed)} is not a list")
            continue
        for t in listed:
            compiled = compile_(t, f"config_groups.{gname[:60]}.targets")
            if compiled is not None:
                targets[t] = (compiled, grp["weights"]["group_size"])
    layers = [layer for prefix, layer in block.layers.items() if prefix not in broken]  # each expert's tensors there
    modules = [(m, layer.w13_group_size) for layer in layers for _, _, m in expert_linear_names(layer)]
    modules += [(m, lin.group_size) for m, lin in block.linears.items()]
    errors += _class_targets(targets, {m for m, _ in modules})
    ignore_list = qc.get("ignore") if qc.get("ignore") is not None else []
    if not isinstance(ignore_list, list):
        return [f"ignore: {_short(ignore_list)} is not a list"]
    ignores = [(e, c) for e in ignore_list if (c := compile_(e, "ignore")) is not None]
    if errors:
        return errors[:5]

    unmatched: list[str] = []

    def hits(compiled, name: str, *, suffix: bool) -> bool:
        if isinstance(compiled, Regex):
            try:
                return compiled.match(name)
            except Unsupported as exc:  # a name this pattern cannot be matched on faithfully
                unmatched.append(f"{name}: {exc}")
                return False
        return name == compiled or (suffix and name.endswith("." + compiled))

    plain_ignores = {c for _, c in ignores if not isinstance(c, Regex)}
    pattern_ignores = [(e, c) for e, c in ignores if isinstance(c, Regex)]

    def ignored(name: str) -> str | None:
        parts = name.split(".")
        named = next((s for s in (".".join(parts[i:]) for i in range(len(parts))) if s in plain_ignores), None)
        return named or next((e for e, c in pattern_ignores if hits(c, name, suffix=True)), None)

    # names looked up, patterns tried in order before the named target's place: a config's many names
    # cost no more than its few patterns (whose matching RE2 bounds)
    order = {t: i for i, t in enumerate(targets)}
    patterns = [(order[t], compiled, size) for t, (compiled, size) in targets.items() if isinstance(compiled, Regex)]

    def group_of(name: str) -> int | None:
        named = order.get(name) if name != LINEAR_TARGET else None
        for place, compiled, size in patterns:
            if named is not None and place > named:
                break
            if hits(compiled, name, suffix=False):
                return size
        if named is not None:
            return targets[name][1]
        return targets[LINEAR_TARGET][1] if LINEAR_TARGET in targets else None

    out = [f"ignore {entry!r} lists {layer.prefix}.experts, a 4-bit MoE layer" for layer in layers
           if (entry := ignored(f"{layer.prefix}.experts"))]
    for module, size in modules:
        entry = ignored(module)
        got = None if entry else group_of(module)
        if entry:
            out.append(f"ignore {entry[:80]!r} lists {module}, a 4-bit linear (a runtime would load it as a float one)")
        elif got is None:
            out.append(f"no config group targets {module}, a 4-bit linear")
        elif got != size:
            out.append(f"{module}: its config group says group_size {_short(got)}, its tensors hold groups of {size}")
        if len(out) > 10:
            return out
    for name in (*block.routers, *block.dequantized_routers):
        if name.endswith(".weight") and not ignored(router := name[: -len(".weight")]):
            out.append(f"{router}: a float router missing from ignore (a runtime would load it as a 4-bit linear)")
    return out + unmatched[:3]
