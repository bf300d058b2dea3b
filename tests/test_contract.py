"""The contract's shapes and tensor-parallel slices, on numbers small enough to work out by hand.

A layer of E=1 expert, K=64, N=96 padded to P=128 for T=2 ranks, groups of 32: rank 1 holds the
intermediate values 64..127, so gate rows 64..127 and up rows 192..255 of w13 (P=128 + 64..127),
w2 bytes 32..63 (two inputs a byte) and w2 scale groups 2..3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq2xpu.contract import COLUMNS, ROWS, LayerGeometry, RankSlice

GEO = LayerGeometry(experts=1, hidden=64, intermediate=96, padded=128, g13=32, g2=32)


def test_shapes_of_the_whole_layer_and_of_a_rank():
    assert GEO.shapes() == {"w13_qweight": (1, 256, 32), "w13_scales": (1, 256, 2),
                            "w2_qweight": (1, 64, 64), "w2_scales": (1, 64, 4)}
    assert GEO.shapes(2) == {"w13_qweight": (1, 128, 32), "w13_scales": (1, 128, 2),
                             "w2_qweight": (1, 64, 32), "w2_scales": (1, 64, 2)}


def test_gate_rows_start_at_0_and_up_rows_at_p():
    assert GEO.w13_rows == {"gate": (0, 96), "up": (128, 224)}


def test_rank_slices_are_the_hand_computed_rows_and_columns():
    assert GEO.intermediate_slice(1, 2) == (64, 128)
    assert GEO.rank_slices(1, 2) == {
        "w13_qweight": RankSlice(ROWS, ((64, 128), (192, 256))),
        "w13_scales": RankSlice(ROWS, ((64, 128), (192, 256))),
        "w2_qweight": RankSlice(COLUMNS, ((32, 64),)),
        "w2_scales": RankSlice(COLUMNS, ((2, 4),)),
    }
    assert GEO.rank_slices(0, 2)["w13_qweight"] == RankSlice(ROWS, ((0, 64), (128, 192)))


def test_splits_only_into_whole_groups():
    assert GEO.splits(1) and GEO.splits(2) and GEO.splits(4)
    assert not GEO.splits(3)      # 128 / 3 is not whole
    assert not GEO.splits(8)      # 16 values a rank: half a group of 32


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_a_slice_cuts_the_same_numbers_from_numpy_and_torch_arrays(lib):
    """Rows 1..2 and 5..6 of a [2, 8, 3] tensor counting 0..47, then columns 1..2: index tuples
    both libraries take, on all experts or on one."""
    full = np.arange(48).reshape(2, 8, 3)
    arr = full if lib == "numpy" else torch.from_numpy(full)
    rows = RankSlice(ROWS, ((1, 3), (5, 7)))
    dst = arr[:, :4].clone() if lib == "torch" else arr[:, :4].copy()
    for src_key, dst_key in rows.pairs():
        dst[dst_key] = arr[src_key]
    assert np.asarray(dst).tolist() == [[[3, 4, 5], [6, 7, 8], [15, 16, 17], [18, 19, 20]],
                                        [[27, 28, 29], [30, 31, 32], [39, 40, 41], [42, 43, 44]]]
    one = np.asarray(arr[1])[:2].copy()
    for src_key, dst_key in rows.pairs()[:1]:
        one[dst_key] = np.asarray(arr[1])[src_key]
    assert one.tolist() == [[27, 28, 29], [30, 31, 32]]
    cols = RankSlice(COLUMNS, ((1, 3),))
    (src_key, dst_key), = cols.pairs()
    assert np.asarray(arr[src_key])[0].tolist() == [[1, 2], [4, 5], [7, 8], [10, 11], [13, 14], [16, 17], [19, 20],
                                                    [22, 23]]
    assert dst_key == (..., slice(0, 2))
