"""Bytes vLLM allocates beyond the stored experts while it loads MoE layers on its XPU branch, measured on CPU.

    PYTHONPATH=.vllm-releases/0.34.0:.:tests python scripts/xpu_load_memory.py CHECKPOINT... [--layers N] [--json]

(``PYTHONPATH=.:tests`` alone: the installed vLLM 0.32.)  For each routed-experts layer of CHECKPOINT (up to
``--layers``), the release's ``FusedMoE`` layer is built with the checkpoint's quantization method --
``gptq2xpu`` outputs through the plugin, a GPTQ source through vLLM's own ``AutoGPTQConfig``, any other
method through ``vllm``'s ``get_quantization_config(quant_method)`` (e.g. ``compressed-tensors``) -- then
loaded with vLLM's weight loader, ``process_weights_after_loading`` run, and one forward made through
vLLM's XPU branch with the released vllm-xpu-kernels 0.1.16.2 emulated (``tests/support/vllm_layer/xpu_branch.py``:
no Intel GPU is needed; what the kernel's constructor allocates is its own Python, run as released).
Layers stay alive, as in a model, so the peak covers all of them.

How bytes are counted: a ``TorchDispatchMode`` sees every torch operation; each output whose storage
it has not seen is an allocation of that storage's size, released when the storage dies (a weak
reference to the storage object, which torch keeps alive exactly as long as the storage).  The
checkpoint's tensors are read before counting starts (vLLM maps them from the file).  Written by hand:
the CPU allocator reports no live-byte counter, and the profiler's memory events give frees but fold
allocations into operator totals.

Per layer: ``stored`` (the layer's expert tensors in the checkpoint), ``held`` (what the layer holds
after its first forward), ``peak_extra`` (the largest amount live beyond ``stored`` while that layer went
through load and first forward, counting the bytes the earlier layers hold as theirs) and the extra
bytes by phase and by operation (``implement_zp``: the kernel constructor's offset-8 to signed rewrite).
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

#: The released kernel's native operations, emulated in torch on this CPU (``tests/support/released_kernel.py``).
NATIVE_OPS = (("_C", "silu_and_mul"), ("_moe_C", "remap_hidden_states"), ("_moe_C", "moe_gather"),
              ("_xpu_C", "cutlass_grouped_gemm_interface"), ("_moe_C", "topk_softmax"))


class AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages torch operations create while it is active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "-"
        self.by_phase: dict[str, int] = defaultdict(int)
        self.by_op: dict[str, int] = defaultdict(int)
        self._seen: set[int] = set()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ARG002 (torch's signature)
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:  # views and in-place results share an input's storage: not allocations
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr() not in inputs:
                self._count(t.untyped_storage(), str(func.overloadpacket.__name__))
        return out

    def _count(self, storage, op: str) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        self.by_phase[self.phase] += size
        self.by_op[f"{self.phase}:{op}"] += size
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def reset_peak(self) -> None:
        self.peak = self.live

    def not_counting(self, fn):
        """``fn`` with counting paused: for the torch stand-ins of the kernel's native operations, whose
        temporaries the native kernels do not make (they write into buffers the Python allocated)."""
        def call(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
        return call


def quant_config(folder: Path):
    from vllm.model_executor.layers.quantization import get_quantization_config

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    method = str(qc.get("quant_method", "gptq")).lower()
    if method == "gptq2xpu":
        from gptq2xpu.vllm_plugin.config import Gptq2XpuConfig

        cfg = Gptq2XpuConfig.from_config(qc)
        cfg.maybe_update_config(str(folder))
        return cfg
    if method == "gptq":  # vLLM's GPTQ MoE method (what its XPU branch runs for a GPTQ source)
        from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

        return AutoGPTQConfig.from_config(qc)
    return get_quantization_config(method).from_config(qc)


def experts_prefixes(folder: Path) -> list[str]:
    """``model.layers.L.mlp`` of every layer that has routed experts, in layer order."""
    import re

    from safetensors import safe_open

    found = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118
                m = re.match(r"^(.*\.layers\.(\d+)\.mlp)\.experts\.", name)
                if m:
                    found.add((int(m[2]), m[1]))
    return [p for _, p in sorted(found)]


def measure(folder: Path, layers: int | None = None, tokens: int = 16) -> dict:
    import vllm
    from support.vllm_layer import moe_layer
    from support.vllm_layer.xpu_branch import XpuBranch

    folder = Path(folder)
    cfg = moe_layer.config(folder)
    branch = XpuBranch()
    released = branch.released
    keep, rows = [], []
    tracker = AllocationTracker()
    inner_zp = released.module.implement_zp

    def tagged_zp(q):
        before, tracker.phase = tracker.phase, "implement_zp"
        try:
            return inner_zp(q)
        finally:
            tracker.phase = before

    released.module.implement_zp = tagged_zp
    for namespace, name in NATIVE_OPS:
        ns = getattr(torch.ops, namespace)
        branch.mp.setattr(ns, name, tracker.not_counting(getattr(ns, name)))
    try:
        qc = quant_config(folder)
        x = (torch.randn(tokens, cfg["hidden_size"], generator=torch.Generator().manual_seed(1)) / 4).bfloat16()
        for prefix in experts_prefixes(folder)[:layers]:
            tensors = moe_layer.checkpoint_tensors(folder, f"{prefix}.experts", qc)
            stored = sum(t.numel() * t.element_size() for _, t in tensors)
            logits = moe_layer.router_logits(folder, prefix, x).to(x.dtype)
            tracker.by_phase.clear()
            tracker.by_op.clear()
            with tracker:
                base = tracker.live
                tracker.reset_peak()
                tracker.phase = "create"
                runner = moe_layer.build(qc, f"{prefix}.experts", num_experts=cfg["num_experts"],
                                         hidden=cfg["hidden_size"], intermediate=cfg["moe_intermediate_size"],
                                         top_k=cfg["num_experts_per_tok"])
                experts = runner.routed_experts
                # the MoE custom op hides the operations inside it from the tracker: call the Python
                # function behind it, as vLLM itself does on CPU
                runner._forward_entry = sys.modules[type(runner).__module__]._moe_forward
                tracker.phase = "load"
                list(experts.load_weights(tensors))
                tracker.phase = "process_weights_after_loading"
                experts.quant_method.process_weights_after_loading(experts)
                tracker.phase = "first_forward"
                y = branch.forward(runner, x, logits)
                del y
                tracker.phase = "-"
            held = sum(p.untyped_storage().nbytes() for p in _tensors_of(experts))
            keep.append(runner)
            rows.append({"layer": prefix, "method": type(experts.quant_method).__name__, "stored": stored,
                         "held": held, "peak_extra": tracker.peak - base - stored,
                         "allocated_by_phase": dict(tracker.by_phase),
                         "allocated_by_op": dict(sorted(tracker.by_op.items(), key=lambda kv: -kv[1])[:8])})
        peak_model = tracker.peak
    finally:
        released.module.implement_zp = inner_zp
        branch.close()
    return {"checkpoint": str(folder), "vllm": vllm.__version__, "quant_method": type(qc).__name__,
            "layers": rows, "stored_total": sum(r["stored"] for r in rows), "held_total": sum(r["held"] for r in rows),
            "peak_total": peak_model, "peak_extra_total": peak_model - sum(r["stored"] for r in rows)}


def _tensors_of(module) -> list[torch.Tensor]:
    """Every distinct storage the experts module holds, parameters, buffers and the kernel's own."""
    seen, out = set(), []
    candidates = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    impl = _kernel_object(module)
    if impl is not None:
        candidates += [v for v in vars(impl).values() if isinstance(v, torch.Tensor)]
    for t in candidates:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _kernel_object(module):
    qm = module.quant_method
    kernel = getattr(qm, "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None) or getattr(kernel, "experts", None)
    return getattr(experts, "fused_moe_impl", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, nargs="+")
    ap.add_argument("--layers", type=int, default=None, help="measure the first N MoE layers only")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    reports = [measure(folder, args.layers, args.tokens) for folder in args.checkpoint]
    if args.json:
        print(json.dumps(reports))
        return 0
    for report in reports:
        _print(report)
    return 0


def _print(report: dict) -> None:
    mib = 1 << 20
    print(f"vLLM {report['vllm']} {report['quant_method']} {report['checkpoint']}")
    for r in report["layers"]:
        print(f"  {r['layer']}: stored {r['stored'] / mib:.3f} MiB, held {r['held'] / mib:.3f} MiB, "
              f"peak beyond stored {r['peak_extra'] / mib:.3f} MiB; allocated by phase "
              + ", ".join(f"{k} {v / mib:.3f}" for k, v in r["allocated_by_phase"].items()))
    print(f"  all layers: stored {report['stored_total'] / mib:.3f} MiB, held {report['held_total'] / mib:.3f} MiB, "
          f"peak {report['peak_total'] / mib:.3f} MiB (beyond stored {report['peak_extra_total'] / mib:.3f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
