"""``scripts/xpu_load_memory.py``: its allocation tracker counts what torch allocates (and only that),
and on vLLM's XPU branch (vLLM 0.34's Python, the released kernel emulated) the plugin loads converted
layers with no second copy of the experts, where vLLM's own GPTQ path on the source makes one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from support.helpers import REPO
from support.planting import convert
from support.vllm_layer.releases import release_env

from gptq2xpu.testing.synth import make_checkpoint

SCRIPT = REPO / "scripts" / "xpu_load_memory.py"
SPEC = dict(family="qwen3_moe", hidden=256, moe_intermediate=128, num_experts=8, top_k=2, group_size=64,
            num_layers=2, attention=False, vocab=32, seed=5)
E, K, N = SPEC["num_experts"], SPEC["hidden"], SPEC["moe_intermediate"]
QWEIGHT_BYTES = E * 2 * N * K // 2 + E * K * N // 2  # w13 + w2, packed int4, per layer


def _script():
    spec = importlib.util.spec_from_file_location("xpu_load_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tracker_counts_new_storages_not_views_and_sees_frees():
    tracker = _script().AllocationTracker()
    a = torch.zeros(1000, dtype=torch.uint8)  # before: not counted
    with tracker:
        b = a.clone()                                   # +1000
        v = b.view(torch.int32).transpose(0, 0)         # a view: nothing
        b.bitwise_xor_(0x88)                            # in place: nothing
        c = torch.empty(5000, dtype=torch.uint8)        # +5000 (peak 6000)
        del c                                           # -5000
        d = (a ^ 0x88).to(torch.int8)                   # +1000 (xor) +1000 (to), then the xor result dies
    assert tracker.peak == 6000 and tracker.live == 2000, (tracker.peak, tracker.live)
    assert v.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and d.dtype == torch.int8


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    src = make_checkpoint(root / "source", **SPEC).path
    convert(src, root / "u4b8")
    convert(src, root / "s4", "--nibble-encoding", "s4")
    folders = [root / "u4b8", root / "s4", src]
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, folders), "--json"], env=release_env("0.34"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(zip(("u4b8", "s4", "source"), reports, strict=True))


@pytest.mark.parametrize("encoding", ["u4b8", "s4"])
def test_plugin_loads_without_a_second_copy(measured, encoding):
    r = measured[encoding]
    assert r["vllm"] == "0.34.0" and r["quant_method"] == "Gptq2XpuConfig" and len(r["layers"]) == 2
    for layer in r["layers"]:
        assert layer["held"] == layer["stored"]
        assert "implement_zp" not in layer["allocated_by_phase"]
        # what remains: bf16 copies of the fp16 scales (the kernel reads scales in the activation dtype)
        # and the forward's buffers
        assert layer["peak_extra"] < QWEIGHT_BYTES // 4, layer


def test_vllms_gptq_path_on_the_source_makes_a_copy(measured):
    r = measured["source"]
    assert r["quant_method"] == "AutoGPTQConfig"
    for layer in r["layers"]:
        assert layer["allocated_by_phase"]["implement_zp"] > 0
        assert layer["peak_extra"] >= QWEIGHT_BYTES, layer  # the kernel's int8 copy of the experts, at least
    assert r["peak_extra_total"] > 4 * measured["u4b8"]["peak_extra_total"]
