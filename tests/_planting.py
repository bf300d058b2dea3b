"""Test helpers: run the CLI in-process, and tamper with a converted output the way a buggy
converter (or a corrupted transfer) would.

* :func:`cli` runs ``gptq2xpu ...`` in this process (no interpreter start-up per call) and
  returns ``(exit code, stdout, stderr)``.
* :func:`patch_tensor` rewrites one tensor's bytes in place inside a safetensors file, located
  through :func:`gptq2xpu.safetensors_io.read_header`; the header, and so the index, stay valid.
* :func:`reseal` recomputes the sha256 and size of files in ``gptq2xpu-manifest.json``, as a
  converter that wrote those bytes itself would have: the manifest check then passes and only
  the content checks can find the defect.
* :func:`remove_tensor` rewrites a shard without one tensor (and, optionally, the index).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np

from gptq2xpu import MANIFEST_NAME
from gptq2xpu.safetensors_io import NUMPY_DTYPES, encode_header, read_header

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------- the CLI


def cli(*args) -> tuple[int, str, str]:
    """Run ``gptq2xpu *args`` in-process: ``(exit code, stdout, stderr)``."""
    from gptq2xpu.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = None
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own handler: keep pytest's
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return (0 if code is None else int(code)), out.getvalue(), err.getvalue()


def verify_json(out, *extra) -> tuple[int, dict]:
    """``gptq2xpu verify OUT --json --device cpu *extra`` -> (exit code, report)."""
    code, stdout, stderr = cli("verify", out, "--json", "--device", "cpu", *extra)
    try:
        report = json.loads(stdout)
    except ValueError:
        raise AssertionError(f"verify printed no JSON (exit {code}): {stdout!r} {stderr!r}") from None
    return code, report


def failed_checks(report: dict) -> set[str]:
    return {c["check"] for c in report["checks"] if not c["ok"]}


def convert(src, out, *options) -> dict:
    code, stdout, stderr = cli("convert", src, out, "--json", *options)
    assert code == 0, f"convert failed ({code}): {stderr}"
    return json.loads(stdout)


def copy_output(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    return dest


# ------------------------------------------------------------------------------- tensors


def shard_of(folder: Path, name: str) -> Path:
    """The shard holding ``name`` according to the output's index."""
    wm = json.loads((Path(folder) / INDEX).read_text())["weight_map"]
    return Path(folder) / wm[name]


def _np_dtype(dtype: str) -> np.dtype:
    if dtype == "BF16":
        return np.dtype("<u2")  # raw bf16 bit patterns
    return NUMPY_DTYPES[dtype]


def read_tensor(path: Path, name: str) -> np.ndarray:
    """A tensor of a safetensors file as numpy (BF16 as raw uint16 bit patterns)."""
    entry = read_header(path).tensors[name]
    with open(path, "rb") as fh:
        fh.seek(entry.start)
        raw = fh.read(entry.nbytes)
    return np.frombuffer(raw, dtype=_np_dtype(entry.dtype)).reshape(entry.shape).copy()


def patch_tensor(path: Path, name: str, fn) -> tuple[np.ndarray, np.ndarray]:
    """Replace tensor ``name`` of the safetensors file ``path`` by ``fn(array)`` (same dtype and
    shape), in place.  Returns ``(before, after)``."""
    entry = read_header(path).tensors[name]
    before = read_tensor(path, name)
    after = np.ascontiguousarray(fn(before.copy()))
    assert after.dtype == before.dtype and after.shape == before.shape, (after.dtype, after.shape)
    assert after.nbytes == entry.nbytes
    with open(path, "r+b") as fh:
        fh.seek(entry.start)
        fh.write(after.tobytes())
    return before, after


def patch_output_tensor(folder: Path, name: str, fn, *, seal: bool = True):
    """Patch a tensor of a converted output (located through its index) and re-seal the manifest."""
    shard = shard_of(folder, name)
    res = patch_tensor(shard, name, fn)
    if seal:
        reseal(folder, shard.relative_to(folder).as_posix())
    return res


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


def remove_tensor(folder: Path, name: str, *, update_index: bool = True, seal: bool = True) -> None:
    """Rewrite the shard holding ``name`` without it; fix the index (weight_map, total_size) and
    re-seal, unless told not to."""
    folder = Path(folder)
    shard = shard_of(folder, name)
    hdr = read_header(shard)
    keep = sorted((t for t in hdr.tensors.values() if t.name != name), key=lambda t: t.start)
    doc: dict = {}
    if hdr.metadata:
        doc["__metadata__"] = dict(hdr.metadata)
    chunks, rel = [], 0
    with open(shard, "rb") as fh:
        for t in keep:
            fh.seek(t.start)
            data = fh.read(t.nbytes)
            doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [rel, rel + len(data)]}
            chunks.append(data)
            rel += len(data)
    tmp = shard.with_name(shard.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(encode_header(doc))
        for c in chunks:
            fh.write(c)
    os.replace(tmp, shard)
    changed = [shard.relative_to(folder).as_posix()]
    if update_index:
        idx = json.loads((folder / INDEX).read_text())
        del idx["weight_map"][name]
        idx["metadata"]["total_size"] -= hdr.tensors[name].nbytes
        (folder / INDEX).write_text(json.dumps(idx, indent=2) + "\n")
        changed.append(INDEX)
    if seal:
        reseal(folder, *changed)


# ------------------------------------------------------------------------------- manifest


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reseal(folder: Path, *names: str) -> None:
    """Recompute sha256 and size of ``names`` (paths relative to ``folder``) in the manifest."""
    folder = Path(folder)
    mpath = folder / MANIFEST_NAME
    doc = json.loads(mpath.read_text())
    for n in names:
        assert n in doc["files"], f"{n} is not in the manifest"
        p = folder / n
        doc["files"][n] = {"sha256": sha256_of(p), "size": p.stat().st_size}
    mpath.write_text(json.dumps(doc, indent=2) + "\n")


def edit_block(folder: Path, fn) -> None:
    """Edit the gptq2xpu block of ``folder/config.json`` with ``fn(block)`` and re-seal the manifest."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["gptq2xpu"])
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    reseal(folder, "config.json")


# ------------------------------------------------------------------------------- floats


def f16_bits_to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def bf16_truncate(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits by truncation (the wrong cast: no round-to-nearest-even)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
