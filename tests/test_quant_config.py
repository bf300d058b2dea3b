"""The quantization-config reader: locations, dynamic rules, and hostile regular expressions."""

from __future__ import annotations

import json

import pytest

from gptq2xpu.errors import InputError
from gptq2xpu.read.quant_config import read_quant_config

REAL_PATTERNS = [
    r"-:.*model\.layers\.0\.mlp\.gate.*",          # AutoRound (the shared fixture)
    r"+:.*\.(\d+)\.mlp\.experts\..*",
    r"model\.layers\.[0-9]+\.self_attn\..*",
    r"-:.*(shared_expert|gate)$",
    r".*layers\.(1|2)\.mlp\.experts\.(?:\d+)\.down_proj",
]


def cfg(dynamic):
    return {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": dynamic}}


def test_real_world_rules_are_accepted_and_applied(tmp_path):
    rules = {p: ({} if p.startswith("-:") else {"group_size": 64}) for p in REAL_PATTERNS}
    qc = read_quant_config(tmp_path, cfg(rules))
    assert not qc.module("model.layers.0.mlp.gate").quantized
    assert qc.module("model.layers.3.mlp.experts.7.up_proj").group_size == 64
    assert qc.module("lm_head").quantized and qc.module("lm_head").group_size == 128


# Patterns on which Python's backtracking re takes exponential or high-polynomial time when the
# name does not match; matched here by the linear-time engine (tests/test_regex.py has the rest).
SUPER_LINEAR = [r"(a+)+b", r"-:(.*a){2,}x", r"+:((ab)+)+$", r"(?:x|(y+))*z", r"-:(\w*)*\.",
                r"-:.*.*.*.*.*.*.*.*=", r"(a|a|ab)*c", r"(x+x+)+y"]


@pytest.mark.parametrize("pattern", SUPER_LINEAR)
def test_patterns_that_backtrack_are_matched_in_linear_time(tmp_path, pattern):
    qc = read_quant_config(tmp_path, cfg({pattern: {}}))
    for name in ("a" * 3000, "ab" * 1500, "x" * 3000, "y" * 3000, "model.layers.0.mlp.experts.0.up_proj"):
        qc.module(name)  # would not return within hours with Python's re on the long names


def test_first_match_wins_and_exclusion(tmp_path):
    qc = read_quant_config(tmp_path, cfg({r"-:.*layers\.1\..*": {}, r".*layers\..*": {"bits": 8}}))
    assert not qc.module("model.layers.1.mlp.experts.0.w1").quantized
    assert qc.module("model.layers.2.mlp.experts.0.w1").bits == 8


def test_nested_text_config_and_separate_files(tmp_path):
    nested = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    qc = read_quant_config(tmp_path, {"text_config": {"quantization_config": nested}})
    assert qc.group_size == 32 and qc.found_in == "config.json:text_config.quantization_config"
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "desc_act": False}))
    qc = read_quant_config(tmp_path, {})
    assert qc.group_size == 64 and qc.found_in == "quantize_config.json" and qc.checkpoint_format == "gptq"
    with pytest.raises(InputError, match="no quantization config.*it has no config.json either: is it the "
                                         "checkpoint's folder"):
        read_quant_config(tmp_path / "nowhere", {})
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"no quantization config .*; is this a GPTQ checkpoint\?$"):
        read_quant_config(tmp_path / "plain", {})


def test_a_name_the_engines_would_read_differently_is_refused_naming_the_rule(tmp_path):
    qc = read_quant_config(tmp_path, cfg({r"-:.*\.(\d+)\.mlp": {}}))
    assert not qc.module("model.layers.3.mlp").quantized
    with pytest.raises(InputError, match=r"dynamic rule -:\.\*.*differently"):
        qc.module("model.layers.٣.mlp")  # an Arabic-Indic digit: \d in Python re, not in RE2
