"""One tensor-parallel rank's slice of a converted layer's tensors (torch only, no vLLM).

Which rows or columns form rank ``r`` of ``T``'s slice is the contract's
(:meth:`gptq2xpu.contract.LayerGeometry.rank_slices`: of the padded intermediate size ``P``, the
values ``[r*P/T, (r+1)*P/T)``, i.e. those gate rows and those up rows of ``w13_qweight``/``w13_scales``
and those input columns of ``w2_qweight`` and ``w2_scales``); the same slices as the rank folders
``convert --emit-ranks`` writes.
"""

from __future__ import annotations

import torch

from ..contract import ConvertedLayer


def rank_shape(entry: ConvertedLayer, name: str, size: int) -> tuple[int, int, int]:
    """The shape of rank slices of tensor ``name`` of ``entry`` over ``size`` ranks."""
    return entry.geometry.shapes(size)[name]


def copy_rank_slice(entry: ConvertedLayer, name: str, full: torch.Tensor, dst: torch.Tensor, rank: int,
                    size: int) -> None:
    """Copy rank ``rank``'s slice of the whole checkpoint tensor ``full`` into ``dst`` (reading
    only those rows or columns of ``full``)."""
    for src_key, dst_key in entry.geometry.rank_slices(rank, size)[name].pairs():
        dst[dst_key].copy_(full[src_key])
