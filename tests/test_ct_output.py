"""``convert --format compressed-tensors``: what is written, judged by the compressed-tensors
package itself (its pack/unpack and its pydantic config models), by ``verify``, and by the
project's independent readers; options that cannot apply are usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from support.helpers import FIXTURE, cli
from support.helpers import read_tensor as _read_file_tensor
from support.planting import patch_tensor, reseal, verify_json

from gptq2xpu.testing.synth import make_checkpoint

CT = ("--format", "compressed-tensors")
BASE = dict(family="qwen2_moe", hidden=256, moe_intermediate=128, num_experts=4, top_k=2, num_layers=2,
            vocab=64, group_size=64, seed=5)


SHARD = "model.safetensors"


def read_tensor(folder, name):
    return _read_file_tensor(folder / SHARD, name)


def convert(src, out, *extra):
    code, _, err = cli("convert", str(src), str(out), *CT, *extra)
    assert code == 0, err
    return out


def config(out) -> dict:
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    info = make_checkpoint(root / "src", **BASE)
    return info, convert(info.path, root / "out")


def test_weight_packed_is_gptq_qweight_transposed_as_compressed_tensors_packs_it(qwen2):
    """The synthetic source's ground-truth codes, packed by compressed-tensors' own
    ``pack_to_int32`` (value - 8 per code, packed along K), are the written ``weight_packed``;
    and they are the GPTQ ``qweight`` transposed; ``unpack_from_int32`` gives the codes back."""
    info, out = qwen2
    layer = next(lyr for lyr in info.moe_layers if lyr.prefix == "model.layers.1.mlp")
    for e in (0, 3):
        for role, proj in (("gate", "gate_proj"), ("down", "down_proj")):
            module = f"model.layers.1.mlp.experts.{e}.{proj}"
            codes = torch.from_numpy(layer.codes[role][e].astype(np.int64) - 8)        # [N, K], -8..7
            packed = pack_to_int32(codes.to(torch.int8), num_bits=4)
            written = read_tensor(out, f"{module}.weight_packed")
            assert torch.equal(packed, torch.from_numpy(np.ascontiguousarray(written)))
            assert np.array_equal(written, read_tensor(info.path, f"{module}.qweight").T)
            back = unpack_from_int32(torch.from_numpy(np.ascontiguousarray(written)), 4, codes.shape)
            assert torch.equal(back.long(), codes)
            assert list(read_tensor(out, f"{module}.weight_shape")) == list(codes.shape)


def test_quantization_config_is_what_compressed_tensors_accepts(qwen2):
    _, out = qwen2
    qc = config(out)["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed"
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    w = group.weights
    assert (w.num_bits, w.type, w.symmetric, w.group_size, w.strategy) == (4, "int", True, 64, "group")
    # routers, the shared expert's gate and lm_head are float: ignored; the quantized ones are not
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= set(parsed.ignore)
    assert not any("proj" in n for n in parsed.ignore)
    # the checker has teeth: a wrong strategy is rejected
    bad = json.loads(json.dumps(qc))
    bad["config_groups"]["group_0"]["weights"]["strategy"] = "diagonal"
    with pytest.raises(ValueError):
        QuantizationConfig.model_validate(bad)


def test_every_quantized_linear_is_written_and_nothing_of_gptq_is_left(qwen2):
    info, out = qwen2
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as fh:
        names = set(fh.keys())
    assert not [n for n in names if n.rsplit(".", 1)[1] in ("qweight", "qzeros", "g_idx", "scales")]
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.shared_expert.down_proj",
                   "model.layers.1.mlp.experts.3.up_proj"):
        assert {f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape"} <= names
    block = config(out)["gptq2xpu"]
    assert block["output_format"] == "compressed-tensors"
    assert block["source"]["quantization_config"]["quant_method"] == "gptq"   # the source's description, whole
    card = (out / "README.md").read_text()
    assert "python -m vllm.entrypoints.openai.api_server --model ." in card and "no plugin" in card


def test_verify_passes_standalone_and_against_the_source(qwen2):
    info, out = qwen2
    code, report = verify_json(out)
    assert code == 0, report["failures"]
    code, report = verify_json(out, "--source", str(info.path))
    assert code == 0, report["failures"]
    checks = {c["check"] for c in report["checks"]}
    assert {"bit-exact experts", "bit-exact linears", "reference MoE", "quantization_config"} <= checks



def test_a_quantization_config_kept_in_text_config_is_written_and_verified_there(tmp_path):
    """A source that keeps its quantization description inside ``text_config`` gets the
    compressed-tensors one there too, and verify reads it where it was written."""
    info = make_checkpoint(tmp_path / "src", **BASE, config_location="text_config")
    out = convert(info.path, tmp_path / "out")
    cfg = config(out)
    assert cfg["text_config"]["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "quantization_config" not in cfg
    for extra in ((), ("--source", str(info.path))):
        code, report = verify_json(out, *extra)
        assert code == 0, report["failures"]
    # and a broken nested one is named where it is
    bad = tmp_path / "bad"
    convert(info.path, bad)
    cfg = config(bad)
    cfg["text_config"]["quantization_config"]["format"] = "float-quantized"
    (bad / "config.json").write_text(json.dumps(cfg, indent=2))
    reseal(bad, "config.json")
    code, report = verify_json(bad)
    assert code == 4 and any("text_config.quantization_config" in f for f in report["failures"]), report


DEFECTS = {
    # tensor, how: a converter bug verify --source must catch (and which check)
    "expert bytes": ("model.layers.0.mlp.experts.2.down_proj.weight_packed", lambda a: a ^ np.int32(1), "bit-exact"),
    "linear scale": ("model.layers.1.self_attn.o_proj.weight_scale", lambda a: a * 2, "bit-exact linears"),
    "gate/up swapped": (None, None, "bit-exact experts"),
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defects_fail_verify(qwen2, tmp_path, defect):
    import shutil

    info, good = qwen2
    out = tmp_path / "out"
    shutil.copytree(good, out)
    name, how, check = DEFECTS[defect]
    if name is None:
        g = "model.layers.1.mlp.experts.1.gate_proj.weight_packed"
        u = "model.layers.1.mlp.experts.1.up_proj.weight_packed"
        a, b = read_tensor(out, g), read_tensor(out, u)
        patch_tensor(out / SHARD, g, lambda _: b)
        patch_tensor(out / SHARD, u, lambda _: a)
    else:
        patch_tensor(out / SHARD, name, how)
    reseal(out, SHARD)
    code, report = verify_json(out, "--source", str(info.path))
    assert code == 4
    assert any(f.startswith(check) for f in report["failures"]), report["failures"]


def test_a_wrong_weight_shape_fails_standalone_verify(qwen2, tmp_path):
    import shutil

    _, good = qwen2
    out = tmp_path / "out"
    shutil.copytree(good, out)
    name = "model.layers.0.mlp.experts.0.up_proj.weight_shape"
    patch_tensor(out / SHARD, name, lambda a: a[::-1].copy())
    reseal(out, SHARD)
    code, report = verify_json(out)
    assert code == 4 and any("weight_shape" in f for f in report["failures"])


def test_tp_regroups_row_parallel_linears_and_whole_moe_layers(tmp_path):
    """--tp-size 4: o_proj (input 256 -> 64 per rank) and the experts (N = 128 -> 32 per rank) get
    smaller groups, q/k/v keep theirs; every module is matched to its group by vLLM's own matcher."""
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_moe", group_size=128))
    out = convert(info.path, tmp_path / "out", "--tp-size", "4")
    block = config(out)["gptq2xpu"]
    assert block["linears"]["model.layers.0.self_attn.o_proj"]["group_size"] == 64
    assert block["linears"]["model.layers.0.self_attn.q_proj"]["group_size"] == 128
    assert block["layers"]["model.layers.0.mlp"]["w13_group_size"] == 32 == block["layers"]["model.layers.0.mlp"][
        "w2_group_size"]
    qc = QuantizationConfig.model_validate(config(out)["quantization_config"])
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import find_matched_target

    by_target = {t: g.weights.group_size for g in qc.config_groups.values() for t in g.targets}
    linear = torch.nn.Linear(8, 8)
    expected = (("model.layers.0.self_attn.o_proj", 64), ("model.layers.1.self_attn.k_proj", 128),
                ("model.layers.1.mlp.experts.0.gate_proj", 32), ("model.layers.0.mlp.experts.3.down_proj", 32))
    for module, want in expected:
        assert by_target[find_matched_target(module, linear, list(by_target))] == want, module
    assert verify_json(out, "--source", str(info.path))[0] == 0
    assert read_tensor(out, "model.layers.0.self_attn.o_proj.weight_scale").shape == (256, 4)


def test_tp_that_needs_padding_is_refused(tmp_path):
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_moe", moe_intermediate=96, group_size=32))
    code, _, err = cli("convert", str(info.path), str(tmp_path / "out"), *CT, "--tp-size", "2")
    assert code == 3 and "never zero-padded" in err and not (tmp_path / "out").exists()
    assert "48 per rank at --tp-size 2 (compressed-tensors output is never zero-padded" in err  # one clause, no ", ("


@pytest.mark.parametrize("extra", [("--nibble-encoding", "s4"), ("--tp-size", "2", "--emit-ranks")])
def test_options_that_cannot_apply_are_usage_errors(tmp_path, extra):
    code, _, err = cli("convert", str(FIXTURE), str(tmp_path / "out"), *CT, *extra)
    assert code == 2 and "compressed-tensors" in err and len(err.strip().splitlines()) == 1


def test_inspect_says_what_is_written_and_where_it_serves():
    code, out, _ = cli("inspect", str(FIXTURE), *CT, "--json")
    data = json.loads(out)
    assert code == 0 and data["output_format"] == "compressed-tensors"
    assert "stock vLLM" in data["serves"] and "plugin" in data["formats"]["xpu"]


def test_gptq2xpu_load_refuses_it_with_one_line(qwen2):
    from gptq2xpu.errors import InputError
    from gptq2xpu.load import open_converted

    with pytest.raises(InputError, match="compressed-tensors output .* serve it with vLLM"):
        open_converted(qwen2[1])


def test_excluded_float_layer_goes_into_ignore(tmp_path):
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_moe", group_size=128,
                                                     dynamic={r"-:.*layers\.1\.mlp\.experts\..*": {}}))
    out = convert(info.path, tmp_path / "out")
    qc = config(out)["quantization_config"]
    assert "model.layers.1.mlp.experts.3.down_proj" in qc["ignore"]
    assert read_tensor(out, "model.layers.1.mlp.experts.3.down_proj.weight").dtype.itemsize == 2  # float, as is
    assert verify_json(out, "--source", str(info.path))[0] == 0


@pytest.mark.parametrize("fused", [False, True])
def test_float_mtp_layer_goes_into_ignore(tmp_path, fused):
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_next", group_size=128, mtp=True,
                                                     fused_float_mtp=fused))
    out = convert(info.path, tmp_path / "out")
    mtp = next(lyr.prefix for lyr in info.moe_layers if lyr.kind == "float")
    ignore = QuantizationConfig.model_validate(config(out)["quantization_config"]).ignore
    assert f"{mtp}.experts.0.gate_proj" in ignore and f"{mtp}.experts.3.down_proj" in ignore
    assert verify_json(out, "--source", str(info.path))[0] == 0


def test_split_conversion_and_jobs_give_the_same_bytes(tmp_path):
    one = convert(FIXTURE, tmp_path / "one")
    code, _, err = cli("convert", str(FIXTURE), str(tmp_path / "split"), *CT, "--part", "1/1", "--jobs", "3")
    assert code == 0, err
    assert cli("finalize", str(tmp_path / "split"))[0] == 0
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "split").iterdir())
    for name in files:
        assert (one / name).read_bytes() == (tmp_path / "split" / name).read_bytes(), name


def test_convert_to_compressed_tensors_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom gptq2xpu.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'compressed_tensors' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(FIXTURE), str(tmp_path / "out"), *CT, "-q"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_a_quantized_lm_head_is_targeted_by_name(tmp_path):
    """vLLM matches ``Linear`` against class names, and its ``ParallelLMHead`` is not one: a GPTQ
    lm_head is written pack-quantized and named in the targets of its config group."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = shutil.copytree(FIXTURE, tmp_path / "src")
    t = load_file(str(src / "model.safetensors"))
    vocab, hidden = t.pop("lm_head.weight").shape
    gen = torch.Generator().manual_seed(0)
    t["lm_head.qweight"] = torch.randint(-2**31, 2**31 - 1, (hidden // 8, vocab), dtype=torch.int32, generator=gen)
    t["lm_head.scales"] = (torch.rand(hidden // 128, vocab, generator=gen) / 100 + 1e-3).half()
    t["lm_head.qzeros"] = torch.full((hidden // 128, vocab // 8), 0x77777777, dtype=torch.int32)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = convert(src, tmp_path / "out")
    qc = QuantizationConfig.model_validate(config(out)["quantization_config"])
    assert "lm_head" in qc.config_groups["group_0"].targets and "lm_head" not in qc.ignore
    assert read_tensor(out, "lm_head.weight_packed").shape == (vocab, hidden // 8)
    assert verify_json(out, "--source", str(src))[0] == 0


@pytest.mark.parametrize("dequantize", [False, True])
def test_a_quantized_router_is_a_linear_or_with_dequantize_router_a_float_one(tmp_path, dequantize):
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_moe", group_size=128, num_experts=8,
                                                     quantized_router=True))
    out = convert(info.path, tmp_path / "out", *(["--dequantize-router"] if dequantize else []))
    block, qc = config(out)["gptq2xpu"], config(out)["quantization_config"]
    if dequantize:
        assert "model.layers.0.mlp.gate" in qc["ignore"] and "model.layers.0.mlp.gate" not in block["linears"]
        assert block["dequantized_routers"] == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    else:
        assert "model.layers.0.mlp.gate" not in qc["ignore"] and "model.layers.0.mlp.gate" in block["linears"]
    assert verify_json(out, "--source", str(info.path))[0] == 0


def test_layers_kept_unchanged_cannot_be_written_as_compressed_tensors(tmp_path):
    """An 8-bit MoE layer kept with --keep-unsupported has no pack-quantized 4-bit form: exit 3,
    one line naming the layer and the format that keeps it."""
    info = make_checkpoint(tmp_path / "src", **dict(BASE, family="qwen3_moe"),
                           dynamic={r"+:.*layers\.1\.mlp\.experts\..*": {"bits": 8}})
    code, _, err = cli("convert", str(info.path), str(tmp_path / "out"), *CT, "--keep-unsupported")
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert "model.layers.1.mlp" in line and "--keep-unsupported" in line and "--format xpu" in line, err
    assert not (tmp_path / "out").exists()
