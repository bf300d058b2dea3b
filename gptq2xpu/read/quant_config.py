"""Find and read the quantization description of a checkpoint.

Where it can be (first found wins):

1. ``config.json`` -> ``quantization_config``
2. a nested model config in ``config.json`` (``text_config``, ``language_config``, ``llm_config``...)
   -> ``quantization_config`` (multimodal wrappers such as Qwen3.5/3.6-MoE)
3. ``quantization_config.json`` (AutoRound writes it)
4. ``quantize_config.json`` (AutoGPTQ / GPTQModel; old repositories have only this)

Per-module rules:

* GPTQModel/AutoRound ``dynamic``: ``{"-:regex": {}}`` excludes matching modules (they stay float);
  ``{"+:regex": {...}}`` or ``{"regex": {...}}`` overrides ``bits``/``group_size``/``sym``/``desc_act``
  for matching modules.  Patterns are matched with ``re.match`` against the module's full name, in
  order, first match wins (as GPTQModel does).
* AutoRound ``extra_config``: ``{module_name_or_regex: {"bits": .., "group_size": ..}}``; ``bits``
  of 16 or more means "not quantized".
* compressed-tensors: ``config_groups[*].weights`` give bits/group/symmetry; ``ignore`` lists
  module names or ``re:`` patterns that stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .paths import Folder
from .regex import Budget, Regex, Unsupported

NESTED_CONFIG_KEYS = ("text_config", "language_config", "llm_config", "thinker_config", "model_config")


@dataclass(frozen=True)
class ModuleQuant:
    """What the config says about one module."""

    quantized: bool
    bits: int
    group_size: int
    sym: bool | None
    desc_act: bool | None
    rule: str | None = None  # the dynamic/extra_config/ignore rule that decided, if any


@dataclass
class QuantConfig:
    method: str                       # "gptq" or "compressed-tensors"
    bits: int
    group_size: int                   # -1 = one group spanning the input
    sym: bool | None
    desc_act: bool | None
    checkpoint_format: str            # "gptq" (v1) or "gptq_v2"; "pack-quantized" for compressed-tensors
    found_in: str                     # e.g. "config.json:quantization_config"
    raw: dict = field(default_factory=dict)
    dynamic: list[tuple[str, str, dict, Regex]] = field(default_factory=list)  # (sign, pattern, overrides, compiled)
    extra: list[tuple[str, dict, Regex | None]] = field(default_factory=list)
    ignore: list[tuple[str, Regex | None]] = field(default_factory=list)

    def module(self, name: str) -> ModuleQuant:
        """The effective settings for module ``name`` (e.g. ``model.layers.3.mlp.experts.7.up_proj``)."""
        bits, group, sym, desc = self.bits, self.group_size, self.sym, self.desc_act
        for pattern, regex in self.ignore:
            if (_hit(regex.match, name, f"ignore {pattern}") if regex
                    else name == pattern or name.endswith("." + pattern)):
                return ModuleQuant(False, bits, group, sym, desc, f"ignore {pattern}")
        for sign, pattern, overrides, regex in self.dynamic:
            rule = f"{sign}:{pattern}" if sign else pattern
            if _hit(regex.match, name, f"dynamic rule {rule}"):
                if sign == "-":
                    return ModuleQuant(False, bits, group, sym, desc, f"dynamic {rule}")
                return _apply(overrides, bits, group, sym, desc, f"dynamic {rule}")
        for key, overrides, regex in self.extra:
            if name == key or name.endswith("." + key) or (
                    regex is not None and _hit(regex.fullmatch, name, f"extra_config {key}")):
                return _apply(overrides, bits, group, sym, desc, f"extra_config {key}")
        return ModuleQuant(True, bits, group, sym, desc, None)

    def describe(self) -> dict:
        return {
            "quant_method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "checkpoint_format": self.checkpoint_format,
            "found_in": self.found_in,
            "dynamic_rules": len(self.dynamic),
        }


def _apply(overrides: dict, bits, group, sym, desc, rule) -> ModuleQuant:
    b = _as_int(overrides.get("bits", bits), "bits", rule)
    g = _as_int(overrides.get("group_size", group), "group_size", rule)
    s = overrides.get("sym", sym)
    d = overrides.get("desc_act", desc)
    return ModuleQuant(b < 16, b, g, s, d, rule)


def _as_int(value, key, where) -> int:
    if type(value) is not int:
        raise InputError(f"{where}: {key} must be an integer, found {value!r}")
    return value


def _hit(match, name: str, rule: str) -> bool:
    try:
        return match(name)
    except Unsupported as exc:
        raise InputError(f"{rule[:120]}: {exc}") from None


def _compile(pattern: str, where: str, budget: Budget) -> Regex:
    """A config pattern, compiled for linear-time matching by RE2 (see :mod:`gptq2xpu.read.regex`);
    all patterns of one config draw on one ``budget``, which bounds the time and memory of matching."""
    try:
        return Regex(pattern, budget)
    except Unsupported as exc:
        raise InputError(f"{where}: regular expression {pattern[:100]!r}: {exc}") from None


def config_json_descriptions(config: dict) -> list[tuple[str, object]]:
    """``(where, value)`` of every ``quantization_config`` key config.json holds (at the top and in each
    nested model config), whatever its value: what a converted output declares, as its checks read it."""
    found = [("quantization_config", config["quantization_config"])] if "quantization_config" in config else []
    return found + [(f"{key}.quantization_config", sub["quantization_config"]) for key in NESTED_CONFIG_KEYS
                    if isinstance(sub := config.get(key), dict) and "quantization_config" in sub]


def _locate(folder: Folder, config: dict) -> tuple[dict, str] | None:
    qc = config.get("quantization_config")
    if qc is not None:
        return qc, "config.json:quantization_config"
    for key in NESTED_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict) and sub.get("quantization_config") is not None:
            return sub["quantization_config"], f"config.json:{key}.quantization_config"
    for name in ("quantization_config.json", "quantize_config.json"):
        if folder.exists(name):
            return folder.read_json(name), name
    return None


def read_quant_config(folder: Folder | Path, config: dict) -> QuantConfig:
    """Read the quantization description; raise InputError if none, or if it is not usable at all."""
    if not isinstance(folder, Folder):
        folder = Folder(Path(folder))
    found = _locate(folder, config)
    if found is None:
        ask = ("; is this a GPTQ checkpoint?" if folder.exists("config.json") else
               "; it has no config.json either: is it the checkpoint's folder?")
        raise InputError(
            f"{folder.root}: no quantization config (looked in config.json quantization_config, nested "
            f"text_config, quantization_config.json, quantize_config.json){ask}"
        )
    raw, where = found
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected an object, found {type(raw).__name__}")
    method = str(raw.get("quant_method", "gptq")).lower()
    if method == "compressed-tensors":
        return _read_compressed_tensors(raw, where)
    if method not in ("gptq", "auto-round", "autoround", "intel/auto-round"):
        raise InputError(f"{where}: quant_method {method!r} is not GPTQ (supported: gptq, compressed-tensors)")
    if method != "gptq" and str(raw.get("packing_format", "auto_gptq")).lower() not in ("auto_gptq", "gptq"):
        raise InputError(f"{where}: auto-round packing_format {raw.get('packing_format')!r} is not GPTQ")
    bits = raw.get("bits", 4)
    group = raw.get("group_size", 128)
    for key, val in (("bits", bits), ("group_size", group)):
        if type(val) is not int:
            raise InputError(f"{where}: {key} must be an integer, found {val!r}")
    fmt = str(raw.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise InputError(f"{where}: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    qc = QuantConfig(
        method="gptq",
        bits=bits,
        group_size=group,
        sym=raw.get("sym"),
        desc_act=raw.get("desc_act"),
        checkpoint_format=fmt,
        found_in=where,
        raw=raw,
    )
    budget = Budget()
    dynamic = raw.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise InputError(f"{where}: 'dynamic' must be an object of pattern -> overrides")
    for key, overrides in dynamic.items():
        sign = ""
        pattern = key
        if key.startswith(("-:", "+:")):
            sign, pattern = key[0], key[2:]
        if not isinstance(overrides, dict):
            raise InputError(f"{where}: dynamic rule {key!r} must map to an object")
        qc.dynamic.append((sign, pattern, overrides, _compile(pattern, f"{where}: dynamic rule {key!r}", budget)))
    extra = raw.get("extra_config") or {}
    if not isinstance(extra, dict):
        raise InputError(f"{where}: 'extra_config' must be an object")
    for key, overrides in extra.items():
        if not isinstance(overrides, dict):
            raise InputError(f"{where}: extra_config {key!r} must map to an object")
        regex = None
        if any(c in key for c in "*[]()+?\\^$|"):
            regex = _compile(key, f"{where}: extra_config {key!r}", budget)
        qc.extra.append((key, overrides, regex))
    return qc


def _read_compressed_tensors(raw: dict, where: str) -> QuantConfig:
    fmt = str(raw.get("format", "")).lower()
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{where}: compressed-tensors config has no config_groups")
    weights = []
    for gname, group in groups.items():
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict):
            raise InputError(f"{where}: config_groups.{gname} has no 'weights' scheme")
        weights.append((gname, w))
    if len(weights) != 1:
        raise InputError(f"{where}: {len(weights)} config_groups; only one weight scheme is supported")
    gname, w = weights[0]
    bits = w.get("num_bits", 4)
    strategy = str(w.get("strategy", "group")).lower()
    group = w.get("group_size")
    if strategy == "channel":
        group = -1
    if type(bits) is not int or type(group) is not int:
        raise InputError(f"{where}: config_groups.{gname}: num_bits/group_size must be integers")
    if str(w.get("type", "int")).lower() != "int":
        raise InputError(f"{where}: config_groups.{gname}: type {w.get('type')!r} is not int")
    actorder = w.get("actorder")
    qc = QuantConfig(
        method="compressed-tensors",
        bits=bits,
        group_size=group,
        sym=w.get("symmetric"),
        desc_act=bool(actorder) if actorder is not None else None,
        checkpoint_format=fmt or "pack-quantized",
        found_in=where,
        raw=raw,
    )
    budget = Budget()
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list):
        raise InputError(f"{where}: 'ignore' must be a list of module names or re: patterns")
    for item in ignore:
        if not isinstance(item, str):
            raise InputError(f"{where}: ignore entries must be strings, found {item!r}")
        if item.startswith("re:"):
            qc.ignore.append((item, _compile(item[3:], f"{where}: ignore {item!r}", budget)))
        else:
            qc.ignore.append((item, None))
    return qc
