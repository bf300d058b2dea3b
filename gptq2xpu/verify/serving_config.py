"""What an ``xpu`` output tells a runtime to serve it with: its ``quantization_config``.

The plugin claims a checkpoint whose ``quantization_config`` says ``quant_method: gptq2xpu`` (at
the top of config.json and in each nested model config that holds one) and serves every layer
outside the converted MoE layers with vLLM's own method for ``source_quantization_config``: those
tensors are the source's byte for byte, so they are read right only with the source's own
description (another ``checkpoint_format``, ``sym``, ``group_size`` or ``dynamic`` rule reads them
otherwise, or not at all).  An output written before the method was declared holds the source's
description itself there.  Standalone, the declaration must be the plugin's (or, in such an output,
of the source's method); against the source, what serves those layers must be the source's own
description, as found in the source.
"""

from __future__ import annotations

import json

from ..contract import CONFIG_BLOCK, FORMAT_VERSION
from ..read.quant_config import config_json_descriptions

#: The method the plugin claims and the format it serves (spelled here, not imported from the
#: converter that writes them).
QUANT_METHOD, XPU_FORMAT = "gptq2xpu", "xpu-int4-moe"


def declaration_problems(config: dict) -> list[str]:
    """Every quantization_config of the output declares the plugin's method, this format and a
    source description; one written before the method was declared (it holds none of these) is
    the source's own description, of the method the config block records (standalone)."""
    found = config_json_descriptions(config)
    if not found:
        return ["config.json has no quantization_config (a runtime would load it as a float model)"]
    problems = []
    for where, qc in found:
        if not isinstance(qc, dict):
            problems.append(f"{where}: expected an object, found {type(qc).__name__}")
            continue
        if not _declares_plugin(qc):
            recorded = _recorded_method(config)
            if recorded is None or qc.get("quant_method") != recorded:
                problems.append(f"{where}: quant_method {_short(qc.get('quant_method'))} is neither {QUANT_METHOD!r} "
                                f"nor the source's {_short(recorded)}")
            continue
        said = (qc.get("quant_method"), qc.get("format"), qc.get("format_version"))
        if said != (QUANT_METHOD, XPU_FORMAT, FORMAT_VERSION):
            problems.append(f"{where}: quant_method/format/format_version {_short(said)}, not "
                            f"{(QUANT_METHOD, XPU_FORMAT, FORMAT_VERSION)}")
        if not isinstance(qc.get("source_quantization_config"), dict):
            problems.append(f"{where}.source_quantization_config: {_short(qc.get('source_quantization_config'))} "
                            "is not the source's description")
    return problems


def source_problems(config: dict, source_description: dict) -> list[str]:
    """What serves the layers outside the converted MoE layers is the source's own description
    (compared as JSON, keys in any order): every ``source_quantization_config``, or a declaration
    written before the method was declared, itself."""
    want = _canonical(source_description)
    return [f"{where}{'.source_quantization_config' if _declares_plugin(qc) else ''} differs from the source's "
            "quantization description (a runtime would read the layers it serves from the source's tensors otherwise)"
            for where, qc in config_json_descriptions(config)
            if isinstance(qc, dict) and _canonical(qc.get("source_quantization_config") if _declares_plugin(qc)
                                                   else qc) != want]


def _declares_plugin(qc: dict) -> bool:
    """Whether a quantization_config is (meant as) the plugin's declaration, not a source description."""
    return (qc.get("quant_method") == QUANT_METHOD or qc.get("format") == XPU_FORMAT
            or "source_quantization_config" in qc)


def _recorded_method(config: dict) -> object:
    """The source's quant_method as the config block records it (None: not recorded)."""
    block = config.get(CONFIG_BLOCK)
    source = block.get("source") if isinstance(block, dict) else None
    return source.get("quant_method") if isinstance(source, dict) else None


def _canonical(doc: object) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=True)


def _short(value: object) -> str:
    return repr(value)[:80]
