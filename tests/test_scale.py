"""Size does not change the cost per tensor: headers and indexes are read into compact records.

Memory is asserted with ``tracemalloc`` (it sees Python objects, bytes, bytearrays and numpy
buffers alike), never time: a subprocess timeout only guards against a hang.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from support.helpers import FIXTURE, run_cli, write_raw
from support.hostile import assert_clean_failure

from gptq2xpu import safetensors_io
from gptq2xpu.errors import InputError
from gptq2xpu.read.checkpoint import open_checkpoint
from gptq2xpu.safetensors_io import MAX_HEADER_BYTES, MAX_TENSORS, encode_header, parse_header

MIB = 1 << 20


def _empty_tensors_header(path: Path, count: int, *, fill_to: int | None = None) -> int:
    """Write a safetensors file whose header lists ``count`` zero-size F32 tensors (canonical
    layout), space-padded to ``fill_to`` bytes; returns the header length."""
    with open(path, "wb") as fh:
        fh.write(b"\0" * 8)
        fh.write(b"{")
        n = 1
        step = 100_000
        for lo in range(0, count, step):
            body = b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                             for i in range(lo, min(count, lo + step)))
            if lo:
                fh.write(b",")
                n += 1
            fh.write(body)
            n += len(body)
        fh.write(b"}")
        n += 1
        pad = max(0, (fill_to or 0) - n) + (-(8 + max(n, fill_to or 0)) % 8)
        fh.write(b" " * pad)
        n += pad
        fh.seek(0)
        fh.write(struct.pack("<Q", n))
    return n


def _checkpoint_dir(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text((FIXTURE / "config.json").read_text())
    return root


def test_header_filled_to_the_cap_with_empty_tensors_is_refused_cheaply(tmp_path):
    """~1.8 M zero-size tensors in a 100 MB header: refused in one step, not parsed entry by entry
    (it took over a minute and 1.7 GiB); through the CLI, and in-process with its memory measured."""
    src = _checkpoint_dir(tmp_path / "src")
    count = (MAX_HEADER_BYTES - 64) // 60  # entries of at most 60 bytes: ~1.75 M
    n = _empty_tensors_header(src / "model.safetensors", count, fill_to=MAX_HEADER_BYTES - 8)
    assert count > MAX_TENSORS and n <= MAX_HEADER_BYTES
    proc = run_cli("inspect", src, timeout=300)  # the timeout only guards against a hang
    line = assert_clean_failure(proc, 3, None, "model.safetensors", f"more than {MAX_TENSORS} tensors")
    assert "Traceback" not in proc.stderr, line

    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=f"more than {MAX_TENSORS} tensors"):
            open_checkpoint(src)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the header bytes themselves (100 MB) and little else: no text copy, no per-entry objects
    assert peak < n + 16 * MIB, f"peak {peak / MIB:.0f} MiB for a {n / MIB:.0f} MiB header"


def test_many_tensors_cost_a_few_hundred_bytes_each(tmp_path):
    """300 K tensors (more than any 48-layer MoE holds): parsed, each kept in well under 256 bytes
    (a dict of objects per tensor took over 1 KB), and the transient peak stays near the text."""
    src = _checkpoint_dir(tmp_path / "src")
    count = 300_000
    n = _empty_tensors_header(src / "model.safetensors", count)
    tracemalloc.start()
    try:
        ckpt = open_checkpoint(src)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with ckpt:
        assert len(ckpt.tensors) == count
        t = ckpt.ref("t123456")
        assert (t.dtype, t.shape, t.nbytes, t.file) == ("F32", (0,), 0, "model.safetensors")
        assert "t299999" in ckpt.tensors and "t300000" not in ckpt.tensors
    assert current < 256 * count, f"{current / count:.0f} bytes kept per tensor"
    assert peak < 2 * n + 256 * count, f"peak {peak / MIB:.0f} MiB for {n / MIB:.0f} MiB of header"


def test_an_escaped_key_spelling_still_meets_the_cap(monkeypatch):
    """The up-front count reads one spelling of ``data_offsets``; an escaped one is counted as the
    table grows, and refused at the same cap."""
    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 50)
    entries = ",".join(f'"t{i}": {{"dtype": "F32", "shape": [0], "data\\u005foffsets": [0, 0]}}' for i in range(60))
    body = ("{" + entries + "}").encode()
    raw = struct.pack("<Q", len(body)) + body
    with pytest.raises(InputError, match="more than 50 tensors"):
        parse_header(raw, len(raw), "x.safetensors")
    ok = struct.pack("<Q", len(body)) + body.replace(b"t5", b"u5")  # still 60: refused the same way
    with pytest.raises(InputError, match="more than 50 tensors"):
        parse_header(ok, len(ok), "x.safetensors")


def _spec(i: int) -> tuple[str, str, list[int]]:
    dtypes = ["F16", "BF16", "I32", "U8", "F32", "F8_E4M3", "I64", "BOOL"]
    shape = [[], [3], [2, 5], [1, 0, 4], [7, 1, 1, 2]][i % 5]
    return f"model.layers.{i}.w\u00e9ight.{i % 3}", dtypes[i % len(dtypes)], shape


def test_fast_and_general_paths_read_the_same_header():
    """The canonical layout (one regex per entry) and any other JSON spelling of the same header
    (whitespace, key order, escapes, metadata anywhere) give the same tensors."""
    doc, off = {}, 0
    for i in range(40):
        name, dtype, shape = _spec(i)
        size = safetensors_io.DTYPE_SIZES[dtype]
        for d in shape:
            size *= d
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    meta = {"format": "pt", "note": "a \"quoted\" value"}
    canonical = encode_header({"__metadata__": meta, **doc}) + bytes(off)
    items = list(doc.items())
    loose_doc = dict(items[:20] + [("__metadata__", meta)] + items[20:])
    loose_doc = {k: dict(reversed(list(v.items()))) if isinstance(v, dict) and "dtype" in v else v
                 for k, v in loose_doc.items()}
    loose = json.dumps(loose_doc, indent=3, ensure_ascii=True).encode()
    loose += b" " * (-(8 + len(loose)) % 8)
    loose = struct.pack("<Q", len(loose)) + loose + bytes(off)
    a = parse_header(canonical, len(canonical))
    b = parse_header(loose, len(loose))
    assert a.metadata == b.metadata == meta
    assert list(a.tensors) == list(doc) and set(b.tensors) == set(doc)
    for name in doc:
        x, y = a.tensors[name], b.tensors[name]
        assert (x.dtype, x.shape, x.start - a.data_start, x.end - a.data_start) == \
               (y.dtype, y.shape, y.start - b.data_start, y.end - b.data_start) == \
               (doc[name]["dtype"], tuple(doc[name]["shape"]), *doc[name]["data_offsets"])


@pytest.mark.parametrize("header, needle", [
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
     "duplicate key 'a'"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},}', "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x', "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', "not valid JSON"),
    (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}',
     "overlap"),
    (b'{"__metadata__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "__metadata__"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', "needs 8"),
])
def test_the_fast_path_refuses_what_the_general_one_does(header, needle):
    body = header + b" " * (-(8 + len(header)) % 8)
    raw = struct.pack("<Q", len(body)) + body + bytes(8)
    with pytest.raises(InputError, match=needle):
        parse_header(raw, len(raw), "x.safetensors")


def test_a_tensor_in_two_shards_is_named(tmp_path):
    src = _checkpoint_dir(tmp_path / "src")
    one = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    write_raw(src / "model-00001-of-00002.safetensors", one, bytes(4))
    write_raw(src / "model-00002-of-00002.safetensors", one, bytes(4))
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(InputError, match="'a' appears in both model-00001-of-00002.safetensors and "
                                         "model-00002-of-00002.safetensors"):
        open_checkpoint(src)
