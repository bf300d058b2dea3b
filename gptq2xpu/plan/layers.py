"""One MoE layer's fate, decided from headers and the config: convert, pass through, or refuse.

:func:`plan_layer` runs short steps in order; a step that finds the layer unconvertible raises
:class:`_Refusal`, which becomes a ``refuse`` entry naming the reason (``inspect`` lists them all;
``convert`` stops at the first).
"""

from __future__ import annotations

from ..contract import FLOAT_DTYPE_NAMES, KERNEL_GROUPS, LayerGeometry
from ..errors import InputError
from ..formats import FORMATS, ProjSpec, format_for_fields
from ..naming import PROJECTION_ROLES, ROLES, ExpertGroup, natural_key
from ..read import Checkpoint, QuantConfig
from ..repack import largest_group
from .model import ExpertFields, LayerPlan
from .options import ConvertOptions
from .runtime_dims import disagreement
from .tp import choose_w2_groups

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_GROUPS_TEXT = "/".join(map(str, sorted(KERNEL_GROUPS)))


class _Refusal(Exception):
    def __init__(self, kind: str, reason: str, **info):
        super().__init__(reason)
        self.kind, self.reason, self.info = kind, reason, info


def plan_layer(ckpt: Checkpoint, group: ExpertGroup, routers: list[str], shared: list[str], quant: QuantConfig,
               options: ConvertOptions, dims: dict | None = None) -> LayerPlan:
    """``dims``: the expert dimensions the config sets (:func:`.runtime_dims.runtime_dims`)."""
    p = group.prefix
    common = dict(routers=sorted(routers, key=natural_key),
                  router_quantized=any(n.endswith(".qweight") for n in routers),
                  shared=sorted(shared, key=natural_key), source_tensors=list(group.names))
    try:
        if group.fused:
            return _fused_float_layer(ckpt, group, quant, common)
        _check_numbering(group)
        role_proj = _roles(group)
        expert_fields, kind = _expert_fields(ckpt, group, role_proj)
        if kind == "float":
            reason = _float_reason(p, quant, f"{p}.experts.0.{role_proj['gate']}", "float experts")
            return LayerPlan(p, "passthrough", "float", reason, experts=len(expert_fields), proj_names=role_proj,
                             **common)
        info = _describe(ckpt, group, role_proj, expert_fields, kind, quant) | common
        _check_config_agrees(group, role_proj, info, quant)
        _check_router_shapes(ckpt, info)
        why = disagreement(dims or {}, info["experts"], info["hidden"], info["intermediate"])
        if why:
            raise _Refusal("broken", why, **info)
        if info["bits"] != 4:
            reason = f"{info['bits']}-bit experts; the XPU kernel runs int4 only"
            if options.keep_unsupported:
                return LayerPlan(p, "passthrough", "unsupported", reason + "; kept unchanged (--keep-unsupported)",
                                 **info)
            raise _Refusal("unsupported", reason + " (pass --keep-unsupported to keep this layer unchanged)", **info)
        src_dtype, dst_dtype = _scale_dtypes(info["specs"], options, info)
        geometry, notes = _geometry(info, src_dtype, dst_dtype, options)
    except _Refusal as r:
        return LayerPlan(p, "refuse", r.kind, r.reason, **(r.info or common))
    return LayerPlan(p, "convert", kind, "quantized experts", source_scale_dtype=src_dtype, scale_dtype=dst_dtype,
                     geometry=geometry, notes=notes, **info)


# ------------------------------------------------------------------------------------- steps


def _fused_float_layer(ckpt, group: ExpertGroup, quant, common) -> LayerPlan:
    """transformers' fused 3-D float experts (``experts.gate_up_proj``): passed through."""
    p = group.prefix
    if group.experts:
        raise _Refusal("broken", "has both fused 3-D expert tensors and per-expert tensors", **common)
    bad = [n for n in group.fused.values() if ckpt.tensors[n].dtype not in FLOAT_DTYPES]
    if bad:
        raise _Refusal("broken", f"fused expert tensor {bad[0]} is not a float tensor", **common)
    e = ckpt.tensors[group.fused.get("gate_up_proj") or next(iter(group.fused.values()))].shape[0]
    reason = _float_reason(p, quant, f"{p}.experts", "fused float experts")
    return LayerPlan(p, "passthrough", "float", reason, experts=e, **common)


def _check_numbering(group: ExpertGroup) -> None:
    """Experts are numbered 0..E-1 without a gap (found without allocating anything per number)."""
    if group.bad_indices:
        number = group.bad_indices[0]
        raise _Refusal("broken", f"expert number {number[:20]}{'...' if len(number) > 20 else ''} is out of range")
    indices = sorted(group.experts)
    if indices[-1] != len(indices) - 1:
        missing = next(i for i, e in enumerate(indices) if i != e)
        raise _Refusal("broken", f"expert {missing} is missing (found experts {indices[0]}..{indices[-1]}, "
                                 f"{len(indices)} in all)")


def _roles(group: ExpertGroup) -> dict[str, str]:
    """role (gate/up/down) -> projection name, from expert 0."""
    proj0 = group.experts[0]
    unknown = sorted(set(proj0) - set(PROJECTION_ROLES))
    if unknown:
        raise _Refusal("broken", f"unknown expert projection {unknown[0]!r} (known: {', '.join(PROJECTION_ROLES)})")
    role_proj: dict[str, str] = {}
    for proj in proj0:
        role = PROJECTION_ROLES[proj]
        if role in role_proj:
            raise _Refusal("broken", f"both {role_proj[role]} and {proj} act as the {role} projection")
        role_proj[role] = proj
    for role in ROLES:
        if role not in role_proj:
            raise _Refusal("broken", f"expert 0 has no {role} projection")
    return role_proj


def _expert_fields(ckpt, group: ExpertGroup, role_proj) -> tuple[ExpertFields, str]:
    """Per expert, role -> field -> tensor name; and the one storage kind all experts share."""
    kinds: dict[str, int] = {}
    count = len(group.experts)
    columns: dict[str, dict[str, list[str | None]]] = {role: {} for role in role_proj}
    projs_wanted = set(role_proj.values())
    for e in range(count):
        projs = group.experts[e]
        if projs.keys() != projs_wanted:
            diff = sorted(projs_wanted ^ set(projs))
            raise _Refusal("broken", f"expert {e} projections differ from expert 0 ({', '.join(diff)})")
        for role, proj in role_proj.items():
            fields = projs[proj]
            kind = _proj_kind(ckpt, fields)
            if kind.startswith("missing"):
                raise _Refusal("broken", f"expert {e} {proj}: {kind}")
            kinds.setdefault(kind, e)
            col = columns[role]
            for f, name in fields.items():
                names = col.get(f)
                if names is None:
                    names = col[f] = [None] * count
                names[e] = name
    if len(kinds) > 1:
        desc = ", ".join(f"{k} (expert {e})" for k, e in kinds.items())
        raise _Refusal("broken", f"mixes expert storage kinds: {desc}; a MoE layer must be all quantized or all float")
    return ExpertFields(count, columns), next(iter(kinds))


def _describe(ckpt, group: ExpertGroup, role_proj, expert_fields, kind: str, quant) -> dict:
    """Dimensions, bits, group sizes and per-role specs from the headers; every expert like expert 0."""
    p = group.prefix
    fmt = FORMATS[kind]
    if (quant.method == "compressed-tensors") != (kind == "compressed-tensors"):
        raise _Refusal("broken", f"experts are stored as {kind} but the config says quant_method {quant.method!r}")
    first = expert_fields[0]
    # K is down's output size, N gate's output size
    k_in_hint, n = fmt.in_out(ckpt, first["gate"])
    _, k = fmt.in_out(ckpt, first["down"])
    if k_in_hint is not None and k_in_hint != k:
        raise _Refusal("broken", f"gate input size {k_in_hint} (g_idx) differs from down output size {k}")
    specs: dict[str, ProjSpec] = {}
    try:
        for role, in_f in (("gate", k), ("up", k), ("down", n)):
            specs[role] = fmt.describe(ckpt, first[role], in_f, f"{p} expert 0 {role_proj[role]}")
    except InputError as exc:
        raise _Refusal("broken", str(exc)) from None
    if specs["up"].out_features != n:
        raise _Refusal("broken", f"up projection has {specs['up'].out_features} outputs but gate has {n}")
    _check_same_shapes(ckpt, expert_fields)
    bits = {s.bits for s in specs.values()}
    if len(bits) > 1:
        raise _Refusal("broken", f"projections have different bit widths {sorted(bits)}")
    return dict(experts=len(expert_fields), hidden=k, intermediate=n, bits=bits.pop(), format=kind,
                proj_names=role_proj, source_groups={r: s.group_size for r, s in specs.items()},
                expert_fields=expert_fields, specs=specs)


def _check_same_shapes(ckpt, expert_fields: ExpertFields) -> None:
    """Every expert's tensors have expert 0's dtypes and shapes (and no field expert 0 lacks)."""
    signature = getattr(ckpt.tensors, "signature", None)
    if signature is not None:  # a compact table: compare whole columns without making entries
        same = True
        for col in expert_fields.columns.values():
            for names in col.values():
                want = signature(names[0]) if names[0] is not None else -1
                if any(n is not None and signature(n) != want for n in names):
                    same = False
        if same:
            return
    first = expert_fields[0]
    for e in range(1, len(expert_fields)):
        fields_e = expert_fields[e]
        for role in ROLES:
            for f, name in fields_e[role].items():
                ref0 = ckpt.tensors.get(first[role].get(f, ""))
                ref = ckpt.tensors[name]
                if ref0 is None or (ref.dtype, ref.shape) != (ref0.dtype, ref0.shape):
                    want = f"{ref0.dtype}{list(ref0.shape)}" if ref0 else "absent"
                    raise _Refusal("broken", f"experts have different shapes: {name} is {ref.dtype}{list(ref.shape)}, "
                                             f"expert 0 has {want}")


def _check_config_agrees(group: ExpertGroup, role_proj, info: dict, quant: QuantConfig) -> None:
    """The config's rules (bits, group size, exclusions) must agree with the tensors."""
    p, bits = group.prefix, info["bits"]
    per_module_rules = quant.dynamic or quant.extra or quant.ignore
    for role in ROLES:
        for e in (range(info["experts"]) if per_module_rules else [0]):
            module = f"{p}.experts.{e}.{role_proj[role]}"
            mq = quant.module(module)
            rule = mq.rule or quant.found_in
            if not mq.quantized:
                raise _Refusal("broken", f"{module} is quantized in the tensors but the config excludes it ({mq.rule})",
                               **info)
            if mq.bits != bits:
                raise _Refusal("broken", f"{module} holds {bits}-bit weights but the config says {mq.bits} bits "
                                         f"({rule})", **info)
            spec = info["specs"][role]
            cfg_g = mq.group_size
            agrees = cfg_g == spec.group_size or (spec.groups == 1 and (cfg_g <= 0 or cfg_g >= spec.in_features))
            if not agrees:
                raise _Refusal("broken", f"{module}: scales imply group size {spec.group_size} but the config says "
                                         f"{cfg_g} ({rule})", **info)


#: The shape each router field must have, from the layer's experts ``e`` and hidden size ``k``
#: (None: that dimension is free): a runtime routes a token over the router's E rows of K inputs, so
#: a router of another shape picks experts the layer lacks or reads past the token.  GPTQ stores a
#: quantized router as [K/8, E] words and [K/g, E] scales; compressed-tensors as [E, K/8], [E, K/g].
_ROUTER_SHAPES = {
    "weight": ("E", "K"),
    "bias": ("E",),
    "e_score_correction_bias": ("E",),
    "qweight": ("K/8", "E"),
    "scales": (None, "E"),
    "weight_packed": ("E", "K/8"),
    "weight_scale": ("E", None),
}


def _check_router_shapes(ckpt, info: dict) -> None:
    """The router fields a runtime routes with agree with the experts (E rows of K inputs)."""
    e, k = info["experts"], info["hidden"]
    sizes = {"E": e, "K": k, "K/8": k // 8, None: None}
    for name in info["routers"]:
        spec = _ROUTER_SHAPES.get(name.rsplit(".", 1)[1])
        if spec is None:
            continue
        want = [sizes[d] for d in spec]
        shape = list(ckpt.tensors[name].shape)
        if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape, strict=True)):
            need = ", ".join("any" if w is None else str(w) for w in want)
            raise _Refusal("broken", f"router tensor {name} has shape {shape} but the layer's {e} experts of hidden "
                                     f"size {k} need [{need}]", **info)


def _scale_dtypes(specs: dict[str, ProjSpec], options: ConvertOptions, info: dict) -> tuple[str, str]:
    """(stored scale dtype, output scale dtype)."""
    src_dtypes = {s.scale_dtype for s in specs.values()}
    if len(src_dtypes) > 1 and options.scale_dtype == "keep":
        raise _Refusal("broken", f"projections store scales as {sorted(src_dtypes)}; pass --scale-dtype float16 or "
                                 "bfloat16", **info)
    src = specs["gate"].scale_dtype if len(src_dtypes) == 1 else "F32"
    dst = src if options.scale_dtype == "keep" else FLOAT_DTYPE_NAMES[options.scale_dtype]
    if dst == "F32":
        raise _Refusal("broken", "scales are float32; the kernel reads scales in the activation dtype: pass "
                                 "--scale-dtype float16 or bfloat16", **info)
    return src, dst


def _geometry(info: dict, src_dtype: str, dst_dtype: str, options: ConvertOptions) -> tuple[LayerGeometry, list[str]]:
    """Group sizes the kernel runs (regrouped losslessly, tensor-parallel aware), padding, notes."""
    k, n, src_groups, specs = info["hidden"], info["intermediate"], info["source_groups"], info["specs"]
    if options.compressed_tensors:
        return _ct_geometry(info, src_dtype, dst_dtype, options)
    g13 = largest_group([src_groups["gate"], src_groups["up"]], divides=[k])
    if g13 is None:
        raise _Refusal("unsupported", f"group size {src_groups['gate']} along K={k} cannot be expressed as groups of "
                                      f"{_GROUPS_TEXT} (the only sizes the kernel runs)", **info)
    tp = options.tp_size
    padded, g2 = choose_w2_groups(n, src_groups["down"], tp)
    if g2 is None:
        split = f" split over {tp} ranks" if tp > 1 else ""
        raise _Refusal("unsupported", f"group size {src_groups['down']} along N={n} cannot be expressed as groups of "
                                      f"{_GROUPS_TEXT}{split}", **info)
    notes = []
    if padded != n:
        notes.append(f"N padded {n} -> {padded} with zero rows so each of {tp} ranks holds whole groups of {g2}")
    for role, g_out in (("gate", g13), ("up", g13), ("down", g2)):
        if src_groups[role] != g_out:
            label = "per-channel" if specs[role].groups == 1 else f"group {src_groups[role]}"
            notes.append(f"{role}: {label} re-expressed as groups of {g_out} (scales repeated, lossless)")
    if src_dtype != dst_dtype:
        notes.append(f"scales cast {src_dtype} -> {dst_dtype}")
    return LayerGeometry(info["experts"], k, n, padded, g13, g2), notes


def _ct_geometry(info: dict, src_dtype: str, dst_dtype: str, options: ConvertOptions
                 ) -> tuple[LayerGeometry, list[str]]:
    """compressed-tensors: one group size for the layer's three projections (vLLM's MoE method
    takes one scheme per layer), the largest the kernel runs that divides every source group, K
    and each rank's share of N; never padding (weight_shape would disagree with the config)."""
    k, n, src_groups, tp = info["hidden"], info["intermediate"], info["source_groups"], options.tp_size
    g = largest_group(list(src_groups.values()), divides=[k, n // tp]) if n % tp == 0 else None
    if g is None:
        split = f", {n // tp if n % tp == 0 else n / tp:g} per rank at --tp-size {tp}" if tp > 1 else ""
        raise _Refusal("unsupported", f"no group size of {_GROUPS_TEXT} divides the source groups "
                                      f"{'/'.join(str(src_groups[r]) for r in ROLES)}, K={k} and N={n}{split} "
                                      "(compressed-tensors output is never zero-padded; --format xpu pads)", **info)
    notes = [f"{role}: {'per-channel' if info['specs'][role].groups == 1 else f'group {src_groups[role]}'} "
             f"re-expressed as groups of {g} (scales repeated, lossless)" for role in ROLES if src_groups[role] != g]
    if src_dtype != dst_dtype:
        notes.append(f"scales cast {src_dtype} -> {dst_dtype}")
    return LayerGeometry(info["experts"], k, n, n, g, g), notes


# ----------------------------------------------------------------------------------- helpers


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
