"""Worker (see :mod:`vllm_layer.releases`): converted MoE layers through one vLLM release's XPU branch.

    python tests/support/vllm_layer/moe_worker.py JOB.json RESULT.json     (PYTHONPATH: release, repo, tests/)

JOB: ``{"layer": "model.layers.0.mlp", "tokens": 16, "runs": [{"name", "method": "plugin" | "gptq" | "ct",
"checkpoint": folder, "defect": null | one of DEFECTS, "reference_source": null | GPTQ folder}, ...]}``.
``plugin``: the converted checkpoint
through gptq2xpu's quantization config (vLLM's config object for ``quant_method: gptq2xpu``);
``gptq``: a GPTQ source through the release's own ``AutoGPTQConfig`` (vLLM's GPTQ MoE path); ``ct``: a
``--format compressed-tensors`` output through the release's own ``CompressedTensorsConfig`` (no plugin).
With ``reference_source``, the output is also compared with the reference int4 MoE of that GPTQ source.  Each
run builds the release's ``FusedMoE`` layer, loads the checkpoint's tensors with the release's loader,
runs ``process_weights_after_loading`` and one forward through vLLM's modular kernel
(``XPUExpertsWNA16`` -> the released ``XpuFusedMoe``, native ops in torch; ``xpu_branch``), on the same
tokens, routed by the layer's own router weights.

RESULT: per run, the output (as a list), what vLLM chose (method, backend, parameter dtypes/shapes),
what the released kernel was given (int4 detected, weight dtype, scales attached, GEMM calls), the
comparison with the project's reference int4 MoE (``gptq2xpu.verify.reference`` on the converted
tensors read straight from the files), or the error.  Plus ``vllm_version`` and ``platform``.

DEFECTS are planted where the plugin hands the layer to vLLM's kernel step (the results of the kernel
format step are edited before they become the layer's parameters):
* ``int8``: the weights handed over as int8 (the kernel interface takes int4 only from uint8);
* ``scales_dropped``: the group scales replaced by ones (what a hand-over that loses them computes);
* ``gate_up_swapped``: w13's gate rows and up rows exchanged (with their scales).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

DEFECTS = ("int8", "scales_dropped", "gate_up_swapped")


def plant(converted: dict, defect: str) -> dict:
    if defect == "int8":
        for name in ("w13_qweight", "w2_qweight"):
            converted[name] = converted[name].view(torch.int8)
    elif defect == "scales_dropped":
        for name in ("w13_scales", "w2_scales"):
            converted[name] = torch.ones_like(converted[name])
    elif defect == "gate_up_swapped":
        for name in ("w13_qweight", "w13_scales"):
            converted[name] = converted[name].roll(converted[name].shape[1] // 2, dims=1).contiguous()
    else:
        raise ValueError(defect)
    return converted


def quant_config(method: str, folder: Path):
    from support.vllm_layer.moe_layer import config

    qc = config(folder)["quantization_config"]
    if method == "ct":  # stock vLLM's compressed-tensors method (convert --format compressed-tensors)
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
            CompressedTensorsConfig,
        )

        return CompressedTensorsConfig.from_config(qc)
    if method == "plugin":
        from gptq2xpu.vllm_plugin.config import Gptq2XpuConfig

        cfg = Gptq2XpuConfig.from_config(qc)
        cfg.maybe_update_config(str(folder))
        return cfg
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    return AutoGPTQConfig.from_config(qc)


def one_run(branch, run: dict, layer: str, x: torch.Tensor) -> dict:
    from gptq2xpu.verify.reference import compare, within_tolerance
    from gptq2xpu.vllm_plugin import moe as plugin_moe
    from support.planting import reference_moe
    from support.vllm_layer import moe_layer

    folder = Path(run["checkpoint"])
    cfg = moe_layer.config(folder)
    top_k = cfg["num_experts_per_tok"]
    released = branch.released
    branch.new_layer()
    released.zp_calls = 0
    released.ops.gemm_calls.clear()
    original = plugin_moe.to_kernel_format
    if run.get("defect"):
        plugin_moe.to_kernel_format = lambda **kw: plant(original(**kw), run["defect"])
    try:
        qc = quant_config(run["method"], folder)
        runner = moe_layer.build(qc, f"{layer}.experts",
                                 num_experts=cfg["num_experts"], hidden=cfg["hidden_size"],
                                 intermediate=cfg["moe_intermediate_size"], top_k=top_k)
        experts = runner.routed_experts
        qm = experts.quant_method
        loaded = moe_layer.load(runner, moe_layer.checkpoint_tensors(folder, f"{layer}.experts", qc))
        out = {"method": type(qm).__name__, "backend": getattr(getattr(qm, "wna16_moe_backend", None), "value", None),
               "experts_cls": getattr(getattr(qm, "experts_cls", None), "__name__", None), "loaded": len(loaded),
               "params": {n: [str(p.dtype), list(p.shape)] for n, p in experts.named_parameters(recurse=False)}}
        y = branch.forward(runner, x, moe_layer.router_logits(folder, layer, x).to(x.dtype))
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        plugin_moe.to_kernel_format = original
    impl = _find_impl(qm)
    fused = getattr(impl, "fused_moe_impl", None)
    out["experts_object"] = type(impl).__name__
    out["kernel"] = None if fused is None else {
        "class": type(fused).__name__, "is_int4": bool(getattr(fused, "is_int4", False)),
        "inter_size": getattr(fused, "inter_size", None), "w13_dtype": str(fused.w13.dtype),
        "scales_attached": getattr(fused, "gemm1_wei_scales", None) is not None,
        "implement_zp_calls": released.zp_calls,
        "w13_is_the_layer_storage": fused.w13.untyped_storage().data_ptr()
        == experts.w13_weight.untyped_storage().data_ptr()}
    out["gemm_calls"] = [{"B_dtype": str(c["B_dtype"]), "N": c["N"], "K": c["K"]} for c in released.ops.gemm_calls]
    out["output"] = y.float().tolist()
    if run["method"] == "plugin":
        ref = reference_moe(folder, layer, x, top_k)
        stats = compare(y.float(), ref)
        out["vs_reference"] = {**stats, "ok": within_tolerance(stats, x.dtype)}
    if run.get("reference_source"):  # the reference int4 MoE from the GPTQ source itself
        stats = compare(y.float(), source_reference_moe(Path(run["reference_source"]), layer, x, top_k))
        out["vs_reference"] = {**stats, "ok": within_tolerance(stats, x.dtype)}
    return out


def source_reference_moe(folder: Path, prefix: str, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The reference int4 MoE (``gptq2xpu.verify.reference``) of a GPTQ source's layer: every expert
    dequantized with the GPTQ formula (``tests/support/vllm_engine.py``; scales in x's dtype), routed by its router."""
    from gptq2xpu.verify.reference import moe_forward, route
    from support.vllm_engine import _tensors, gptq_dequantize
    from support.vllm_layer.moe_layer import config

    t = _tensors(folder)
    cfg = config(folder)
    v1 = str(cfg["quantization_config"].get("checkpoint_format", "gptq")) == "gptq"

    def deq(module):
        return gptq_dequantize(t[f"{module}.qweight"], t[f"{module}.scales"].to(x.dtype).float(), t[f"{module}.qzeros"],
                               t.get(f"{module}.g_idx"), v1=v1)

    experts = range(cfg["num_experts"])
    w13 = torch.stack([torch.cat([deq(f"{prefix}.experts.{e}.gate_proj"), deq(f"{prefix}.experts.{e}.up_proj")])
                       for e in experts])
    w2 = torch.stack([deq(f"{prefix}.experts.{e}.down_proj") for e in experts])
    tw, ti = route(x, t[f"{prefix}.gate.weight"].float(), top_k)
    return moe_forward(x.float(), w13, w2, tw, ti)


def _find_impl(qm):
    """vLLM's experts object inside the method's modular kernel (``XPUExpertsWNA16`` here)."""
    from gptq2xpu.vllm_plugin.xpu_experts import experts_object

    return experts_object(getattr(qm, "moe_kernel", None))


def main(job_file: str, result_file: str) -> None:
    import vllm

    from support.vllm_layer.xpu_branch import XpuBranch

    job = json.loads(Path(job_file).read_text())
    branch = XpuBranch()
    from vllm.platforms import current_platform

    result = {"vllm_version": vllm.__version__, "vllm_file": vllm.__file__,
              "platform": type(current_platform).__name__, "is_xpu": current_platform.is_xpu(), "runs": {}}
    try:
        torch.manual_seed(0)
        first = Path(job["runs"][0]["checkpoint"])
        from support.vllm_layer.moe_layer import config

        hidden = config(first)["hidden_size"]
        x = (torch.randn(job.get("tokens", 16), hidden, generator=torch.Generator().manual_seed(1)) / 4)
        x = x.to(torch.bfloat16)
        for run in job["runs"]:
            result["runs"][run["name"]] = one_run(branch, run, job["layer"], x)
    finally:
        branch.close()
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
