"""Tensor-parallel rank folders (``--emit-ranks``): each rank's slice of every converted layer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..contract import rank_folder, tensor_dtype
from ..errors import io_error
from ..plan import Plan
from ..read import open_checkpoint
from ..safetensors_io import BITS_DTYPES, PlannedTensor, ShardLayout
from .documents import write_doc


def write_ranks(plan: Plan, folder: Path) -> dict:
    """One folder per tensor-parallel rank holding that rank's slice of every converted layer.

    Rank r of T gets, per expert, the rows or columns of each tensor that the contract's
    :meth:`~gptq2xpu.contract.LayerGeometry.rank_slices` names (the intermediate values
    ``[r*P/T, (r+1)*P/T)``: those gate and up rows of w13, those w2 inputs, and their scales), under
    the same tensor names as the full checkpoint.  The bytes are sliced from the full tensors just written, so each rank
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
            items = [item for lyr in plan.converted for item in _rank_slicers(lyr, r, t)]
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
            slices = {lyr.prefix: {"intermediate_slice": list(lyr.geometry.intermediate_slice(r, t))}
                      for lyr in plan.converted}
            doc = {"tp_rank": r, "tp_size": t, "layers": slices}
            files[f"{rank_folder(r, t)}/rank.json"] = write_doc(sub, "rank.json",
                                                                (json.dumps(doc, indent=2) + "\n").encode())
    finally:
        full.close()
    return files


def _rank_slicers(layer, r: int, t: int):
    """(PlannedTensor, slicer) for rank r's four tensors; slicer(full_ckpt) yields rank r's slice
    of each expert in turn, cut as the contract's :meth:`~gptq2xpu.contract.LayerGeometry.rank_slices` says."""
    geo = layer.geometry
    rank_shapes = geo.shapes(t)
    for what, part in geo.rank_slices(r, t).items():
        name = layer.output_name(what)
        dtype = tensor_dtype(what, layer.scale_dtype)

        def slicer(full, name=name, part=part, shape=rank_shapes[what], bits=BITS_DTYPES[dtype]):
            ref = full.ref(name)
            buf = np.empty(ref.shape[1:], dtype=bits)
            for ex in range(ref.shape[0]):
                full.read_into(ref, buf, offset=ex * buf.nbytes)
                dst = np.empty(shape[1:], dtype=bits)
                for src_key, dst_key in part.pairs():
                    dst[dst_key] = buf[src_key]
                yield dst

        yield PlannedTensor(name, dtype, rank_shapes[what]), slicer
