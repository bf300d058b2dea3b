"""Device selection and the optional vllm_xpu_kernels backend, tested without any Intel XPU.

``run_xpu_fused_moe`` and the status checks run the released vllm-xpu-kernels 0.1.16.2 Python
interface on CPU with its native ops faked (fixture ``released_kernel``, ``tests/support/released_kernel.py``).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from gptq2xpu.errors import UsageError
from gptq2xpu.verify import device as device_mod
from gptq2xpu.verify import xpu_kernels
from gptq2xpu.verify.reference import compare, moe_forward, route
from gptq2xpu.verify.unpack import xpu_dequant

IPEX = "intel_extension_for_pytorch"


# --------------------------------------------------------------------------- the released interface


@pytest.fixture
def released(released_kernel, monkeypatch):
    """The released interface, with the CPU posing as an XPU device."""
    monkeypatch.setattr(xpu_kernels, "_is_xpu", lambda device: True)
    return released_kernel


def _layer(dtype=torch.bfloat16, experts=4, hidden=256, inter=128, tokens=6, top_k=2, group=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randint(0, 256, (experts, 2 * inter, hidden // 2), dtype=torch.uint8, generator=gen)
    w2 = torch.randint(0, 256, (experts, hidden, inter // 2), dtype=torch.uint8, generator=gen)
    s13 = (torch.randn(experts, 2 * inter, hidden // group, generator=gen) / 64).to(dtype)
    s2 = (torch.randn(experts, hidden, inter // group, generator=gen) / 64).to(dtype)
    x = (torch.randn(tokens, hidden, generator=gen) / 4).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    return x, w13, s13, w2, s2, logits


def _reference(x, w13, s13, w2, s2, tw, ti):
    return moe_forward(x.float(), xpu_dequant(w13, s13, "u4b8"), xpu_dequant(w2, s2, "u4b8"), tw, ti)


# --------------------------------------------------------------------------- kernels_status


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_status_unavailable_off_xpu(device):
    available, reason = xpu_kernels.kernels_status(device)
    assert not available
    assert reason == f"device is {device}, the kernel runs only on xpu"


def test_status_module_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm_xpu_kernels", None)  # import raises ModuleNotFoundError
    assert xpu_kernels.kernels_status("xpu") == (False, "vllm_xpu_kernels not installed")


def test_status_native_ops_missing(released_kernel, monkeypatch):
    monkeypatch.setattr(released_kernel.module, "FUSEDMOE_AVAILABLE", False)
    monkeypatch.setattr(released_kernel.module, "FUSEDMOE_UNAVAILABLE_REASON",
                        "libsycl.so.8: cannot open shared object file")
    available, reason = xpu_kernels.kernels_status("xpu")
    assert not available and "libsycl.so.8" in reason


def test_status_class_missing(released_kernel, monkeypatch):
    monkeypatch.delattr(released_kernel.module, "XpuFusedMoe")
    available, reason = xpu_kernels.kernels_status("xpu")
    assert not available and "XpuFusedMoe" in reason


def test_status_available_with_module_on_xpu(released_kernel):
    available, reason = xpu_kernels.kernels_status("xpu")
    assert available and "XpuFusedMoe" in reason


def test_status_takes_any_xpu_device_and_no_other(released_kernel):
    """The device check itself (only the kernel's native ops are faked here): every spelling of an
    XPU device reaches the interface, and no other device does, even with the interface installed."""
    for device in ("xpu", "xpu:1", torch.device("xpu", 0)):
        assert xpu_kernels.kernels_status(device) == (True, f"vllm_xpu_kernels XpuFusedMoe on {torch.device(device)}")
    for device in ("cpu", "cuda:0", torch.device("meta")):
        kind = torch.device(device).type
        assert xpu_kernels.kernels_status(device) == (False, f"device is {kind}, the kernel runs only on xpu")


# --------------------------------------------------------------------------- run_xpu_fused_moe


def test_run_refuses_when_unavailable():
    x, w13, s13, w2, s2, logits = _layer()
    with pytest.raises(RuntimeError, match="only on xpu"):
        xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, None, None, logits, top_k=2, renormalize=True,
                                      encoding="u4b8")


@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_run_hands_over_as_the_release_takes_it(released, dtype, encoding):
    x, w13, s13, w2, s2, logits = _layer(dtype)
    if encoding == "s4":
        w13, w2 = w13 ^ 0x88, w2 ^ 0x88
    originals = [t.clone() for t in (w13, w2, s13, s2)]
    tw, ti = route(x, torch.randn(4, 256), 2)
    out = xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, tw, ti.to(torch.int32), None, top_k=2,
                                        renormalize=True, encoding=encoding)
    gemm1, gemm2 = released.ops.gemm_calls
    assert (gemm1["B_dtype"], gemm1["N"], gemm1["K"]) == (torch.int8, 256, 256)
    assert (gemm2["B_dtype"], gemm2["N"], gemm2["K"]) == (torch.int8, 256, 128)
    assert gemm1["scales"].dtype == gemm2["scales"].dtype == dtype
    if encoding == "s4":  # no rewrite, no copy: the GEMM reads the caller's storage
        assert released.zp_calls == 0 and gemm1["B_ptr"] == w13.data_ptr() and gemm2["B_ptr"] == w2.data_ptr()
    else:                 # the constructor converted into its own int8 buffers
        assert released.zp_calls == 2 * 4 and gemm1["B_ptr"] != w13.data_ptr()
        assert torch.equal(gemm1["B"].view(torch.uint8), w13 ^ 0x88)
    assert out.dtype == dtype and out.shape == (6, 256)
    # the caller's tensors were neither rewritten nor rebound, nor marked
    for before, after in zip(originals, (w13, w2, s13, s2)):
        assert after.dtype == before.dtype and torch.equal(after, before)
    assert not hasattr(w13, "xpu_fused_moe")
    # a wrong hand-over (double or missing conversion) would scramble every weight: rel ~ 1
    u13, u2 = (w13 ^ 0x88, w2 ^ 0x88) if encoding == "s4" else (w13, w2)
    assert compare(out, _reference(x, u13, s13, u2, s2, tw, ti))["rel"] < 1e-2


@pytest.mark.parametrize("renormalize", [True, False])
def test_run_routes_router_logits_when_no_topk_given(released, renormalize):
    x, w13, s13, w2, s2, logits = _layer(torch.float16, seed=2)
    out = xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, None, None, logits, top_k=2,
                                        renormalize=renormalize, encoding="u4b8")
    probs = logits.softmax(-1)
    tw, ti = probs.topk(2, dim=-1)
    if renormalize:
        tw = tw / tw.sum(-1, keepdim=True)
    assert compare(out, _reference(x, w13, s13, w2, s2, tw, ti))["rel"] < 2e-3


def test_run_rejects_what_the_kernel_would(released):
    x, w13, s13, w2, s2, logits = _layer(torch.bfloat16)
    run = xpu_kernels.run_xpu_fused_moe
    with pytest.raises(ValueError, match="activation dtype"):
        run(x, w13, s13.half(), w2, s2, None, None, logits, top_k=2, renormalize=True, encoding="u4b8")
    _, w13g, s13g, w2g, s2g, _ = _layer(torch.bfloat16, group=16)
    with pytest.raises(ValueError, match="group size"):
        run(x, w13g, s13g, w2g, s2g, None, None, logits, top_k=2, renormalize=True, encoding="u4b8")
    with pytest.raises(ValueError, match="uint8"):
        run(x, w13.view(torch.int8), s13, w2, s2, None, None, logits, top_k=2, renormalize=True, encoding="u4b8")
    with pytest.raises(ValueError, match="encoding"):
        run(x, w13, s13, w2, s2, None, None, logits, top_k=2, renormalize=True, encoding="int4")
    with pytest.raises(ValueError, match="router_logits"):
        run(x, w13, s13, w2, s2, None, None, None, top_k=2, renormalize=True, encoding="u4b8")
    with pytest.raises(ValueError, match="fp16/bf16"):
        run(x.float(), w13, s13, w2, s2, None, None, logits, top_k=2, renormalize=True, encoding="u4b8")


# --------------------------------------------------------------------------- device selection


def test_select_device_auto_falls_back_to_cpu_here():
    if device_mod.xpu_available() or device_mod.cuda_available():
        pytest.skip("an accelerator is present")
    assert device_mod.select_device("auto") == torch.device("cpu")
    assert device_mod.select_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("which", ["xpu", "cuda"])
def test_select_explicit_unavailable_device_raises_usage_error(monkeypatch, which):
    monkeypatch.setattr(device_mod, "xpu_available", lambda: False)
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    with pytest.raises(UsageError, match=f"--device {which}") as info:
        device_mod.select_device(which)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_select_explicit_unavailable_for_real_here():
    for which, present in (("xpu", device_mod.xpu_available()), ("cuda", device_mod.cuda_available())):
        if not present:
            with pytest.raises(UsageError):
                device_mod.select_device(which)


def test_select_device_auto_order(monkeypatch):
    monkeypatch.setattr(device_mod, "xpu_available", lambda: True)
    monkeypatch.setattr(device_mod, "cuda_available", lambda: True)
    assert device_mod.select_device("auto").type == "xpu"
    monkeypatch.setattr(device_mod, "xpu_available", lambda: False)
    assert device_mod.select_device("auto").type == "cuda"
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    assert device_mod.select_device("auto").type == "cpu"
    with pytest.raises(UsageError, match="not one of"):
        device_mod.select_device("tpu")


def test_xpu_probe_survives_torch_without_xpu(monkeypatch):
    monkeypatch.delattr(torch, "xpu", raising=False)
    assert device_mod.xpu_available() is False


# --------------------------------------------------------------------------- IPEX


@pytest.fixture
def fake_ipex(tmp_path, monkeypatch):
    """Write an importable fake IPEX package with the given __init__ body."""

    def install(body: str):
        pkg = tmp_path / IPEX
        pkg.mkdir()
        (pkg / "__init__.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, IPEX, raising=False)

    yield install
    sys.modules.pop(IPEX, None)


def test_import_ipex_absent_returns_none(monkeypatch):
    monkeypatch.setattr(device_mod.importlib.util, "find_spec", lambda name: None)
    assert device_mod.import_ipex() is None and device_mod.ipex_error is None


def test_import_ipex_really_absent_here():
    try:
        import intel_extension_for_pytorch  # noqa: F401
    except ImportError:
        assert device_mod.import_ipex() is None
    else:  # pragma: no cover - only where IPEX is installed
        pytest.skip("IPEX is installed")


def test_import_ipex_broken_does_not_crash(fake_ipex):
    fake_ipex("raise OSError('libintel-ext-pt-cpu.so: undefined symbol: _ZN3c10')\n")
    assert device_mod.import_ipex() is None
    assert "OSError" in device_mod.ipex_error and "undefined symbol" in device_mod.ipex_error
    assert "\n" not in device_mod.ipex_error


def test_import_ipex_broken_is_reported_by_explicit_xpu(fake_ipex, monkeypatch):
    fake_ipex("raise ImportError('torch version mismatch')\n")
    monkeypatch.setattr(device_mod, "xpu_available", lambda: False)
    with pytest.raises(UsageError, match="torch version mismatch"):
        device_mod.select_device("xpu")


def test_import_ipex_is_imported_before_probing_xpu(fake_ipex, monkeypatch):
    fake_ipex("__version__ = '2.99.0+xpu'\nregistered = True\n")
    seen = []
    monkeypatch.setattr(device_mod, "xpu_available", lambda: seen.append(IPEX in sys.modules) or False)
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    assert device_mod.select_device("auto").type == "cpu"
    assert seen == [True]
    assert device_mod.import_ipex() == "2.99.0+xpu"


# --------------------------------------------------------------------------- runtime info, sync


def test_runtime_info_on_cpu(monkeypatch):
    monkeypatch.setattr(device_mod, "import_ipex", lambda: None)
    info = device_mod.runtime_info("cpu")
    assert info["torch"] == torch.__version__
    assert info["ipex"] is None
    assert info["device_type"] == "cpu" and isinstance(info["device_name"], str) and info["device_name"]
    assert set(info) == {"torch", "ipex", "vllm_xpu_kernels", "device_type", "device_name"}


def test_runtime_info_reads_kernel_version_from_metadata(monkeypatch):
    versions = {"vllm_xpu_kernels": "0.1.5"}

    def fake_version(name):
        if name in versions:
            return versions[name]
        raise device_mod.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(device_mod.metadata, "version", fake_version)
    monkeypatch.setattr(device_mod, "import_ipex", lambda: "2.8.10")
    info = device_mod.runtime_info(torch.device("cpu"))
    assert info["vllm_xpu_kernels"] == "0.1.5" and info["ipex"] == "2.8.10"


def test_synchronize_dispatches_by_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    fake_xpu = types.SimpleNamespace(synchronize=lambda device=None: calls.append(("xpu", device)))
    monkeypatch.setattr(torch, "xpu", fake_xpu, raising=False)
    device_mod.synchronize("cpu")
    device_mod.synchronize("cuda")
    device_mod.synchronize(torch.device("xpu"))
    assert [c[0] for c in calls] == ["cuda", "xpu"]
