"""Hostile and broken inputs, through the real CLI (``python -m gptq2xpu``) as a subprocess.

Every failure must keep one contract (see ``_hostile.assert_clean_failure``): the documented exit
code, exactly one line on stderr naming the file/tensor/layer at fault and the problem, no Python
traceback, the source byte-for-byte unchanged, nothing at OUTPUT and no hidden partial folder.

Errors vs warnings (what the product documents, asserted here):

* NaN / inf scales: **error** (exit 3) naming the scales tensor;
* an all-zero scale group: **warning** (the weight group is all zero, which is representable);
  the conversion proceeds and the output verifies;
* negative scales: **nothing** -- AutoRound's symmetric quantizer writes about half its scales
  negative (the fixture has them), they are legitimate;
* asymmetric or mislabelled qzeros, act-order g_idx: error naming the tensor;
* unsupported bits: the layer is refused, the message names the layer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.helpers import FIXTURE, load_tensors, raw_header, run_cli, write_raw
from support.hostile import (
    L0,
    L1,
    SHARD,
    assert_clean_failure,
    edit_config,
    fixture_copy,
    leftovers,
    mutate,
    split_into_index,
    tree_hashes,
    write_pickle_trap,
)

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------ mutations


def truncate(src: Path):
    b = (src / SHARD).read_bytes()
    (src / SHARD).write_bytes(b[: len(b) * 2 // 3])


def header_edit(fn):
    def apply(src: Path):
        h, d = raw_header(src / SHARD)
        fn(h, len(d))
        write_raw(src / SHARD, h, d)
    return apply


def _past_eof(h, data_len):
    h[f"{L0}.experts.1.up_proj.qweight"]["data_offsets"] = [data_len - 100, data_len - 100 + 32768]


def _size_mismatch(h, data_len):
    h[f"{L0}.experts.1.up_proj.qweight"]["shape"] = [16, 256]  # I32[16,256] = 16 KiB, range holds 32 KiB


def _overlap(h, data_len):
    h[f"{L0}.experts.1.up_proj.qweight"]["data_offsets"] = list(h[f"{L0}.experts.1.gate_proj.qweight"]["data_offsets"])


def _unknown_dtype(h, data_len):
    h["model.norm.weight"]["dtype"] = "Q4_K"


def _huge_header_len(src: Path):
    b = bytearray((src / SHARD).read_bytes())
    b[:8] = (2**62).to_bytes(8, "little")
    (src / SHARD).write_bytes(bytes(b))


def _not_json(src: Path):
    b = bytearray((src / SHARD).read_bytes())
    b[8:12] = b"\xff\xfe{["
    (src / SHARD).write_bytes(bytes(b))


def with_index(fn):
    """Split the fixture into two shards + index, then let ``fn(src, weight_map)`` break it."""
    def apply(src: Path):
        wm = split_into_index(src)
        fn(src, wm)
        (src / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return apply


SHARD2 = "model-00002-of-00002.safetensors"


def _index_dotdot(src, wm):
    (src.parent / "x.safetensors").write_bytes((src / SHARD2).read_bytes())
    for k, v in wm.items():
        if v == SHARD2:
            wm[k] = "../x.safetensors"


def _index_absolute(src, wm):
    for k, v in wm.items():
        if v == SHARD2:
            wm[k] = str((src / SHARD2).resolve())


def _index_symlink_escape(src, wm):
    outside = src.parent / "outside.safetensors"
    os.rename(src / SHARD2, outside)
    (src / SHARD2).symlink_to(outside)


def _index_names_missing_tensor(src, wm):
    wm[f"{L0}.experts.9.up_proj.qweight"] = "model-00001-of-00002.safetensors"


def _index_lacks_shard_tensor(src, wm):
    del wm["model.norm.weight"]


def _index_shard_missing(src, wm):
    (src / SHARD2).unlink()


def _index_wrong_shard(src, wm):
    k = next(k for k, v in wm.items() if v != SHARD2)
    wm[k] = SHARD2


def tensors_edit(fn):
    return lambda src: mutate(src, fn)


def _drop_expert(t):
    for k in [k for k in t if f"{L0}.experts.3." in k]:
        del t[k]


def _expert_shape(t):
    for f in ("qweight", "scales", "qzeros"):
        name = f"{L0}.experts.5.gate_proj.{f}"
        dt, a = t[name]
        t[name] = (dt, np.ascontiguousarray(a[:, : a.shape[1] // 2]))


def _drop_scales(t):
    del t[f"{L1}.experts.2.down_proj.scales"]


def _asym_qzeros(t):
    t[f"{L0}.experts.4.up_proj.qzeros"][1][1, 3] = 0x77777778


def _mislabelled_qzeros(t):  # v2 zero points (0x88888888) under a v1 ("gptq") config
    t[f"{L0}.experts.2.down_proj.qzeros"][1][:] = np.uint32(0x88888888).view(np.int32)


def _act_order(t):
    a = t[f"{L1}.experts.6.gate_proj.g_idx"][1]
    a[:] = np.random.default_rng(0).permutation(a)


def _no_moe(t):
    for k in [k for k in t if ".experts." in k]:
        del t[k]


def _nan_scale(t):
    t[f"{L1}.experts.7.up_proj.scales"][1][1, 5] = np.nan


def _inf_scale(t):
    t[f"{L0}.experts.0.down_proj.scales"][1][0, 0] = -np.inf


def _to_8bit(t):
    """Every expert projection repacked as 8-bit GPTQ (4 codes per int32 word), symmetric."""
    rng = np.random.default_rng(1)
    for name in [k for k in t if ".experts." in k and k.endswith(".qweight")]:
        dt, a = t[name]
        rows, n = a.shape
        t[name] = (dt, rng.integers(-2**31, 2**31, size=(rows * 2, n), dtype=np.int64).astype(np.int32))
        zname = name[: -len("qweight")] + "qzeros"
        zdt, z = t[zname]
        t[zname] = (zdt, np.full((z.shape[0], n * 8 // 32), 0x7F7F7F7F, dtype=np.int32))


def _bits8(src):
    mutate(src, _to_8bit)
    edit_config(src, lambda c: c["quantization_config"].update(bits=8))


def _bits8_no_dynamic(src):
    mutate(src, _to_8bit)
    edit_config(src, lambda c: c["quantization_config"].update(bits=8, dynamic={}))


def _no_quant_config(src):
    edit_config(src, lambda c: c.pop("quantization_config"))


def _config_not_json(src):
    (src / "config.json").write_text('{"model_type": "qwen3_moe", ')


def _bad_dynamic_regex(src):
    edit_config(src, lambda c: c["quantization_config"].update(dynamic={"-:model.layers.(": {}}))


def _side_file_link_escape(src):
    """A tokenizer file that is a link to a private file elsewhere: copying it would leak that file."""
    secret = src.parent / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (src / "tokenizer.json").symlink_to(secret)


def _config_link_escape(src):
    secret = src.parent / "docker-config.json"
    os.rename(src / "config.json", secret)
    (src / "config.json").symlink_to(secret)


# (id, mutation, exit code, words the one error line must contain)
CASES = [
    ("truncated-shard", truncate, 3, [SHARD, "outside the data section"]),
    ("offsets-past-eof", header_edit(_past_eof), 3,
     [SHARD, f"{L0}.experts.1.up_proj.qweight", "outside the data section"]),
    ("size-vs-dtype-shape", header_edit(_size_mismatch), 3, [SHARD, f"{L0}.experts.1.up_proj.qweight", "needs 16384"]),
    ("overlapping-tensors", header_edit(_overlap), 3, [SHARD, f"{L0}.experts.1.up_proj.qweight", "overlap"]),
    ("unknown-dtype", header_edit(_unknown_dtype), 3, [SHARD, "model.norm.weight", "unknown dtype 'Q4_K'"]),
    ("huge-header-length", _huge_header_len, 3, [SHARD, "header length"]),
    ("header-not-json", _not_json, 3, [SHARD, "not valid JSON"]),
    ("index-dotdot", with_index(_index_dotdot), 3, [INDEX, "../x.safetensors", "leaves the folder"]),
    ("index-absolute", with_index(_index_absolute), 3, [INDEX, "absolute path"]),
    ("index-symlink-escape", with_index(_index_symlink_escape), 3, [INDEX, SHARD2, "outside the checkpoint folder"]),
    ("index-tensor-not-in-shard", with_index(_index_names_missing_tensor), 3,
     [INDEX, f"{L0}.experts.9.up_proj.qweight", "not in shard"]),
    ("shard-tensor-not-in-index", with_index(_index_lacks_shard_tensor), 3,
     [SHARD2, "model.norm.weight", "not listed"]),
    ("index-shard-file-missing", with_index(_index_shard_missing), 3, [INDEX, SHARD2, "does not exist"]),
    ("index-wrong-shard", with_index(_index_wrong_shard), 3, [INDEX, "mapped to", "stored in"]),
    ("missing-expert", tensors_edit(_drop_expert), 3, [L0, "expert 3 is missing"]),
    ("experts-different-shapes", tensors_edit(_expert_shape), 3, [L0, f"{L0}.experts.5.gate_proj", "different shapes"]),
    ("missing-scales", tensors_edit(_drop_scales), 3, [L1, "expert 2 down_proj", "scales"]),
    ("unsupported-bits-8", _bits8, 3, [L0, "8-bit", "int4 only"]),
    ("bits-8-config-only", _bits8_no_dynamic, 3, ["quantization_config", "bits 8"]),
    ("asymmetric-qzeros", tensors_edit(_asym_qzeros), 3, [f"{L0}.experts.4.up_proj.qzeros", "asymmetric"]),
    ("mislabelled-qzeros", tensors_edit(_mislabelled_qzeros), 3, [f"{L0}.experts.2.down_proj.qzeros", "mislabelled"]),
    ("act-order-g_idx", tensors_edit(_act_order), 3, [f"{L1}.experts.6.gate_proj.g_idx", "reordered"]),
    ("no-moe-layers", tensors_edit(_no_moe), 3, ["no MoE layers"]),
    ("no-quant-config", _no_quant_config, 3, ["no quantization config"]),
    ("config-not-json", _config_not_json, 3, ["config.json", "not valid JSON"]),
    ("bad-dynamic-regex", _bad_dynamic_regex, 3, ["dynamic rule", "invalid regular expression"]),
    ("side-file-link-escape", _side_file_link_escape, 3, ["tokenizer.json", "outside the checkpoint folder"]),
    ("config-link-escape", _config_link_escape, 3, ["config.json", "outside the checkpoint folder"]),
    ("nan-scale", tensors_edit(_nan_scale), 3, [f"{L1}.experts.7.up_proj.scales", "non-finite scale nan"]),
    ("inf-scale", tensors_edit(_inf_scale), 3, [f"{L0}.experts.0.down_proj.scales", "non-finite scale -inf"]),
]


@pytest.mark.parametrize("mutation,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_convert_refuses_cleanly(tmp_path, mutation, code, words):
    src = fixture_copy(tmp_path / "src")
    mutation(src)
    before = tree_hashes(tmp_path)  # the source and everything beside it (e.g. a symlink target)
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert_clean_failure(proc, code, out, *words)
    after = tree_hashes(tmp_path)
    assert after == before, "source files were modified (or something was left beside OUTPUT)"


@pytest.mark.parametrize("mutation,words", [
    (header_edit(_overlap), ["overlap"]),
    (with_index(_index_dotdot), ["leaves the folder"]),
    (_bits8, [L0, "8-bit"]),
    (tensors_edit(_drop_expert), ["expert 3 is missing"]),
], ids=["overlap", "index-dotdot", "bits-8", "missing-expert"])
def test_inspect_reports_cleanly(tmp_path, mutation, words):
    """``inspect`` (headers only) fails the same way: exit 3, no traceback, names the problem."""
    src = fixture_copy(tmp_path / "src")
    mutation(src)
    before = tree_hashes(src)
    proc = run_cli("inspect", src, "--json")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)  # --json: one object whatever the outcome
    assert doc["status"] == "error" and doc["exit_code"] == 3
    if "refusals" in doc:  # a plan with refused layers: they are listed in the JSON
        assert doc["refusals"] and all(w in doc["refusals"][0] for w in words), doc["refusals"]
    else:  # the plan could not be made: the one error line, also the JSON's message
        line = assert_clean_failure(proc, 3, None, *words)
        assert line == f"gptq2xpu: bad input: {doc['message']}"
    assert tree_hashes(src) == before


# ------------------------------------------------------------------------------ OUTPUT placement


def test_output_equal_to_source(tmp_path):
    src = fixture_copy(tmp_path / "src")
    before = tree_hashes(src)
    proc = run_cli("convert", src, src)
    assert_clean_failure(proc, 2, None, "source folder")
    assert tree_hashes(src) == before
    assert leftovers(src) == []


def test_output_inside_source(tmp_path):
    src = fixture_copy(tmp_path / "src")
    before = tree_hashes(src)
    out = src / "converted"
    proc = run_cli("convert", src, out)
    assert_clean_failure(proc, 2, out, "inside")
    assert tree_hashes(src) == before


def test_output_is_symlink_to_source(tmp_path):
    src = fixture_copy(tmp_path / "src")
    before = tree_hashes(src)
    link = tmp_path / "out"
    link.symlink_to(src)
    proc = run_cli("convert", src, link, "--overwrite")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert tree_hashes(src) == before


def test_output_exists_without_overwrite(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_cli("convert", src, out)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    assert leftovers(out) == []
    # --overwrite does not replace a folder that is not a converted checkpoint either
    proc = run_cli("convert", src, out, "--overwrite")
    assert proc.returncode == 2 and "not a gptq2xpu output" in proc.stderr and "precious.txt" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_only_when_complete(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    out = tmp_path / "out"
    assert run_cli("convert", src, out).returncode == 0
    first = tree_hashes(out)

    # a failing run with --overwrite leaves the old OUTPUT exactly as it was
    bad = fixture_copy(tmp_path / "bad")
    mutate(bad, _nan_scale)
    proc = run_cli("convert", bad, out, "--overwrite")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert tree_hashes(out) == first
    assert leftovers(out) == []

    # a complete run replaces it, atomically: nothing hidden remains
    proc = run_cli("convert", src, out, "--overwrite", "--scale-dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert tree_hashes(out) != first
    assert json.loads((out / "config.json").read_text())["gptq2xpu"]["scale_dtype"] == "bfloat16"
    assert leftovers(out) == []
    v = run_cli("verify", out)
    assert v.returncode == 0, v.stdout + v.stderr


def test_output_parent_is_a_file(tmp_path):
    src = fixture_copy(tmp_path / "src")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    proc = run_cli("convert", src, out)
    assert_clean_failure(proc, 5, out, "cannot create", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------------------ values


def test_all_zero_scale_group_warns_and_converts(tmp_path):
    """A scale group that is all zero means those weights are all zero: representable, so it is a
    WARNING naming the tensor (stdout/JSON ``warnings``), and the conversion succeeds and verifies."""
    src = fixture_copy(tmp_path / "src")

    def zero_group(t):
        t[f"{L1}.experts.7.up_proj.scales"][1][1, :] = 0  # group 1 of every output row

    mutate(src, zero_group)
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = json.loads(proc.stdout)["warnings"]
    assert len(warnings) == 1, warnings
    assert f"{L1}.experts.7.up_proj.scales" in warnings[0] and "256 scale(s) are exactly zero" in warnings[0]
    assert run_cli("verify", out).returncode == 0


def test_negative_scales_are_not_warned_about(tmp_path):
    """AutoRound writes about half its scales negative (the real fixture does): no warning at all."""
    tensors = load_tensors(FIXTURE / SHARD)
    scales = np.concatenate([a.astype(np.float32).ravel() for n, (dt, a) in tensors.items()
                             if ".experts." in n and n.endswith(".scales")])
    assert 0.3 < (scales < 0).mean() < 0.7, "the fixture is expected to hold ~half negative scales"
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert json.loads(proc.stdout)["warnings"] == []
    ins = run_cli("inspect", src, "--json")
    assert ins.returncode == 0 and json.loads(ins.stdout)["warnings"] == []


# ------------------------------------------------------------------------------ pickles, byte order


def test_pickle_trap_is_real(tmp_path):
    marker = tmp_path / "unpickled.marker"
    trap = write_pickle_trap(tmp_path / "ckpt", marker)
    assert trap == tmp_path / "ckpt" / "pytorch_model.bin" and trap.stat().st_size > 0
    assert not marker.exists()
    # prove it in a separate process (never unpickle it here)
    work = tmp_path / "work"
    work.mkdir()
    code = "import pickle, sys\nwith open(sys.argv[1], 'rb') as f:\n    pickle.load(f)\n"
    subprocess.run([sys.executable, "-c", code, str(trap)], cwd=work, check=True, timeout=60,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"})
    assert marker.exists()
    # a relative marker is created relative to the unpickling process's working directory
    trap2 = write_pickle_trap(tmp_path / "ckpt2", "rel.marker")
    subprocess.run([sys.executable, "-c", code, str(trap2)], cwd=work, check=True, timeout=60)
    assert (work / "rel.marker").exists() and not Path("rel.marker").exists()
    assert re.search(rb"open", trap.read_bytes())


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((FIXTURE / "config.json").read_text())
    marker = tmp_path / "UNPICKLED"
    write_pickle_trap(src, marker)
    before = tree_hashes(src)
    for cmd in (["convert", src, tmp_path / "out"], ["inspect", src]):
        proc = run_cli(*cmd)
        assert_clean_failure(proc, 3, tmp_path / "out", "pickle", "pytorch_model.bin")
    assert not marker.exists(), "a pickle was loaded"
    assert tree_hashes(src) == before

    # safetensors next to a pickle: the pickle is ignored (and not copied as a side file)
    fixture_copy(src)
    out = tmp_path / "out"
    assert run_cli("convert", src, out).returncode == 0
    assert not marker.exists()
    assert not (out / "pytorch_model.bin").exists()


def test_big_endian_host_is_refused(tmp_path, monkeypatch):
    from gptq2xpu.errors import InputError
    from gptq2xpu.plan import build_plan
    from gptq2xpu.read import open_checkpoint

    with open_checkpoint(FIXTURE) as ckpt:
        build_plan(ckpt)  # fine on this (little-endian) host
        monkeypatch.setattr(sys, "byteorder", "big")
        with pytest.raises(InputError, match="big-endian"):
            build_plan(ckpt)
        monkeypatch.setattr(sys, "byteorder", "little")
        build_plan(ckpt)
