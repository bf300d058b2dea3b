"""The on-disk formats (``gptq2xpu.formats``) on one tiny projection each, written out by hand:
K = 16 inputs, 8 outputs, groups of 8.  What each format reads from the headers, and which data
it refuses (asymmetric zero points, reordered rows, a mislabelled GPTQ version)."""

from __future__ import annotations

import numpy as np
import pytest
from support.helpers import write_arrays

from gptq2xpu.errors import InputError
from gptq2xpu.formats import FORMATS, ProjSpec, format_for_fields
from gptq2xpu.read.checkpoint import open_checkpoint

GPTQ, CT = FORMATS["gptq"], FORMATS["compressed-tensors"]
K, OUT, G = 16, 8, 8
SPEC = ProjSpec(in_features=K, out_features=OUT, bits=4, group_size=G, scale_dtype="F16")


def _words(*values) -> np.ndarray:
    return np.array(values, np.uint32).view(np.int32)


@pytest.fixture
def ckpt(tmp_path):
    """``ckpt(arrays)``: a checkpoint holding ``{"p.<field>": array}``, and the fields dict."""
    opened = []

    def make(arrays: dict):
        folder = tmp_path / f"c{len(opened)}"
        folder.mkdir()
        write_arrays(folder / "model.safetensors", {f"p.{k}": v for k, v in arrays.items()})
        (folder / "config.json").write_text("{}")
        opened.append(open_checkpoint(folder))
        return opened[-1], {k: f"p.{k}" for k in arrays}

    yield make
    for c in opened:
        c.close()


def _gptq(**extra):
    arrays = {"qweight": np.zeros((K // 8, OUT), np.int32), "scales": np.ones((K // G, OUT), np.float16),
              "qzeros": np.full((K // G, OUT // 8), 0x77777777, np.int32),
              "g_idx": (np.arange(K) // G).astype(np.int32)}
    arrays.update(extra)
    return arrays


def test_format_for_fields():
    assert format_for_fields({"qweight", "scales", "qzeros", "g_idx"}) is GPTQ
    assert format_for_fields({"weight_packed", "weight_scale", "weight_shape"}) is CT
    assert format_for_fields({"weight"}) is None
    assert format_for_fields({"qweight"}) is None       # scales are required too
    assert SPEC.groups == 2


def test_gptq_describe(ckpt):
    c, fields = ckpt(_gptq())
    assert GPTQ.in_out(c, fields) == (K, OUT)             # g_idx tells the input size
    assert GPTQ.describe(c, fields, K, "p") == SPEC
    assert GPTQ.input_major and (GPTQ.packed, GPTQ.scales) == ("qweight", "scales")
    c, fields = ckpt(_gptq(scales=np.ones((1, OUT), np.float32), g_idx=np.zeros(K, np.int32),
                           qzeros=_words([0x77777777])))
    assert GPTQ.describe(c, fields, K, "p") == ProjSpec(K, OUT, 4, K, "F32")   # one group over all of K


@pytest.mark.parametrize("change,message", [
    (dict(scales=np.ones((2, 4), np.float16)),
     "p.scales: scales [2, 4] do not match qweight [2, 8] (want [groups, 8])"),
    (dict(scales=np.ones((3, OUT), np.float16)), "p.scales: 3 scale groups do not divide input size 16"),
    (dict(scales=np.ones((2, OUT), np.int32)), "p.scales: scales dtype I32 is not a float type"),
    (dict(qweight=np.zeros((2, OUT), np.int64)), "p.qweight: GPTQ qweight must be 2-D int32, found I64[2, 8]"),
    (dict(qzeros=np.zeros((2, 2), np.int32)), "p.qzeros: qzeros I32[2, 2] should be I32[2, 1]"),
    (dict(g_idx=np.zeros(8, np.int32)), "p.g_idx: g_idx I32[8] should be I32[16]"),
])
def test_gptq_describe_refuses(ckpt, change, message):
    c, fields = ckpt(_gptq(**change))
    with pytest.raises(InputError) as exc:
        GPTQ.describe(c, fields, K, "p")
    assert str(exc.value) == message


def test_gptq_check_accepts_symmetric_data_of_either_version(ckpt):
    c, fields = ckpt(_gptq())
    GPTQ.check(c, fields, SPEC, "gptq")
    c, fields = ckpt(_gptq(qzeros=np.full((2, 1), 0x88888888, np.uint32).view(np.int32)))
    GPTQ.check(c, fields, SPEC, "gptq_v2")


@pytest.mark.parametrize("qzeros,fmt,message", [
    (_words([0x77777777], [0x77777778]), "gptq",
     "p.qzeros: asymmetric zero points (word 1 is 0x77777778, symmetric gptq stores 0x77777777); "
     "the XPU kernel runs symmetric int4 only"),
    (_words([0x88888888], [0x88888888]), "gptq",
     "p.qzeros: zero points are 0x88888888, the gptq_v2 convention, but the config says checkpoint_format "
     "'gptq'; the checkpoint is mislabelled"),
    (_words([0x77777777], [0x77777777]), "gptq_v2",
     "p.qzeros: zero points are 0x77777777, the gptq convention, but the config says checkpoint_format "
     "'gptq_v2'; the checkpoint is mislabelled"),
])
def test_gptq_check_refuses_zero_points(ckpt, qzeros, fmt, message):
    c, fields = ckpt(_gptq(qzeros=qzeros))
    with pytest.raises(InputError) as exc:
        GPTQ.check(c, fields, SPEC, fmt)
    assert str(exc.value) == message


def test_gptq_check_refuses_reordered_rows(ckpt):
    order = (np.arange(K) // G).astype(np.int32)
    order[[7, 8]] = order[[8, 7]]
    c, fields = ckpt(_gptq(g_idx=order))
    with pytest.raises(InputError, match=r"^p\.g_idx: input rows are reordered \(act-order / desc_act\)"):
        GPTQ.check(c, fields, SPEC, "gptq")


def _ct(**extra):
    arrays = {"weight_packed": np.zeros((OUT, K // 8), np.int32), "weight_scale": np.ones((OUT, K // G), np.float16),
              "weight_shape": np.array([OUT, K], np.int64)}
    arrays.update(extra)
    return arrays


def test_compressed_tensors_describe_and_check(ckpt):
    c, fields = ckpt(_ct(weight_g_idx=(np.arange(K) // G).astype(np.int32)))
    assert CT.in_out(c, fields) == (K, OUT)
    assert CT.describe(c, fields, K, "p") == SPEC
    assert not CT.input_major and (CT.packed, CT.scales) == ("weight_packed", "weight_scale")
    CT.check(c, fields, SPEC, "pack-quantized")
    # a zero point of 0 for every output, packed along N (value + 8 per field): accepted
    c, fields = ckpt(_ct(weight_zero_point=_words([0x88888888, 0x88888888])))   # [N/8, groups]
    CT.check(c, fields, SPEC, "pack-quantized")


@pytest.mark.parametrize("change,message", [
    (dict(weight_shape=np.array([OUT, 32], np.int64)), "p.weight_shape: says [8, 32], tensors say [8, 16]"),
    (dict(weight_zero_point=np.zeros((OUT, 2), np.uint8)), "p.weight_zero_point: asymmetric zero points"),
    (dict(weight_zero_point=_words([0x88888888, 0x88888889])), "p.weight_zero_point: asymmetric zero points"),
    (dict(weight_g_idx=np.array([0] * 7 + [1] + [0] + [1] * 7, np.int32)),
     "p.weight_g_idx: input rows are reordered (actorder)"),
])
def test_compressed_tensors_check_refuses(ckpt, change, message):
    c, fields = ckpt(_ct(**change))
    with pytest.raises(InputError) as exc:
        CT.check(c, fields, SPEC, "pack-quantized")
    assert str(exc.value).startswith(message)


@pytest.mark.parametrize("change,message", [
    (dict(weight_scale=np.ones((4, 2), np.float16)), "p.weight_scale: weight_scale [4, 2] should be [8, groups]"),
    (dict(weight_scale=np.ones((OUT, 2), np.int32)), "p.weight_scale: weight_scale dtype I32 is not a float type"),
    (dict(weight_packed=np.zeros((OUT, 2), np.int16)), "p.weight_packed: weight_packed must be 2-D int32, found I16"),
    (dict(weight_shape=np.array([OUT, K, 1], np.int64)), "p.weight_shape: weight_shape should be a 2-element"),
])
def test_compressed_tensors_describe_refuses(ckpt, change, message):
    c, fields = ckpt(_ct(**change))
    with pytest.raises(InputError) as exc:
        CT.describe(c, fields, K, "p")
    assert str(exc.value).startswith(message)
