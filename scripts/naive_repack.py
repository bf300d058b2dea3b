#!/usr/bin/env python3
"""The pipeline a user would write without gptq2xpu: the baseline ``scripts/bench.py`` compares with.

Load every shard whole with ``safetensors.torch.load_file``, stack each MoE layer's experts with
torch, transpose the GPTQ words ``[E, K/8, N]`` int32 to ``[E, N, K/8]`` and view them as uint8
(``[E, N, K/2]``), build the four XPU tensors per layer, drop the per-expert tensors (qzeros and
g_idx included) and save the whole result with ``safetensors.torch.save_file``.  Small side files
(config, tokenizer...) are copied unchanged.

It handles what the benchmark generates (symmetric GPTQ, natural row order, one group size that
the kernel runs, scales kept in their dtype) and nothing else: no checks, no streaming, no
manifest.  For that case its expert tensors are byte-identical to ``gptq2xpu convert``'s, which
``bench.py`` checks.

    python scripts/naive_repack.py SRC_FOLDER OUT_FOLDER
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXPERT = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
                    r"\.(?P<field>\w+)$")
ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def main(src: Path, out: Path) -> None:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:                       # the whole model in memory
        state.update(load_file(str(src / shard)))

    layers: dict[str, dict[tuple[int, str], dict[str, str]]] = {}
    for name in list(state):
        m = EXPERT.match(name)
        if m:
            layers.setdefault(m["prefix"], {}).setdefault((int(m["e"]), ROLE[m["proj"]]), {})[m["field"]] = name

    result: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for prefix, fields in layers.items():
        experts = 1 + max(e for e, _ in fields)

        def stack(role: str, field: str, fields=fields, experts=experts) -> torch.Tensor:
            return torch.stack([state[fields[(e, role)][field]] for e in range(experts)])

        gate, up, down = (stack(r, "qweight") for r in ("gate", "up", "down"))     # [E, in/8, out] int32
        w13 = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=1).contiguous()   # [E, 2N, K/8]
        w2 = down.transpose(1, 2).contiguous()                                           # [E, K, N/8]
        s_gate, s_up, s_down = (stack(r, "scales") for r in ("gate", "up", "down"))   # [E, in/g, out]
        result[f"{prefix}.experts.w13_qweight"] = w13.view(torch.uint8)                   # [E, 2N, K/2]
        w13_scales = torch.cat([s_gate.transpose(1, 2), s_up.transpose(1, 2)], dim=1).contiguous()
        result[f"{prefix}.experts.w13_scales"] = w13_scales
        result[f"{prefix}.experts.w2_qweight"] = w2.view(torch.uint8)                     # [E, K, N/2]
        result[f"{prefix}.experts.w2_scales"] = s_down.transpose(1, 2).contiguous()
        for f in fields.values():
            consumed.update(f.values())
        del gate, up, down, w13, w2, s_gate, s_up, s_down
    for name, t in state.items():
        if name not in consumed:
            result[name] = t

    out.mkdir(parents=True, exist_ok=False)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copyfile(p, out / p.name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
