"""The expert dimensions a runtime builds a MoE layer with: the config.json keys it reads them from.

A runtime (vLLM, transformers) allocates every MoE layer from the config -- ``E`` experts of hidden
size ``K`` and intermediate size ``N`` -- and then loads the tensors into it; a config that says
other sizes than the tensors hold makes the load fail (or reads the wrong rows).  gptq2xpu plans
from the tensors, so each key below that the config sets must say what the tensors say.

Which key holds ``N`` depends on the family: Mixtral's ``intermediate_size`` is its experts' size;
in Qwen, DeepSeek and GLM configs ``intermediate_size`` is the dense MLP's and the experts' is
``moe_intermediate_size``.  The expert count has one name per family (``num_experts`` Qwen,
``num_local_experts`` Mixtral and transformers 5, ``n_routed_experts`` DeepSeek and GLM).
"""

from __future__ import annotations

from ..naming import nested_text_config

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def runtime_dims(config: dict, family: str) -> dict[str, tuple[str, object]]:
    """``{config key: (dimension, value)}`` for each key the config sets (dimension: E, K or N)."""
    cfg = nested_text_config(config)
    n_key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    keys = [(k, "E") for k in EXPERT_COUNT_KEYS] + [("hidden_size", "K"), (n_key, "N")]
    return {key: (dim, cfg[key]) for key, dim in keys if cfg.get(key) is not None}


def disagreement(dims: dict[str, tuple[str, object]], experts: int, hidden: int, intermediate: int) -> str | None:
    """Why the config would make a runtime build this layer with other shapes than its tensors
    have (naming the key, its value and the tensors' value), or None when it agrees."""
    tensors = {"E": experts, "K": hidden, "N": intermediate}
    for key, (dim, value) in dims.items():
        if type(value) is not int:
            return (f"config.json: {key} is {str(value)[:40]!r}, not a whole number (the expert tensors hold "
                    f"{dim} = {tensors[dim]})")
        if value != tensors[dim]:
            return (f"config.json: {key} is {value} but the expert tensors hold {dim} = {tensors[dim]}; a runtime "
                    "building the model from config.json would make other shapes than the tensors have")
    return None
