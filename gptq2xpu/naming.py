"""Which tensor is what: MoE experts, routers, shared experts, and everything else.

Experts are found by name, generically: ``<prefix>.experts.<e>.<proj>.<field>`` where ``<prefix>``
is the module that holds the experts (``model.layers.3.mlp``, ``model.layers.0.block_sparse_moe``,
``model.language_model.layers.5.mlp``, ``mtp.layers.0.mlp``...).  ``<proj>`` maps to a role through
:data:`PROJECTION_ROLES`; transformers' fused float experts (``<prefix>.experts.gate_up_proj``,
``<prefix>.experts.down_proj``) are recognised too.

What can never be an expert, by construction of the pattern and checked explicitly for reporting:

* the router ``<prefix>.gate.*`` (any field: ``weight``, ``qweight``, ``e_score_correction_bias``);
* shared experts ``<prefix>.shared_expert.*`` / ``<prefix>.shared_experts.*`` and
  ``<prefix>.shared_expert_gate.*``;
* a dense layer's ``mlp.gate_proj`` (no ``experts.<e>`` component), vision towers, attention.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

from .errors import InputError

#: Source projection name -> role.  gate and up form w13 (gate rows first), down is w2.
PROJECTION_ROLES: dict[str, str] = {
    "gate_proj": "gate",  # Qwen2/3/3.5/3.6-MoE, Qwen3-Next, DeepSeek-V2/V3, GLM-4.5
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",  # Mixtral (block_sparse_moe): w1 = gate, w3 = up, w2 = down
    "w3": "up",
    "w2": "down",
}
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str


#: Model families gptq2xpu knows by config.  Detection only labels the report; expert discovery is
#: name-driven and works for any family using the patterns above.
FAMILIES: tuple[Family, ...] = (
    Family("qwen2_moe", ("qwen2_moe",), "Qwen2-MoE / Qwen1.5-MoE (mlp.experts, shared_expert + shared_expert_gate)"),
    Family("qwen3_moe", ("qwen3_moe", "qwen3_vl_moe", "qwen3_vl_moe_text"),
           "Qwen3-MoE (mlp.experts, no shared expert)"),
    Family("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_6_moe", "qwen3_6_moe_text"),
           "Qwen3.5/3.6-MoE (model.language_model.*, shared_expert, MTP layers)"),
    Family("qwen3_next", ("qwen3_next",), "Qwen3-Next (shared_expert + shared_expert_gate, MTP layers)"),
    Family("mixtral", ("mixtral",), "Mixtral (block_sparse_moe, w1/w3/w2)"),
    Family("deepseek_v2", ("deepseek_v2",), "DeepSeek-V2 (dense first layers, shared_experts)"),
    Family("deepseek_v3", ("deepseek_v3", "kimi_k2"),
           "DeepSeek-V3 (dense first layers, shared_experts, e_score_correction_bias)"),
    Family("glm4_moe", ("glm4_moe",), "GLM-4.5 MoE (dense first layers, shared_experts, e_score_correction_bias)"),
)

MAX_EXPERT_DIGITS = 9
#: ``\d`` on purpose: any Unicode decimal digit is recognised as an expert number, so that a
#: spelling :func:`int` would also read (``01``, Arabic-Indic digits) is found and refused, not
#: passed through beside the expert it duplicates.
_EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<field>[^.]+)$")
_CANONICAL_NUMBER = re.compile(r"0|[1-9][0-9]*")
_FUSED = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<what>gate_up_proj|down_proj|gate_proj|up_proj)"
                    r"(?P<suffix>_bias|_blocks|_scales)?$")
_ROUTER = re.compile(r"^(?P<prefix>.+)\.(gate|router)\.(?P<field>[^.]+)$")
_SHARED = re.compile(r"^(?P<prefix>.+)\.(shared_experts?|shared_expert_gate)\.")


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``.

    Digit runs compare by value without becoming ints (a name may hold a 5000-digit number):
    as (length without leading zeros, digits)."""
    parts = _DIGITS.split(name)
    if any(map(str.isdigit, parts[0::2])):  # digit-like characters that are not decimal digits
        return tuple((len(p.lstrip("0")), p.lstrip("0")) if p.isdigit() else p for p in parts)
    parts[1::2] = [(len(d), d) for d in (p.lstrip("0") for p in parts[1::2])]
    return tuple(parts)


def nested_text_config(config: dict) -> dict:
    """The dict that holds the language model's parameters (``text_config`` for wrappers)."""
    for key in ("text_config", "language_config", "llm_config", "thinker_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and ("hidden_size" in sub or "num_hidden_layers" in sub):
            return sub
    return config


def detect_family(config: dict, names) -> str:
    """Label the checkpoint's family from its config (model_type), else from tensor names."""
    types = {str(config.get("model_type", "")).lower(), str(nested_text_config(config).get("model_type", "")).lower()}
    for fam in FAMILIES:
        if types & set(fam.model_types):
            return fam.name
    names = list(names)
    if any(".block_sparse_moe.experts." in n for n in names):
        return "mixtral"
    if any(".shared_experts." in n for n in names):
        return "deepseek-like"
    if any(".experts." in n for n in names):
        return "generic-moe"
    return "unknown"


@dataclass
class RoutingParams:
    """How the model routes tokens (used by the reference MoE in ``verify``)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    routed_scaling_factor: float = 1.0

    def to_dict(self) -> dict:
        return dict(top_k=self.top_k, scoring=self.scoring, renormalize=self.renormalize,
                    routed_scaling_factor=self.routed_scaling_factor)


def routing_params(config: dict, family: str, num_experts: int) -> RoutingParams:
    """How the config says tokens are routed; InputError naming the key when a value is unusable."""
    cfg = nested_text_config(config)
    top_k = None
    for key in ("num_experts_per_tok", "moe_top_k", "top_k"):
        value = cfg.get(key)
        if value is None or value == 0:
            continue
        if type(value) is not int or value < 1:
            raise InputError(f"config.json: {key} must be a positive integer, found {_show(value)}")
        top_k = value
        break
    if top_k is None:
        top_k = min(2, num_experts)
    scoring = cfg.get("scoring_func", "sigmoid" if family in ("deepseek_v3", "glm4_moe") else "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise InputError(f"config.json: scoring_func {_show(scoring)} is not softmax or sigmoid")
    renorm = cfg.get("norm_topk_prob", family not in ("qwen2_moe", "deepseek_v2"))
    if type(renorm) is not bool:
        raise InputError(f"config.json: norm_topk_prob must be true or false, found {_show(renorm)}")
    scale = cfg.get("routed_scaling_factor", 1.0) if family in ("deepseek_v2", "deepseek_v3", "glm4_moe") else 1.0
    if scale is None:
        scale = 1.0
    if type(scale) not in (int, float) or not math.isfinite(scale) or scale <= 0:
        raise InputError(f"config.json: routed_scaling_factor must be a positive number, found {_show(scale)}")
    return RoutingParams(min(top_k, num_experts), scoring, renorm, float(scale))


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ExpertGroup:
    """All tensors under one ``<prefix>.experts``."""

    prefix: str
    experts: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)  # e -> proj -> field -> tensor name
    fused: dict[str, str] = field(default_factory=dict)  # fused 3-D float tensors: what -> tensor name
    names: list[str] = field(default_factory=list)  # every tensor under <prefix>.experts, in checkpoint order
    bad_indices: list[str] = field(default_factory=list)  # expert numbers too long to be real


@dataclass
class TensorMap:
    """The checkpoint's tensor names sorted into the roles conversion cares about (the rest passes through)."""

    moe: dict[str, ExpertGroup]
    routers: dict[str, list[str]]      # MoE prefix -> router tensor names
    shared: dict[str, list[str]]       # MoE prefix -> shared expert / shared gate tensor names


def classify(names) -> TensorMap:
    """Sort tensor names into expert groups, routers, shared experts and the rest.

    Expert numbers must be written as canonical ASCII decimals: every number then has one
    spelling, so two tensor sets can never claim the same expert (one would be dropped)."""
    moe: dict[str, ExpertGroup] = {}
    rest = []
    odd: list[tuple[str, re.Match]] = []
    for name in names:
        m = _EXPERT.match(name)
        if m:
            prefix = m["prefix"]
            grp = moe.get(prefix) or moe.setdefault(prefix, ExpertGroup(prefix))
            if not _CANONICAL_NUMBER.fullmatch(m["e"]):
                odd.append((name, m))
            elif len(m["e"]) > MAX_EXPERT_DIGITS:
                grp.bad_indices.append(m["e"])
            else:
                # projection and field names repeat for every expert: one string each, not one per tensor
                proj, fld = sys.intern(m["proj"]), sys.intern(m["field"])
                grp.experts.setdefault(int(m["e"]), {}).setdefault(proj, {})[fld] = name
            grp.names.append(name)
            continue
        m = _FUSED.match(name)
        if m:
            grp = moe.setdefault(m["prefix"], ExpertGroup(m["prefix"]))
            grp.fused[m["what"] + (m["suffix"] or "")] = name
            grp.names.append(name)
            continue
        rest.append(name)
    if odd:
        _refuse_number(moe, *odd[0])
    routers: dict[str, list[str]] = {}
    shared: dict[str, list[str]] = {}
    for name in rest:
        m = _ROUTER.match(name)
        if m and m["prefix"] in moe:
            routers.setdefault(m["prefix"], []).append(name)
            continue
        m = _SHARED.match(name)
        if m and m["prefix"] in moe:
            shared.setdefault(m["prefix"], []).append(name)
    return TensorMap(moe=moe, routers=routers, shared=shared)


def _refuse_number(moe: dict[str, ExpertGroup], name: str, m: re.Match) -> None:
    """InputError for a tensor whose expert number is not canonical, naming the tensor that holds
    the same number canonically when there is one."""
    number = m["e"]
    value = int(number) if len(number) <= 2 * MAX_EXPERT_DIGITS else None
    twin = moe[m["prefix"]].experts.get(value, {}).get(m["proj"], {}).get(m["field"])
    if twin is not None:
        raise InputError(f"tensors {_show(name, 200)} and {_show(twin, 200)} both hold expert {value} of "
                         f"{_show(m['prefix'], 200)}; expert numbers must be written 0, 1, 2... (ASCII digits, "
                         "no leading zero)")
    raise InputError(f"tensor {_show(name, 200)}: expert number {_show(number)} is not written as a plain decimal "
                     "(ASCII digits 0-9, no leading zero)")
