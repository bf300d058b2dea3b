"""Tensor-parallel rank folders (``--emit-ranks``): each rank's slice of every converted layer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..contract import rank_folder
from ..errors import io_error
from ..plan import Plan
from ..read import open_checkpoint
from ..safetensors_io import PlannedTensor, ShardLayout
from .documents import write_doc


def write_ranks(plan: Plan, folder: Path) -> dict:
    """One folder per tensor-parallel rank holding that rank's slice of every converted layer.

    Rank r of T gets, per expert, gate and up rows ``[r*P/T, (r+1)*P/T)`` (w13 and its scales) and
    w2 columns (inputs) ``[r*P/T, (r+1)*P/T)`` with their scale groups, under the same tensor names
    as the full checkpoint.  The bytes are sliced from the full tensors just written, so each rank
    file is exactly a slice of the verified whole.
    """
    t = plan.options.tp_size
    files: dict[str, dict] = {}
    full = open_checkpoint(folder)
    try:
        for r in range(t):
            sub = folder / rank_folder(r, t)
            try:
                sub.mkdir(parents=True)
            except OSError as exc:
                raise io_error("cannot create", sub, exc) from None
            items = []
            for lyr in plan.converted:
                for tensor, slicer in _rank_slicers(lyr, r, t):
                    items.append((tensor, slicer))
            layout = ShardLayout([it[0] for it in items], {"format": "pt", "tp_rank": str(r), "tp_size": str(t)})
            path = sub / "model.safetensors"
            digest = hashlib.sha256()
            try:
                with open(path, "wb") as fh:
                    fh.write(layout.header)
                    digest.update(layout.header)
                    for _, slicer in items:
                        for chunk in slicer(full):
                            mv = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                            digest.update(mv)
                            fh.write(mv)
            except OSError as exc:
                raise io_error("cannot write", path, exc) from None
            rel = f"{rank_folder(r, t)}/model.safetensors"
            files[rel] = {"sha256": digest.hexdigest(), "size": layout.file_size}
            slices = {lyr.prefix: {"intermediate_slice": [r * lyr.geometry.padded // t,
                                                          (r + 1) * lyr.geometry.padded // t]}
                      for lyr in plan.converted}
            doc = {"tp_rank": r, "tp_size": t, "layers": slices}
            files[f"{rank_folder(r, t)}/rank.json"] = write_doc(sub, "rank.json",
                                                                (json.dumps(doc, indent=2) + "\n").encode())
    finally:
        full.close()
    return files


def _rank_slicers(layer, r: int, t: int):
    """(PlannedTensor, slicer) for rank r's four tensors; slicer(full_ckpt) yields arrays per expert."""
    g = layer.geometry
    e, k, p = g.experts, g.hidden, g.padded
    pt = p // t
    sd = layer.scale_dtype
    item = 2 if sd in ("F16", "BF16") else 4
    specs = [
        ("w13_qweight", "U8", (e, 2 * pt, k // 2), 1, (2 * p, k // 2), "rows"),
        ("w13_scales", sd, (e, 2 * pt, k // g.g13), item, (2 * p, k // g.g13), "rows"),
        ("w2_qweight", "U8", (e, k, pt // 2), 1, (k, p // 2), "cols"),
        ("w2_scales", sd, (e, k, pt // g.g2), item, (k, p // g.g2), "cols"),
    ]
    for what, dtype, shape, isz, per_expert, how in specs:
        name = layer.output_name(what)

        def slicer(full, name=name, per_expert=per_expert, how=how, isz=isz, shape=shape):
            ref = full.ref(name)
            rows, cols = per_expert
            buf = np.empty(rows * cols * isz, dtype=np.uint8)
            for ex in range(e):
                full.read_into(ref, buf, offset=ex * buf.nbytes)
                m = buf.reshape(rows, cols * isz)
                if how == "rows":  # gate rows then up rows of this rank
                    yield m[r * pt : (r + 1) * pt]
                    yield m[p + r * pt : p + (r + 1) * pt]
                else:
                    c = shape[2] * isz
                    yield m[:, r * c : (r + 1) * c]

        yield PlannedTensor(name, dtype, shape), slicer
