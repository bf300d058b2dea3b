"""Device selection and the optional vllm_xpu_kernels backend, tested without any Intel XPU.

The kernel is replaced by fakes injected into ``sys.modules``: one per generation of the upstream
``XpuFusedMoe`` constructor (explicit ``is_int4`` flag; dtype inference that knows only uint8;
dtype inference that also takes int8). Each fake records what it was given and computes the MoE
the way the real kernel is documented to: ``implement_zp`` (``byte ^ 0x88``) at construction
unless ``w13`` carries ``xpu_fused_moe``, then signed-nibble weights times scales.
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch

from gptq2xpu.errors import UsageError
from gptq2xpu.verify import device as device_mod
from gptq2xpu.verify import xpu_kernels
from gptq2xpu.verify.reference import compare, moe_forward, route
from gptq2xpu.verify.unpack import xpu_dequant

IPEX = "intel_extension_for_pytorch"


# --------------------------------------------------------------------------- fake kernels


def _fake_implement_zp(w: torch.Tensor) -> torch.Tensor:
    return (w.view(torch.uint8) ^ 0x88).to(torch.int8)


def _signed_weights(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Test-side dequant of two's-complement nibble bytes [E, R, C/2] -> float32 [E, R, C]."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    vals = torch.stack((lo, hi), -1).flatten(-2)
    vals = torch.where(vals >= 8, vals - 16, vals).to(torch.float32)
    group = vals.shape[-1] // scales.shape[-1]
    return vals * scales.float().repeat_interleave(group, -1)


class _FakeXpuFusedMoeBase:
    calls: list = []

    def _init(self, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
              num_experts, is_int4, rewrite_dtype, **extra):
        self.record = {
            "w13_dtype": w13.dtype,
            "w13_shape": tuple(w13.shape),
            "w2_dtype": w2.dtype,
            "w2_shape": tuple(w2.shape),
            "w13_bytes": w13.clone(),
            "skip_attr": hasattr(w13, "xpu_fused_moe"),
            "w13_scales": (w13_scales.dtype, tuple(w13_scales.shape), w13_scales.is_contiguous()),
            "w2_scales": (w2_scales.dtype, tuple(w2_scales.shape), w2_scales.is_contiguous()),
            "biases": (w13_bias, w2_bias),
            "n_experts_per_token": n_experts_per_token,
            "activation": activation,
            "num_experts": num_experts,
            "is_int4": is_int4,
            "extra": extra,
        }
        type(self).calls.append(self.record)
        assert w13.is_contiguous() and w2.is_contiguous()
        if is_int4 and not hasattr(w13, "xpu_fused_moe"):  # the one-time rewrite, into w13.data
            w13.data = _fake_implement_zp(w13).to(rewrite_dtype)
            w2.data = _fake_implement_zp(w2).to(rewrite_dtype)
            w13.xpu_fused_moe = True
        self.w13, self.w2, self.s13, self.s2, self.top_k = w13, w2, w13_scales, w2_scales, n_experts_per_token
        self.is_int4 = is_int4

    def apply(self, output, hidden_states, topk_weights, topk_ids, expert_map=None):
        assert self.is_int4, "the fake only models int4"
        self.record["apply"] = {
            "hidden": (hidden_states.dtype, tuple(hidden_states.shape)),
            "topk_weights": (topk_weights.dtype, tuple(topk_weights.shape)),
            "topk_ids": (topk_ids.dtype, tuple(topk_ids.shape)),
            "output": (output.dtype, tuple(output.shape)),
        }
        w13 = _signed_weights(self.w13, self.s13)
        w2 = _signed_weights(self.w2, self.s2)
        output.copy_(moe_forward(hidden_states.float(), w13, w2, topk_weights, topk_ids).to(output.dtype))


class FakeExplicitFlag(_FakeXpuFusedMoeBase):
    """Older upstream: explicit ``is_int4=False`` flag, rewrite keeps uint8, no dtype inference."""

    def __init__(self, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                 num_experts, ep_rank=0, ep_size=1, expert_map=None, is_fp8=False, is_int4=False,
                 is_mxfp4=False, is_mxfp8=False, is_block_fp8=False):
        self._init(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                   num_experts, is_int4, torch.uint8)


def _infer_uint8_only(weight, scales):
    return False, weight.dtype == torch.uint8, False, False, False


def _infer_uint8_or_int8(weight, scales):
    return False, weight.dtype in (torch.uint8, torch.int8) and scales is not None, False, False, False


class FakeInferUint8(_FakeXpuFusedMoeBase):
    """Intermediate upstream: no is_* flags; int4 iff w13 is uint8; rewrite into int8."""

    def __init__(self, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                 num_experts, ep_rank=0, ep_size=1, expert_map=None, gemm1_clamp_limit=None):
        is_int4 = _infer_uint8_only(w13, w13_scales)[1]
        self._init(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                   num_experts, is_int4, torch.int8)
        # that version's GEMM reads int4 only from int8 buffers
        assert not is_int4 or self.w13.dtype == torch.int8, "GEMM would not see int4"


class FakeInferInt8(_FakeXpuFusedMoeBase):
    """Newest upstream: is_* default None (inferred), uint8 or int8 is int4; rewrite into int8."""

    def __init__(self, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                 num_experts, ep_rank=0, ep_size=1, expert_map=None, is_fp8=None, is_int4=None,
                 is_mxfp4=None, is_mxfp8=None, is_block_fp8=None, gemm1_clamp_limit=None):
        inferred = _infer_uint8_or_int8(w13, w13_scales)[1]
        self._init(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, n_experts_per_token, activation,
                   num_experts, inferred if is_int4 is None else is_int4, torch.int8)
        self.record["is_int4_arg"] = is_int4
        assert self.w13.dtype == torch.int8, "GEMM would not see int4"


GENERATIONS = {
    "explicit_flag": (FakeExplicitFlag, None),
    "infer_uint8": (FakeInferUint8, _infer_uint8_only),
    "infer_int8": (FakeInferInt8, _infer_uint8_or_int8),
}


@pytest.fixture
def fake_kernels(monkeypatch):
    """Install a fake vllm_xpu_kernels of the given generation; pretend the CPU is an XPU."""

    def install(generation="infer_int8", available=True):
        cls, infer = GENERATIONS[generation]
        cls.calls = []
        pkg = types.ModuleType("vllm_xpu_kernels")
        pkg.__path__ = []
        mod = types.ModuleType("vllm_xpu_kernels.fused_moe_interface")
        mod.XpuFusedMoe = cls
        mod.FUSEDMOE_AVAILABLE = available
        mod.FUSEDMOE_UNAVAILABLE_REASON = None if available else "libsycl.so.8: cannot open shared object file"
        if infer is not None:
            mod._get_weights_dtype = infer
        pkg.fused_moe_interface = mod
        monkeypatch.setitem(sys.modules, "vllm_xpu_kernels", pkg)
        monkeypatch.setitem(sys.modules, "vllm_xpu_kernels.fused_moe_interface", mod)
        monkeypatch.setattr(xpu_kernels, "_is_xpu", lambda device: True)
        return cls

    return install


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
    monkeypatch.setattr(xpu_kernels, "_is_xpu", lambda device: True)
    monkeypatch.setitem(sys.modules, "vllm_xpu_kernels", None)  # import raises ModuleNotFoundError
    assert xpu_kernels.kernels_status("xpu") == (False, "vllm_xpu_kernels not installed")


def test_status_native_ops_missing(fake_kernels):
    fake_kernels(available=False)
    available, reason = xpu_kernels.kernels_status("xpu")
    assert not available and "libsycl.so.8" in reason


def test_status_class_missing(fake_kernels):
    fake_kernels()
    del sys.modules["vllm_xpu_kernels.fused_moe_interface"].XpuFusedMoe
    available, reason = xpu_kernels.kernels_status("xpu")
    assert not available and "XpuFusedMoe" in reason


def test_status_available_with_module_on_xpu(fake_kernels):
    fake_kernels()
    available, reason = xpu_kernels.kernels_status("xpu")
    assert available and "XpuFusedMoe" in reason


def test_real_device_check_is_device_type():
    assert xpu_kernels._is_xpu(torch.device("xpu")) and not xpu_kernels._is_xpu(torch.device("cpu"))


# --------------------------------------------------------------------------- run_xpu_fused_moe


def test_run_refuses_when_unavailable():
    x, w13, s13, w2, s2, logits = _layer()
    with pytest.raises(RuntimeError, match="only on xpu"):
        xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, None, None, logits, top_k=2, renormalize=True,
                                      encoding="u4b8")


@pytest.mark.parametrize("generation", list(GENERATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_run_u4b8_calls_the_kernel_as_documented(fake_kernels, generation, dtype):
    cls = fake_kernels(generation)
    x, w13, s13, w2, s2, logits = _layer(dtype)
    originals = [t.clone() for t in (w13, w2, s13, s2)]
    tw, ti = route(x, torch.randn(4, 256), 2)
    out = xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, tw, ti.to(torch.int32), None, top_k=2,
                                        renormalize=True, encoding="u4b8")
    (rec,) = cls.calls
    assert rec["w13_dtype"] == rec["w2_dtype"] == torch.uint8
    assert rec["w13_shape"] == (4, 256, 128) and rec["w2_shape"] == (4, 256, 64)
    assert torch.equal(rec["w13_bytes"], w13)  # handed over as stored: the constructor converts
    assert not rec["skip_attr"]
    assert rec["w13_scales"] == (dtype, (4, 256, 2), True) and rec["w2_scales"] == (dtype, (4, 256, 1), True)
    assert rec["biases"] == (None, None)
    assert (rec["n_experts_per_token"], rec["activation"], rec["num_experts"]) == (2, "silu", 4)
    wants_flag = "is_int4" in inspect.signature(cls).parameters
    assert rec["extra"] == {} and (rec.get("is_int4_arg", True) is True if wants_flag else True)
    assert rec["apply"] == {
        "hidden": (dtype, (6, 256)),
        "topk_weights": (torch.float32, (6, 2)),
        "topk_ids": (torch.int64, (6, 2)),
        "output": (dtype, (6, 256)),
    }
    assert out.dtype == dtype and out.shape == (6, 256)
    # the caller's tensors were neither rewritten nor rebound, nor marked
    for before, after in zip(originals, (w13, w2, s13, s2)):
        assert after.dtype == before.dtype and torch.equal(after, before)
    assert not hasattr(w13, "xpu_fused_moe")
    stats = compare(out, _reference(x, w13, s13, w2, s2, tw, ti))
    assert stats["rel"] < 1e-2


@pytest.mark.parametrize(
    "generation,dtype,marked",
    [
        ("infer_int8", torch.int8, True),  # newest: int8 + skip mark
        ("explicit_flag", torch.uint8, True),  # explicit is_int4: uint8 + skip mark
        ("infer_uint8", torch.uint8, False),  # cannot take s4 as-is: XOR'd back to u4b8, converted
    ],
)
def test_run_s4_hands_over_per_generation(fake_kernels, generation, dtype, marked):
    cls = fake_kernels(generation)
    x, w13, s13, w2, s2, logits = _layer(torch.bfloat16, seed=1)
    w13_s4, w2_s4 = w13 ^ 0x88, w2 ^ 0x88
    tw, ti = route(x, torch.randn(4, 256), 2)
    out = xpu_kernels.run_xpu_fused_moe(x, w13_s4, s13, w2_s4, s2, tw, ti, None, top_k=2, renormalize=True,
                                        encoding="s4")
    (rec,) = cls.calls
    assert rec["w13_dtype"] == rec["w2_dtype"] == dtype
    assert rec["skip_attr"] is marked
    assert torch.equal(rec["w13_bytes"].view(torch.uint8), w13_s4 if marked else w13)
    if generation == "explicit_flag":
        assert rec["is_int4"] is True
    assert not hasattr(w13_s4, "xpu_fused_moe") and w13_s4.dtype == torch.uint8
    # a wrong handover (double or missing conversion) would scramble every weight: rel ~ 1
    assert compare(out, _reference(x, w13, s13, w2, s2, tw, ti))["rel"] < 1e-2


@pytest.mark.parametrize("renormalize", [True, False])
def test_run_routes_router_logits_when_no_topk_given(fake_kernels, renormalize):
    cls = fake_kernels()
    x, w13, s13, w2, s2, logits = _layer(torch.float16, seed=2)
    out = xpu_kernels.run_xpu_fused_moe(x, w13, s13, w2, s2, None, None, logits, top_k=2,
                                        renormalize=renormalize, encoding="u4b8")
    probs = logits.softmax(-1)
    tw, ti = probs.topk(2, dim=-1)
    if renormalize:
        tw = tw / tw.sum(-1, keepdim=True)
    assert cls.calls[0]["apply"]["topk_ids"] == (torch.int64, (6, 2))
    assert compare(out, _reference(x, w13, s13, w2, s2, tw, ti))["rel"] < 2e-3


def test_run_rejects_what_the_kernel_would(fake_kernels):
    fake_kernels()
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


def test_dequant_of_fake_rewrite_matches_contract():
    # sanity of the fake itself: implement_zp is byte ^ 0x88 and its signed nibbles give q - 8
    codes = np.arange(16, dtype=np.uint8)
    packed = torch.from_numpy(codes[0::2] | (codes[1::2] << 4)).view(1, 1, 8)
    vals = _signed_weights(_fake_implement_zp(packed), torch.ones(1, 1, 1))
    assert vals.flatten().tolist() == [float(q - 8) for q in range(16)]
