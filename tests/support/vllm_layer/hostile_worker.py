"""Worker (see :mod:`vllm_layer.releases`): tampered converted folders handed to vLLM with the plugin.

    python tests/support/vllm_layer/hostile_worker.py JOB.json RESULT.json     (PYTHONPATH: release, repo, tests/)

JOB: ``{"layer": "model.layers.0.mlp", "tokens": 16, "claims": [folder, ...], "runs": [<moe_worker run>, ...]}``
(either list may be empty or absent).

* ``claims``: each folder goes through vLLM's own start-up path for a model's quantization: ``ModelConfig``
  (which asks every registered method's ``override_quantization_method``, the plugin's included) and
  ``get_quant_config`` (the chosen method's ``from_config``), on the installed platform (CPU).  Result per
  folder: ``{"quantization": ..., "config": class name}`` or ``{"error": "Type: message"}``.
* ``runs``: :func:`vllm_layer.moe_worker.one_run` on vLLM's XPU branch (build the layer, load the folder's
  tensors with vLLM's loader, ``process_weights_after_loading``, one forward), each result plus
  ``finite`` (whether the output holds no NaN or infinity); a run with ``"by_name": true`` instead hands
  each tensor to its parameter's ``weight_loader`` (DeepSeek's loader), no forward: :func:`by_name_run`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def claim(folder: str) -> dict:
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    try:
        mc = ModelConfig(model=folder, skip_tokenizer_init=True)
        out = {"quantization": mc.quantization}
        out["config"] = type(get_quant_config(mc, LoadConfig())).__name__ if mc.quantization else None
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        return {"error": f"{type(exc).__name__}: {exc}"}
    return out


def by_name_run(branch, run: dict, layer: str) -> dict:
    """Build the layer and hand each expert tensor to its parameter's ``weight_loader(param, tensor)``, as
    models whose loader indexes parameters by name do (DeepSeek-V2/V3); then ``process_weights_after_loading``."""
    import traceback

    from support.vllm_layer import moe_layer
    from support.vllm_layer.moe_worker import quant_config

    folder = Path(run["checkpoint"])
    cfg = moe_layer.config(folder)
    branch.new_layer()
    try:
        qc = quant_config("plugin", folder)
        runner = moe_layer.build(qc, f"{layer}.experts", num_experts=cfg["num_experts"], hidden=cfg["hidden_size"],
                                 intermediate=cfg["moe_intermediate_size"], top_k=cfg["num_experts_per_tok"])
        experts = runner.routed_experts
        for name, tensor in moe_layer.checkpoint_tensors(folder, f"{layer}.experts", qc):
            param = getattr(experts, name.rsplit(".", 1)[-1])
            param.weight_loader(param, tensor)
        experts.quant_method.process_weights_after_loading(experts)
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    return {"method": type(experts.quant_method).__name__}


def main(job_file: str, result_file: str) -> None:
    from gptq2xpu.vllm_plugin.config import register_config
    from support.vllm_layer.moe_worker import one_run

    job = json.loads(Path(job_file).read_text())
    register_config()  # what vLLM's plugin loading does in each of its processes (VLLM_PLUGINS is empty here)
    result = {"claims": {folder: claim(folder) for folder in job.get("claims", [])}, "runs": {}}
    if not job.get("runs"):
        Path(result_file).write_text(json.dumps(result))
        return
    from support.vllm_layer.moe_layer import config
    from support.vllm_layer.xpu_branch import XpuBranch

    branch = XpuBranch()
    try:
        hidden = config(Path(job["runs"][0]["checkpoint"]))["hidden_size"]
        x = (torch.randn(job.get("tokens", 16), hidden, generator=torch.Generator().manual_seed(1)) / 4)
        x = x.to(torch.bfloat16)
        for run in job["runs"]:
            if run.get("by_name"):
                result["runs"][run["name"]] = by_name_run(branch, run, job["layer"])
                continue
            try:
                r = one_run(branch, run, job["layer"], x)
            except Exception as exc:  # noqa: BLE001 - served, but the reference could not be computed
                r = {"error": f"after the forward, {type(exc).__name__}: {exc}"}
            if "output" in r:
                r["finite"] = bool(torch.isfinite(torch.tensor(r["output"])).all())
            result["runs"][run["name"]] = r
    finally:
        branch.close()
    Path(result_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
