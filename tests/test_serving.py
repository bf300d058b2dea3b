"""What ``convert`` writes for serving, without vLLM.

* No file in OUTPUT may still declare the source's GPTQ method: every place a source keeps its
  quantization description (config.json, a nested text_config, quantization_config.json,
  quantize_config.json) says ``quant_method: "gptq2xpu"`` and keeps the source's description
  verbatim inside; where vLLM looks (config.json, then text_config) it finds the gptq2xpu method.
* The model card (README.md) is the source's card, unchanged, followed by one gptq2xpu section;
  without a source card it stands alone.
* Outputs of earlier gptq2xpu versions (config.json still saying gptq) stay verifiable.
* The plugin's vLLM version gate, and the config block's passed-through layers as the plugin reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.planting import convert, reseal, verify_json

from gptq2xpu import __version__
from gptq2xpu.contract import CONFIG_BLOCK, parse_block
from gptq2xpu.errors import InputError
from gptq2xpu.serving import CARD_BEGIN, CARD_END, QUANT_METHOD, check_vllm_version

SMALL = dict(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32, num_layers=2,
             vocab=32)


def declared_methods(folder: Path) -> dict[tuple, str]:
    """``{(file, key, ...): quant_method}`` for every quantization description in ``folder``'s JSON
    files, not looking inside a ``source_quantization_config`` (the source's, kept on purpose) or the
    config block (it documents the conversion, source included; no loader reads it as one)."""
    found = {}

    def walk(doc, where):
        if isinstance(doc, dict):
            if "quant_method" in doc or ("bits" in doc and "group_size" in doc):
                found[where] = str(doc.get("quant_method", "gptq"))
            for k, v in doc.items():
                if k not in ("source_quantization_config", CONFIG_BLOCK):
                    walk(v, (*where, k))

    for p in sorted(folder.glob("*.json")):
        if p.name not in ("gptq2xpu-manifest.json", "model.safetensors.index.json"):
            walk(json.loads(p.read_text()), (p.name,))
    return found


def vllm_sees(folder: Path) -> str | None:
    """The quant_method vLLM 0.32 reads: config.json quantization_config, else text_config's."""
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    return None if qc is None else qc["quant_method"]


@pytest.mark.parametrize("location,family", [
    ("config", "qwen3_moe"),
    ("text_config", "qwen3_5_moe"),
    ("quantization_config_json", "qwen3_moe"),
    ("quantize_config_json", "mixtral"),
    ("old_autogptq", "qwen2_moe"),
])
def test_every_quantization_description_names_the_gptq2xpu_method(synth, tmp_path, location, family):
    spec = dict(SMALL, family=family)
    spec.update(old_autogptq=True) if location == "old_autogptq" else spec.update(config_location=location)
    info = synth(**spec)
    src_methods = declared_methods(info.path)
    assert src_methods and set(src_methods.values()) == {"gptq"}  # the check sees the source's
    out = tmp_path / "out"
    convert(info.path, out)
    methods = declared_methods(out)
    assert methods and set(methods.values()) == {QUANT_METHOD}, methods
    assert vllm_sees(out) == QUANT_METHOD
    # wherever the source kept one, the output has ours there (and config.json always has one)
    assert set(methods) >= set(src_methods) and any(w[0] == "config.json" for w in methods)
    # the source's description, verbatim, inside every one of ours
    for where in methods:
        doc = json.loads((out / where[0]).read_text())
        for key in where[1:]:
            doc = doc[key]
        assert doc["source_quantization_config"] == info.quant_config, where
        assert doc["format_version"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert CONFIG_BLOCK in cfg
    code, report = verify_json(out, "--source", info.path, "--no-numeric")
    assert code == 0, report


def test_model_card_keeps_the_source_card_and_adds_one_section(synth, tmp_path):
    info = synth(**SMALL, mtp=False, dynamic={r"-:.*layers\.1\.mlp\.experts\..*": {}})
    out = tmp_path / "out"
    convert(info.path, out, "--tp-size", "2")
    src_card = (info.path / "README.md").read_bytes()
    card = (out / "README.md").read_bytes()
    assert card.startswith(src_card) and card.startswith(b"---\n")  # front matter stays first
    text = card[len(src_card):].decode("utf-8")
    assert text.count(CARD_BEGIN) == 1 and text.count(CARD_END) == 1
    section = text[text.index(CARD_BEGIN):text.index(CARD_END)]
    for needle in (f"# gptq2xpu {__version__}: clone its repository, then pip install -e .",
                   f"# gptq2xpu {__version__} in vLLM's Python environment",
                   "python -m vllm.entrypoints.openai.api_server --model . --tensor-parallel-size 2",
                   "vllm serve . --tensor-parallel-size 2", 'LLM(model=".", tensor_parallel_size=2)',
                   "- vLLM 0.32.x: whole engine on CPU", "- vLLM 0.34.x: MoE layer on the XPU branch",
                   "gptq2xpu verify .", f"gptq2xpu verify . --source path/to/{info.path.name}",
                   "`model.layers.0.mlp`", "| 4 | 128 | 64 | 32 / 32 | float16 |",
                   "Passed through unchanged (float experts): `model.layers.1.mlp`",
                   "Unknown quantization method: gptq2xpu"):
        assert needle in section, needle
    manifest = json.loads((out / "gptq2xpu-manifest.json").read_text())
    assert "README.md" in manifest["files"]
    assert verify_json(out)[0] == 0


def test_model_card_without_a_source_card(synth, tmp_path):
    info = synth(**SMALL)
    (info.path / "README.md").unlink()
    out = tmp_path / "out"
    convert(info.path, out)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and card.count(CARD_BEGIN) == 1 and card.rstrip().endswith(CARD_END)
    # no tensor-parallel flag for a --tp-size 1 conversion
    assert "python -m vllm.entrypoints.openai.api_server --model .   # or: vllm serve .\n" in card
    assert verify_json(out)[0] == 0


def test_outputs_written_before_the_method_was_declared_stay_verifiable(synth, tmp_path):
    """Such an output's config.json still holds the source's GPTQ description."""
    info = synth(**SMALL)
    out = tmp_path / "out"
    convert(info.path, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = info.quant_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    assert verify_json(out)[0] != 0  # the manifest notices the rewrite ...
    reseal(out, "config.json")
    assert verify_json(out)[0] == 0  # ... and nothing else depends on the quantization_config
    code, report = verify_json(out, "--source", info.path, "--no-numeric")
    assert code == 0, report


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1+cpu", "0.32.2.dev7+g0123abc", "0.33.0", "0.34.0", "0.34.1+xpu"])
def test_supported_vllm_versions(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "1.32.0", "nightly"])
def test_other_vllm_versions_are_refused_with_one_line(version):
    with pytest.raises(InputError) as err:
        check_vllm_version(version)
    msg = str(err.value)
    assert "\n" not in msg and f"not vLLM {version}" in msg and "0.32.x, 0.33.x, 0.34.x only" in msg


def test_block_lists_passed_through_and_unconverted_layers(synth, tmp_path):
    info = synth(**dict(SMALL, num_layers=3), dynamic={r"-:.*layers\.1\.mlp\.experts\..*": {},
                                                       r"+:.*layers\.2\.mlp\.experts\..*": {"bits": 8}})
    out = tmp_path / "out"
    convert(info.path, out, "--keep-unsupported")
    block = parse_block(json.loads((out / "config.json").read_text())[CONFIG_BLOCK])
    assert set(block.layers) == {"model.layers.0.mlp"}
    entry = block.layers["model.layers.0.mlp"]  # what the source was, as the block records it
    assert (entry.source_format, entry.source_projections, entry.source_group_size) == (
        "gptq", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, {"gate": 32, "up": 32, "down": 32})
    assert block.passthrough == {"model.layers.1.mlp": "float"}
    assert block.unconverted == ("model.layers.2.mlp",)


@pytest.mark.parametrize("bad", [
    {"passthrough_layers": []},
    {"passthrough_layers": {"model..x": {"kind": "float"}}},
    {"passthrough_layers": {"model.layers.1.mlp": {"reason": "no kind"}}},
    {"unconverted_layers": {"../etc": {"kind": "unsupported"}}},
])
def test_block_with_bad_passthrough_entries_is_refused(synth, tmp_path, bad):
    info = synth(**SMALL)
    out = tmp_path / "out"
    convert(info.path, out)
    doc = json.loads((out / "config.json").read_text())[CONFIG_BLOCK]
    parse_block(doc)
    doc.update(bad)
    with pytest.raises(InputError):
        parse_block(doc)
