"""One tensor-parallel rank's slice of a converted layer's tensors (torch only, no vLLM).

Rank ``r`` of ``T`` holds, of the (possibly zero-padded) expert intermediate size ``P``, the slice
``[r*P/T, (r+1)*P/T)``: those gate rows and those up rows of ``w13_qweight``/``w13_scales`` (gate
rows first), and those input columns of ``w2_qweight`` (bytes: two inputs each) and ``w2_scales``
(whole groups: ``convert --tp-size T`` makes sure they are).  The same slices as the rank folders
``convert --emit-ranks`` writes.
"""

from __future__ import annotations

import torch

from ..contract import W2_QWEIGHT, W2_SCALES, W13_QWEIGHT, W13_SCALES, ConvertedLayer

_ROWS = (W13_QWEIGHT, W13_SCALES)
_COLUMNS = (W2_QWEIGHT, W2_SCALES)


def rank_shape(entry: ConvertedLayer, name: str, size: int) -> tuple[int, int, int]:
    """The shape of rank slices of tensor ``name`` of ``entry`` over ``size`` ranks."""
    e, k, p = entry.experts, entry.hidden_size, entry.padded_intermediate_size // size
    return {
        W13_QWEIGHT: (e, 2 * p, k // 2),
        W13_SCALES: (e, 2 * p, k // entry.w13_group_size),
        W2_QWEIGHT: (e, k, p // 2),
        W2_SCALES: (e, k, p // entry.w2_group_size),
    }[name]


def copy_rank_slice(entry: ConvertedLayer, name: str, full: torch.Tensor, dst: torch.Tensor, rank: int,
                    size: int) -> None:
    """Copy rank ``rank``'s slice of the whole checkpoint tensor ``full`` into ``dst`` (reading
    only those rows or columns of ``full``)."""
    p = entry.padded_intermediate_size
    n = p // size
    if name in _ROWS:
        dst[:, :n].copy_(full[:, rank * n : (rank + 1) * n])
        dst[:, n:].copy_(full[:, p + rank * n : p + (rank + 1) * n])
    elif name in _COLUMNS:
        c = dst.shape[2]
        dst.copy_(full[:, :, rank * c : (rank + 1) * c])
    else:  # pragma: no cover - the four names are the contract's
        raise KeyError(name)
