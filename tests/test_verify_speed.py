"""What the faster bit-exact check keeps: torch's own threads restored after it, the nibble
cross-check on bands of rows (every row with --exhaustive), and the per-expert messages of the
layer-at-once scale comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.planting import convert, patch_output_tensor

from gptq2xpu.read import open_source
from gptq2xpu.testing.synth import make_checkpoint
from gptq2xpu.verify import bits
from gptq2xpu.verify.runner import verify
from gptq2xpu.verify.standalone import open_output

K, N, E, G = 128, 192, 4, 32
L0 = "model.layers.0.mlp"


def _converted(tmp_path):
    info = make_checkpoint(tmp_path / "src", family="qwen3_moe", hidden=K, moe_intermediate=N, num_experts=E,
                           top_k=2, group_size=G, num_layers=1, attention=False, vocab=32)
    convert(info.path, tmp_path / "out")
    return info.path, tmp_path / "out"


def test_torch_threads_are_restored_after_the_byte_checks(tmp_path, monkeypatch):
    src, out = _converted(tmp_path)
    before = torch.get_num_threads()
    seen = []
    real = bits.check_layer_bits

    def spy(*a, **k):
        problems = real(*a, **k)
        seen.append(torch.get_num_threads())
        return problems

    monkeypatch.setattr(bits, "check_layer_bits", spy)
    report = verify(out, source=src, numeric=False, jobs=2)
    assert report["status"] == "pass", report["failures"]
    assert seen == [1], "the byte checks run torch on their own threads only"
    assert torch.get_num_threads() == before


def _layer(src_path, out_path):
    out, block = open_output(out_path)
    src = open_source(src_path).__enter__()
    return bits.LayerBits(src, out, L0, block.layers[L0], block), out, src


def test_cross_check_decodes_every_row_of_a_sampled_expert(tmp_path):
    src_path, out_path = _converted(tmp_path)
    lb, out, src = _layer(src_path, out_path)
    rows = N
    for row in (0, rows // 2, rows - 1):
        lb.problems = []
        w13, w2 = (a.copy() for a in lb.check_codes(1))
        w13[row, 3] ^= 0x01  # one nibble of gate output `row`, as a wrong layout reading would
        lb.cross_check_nibbles(1, w13, w2, "u4b8")
        assert lb.problems and f"gate: code [{row}, 6]" in lb.problems[0], (row, lb.problems)
    out.close()
    src.close()


def test_scale_defects_are_named_expert_by_expert(tmp_path):
    src_path, out_path = _converted(tmp_path)

    def bump(a):  # experts 3 and 1: one scale each, 0x0001 more
        a = a.copy()
        u = a.view(np.uint16)
        u[3, 5, 0] += 1
        u[1, 0, 2] += 1
        return a

    patch_output_tensor(out_path, f"{L0}.experts.w13_scales", bump)
    lb, out, src = _layer(src_path, out_path)
    lb.check_scales()
    assert [m.split(" scales")[0] for m in lb.problems] == [f"{L0}: expert 1 gate", f"{L0}: expert 3 gate"]
    out.close()
    src.close()


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_stored_scales_compare_as_bits_exactly_when_torch_would_agree(dtype):
    """The layer-at-once scale check compares a source that stores the recorded dtype bit for bit,
    without torch, when every value is finite: over all 65536 patterns, torch's cast of the float32
    value gives back the same bits exactly for the finite ones, and _finite_16 tells them apart."""
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(1, 256, 256)
    stored = raw if dtype == "BF16" else raw.view(np.float16)
    back = bits._cast_bits(bits._scales_f32_from_raw(dtype, stored), dtype)
    exponent = 0x7C00 if dtype == "F16" else 0x7F80
    finite = (raw & exponent) != exponent
    assert np.array_equal(back[finite], raw[finite])
    assert bits._finite_16(stored[finite][None], dtype) and not bits._finite_16(stored, dtype)


def test_reference_beside_the_bit_exact_checks_gives_the_same_report(tmp_path, monkeypatch):
    """On a GPU the reference MoE runs beside the bit-exact checks; the verdicts and figures are
    those of running them one after the other, and a planted defect is still caught by both."""
    from gptq2xpu.verify import runner

    src_path, out_path = _converted(tmp_path)
    sequential = verify(out_path, source=src_path, device="cpu", jobs=2)
    monkeypatch.setattr(runner, "overlaps", lambda device: True)
    beside = verify(out_path, source=src_path, device="cpu", jobs=2)
    assert sequential["status"] == beside["status"] == "pass"
    assert [c["check"] for c in sequential["checks"]] == [c["check"] for c in beside["checks"]]
    assert [r["rel"] for r in sequential["layers"]] == [r["rel"] for r in beside["layers"]]

    def double_expert_1(a):  # one expert's gate/up scales doubled (fp16 bits: exponent + 1)
        a = a.copy()
        a[1] = (a[1].astype(np.float32) * 2).astype(a.dtype)
        return a

    patch_output_tensor(out_path, f"{L0}.experts.w13_scales", double_expert_1)
    planted = verify(out_path, source=src_path, device="cpu", jobs=2)
    failed = {c["check"] for c in planted["checks"] if not c["ok"]}
    assert planted["status"] == "fail" and {"bit-exact experts", "reference MoE"} <= failed, failed
