"""The whole conversion, decided from safetensors headers and configs alone, before a byte is written.

:func:`build_plan` returns a :class:`Plan`: per MoE layer what happens to it (convert, pass through,
refuse) and why, the shapes and group sizes, and every output shard with its exact byte layout.
``inspect`` prints it; ``convert`` executes it (after :func:`gptq2xpu.audit.audit` has checked
what only the data can tell).

    options.py   the user's choices, validated
    layers.py    one MoE layer: convert, pass through or refuse, in short steps
    tp.py        tensor-parallel group sizes and padding
    shards.py    output shards and their byte layout
    model.py     the plan as data (what ``inspect --json`` prints, the config block it writes)
    build.py     the whole checkpoint
"""

from .build import build_plan
from .model import LayerPlan, OutputItem, Plan, ShardPlan
from .options import ConvertOptions

__all__ = ["build_plan", "ConvertOptions", "LayerPlan", "OutputItem", "Plan", "ShardPlan"]
