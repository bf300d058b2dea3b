"""Fuzzing the untrusted-input readers: safetensors headers, the index, the quantization config.

Property everywhere: an input either parses (and then what was parsed is self-consistent) or raises
:class:`gptq2xpu.errors.InputError` -- never any other exception type.  Budgets are bounded
(``max_examples``) so the whole file runs in a few seconds; hypothesis keeps the failing examples it
finds in its database so a regression is replayed first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.helpers import write_arrays

from gptq2xpu.contract import INDEX_NAME
from gptq2xpu.errors import InputError
from gptq2xpu.read.checkpoint import open_checkpoint
from gptq2xpu.read.quant_config import read_quant_config
from gptq2xpu.safetensors_io import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    encode_header,
    parse_header,
    read_header,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_parsed(hdr, file_size: int) -> None:
    """What a successful parse promises: every range inside the data section, sized by dtype x shape,
    and no two non-empty ranges overlapping."""
    assert hdr.data_start >= 8 and hdr.data_start <= file_size
    spans = []
    for t in hdr.tensors.values():
        assert t.dtype in DTYPE_SIZES
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert hdr.data_start <= t.start <= t.end <= file_size
        assert t.end - t.start == math.prod(t.shape) * DTYPE_SIZES[t.dtype]
        if t.end > t.start:
            spans.append((t.start, t.end))
    spans.sort()
    for (_, e0), (s1, _) in zip(spans, spans[1:]):
        assert s1 >= e0
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in hdr.metadata.items())


def _parse(raw: bytes, file_size: int):
    try:
        hdr = parse_header(raw, file_size, "fuzz.safetensors")
    except InputError as exc:
        assert "\n" not in str(exc)
        return None
    _check_parsed(hdr, file_size)
    return hdr


# ----------------------------------------------------------------------------- random bytes


@FUZZ
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=1 << 40))
@example(b"", 0)
@example(b"\x00" * 8, 8)
@example(struct.pack("<Q", 2) + b"{}", 10)
@example(struct.pack("<Q", 2) + b"[]", 10)
@example(struct.pack("<Q", 2**64 - 1) + b"{}", 2**40)
@example(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", 2**40)
def test_parse_header_random_bytes(raw, extra):
    _parse(raw, len(raw) + extra % 4096)
    _parse(raw, extra)  # the file size claimed by the caller may be anything too


# ----------------------------------------------------------------------------- structured headers

DTYPES = st.one_of(
    st.sampled_from(sorted(DTYPE_SIZES)),
    st.sampled_from(["F4", "f16", "", "BF16 ", "I128", "__metadata__"]),
    st.integers(), st.none(), st.lists(st.just("F16"), max_size=2),
)
DIM = st.one_of(st.integers(min_value=0, max_value=9), st.integers(min_value=-3, max_value=2**70),
                st.booleans(), st.floats(allow_nan=True), st.text(max_size=2), st.none())
SHAPES = st.one_of(st.lists(st.integers(min_value=0, max_value=9), max_size=4), st.lists(DIM, max_size=20),
                   st.integers(), st.text(max_size=3), st.none(), st.dictionaries(st.text(max_size=2), DIM, max_size=2))
OFFSET = st.one_of(st.integers(min_value=0, max_value=600), st.integers(min_value=-2**65, max_value=2**65),
                   st.booleans(), st.floats(), st.none(), st.text(max_size=2))
OFFSETS = st.one_of(st.lists(st.integers(min_value=0, max_value=600), min_size=2, max_size=2),
                    st.lists(OFFSET, max_size=4), st.integers(), st.none(), st.text(max_size=4))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5))
ANY_JSON = st.recursive(JSON_LEAF, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=4), c, max_size=3)),
                        max_leaves=8)
METADATA = st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3), ANY_JSON)


@st.composite
def entry(draw):
    """A header entry: mostly plausible (right keys, small shapes, in-range offsets), sometimes not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY_JSON)
    e = {}
    if draw(st.integers(0, 19)):
        e["dtype"] = draw(DTYPES)
    if draw(st.integers(0, 19)):
        e["shape"] = draw(SHAPES)
    if draw(st.integers(0, 19)):
        dtype, shape = e.get("dtype"), e.get("shape")
        consistent = (isinstance(dtype, str) and dtype in DTYPE_SIZES and isinstance(shape, list)
                      and all(type(d) is int and 0 <= d < 10 for d in shape))
        if consistent and draw(st.booleans()):
            begin = draw(st.integers(0, 600))
            size = math.prod(shape) * DTYPE_SIZES[dtype]
            e["data_offsets"] = [begin, begin + size + draw(st.sampled_from([0, 0, 0, 1, -1]))]
        else:
            e["data_offsets"] = draw(OFFSETS)
    if draw(st.integers(0, 9)) == 0:
        e[draw(st.text(max_size=3))] = draw(JSON_LEAF)
    return e


def _dump_pairs(pairs) -> bytes:
    """A JSON object from (key, value) pairs -- duplicate keys allowed, as hostile writers may do."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


@st.composite
def header_file(draw):
    names = st.one_of(st.sampled_from(["a", "b", "w.qweight", "__metadata__", ""]), st.text(max_size=6))
    pairs = draw(st.lists(st.tuples(names, entry()), max_size=6))
    pairs = [(k, draw(METADATA) if k == "__metadata__" else v) for k, v in pairs]
    kind = draw(st.integers(0, 19))
    if kind == 0:
        body = json.dumps(draw(ANY_JSON)).encode()           # non-object / arbitrary JSON
    elif kind == 1:
        body = _dump_pairs(pairs)[: draw(st.integers(0, 40))]  # cut JSON
    elif kind == 2:
        body = b"\xff\xfe" + _dump_pairs(pairs)                 # not UTF-8
    elif kind == 3:
        body = b"[" * 100_000                                    # nesting bomb
    else:
        body = _dump_pairs(pairs)
    body += b" " * draw(st.integers(0, 8))
    data_len = draw(st.integers(0, 700))
    n = len(body)
    lie = draw(st.integers(0, 9))
    if lie == 0:
        n = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 1000, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1]))
        n = max(0, min(n, 2**64 - 1))
    return struct.pack("<Q", n) + body + bytes(data_len)


@FUZZ
@given(header_file())
def test_parse_header_structured(raw):
    _parse(raw, len(raw))


@FUZZ
@given(header_file(), st.integers(0, 64))
def test_parse_header_truncated_prefix(raw, cut):
    # a prefix of the file handed over with the full size (what read_header does) or a short size
    _parse(raw[: max(0, len(raw) - cut)], len(raw))
    _parse(raw, max(0, len(raw) - cut))


@st.composite
def valid_file(draw):
    """A well-formed header + data; then maybe one byte-level or field-level mutation."""
    n = draw(st.integers(0, 5))
    doc = {}
    off = 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        doc[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    if draw(st.booleans()):
        doc["__metadata__"] = {"format": "pt"}
    names = [k for k in doc if k != "__metadata__"]
    mutation = draw(st.integers(0, 8))
    if names and mutation == 1:     # offsets shifted: overlaps, gaps, out of range
        k = draw(st.sampled_from(names))
        b, e = doc[k]["data_offsets"]
        d = draw(st.integers(-8, 8))
        doc[k]["data_offsets"] = [b + d, e + d]
    elif names and mutation == 2:   # dtype swapped (size mismatch unless same width)
        doc[draw(st.sampled_from(names))]["dtype"] = draw(DTYPES)
    elif names and mutation == 3:   # shape changed
        doc[draw(st.sampled_from(names))]["shape"] = draw(SHAPES)
    elif names and mutation == 4:   # two tensors share a range
        a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
        doc[a]["data_offsets"] = list(doc[b]["data_offsets"])
        doc[a]["shape"], doc[a]["dtype"] = list(doc[b]["shape"]), doc[b]["dtype"]
    elif mutation == 5:
        doc["__metadata__"] = draw(METADATA)
    raw = encode_header(doc) + bytes(off)
    if mutation == 6 and raw:       # flip one byte anywhere (length, JSON, data)
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    elif mutation == 7:             # file cut or grown
        raw = raw[: len(raw) - draw(st.integers(0, 16))] + bytes(draw(st.integers(0, 3)))
    return raw, mutation, off


@FUZZ
@given(valid_file())
def test_parse_header_mutated_valid(case):
    raw, mutation, data_len = case
    hdr = _parse(raw, len(raw))
    if mutation == 0:  # not mutated: must parse, to exactly what was written
        assert hdr is not None, "a well-formed header was rejected"
        assert hdr.file_size == len(raw) and hdr.data_start + data_len == len(raw)


def test_parse_header_specific_rejections():
    """The named violations, each with its own message (a baseline the fuzzers extend)."""
    def raw(doc, data=0):
        return encode_header(doc) + bytes(data)

    cases = {
        "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12),
        "outside": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
        "needs": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, 16),
        "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, 16),
        "bad shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4),
        "__metadata__": ({"__metadata__": {"a": 1}}, 0),
    }
    for needle, (doc, data) in cases.items():
        b = raw(doc, data)
        with pytest.raises(InputError, match=needle):
            parse_header(b, len(b), "x.safetensors")
    dup = struct.pack("<Q", 16) + b'{"a":{},"a":{}} '
    with pytest.raises(InputError, match="duplicate"):
        parse_header(dup, len(dup))
    huge = struct.pack("<Q", 2**63) + b"{}"
    with pytest.raises(InputError, match="header length"):
        parse_header(huge, 2**64)
    arr = struct.pack("<Q", 8) + b"[1,2,3] "
    with pytest.raises(InputError, match="not a JSON object"):
        parse_header(arr, len(arr))


# ----------------------------------------------------------------------------- read_header (files)


@pytest.fixture(scope="module")
def scratch_dir():
    d = Path(tempfile.mkdtemp(prefix="gptq2xpu-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@FEW
@given(st.one_of(header_file(), valid_file().map(lambda c: c[0]), st.binary(max_size=64)))
def test_read_header_files(scratch_dir, raw):
    p = scratch_dir / "f.safetensors"
    p.write_bytes(raw)
    try:
        hdr = read_header(p)
    except InputError as exc:
        assert str(p) in str(exc)
        return
    _check_parsed(hdr, len(raw))


def test_read_header_not_a_file(scratch_dir):
    d = scratch_dir / "dir.safetensors"
    d.mkdir(exist_ok=True)
    with pytest.raises(InputError, match="cannot read"):
        read_header(d)
    with pytest.raises(InputError, match="cannot read"):
        read_header(scratch_dir / "missing.safetensors")


# ----------------------------------------------------------------------------- the index


@pytest.fixture(scope="module")
def index_root(tmp_path_factory):
    """A real two-shard checkpoint (tiny tensors) plus traps around it: a file outside the folder,
    a symlink escaping to it, a sub-folder, a directory named like a shard."""
    base = tmp_path_factory.mktemp("fuzz-index")
    root = base / "ckpt"
    root.mkdir()
    write_arrays(root / "s1.safetensors", {"a": np.zeros(2, np.float32), "b": np.ones(3, np.int32)})
    write_arrays(root / "s2.safetensors", {"c": np.zeros(4, np.float16)})
    write_arrays(base / "outside.safetensors", {"z": np.zeros(1, np.float32)})
    (root / "escape.safetensors").symlink_to(base / "outside.safetensors")
    (root / "sub").mkdir()
    write_arrays(root / "sub" / "s3.safetensors", {"d": np.zeros(1, np.float32)})
    (root / "dir.safetensors").mkdir()
    (root / "config.json").write_text("{}")
    return root


FILE_NAMES = st.one_of(
    st.sampled_from(["s1.safetensors", "s2.safetensors", "sub/s3.safetensors", "escape.safetensors",
                     "dir.safetensors", "../outside.safetensors", "/etc/passwd", "./s1.safetensors",
                     "s1.safetensors/", "sub//s3.safetensors", "C:\\x.safetensors", "\\\\srv\\s",
                     "s1.safetensors\x00", "", "\ud800.safetensors", "x" * 300, "nope.safetensors",
                     "sub/../s1.safetensors", "config.json"]),
    st.text(max_size=12), st.integers(), st.none(), st.lists(st.just("s1.safetensors"), max_size=2),
)
TENSOR_NAMES = st.one_of(st.sampled_from(["a", "b", "c", "d", "z", "__metadata__"]), st.text(max_size=4))


@st.composite
def index_doc(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(ANY_JSON)
    if kind == 1:
        return {"weight_map": draw(ANY_JSON)}
    wm = draw(st.dictionaries(TENSOR_NAMES, FILE_NAMES, max_size=6))
    if draw(st.booleans()):  # start from the correct map and perturb it
        wm = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", **wm}
    doc = {"weight_map": wm}
    if draw(st.booleans()):
        doc["metadata"] = draw(ANY_JSON)
    return doc


@FUZZ
@given(index_doc(), st.integers(0, 9))
@example({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}}, 9)
@example({"weight_map": {"a": "\ud800.safetensors"}}, 9)
@example({"weight_map": {"a": "x" * 300}}, 9)
def test_index_fuzz(index_root, doc, form):
    p = index_root / INDEX_NAME
    if form == 0:
        p.write_bytes(json.dumps(doc).encode()[: len(json.dumps(doc)) // 2])   # cut
    elif form == 1:
        p.write_bytes(b"\xff" + json.dumps(doc).encode())                         # not UTF-8
    else:
        p.write_text(json.dumps(doc))
    try:
        ckpt = open_checkpoint(index_root)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    with ckpt:
        wm = doc["weight_map"]
        # parsed: the map is exactly what the shards hold, and every shard is a real file inside the root
        assert {n: r.file for n, r in ckpt.tensors.items()} == wm
        root_real = os.path.realpath(index_root)
        for f in ckpt.shards:
            real = os.path.realpath(index_root / f)
            assert real.startswith(root_real + os.sep) and os.path.isfile(real)


def test_index_escapes_refused(index_root):
    p = index_root / INDEX_NAME
    for name, needle in (("../outside.safetensors", "leaves"), ("/etc/passwd", "absolute"),
                         ("escape.safetensors", "outside"), ("nope.safetensors", "does not exist")):
        p.write_text(json.dumps({"weight_map": {"a": name}}))
        with pytest.raises(InputError, match=needle):
            open_checkpoint(index_root)


# ----------------------------------------------------------------------------- quantization config

REGEX_BITS = st.sampled_from(list("ab.*+?()[]{}|^$\\-:,0123456789") + ["(?P<", "(?<=", "\\N{", "{99999999999}",
                                                                        "(" * 200, ")" * 200, "+:", "-:", "re:"])
PATTERN = st.one_of(st.lists(REGEX_BITS, max_size=12).map("".join), st.text(max_size=10),
                    st.sampled_from([".*experts.*", "-:.*gate.*", "+:.*down_proj", "a{4294967296}",
                                     "(" * 1000 + ")" * 1000, "[z-a]", "x" * 2001]))
OVERRIDES = st.one_of(
    st.fixed_dictionaries({}, optional={"bits": st.one_of(st.sampled_from([2, 3, 4, 8, 16, 32]), JSON_LEAF),
                                        "group_size": st.one_of(st.sampled_from([-1, 0, 32, 128]), JSON_LEAF),
                                        "sym": JSON_LEAF, "desc_act": JSON_LEAF}),
    ANY_JSON,
)
GPTQ_QC = st.fixed_dictionaries({}, optional={
    "quant_method": st.one_of(st.sampled_from(["gptq", "GPTQ", "auto-round", "intel/auto-round", "awq",
                                               "compressed-tensors"]), JSON_LEAF),
    "bits": st.one_of(st.sampled_from([4, 8]), JSON_LEAF),
    "group_size": st.one_of(st.sampled_from([-1, 32, 128]), JSON_LEAF),
    "sym": JSON_LEAF, "desc_act": JSON_LEAF,
    "checkpoint_format": st.one_of(st.sampled_from(["gptq", "gptq_v2", "marlin"]), JSON_LEAF),
    "packing_format": st.one_of(st.sampled_from(["auto_gptq", "auto_round"]), JSON_LEAF),
    "dynamic": st.one_of(st.dictionaries(PATTERN, OVERRIDES, max_size=3), ANY_JSON),
    "extra_config": st.one_of(st.dictionaries(PATTERN, OVERRIDES, max_size=3), ANY_JSON),
})
CT_WEIGHTS = st.one_of(st.fixed_dictionaries({}, optional={
    "num_bits": st.one_of(st.just(4), JSON_LEAF), "group_size": st.one_of(st.just(128), JSON_LEAF),
    "strategy": st.one_of(st.sampled_from(["group", "channel", "tensor"]), JSON_LEAF),
    "type": st.one_of(st.sampled_from(["int", "float"]), JSON_LEAF), "symmetric": JSON_LEAF,
    "actorder": JSON_LEAF}), ANY_JSON)
CT_QC = st.fixed_dictionaries({"quant_method": st.just("compressed-tensors")}, optional={
    "format": JSON_LEAF,
    "config_groups": st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(
        st.fixed_dictionaries({"weights": CT_WEIGHTS}), ANY_JSON), max_size=2), ANY_JSON),
    "ignore": st.one_of(st.lists(st.one_of(PATTERN, PATTERN.map(lambda p: "re:" + p), JSON_LEAF), max_size=3),
                        ANY_JSON),
})
QC = st.one_of(GPTQ_QC, CT_QC, ANY_JSON)


@st.composite
def config_dict(draw):
    qc = draw(QC)
    where = draw(st.integers(0, 5))
    if where == 0:
        return {"quantization_config": qc}
    if where == 1:
        return {draw(st.sampled_from(["text_config", "llm_config", "thinker_config"])): {"quantization_config": qc}}
    if where == 2:
        return {"text_config": draw(ANY_JSON), "quantization_config": qc}
    return draw(st.dictionaries(st.text(max_size=4), ANY_JSON, max_size=3))


MODULES = ["m.e.0.up", "a", "x.gate", "", "b.b.b.b"]  # short names: a pathological pattern cannot backtrack for long


@FUZZ
@given(config_dict(), st.one_of(st.none(), QC.map(lambda q: json.dumps(q).encode()), st.binary(max_size=40)),
       st.sampled_from(["quantization_config.json", "quantize_config.json"]))
@example({"quantization_config": {"quant_method": "compressed-tensors",
                                  "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": 128}}},
                                  "ignore": 5}},
         None, "quantize_config.json")
@example({"quantization_config": {"dynamic": {"a{99999999999}": {}}}}, None, "quantize_config.json")
@example({"quantization_config": {"dynamic": {"(" * 999 + ")" * 999: {}}}}, None, "quantize_config.json")
def test_quant_config_fuzz(scratch_dir, config, side_file, side_name):
    root = scratch_dir / "qc"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    if side_file is not None:
        (root / side_name).write_bytes(side_file)
    try:
        qc = read_quant_config(root, config)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert qc.method in ("gptq", "compressed-tensors")
    assert type(qc.bits) is int and type(qc.group_size) is int
    qc.describe()
    for name in MODULES:  # the per-module rules are applied lazily: they may still refuse, cleanly
        try:
            mq = qc.module(name)
        except InputError:
            continue
        assert type(mq.bits) is int and type(mq.group_size) is int
