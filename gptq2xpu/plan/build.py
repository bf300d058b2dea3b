"""Build the :class:`~gptq2xpu.plan.model.Plan` of a whole checkpoint from its headers and configs."""

from __future__ import annotations

import sys

from ..contract import CONFIG_BLOCK, FLOAT_DTYPE_NAMES, W13_QWEIGHT
from ..errors import InputError
from ..naming import classify, detect_family, natural_key, nested_text_config, routing_params
from ..read import Checkpoint, read_quant_config
from .layers import plan_layer
from .model import LayerPlan, Plan
from .options import ConvertOptions
from .runtime_dims import runtime_dims
from .shards import assign_shards


def build_plan(ckpt: Checkpoint, options: ConvertOptions | None = None) -> Plan:
    """Decide the conversion from headers alone.  Raises InputError for checkpoint-wide problems;
    per-layer problems become ``refuse`` entries (see :meth:`Plan.raise_refusals`)."""
    options = options or ConvertOptions()
    if sys.byteorder != "little":
        raise InputError("this host is big-endian; the int32 -> uint8 reinterpretation needs a little-endian host")
    _refuse_converted(ckpt)
    quant = read_quant_config(ckpt.folder, ckpt.config)
    if quant.method == "gptq" and quant.bits != 4 and not quant.dynamic and not quant.extra:
        raise InputError(f"{quant.found_in}: bits {quant.bits} is not supported; the XPU kernel runs 4-bit "
                         "weights only")
    tmap = classify(ckpt.tensors)
    if not tmap.moe:
        raise InputError(f"{ckpt.origin}: no MoE layers found (no '<prefix>.experts.<e>.<proj>' tensors); "
                         "nothing to convert")
    family = detect_family(ckpt.config, ckpt.tensors)
    dims = runtime_dims(ckpt.config, family)
    layers = [plan_layer(ckpt, tmap.moe[p], tmap.routers.get(p, []), tmap.shared.get(p, []), quant, options, dims)
              for p in sorted(tmap.moe, key=natural_key)]
    if not any(lyr.converts for lyr in layers) and not any(lyr.action == "refuse" for lyr in layers):
        raise InputError(f"{ckpt.origin}: no quantized MoE layers to convert (every MoE layer is float or kept "
                         "unchanged)")
    from ..outputs import output_format  # here: the output formats build on plan.model (no import cycle)

    items, passthrough, linears, ignore = output_format(options.output_format).items(ckpt, layers, options, quant)
    return Plan(
        origin=ckpt.origin,
        family=family,
        quant=quant,
        options=options,
        layers=layers,
        passthrough=sorted(passthrough, key=natural_key),
        shards=assign_shards(items, options.max_shard_size),
        bytes_in=ckpt.total_bytes,
        warnings=[*ckpt.warnings, *_router_warnings(layers, options)],
        routing=routing_params(ckpt.config, family, max((lyr.experts for lyr in layers), default=1)).to_dict(),
        provenance=dict(ckpt.provenance),
        linears=linears,
        ignore=ignore,
    )


def _refuse_converted(ckpt: Checkpoint) -> None:
    """A gptq2xpu output given as SOURCE: say so (it would otherwise read as "no MoE layers")."""
    fused = next((n for n in ckpt.tensors if n.endswith(f".experts.{W13_QWEIGHT}")), None)
    if CONFIG_BLOCK in ckpt.config or fused:
        why = (f'its config.json has a "{CONFIG_BLOCK}" block' if CONFIG_BLOCK in ckpt.config
               else f"it holds fused expert tensors such as {fused}")
        raise InputError(f"{ckpt.origin}: already converted by gptq2xpu ({why}); give the GPTQ checkpoint it "
                         f"was made from, or check this one with `gptq2xpu verify {ckpt.origin}`")


def _router_warnings(layers: list[LayerPlan], options: ConvertOptions) -> list[str]:
    warnings = []
    for layer in layers:
        if not layer.routers and layer.action != "refuse":
            warnings.append(f"{layer.prefix}: no router tensor ({layer.prefix}.gate.*) found")
        if layer.router_quantized and layer.converts:
            note = ("dequantized to a float weight (--dequantize-router)" if options.dequantize_router
                    else "passed through unchanged (--dequantize-router writes it as a float weight)")
            warnings.append(f"{layer.prefix}.gate: router is GPTQ-quantized in the source; {note}")
    return warnings


def float_dtype(config: dict) -> str:
    """The model's float dtype (a dequantized router is written in it)."""
    cfg = nested_text_config(config)
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return FLOAT_DTYPE_NAMES.get(name, "BF16")
