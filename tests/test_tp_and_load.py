"""Tensor-parallel-ready output (``convert --tp-size/--emit-ranks``) and the runtime loader
``gptq2xpu.load``.

The source is shaped like Qwen3-30B-A3B's problem case, scaled down: N = 192 with group 64.
T = 2 gives 96 per rank, which holds whole groups only of 32: w2's scales are regrouped to 32.
T = 4 gives 48 per rank, which no supported group size divides: N is zero-padded to 256 (64 per
rank, groups of 64).  T = 1 converts as-is.

The loader is checked against slices of the full tensors read straight from the shards, and each
rank's slice is built into the released vllm-xpu-kernels 0.1.16.2 ``XpuFusedMoe`` (its Python
interface on CPU, native ops faked: ``tests/support/released_kernel.py``); the ranks' outputs must sum to
the full layer.  The hand-over itself is tested in ``tests/test_released_kernel.py``.  No Intel GPU
exists here.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from support.helpers import cli, read_tensor
from support.planting import (
    convert,
    copy_output,
    failed_checks,
    output_tensor,
    patch_tensor,
    reference_moe,
    reseal,
    router_weight,
    verify_json,
)

from gptq2xpu.errors import EXIT_VERIFY, InputError, UsageError
from gptq2xpu.load import make_xpu_fused_moe, open_converted
from gptq2xpu.testing.synth import make_checkpoint
from gptq2xpu.verify.reference import moe_forward, route
from gptq2xpu.verify.unpack import xpu_dequant
from gptq2xpu.xpu_handover import SKIP_CONVERSION_ATTR

K, N, E, G = 128, 192, 4, 64
PREFIXES = ("model.layers.0.mlp", "model.layers.1.mlp")
SPEC = dict(family="qwen3_moe", hidden=K, moe_intermediate=N, num_experts=E, top_k=2, group_size=G,
            num_layers=2, attention=False, vocab=32)
WHAT = ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    info = make_checkpoint(root / "src", **SPEC)
    outs = {
        "t1": root / "t1",
        "t2": root / "t2",      # regrouped, rank folders
        "t4": root / "t4",      # padded, rank folders, s4
        "t4n": root / "t4n",    # padded, no rank folders
    }
    summaries = {
        "t1": convert(info.path, outs["t1"]),
        "t2": convert(info.path, outs["t2"], "--tp-size", "2", "--emit-ranks"),
        "t4": convert(info.path, outs["t4"], "--tp-size", "4", "--emit-ranks", "--nibble-encoding", "s4"),
        "t4n": convert(info.path, outs["t4n"], "--tp-size", "4"),
    }
    return types.SimpleNamespace(info=info, out=outs, summary=summaries, root=root)


def full(out: Path, prefix: str, what: str) -> np.ndarray:
    """A converted tensor read straight from its shard (not through the loader)."""
    return output_tensor(out, f"{prefix}.experts.{what}")


def block(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["gptq2xpu"]


def rank_slice(arr: np.ndarray, what: str, r: int, t: int, p: int, g2: int) -> np.ndarray:
    pt = p // t
    if what.startswith("w13"):
        return np.concatenate([arr[:, r * pt:(r + 1) * pt], arr[:, p + r * pt:p + (r + 1) * pt]], axis=1)
    if what == "w2_qweight":
        return arr[:, :, r * pt // 2:(r + 1) * pt // 2]
    return arr[:, :, r * pt // g2:(r + 1) * pt // g2]


def as_np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.int8:
        return t.numpy().view(np.uint8)
    return t.numpy()


# ----------------------------------------------------------------------------- inspect and plan


def _inspect(src, *opts) -> dict:
    code, stdout, stderr = cli("inspect", src, "--json", *opts)
    assert code == 0, stderr
    return json.loads(stdout)


def test_inspect_reports_how_each_tp_size_works(tp):
    report = {row["tp_size"]: row for row in _inspect(tp.info.path)["tp"]}
    assert report[1]["how"] == "as-is" and report[1]["extra_bytes"] == 0
    assert report[2]["how"] == "regroup" and report[2]["extra_bytes"] > 0
    assert report[4]["how"] == "pad" and report[4]["extra_bytes"] > report[2]["extra_bytes"]
    assert report[8]["how"] == "pad"


def _tensor_bytes(out: Path) -> int:
    return json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]


def test_inspect_regroup_cost_is_the_real_cost(tp):
    report = {row["tp_size"]: row for row in _inspect(tp.info.path)["tp"]}
    assert report[2]["extra_bytes"] == _tensor_bytes(tp.out["t2"]) - _tensor_bytes(tp.out["t1"])


def test_inspect_pad_cost_is_the_real_cost(tp):
    report = {row["tp_size"]: row for row in _inspect(tp.info.path)["tp"]}
    assert report[4]["extra_bytes"] == _tensor_bytes(tp.out["t4"]) - _tensor_bytes(tp.out["t1"])


def test_config_block_records_regrouping_and_padding(tp):
    b1, b2, b4 = block(tp.out["t1"]), block(tp.out["t2"]), block(tp.out["t4"])
    for prefix in PREFIXES:
        l1, l2, l4 = b1["layers"][prefix], b2["layers"][prefix], b4["layers"][prefix]
        assert (l1["padded_intermediate_size"], l1["w2_group_size"]) == (N, 64)
        assert (l2["padded_intermediate_size"], l2["w2_group_size"]) == (N, 32)
        assert (l4["padded_intermediate_size"], l4["w2_group_size"]) == (256, 64)
        assert l4["intermediate_size"] == N and l4["source_group_size"]["down"] == G
        assert l2["w13_group_size"] == l4["w13_group_size"] == 64  # w13's groups run along K
    assert (b2["tp_size"], b4["tp_size"], b1["tp_size"]) == (2, 4, 1)
    assert b4["tp_ranks"] == [f"tp-ranks/rank-{r:03d}-of-004" for r in range(4)]
    assert b1["tp_ranks"] == [] and block(tp.out["t4n"])["tp_ranks"] == []


def test_config_block_says_where_the_padded_up_rows_are(tp):
    """The block's words for w13 name the rows the bytes hold: up rows start at P, not at N."""
    b4 = block(tp.out["t4"])
    assert "[E, 2P, K/2]; rows 0..N-1 gate (w1), rows P..P+N-1 up (w3)" in b4["layout"]["w13_qweight"]
    assert "N..2N-1" not in json.dumps(b4["layout"])
    p = b4["layers"][PREFIXES[0]]["padded_intermediate_size"]
    padded = full(tp.out["t4"], PREFIXES[0], "w13_qweight") ^ 0x88   # stored as s4
    plain = full(tp.out["t1"], PREFIXES[0], "w13_qweight")            # P = N: up rows at N
    assert p > N and np.array_equal(padded[:, :N], plain[:, :N]) and np.array_equal(padded[:, p:p + N], plain[:, N:])
    assert (padded[:, N:p] == 0x88).all() and (padded[:, p + N:] == 0x88).all()
    notes = [n for lyr in tp.summary["t4"]["layers"] for n in lyr.get("notes", [])]
    assert any("padded 192 -> 256" in n for n in notes)
    assert any("re-expressed as groups of 32" in n for lyr in tp.summary["t2"]["layers"] for n in lyr.get("notes", []))


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("which", ["t1", "t2", "t4", "t4n"])
def test_verify_source_passes(tp, which):
    code, report = verify_json(tp.out[which], "--source", tp.info.path)
    assert code == 0 and report["status"] == "ok", report["failures"]
    if which != "t1":
        assert all(r["tp_sum_rel"] <= 1e-5 for r in report["layers"]), report["layers"]
    names = {c["check"] for c in report["checks"]}
    assert ("tensor-parallel ranks" in names) == (which in ("t2", "t4"))


def test_regrouped_scales_expand_exactly(tp):
    """w2 scales at group 32 are the source's group-64 scales, each repeated twice, bit for bit."""
    for layer in tp.info.moe_layers:
        src = layer.scales["down"].astype(np.float16)                   # [E, K, N/64], exact copies
        got = full(tp.out["t2"], layer.prefix, "w2_scales")              # [E, K, N/32]
        assert np.array_equal(got.view(np.uint16), np.repeat(src, 2, axis=2).view(np.uint16))
        padded = full(tp.out["t4"], layer.prefix, "w2_scales")           # [E, K, 256/64]
        assert np.array_equal(padded[:, :, :3].view(np.uint16), src.view(np.uint16))
        assert (padded[:, :, 3:] == 0).all()


def test_padding_adds_exactly_nothing(tp):
    """The reference MoE on the padded converted weights equals the source MoE (float32)."""
    out = tp.out["t4"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, K, generator=gen)
    for layer in tp.info.moe_layers:
        prefix = layer.prefix
        w13 = torch.from_numpy(full(out, prefix, "w13_qweight"))
        s13 = torch.from_numpy(full(out, prefix, "w13_scales"))
        w2 = torch.from_numpy(full(out, prefix, "w2_qweight"))
        s2 = torch.from_numpy(full(out, prefix, "w2_scales"))
        c13, c2 = xpu_dequant(w13, s13, "s4"), xpu_dequant(w2, s2, "s4")   # [E, 512, K], [E, K, 256]
        # padding is code 8 (weight 0 whatever the scale: s4 byte 0x00) with scale 0
        assert (w13[:, N:256] == 0).all() and (w13[:, 256 + N:] == 0).all() and (w2[:, :, N // 2:] == 0).all()
        assert (s13[:, N:256] == 0).all() and (s13[:, 256 + N:] == 0).all() and (s2[:, :, N // 64:] == 0).all()
        # the padding dequantizes to exact zeros
        assert (c13[:, N:256] == 0).all() and (c13[:, 256 + N:] == 0).all() and (c2[:, :, N:] == 0).all()
        g13 = torch.from_numpy(np.concatenate([layer.dequant("gate"), layer.dequant("up")], axis=1))
        g2 = torch.from_numpy(layer.dequant("down"))
        assert torch.equal(torch.cat([c13[:, :N], c13[:, 256:256 + N]], 1), g13) and torch.equal(c2[:, :, :N], g2)
        tw, ti = route(x, router_weight(out, prefix), 2)
        want = moe_forward(x, g13, g2, tw, ti)
        got = moe_forward(x, c13, c2, tw, ti)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        # every expert, once each
        ones, ids = torch.ones(E, 1), torch.arange(E).unsqueeze(1)
        xe = torch.randn(E, K, generator=gen)
        torch.testing.assert_close(moe_forward(xe, c13, c2, ones, ids), moe_forward(xe, g13, g2, ones, ids),
                                   rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- rank folders


@pytest.mark.parametrize("which,t", [("t2", 2), ("t4", 4)])
def test_emit_ranks_writes_byte_exact_slices(tp, which, t):
    out = tp.out[which]
    b = block(out)
    manifest = json.loads((out / "gptq2xpu-manifest.json").read_text())["files"]
    for r in range(t):
        folder = out / "tp-ranks" / f"rank-{r:03d}-of-{t:03d}"
        assert (folder / "model.safetensors").is_file() and (folder / "rank.json").is_file()
        rel = f"tp-ranks/rank-{r:03d}-of-{t:03d}/model.safetensors"
        assert rel in manifest
        doc = json.loads((folder / "rank.json").read_text())
        assert (doc["tp_rank"], doc["tp_size"]) == (r, t)
        for prefix in PREFIXES:
            info = b["layers"][prefix]
            p, g2 = info["padded_intermediate_size"], info["w2_group_size"]
            assert doc["layers"][prefix]["intermediate_slice"] == [r * p // t, (r + 1) * p // t]
            for what in WHAT:
                name = f"{prefix}.experts.{what}"
                part = read_tensor(folder / "model.safetensors", name)
                want = rank_slice(full(out, prefix, what), what, r, t, p, g2)
                assert part.dtype == want.dtype and np.array_equal(part, want), (r, name)


@pytest.mark.parametrize("what", ["w13_qweight", "w2_scales"])
def test_planted_rank_defect_fails_verify(tp, tmp_path, what):
    out = copy_output(tp.out["t2"], tmp_path / "out")
    rel = "tp-ranks/rank-001-of-002/model.safetensors"
    name = f"{PREFIXES[1]}.experts.{what}"

    def fn(a):
        a[2, 0] = a[2, 0] ^ np.array(0x11, dtype=a.dtype) if a.dtype == np.uint8 else a[2, 0] * np.float16(2)
        return a

    before, after = patch_tensor(out / rel, name, fn)
    assert not np.array_equal(before, after)
    reseal(out, rel)
    code, report = verify_json(out)                   # standalone: the rank check
    assert code == EXIT_VERIFY
    assert failed_checks(report) == {"tensor-parallel ranks"}, report["failures"]
    assert "rank-001-of-002" in report["failures"][0] and name in report["failures"][0]


def test_missing_rank_folder_fails_verify(tp, tmp_path):
    import shutil

    out = copy_output(tp.out["t4"], tmp_path / "out")
    shutil.rmtree(out / "tp-ranks" / "rank-003-of-004")
    code, report = verify_json(out)
    assert code == EXIT_VERIFY
    assert {"manifest", "tensor-parallel ranks"} <= failed_checks(report)


# ----------------------------------------------------------------------------- the loader


CASES = [("t1", 1), ("t1", 3), ("t2", 1), ("t2", 2), ("t2", 3), ("t2", 6), ("t4", 4), ("t4", 2), ("t4n", 4), ("t4n", 1)]


@pytest.mark.parametrize("which,t", CASES)
def test_loader_slices_equal_full_tensors(tp, which, t):
    out = tp.out[which]
    enc = block(out)["nibble_encoding"]
    with open_converted(out) as ck:
        assert ck.layers == list(PREFIXES)
        for prefix in PREFIXES:
            info = block(out)["layers"][prefix]
            p, g2 = info["padded_intermediate_size"], info["w2_group_size"]
            for r in range(t):
                lw = ck.layer(prefix, tp_rank=r, tp_size=t, dtype=torch.float16, signed=False)
                assert (lw.tp_rank, lw.tp_size, lw.intermediate_size, lw.encoding) == (r, t, p // t, "u4b8")
                assert lw.w13.dtype == lw.w2.dtype == torch.uint8 and not hasattr(lw.w13, SKIP_CONVERSION_ATTR)
                assert lw.w13_scales.dtype == lw.w2_scales.dtype == torch.float16
                for what, got in zip(WHAT, (lw.w13, lw.w13_scales, lw.w2, lw.w2_scales)):
                    want = rank_slice(full(out, prefix, what), what, r, t, p, g2)
                    if what.endswith("qweight") and enc == "s4":
                        want = want ^ np.uint8(0x88)
                    assert got.is_contiguous() and np.array_equal(as_np(got), want), (prefix, r, what)


def test_loader_signed_hands_over_s4_marked(tp):
    out = tp.out["t2"]
    with open_converted(out) as ck:
        for r in range(2):
            lw = ck.layer(PREFIXES[0], tp_rank=r, tp_size=2, dtype=torch.bfloat16, signed=True)
            u13 = rank_slice(full(out, PREFIXES[0], "w13_qweight"), "w13_qweight", r, 2, N, 32)
            u2 = rank_slice(full(out, PREFIXES[0], "w2_qweight"), "w2_qweight", r, 2, N, 32)
            assert lw.encoding == "s4" and lw.w13.dtype == lw.w2.dtype == torch.uint8
            assert getattr(lw.w13, SKIP_CONVERSION_ATTR) is True
            assert np.array_equal(as_np(lw.w13), u13 ^ np.uint8(0x88))
            assert np.array_equal(as_np(lw.w2), u2 ^ np.uint8(0x88))
            s = full(out, PREFIXES[0], "w13_scales")
            want = torch.from_numpy(rank_slice(s, "w13_scales", r, 2, N, 32)).to(torch.bfloat16)
            assert lw.w13_scales.dtype == lw.w2_scales.dtype == torch.bfloat16 and torch.equal(lw.w13_scales, want)
    # an s4 checkpoint: signed by default, u4b8 on request
    out = tp.out["t4"]
    with open_converted(out) as ck:
        lw = ck.layer(PREFIXES[1], tp_rank=3, tp_size=4, dtype=torch.float32)
        s4 = rank_slice(full(out, PREFIXES[1], "w13_qweight"), "w13_qweight", 3, 4, 256, 64)
        assert lw.encoding == "s4" and hasattr(lw.w13, SKIP_CONVERSION_ATTR) and np.array_equal(as_np(lw.w13), s4)
        assert lw.w2_scales.dtype == torch.float32
        lw = ck.layer(PREFIXES[1], tp_rank=3, tp_size=4, signed=False)
        assert lw.encoding == "u4b8" and not hasattr(lw.w13, SKIP_CONVERSION_ATTR)
        assert np.array_equal(lw.w13.numpy(), s4 ^ np.uint8(0x88))


def _count_reads(ckpt_obj):
    """Wrap a Checkpoint's read_into, recording (tensor name, bytes)."""
    calls = []
    orig = ckpt_obj.read_into

    def spy(ref, out, offset=0):
        calls.append((ref.name, out.nbytes))
        return orig(ref, out, offset=offset)

    ckpt_obj.read_into = spy
    return calls


def test_loader_reads_rank_folder_and_only_needed_bytes(tp, tmp_path):
    # with rank folders: nothing is read from the full shards
    with open_converted(tp.out["t2"]) as ck:
        calls = _count_reads(ck._ckpt)
        ck.layer(PREFIXES[0], tp_rank=1, tp_size=2)
        assert calls == []
        assert 1 in ck._ranks and 0 not in ck._ranks
    # the rank folder is what is read: a byte planted there comes back
    out = copy_output(tp.out["t2"], tmp_path / "out")
    name = f"{PREFIXES[0]}.experts.w13_qweight"

    def fn(a):
        a[0, 0, 0] ^= 0xFF
        return a

    patch_tensor(out / "tp-ranks/rank-001-of-002/model.safetensors", name, fn)
    with open_converted(out) as ck:
        lw = ck.layer(PREFIXES[0], tp_rank=1, tp_size=2, signed=False)
        want = rank_slice(full(out, PREFIXES[0], "w13_qweight"), "w13_qweight", 1, 2, N, 32)
        assert int(lw.w13[0, 0, 0]) == int(want[0, 0, 0]) ^ 0xFF
    # without rank folders: w13 and its scales read only this rank's rows
    with open_converted(tp.out["t4n"]) as ck:
        calls = _count_reads(ck._ckpt)
        ck.layer(PREFIXES[0], tp_rank=2, tp_size=4)
        w13_bytes = sum(n for name, n in calls if name.endswith("w13_qweight"))
        s13_bytes = sum(n for name, n in calls if name.endswith("w13_scales"))
        assert w13_bytes == E * 2 * 64 * (K // 2)
        assert s13_bytes == E * 2 * 64 * (K // 64) * 2


@pytest.mark.parametrize("which,t,match", [
    ("t1", 2, "whole groups of 64"),      # 96 per rank is 1.5 groups of 64
    ("t1", 4, "whole groups of 64"),
    ("t1", 5, "cannot be split over 5"),  # 192 / 5
    ("t2", 4, "whole groups of 32"),      # 48 per rank
    ("t4", 3, "cannot be split over 3"),
])
def test_loader_refuses_split_without_whole_groups(tp, which, t, match):
    with open_converted(tp.out[which]) as ck:
        with pytest.raises(UsageError, match=match) as exc:
            ck.layer(PREFIXES[0], tp_rank=0, tp_size=t)
        assert f"--tp-size {t}" in str(exc.value)


def test_loader_usage_errors(tp):
    with open_converted(tp.out["t2"]) as ck:
        with pytest.raises(UsageError, match="tp_rank 2 is not in 0..1"):
            ck.layer(PREFIXES[0], tp_rank=2, tp_size=2)
        with pytest.raises(UsageError, match="not a converted MoE layer"):
            ck.layer("model.layers.7.mlp")


def test_loader_refuses_headers_the_block_does_not_describe(tp, tmp_path):
    out = copy_output(tp.out["t1"], tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    cfg["gptq2xpu"]["layers"][PREFIXES[1]]["experts"] = E - 1      # the block now lies about the shapes
    (out / "config.json").write_text(json.dumps(cfg))
    with open_converted(out) as ck:
        ck.layer(PREFIXES[0])                                          # the other layer still loads
        with pytest.raises(InputError) as exc:
            ck.layer(PREFIXES[1])
    assert str(exc.value) == (f"{PREFIXES[1]}.experts.w13_qweight: U8 [{E}, {2 * N}, {K // 2}] in the checkpoint, "
                              f"but the config block says U8 [{E - 1}, {2 * N}, {K // 2}]")
    cfg["gptq2xpu"]["nibble_encoding"] = "s8"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="nibble_encoding 's8' is not one of u4b8, s4"):
        open_converted(out)


def test_loader_refuses_rank_folders_that_hold_another_rank(tp, tmp_path):
    """Swapped rank folders have the same shapes: only each folder's rank.json tells them apart."""
    out = copy_output(tp.out["t2"], tmp_path / "out")
    ranks = out / "tp-ranks"
    (ranks / "rank-000-of-002").rename(ranks / "swap")
    (ranks / "rank-001-of-002").rename(ranks / "rank-000-of-002")
    (ranks / "swap").rename(ranks / "rank-001-of-002")
    with open_converted(out) as ck:
        for r in (0, 1):
            with pytest.raises(InputError) as exc:
                ck.layer(PREFIXES[0], tp_rank=r, tp_size=2)
            folder = ranks / f"rank-00{r}-of-002"
            assert str(exc.value) == (f"{folder}: its rank.json names rank {1 - r} of 2, but the config block puts "
                                      f"rank {r} of 2 in this folder")


def test_loader_refuses_a_shard_copied_from_another_ranks_folder(tp, tmp_path):
    """rank.json intact, the weights file another rank's: each shard's own metadata tells."""
    out = copy_output(tp.out["t2"], tmp_path / "out")
    ranks = out / "tp-ranks"
    shards = sorted(p.name for p in (ranks / "rank-001-of-002").glob("*.safetensors"))
    for name in shards:
        shutil.copyfile(ranks / "rank-001-of-002" / name, ranks / "rank-000-of-002" / name)
    wrong = "its metadata names rank 1 of 2, but it lies in the folder of rank 0"
    with open_converted(out) as ck, pytest.raises(InputError, match=wrong):
        ck.layer(PREFIXES[0], tp_rank=0, tp_size=2)


def test_a_malformed_rank_record_is_named_with_its_folder(tp, tmp_path):
    out = copy_output(tp.out["t2"], tmp_path / "out")
    folder = out / "tp-ranks" / "rank-000-of-002"
    (folder / "rank.json").write_text("{not json")
    with open_converted(out) as ck, pytest.raises(InputError) as exc:
        ck.layer(PREFIXES[0], tp_rank=0, tp_size=2)
    assert str(exc.value).startswith(f"{folder}: ") and "rank.json" in str(exc.value)


# ----------------------------------------------------------------------------- through the released kernel


@pytest.mark.parametrize("which,t,signed", [("t2", 2, True), ("t4", 4, None), ("t4n", 4, False), ("t1", 3, True)])
def test_ranks_through_released_kernel_sum_to_full_layer(tp, released_kernel, which, t, signed):
    """One XpuFusedMoe per rank, each built from that rank's loader slice: the partial outputs sum
    to the full layer's output (what a tensor-parallel runtime all-reduces)."""
    out = tp.out[which]
    x = (torch.randn(12, K, generator=torch.Generator().manual_seed(3)) / 4).to(torch.float16)
    p = block(out)["layers"][PREFIXES[0]]["padded_intermediate_size"]
    with open_converted(out) as ck:
        router = ck.tensor(f"{PREFIXES[0]}.gate.weight").float()
        tw, ti = route(x, router, 2)
        total = torch.zeros(x.shape, dtype=torch.float32)
        converted = 0
        for r in range(t):
            w = ck.layer(PREFIXES[0], tp_rank=r, tp_size=t, dtype=torch.float16, signed=signed)
            moe = make_xpu_fused_moe(w, 2)
            assert moe.is_int4 and moe.inter_size == p // t and moe.w13.dtype == torch.int8
            assert (moe.w13.data_ptr() == w.w13.data_ptr()) == (w.encoding == "s4")
            converted += 0 if w.encoding == "s4" else 2 * E   # u4b8: implement_zp per expert, w13 and w2
            part = torch.empty_like(x)
            moe.apply(output=part, hidden_states=x, topk_weights=tw, topk_ids=ti)
            total += part.float()
    assert released_kernel.zp_calls == converted
    full_out = reference_moe(out, PREFIXES[0], x, 2)
    torch.testing.assert_close(total, full_out, rtol=2e-3, atol=2e-4)
