"""Test helpers: read a converted output straight from its shards, tamper with it the way a buggy
converter (or a corrupted transfer) would, and the planted defects themselves.

* :func:`patch_tensor` rewrites one tensor's bytes in place inside a safetensors file; the header,
  and so the index, stay valid.
* :func:`reseal` recomputes the sha256 and size of files in ``gptq2xpu-manifest.json``, as a
  converter that wrote those bytes itself would have: the manifest check then passes and only
  the content checks can find the defect.
* :func:`remove_tensor` rewrites a shard without one tensor (and, optionally, the index).
* ``DEFECTS``: converter bugs planted into a good conversion of ``BASE`` (``verify --source``
  must catch each one).

:func:`convert` and :func:`verify_json` run the CLI in-process (``helpers.cli``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from gptq2xpu.contract import MANIFEST_NAME
from gptq2xpu.verify.reference import moe_forward, route
from gptq2xpu.verify.unpack import xpu_dequant
from support.helpers import cli, raw_header, read_tensor, tensor_span, write_raw

INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------- the CLI


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


def output_tensor(folder: Path, name: str) -> np.ndarray:
    """A tensor of a converted output, read straight from its shard (BF16 as raw uint16 bits)."""
    return read_tensor(shard_of(folder, name), name)


def router_weight(folder: Path, prefix: str) -> torch.Tensor:
    """A converted layer's (BF16) router weight as float32, read straight from its shard."""
    bits = output_tensor(folder, f"{prefix}.gate.weight")
    return torch.from_numpy(bits.astype(np.uint32) << 16).view(torch.float32)


def reference_moe(folder: Path, prefix: str, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The MoE of a converted layer (float16 scales) from its full tensors read straight from the
    shards, not through the loader: scales in x's dtype, routed with the layer's router."""
    enc = json.loads((Path(folder) / "config.json").read_text())["gptq2xpu"]["nibble_encoding"]
    t = {w: torch.from_numpy(output_tensor(folder, f"{prefix}.experts.{w}"))
         for w in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")}
    w13 = xpu_dequant(t["w13_qweight"], t["w13_scales"].to(x.dtype), enc)
    w2 = xpu_dequant(t["w2_qweight"], t["w2_scales"].to(x.dtype), enc)
    tw, ti = route(x, router_weight(folder, prefix), top_k)
    return moe_forward(x.float(), w13, w2, tw, ti)


def patch_tensor(path: Path, name: str, fn) -> tuple[np.ndarray, np.ndarray]:
    """Replace tensor ``name`` of the safetensors file ``path`` by ``fn(array)`` (same dtype and
    shape), in place.  Returns ``(before, after)``."""
    _, _, start, end = tensor_span(path, name)
    before = read_tensor(path, name)
    after = np.ascontiguousarray(fn(before.copy()))
    assert after.dtype == before.dtype and after.shape == before.shape, (after.dtype, after.shape)
    assert after.nbytes == end - start
    with open(path, "r+b") as fh:
        fh.seek(start)
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
    header, data = raw_header(shard)
    removed = header.pop(name)
    kept = sorted((spec["data_offsets"][0], n) for n, spec in header.items() if n != "__metadata__")
    chunks, rel = [], 0
    for _, n in kept:
        begin, end = header[n]["data_offsets"]
        header[n] = dict(header[n], data_offsets=[rel, rel + end - begin])
        chunks.append(data[begin:end])
        rel += end - begin
    write_raw(shard, header, b"".join(chunks))
    changed = [shard.relative_to(folder).as_posix()]
    if update_index:
        idx = json.loads((folder / INDEX).read_text())
        del idx["weight_map"][name]
        idx["metadata"]["total_size"] -= removed["data_offsets"][1] - removed["data_offsets"][0]
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


def reseal_all(folder: Path) -> None:
    """Re-seal every file the manifest lists that is a plain file now (a link or a missing file is left
    as listed): only the content checks can object to what was changed."""
    folder = Path(folder)
    listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    reseal(folder, *(n for n in listed if (folder / n).is_file() and not (folder / n).is_symlink()))


def edit_block(folder: Path, fn) -> None:
    """Edit the gptq2xpu block of ``folder/config.json`` with ``fn(block)`` and re-seal the manifest."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg["gptq2xpu"])
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    reseal(folder, "config.json")


# ------------------------------------------------------------------------------- floats


def bf16_truncate(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits by truncation (the wrong cast: no round-to-nearest-even)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ------------------------------------------------------------------------------- planted defects
# Into a good conversion of BASE (``info``: its synth ground truth). Each planter modifies the
# output folder (bytes only: dtypes and shapes unchanged, so the index and the headers stay valid)
# and re-seals the manifest.

K, N, E, G = 128, 64, 8, 32
L0, L1 = "model.layers.0.mlp", "model.layers.1.mlp"
BASE = dict(family="qwen3_moe", hidden=K, moe_intermediate=N, num_experts=E, top_k=2, group_size=G,
            num_layers=2, attention=False, vocab=32)


def tensor_name(prefix, what):
    return f"{prefix}.experts.{what}"


def plant_nibble_swap(out, info, e=3, prefix=L0):
    """Low/high nibbles of every byte of one expert's w13 rows swapped."""
    def fn(w):
        w[e] = (w[e] << 4) | (w[e] >> 4)
        return w
    before, after = patch_output_tensor(out, tensor_name(prefix, "w13_qweight"), fn)
    assert not np.array_equal(before, after)


def plant_gate_up_swap(out, info, e=5, prefix=L0):
    """One expert's gate and up halves swapped (codes and their scales together)."""
    for what in ("w13_qweight", "w13_scales"):
        def fn(w):
            w[e] = np.concatenate([w[e, N:], w[e, :N]])
            return w
        patch_output_tensor(out, tensor_name(prefix, what), fn)


def plant_scales_doubled(out, info, e=2, prefix=L1):
    """One expert's scales doubled (fp16: exactly one more in the exponent)."""
    for what in ("w13_scales", "w2_scales"):
        def fn(s):
            s[e] = (s[e].astype(np.float32) * 2).astype(np.float16)
            return s
        patch_output_tensor(out, tensor_name(prefix, what), fn)


def plant_router_changed(out, info, prefix=L1):
    """One value of a router weight changed (bf16 raw bits)."""
    def fn(w):
        w[1, 7] ^= np.uint16(0x0100)
        return w
    patch_output_tensor(out, f"{prefix}.gate.weight", fn)


def plant_w2_column_shift(out, info, e=6, prefix=L0):
    """One expert's w2 rows shifted by one byte (two input columns) along N."""
    def fn(w):
        w[e] = np.roll(w[e], 1, axis=1)
        return w
    patch_output_tensor(out, tensor_name(prefix, "w2_qweight"), fn)


def plant_w13_row_shift(out, info, e=1, prefix=L1):
    """One expert's w13 rows off by one (a wrong row offset when stacking)."""
    def fn(w):
        w[e] = np.roll(w[e], 1, axis=0)
        return w
    patch_output_tensor(out, tensor_name(prefix, "w13_qweight"), fn)


def plant_bf16_truncated(out, info, e=4, prefix=L0):
    """One expert's fp16 -> bf16 scale cast done by truncation instead of round-to-nearest-even."""
    layer = next(lyr for lyr in info.moe_layers if lyr.prefix == prefix)
    want = np.concatenate([layer.scales["gate"][e], layer.scales["up"][e]])  # float32 [2N, K/G]

    def fn(s):
        s[e] = bf16_truncate(want)
        return s
    before, after = patch_output_tensor(out, tensor_name(prefix, "w13_scales"), fn)
    assert not np.array_equal(before, after), "no scale rounds up; pick another seed"


DEFECTS = {
    # name: (planter, uses the bf16 conversion, checks that must fail)
    "nibble order swapped in one expert": (plant_nibble_swap, False, {"bit-exact experts", "reference MoE"}),
    "gate/up halves swapped in one expert": (plant_gate_up_swap, False, {"bit-exact experts", "reference MoE"}),
    "one expert's scales doubled": (plant_scales_doubled, False, {"bit-exact experts", "reference MoE"}),
    "router weight changed": (plant_router_changed, False, {"pass-through tensors"}),
    "w2 of one expert column-shifted": (plant_w2_column_shift, False, {"bit-exact experts", "reference MoE"}),
    "w13 of one expert row-shifted": (plant_w13_row_shift, False, {"bit-exact experts", "reference MoE"}),
    "scales of one expert cast to bf16 by truncation": (plant_bf16_truncated, True,
                                                         {"bit-exact experts", "reference MoE"}),
}
