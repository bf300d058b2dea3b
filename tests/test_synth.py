"""Tests of the synthetic checkpoint writer (gptq2xpu.testing.synth): the packer, the layouts per family
and per messy case, determinism and the pickle trap.  Files are read back with the tests' own
safetensors reader (``helpers``) and an unpacker written here, not with package code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.helpers import load_tensors

from gptq2xpu.testing import synth as S
from gptq2xpu.testing.synth import FAMILIES

# ------------------------------------------------------------------ reader / independent unpacker


def read_st(path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """name -> (dtype, shape, array) in file order (BF16 as uint16)."""
    return {name: (dtype, list(arr.shape), arr) for name, (dtype, arr) in load_tensors(path).items()}


def read_all(info) -> dict:
    out = {}
    for f in info.files:
        out.update(read_st(info.path / f))
    return out


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] packed along rows -> [R * 32/bits, C]: row 8r+j from bits 4j.. (loop form)."""
    per, mask = 32 // bits, (1 << bits) - 1
    R, C = words.shape
    out = np.zeros((R * per, C), dtype=np.int64)
    for r in range(R):
        w = words[r].astype(np.int64) % (1 << 32)
        for j in range(per):
            out[r * per + j] = (w >> (bits * j)) & mask
    return out


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def as_f32(dtype: str, arr: np.ndarray) -> np.ndarray:
    return bf16_to_f32(arr) if dtype == "BF16" else arr.astype(np.float32)


# ---------------------------------------------------------------------------------- the packer


def test_pack_hand_worked_example():
    # output column 0 gets input rows 0..7 = 3, 8, 0, 15, 1, 9, 7, 12 (codes >= 8 set the top bit)
    # nibble j (bits 4j..4j+3) holds row j, so reading the hex from the top nibble down: C 7 9 1 F 0 8 3
    col0 = [3, 8, 0, 15, 1, 9, 7, 12]
    col1 = [0, 1, 2, 3, 4, 5, 6, 7]
    codes = np.array([col0, col1], dtype=np.uint8)          # [out=2, in=8]
    q = S.pack_gptq_qweight(codes)
    assert q.dtype == np.int32 and q.shape == (1, 2)
    assert q[0, 0] == -946737021 == np.uint32(0xC791F083).view(np.int32)   # negative: sign bit from 12
    assert q[0, 1] == 0x76543210
    # compressed-tensors packs the same codes along the input axis of [out, in]
    ct = S.pack_ct_weight(codes)
    assert ct.shape == (2, 1) and ct[0, 0] == q[0, 0] and ct[1, 0] == q[0, 1]
    # 8-bit: four fields per word, LSB first
    assert S.pack_int32(np.array([[1, 0x80, 0xFF, 2]]), 8, axis=1)[0, 0] == np.uint32(0x02FF8001).view(np.int32)
    with pytest.raises(ValueError):
        S.pack_int32(np.array([[16] * 8]), 4, axis=1)


def test_pack_roundtrip_with_independent_unpacker():
    rng = np.random.default_rng(5)
    for bits in (4, 8):
        codes = rng.integers(0, 1 << bits, size=(24, 64), dtype=np.uint8)     # [out, in]
        q = S.pack_gptq_qweight(codes, bits)
        assert q.shape == (64 * bits // 32, 24)
        assert np.array_equal(unpack_rows(q, bits), codes.T)
        ct = S.pack_ct_weight(codes, bits)
        assert np.array_equal(unpack_rows(np.ascontiguousarray(ct.T), bits), codes.T)


def test_bf16_round_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 1e-3], dtype=np.float32)
    bits = S.bf16_bits(x)
    assert bits[0] == 0x3F80
    assert bits[1] == 0x3F80            # tie, even mantissa stays
    assert bits[2] == 0x3F82            # tie, odd mantissa rounds up
    assert bits[3] == 0x3F81            # above the tie rounds up
    assert bits[4] == 0xC020
    raw, back = S.round_to_dtype(x, "bfloat16")
    assert np.array_equal(raw, bits) and np.array_equal(S.bf16_bits(back), bits)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2**-8)
    raw16, back16 = S.round_to_dtype(x, "float16")
    assert raw16.dtype == np.float16 and np.array_equal(back16, raw16.astype(np.float32))


# ---------------------------------------------------------------------- ground truth vs the file


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_expert_tensors_match_ground_truth(synth, scale_dtype):
    info = synth(scale_dtype=scale_dtype, group_size=64)
    t = read_all(info)
    assert len(info.moe_layers) == 2
    for lay in info.moe_layers:
        assert lay.kind == "gptq" and lay.bits == 4
        assert lay.group_size == {"gate": 64, "up": 64, "down": 64}
        E = info.spec.num_experts
        for role, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            K_in = info.spec.moe_intermediate if role == "down" else info.spec.hidden
            assert lay.codes[role].shape[0] == E and lay.codes[role].shape[2] == K_in
            for e in (0, E - 1):
                m = f"{lay.prefix}.experts.{e}.{proj}"
                codes = unpack_rows(t[f"{m}.qweight"][2], 4)               # [in, out]
                assert np.array_equal(codes.T, lay.codes[role][e])
                sdt, _, sc = t[f"{m}.scales"]
                assert sdt == S.SAFETENSORS_DTYPE[scale_dtype]
                assert np.array_equal(as_f32(sdt, sc).T, lay.scales[role][e])
                assert np.array_equal(t[f"{m}.g_idx"][2], np.arange(K_in) // 64)
                assert np.array_equal(lay.g_idx[role][e], np.arange(K_in) // 64)
        # scales: about half negative, magnitudes 1e-3..1e-2
        s = lay.scales["gate"]
        assert 0.3 < (s < 0).mean() < 0.7
        assert np.abs(s).min() >= 0.9e-3 and np.abs(s).max() <= 1.01e-2
        # codes use the whole 0..15 range
        assert lay.codes["up"].min() == 0 and lay.codes["up"].max() == 15
        # dequant helper = (q - 8) * scale
        w = lay.dequant("gate")
        g = lay.group_size["gate"]
        ref = (lay.codes["gate"].astype(np.float32) - 8) * np.repeat(lay.scales["gate"], g, axis=2)
        assert np.array_equal(w, ref)


@pytest.mark.parametrize("fmt,word", [("gptq", 0x77777777), ("gptq_v2", 0x88888888)])
def test_qzeros_v1_v2(synth, fmt, word):
    info = synth(checkpoint_format=fmt)
    assert info.quant_config["checkpoint_format"] == fmt
    t = read_all(info)
    qz = [a for n, (_, _, a) in t.items() if n.endswith(".qzeros")]
    assert qz and all(np.all(a.view(np.uint32) == word) for a in qz)
    m = "model.layers.0.mlp.experts.0.gate_proj"
    assert t[f"{m}.qzeros"][1] == [info.spec.hidden // 128, info.spec.moe_intermediate // 8]


def test_checkpoint_format_can_be_omitted(synth):
    """As AutoRound writes it: config.json has no checkpoint_format and the qzeros are v1's
    (0x77777777, what a missing checkpoint_format means); nothing else differs from the default."""
    omitted, written = synth(write_checkpoint_format=False), synth()
    on_disk = json.loads((omitted.path / "config.json").read_text())["quantization_config"]
    default = json.loads((written.path / "config.json").read_text())["quantization_config"]
    assert "checkpoint_format" not in on_disk and default.pop("checkpoint_format") == "gptq"
    assert on_disk == default and "checkpoint_format" not in omitted.config["quantization_config"]
    t, t_default = read_all(omitted), read_all(written)
    assert t.keys() == t_default.keys() and all(np.array_equal(t[n][2], t_default[n][2]) for n in t)
    qz = [a for n, (_, _, a) in t.items() if n.endswith(".qzeros")]
    assert qz and all(np.all(a.view(np.uint32) == 0x77777777) for a in qz)


def test_g_idx_monotonic_vs_act_order(synth):
    plain = read_all(synth())
    ao_info = synth(act_order=True)
    ao = read_all(ao_info)
    K = 256
    g = plain["model.layers.0.mlp.experts.0.gate_proj.g_idx"][2]
    assert np.array_equal(g, np.arange(K) // 128) and np.all(np.diff(g) >= 0)
    g2 = ao["model.layers.0.mlp.experts.0.gate_proj.g_idx"][2]
    assert np.any(np.diff(g2) < 0)                                   # not monotonic
    assert np.array_equal(np.bincount(g2), np.full(K // 128, 128))   # still 128 rows per group
    assert ao_info.quant_config["desc_act"] is True
    assert set(ao_info.expected_kinds.values()) == {"unsupported"} and "act-order" in ao_info.expect_refusal
    lay = ao_info.moe_layers[0]
    assert np.array_equal(lay.g_idx["gate"][0], g2)


def test_asymmetric_zero_points(synth):
    info = synth(asymmetric=True)
    t = read_all(info)
    qz = t["model.layers.0.mlp.experts.0.up_proj.qzeros"][2]
    nib = unpack_rows(np.ascontiguousarray(qz.T), 4)       # [out, groups] stored (v1: zero - 1)
    assert len(np.unique(nib)) > 1
    assert np.array_equal(nib + 1, info.moe_layers[0].zeros["up"][0].astype(np.int64))
    assert info.quant_config["sym"] is False and info.expect_refusal


def test_per_channel_group(synth):
    info = synth(group_size=-1)
    t = read_all(info)
    m = "model.layers.1.mlp.experts.2.down_proj"
    assert t[f"{m}.scales"][1] == [1, 256] and np.all(t[f"{m}.g_idx"][2] == 0)
    assert info.moe_layers[1].group_size == {"gate": 256, "up": 256, "down": 128}
    assert info.quant_config["group_size"] == -1


# ------------------------------------------------------------------------------- family layouts


def _shape(info, name):
    return list(info.tensors[name][1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_layout(synth, family):
    fam = FAMILIES[family]
    dense = 1 if fam.dense_style == "first_k_dense_replace" else 0
    info = synth(family=family, num_layers=2 + dense, first_dense=dense)
    cfg = info.config
    text = cfg["text_config"] if fam.nested else cfg
    assert cfg["architectures"] == list(fam.architectures) and cfg["model_type"] == fam.model_type
    for key, spec_attr in (("num_experts", "num_experts"), ("top_k", "top_k"), ("intermediate", "moe_intermediate")):
        assert text[fam.expert_keys[key]] == getattr(info.spec, spec_attr)
    assert text["hidden_size"] == 256 and text["num_hidden_layers"] == 2 + dense
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["sym"] is True
    K, N, E = 256, 128, 8
    moe_layers = [f"{fam.layer_prefix}.{i}.{fam.moe_module}" for i in range(dense, 2 + dense)]
    assert list(info.expected_kinds) == moe_layers and set(info.expected_kinds.values()) == {"gptq"}
    for p in moe_layers:
        for e in range(E):
            for role, proj in fam.proj.items():
                m = f"{p}.experts.{e}.{proj}"
                i, o = (N, K) if role == "down" else (K, N)
                assert _shape(info, f"{m}.qweight") == [i // 8, o]
                assert _shape(info, f"{m}.scales") == [i // 128, o]
                assert f"{m}.weight" not in info.tensors
        assert info.tensors[f"{p}.gate.weight"] == ("BF16", (E, K))
        assert f"{p}.gate.weight" in info.router_names
        assert (f"{p}.gate.e_score_correction_bias" in info.tensors) == fam.router_bias
        if fam.router_bias:
            assert info.tensors[f"{p}.gate.e_score_correction_bias"] == ("F32", (E,))
        shared = {"shared_expert": f"{p}.shared_expert.gate_proj.qweight",
                  "shared_experts": f"{p}.shared_experts.gate_proj.qweight"}
        for style, name in shared.items():
            assert (name in info.tensors) == (style == fam.shared_style and fam.shared_default)
        has_gate = fam.shared_style == "shared_expert" and fam.shared_default
        assert (f"{p}.shared_expert_gate.weight" in info.tensors) == has_gate
    if dense:
        d = f"{fam.layer_prefix}.0.mlp"
        assert _shape(info, f"{d}.gate_proj.qweight") == [K // 8, 2 * N]
        assert f"{d}.experts.0.gate_proj.qweight" not in info.tensors
        assert text["first_k_dense_replace"] == 1 and text["n_shared_experts"] == 1
        assert text["scoring_func"] == ("softmax" if family == "deepseek_v2" else "sigmoid")
        for k in ("routed_scaling_factor", "norm_topk_prob", "topk_method", "n_group", "topk_group"):
            assert k in text
    assert fam.embed_name in info.tensors and "lm_head.weight" in info.tensors
    # attention is GPTQ (at least one quantized attention / linear-attention projection per layer)
    for i in range(2 + dense):
        assert any(n.startswith(f"{fam.layer_prefix}.{i}.") and ("attn" in n) and n.endswith(".qweight")
                   for n in info.tensors)
    # converted = exactly the expert tensors of the MoE layers
    expert_names = {n for n in info.tensors if ".experts." in n}
    assert set(info.passthrough_names) == set(info.tensors) - expert_names
    assert all(set(lay.expert_names) <= expert_names for lay in info.moe_layers)


def test_qwen3_5_nested_config(synth):
    info = synth(family="qwen3_5_moe", num_layers=4, vision=True)
    cfg = info.config
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "qwen3_5_moe_text"
    assert cfg["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert "vision_config" in cfg and "quantization_config" in cfg
    assert "model.language_model.layers.3.self_attn.q_proj.qweight" in info.tensors
    assert "model.language_model.layers.0.linear_attn.out_proj.qweight" in info.tensors
    info2 = synth(family="qwen3_5_moe", config_location="text_config")
    assert "quantization_config" not in info2.config
    assert info2.config["text_config"]["quantization_config"]["quant_method"] == "gptq"
    assert info2.quant_config_file == "config.json:text_config.quantization_config"


@pytest.mark.parametrize("family,prefix", [("qwen3_next", "mtp.layers.0.mlp"), ("qwen3_5_moe", "mtp.layers.0.mlp"),
                                           ("deepseek_v3", "model.layers.2.mlp"), ("glm4_moe", "model.layers.2.mlp")])
def test_mtp_float_experts(synth, family, prefix):
    info = synth(family=family, mtp=True)
    assert info.expected_kinds[prefix] == "float"
    lay = info.moe_layers[-1]
    assert lay.prefix == prefix and lay.kind == "float"
    t = read_all(info)
    for role, proj in (("gate", "gate_proj"), ("down", "down_proj")):
        name = f"{prefix}.experts.3.{proj}.weight"
        dt, shape, arr = t[name]
        assert dt == "BF16" and shape == ([256, 128] if role == "down" else [128, 256])
        assert np.array_equal(bf16_to_f32(arr), lay.float_weights[role][3])
        assert f"{prefix}.experts.3.{proj}.qweight" not in t
    assert all(n in info.passthrough_names for n in lay.expert_names)
    assert f"{prefix}.gate.weight" in info.router_names
    if family.startswith("qwen"):
        assert "mtp.fc.weight" in t
        key = info.config.get("text_config", info.config)["mtp_num_hidden_layers"]
        assert key == 1
    else:
        assert info.config["num_nextn_predict_layers"] == 1 and info.config["num_hidden_layers"] == 2
        assert "model.layers.2.eh_proj.weight" in t


def test_fused_float_mtp(synth):
    info = synth(family="qwen3_next", mtp=True, fused_float_mtp=True)
    t = read_all(info)
    p = "mtp.layers.0.mlp.experts"
    dt, shape, gu = t[f"{p}.gate_up_proj"]
    assert dt == "BF16" and shape == [8, 256, 256]
    assert t[f"{p}.down_proj"][1] == [8, 256, 128]
    assert not any(n.startswith(p + ".0.") for n in t)
    lay = info.moe_layers[-1]
    assert lay.fused and lay.kind == "float"
    gu = bf16_to_f32(gu)
    assert np.array_equal(gu[:, :128], lay.float_weights["gate"])
    assert np.array_equal(gu[:, 128:], lay.float_weights["up"])
    assert np.array_equal(bf16_to_f32(t[f"{p}.down_proj"][2]), lay.float_weights["down"])


def test_vision_tower(synth):
    info = synth(vision=True)
    n = "model.visual.blocks.0.mlp.gate_proj.weight"
    assert info.tensors[n] == ("BF16", (128, 64))
    assert n in info.passthrough_names and "model.visual.blocks.1.mlp.down_proj.weight" in info.tensors
    assert (info.path / "preprocessor_config.json").exists()
    assert not any(k.startswith("model.visual") for k in info.expected_kinds)


def test_old_autogptq_single_file(synth):
    info = synth(old_autogptq=True, group_size=64)
    files = sorted(p.name for p in info.path.iterdir())
    assert "gptq_model-4bit-64g.safetensors" in files
    assert "model.safetensors" not in files and "model.safetensors.index.json" not in files
    assert "quantization_config" not in json.loads((info.path / "config.json").read_text())
    q = json.loads((info.path / "quantize_config.json").read_text())
    assert q["bits"] == 4 and q["group_size"] == 64 and q["desc_act"] is False and q["sym"] is True
    assert q["model_file_base_name"] == "gptq_model-4bit-64g" and "quant_method" not in q
    assert info.files == ["gptq_model-4bit-64g.safetensors"]


@pytest.mark.parametrize("where,file", [("quantization_config_json", "quantization_config.json"),
                                        ("quantize_config_json", "quantize_config.json")])
def test_separate_quant_config_files(synth, where, file):
    info = synth(config_location=where)
    assert "quantization_config" not in json.loads((info.path / "config.json").read_text())
    q = json.loads((info.path / file).read_text())
    assert q["quant_method"] == "gptq" and q["group_size"] == 128


def test_side_files(synth):
    info = synth()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
              "LICENSE"):
        assert (info.path / f).is_file()
    assert "chat_template" in json.loads((info.path / "tokenizer_config.json").read_text())
    assert json.loads((info.path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"


# ----------------------------------------------------------------------------------- sharding


def test_sharding_and_index(synth):
    limit = 200_000
    info = synth(shard_size=limit)
    idx = json.loads((info.path / "model.safetensors.index.json").read_text())
    assert set(idx) == {"metadata", "weight_map"}
    files = sorted(set(idx["weight_map"].values()))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (info.path / "model.safetensors").exists()
    seen, total = {}, 0
    for f in files:
        tensors = read_st(info.path / f)
        data = sum(a.nbytes for _, _, a in tensors.values())
        assert data <= limit
        total += data
        for name in tensors:
            assert name not in seen
            seen[name] = f
    assert seen == idx["weight_map"] == info.weight_map
    assert set(seen) == set(info.tensors)
    assert idx["metadata"]["total_size"] == total == info.total_size
    assert list(idx["weight_map"]) == sorted(idx["weight_map"])


def test_shuffled_index(synth):
    plain = synth(shard_size=150_000)
    info = synth(shard_size=150_000, shuffle_index=True)
    wm = json.loads((info.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(wm) != sorted(wm)
    layer0 = {f for name, f in wm.items() if name.startswith("model.layers.0.mlp.experts.")}
    assert len(layer0) > 2                                                  # one layer's experts over several shards
    # the qweight/scales of one expert linear are (very likely) not all in one shard
    parts = [{wm[f"model.layers.{L}.mlp.experts.{e}.up_proj.{f}"] for f in ("qweight", "scales", "qzeros", "g_idx")}
             for L in range(2) for e in range(8)]
    assert any(len(p) > 1 for p in parts)
    # same tensor content regardless of the layout; files hold tensors in scrambled order
    a, b = read_all(plain), read_all(info)
    assert set(a) == set(b) and all(np.array_equal(a[k][2], b[k][2]) for k in a)
    order = list(read_st(info.path / info.files[0]))
    assert order != sorted(order)


# ---------------------------------------------------------------------------- messy variants


def test_dynamic_exclusion_and_overrides(synth):
    dyn = {
        r"-:.*model\.layers\.1\.mlp\.experts\..*": {},          # layer 1 experts stay float
        r"+:.*\.down_proj$": {"group_size": 64},
        r"-:.*mlp\.gate$": {},
    }
    info = synth(dynamic=dyn)
    assert info.quant_config["dynamic"] == dyn
    assert info.expected_kinds == {"model.layers.0.mlp": "gptq", "model.layers.1.mlp": "float"}
    l0, l1 = info.moe_layers
    assert l0.group_size == {"gate": 128, "up": 128, "down": 64}
    assert l0.scales["down"].shape == (8, 256, 2)
    assert _shape(info, "model.layers.0.mlp.experts.0.down_proj.scales") == [2, 256]
    assert l1.kind == "excluded" and info.tensors["model.layers.1.mlp.experts.0.up_proj.weight"] == ("BF16", (128, 256))
    assert "model.layers.1.mlp.experts.0.up_proj.qweight" not in info.tensors
    assert all(n in info.passthrough_names for n in l1.expert_names)
    t = read_all(info)
    down = bf16_to_f32(t["model.layers.1.mlp.experts.5.down_proj.weight"][2])
    assert np.array_equal(down, l1.float_weights["down"][5])


def test_8bit_override_and_mixed(synth):
    info = synth(dynamic={r"+:.*layers\.0\.mlp\.experts\..*": {"bits": 8},
                          r"-:.*layers\.1\.mlp\.experts\.3\..*": {}})
    assert info.expected_kinds == {"model.layers.0.mlp": "unsupported", "model.layers.1.mlp": "unsupported"}
    assert info.moe_layers[0].kind == "int8" and info.moe_layers[1].kind == "mixed"
    t = read_all(info)
    m = "model.layers.0.mlp.experts.0.gate_proj"
    assert t[f"{m}.qweight"][1] == [256 // 4, 128]
    assert np.all(t[f"{m}.qzeros"][2].view(np.uint32) == 0x7F7F7F7F)
    codes = unpack_rows(t[f"{m}.qweight"][2], 8)
    assert np.array_equal(codes.T, info.moe_layers[0].codes["gate"][0]) and codes.max() > 127
    assert info.expect_refusal


def test_quantized_router(synth):
    info = synth(quantized_router=True)
    p = "model.layers.0.mlp.gate"
    for f in ("qweight", "scales", "qzeros", "g_idx"):
        assert f"{p}.{f}" in info.router_names and f"{p}.{f}" in info.passthrough_names
    assert f"{p}.weight" not in info.tensors and _shape(info, f"{p}.qweight") == [32, 8]


def test_compressed_tensors(synth):
    info = synth(quant_format="compressed-tensors", scale_dtype="bfloat16", group_size=64, mtp=False, vision=True)
    q = info.config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 64)
    assert q["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "lm_head" in q["ignore"] and "model.layers.0.mlp.gate" in q["ignore"]
    assert "model.visual.blocks.0.mlp.gate_proj" in q["ignore"]
    t = read_all(info)
    lay = info.moe_layers[0]
    m = "model.layers.0.mlp.experts.2.down_proj"
    assert t[f"{m}.weight_packed"][0] == "I32" and t[f"{m}.weight_packed"][1] == [256, 128 // 8]
    assert t[f"{m}.weight_scale"][:2] == ("BF16", [256, 2])
    assert t[f"{m}.weight_shape"][0] == "I64" and list(t[f"{m}.weight_shape"][2]) == [256, 128]
    codes = unpack_rows(np.ascontiguousarray(t[f"{m}.weight_packed"][2].T), 4).T     # [out, in]
    assert np.array_equal(codes, lay.codes["down"][2])
    assert np.array_equal(bf16_to_f32(t[f"{m}.weight_scale"][2]), lay.scales["down"][2])
    assert not any(n.endswith((".qweight", ".qzeros", ".g_idx")) for n in t)
    assert set(info.passthrough_names) == set(t) - {n for n in t if ".experts." in n}


def test_compressed_tensors_override_groups(synth):
    info = synth(quant_format="compressed-tensors", dynamic={r".*experts\.0\.down_proj": {"bits": 8}})
    groups = info.config["quantization_config"]["config_groups"]
    assert groups["group_1"]["weights"]["num_bits"] == 8
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.experts.0.down_proj",
                                            "model.layers.1.mlp.experts.0.down_proj"]


def test_fast_mode_small(synth):
    info = synth(fast=True, shard_size=300_000, mtp=True, family="qwen3_next", fused_float_mtp=True)
    assert all(not lay.codes for lay in info.moe_layers)
    t = read_all(info)
    qw = t["model.layers.0.mlp.experts.0.gate_proj.qweight"][2]
    assert qw.shape == (32, 128) and len(np.unique(qw)) > 100
    assert np.all(t["model.layers.0.mlp.experts.0.gate_proj.qzeros"][2].view(np.uint32) == 0x77777777)
    assert np.array_equal(t["model.layers.0.mlp.experts.0.gate_proj.g_idx"][2], np.arange(256) // 128)
    gu = bf16_to_f32(t["mtp.layers.0.mlp.experts.gate_up_proj"][2])
    assert np.all(np.isfinite(gu)) and 0 < np.abs(gu).max() < 1


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError):
        S.make_checkpoint(tmp_path / "a", family="llama")
    with pytest.raises(ValueError):
        S.make_checkpoint(tmp_path / "b", group_size=96)
    with pytest.raises(ValueError):
        S.make_checkpoint(tmp_path / "c", family="mixtral", mtp=True)
    S.make_checkpoint(tmp_path / "d")
    with pytest.raises(FileExistsError):
        S.make_checkpoint(tmp_path / "d")


# -------------------------------------------------------------------------------- determinism


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_deterministic(tmp_path):
    kw = dict(family="deepseek_v3", num_layers=3, first_dense=1, mtp=True, shard_size=120_000, shuffle_index=True,
              seed=7)
    S.make_checkpoint(tmp_path / "a", **kw)
    S.make_checkpoint(tmp_path / "b", **kw)
    a, b = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert a == b and len(a) > 8
    S.make_checkpoint(tmp_path / "c", **dict(kw, seed=8))
    c = _file_bytes(tmp_path / "c")
    assert c["config.json"] == a["config.json"]
    def weights(d):
        return {k: v for k, v in d.items() if k.endswith(".safetensors")}

    assert weights(c) != weights(a)
