"""Helpers of the compressed-tensors output tests: planted defects in an output, and a GPTQ source
regrouped by hand (independently of the converter).  Edits go through safetensors (``tests/support/vllm_engine.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from support.vllm_engine import _save, _tensors, copy_model

CT_DEFECTS = ("expert_bytes_changed", "gate_up_swapped", "scale_changed")


def plant_ct_defect(out: Path, kind: str, expert: str) -> None:
    """One defect in one expert of a compressed-tensors output (``expert``: ``<prefix>.experts.<e>``)."""
    t = _tensors(out)
    gate, up = f"{expert}.gate_proj", f"{expert}.up_proj"
    if kind == "expert_bytes_changed":  # every nibble of the first packed word of each row of gate
        w = t[f"{gate}.weight_packed"].clone()
        w[:, 0] ^= 0x11111111
        t[f"{gate}.weight_packed"] = w
    elif kind == "gate_up_swapped":
        for f in ("weight_packed", "weight_scale"):
            t[f"{gate}.{f}"], t[f"{up}.{f}"] = t[f"{up}.{f}"], t[f"{gate}.{f}"]
    elif kind == "scale_changed":  # the first group's scale of a quarter of down's rows, tripled
        s = t[f"{expert}.down_proj.weight_scale"].clone()
        s[: s.shape[0] // 4, 0] *= 3
        t[f"{expert}.down_proj.weight_scale"] = s
    else:  # pragma: no cover
        raise ValueError(kind)
    _save(out, t)


def regroup_gptq(src: Path, dst: Path, group: int) -> Path:
    """``src`` with every GPTQ linear's groups re-expressed as groups of ``group``: each scale and
    zero-point row repeated, ``g_idx`` recomputed; the weights are the same numbers."""
    copy_model(src, dst)
    t = _tensors(dst)
    for name in [n for n in t if n.endswith(".qweight")]:
        m = name[: -len(".qweight")]
        k = t[name].shape[0] * 8
        rep = (k // t[f"{m}.scales"].shape[0]) // group
        t[f"{m}.scales"] = t[f"{m}.scales"].repeat_interleave(rep, dim=0).contiguous()
        t[f"{m}.qzeros"] = t[f"{m}.qzeros"].repeat_interleave(rep, dim=0).contiguous()
        if f"{m}.g_idx" in t:
            t[f"{m}.g_idx"] = (torch.arange(k, dtype=torch.int32) // group).contiguous()
    _save(dst, t)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = group
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
