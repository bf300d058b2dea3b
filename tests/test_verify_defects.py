"""``verify`` catches converter bugs, not only corrupted downloads.

Each defect is planted in a good conversion the way a buggy converter would write it, and the
manifest is re-sealed (sha256 and size recomputed), so the manifest check passes and only the
content checks can find it.  ``verify --source`` must exit 4 and its JSON must name the failing
check.  Standalone ``verify`` must fail on corruption (a flipped byte, a deleted or extra file, a
removed tensor).  And there must be no false alarm on good conversions of every family synth
writes, every encoding and scale dtype, regrouped and per-channel scales, and the AutoRound fixture.

Everything runs the CLI in-process (``helpers.cli``); sources are built once per module.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import FIXTURE, read_tensor, tensor_span
from support.planting import (
    BASE,
    DEFECTS,
    INDEX,
    L0,
    L1,
    E,
    K,
    N,
    convert,
    copy_output,
    failed_checks,
    flip_byte,
    plant_nibble_swap,
    remove_tensor,
    reseal,
    shard_of,
    tensor_name,
    verify_json,
)

from gptq2xpu.contract import CONFIG_BLOCK, parse_block
from gptq2xpu.errors import EXIT_VERIFY
from gptq2xpu.read import open_source
from gptq2xpu.read.checkpoint import open_checkpoint
from gptq2xpu.testing.synth import FAMILIES, make_checkpoint
from gptq2xpu.verify.numeric import numeric_layer
from gptq2xpu.verify.reference import TOLERANCES


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One source and its good conversion, shared by every defect test of this module."""
    root = tmp_path_factory.mktemp("defects")
    info = make_checkpoint(root / "src", **BASE)
    convert(info.path, root / "good")
    return info, root / "good"


@pytest.fixture(scope="module")
def base_bf16(tmp_path_factory):
    """The same kind of source (fp16 scales) converted with --scale-dtype bfloat16."""
    root = tmp_path_factory.mktemp("defects_bf16")
    info = make_checkpoint(root / "src", **BASE)
    convert(info.path, root / "good", "--scale-dtype", "bfloat16")
    return info, root / "good"


# --------------------------------------------------------------------------- the defects (tests/support/planting.py)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_verify_source_catches_planted_defect(defect, base, base_bf16, tmp_path):
    planter, bf16, must_fail = DEFECTS[defect]
    info, good = base_bf16 if bf16 else base
    out = copy_output(good, tmp_path / "out")
    planter(out, info)
    code, report = verify_json(out, "--source", info.path)
    assert code == EXIT_VERIFY, report["failures"]
    assert report["status"] == "fail"
    failed = failed_checks(report)
    assert must_fail <= failed, (defect, report["failures"])
    # re-sealed: the manifest and the layout are fine, only the content checks see it
    assert {"manifest", "index and shards", "layout"}.isdisjoint(failed), report["failures"]
    # and standalone verify cannot see it (which is why --source exists)
    code, report = verify_json(out)
    assert code == 0, report["failures"]


def test_good_base_outputs_pass(base, base_bf16):
    for info, good in (base, base_bf16):
        code, report = verify_json(good, "--source", info.path)
        assert code == 0 and report["status"] == "ok", report["failures"]


# --------------------------------------------------------------------------- numerical check alone


@pytest.mark.parametrize("defect", ["nibble order swapped in one expert", "gate/up halves swapped in one expert",
                                    "one expert's scales doubled"])
def test_numeric_check_alone_catches(defect, base, tmp_path):
    """The reference MoE alone (no bit-exact check) flags the defect: its every-expert pass runs
    each expert once, so even an expert no routed token picked is exercised."""
    planter = DEFECTS[defect][0]
    info, good = base
    out = copy_output(good, tmp_path / "out")
    planter(out, info)
    with open_source(info.path) as src, open_checkpoint(out) as conv:
        block = parse_block(conv.config[CONFIG_BLOCK])
        rows = {}
        for prefix in block.layers:
            # one token, top-2: at most 2 of 8 experts are routed; the every-expert pass covers the rest
            rows[prefix] = numeric_layer(src, conv, prefix, block.layers[prefix], block, device=torch.device("cpu"),
                                         dtype=torch.float32, tokens=1, seed=0)
    planted_layer = L1 if defect == "one expert's scales doubled" else L0
    other = L0 if planted_layer == L1 else L1
    bad = rows[planted_layer]
    assert not bad["ok"], bad
    assert bad["every_expert_rel"] > 100 * TOLERANCES["float32"]["rel"], bad
    assert rows[other]["ok"], rows[other]


def test_numeric_check_passes_good_output(base):
    info, good = base
    with open_source(info.path) as src, open_checkpoint(good) as conv:
        block = parse_block(conv.config[CONFIG_BLOCK])
        for prefix in block.layers:
            row = numeric_layer(src, conv, prefix, block.layers[prefix], block, device=torch.device("cpu"),
                                dtype=torch.float32, tokens=1, seed=0)
            assert row["ok"], row


# --------------------------------------------------------------------------- standalone verify


def test_standalone_flipped_byte_without_reseal(base, tmp_path):
    info, good = base
    out = copy_output(good, tmp_path / "out")
    shard = shard_of(out, tensor_name(L0, "w2_qweight"))
    _, _, start, end = tensor_span(shard, tensor_name(L0, "w2_qweight"))
    flip_byte(shard, start + (end - start) // 2)
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert "manifest" in failed_checks(report)
    detail = next(c["detail"] for c in report["checks"] if c["check"] == "manifest")
    assert shard.name in detail and "sha256" in detail


def test_standalone_deleted_file(base, tmp_path):
    info, good = base
    out = copy_output(good, tmp_path / "out")
    (out / "tokenizer.json").unlink()
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert failed_checks(report) == {"manifest"}, report["failures"]
    assert "tokenizer.json" in report["failures"][0] and "missing" in report["failures"][0]


def test_standalone_deleted_shard(base, tmp_path):
    info, good = base
    out = copy_output(good, tmp_path / "out")
    shard_of(out, tensor_name(L0, "w13_qweight")).unlink()
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert {"manifest", "index and shards"} <= failed_checks(report), report["failures"]


def test_standalone_extra_file(base, tmp_path):
    info, good = base
    out = copy_output(good, tmp_path / "out")
    (out / "notes.txt").write_text("not written by the converter\n")
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert failed_checks(report) == {"manifest"}
    assert "notes.txt" in report["failures"][0] and "not listed" in report["failures"][0]


@pytest.mark.parametrize("tensor,check", [
    (tensor_name(L1, "w2_scales"), "layout"),
    (tensor_name(L0, "w13_qweight"), "layout"),
    (f"{L1}.gate.weight", "routers"),
])
def test_standalone_tensor_removed_and_resealed(base, tmp_path, tensor, check):
    """Shard rewritten without the tensor, index updated, manifest re-sealed: the manifest and the
    index agree with the shards, and the layout / router check finds the hole."""
    info, good = base
    out = copy_output(good, tmp_path / "out")
    remove_tensor(out, tensor)
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    failed = failed_checks(report)
    assert check in failed, report["failures"]
    assert "manifest" not in failed and "index and shards" not in failed, report["failures"]
    assert tensor in " ".join(report["failures"])


def test_standalone_tensor_removed_from_shard_only(base, tmp_path):
    """The shard lost a tensor the (re-sealed, untouched) index still lists: index and shards disagree."""
    info, good = base
    out = copy_output(good, tmp_path / "out")
    remove_tensor(out, tensor_name(L0, "w2_scales"), update_index=False)
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert "index and shards" in failed_checks(report), report["failures"]


def test_manifest_reseal_helper_is_faithful(base, tmp_path):
    """Re-sealing an untouched output changes nothing, and a planted output's manifest passes."""
    info, good = base
    out = copy_output(good, tmp_path / "out")
    before = (out / "gptq2xpu-manifest.json").read_bytes()
    reseal(out, "model.safetensors", INDEX)
    assert (out / "gptq2xpu-manifest.json").read_bytes() == before
    plant_nibble_swap(out, info)
    code, report = verify_json(out)
    assert code == 0 and not failed_checks(report), report["failures"]
    assert read_tensor(out / "model.safetensors", tensor_name(L0, "w13_qweight")).shape == (E, 2 * N, K // 2)


# --------------------------------------------------------------------------- no false alarm


SMALL = dict(hidden=128, moe_intermediate=64, num_experts=4, top_k=2, group_size=32, num_layers=2, vocab=32)
FAMILY_EXTRAS = {
    "deepseek_v2": dict(first_dense=1, num_layers=3),
    "deepseek_v3": dict(first_dense=1, num_layers=3, mtp=True),
    "glm4_moe": dict(mtp=True),
    "qwen3_next": dict(mtp=True),
    "qwen3_5_moe": dict(mtp=True),
}
GOOD_CASES = {f"family-{f}": (dict(SMALL, family=f, **FAMILY_EXTRAS.get(f, {})), ()) for f in FAMILIES}
GOOD_CASES.update({
    "s4": (dict(SMALL), ("--nibble-encoding", "s4")),
    "scale-bf16": (dict(SMALL), ("--scale-dtype", "bfloat16")),
    "bf16-source-s4": (dict(SMALL, scale_dtype="bfloat16", checkpoint_format="gptq_v2"), ("--nibble-encoding", "s4")),
    "per-channel": (dict(SMALL, group_size=-1), ()),
    "group-512-regrouped": (dict(SMALL, hidden=512, moe_intermediate=512, group_size=512, num_experts=2,
                                 num_layers=1, attention=False), ()),
    "mixtral-sharded": (dict(SMALL, family="mixtral", shard_size=60_000), ("--max-shard-size", "100KB")),
})


def test_every_synth_family_is_covered():
    assert {f"family-{f}" for f in FAMILIES} <= set(GOOD_CASES)
    assert {"qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_next", "mixtral", "deepseek_v2", "deepseek_v3",
            "glm4_moe"} <= set(FAMILIES)


@pytest.mark.parametrize("case", list(GOOD_CASES))
def test_no_false_alarm(case, tmp_path):
    spec, options = GOOD_CASES[case]
    info = make_checkpoint(tmp_path / "src", **spec)
    summary = convert(info.path, tmp_path / "out", *options)
    assert summary["converted_layers"] >= 1
    code, report = verify_json(tmp_path / "out", "--source", info.path)
    assert code == 0 and report["status"] == "ok", report["failures"]
    assert report["layers"] and all(r["ok"] for r in report["layers"])
    if case == "group-512-regrouped":
        layer = next(lyr for lyr in summary["layers"] if lyr["action"] == "convert")
        assert layer["w13_group_size"] == 256 and layer["w2_group_size"] == 256
    if case == "per-channel":
        layer = next(lyr for lyr in summary["layers"] if lyr["action"] == "convert")
        assert layer["w13_group_size"] == 128 and layer["w2_group_size"] == 64


@pytest.mark.parametrize("options", [(), ("--nibble-encoding", "s4", "--scale-dtype", "bfloat16")])
def test_no_false_alarm_autoround_fixture(options, tmp_path):
    convert(FIXTURE, tmp_path / "out", *options)
    code, report = verify_json(tmp_path / "out", "--source", FIXTURE)
    assert code == 0 and report["status"] == "ok", report["failures"]
    assert len(report["layers"]) == 2
