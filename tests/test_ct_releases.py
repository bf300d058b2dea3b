"""``convert --format compressed-tensors`` outputs through each vLLM release's own compressed-tensors MoE
method (``compressed_tensors_moe_wna16.py``; 0.32, 0.33, 0.34), no plugin, at the MoE-layer level on
vLLM's XPU branch with the released vllm-xpu-kernels 0.1.16.2 emulated (``tests/support/vllm_layer``).

Per release, one subprocess (``tests/support/vllm_layer/moe_worker.py``): the release's ``FusedMoE`` layer with
its ``CompressedTensorsConfig`` built from the output's ``quantization_config``, its weight loader fed
the output's per-expert tensors, ``process_weights_after_loading`` (backend selection ->
``_process_weights_xpu``), one forward through ``XPUExpertsWNA16`` -> the released ``XpuFusedMoe``.
Judged against (a) the reference int4 MoE of the GPTQ source (its experts dequantized with the GPTQ
formula, ``tests/support/vllm_engine.py``) within the bf16 tolerance and (b) the same release's GPTQ MoE path on the
source: identical outputs.  Defects planted in the output's files (one expert's bytes, its gate and up
swapped, a scale changed) must fail (a) and (b).
"""

from __future__ import annotations

import shutil
import types

import pytest
import torch
from support.ct import CT_DEFECTS, plant_ct_defect
from support.planting import convert
from support.vllm_layer import LAYER, LAYER_SPEC, ok, run_layer
from support.vllm_layer.releases import RELEASES

from gptq2xpu.testing.synth import make_checkpoint

SPEC = LAYER_SPEC
N = SPEC["moe_intermediate"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-releases")
    src = make_checkpoint(root / "source", **SPEC).path
    convert(src, root / "ct", "--format", "compressed-tensors")
    defects = {}
    for kind in CT_DEFECTS:
        defects[kind] = shutil.copytree(root / "ct", root / f"defect-{kind}")
        plant_ct_defect(defects[kind], kind, f"{LAYER}.experts.1")
    return types.SimpleNamespace(source=src, ct=root / "ct", defects=defects)


@pytest.fixture(scope="module", params=list(RELEASES))
def release(request, checkpoints):
    src = str(checkpoints.source)
    runs = [{"name": "ct", "method": "ct", "checkpoint": str(checkpoints.ct), "reference_source": src},
            {"name": "gptq/source", "method": "gptq", "checkpoint": src, "reference_source": src}]
    runs += [{"name": f"defect/{kind}", "method": "ct", "checkpoint": str(folder), "reference_source": src}
             for kind, folder in checkpoints.defects.items()]
    return run_layer(request.param, runs)


def test_compressed_tensors_method_on_the_xpu_branch_matches_the_reference(release):
    assert release.result["vllm_version"] == RELEASES[release.name] and release.result["is_xpu"] is True
    r = ok(release, "ct")
    assert (r["method"], r["experts_cls"]) == ("CompressedTensorsWNA16MoEMethod", "XPUExpertsWNA16")
    assert r["experts_object"] == "XPUExpertsWNA16"
    k = r["kernel"]
    assert (k["class"], k["is_int4"], k["inter_size"], k["w13_dtype"], k["scales_attached"]) == (
        "XpuFusedMoe", True, N, "torch.int8", True)
    assert r["vs_reference"]["ok"], r["vs_reference"]


def test_compressed_tensors_method_equals_vllms_gptq_path_on_the_source(release):
    src = ok(release, "gptq/source")
    assert src["method"] == "AutoGPTQMoEMethod" and src["vs_reference"]["ok"]
    assert torch.equal(torch.tensor(ok(release, "ct")["output"]), torch.tensor(src["output"]))


@pytest.mark.parametrize("kind", CT_DEFECTS)
def test_planted_defects_in_the_output_are_caught(release, kind):
    r = ok(release, f"defect/{kind}")
    assert not r["vs_reference"]["ok"], r["vs_reference"]
    assert not torch.equal(torch.tensor(r["output"]), torch.tensor(ok(release, "gptq/source")["output"]))


# ------------------------------------------------------------------------------ copies at load (XPU branch)

MEM_SPEC = dict(family="qwen3_moe", hidden=256, moe_intermediate=128, num_experts=8, top_k=2, group_size=64,
                num_layers=2, attention=False, vocab=32, seed=5)
QWEIGHT_BYTES = 3 * MEM_SPEC["num_experts"] * MEM_SPEC["hidden"] * MEM_SPEC["moe_intermediate"] // 2  # per layer


@pytest.fixture(scope="module")
def load_memory(tmp_path_factory):
    """``scripts/xpu_load_memory.py`` in vLLM 0.34 on the GPTQ source, its xpu output (plugin) and its
    compressed-tensors output (vLLM's own method): bytes allocated beyond the stored experts."""
    import json
    import subprocess
    import sys

    from support.helpers import REPO
    from support.vllm_layer.releases import release_env

    root = tmp_path_factory.mktemp("ct-memory")
    src = make_checkpoint(root / "source", **MEM_SPEC).path
    convert(src, root / "xpu")
    convert(src, root / "ct", "--format", "compressed-tensors")
    folders = [src, root / "xpu", root / "ct"]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "xpu_load_memory.py"), *map(str, folders), "--json"],
                          env=release_env("0.34"), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(zip(("source", "xpu", "ct"), reports, strict=True))


def test_compressed_tensors_output_loads_without_vllms_transpose_copy(load_memory):
    """vLLM's GPTQ path transposes every expert into a new tensor at load; its compressed-tensors
    method takes the output's N-first tensors as they are.  The kernel constructor's offset-8 to
    signed rewrite (``implement_zp``, a second copy) remains for both: only the xpu format with the
    plugin avoids it."""
    src, ct, xpu = load_memory["source"], load_memory["ct"], load_memory["xpu"]
    assert (src["quant_method"], ct["quant_method"], xpu["quant_method"]) == (
        "AutoGPTQConfig", "CompressedTensorsConfig", "Gptq2XpuConfig")
    for s, c in zip(src["layers"], ct["layers"], strict=True):
        assert s["allocated_by_phase"]["process_weights_after_loading"] >= QWEIGHT_BYTES
        assert c["allocated_by_phase"].get("process_weights_after_loading", 0) == 0
        assert c["held"] <= c["stored"]  # weight_shape is read at load, not kept
        assert c["allocated_by_phase"]["implement_zp"] > 0
    assert xpu["peak_extra_total"] < ct["peak_extra_total"] <= src["peak_extra_total"]
