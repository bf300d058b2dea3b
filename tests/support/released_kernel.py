"""The released vllm-xpu-kernels 0.1.16.2 Python interface, imported on CPU for tests.

Its own files are imported from the installed distribution (``pip install --no-deps
vllm-xpu-kernels==0.1.16.2``; CI installs it): ``vllm_xpu_kernels/moe_utils.py`` and
``vllm_xpu_kernels/fused_moe_interface.py``, run as they are. Only what cannot run without an
Intel GPU is replaced, by test code written from the contract (``docs/contract.md``), never from
upstream code:

* the native modules ``vllm_xpu_kernels._C``, ``._moe_C``, ``._xpu_C`` by empty modules (the
  package's ``__init__`` is not run either: it loads attention kernels this test has no use for);
* the native ops the forward calls (``torch.ops._moe_C.remap_hidden_states`` / ``moe_gather``,
  ``torch.ops._C.silu_and_mul``, ``torch.ops._xpu_C.cutlass_grouped_gemm_interface``) by plain
  torch.  The grouped GEMM models only int4, as the contract says the kernel detects it: an
  **int8** weight with scales; anything else is refused, so a hand-over the GEMM would not read as
  int4 fails here.  Every GEMM call is recorded.

Everything is undone after each test (``monkeypatch``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

RELEASE = "0.1.16.2"
DIST = "vllm-xpu-kernels"
PACKAGE = "vllm_xpu_kernels"
GROUPS = (32, 64, 128, 256)


def installed_release_dir() -> Path:
    """The installed package folder, or a skip that says how to install the release."""
    try:
        version = metadata.version(DIST)
    except metadata.PackageNotFoundError:
        version = None
    if version != RELEASE:
        pytest.skip(f"needs {DIST} {RELEASE}'s Python interface (found {version or 'none'}): "
                    f"pip install --no-deps {DIST}=={RELEASE}")
    folder = Path(metadata.distribution(DIST).locate_file(PACKAGE))
    if not (folder / "fused_moe_interface.py").is_file():
        pytest.skip(f"{DIST} {RELEASE} is installed but {folder}/fused_moe_interface.py is missing")
    return folder


# ------------------------------------------------------------------------- native ops, faked


def signed_dequant(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Two's-complement nibble bytes [..., R, C/2] (byte j: column 2j low, 2j+1 high) times scales
    [..., R, C/g] -> float32 [..., R, C]."""
    b = packed.view(torch.uint8).to(torch.int16)
    vals = torch.stack((b & 0xF, b >> 4), -1).flatten(-2)
    vals = torch.where(vals >= 8, vals - 16, vals).to(torch.float32)
    return vals * scales.float().repeat_interleave(vals.shape[-1] // scales.shape[-1], -1)


class NativeOps:
    """Plain-torch stand-ins for the native ops the released forward calls."""

    def __init__(self):
        self.gemm_calls: list[dict] = []

    def remap_hidden_states(self, hidden_states, hidden_states_scales, remapped_hidden_states,
                            remapped_hidden_states_scales, expert_map, rows_per_expert,
                            unpermuted_row_to_permuted_row, topk_ids, total_experts_num, local_experts_num):
        assert hidden_states_scales is None and remapped_hidden_states_scales is None, "unquantized activations only"
        assert expert_map is None and total_experts_num == local_experts_num, "no expert parallelism modelled"
        tokens, top_k = topk_ids.shape
        flat = topk_ids.reshape(-1).long()
        order = torch.sort(flat, stable=True).indices          # permuted row i <- (token, slot) order[i]
        remapped_hidden_states.copy_(hidden_states[order // top_k])
        rows_per_expert.copy_(torch.bincount(flat, minlength=local_experts_num).to(rows_per_expert.dtype))
        where = torch.empty_like(order)
        where[order] = torch.arange(order.numel())
        unpermuted_row_to_permuted_row.copy_(where.view(tokens, top_k).to(unpermuted_row_to_permuted_row.dtype))

    def cutlass_grouped_gemm_interface(self, ptr_A, ptr_A_scale, ptr_B, ptr_B_scale, ptr_bias, ptr_D,
                                       rows_per_expert, N, K, num_experts):
        self.gemm_calls.append({"B": ptr_B, "B_dtype": ptr_B.dtype, "B_ptr": ptr_B.data_ptr(),
                                "scales": ptr_B_scale, "N": N, "K": K, "num_experts": num_experts})
        assert ptr_B.dtype == torch.int8 and ptr_B_scale is not None, (
            f"grouped GEMM: B is {ptr_B.dtype} with scales {'attached' if ptr_B_scale is not None else 'None'}: "
            f"not read as int4 (int4 is an int8 B with scales)")
        assert ptr_A_scale is None and ptr_bias is None
        assert tuple(ptr_B.shape) == (num_experts, N, K // 2), (tuple(ptr_B.shape), N, K)
        groups = ptr_B_scale.shape[-1]
        assert ptr_B_scale.dim() == 3 and ptr_B_scale.is_contiguous() and ptr_B.is_contiguous()
        assert tuple(ptr_B_scale.shape[:2]) == (num_experts, N) and K % groups == 0 and K // groups in GROUPS
        assert ptr_B_scale.dtype == ptr_A.dtype, "scales are read as the activation dtype"
        assert tuple(ptr_A.shape) == (ptr_D.shape[0], K) and ptr_D.shape[1] == N
        start = 0
        for e, n in enumerate(rows_per_expert.tolist()):
            if n:
                w = signed_dequant(ptr_B[e], ptr_B_scale[e])             # [N, K]
                ptr_D[start:start + n] = (ptr_A[start:start + n].float() @ w.T).to(ptr_D.dtype)
            start += n
        assert start == ptr_A.shape[0]

    @staticmethod
    def silu_and_mul(out, x):
        d = x.shape[-1] // 2
        out.copy_((torch.nn.functional.silu(x[:, :d].float()) * x[:, d:].float()).to(out.dtype))

    @staticmethod
    def moe_gather(output, gemm2_output, topk_weights, unpermuted_row_to_permuted_row, num_experts):
        rows = gemm2_output.float()[unpermuted_row_to_permuted_row.long()]          # [T, top_k, K]
        output.copy_((rows * topk_weights.float().unsqueeze(-1)).sum(1).to(output.dtype))


class Released(types.SimpleNamespace):
    """``module`` (fused_moe_interface), ``moe_utils``, ``ops`` (:class:`NativeOps`),
    ``implement_zp`` (the release's own), ``zp_calls`` (how often the constructor called it)."""


def install_released(monkeypatch) -> Released:
    folder = installed_release_dir()
    monkeypatch.delenv("VLLM_XPU_FUSED_MOE_USE_REF", raising=False)
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(folder)]
    monkeypatch.setitem(sys.modules, PACKAGE, pkg)
    for native in ("_C", "_moe_C", "_xpu_C"):
        monkeypatch.setitem(sys.modules, f"{PACKAGE}.{native}", types.ModuleType(f"{PACKAGE}.{native}"))
    modules = {}
    for name in ("moe_utils", "fused_moe_interface"):  # the release's own files, unchanged
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, mod)
        spec.loader.exec_module(mod)
        setattr(pkg, name, mod)
        modules[name] = mod
    module = modules["fused_moe_interface"]
    assert module.FUSEDMOE_AVAILABLE, module.FUSEDMOE_UNAVAILABLE_REASON
    ops = NativeOps()
    monkeypatch.setattr(torch.ops._C, "silu_and_mul", ops.silu_and_mul, raising=False)
    monkeypatch.setattr(torch.ops._moe_C, "remap_hidden_states", ops.remap_hidden_states, raising=False)
    monkeypatch.setattr(torch.ops._moe_C, "moe_gather", ops.moe_gather, raising=False)
    monkeypatch.setattr(torch.ops._xpu_C, "cutlass_grouped_gemm_interface", ops.cutlass_grouped_gemm_interface,
                        raising=False)
    released = Released(module=module, moe_utils=modules["moe_utils"], ops=ops, implement_zp=module.implement_zp,
                        zp_calls=0, folder=folder)

    def counting_zp(qweight):
        released.zp_calls += 1
        return released.implement_zp(qweight)

    monkeypatch.setattr(module, "implement_zp", counting_zp)  # the constructor looks it up at call time
    return released


def implement_zp_all(released: Released, packed: torch.Tensor) -> torch.Tensor:
    """The release's own ``implement_zp`` applied expert by expert (uint8 in, uint8 out)."""
    return torch.stack([released.implement_zp(packed[e]) for e in range(packed.shape[0])])


def readme_block(doc: Path, section: str) -> str:
    """The first ```python block under the heading ``section`` of the Markdown file ``doc``."""
    text = doc.read_text()
    start = text.index(section)
    begin = text.index("```python\n", start) + len("```python\n")
    return text[begin:text.index("```", begin)]
