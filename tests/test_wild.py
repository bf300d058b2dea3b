"""Checkpoints as they exist in the wild: MTP float experts, dynamic rules, old AutoGPTQ
folders, odd sharding, vision towers, pickles.  Each: converted codes bit-exact, pass-through
bytes identical, the per-layer report right, and ``verify --source`` passing."""

from __future__ import annotations

import json

import pytest
from support.helpers import read_tensors
from support.hostile import write_pickle_trap
from support.xpu_decode import check_layer_matches_truth

from gptq2xpu.contract import CONFIG_BLOCK, MANIFEST_NAME

SMALL = dict(hidden=128, moe_intermediate=64, num_experts=4, group_size=32)


def convert_and_check(cli, info, out, *extra, verify=True):
    code, stdout, err = cli("convert", info.path, out, "--json", *extra)
    assert code == 0, err
    summary = json.loads(stdout)
    tensors, src = read_tensors(out), read_tensors(info.path)
    for layer in info.moe_layers:
        if info.expected_kinds[layer.prefix] == "gptq":
            check_layer_matches_truth(out, layer, tensors)
    for name in info.passthrough_names:
        assert tensors[name] == src[name], name
    if verify:
        code, vout, verr = cli("verify", out, "--source", info.path, "--json")
        assert code == 0, vout + verr
    return summary


def kinds(summary):
    return {lyr["prefix"]: (lyr["action"], lyr["kind"]) for lyr in summary["layers"]}


@pytest.mark.parametrize("family,fused", [("qwen3_5_moe", False), ("qwen3_5_moe", True), ("qwen3_next", False),
                                          ("qwen3_next", True), ("deepseek_v3", False), ("glm4_moe", False)])
def test_mtp_float_experts_pass_through(synth, tmp_path, cli, family, fused):
    info = synth(family=family, mtp=True, fused_float_mtp=fused, **SMALL)
    summary = convert_and_check(cli, info, tmp_path / "out")
    mtp = [lyr for lyr in info.moe_layers if lyr.kind == "float"]
    assert len(mtp) == 1
    k = kinds(summary)
    assert k[mtp[0].prefix] == ("passthrough", "float")
    assert all(k[lyr.prefix] == ("convert", "gptq") for lyr in info.moe_layers if lyr.kind == "gptq")
    reason = next(lyr["reason"] for lyr in summary["layers"] if lyr["prefix"] == mtp[0].prefix)
    assert "passed through" in reason
    if family in ("qwen3_5_moe", "qwen3_next"):
        assert mtp[0].prefix.startswith("mtp.") and "MTP" in reason
    else:
        assert mtp[0].prefix.startswith("model.layers.")      # MTP under an ordinary layer name
    block = json.loads((tmp_path / "out" / "config.json").read_text())[CONFIG_BLOCK]
    assert mtp[0].prefix in block["passthrough_layers"]


def test_dynamic_rules_exclude_one_layer_and_override_another(synth, tmp_path, cli):
    rules = {
        r"-:.*layers\.1\.mlp\.experts\..*": {},
        r"+:.*layers\.2\.mlp\.experts\..*": {"group_size": 64},
        r"-:.*mlp\.gate$": {},
    }
    info = synth(family="qwen3_moe", num_layers=3, dynamic=rules, **SMALL)
    summary = convert_and_check(cli, info, tmp_path / "out")
    k = kinds(summary)
    assert k["model.layers.0.mlp"] == ("convert", "gptq")
    assert k["model.layers.1.mlp"] == ("passthrough", "float")
    assert "dynamic -:" in next(lyr["reason"] for lyr in summary["layers"] if lyr["prefix"] == "model.layers.1.mlp")
    assert k["model.layers.2.mlp"] == ("convert", "gptq")
    layers = json.loads((tmp_path / "out" / "config.json").read_text())[CONFIG_BLOCK]["layers"]
    assert layers["model.layers.2.mlp"]["w13_group_size"] == 64 and layers["model.layers.0.mlp"]["w13_group_size"] == 32


def test_rule_that_disagrees_with_the_tensors_is_refused(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", **SMALL)
    cfg = json.loads((info.path / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"+:.*layers\.1\.mlp\.experts\..*": {"group_size": 64}}
    (info.path / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("convert", info.path, tmp_path / "out")
    assert code == 3
    assert "model.layers.1.mlp" in err and "group size 32" in err and "64" in err


def test_8bit_layer_refused_or_kept_unsupported(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", num_layers=2, dynamic={r"+:.*layers\.1\.mlp\.experts\..*": {"bits": 8}}, **SMALL)
    code, _, err = cli("convert", info.path, tmp_path / "refused")
    assert code == 3 and "model.layers.1.mlp" in err and "8-bit" in err and "--keep-unsupported" in err
    assert not (tmp_path / "refused").exists()
    code, out, _ = cli("inspect", info.path, "--json")
    assert code == 3 and any("8-bit" in r for r in json.loads(out)["refusals"])
    code, out, _ = cli("inspect", info.path, "--keep-unsupported", "--json")
    assert code == 0 and kinds(json.loads(out))["model.layers.1.mlp"] == ("passthrough", "unsupported")
    summary = convert_and_check(cli, info, tmp_path / "kept", "--keep-unsupported")
    assert kinds(summary)["model.layers.1.mlp"] == ("passthrough", "unsupported")
    block = json.loads((tmp_path / "kept" / "config.json").read_text())[CONFIG_BLOCK]
    assert "model.layers.1.mlp" in block["unconverted_layers"]
    manifest = json.loads((tmp_path / "kept" / MANIFEST_NAME).read_text())
    assert manifest["layers"]["unconverted"] == ["model.layers.1.mlp"]


def test_layer_mixing_gptq_and_float_experts_is_refused(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", dynamic={r"-:.*layers\.0\.mlp\.experts\.2\..*": {}}, **SMALL)
    assert any(lyr.kind == "mixed" for lyr in info.moe_layers)
    code, _, err = cli("convert", info.path, tmp_path / "out")
    assert code == 3 and "model.layers.0.mlp" in err and "mixes" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("location", ["quantize_config_json", "quantization_config_json", "text_config"])
def test_quantization_config_locations(synth, tmp_path, cli, location):
    info = synth(family="qwen3_moe", config_location=location, **SMALL)
    convert_and_check(cli, info, tmp_path / "out", verify=False)


def test_old_autogptq_single_file(synth, tmp_path, cli):
    info = synth(family="mixtral", old_autogptq=True, **SMALL)
    files = sorted(p.name for p in info.path.iterdir())
    assert "quantize_config.json" in files and any(f.startswith("gptq_model-4bit") for f in files)
    assert "model.safetensors.index.json" not in files
    convert_and_check(cli, info, tmp_path / "out")
    assert (tmp_path / "out" / "quantize_config.json").is_file()


def test_layers_straddling_many_shards_in_any_order(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", num_layers=3, shard_size=20_000, shuffle_index=True, **SMALL)
    assert len(info.files) > 5
    convert_and_check(cli, info, tmp_path / "out")


def test_vision_tower_gate_proj_passes_through(synth, tmp_path, cli):
    info = synth(family="qwen3_5_moe", vision=True, **SMALL)
    src = read_tensors(info.path)
    visual = [n for n in src if n.startswith("model.visual.")]
    assert any(".mlp.gate_proj." in n for n in visual)
    summary = convert_and_check(cli, info, tmp_path / "out")
    assert not any(lyr["prefix"].startswith("model.visual") for lyr in summary["layers"])
    out = read_tensors(tmp_path / "out")
    assert all(out[n] == src[n] for n in visual)


def test_pickles_are_never_loaded(synth, tmp_path, cli):
    marker = tmp_path / "pwned"
    only_pickle = tmp_path / "pickle_only"
    only_pickle.mkdir()
    write_pickle_trap(only_pickle, marker)
    config = {"model_type": "qwen3_moe", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (only_pickle / "config.json").write_text(json.dumps(config))
    for cmd in (("inspect", only_pickle), ("convert", only_pickle, tmp_path / "o1")):
        code, _, err = cli(*cmd)
        assert code == 3 and "pickle" in err
    info = synth(family="qwen3_moe", **SMALL)
    write_pickle_trap(info.path, marker)
    code, _, err = cli("convert", info.path, tmp_path / "o2")
    assert code == 0, err
    assert not (tmp_path / "o2" / "pytorch_model.bin").exists()
    assert cli("verify", tmp_path / "o2", "--source", info.path)[0] == 0
    assert not marker.exists()


def test_inspect_table_lists_every_layer(synth, tmp_path, cli):
    info = synth(family="qwen3_5_moe", mtp=True, num_layers=3, dynamic={r"-:.*layers\.2\.mlp\.experts\..*": {}},
                 **SMALL)
    code, out, err = cli("inspect", info.path, "--json")
    assert code == 0, err
    k = kinds(json.loads(out))
    assert k == {
        "model.language_model.layers.0.mlp": ("convert", "gptq"),
        "model.language_model.layers.1.mlp": ("convert", "gptq"),
        "model.language_model.layers.2.mlp": ("passthrough", "float"),
        "mtp.layers.0.mlp": ("passthrough", "float"),
    }
    code, out, _ = cli("inspect", info.path)
    assert "passthrough" in out and "mtp.layers.0.mlp" in out
