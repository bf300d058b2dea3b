"""``gptq2xpu.repack`` on inputs small enough to work out by hand: nibbles, padding, scales,
regrouping, BF16 rounding, the router.  The end-to-end tests convert whole checkpoints; these pin
each step to values written out here."""

from __future__ import annotations

import numpy as np
import pytest
from support.helpers import write_arrays

from gptq2xpu.contract import LayerGeometry
from gptq2xpu.formats import FORMATS
from gptq2xpu.read.checkpoint import open_checkpoint
from gptq2xpu.repack import (
    dequantize_router,
    encode_words,
    fill_w2,
    fill_w13,
    from_float32,
    largest_group,
    layer_scales,
    read_rows,
    to_float32,
    transpose_into,
)

Z = np.uint32(0x88888888).view(np.int32)  # eight code-8 nibbles: weight 0 in u4b8


def _word(codes) -> int:
    """Eight 4-bit codes, input j in bits 4j..4j+3 (the test's own packing)."""
    return sum(int(c) << (4 * j) for j, c in enumerate(codes))


def _gptq_rows(tmp_path, qweight: np.ndarray) -> np.ndarray:
    """``read_rows`` of a GPTQ projection whose qweight is ``qweight`` ([in/8, out] int32)."""
    out = qweight.shape[1]
    write_arrays(tmp_path / "model.safetensors", {"p.qweight": qweight,
                                                  "p.scales": np.ones((1, out), np.float16)})
    (tmp_path / "config.json").write_text("{}")
    ckpt = open_checkpoint(tmp_path)
    try:
        rows = np.empty((out, qweight.shape[0]), np.int32)
        read_rows(ckpt, FORMATS["gptq"], {"qweight": "p.qweight"}, rows, np.empty(qweight.size, np.int32))
    finally:
        ckpt.close()
    return rows


def test_the_nibble_example_of_the_contract(tmp_path):
    """docs/contract.md: a row whose first four codes are 3, 10, 8, 15 starts with bytes 0xA3 0xF8;
    in s4 every byte is XOR 0x88 (code 5, weight -3, is 0xD)."""
    qweight = np.array([[_word([3, 10, 8, 15, 8, 8, 8, 8])]], dtype=np.uint32).view(np.int32)
    rows = _gptq_rows(tmp_path, qweight)
    assert rows.view(np.uint8).tolist() == [[0xA3, 0xF8, 0x88, 0x88]]
    encode_words(rows, "s4")
    assert rows.view(np.uint8).tolist() == [[0x2B, 0x70, 0x00, 0x00]]
    five = np.array([_word([5] * 8)], dtype=np.uint32).view(np.int32)
    encode_words(five, "s4")
    assert five.view(np.uint8).tolist() == [0xDD] * 4


def test_gptq_input_major_words_become_rows(tmp_path):
    """formats/gptq.py's example: codes 1..7, 15 of output 0 are the word 0xF7654321 and the XPU
    row ``21 43 65 F7``; two outputs and two words of inputs show the transpose."""
    w = [[_word([1, 2, 3, 4, 5, 6, 7, 15]), _word([0] * 8)],
         [_word([9] * 8), _word([15, 14, 13, 12, 11, 10, 9, 8])]]   # [in/8 = 2, out = 2]
    rows = _gptq_rows(tmp_path, np.array(w, dtype=np.uint32).view(np.int32))
    assert rows.view(np.uint8).tolist() == [[0x21, 0x43, 0x65, 0xF7, 0x99, 0x99, 0x99, 0x99],
                                            [0x00, 0x00, 0x00, 0x00, 0xEF, 0xCD, 0xAB, 0x89]]


def test_encode_words_refuses_an_unknown_encoding():
    with pytest.raises(ValueError, match="u4"):
        encode_words(np.zeros(1, np.int32), "u4")


def test_transpose_into_in_bands_and_whole():
    for rows in (5, 70):  # under and over one band of 32 source rows
        src = np.arange(rows * 3, dtype=np.int32).reshape(rows, 3)
        dst = np.empty((3, rows), np.int32)
        transpose_into(dst, src)
        assert dst.tolist() == [[3 * r + c for r in range(rows)] for c in range(3)]


def test_fill_w13_places_up_rows_at_p_and_pads_with_zero_weights():
    geo = LayerGeometry(experts=1, hidden=8, intermediate=2, padded=4, g13=32, g2=32)
    out = np.full((8, 1), -1, np.int32)
    fill_w13(out, geo, lambda d: d.__setitem__(..., [[1], [2]]), lambda d: d.__setitem__(..., [[3], [4]]), "u4b8")
    assert out[:, 0].tolist() == [1, 2, Z, Z, 3, 4, Z, Z]
    fill_w13(out, geo, lambda d: d.__setitem__(..., [[1], [2]]), lambda d: d.__setitem__(..., [[3], [4]]), "s4")
    assert out[:, 0].view(np.uint32).tolist() == [0x88888889, 0x8888888A, 0, 0, 0x8888888B, 0x8888888C, 0, 0]


def test_fill_w2_pads_each_row_with_zero_weights():
    geo = LayerGeometry(experts=1, hidden=2, intermediate=8, padded=16, g13=2, g2=8)
    out = np.full((2, 2), -1, np.int32)
    fill_w2(out, geo, lambda d: d.__setitem__(..., [[5], [6]]), np.empty(2, np.int32), "u4b8")
    assert out.tolist() == [[5, Z], [6, Z]]
    unpadded = LayerGeometry(experts=1, hidden=2, intermediate=8, padded=8, g13=2, g2=8)
    one = np.full((2, 1), -1, np.int32)
    fill_w2(one, unpadded, lambda d: d.__setitem__(..., [[5], [6]]), np.empty(0, np.int32), "u4b8")
    assert one.tolist() == [[5], [6]]


def test_largest_group_examples():
    assert largest_group([128]) == 128
    assert largest_group([512]) == 256
    assert largest_group([2048]) == 256
    assert largest_group([128], divides=[192]) == 64
    assert largest_group([48]) is None
    assert largest_group([128, 32]) == 32


def test_bf16_rounds_to_nearest_even_and_keeps_nan_quiet():
    f = np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F800001, 0xFF800000],
                 dtype=np.uint32).view(np.float32)
    assert from_float32(f, "BF16").tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x7FC0, 0xFF80]
    assert to_float32(np.array([0x3F80, 0xC000], np.uint16), "BF16").tolist() == [1.0, -2.0]
    assert from_float32(np.array([1.5], np.float32), "F16").dtype == np.float16
    with pytest.raises(ValueError, match="F8"):
        from_float32(f, "F8")


def test_w13_scales_regrouped_and_padded():
    """Source groups of 128 along K=128, kernel groups of 64: each scale twice; gate rows 0..1,
    up rows 4..5 of 2P = 8, the padding rows 0."""
    geo = LayerGeometry(experts=1, hidden=128, intermediate=2, padded=4, g13=64, g2=32)
    stacks = {"gate": np.array([[[0.5], [2.0]]], np.float16), "up": np.array([[[3.0], [-1.0]]], np.float16)}
    out = layer_scales(stacks, geo, roles=("gate", "up"), src_groups={"gate": 128, "up": 128},
                       src_dtype="F16", dst_dtype="F16")
    assert out.dtype == np.float16 and out.tolist() == [[[0.5, 0.5], [2, 2], [0, 0], [0, 0],
                                                         [3, 3], [-1, -1], [0, 0], [0, 0]]]


def test_w2_scales_padded_along_p():
    geo = LayerGeometry(experts=1, hidden=2, intermediate=64, padded=128, g13=2, g2=32)
    stacks = {"down": np.array([[[0.25, 1.0], [4.0, -8.0]]], np.float32)}   # [1, K=2, N/32]
    out = layer_scales(stacks, geo, roles=("down",), src_groups={"down": 32}, src_dtype="F32", dst_dtype="BF16")
    assert out.tolist() == [[[0x3E80, 0x3F80, 0, 0], [0x4080, 0xC100, 0, 0]]]


def test_bf16_scales_kept_bit_for_bit_but_signalling_nan_made_quiet():
    geo = LayerGeometry(experts=1, hidden=64, intermediate=1, padded=1, g13=64, g2=32)
    stacks = {"gate": np.array([[[0x3F81]]], np.uint16), "up": np.array([[[0x7F81]]], np.uint16)}
    out = layer_scales(stacks, geo, roles=("gate", "up"), src_groups={"gate": 64, "up": 64},
                       src_dtype="BF16", dst_dtype="BF16")
    assert out.tolist() == [[[0x3F81], [0x7FC1]]]


def test_dequantize_router():
    """K = 8, 8 outputs: output 0 holds codes 0..7, output 1 code 15, the rest code 8; scale 0.5."""
    qweight = np.array([[_word(range(8)), _word([15] * 8)] + [_word([8] * 8)] * 6], np.uint32).view(np.int32)
    scales = np.full((1, 8), 0.5, np.float32)
    want = [[-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5], [3.5] * 8] + [[0.0] * 8] * 6
    for zeros, fmt in ((None, "gptq"), (0x77777777, "gptq"), (0x88888888, "gptq_v2")):
        qz = None if zeros is None else np.array([[zeros]], np.uint32).view(np.int32)
        assert dequantize_router(qweight, scales, qz, None, fmt).tolist() == want
    # g_idx puts inputs 4..7 in a second group (scale 1, zero 8); the first has zero point 5 for
    # output 0 (v1 stores 4)
    qz = np.array([[0x77777774], [0x77777777]], np.uint32).view(np.int32)
    two = np.array([[0.5] * 8, [1.0] * 8], np.float32)
    w = dequantize_router(qweight, two, qz, np.array([0, 0, 0, 0, 1, 1, 1, 1]), "gptq")
    assert w[0].tolist() == [-2.5, -2.0, -1.5, -1.0, -4.0, -3.0, -2.0, -1.0]
