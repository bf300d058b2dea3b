"""Memory, time and descriptor bounds: what a hostile but small input may make gptq2xpu hold."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.helpers import cli, read_tensors, run_cli, write_raw
from support.hostile import edit_config, fixture_copy, one_error_line
from support.planting import copy_output, patch_tensor, shard_of

from gptq2xpu.errors import EXIT_INPUT, InputError
from gptq2xpu.read import checkpoint
from gptq2xpu.read.checkpoint import Checkpoint
from gptq2xpu.read.paths import MAX_CONFIG_BYTES, MAX_JSON_BYTES, Folder
from gptq2xpu.testing.synth import make_checkpoint
from gptq2xpu.verify import standalone

# ------------------------------------------------------------------------------ config patterns


def test_many_large_dynamic_rules_are_refused_naming_the_rule(tmp_path):
    """Each rule alone is under the per-pattern limit; together they would cost gigabytes."""
    src = fixture_copy(tmp_path / "src")
    rules = {f"-:(?:[^Z]?){{900}}Z{i}": {} for i in range(200)}
    edit_config(src, lambda c: c["quantization_config"].__setitem__("dynamic", rules))
    proc = run_cli("inspect", src)
    line = one_error_line(proc.stderr, ignore_warnings=True)
    assert proc.returncode == EXIT_INPUT and "dynamic rule '-:(?:[^Z]?){900}Z" in line and "together" in line


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


# ------------------------------------------------------------------------------ verify reads in pieces


@pytest.fixture(scope="module")
def ranked_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    info = make_checkpoint(root / "src", family="qwen3_moe", hidden=128, moe_intermediate=192, num_experts=4,
                           top_k=2, group_size=64, num_layers=1, attention=False, vocab=32)
    out = root / "out"
    code, _, stderr = cli("convert", info.path, out, "--tp-size", "2", "--emit-ranks")
    assert code == 0, stderr
    return out


def _reads(monkeypatch) -> dict[str, int]:
    """Record the largest single read of each tensor."""
    largest: dict[str, int] = {}
    original = Checkpoint.read_into

    def spy(self, ref, out, *, offset=0):
        largest[ref.name] = max(largest.get(ref.name, 0), out.nbytes)
        return original(self, ref, out, offset=offset)

    monkeypatch.setattr(Checkpoint, "read_into", spy)
    return largest


def test_verify_reads_scales_in_bounded_pieces(ranked_output, monkeypatch):
    monkeypatch.setattr(standalone, "CHUNK_BYTES", 64)
    largest = _reads(monkeypatch)
    ckpt, block = standalone.open_output(ranked_output)
    with ckpt:
        findings = standalone.Findings()
        standalone.check_layout(ckpt, block, findings)
        assert findings.ok, findings.failures
        scales = [n for n in largest if n.endswith("_scales")]
        assert scales and all(largest[n] <= 64 < ckpt.ref(n).nbytes for n in scales)


def test_verify_finds_a_bad_scale_in_the_last_piece(ranked_output, tmp_path, monkeypatch):
    monkeypatch.setattr(standalone, "CHUNK_BYTES", 64)
    out = copy_output(ranked_output, tmp_path / "out")
    name = "model.layers.0.mlp.experts.w2_scales"

    def last_inf(a):
        a.reshape(-1)[-1] = np.inf
        return a

    patch_tensor(shard_of(out, name), name, last_inf)
    ckpt, block = standalone.open_output(out)
    with ckpt:
        findings = standalone.Findings()
        standalone.check_layout(ckpt, block, findings)
    assert not findings.ok and f"{name}: non-finite scales" in findings.failures[0]


def test_rank_check_reads_one_expert_at_a_time(ranked_output, monkeypatch):
    largest = _reads(monkeypatch)
    ckpt, block = standalone.open_output(ranked_output)
    with ckpt:
        findings = standalone.Findings()
        standalone.check_ranks(ranked_output, ckpt, block, findings)
        assert findings.ok, findings.failures
        assert len(largest) == 4
        assert all(largest[n] <= ckpt.ref(n).nbytes // ckpt.ref(n).shape[0] for n in largest)


# ------------------------------------------------------------------------------ shard descriptors


def _one_shard_per_tensor(src: Path) -> list[str]:
    """Rewrite the fixture's single shard as one shard per tensor, with an index."""
    tensors = read_tensors(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    weight_map = {}
    for i, (name, (dtype, shape, raw)) in enumerate(tensors.items()):
        file = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
        write_raw(src / file, {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(raw)]}}, raw)
        weight_map[name] = file
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sorted(set(weight_map.values()))


def test_more_shards_than_the_descriptor_limit_convert(tmp_path):
    src = fixture_copy(tmp_path / "src")
    files = _one_shard_per_tensor(src)
    limit = 100
    assert len(files) > limit

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.run([sys.executable, "-m", "gptq2xpu", "convert", str(src), str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, timeout=120, preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_shard_swapped_while_closed_is_detected_on_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_OPEN_SHARDS", 1)
    src = fixture_copy(tmp_path / "src")
    files = _one_shard_per_tensor(src)
    with checkpoint.open_checkpoint(src) as ckpt:
        by_file = {ref.file: name for name, ref in ckpt.tensors.items()}
        first, second = by_file[files[0]], by_file[files[1]]
        ckpt.read(first)
        ckpt.read(second)  # the descriptor of files[0] is closed to make room
        assert len(ckpt._fds) == 1
        shutil.copy2(src / files[0], tmp_path / "copy")
        os.replace(tmp_path / "copy", src / files[0])  # same bytes, same mtime, another file
        with pytest.raises(InputError, match=f"{files[0]}: source file was replaced"):
            ckpt.read(first)
