"""Odd but parseable values never crash (exit 1) nor hang: configs, tensor names, part counts,
scales that overflow a cast, and a converted folder's config block handed to verify, finalize and
the loader."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import run_cli
from support.hostile import L0, edit_config, fixture_copy, mutate, one_error_line

from gptq2xpu.contract import CONFIG_BLOCK, parse_block
from gptq2xpu.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, InputError
from gptq2xpu.load import open_converted

# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("key,value", [
    ("num_experts_per_tok", "2"), ("num_experts_per_tok", float("nan")), ("num_experts_per_tok", -1),
    ("num_experts_per_tok", True), ("norm_topk_prob", "yes"),
])
def test_odd_routing_values_are_bad_input(tmp_path, key, value):
    src = fixture_copy(tmp_path / "src")
    edit_config(src, lambda c: c.__setitem__(key, value))
    proc = run_cli("inspect", src)
    assert proc.returncode == EXIT_INPUT and key in one_error_line(proc.stderr, ignore_warnings=True)


def test_string_routed_scaling_factor_is_bad_input(tmp_path):
    src = fixture_copy(tmp_path / "src")
    edit_config(src, lambda c: c.update(model_type="deepseek_v3", routed_scaling_factor="2.5"))
    proc = run_cli("inspect", src)
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "routed_scaling_factor" in one_error_line(proc.stderr, ignore_warnings=True)


def test_lone_surrogate_in_a_config_string_is_bad_input(tmp_path):
    src = fixture_copy(tmp_path / "src")
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text.replace('"model_type"', '"note": "\\ud800", "model_type"', 1))
    proc = run_cli("convert", src, tmp_path / "out")
    assert proc.returncode == EXIT_INPUT and "config.json" in one_error_line(proc.stderr, ignore_warnings=True)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ names and numbers


def test_tensor_name_with_a_huge_number_passes_through(tmp_path):
    src = fixture_copy(tmp_path / "src")
    name = "model.extra." + "9" * 5000 + ".weight"
    mutate(src, lambda t: t.__setitem__(name, ("F32", np.arange(4, dtype=np.float32))))
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert run_cli("verify", out, "--source", src, "--no-numeric").returncode == EXIT_OK


def test_expert_numbered_beyond_any_model_is_refused_without_allocating(tmp_path):
    src = fixture_copy(tmp_path / "src")

    def add(t):
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            dtype, arr = t[f"{L0}.experts.0.gate_proj.{field}"]
            t[f"{L0}.experts.99999999999.gate_proj.{field}"] = (dtype, arr.copy())

    mutate(src, add)
    proc = run_cli("inspect", src, timeout=60)
    assert proc.returncode == EXIT_INPUT and "out of range" in one_error_line(proc.stderr, ignore_warnings=True)


@pytest.mark.parametrize("part", ["1/10000000000", "3/2", "0/4", "1/" + "9" * 5000])
def test_absurd_part_counts_are_usage_errors(tmp_path, part):
    src = fixture_copy(tmp_path / "src")
    proc = run_cli("convert", src, tmp_path / "out", "--part", part, timeout=60)
    assert proc.returncode == EXIT_USAGE and "--part" in one_error_line(proc.stderr, ignore_warnings=True)
    assert not (tmp_path / "out").exists()


def test_float16_cast_that_overflows_is_refused_naming_the_tensor(tmp_path):
    src = fixture_copy(tmp_path / "src")
    name = f"{L0}.experts.3.down_proj.scales"
    edit_config(src, lambda c: None)

    def big(t):
        dtype, arr = t[name]
        f32 = arr.astype(np.float32)
        f32[0, 1] = 1e6  # representable in float32 (and bf16), not in float16
        t[name] = ("F32", f32)
        for role in ("gate_proj", "up_proj", "down_proj"):
            for e in range(8):
                key = f"{L0}.experts.{e}.{role}.scales"
                if key != name:
                    t[key] = ("F32", t[key][1].astype(np.float32))

    mutate(src, big)
    proc = run_cli("convert", src, tmp_path / "out", "--scale-dtype", "float16")
    assert proc.returncode == EXIT_INPUT and "F16" in proc.stderr, proc.stderr
    assert name in one_error_line(proc.stderr, ignore_warnings=True)
    assert not (tmp_path / "out").exists()
    proc = run_cli("convert", src, tmp_path / "out2", "--scale-dtype", "bfloat16")
    assert proc.returncode == EXIT_INPUT and "model.layers.1" in proc.stderr or proc.returncode == EXIT_OK


# ------------------------------------------------------------------------------ the config block


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("block")
    src = fixture_copy(base / "src")
    out = base / "out"
    assert run_cli("convert", src, out).returncode == EXIT_OK
    return src, out, json.loads((out / "config.json").read_text())


LAYER_KEYS = ["experts", "hidden_size", "intermediate_size", "padded_intermediate_size", "w13_group_size",
              "w2_group_size", "scale_dtype", "source_format", "source_projections", "source_group_size"]
ODD = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                          st.integers(), max_size=2))


@st.composite
def broken_blocks(draw, block):
    doc = copy.deepcopy(block)
    layer = next(iter(doc["layers"]))
    where = draw(st.sampled_from(["layer", "top", "routing", "drop-layer-key", "drop-top-key"]))
    if where == "layer":
        doc["layers"][layer][draw(st.sampled_from(LAYER_KEYS))] = draw(ODD)
    elif where == "top":
        doc[draw(st.sampled_from(["format_version", "nibble_encoding", "tp_size", "tp_ranks", "layers",
                                  "routers", "routing"]))] = draw(ODD)
    elif where == "routing":
        doc["routing"][draw(st.sampled_from(["top_k", "scoring", "renormalize", "routed_scaling_factor"]))] = draw(ODD)
    elif where == "drop-layer-key":
        doc["layers"][layer].pop(draw(st.sampled_from(LAYER_KEYS)))
    else:
        doc.pop(draw(st.sampled_from(["format_version", "nibble_encoding", "layers"])))
    return doc


def test_parse_block_accepts_what_convert_writes(converted):
    _, _, cfg = converted
    block = parse_block(cfg[CONFIG_BLOCK])
    assert block.layers and block.nibble_encoding == "u4b8"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_block_parses_or_raises_input_error(converted, data):
    _, _, cfg = converted
    doc = data.draw(broken_blocks(cfg[CONFIG_BLOCK]))
    try:
        parse_block(doc)
    except InputError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400


@pytest.mark.parametrize("edit", [
    lambda b: b["layers"]["model.layers.0.mlp"].__setitem__("experts", 0),
    lambda b: b["layers"]["model.layers.0.mlp"].__setitem__("hidden_size", -256),
    lambda b: b["layers"]["model.layers.0.mlp"].__setitem__("w2_group_size", "128"),
    lambda b: b["layers"]["model.layers.0.mlp"].pop("padded_intermediate_size") and
    b["layers"]["model.layers.0.mlp"].pop("intermediate_size"),
    lambda b: b.__setitem__("tp_ranks", ["../../etc"]),
    lambda b: b.__setitem__("layers", []),
    lambda b: b["routing"].__setitem__("top_k", 1e9),
], ids=["zero-experts", "negative-size", "string-group", "missing-sizes", "rank-path", "layers-list", "float-top-k"])
def test_a_broken_block_fails_verify_finalize_and_the_loader_cleanly(converted, tmp_path, edit):
    src, out, cfg = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    doc = copy.deepcopy(cfg)
    edit(doc[CONFIG_BLOCK])
    (bad / "config.json").write_text(json.dumps(doc))
    for args in (("verify", bad), ("verify", bad, "--source", src, "--no-numeric")):
        proc = run_cli(*args)
        assert proc.returncode == EXIT_VERIFY, proc.stdout + proc.stderr
        assert "config block" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(InputError):
        open_converted(bad)
    # finalize reads the config it writes from the part plan: a tampered one is refused
    split = tmp_path / "split"
    assert run_cli("convert", src, split, "--part", "1/1").returncode == EXIT_OK
    plan = split / ".gptq2xpu-parts" / "plan.json"
    pdoc = json.loads(plan.read_text())
    pcfg = json.loads(pdoc["config"])
    edit(pcfg[CONFIG_BLOCK])
    pdoc["config"] = json.dumps(pcfg)
    plan.write_text(json.dumps(pdoc))
    proc = run_cli("finalize", split)
    assert proc.returncode == EXIT_INPUT and "plan.json" in one_error_line(proc.stderr, ignore_warnings=True)


@pytest.mark.parametrize("version", [99, "1", None])
def test_a_manifest_of_an_unknown_format_version_fails_verify(converted, tmp_path, version):
    src, out, _ = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    manifest = bad / "gptq2xpu-manifest.json"
    doc = json.loads(manifest.read_text())
    doc["format_version"] = version
    manifest.write_text(json.dumps(doc))
    for args in (("verify", bad), ("verify", bad, "--source", src, "--no-numeric")):
        proc = run_cli(*args)
        assert proc.returncode == EXIT_VERIFY, proc.stdout + proc.stderr
        assert f"format_version {version!r} is not 1" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("field,value,says", [
    ("format", "other", "'format' is 'other'"),
    ("layers", {"a": 1}, "'layers' must hold the lists"),
    ("layers", {"converted": ["model.layers.0.mlp"], "passthrough": [], "unconverted": []},
     "'layers.converted' does not list the layers"),
])
def test_a_manifest_whose_fields_lie_fails_verify(converted, tmp_path, field, value, says):
    src, out, _ = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    manifest = bad / "gptq2xpu-manifest.json"
    doc = json.loads(manifest.read_text())
    assert len(doc["layers"]["converted"]) > 1  # the last case drops one
    doc[field] = value
    manifest.write_text(json.dumps(doc))
    proc = run_cli("verify", bad)
    assert proc.returncode == EXIT_VERIFY and says in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert run_cli("verify", out).returncode == EXIT_OK
