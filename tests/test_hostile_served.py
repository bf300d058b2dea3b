"""Tampered or damaged ``--format xpu`` folders handed to vLLM with the plugin, and to ``gptq2xpu.load``.

Each tampered folder must be refused at load with one line that names the tensor or key and what is
wrong, and points to ``gptq2xpu verify``; never served (as NaN or as wrong numbers), never a traceback
from deep inside vLLM.  The plugin runs at the MoE-layer level (each supported release's ``FusedMoE`` on its
XPU branch, one worker process per release: ``tests/support/vllm_layer/hostile_worker.py``) and through
vLLM 0.32's own start-up path for a model's quantization (``ModelConfig`` -> ``get_quant_config``).  The untampered
folder is served and matches the reference MoE, so every refusal below comes from the tampering.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from support.planting import convert, edit_block, patch_output_tensor, patch_tensor, remove_tensor
from support.vllm_layer import LAYER, LAYER_SPEC
from support.vllm_layer.releases import INSTALLED, RELEASES, run_in_release

from gptq2xpu.errors import InputError
from gptq2xpu.testing.synth import make_checkpoint

HOSTILE_WORKER = __import__("pathlib").Path(__file__).parent / "support" / "vllm_layer" / "hostile_worker.py"
EXPERTS = f"{LAYER}.experts"


def _nan_at(index):
    def fn(a):
        a[index] = float("nan")
        return a
    return fn


def _inf_at(index):
    def fn(a):
        a[index] = float("inf")
        return a
    return fn


def _set_at(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


def _edit_config(folder, fn):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


#: tampered folder -> how it is made from a good copy (``folder`` is that copy).
TAMPER = {
    # the block no longer lists the layer whose stacked tensors are there (renamed): vLLM's GPTQ MoE
    # method got the layer and loaded the stacked tensors into its same-named parameters (served NaN)
    "unlisted_layer": lambda f: edit_block(f, lambda b: b.update(layers={"model.layers.5.mlp": b["layers"][LAYER]})),
    # the layer moved to the block's float pass-through layers (vLLM's unquantized MoE got it and loaded
    # nothing into its weights) or to its unconverted layers (vLLM's GPTQ MoE method: served NaN)
    "listed_as_float": lambda f: edit_block(f, lambda b: b.update(
        passthrough_layers={LAYER: {"kind": "float"}}, layers={"model.layers.5.mlp": b["layers"][LAYER]})),
    "listed_as_unconverted": lambda f: edit_block(f, lambda b: b.update(
        unconverted_layers={LAYER: "kept"}, layers={"model.layers.5.mlp": b["layers"][LAYER]})),
    "nan_scale": lambda f: patch_output_tensor(f, f"{EXPERTS}.w13_scales", _nan_at((1, 3, 0))),
    "inf_scale": lambda f: patch_output_tensor(f, f"{EXPERTS}.w2_scales", _inf_at((0, 0, 0))),
    # a GPTQ per-expert tensor beside the stacked ones: vLLM's loader called the plugin's loader with
    # per-expert arguments (TypeError from inside vLLM)
    "per_expert_tensor": lambda f: save_file(
        {f"{EXPERTS}.0.gate_proj.qweight": torch.zeros(LAYER_SPEC["hidden"] // 8, LAYER_SPEC["moe_intermediate"],
                                                       dtype=torch.int32)}, str(f / "extra.safetensors")),
    # N padded to P by convert --tp-size (code 8, scale 0): padding that is not weight 0 was served; with
    # its scale set too it adds to the output of every token routed to the expert
    "padding_w13": lambda f: (patch_output_tensor(f, f"{EXPERTS}.w13_qweight", _set_at((2, 256 + 200, 7), 0x99)),
                              patch_output_tensor(f, f"{EXPERTS}.w13_scales", _set_at((2, 256 + 200, 0), 0.5))),
    "padding_w2": lambda f: patch_output_tensor(f, f"{EXPERTS}.w2_qweight", _set_at((1, 5, 100), 0x80)),
    # refused before this file too (kept as regressions): lying shapes, dtypes, a missing tensor
    "experts_lie": lambda f: (edit_block(f, lambda b: b["layers"][LAYER].update(experts=8)),
                              _edit_config(f, lambda c: c.update(num_experts=8))),
    "scale_dtype_lie": lambda f: edit_block(f, lambda b: b["layers"][LAYER].update(scale_dtype="bfloat16")),
    "missing_tensor": lambda f: remove_tensor(f, f"{EXPERTS}.w2_scales"),
    # quantization_config changed; the block stays
    "quant_method_gptq": lambda f: _edit_config(f, lambda c: c["quantization_config"].update(quant_method="gptq")),
    "source_quant_config_restored": lambda f: _edit_config(
        f, lambda c: c.update(quantization_config=c["quantization_config"]["source_quantization_config"])),
}
#: tampered folder -> what the one-line error must name.
NAMES = {
    "unlisted_layer": [f"{EXPERTS}.w13_qweight", "does not list"],
    "listed_as_float": [f"{EXPERTS}.w13_qweight", "does not list"],
    "listed_as_unconverted": [f"{EXPERTS}.w13_qweight", "does not list"],
    "nan_scale": [f"{EXPERTS}.w13_scales", "not finite", "[1, 3, 0]"],
    "inf_scale": [f"{EXPERTS}.w2_scales", "not finite", "[0, 0, 0]"],
    "per_expert_tensor": [EXPERTS, "per-expert tensor", "expert 0"],
    "padding_w13": [f"{EXPERTS}.w13_qweight", "[2, 456, 7]", "0x99", "192..255"],
    "padding_w2": [f"{EXPERTS}.w2_qweight", "[1, 5, 100]", "0x80", "192..255"],
    "experts_lie": [f"{EXPERTS}.w13_qweight", "[4, 384, 64]", "[8, 384, 64]"],
    "scale_dtype_lie": [f"{EXPERTS}.w13_scales", "torch.float16", "torch.bfloat16"],
    "missing_tensor": [f"{EXPERTS}.w2_scales", "was not loaded"],
    "quant_method_gptq": ["quantization_config.quant_method", "'gptq'"],
    "source_quant_config_restored": ["quantization_config.quant_method", "'gptq'"],
}
LAYER_CASES = [n for n in TAMPER if not n.startswith(("quant_method", "source_quant"))]
CLAIM_CASES = [n for n in TAMPER if n not in LAYER_CASES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-served")
    src = make_checkpoint(root / "source", **LAYER_SPEC).path
    good = root / "good"
    convert(src, good)
    convert(src, root / "ct", "--format", "compressed-tensors")
    convert(src, root / "ranks", "--tp-size", "2", "--emit-ranks")
    convert(src, root / "padded", "--tp-size", "4")  # N = 192 zero-padded to 256 (64 a rank)
    out = {"good": good, "ct": root / "ct", "ranks": root / "ranks", "padded": root / "padded"}
    assert json.loads((root / "padded" / "config.json").read_text())["gptq2xpu"]["layers"][LAYER][
        "padded_intermediate_size"] == 256
    for name, tamper in TAMPER.items():
        out[name] = shutil.copytree(out["padded"] if name.startswith("padding") else good, root / name)
        tamper(out[name])
    return out


@pytest.fixture(scope="module", params=list(RELEASES))
def served(request, folders):
    """Every layer case through one supported vLLM release with the plugin, in one worker process."""
    runs = [{"name": n, "method": "plugin", "checkpoint": str(folders[n])} for n in ["good", "padded", *LAYER_CASES]]
    runs += [{"name": f"by_name/{n}", "method": "plugin", "checkpoint": str(folders[n]), "by_name": True}
             for n in ("good", "unlisted_layer")]
    return run_in_release(request.param, HOSTILE_WORKER, {"layer": LAYER, "tokens": 8, "runs": runs})["runs"]


@pytest.fixture(scope="module")
def started(folders):
    """vLLM 0.32's start-up path for each claim case (the other releases' wheels run no engine)."""
    claims = [str(folders[n]) for n in ["good", "ct", *CLAIM_CASES]]
    result = run_in_release(INSTALLED, HOSTILE_WORKER, {"layer": LAYER, "claims": claims})["claims"]
    return {k.rsplit("/", 1)[-1]: v for k, v in result.items()}


def _assert_one_clear_line(error: str, case: str) -> None:
    assert error.startswith("InputError: "), error  # the plugin's refusal, not an error from inside vLLM
    assert "\n" not in error, error
    for word in NAMES[case] + ["gptq2xpu verify"]:
        assert word in error, (case, word, error)


@pytest.mark.vllm
def test_the_untampered_folder_is_served_and_right(served):
    for name in ("good", "padded"):
        r = served[name]
        assert "error" not in r, r
        assert r["finite"] and r["vs_reference"]["ok"], r["vs_reference"]


@pytest.mark.vllm
@pytest.mark.parametrize("case", LAYER_CASES)
def test_a_tampered_layer_is_refused_at_load_with_one_line(served, case):
    r = served[case]
    assert "error" in r, f"{case}: served (finite output: {r.get('finite')})"
    _assert_one_clear_line(r["error"], case)


@pytest.mark.vllm
def test_an_unlisted_layer_is_refused_when_loaded_by_parameter_name(served):
    """DeepSeek-V2/V3's loader hands each tensor to its parameter's loader by name: vLLM's GPTQ MoE
    parameters' loaders were called without an expert (TypeError inside vLLM)."""
    assert served["by_name/good"] == {"method": "ConvertedMoEMethod"}
    r = served["by_name/unlisted_layer"]
    assert "error" in r, r
    _assert_one_clear_line(r["error"], "unlisted_layer")


@pytest.mark.vllm
def test_vllm_picks_the_plugin_for_converted_folders_only(started):
    assert started["good"] == {"quantization": "gptq2xpu", "config": "Gptq2XpuConfig"}
    # a compressed-tensors output carries a config block too: stock vLLM's method keeps it
    assert started["ct"] == {"quantization": "compressed-tensors", "config": "CompressedTensorsConfig"}


@pytest.mark.vllm
@pytest.mark.parametrize("case", CLAIM_CASES)
def test_a_converted_folder_under_another_quant_method_is_refused(started, case):
    """Without the claim vLLM's own GPTQ method took the folder ('Cannot find any of ['bits']', or,
    with the source's description restored, its MoE method loading the stacked tensors as GPTQ ones)."""
    r = started[case]
    assert "error" in r, f"{case}: vLLM chose {r}"
    _assert_one_clear_line(r["error"], case)


# ------------------------------------------------------------------------------ gptq2xpu.load (no vLLM)


@pytest.mark.parametrize("case", ["nan_scale", "inf_scale"])
def test_the_loader_refuses_non_finite_scales(folders, case):
    from gptq2xpu.load import open_converted

    with open_converted(folders["good"]) as ckpt:
        assert torch.isfinite(ckpt.layer(LAYER).w13_scales).all()
    with open_converted(folders[case]) as ckpt, pytest.raises(InputError) as exc:
        ckpt.layer(LAYER)
    assert all(w in exc.value.message for w in NAMES[case] + ["gptq2xpu verify"]), exc.value.message


def test_the_loader_refuses_non_finite_scales_in_a_rank_folder(folders, tmp_path):
    """``convert --emit-ranks``: a rank reads its own folder, whose scales are checked too."""
    from gptq2xpu.load import open_converted

    folder = shutil.copytree(folders["ranks"], tmp_path / "ranks")
    rank1 = folder / "tp-ranks" / "rank-001-of-002"
    patch_tensor(rank1 / "model.safetensors", f"{EXPERTS}.w2_scales", _nan_at((2, 5, 1)))
    with open_converted(folder) as ckpt:
        assert torch.isfinite(ckpt.layer(LAYER, tp_rank=0, tp_size=2).w2_scales).all()  # rank 0's folder is intact
        with pytest.raises(InputError) as exc:
            ckpt.layer(LAYER, tp_rank=1, tp_size=2)
    for word in (f"{EXPERTS}.w2_scales", "not finite", "[2, 5, 1]", "rank 1", "tp-ranks/rank-001-of-002",
                 "gptq2xpu verify"):
        assert word in exc.value.message, (word, exc.value.message)


def test_the_loader_refuses_padding_that_is_not_weight_0(folders):
    """N = 192 padded to 256 (``--tp-size 4``): every rank of the intact folder loads; the tampered byte
    lies in the up rows' padding, which only rank 3 (values 192..255, all padding) holds."""
    from gptq2xpu.load import open_converted

    with open_converted(folders["padded"]) as ckpt:
        for size in (1, 2, 4):
            for rank in range(size):
                ckpt.layer(LAYER, tp_rank=rank, tp_size=size)
    with open_converted(folders["padding_w13"]) as ckpt:
        ckpt.layer(LAYER, tp_rank=0, tp_size=4)
        for size, rank, byte in ((1, 0, "[2, 456, 7]"), (4, 3, "[2, 72, 7]")):
            with pytest.raises(InputError) as exc:
                ckpt.layer(LAYER, tp_rank=rank, tp_size=size)
            for word in (f"{EXPERTS}.w13_qweight", byte, "0x99", "192..255", "gptq2xpu verify"):
                assert word in exc.value.message, (word, exc.value.message)
