"""Memory, time and descriptor bounds: what a hostile but small input may make gptq2xpu hold."""

from __future__ import annotations

import json

import pytest
from _hostile import edit_config, fixture_copy, one_error_line
from helpers import run_cli

from gptq2xpu.errors import EXIT_INPUT, InputError
from gptq2xpu.read.paths import MAX_CONFIG_BYTES, MAX_JSON_BYTES, Folder

# ------------------------------------------------------------------------------ config patterns


def test_many_large_dynamic_rules_are_refused_naming_the_rule(tmp_path):
    """Each rule alone is under the per-pattern limit; together they would cost gigabytes."""
    src = fixture_copy(tmp_path / "src")
    rules = {f"-:(?:[^Z]?){{6000}}Z{i}": {} for i in range(200)}
    edit_config(src, lambda c: c["quantization_config"].__setitem__("dynamic", rules))
    proc = run_cli("inspect", src)
    line = one_error_line(proc.stderr, ignore_warnings=True)
    assert proc.returncode == EXIT_INPUT and "dynamic rule '-:(?:[^Z]?){6000}Z1'" in line and "states" in line


# ------------------------------------------------------------------------------ JSON caps by kind


def test_config_documents_have_a_smaller_cap_than_indexes(tmp_path):
    big = b'{"junk": [' + b",".join([b"{}"] * (MAX_CONFIG_BYTES // 3 + 10)) + b"]}"
    assert MAX_CONFIG_BYTES < len(big) < MAX_JSON_BYTES
    for name in ("config.json", "quantize_config.json", "quantization_config.json", "model.safetensors.index.json"):
        (tmp_path / name).write_bytes(big)
    folder = Folder(tmp_path)
    for name in ("config.json", "quantize_config.json", "quantization_config.json"):
        with pytest.raises(InputError, match=name):
            folder.read_json(name)
    assert len(folder.read_json("model.safetensors.index.json")["junk"]) > MAX_CONFIG_BYTES // 3


def test_config_too_large_once_indented_is_refused_before_writing(tmp_path):
    """A compact config under the cap grows past it with indentation: convert refuses it at once
    (naming config.json) instead of writing an output its own verify would reject."""
    src = fixture_copy(tmp_path / "src")
    text = (src / "config.json").read_text().rstrip()
    tokens = ",".join(["0"] * (MAX_CONFIG_BYTES // 4))
    (src / "config.json").write_text(text[:-1] + f', "suppress_tokens": [{tokens}]}}')
    assert (src / "config.json").stat().st_size < MAX_CONFIG_BYTES
    json.loads((src / "config.json").read_text())
    proc = run_cli("convert", src, tmp_path / "out")
    line = one_error_line(proc.stderr, ignore_warnings=True)
    assert proc.returncode == EXIT_INPUT and "config.json" in line and "OUTPUT" in line, line
    assert not (tmp_path / "out").exists()
