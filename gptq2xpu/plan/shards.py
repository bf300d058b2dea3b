"""Which output tensor goes into which shard, and each shard's exact byte layout."""

from __future__ import annotations

from ..naming import natural_key
from ..safetensors_io import DTYPE_SIZES, ShardLayout
from .model import OutputItem, ShardPlan


def assign_shards(items: list[OutputItem], max_size: int) -> list[ShardPlan]:
    """Fill shards in tensor-name order up to ``max_size`` bytes each (as Hugging Face does), then
    lay each shard out widest dtype first, which keeps every tensor naturally aligned."""
    groups: list[list[OutputItem]] = [[]]
    size = 0
    for it in items:
        if groups[-1] and size + it.tensor.nbytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(it)
        size += it.tensor.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        group.sort(key=lambda it: (-DTYPE_SIZES[it.tensor.dtype], natural_key(it.tensor.name)))
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        shards.append(ShardPlan(name, group, ShardLayout([it.tensor for it in group], {"format": "pt"})))
    return shards
