"""Inputs that used to convert with exit 0 into a wrong output: scales a ``--scale-dtype`` cast
loses, a router shaped unlike the experts, a config whose dimensions disagree with the tensors.
Each is refused at plan or audit time (exit 3, naming the tensor or config key), and ``verify``
catches the output a converter without those refusals would write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _hostile import L0, L1, edit_config, fixture_copy, mutate, one_error_line
from helpers import cli, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq2xpu.errors import EXIT_INPUT, EXIT_OK, EXIT_VERIFY, InputError

ROLES = ("gate_proj", "up_proj", "down_proj")


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


def scales_source(dst, dtype: str, *, expert: int = 3, factor: float = 1e-6, prefix: str = L0):
    """The fixture with every expert scale of ``prefix`` stored as ``dtype`` (F32 or BF16), expert
    ``expert``'s multiplied by ``factor`` (the fixture's scales are about 1e-3: 1e-6 makes them 1e-9)."""
    src = fixture_copy(dst)

    def edit(t):
        for e in range(8):
            for role in ROLES:
                key = f"{prefix}.experts.{e}.{role}.scales"
                f32 = t[key][1].astype(np.float32) * np.float32(factor if e == expert else 1.0)
                t[key] = ("F32", f32) if dtype == "F32" else ("BF16", _bf16_bits(f32))

    mutate(src, edit)
    return src


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_scales_that_underflow_float16_are_refused(tmp_path, dtype):
    src = scales_source(tmp_path / "src", dtype)
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, "--scale-dtype", "float16")
    assert proc.returncode == EXIT_INPUT, proc.stderr
    line = one_error_line(proc.stderr, ignore_warnings=True)
    assert f"{L0}.experts.3." in line and "F16" in line and "smallest normal" in line, line
    assert not out.exists()
    # bfloat16 holds them (same exponent range as float32): converts, and verify passes
    assert run_cli("convert", src, out, "--scale-dtype", "bfloat16").returncode == EXIT_OK
    assert run_cli("verify", out, "--source", src, "--no-numeric").returncode == EXIT_OK


def test_a_subnormal_float16_scale_the_cast_keeps_exactly_converts(tmp_path):
    """The rule is one rounding, not "normal numbers only": 2**-20 is a float16 subnormal held exactly."""
    src = fixture_copy(tmp_path / "src")

    def edit(t):
        for e in range(8):
            for role in ROLES:
                key = f"{L0}.experts.{e}.{role}.scales"
                f32 = t[key][1].astype(np.float32)
                if e == 2:
                    f32[:] = np.float32(2.0**-20)
                t[key] = ("F32", f32)

    mutate(src, edit)
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, "--scale-dtype", "float16")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert run_cli("verify", out, "--source", src, "--no-numeric").returncode == EXIT_OK


def test_verify_catches_a_converter_that_loses_one_experts_scales(tmp_path, monkeypatch):
    """Plant: a converter without the audit's refusal writes expert 3's 1e-9 scales as float16 0 --
    exactly what torch's cast gives, so only the comparison with the source's own scales finds it."""
    import gptq2xpu.audit

    src = scales_source(tmp_path / "src", "F32")
    out = tmp_path / "out"
    monkeypatch.setattr(gptq2xpu.audit, "_check_cast", lambda *a, **k: None, raising=False)
    code, _, err = cli("convert", src, out, "--scale-dtype", "float16")
    assert code == EXIT_OK, err
    monkeypatch.undo()
    name = "model.safetensors"
    from helpers import read_tensor

    s13 = read_tensor(out / name, f"{L0}.experts.w13_scales")
    assert (s13[3] == 0).all() and (s13[2] != 0).any()  # the planted defect is there
    proc = run_cli("verify", out, "--source", src, "--no-numeric", "--json")
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    report = json.loads(proc.stdout)
    bad = [c for c in report["checks"] if not c["ok"]]
    assert [c["check"] for c in bad] == ["bit-exact experts"], bad
    assert "expert 3" in bad[0]["detail"] and "own" in bad[0]["detail"], bad[0]["detail"]


ROUNDOFF = {"F16": 2.0**-11, "BF16": 2.0**-8}
_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16}


def _oracle_loses(values: np.ndarray, dtype: str) -> bool:
    """Independent of the converter's numpy cast: torch's cast, then the one-rounding bound."""
    x = torch.from_numpy(values.astype(np.float32))
    back = x.to(_TORCH[dtype]).double()
    x = x.double()
    ok = (back == x) | ((back - x).abs() <= ROUNDOFF[dtype] * x.abs())
    return not bool(ok.all())


_scale = st.floats(width=32, allow_nan=False, allow_infinity=False)
_tiny = st.floats(min_value=2.0**-30, max_value=2.0**-12, width=32).map(lambda v: np.float32(v))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(dtype=st.sampled_from(["F16", "BF16"]),
       values=st.lists(st.one_of(_scale, _tiny, _tiny.map(lambda v: -v)), min_size=1, max_size=6))
def test_the_audit_refuses_exactly_the_casts_that_lose_more_than_one_rounding(dtype, values):
    from gptq2xpu.audit import _check_cast

    arr = np.array(values, dtype=np.float32).reshape(1, -1)
    try:
        _check_cast(arr, "t.scales", dtype)
        refused = False
    except InputError as exc:
        refused = True
        assert str(exc).startswith("t.scales: scale ")
    assert refused == _oracle_loses(arr, dtype), (arr, dtype)
