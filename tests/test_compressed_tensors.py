"""compressed-tensors ``pack-quantized`` input.

``tests/fixtures/ct-pack-quantized`` was packed by the real compressed-tensors 0.20.0 compressor
(see its README and ``scripts/make_ct_fixture.py``); these tests do not need that package.  The
fixture's ``ground_truth.safetensors`` holds the int4 values and scales the script chose, stored
in an order unlike any packer's; the converted codes must match them bit for bit.  Synth-built
compressed-tensors checkpoints convert and verify too, and asymmetric zero points or reordered
``weight_g_idx`` are refused (exit 3) with a message naming the tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.helpers import CT_FIXTURE, load_tensors, read_tensor, write_arrays
from support.planting import convert, edit_block, failed_checks, output_tensor, patch_tensor, verify_json

from gptq2xpu.contract import CONFIG_BLOCK, parse_block
from gptq2xpu.errors import EXIT_INPUT, EXIT_VERIFY
from gptq2xpu.safetensors_io import read_header
from gptq2xpu.testing.synth import make_checkpoint, pack_int32

L, E, K, N, G = 2, 4, 128, 64, 32
PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def truth(layer: int, role: str) -> tuple[np.ndarray, np.ndarray]:
    """(int values [E, out, in] in -8..7, scale bits uint16 [E, out, in/G]) from the ground-truth file."""
    gt = CT_FIXTURE / "ground_truth.safetensors"
    b = read_tensor(gt, f"layers.{layer}.{role}.codes_hi_lo").astype(np.int16)
    vals = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=np.int16)
    vals[..., 0::2] = (b >> 4) - 8          # even column: high nibble
    vals[..., 1::2] = (b & 0xF) - 8
    return vals, read_tensor(gt, f"layers.{layer}.{role}.scales")


def xpu_values(packed: np.ndarray, encoding: str) -> np.ndarray:
    """Converted bytes [..., R, C/2] -> int values [..., R, C] by the contract's nibble order."""
    b = packed.astype(np.int16)
    nib = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=np.int16)
    nib[..., 0::2] = b & 0xF                # column 2j: low nibble
    nib[..., 1::2] = b >> 4
    if encoding == "u4b8":
        return nib - 8
    return np.where(nib >= 8, nib - 16, nib)


# ----------------------------------------------------------------------------- the real fixture


def test_fixture_is_what_compressed_tensors_writes():
    cfg = json.loads((CT_FIXTURE / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["format"], q["version"], q["quantization_status"]) == \
        ("compressed-tensors", "pack-quantized", "0.20.0", "compressed")
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 32)
    hdr = read_header(CT_FIXTURE / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.down_proj"
    packed, scale = hdr.tensors[f"{name}.weight_packed"], hdr.tensors[f"{name}.weight_scale"]
    assert (packed.dtype, packed.shape) == ("I32", (K, N // 8))
    assert (scale.dtype, scale.shape) == ("BF16", (K, N // G))
    assert read_tensor(CT_FIXTURE / "model.safetensors", f"{name}.weight_shape").tolist() == [K, N]
    assert not any(n.endswith(("weight_zero_point", "weight_g_idx")) for n in hdr.tensors)
    assert sum(p.stat().st_size for p in CT_FIXTURE.iterdir()) < 300_000


def test_fixture_packing_matches_the_documented_layout():
    """weight_packed [N, K/8] int32, packed along K LSB first, values + 8 (contract doc, section 4)."""
    for layer in range(L):
        for role, proj in PROJ.items():
            vals, scales = truth(layer, role)
            for e in range(E):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                words = read_tensor(CT_FIXTURE / "model.safetensors", f"{name}.weight_packed").view(np.uint32)
                unpacked = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], axis=-1).reshape(words.shape[0], -1)
                assert np.array_equal(unpacked.astype(np.int16) - 8, vals[e]), name
                assert np.array_equal(read_tensor(CT_FIXTURE / "model.safetensors", f"{name}.weight_scale"), scales[e])


@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
def test_fixture_converts_bit_exact_and_verifies(tmp_path, encoding):
    out = tmp_path / "out"
    summary = convert(CT_FIXTURE, out, "--nibble-encoding", encoding)
    assert summary["quantization"]["quant_method"] == "compressed-tensors"
    block = parse_block(json.loads((out / "config.json").read_text())[CONFIG_BLOCK])
    for entry in block.layers.values():  # what the source was, as the block records it
        assert (entry.source_format, entry.source_group_size) == ("compressed-tensors", {r: G for r in PROJ})
        assert entry.source_projections == PROJ
    assert [(lyr["action"], lyr["kind"]) for lyr in summary["layers"]] == [("convert", "compressed-tensors")] * L
    for layer in range(L):
        p = f"model.layers.{layer}.mlp.experts"
        w13 = xpu_values(output_tensor(out, f"{p}.w13_qweight"), encoding)      # [E, 2N, K]
        w2 = xpu_values(output_tensor(out, f"{p}.w2_qweight"), encoding)        # [E, K, N]
        s13 = output_tensor(out, f"{p}.w13_scales")                            # bf16 bits [E, 2N, K/G]
        s2 = output_tensor(out, f"{p}.w2_scales")
        (gv, gs), (uv, us), (dv, ds) = (truth(layer, r) for r in ("gate", "up", "down"))
        assert np.array_equal(w13[:, :N], gv) and np.array_equal(w13[:, N:], uv) and np.array_equal(w2, dv)
        assert np.array_equal(s13[:, :N], gs) and np.array_equal(s13[:, N:], us) and np.array_equal(s2, ds)
    code, report = verify_json(out, "--source", CT_FIXTURE)
    assert code == 0 and report["status"] == "ok", report["failures"]
    assert all(r["ok"] for r in report["layers"]) and len(report["layers"]) == L


def test_fixture_tensor_parallel_ranks(tmp_path):
    out = tmp_path / "out"
    convert(CT_FIXTURE, out, "--tp-size", "2", "--emit-ranks", "--scale-dtype", "float16")
    code, report = verify_json(out, "--source", CT_FIXTURE)
    assert code == 0, report["failures"]
    assert any(c["check"] == "tensor-parallel ranks" and c["ok"] for c in report["checks"])


# ----------------------------------------------------------------------------- synth-built


SYNTH = dict(quant_format="compressed-tensors", hidden=128, moe_intermediate=64, num_experts=4, top_k=2,
             group_size=32, num_layers=2, attention=False, vocab=32)


@pytest.mark.parametrize("spec,options", [
    (dict(), ()),
    (dict(family="mixtral", scale_dtype="bfloat16"), ("--nibble-encoding", "s4")),
    (dict(group_size=-1), ()),
    (dict(family="deepseek_v3", first_dense=1, num_layers=3), ("--scale-dtype", "bfloat16")),
], ids=["qwen3", "mixtral-bf16-s4", "channel", "deepseek_v3"])
def test_synth_ct_converts_and_verifies(tmp_path, spec, options):
    info = make_checkpoint(tmp_path / "src", **dict(SYNTH, **spec))
    out = tmp_path / "out"
    convert(info.path, out, *options)
    encoding = "s4" if "s4" in options else "u4b8"
    for layer in info.moe_layers:
        w13 = xpu_values(output_tensor(out, f"{layer.prefix}.experts.w13_qweight"), encoding)
        w2 = xpu_values(output_tensor(out, f"{layer.prefix}.experts.w2_qweight"), encoding)
        n = layer.codes["gate"].shape[1]
        assert np.array_equal(w13[:, :n], layer.codes["gate"].astype(np.int16) - 8)
        assert np.array_equal(w13[:, n:], layer.codes["up"].astype(np.int16) - 8)
        assert np.array_equal(w2, layer.codes["down"].astype(np.int16) - 8)
    code, report = verify_json(out, "--source", info.path)
    assert code == 0 and report["status"] == "ok", report["failures"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("spec,field", [(dict(asymmetric=True), "weight_zero_point"),
                                        (dict(act_order=True), "weight_g_idx")])
def test_synth_ct_refusals(cli, tmp_path, spec, field):
    info = make_checkpoint(tmp_path / "src", **dict(SYNTH, **spec))
    code, stdout, stderr = cli("convert", info.path, tmp_path / "out")
    assert code == EXIT_INPUT, stderr
    assert f"model.layers.0.mlp.experts.0.gate_proj.{field}" in stderr, stderr
    assert not (tmp_path / "out").exists()


def _fixture_with(tmp_path: Path, field: str, make) -> Path:
    """A copy of the fixture where every expert projection also has ``field`` = ``make(name, out, in)``
    (as compressed-tensors writes an asymmetric or actorder checkpoint: on every module)."""
    src = tmp_path / "src"
    shutil.copytree(CT_FIXTURE, src)
    path = src / "model.safetensors"
    arrays = load_tensors(path)
    for layer in range(L):
        for role, proj in PROJ.items():
            out_f, in_f = (K, N) if role == "down" else (N, K)
            for e in range(E):
                module = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                arrays[f"{module}.{field}"] = ("I32", make(module, out_f, in_f))
    write_arrays(path, arrays, {"format": "pt"})
    return src


def _ct_zero_points(values: np.ndarray) -> np.ndarray:
    """compressed-tensors packs signed zero points like the weights: value + 8, along N (packed_dim=0)."""
    return pack_int32((values + 8).astype(np.uint8), 4, axis=0)


ODD_ZP = "model.layers.1.mlp.experts.2.down_proj"


def _zero_points(odd: int | None = None, everywhere: int = 0):
    def make(module, out_f, in_f):
        z = np.full((out_f, in_f // G), everywhere, dtype=np.int64)
        if odd is not None and module == ODD_ZP:
            z[5, 1] = odd
        return _ct_zero_points(z)
    return make


def test_fixture_symmetric_zero_points_accepted(tmp_path):
    """weight_zero_point present but 0 everywhere (stored as 0x88888888): symmetric in the data."""
    src = _fixture_with(tmp_path, "weight_zero_point", _zero_points())
    convert(src, tmp_path / "out")
    code, report = verify_json(tmp_path / "out", "--source", src)
    assert code == 0, report["failures"]


@pytest.mark.parametrize("odd,everywhere,named", [(3, 0, ODD_ZP), (-1, 0, ODD_ZP),
                                                  (None, -8, "model.layers.0.mlp.experts.0.gate_proj")])
def test_fixture_asymmetric_zero_points_refused(cli, tmp_path, odd, everywhere, named):
    """One non-zero zero point refuses the layer, naming its tensor.  -8 everywhere packs to all-zero
    words: still asymmetric (the data is decoded, not compared with 0)."""
    src = _fixture_with(tmp_path, "weight_zero_point", _zero_points(odd, everywhere))
    code, _, stderr = cli("convert", src, tmp_path / "out")
    assert code == EXIT_INPUT, stderr
    assert f"{named}.weight_zero_point" in stderr and "asymmetric" in stderr, stderr
    assert not (tmp_path / "out").exists()


def _g_idx(odd_module: str | None = None):
    def make(module, out_f, in_f):
        src = np.random.default_rng(0).permutation(in_f) if module == odd_module else np.arange(in_f)
        return (src // G).astype(np.int32)
    return make


def test_fixture_actorder_refused_and_static_g_idx_accepted(cli, tmp_path):
    odd = "model.layers.0.mlp.experts.3.up_proj"
    src = _fixture_with(tmp_path / "a", "weight_g_idx", _g_idx(odd))
    code, _, stderr = cli("convert", src, tmp_path / "a" / "out")
    assert code == EXIT_INPUT and f"{odd}.weight_g_idx" in stderr and "reordered" in stderr, stderr
    # weight_g_idx in natural order (actorder without reordering) says nothing the scales don't
    src = _fixture_with(tmp_path / "b", "weight_g_idx", _g_idx())
    convert(src, tmp_path / "b" / "out")
    code, report = verify_json(tmp_path / "b" / "out", "--source", src)
    assert code == 0, report["failures"]


@pytest.mark.parametrize("field", ["weight_zero_point", "weight_g_idx"])
def test_verify_checks_source_zero_points_and_g_idx_itself(tmp_path, field):
    """The verifier does not trust the converter's refusal: a source whose zero points / g_idx are
    changed in place after conversion (headers, hence the fingerprint, unchanged) fails bit-exact.
    The sampled data fingerprint may or may not see so small a change; it is dropped from the output
    so that what is tested is the bit-exact check itself."""
    make = _zero_points() if field == "weight_zero_point" else _g_idx()
    src = _fixture_with(tmp_path, field, make)
    convert(src, tmp_path / "out")
    name = f"{ODD_ZP}.{field}"

    def plant(a):
        if field == "weight_zero_point":
            a[0, 0] = np.int32(0x88888889 - (1 << 32))     # one zero point 1 instead of 0
        else:
            a[[0, 40]] = a[[40, 0]]                        # two rows of different groups swapped
        return a

    patch_tensor(src / "model.safetensors", name, plant)
    edit_block(tmp_path / "out", lambda block: block["source"].pop("data_fingerprint"))
    code, report = verify_json(tmp_path / "out", "--source", src)
    assert code == EXIT_VERIFY
    assert failed_checks(report) == {"bit-exact experts"}, report["failures"]
    assert name in report["failures"][0]
