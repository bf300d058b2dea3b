"""A compressed-tensors output's ``quantization_config``, judged as a runtime reads it.

vLLM (and compressed-tensors itself) read which scheme each module is loaded with from the config:
its config groups' weight schemes, their targets and the ignore list.  A config that parses but
says something else than the tensors hold (activation or KV-cache quantization, sparsity,
transforms, act-order; a 4-bit linear ignored or targeted with another group size; a router not
ignored) makes a runtime load the tensors wrongly, or not at all.  Written from the format's
definition and vLLM's matching rules, independently of the converter (nothing here imports it).
"""

from __future__ import annotations

import warnings

from ..contract import ConvertedBlock, expert_linear_names
from ..read.quant_config import config_json_descriptions
from ..read.regex import Budget, Regex, Unsupported


def config_problems(config: dict, block: ConvertedBlock, broken=()) -> tuple[list[str], str]:
    """Every ``quantization_config`` of a compressed-tensors output (at the top of config.json and
    in each nested model config that holds one, where convert writes it after the source): each
    checked by :func:`_one_config_problems`; the layers in ``broken`` (whose tensors disagree with the
    block, reported elsewhere) are not matched to its targets.  Returns (problems, how they were checked)."""
    found = config_json_descriptions(config)
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
