"""End-to-end conversion: every family, the AutoRound fixture, options, determinism, split runs.

Codes and scales are checked against the synthetic checkpoints' ground truth (the codes the
generator drew before packing) through the test-local decoder in ``support/xpu_decode.py``: neither the
converter's repack code nor the verifier's unpack code is involved in the comparison.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.helpers import FIXTURE, read_tensors
from support.xpu_decode import as_float32, check_layer_matches_truth, decode_layer, dequant, gptq_unpack

from gptq2xpu.contract import CONFIG_BLOCK, MANIFEST_NAME
from gptq2xpu.convert import convert
from gptq2xpu.plan import ConvertOptions

FAMILIES = ["qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_next", "mixtral", "deepseek_v2", "deepseek_v3", "glm4_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(synth, tmp_path, family):
    extra = {"first_dense": 1, "num_layers": 3} if family in ("deepseek_v2", "deepseek_v3", "glm4_moe") else {}
    info = synth(family=family, hidden=128, moe_intermediate=64, num_experts=4, group_size=32, **extra)
    out = tmp_path / "out"
    result = convert(info.path, out, jobs=2)
    gptq_layers = [lyr for lyr in info.moe_layers if lyr.kind == "gptq"]
    assert result["converted_layers"] == len(gptq_layers) > 0
    tensors = read_tensors(out)
    src = read_tensors(info.path)
    for layer in gptq_layers:
        check_layer_matches_truth(out, layer, tensors)
        assert not any(n.startswith(layer.prefix + ".experts.0.") for n in tensors)
    # every other tensor: same name, same bytes
    for name in info.passthrough_names:
        assert tensors[name] == src[name], name
    converted = {f"{lyr.prefix}.experts.{w}" for lyr in gptq_layers
                 for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")}
    assert set(tensors) == set(info.passthrough_names) | converted
    block = json.loads((out / "config.json").read_text())[CONFIG_BLOCK]
    assert block["layers"].keys() == {lyr.prefix for lyr in gptq_layers}
    assert block["routing"]["top_k"] == info.spec.top_k


def test_router_shared_experts_and_dense_mlp_are_never_experts(synth, tmp_path):
    info = synth(family="deepseek_v3", first_dense=1, num_layers=3, hidden=128, moe_intermediate=64, num_experts=4,
                 group_size=32)
    out = tmp_path / "out"
    convert(info.path, out, jobs=1)
    tensors = read_tensors(out)
    src = read_tensors(info.path)
    keep = [n for n in src if ".mlp.gate." in n or ".shared_experts." in n or ".mlp.gate_proj." in n]
    assert any(n.endswith("e_score_correction_bias") for n in keep)
    assert any(".mlp.gate_proj.qweight" in n for n in keep)          # dense layer 0
    assert any(".shared_experts.gate_proj.qweight" in n for n in keep)
    for n in keep:
        assert tensors[n] == src[n]
    block = json.loads((out / "config.json").read_text())[CONFIG_BLOCK]
    assert "model.layers.0.mlp" not in block["layers"]               # the dense layer
    assert all(r in tensors for r in block["routers"])


def test_qwen2_shared_expert_gate_untouched(synth, tmp_path):
    info = synth(family="qwen2_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32)
    convert(info.path, tmp_path / "out", jobs=1)
    tensors, src = read_tensors(tmp_path / "out"), read_tensors(info.path)
    names = [n for n in src if "shared_expert" in n]
    assert any("shared_expert_gate" in n for n in names) and any("shared_expert.down_proj" in n for n in names)
    assert all(tensors[n] == src[n] for n in names)


def test_autoround_fixture_bit_exact_and_moe_output(tmp_path):
    """The third-party fixture: codes equal the source bit for bit, and the MoE computed from the
    converted tensors matches AutoRound's own output in reference.safetensors."""
    out = tmp_path / "out"
    convert(FIXTURE, out, jobs=2)
    tensors = read_tensors(out)
    src = read_tensors(FIXTURE)
    ref = {k: as_float32(*v) for k, v in read_tensors(FIXTURE / "reference.safetensors").items()}
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp"
        d = decode_layer(out, prefix, tensors)
        for e in range(8):
            for role, rows in (("gate", d["w13"][e, :256]), ("up", d["w13"][e, 256:]), ("down", d["w2"][e])):
                dt, shape, raw = src[f"{prefix}.experts.{e}.{role}_proj.qweight"]
                codes = gptq_unpack(np.frombuffer(raw, np.int32).reshape(shape))   # [in, out]
                np.testing.assert_array_equal(rows, codes.T)
        w13 = dequant(d["w13"], d["w13_scales"])
        w2 = dequant(d["w2"], d["w2_scales"])
        if layer == 0:
            np.testing.assert_array_equal(w13[0, :256], ref["layers.0.expert0.gate"])
            np.testing.assert_array_equal(w13[0, 256:], ref["layers.0.expert0.up"])
            np.testing.assert_array_equal(w2[0], ref["layers.0.expert0.down"])
        x = ref[f"layers.{layer}.hidden"].astype(np.float64)
        router = as_float32(*tensors[f"{prefix}.gate.weight"]).astype(np.float64)
        logits = x @ router.T
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        top = np.argsort(-probs, axis=1)[:, :2]
        y = np.zeros_like(x)
        for t in range(x.shape[0]):
            w = probs[t, top[t]] / probs[t, top[t]].sum()
            for wk, e in zip(w, top[t]):
                h = x[t] @ w13[e].T.astype(np.float64)
                act = h[:256] / (1 + np.exp(-h[:256])) * h[256:]
                y[t] += wk * (act @ w2[e].T.astype(np.float64))
        want = ref[f"layers.{layer}.block_out"].astype(np.float64)
        rel = np.linalg.norm(y - want) / np.linalg.norm(want)
        assert rel < 1e-3, rel   # AutoRound computed in fp16; an exact forward lands at ~6e-4


def _folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_and_independent_of_jobs(synth, tmp_path):
    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=8, group_size=32, num_layers=3,
                 shard_size=40_000)
    opts = ConvertOptions(max_shard_size=60_000)
    runs = {}
    for jobs in (1, 2, 3, 4, 8):  # 4 and 8 write several shards at once
        convert(info.path, tmp_path / f"j{jobs}", jobs=jobs, options=opts)
        runs[jobs] = _folder_bytes(tmp_path / f"j{jobs}")
    assert len([k for k in runs[1] if k.endswith(".safetensors")]) > 2
    for jobs, files in runs.items():
        assert files == runs[1], f"--jobs {jobs} wrote different bytes"


def test_a_failing_shard_stops_the_others_and_leaves_nothing(synth, tmp_path, monkeypatch):
    """Shards written at once: one fails; the error is its own, and no file is left anywhere."""
    from gptq2xpu.write import shards as writer

    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=8, group_size=32, num_layers=4)
    real = writer.ShardSource.tasks
    started = []

    def tasks(self, shard):
        out = real(self, shard)
        started.append(shard.name)
        if len(started) == 2:
            def boom():
                raise OSError(28, "No space left on device")
            out = out[:3] + [(out[3][0], boom)] + out[4:]
        return out

    monkeypatch.setattr(writer.ShardSource, "tasks", tasks)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        convert(info.path, out, jobs=8, options=ConvertOptions(max_shard_size=40_000))
    assert len(started) >= 2
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != info.path.name] == []


def test_split_parts_then_finalize_is_byte_identical(synth, tmp_path, cli):
    info = synth(family="mixtral", hidden=128, moe_intermediate=64, num_experts=4, group_size=32, num_layers=3,
                 shard_size=30_000)
    convert(info.path, tmp_path / "single", jobs=2, options=ConvertOptions(max_shard_size=30_000))
    shared = tmp_path / "shared"
    for i in (3, 1, 2):   # any order, as a CI matrix would finish them
        code, _, err = cli("convert", info.path, shared, "--part", f"{i}/3", "--max-shard-size", "30000")
        assert code == 0, err
        if i != 2:
            code, _, err = cli("finalize", shared)
            assert code == 2 and "not finished" in err
    code, _, err = cli("finalize", shared)
    assert code == 0, err
    assert _folder_bytes(shared) == _folder_bytes(tmp_path / "single")
    assert cli("verify", shared)[0] == 0


def test_bad_part_spec(cli, tmp_path):
    code, _, err = cli("convert", FIXTURE, tmp_path / "o", "--part", "4/3")
    assert code == 2 and "--part" in err


@pytest.mark.parametrize("dtype_opt,dtype", [("bfloat16", "BF16"), ("float16", "F16")])
def test_scale_dtype(synth, tmp_path, dtype_opt, dtype):
    import torch

    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32,
                 scale_dtype="float16")
    out = tmp_path / "out"
    convert(info.path, out, options=ConvertOptions(scale_dtype=dtype_opt))
    layer = info.moe_layers[0]
    d = decode_layer(out, layer.prefix)
    assert d["w13_scale_dtype"] == dtype
    want = torch.from_numpy(layer.scales["gate"]).to(getattr(torch, dtype_opt)).float().numpy()
    np.testing.assert_array_equal(d["w13_scales"][:, :64], want)
    block = json.loads((out / "config.json").read_text())[CONFIG_BLOCK]
    assert block["scale_dtype"] == dtype_opt


def test_s4_nibble_encoding(synth, tmp_path):
    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32)
    convert(info.path, tmp_path / "u", options=ConvertOptions())
    convert(info.path, tmp_path / "s", options=ConvertOptions(nibble_encoding="s4"))
    u, s = read_tensors(tmp_path / "u"), read_tensors(tmp_path / "s")
    name = info.moe_layers[0].prefix + ".experts.w13_qweight"
    assert bytes(b ^ 0x88 for b in u[name][2]) == s[name][2]
    check_layer_matches_truth(tmp_path / "s", info.moe_layers[0], s)
    assert json.loads((tmp_path / "s" / "config.json").read_text())[CONFIG_BLOCK]["nibble_encoding"] == "s4"


@pytest.mark.parametrize("group,hidden,inter,want", [(-1, 256, 128, (256, 128)), (512, 1024, 512, (256, 256)),
                                                     (64, 128, 128, (64, 64)), (256, 256, 256, (256, 256)),
                                                     (-1, 96, 64, (32, 64)), (32, 64, 32, (32, 32))])
def test_group_sizes_regrouped_losslessly(synth, tmp_path, group, hidden, inter, want):
    info = synth(family="qwen3_moe", hidden=hidden, moe_intermediate=inter, num_experts=2, group_size=group,
                 num_layers=1)
    out = tmp_path / "out"
    convert(info.path, out)
    layer = info.moe_layers[0]
    check_layer_matches_truth(out, layer, read_tensors(out))
    info_block = json.loads((out / "config.json").read_text())[CONFIG_BLOCK]["layers"][layer.prefix]
    assert (info_block["w13_group_size"], info_block["w2_group_size"]) == want


def test_group_size_the_kernel_cannot_run_is_refused(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", hidden=192, moe_intermediate=96, num_experts=2, group_size=48, num_layers=1)
    code, _, err = cli("convert", info.path, tmp_path / "out")
    assert code == 3
    assert "group size 48" in err and "32/64/128/256" in err
    assert not (tmp_path / "out").exists()


def test_sharded_output_index_and_side_files(synth, tmp_path):
    info = synth(family="qwen3_5_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32, num_layers=2)
    out = tmp_path / "out"
    convert(info.path, out, options=ConvertOptions(max_shard_size=50_000))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in tensors.values())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert (out / f).read_bytes() == (info.path / f).read_bytes()
    # the model card: the source's, unchanged, then the gptq2xpu section (tests/test_serving.py)
    assert (out / "README.md").read_bytes().startswith((info.path / "README.md").read_bytes())
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    # the source config survives, the block is added, the quantization description is the
    # gptq2xpu method's (tests/test_serving.py checks every place a source keeps it)
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((info.path / "config.json").read_text())
    src_qc = src_cfg.pop("quantization_config")
    out_qc = cfg.pop("quantization_config")
    assert out_qc["quant_method"] == "gptq2xpu" and out_qc["source_quantization_config"] == src_qc
    assert {k: v for k, v in cfg.items() if k != CONFIG_BLOCK} == src_cfg
    # readable by the reference safetensors library
    from safetensors import safe_open

    for s in shards:
        with safe_open(out / s, "np") as f:
            assert len(list(f.keys())) > 0


def test_dry_run_and_inspect_read_no_tensor_data(synth, tmp_path, cli, monkeypatch):
    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32)
    from gptq2xpu.read import checkpoint as ck

    def boom(*a, **k):
        raise AssertionError("tensor data read during inspect")

    monkeypatch.setattr(ck.Checkpoint, "read_into", boom)
    code, out, err = cli("inspect", info.path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["converted_layers"] == 2 and data["family"] == "qwen3_moe"
    assert data["layers"][0]["experts"] == 4 and data["layers"][0]["hidden_size"] == 128
    assert data["routers_excluded"] == info.router_names
    assert data["bytes_in"] > 0 and data["bytes_out"] > 0
    code, out, err = cli("convert", info.path, tmp_path / "out", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True
    assert not (tmp_path / "out").exists()
    code, out, err = cli("inspect", info.path)
    assert "convert" in out and "model.layers.0.mlp" in out


def test_overwrite_replaces_only_when_complete(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32)
    out = tmp_path / "out"
    assert cli("convert", info.path, out)[0] == 0
    before = _folder_bytes(out)
    code, _, err = cli("convert", info.path, out)
    assert code == 2 and "--overwrite" in err
    assert _folder_bytes(out) == before
    code, _, err = cli("convert", info.path, out, "--overwrite", "--nibble-encoding", "s4")
    assert code == 0
    assert _folder_bytes(out) != before
    assert not list(tmp_path.glob(".out.gptq2xpu-*"))
    # --overwrite never replaces a folder that is not a converted checkpoint
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = cli("convert", info.path, other, "--overwrite")
    assert code == 2 and (other / "notes.txt").read_text() == "keep me"


def test_quantized_router_passthrough_and_dequantize(synth, tmp_path, cli):
    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=8, group_size=32,
                 quantized_router=True)
    code, out, err = cli("convert", info.path, tmp_path / "keep", "--json")
    assert code == 0, err
    assert any("router is GPTQ-quantized" in w for w in json.loads(out)["warnings"])
    kept, src = read_tensors(tmp_path / "keep"), read_tensors(info.path)
    qnames = [n for n in src if ".mlp.gate.q" in n]
    assert qnames and all(kept[n] == src[n] for n in qnames)
    assert cli("verify", tmp_path / "keep", "--source", info.path)[0] == 0
    code, out, err = cli("convert", info.path, tmp_path / "deq", "--dequantize-router", "--json")
    assert code == 0, err
    deq = read_tensors(tmp_path / "deq")
    prefix = info.moe_layers[0].prefix
    assert not any(n.startswith(prefix + ".gate.q") for n in deq)
    dt, shape, raw = deq[prefix + ".gate.weight"]
    assert shape == (8, 128)
    # dequantize the source router independently and compare (float rounding of the stored dtype)
    qw = np.frombuffer(src[prefix + ".gate.qweight"][2], np.int32).reshape(src[prefix + ".gate.qweight"][1])
    sc_dt, sc_shape, sc_raw = src[prefix + ".gate.scales"]
    scales = as_float32(sc_dt, sc_shape, sc_raw)
    codes = gptq_unpack(qw).astype(np.float32)
    g = codes.shape[0] // scales.shape[0]
    want = ((codes - 8) * np.repeat(scales, g, axis=0)).T
    got = as_float32(dt, shape, raw)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)
    assert cli("verify", tmp_path / "deq", "--source", info.path)[0] == 0


def test_output_is_loadable_by_safetensors_torch(tmp_path):
    from safetensors.torch import load_file

    convert(FIXTURE, tmp_path / "o")
    t = load_file(tmp_path / "o" / "model.safetensors")
    assert t["model.layers.0.mlp.experts.w13_qweight"].is_contiguous()
    assert tuple(t["model.layers.0.mlp.experts.w13_qweight"].shape) == (8, 512, 128)
    assert tuple(t["model.layers.0.mlp.experts.w2_scales"].shape) == (8, 256, 2)


def test_scales_split_into_expert_groups_give_the_same_bytes(synth, tmp_path, monkeypatch):
    """A layer's scales are built a few experts per chunk: any split writes the same bytes (regrouped,
    cast and padded scales included)."""
    from gptq2xpu.write import chunks

    info = synth(family="qwen3_moe", hidden=256, moe_intermediate=192, num_experts=6, group_size=64,
                 scale_dtype="bfloat16", num_layers=2)
    opts = ConvertOptions(tp_size=2, scale_dtype="float16")
    convert(info.path, tmp_path / "whole", jobs=2, options=opts)
    for size in (1, 5000):  # one expert per chunk; a few
        monkeypatch.setattr(chunks, "SCALES_CHUNK", size)
        convert(info.path, tmp_path / f"split{size}", jobs=4, options=opts)
        assert _folder_bytes(tmp_path / f"split{size}") == _folder_bytes(tmp_path / "whole")


def test_audit_over_several_threads_reports_as_one(synth, tmp_path):
    """Layers audited on several threads: the same warnings in the same order, and the first
    failing layer's error (not the first to fail in time)."""
    from support.hostile import mutate

    from gptq2xpu.errors import InputError

    info = synth(family="qwen3_moe", hidden=128, moe_intermediate=64, num_experts=4, group_size=32, num_layers=6)

    def zero_groups(t):
        for layer in (4, 1, 3):
            t[f"model.layers.{layer}.mlp.experts.2.up_proj.scales"][1][0, :] = 0

    mutate(info.path, zero_groups)
    one = convert(info.path, tmp_path / "one", jobs=1)["warnings"]
    many = convert(info.path, tmp_path / "many", jobs=16)["warnings"]
    zero = [w for w in one if "exactly zero" in w]
    assert [w.split(".experts")[0] for w in zero] == [f"model.layers.{i}.mlp" for i in (1, 3, 4)]
    assert many == one

    def nan_scales(t):
        for layer in (5, 2):
            t[f"model.layers.{layer}.mlp.experts.0.down_proj.scales"][1][0, 0] = float("nan")

    mutate(info.path, nan_scales)
    for jobs in (1, 16):
        with pytest.raises(InputError, match=r"model\.layers\.2\.mlp\.experts\.0\.down_proj\.scales: non-finite"):
            convert(info.path, tmp_path / f"nan{jobs}", jobs=jobs)
        assert not (tmp_path / f"nan{jobs}").exists()
