"""Inputs that used to convert with exit 0 into a wrong output: scales a ``--scale-dtype`` cast
loses, a router shaped unlike the experts, a config whose dimensions disagree with the tensors.
Each is refused at plan or audit time (exit 3, naming the tensor or config key), and ``verify``
catches the output a converter without those refusals would write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import cli, run_cli
from support.hostile import L0, L1, edit_config, fixture_copy, mutate, one_error_line

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
    from support.helpers import read_tensor

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


# ------------------------------------------------------------------------------ routers


def _synth(dst, family: str, **spec):
    from gptq2xpu.testing.synth import make_checkpoint

    make_checkpoint(dst, family=family, **spec)
    return dst


def _shard_holding(folder, name: str):
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def _reshape_tensor(folder, name: str, shape) -> str:
    """Replace tensor ``name`` by zeros of ``shape`` (same dtype) in the shard holding it; the shard's name."""
    shard = _shard_holding(folder, name)

    def edit(t):
        dtype, arr = t[name]
        t[name] = (dtype, np.zeros(shape, dtype=arr.dtype))

    mutate(folder, edit, shard=shard.name)
    return shard.name


# (family, spec, router tensor under the first MoE prefix, shape from (E, K))
ROUTERS = [
    ("qwen3_moe", {}, "mlp.gate.weight", lambda e, k: (2 * e, k)),            # 16 rows for 8 experts
    ("qwen3_moe", {}, "mlp.gate.weight", lambda e, k: (e, k // 2)),           # 128 columns where K is 256
    ("mixtral", {}, "block_sparse_moe.gate.weight", lambda e, k: (2 * e, k)),
    ("mixtral", {}, "block_sparse_moe.gate.weight", lambda e, k: (e, k // 2)),
    ("deepseek_v3", {}, "mlp.gate.weight", lambda e, k: (e, k // 2)),
    ("deepseek_v3", {}, "mlp.gate.e_score_correction_bias", lambda e, k: (2 * e,)),
    ("qwen3_moe", {"quantized_router": True}, "mlp.gate.qweight", lambda e, k: (k // 8, 2 * e)),
]


@pytest.mark.parametrize("family,spec,field,shape", ROUTERS, ids=[f"{f}-{t}-{i}" for i, (f, _, t, _) in
                                                                 enumerate(ROUTERS)])
def test_a_router_shaped_unlike_the_experts_is_refused_at_plan_time(tmp_path, family, spec, field, shape):
    src = _synth(tmp_path / "src", family, **spec)
    prefix = "model.layers.0" if family != "deepseek_v3" else "model.layers.0"
    name = f"{prefix}.{field}"
    from gptq2xpu.testing.synth import SynthSpec

    dflt = SynthSpec()
    _reshape_tensor(src, name, shape(dflt.num_experts, dflt.hidden))
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_INPUT, proc.stderr
    line = one_error_line(proc.stderr, ignore_warnings=True)
    assert f"router tensor {name} has shape" in line, line
    assert not out.exists()


def test_verify_names_a_router_that_cannot_route_instead_of_rel_nan(tmp_path):
    """A converted output whose router was replaced by one with 16 rows for 8 experts."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("convert", src, out).returncode == EXIT_OK
    from support.planting import reseal

    shard = _reshape_tensor(out, f"{L1}.gate.weight", (16, 256))
    reseal(out, shard)
    proc = run_cli("verify", out, "--source", src, "--json", "--device", "cpu")
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    detail = checks["reference MoE"]["detail"]
    assert not checks["reference MoE"]["ok"]
    assert f"{L1}: router has shape [16, 256]" in detail and "nan" not in detail.lower(), detail


def test_a_nan_in_the_reference_moe_reads_as_non_finite_not_rel_nan(tmp_path):
    """Plant: one row of a converted router made NaN (and resealed); the tokens it routes come out
    NaN on both sides, the relative error is NaN, and that must fail in words."""
    from support.planting import patch_output_tensor

    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("convert", src, out).returncode == EXIT_OK

    def nan_row(a):
        a[0] = 0x7FC0  # BF16 NaN
        return a

    patch_output_tensor(out, f"{L0}.gate.weight", nan_row)
    proc = run_cli("verify", out, "--source", src, "--json", "--device", "cpu")
    assert proc.returncode == EXIT_VERIFY, proc.stderr
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    ref = checks["reference MoE"]
    assert not ref["ok"] and "non-finite" in ref["detail"] and "rel nan" not in ref["detail"], ref


# ------------------------------------------------------------------------------ config dimensions


# (family, config key, value from (E, K, N), the tensors' dimension named in the message)
CONFIGS = [
    ("mixtral", "intermediate_size", lambda e, k, n: 2 * n, "N"),
    ("qwen3_moe", "moe_intermediate_size", lambda e, k, n: 2 * n, "N"),
    ("deepseek_v3", "moe_intermediate_size", lambda e, k, n: n // 2, "N"),
    ("qwen3_moe", "hidden_size", lambda e, k, n: 2 * k, "K"),
    ("qwen3_moe", "num_experts", lambda e, k, n: 2 * e, "E"),
    ("mixtral", "num_local_experts", lambda e, k, n: e - 1, "E"),
    ("deepseek_v3", "n_routed_experts", lambda e, k, n: 2 * e, "E"),
    ("qwen3_5_moe", "moe_intermediate_size", lambda e, k, n: 2 * n, "N"),   # nested text_config
    ("qwen3_moe", "moe_intermediate_size", lambda e, k, n: str(n), "N"),
]


@pytest.mark.parametrize("family,key,value,dim", CONFIGS, ids=[f"{f}-{k}" for f, k, _, _ in CONFIGS])
def test_a_config_that_would_build_other_shapes_is_refused(tmp_path, family, key, value, dim):
    from gptq2xpu.testing.synth import SynthSpec

    d = SynthSpec()
    e, k, n = d.num_experts, d.hidden, d.moe_intermediate
    src = _synth(tmp_path / "src", family)
    bad = value(e, k, n)

    def edit(cfg):
        (cfg.get("text_config") or cfg)[key] = bad

    edit_config(src, edit)
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_INPUT, proc.stderr
    line = one_error_line(proc.stderr, ignore_warnings=True)
    held = {"E": e, "K": k, "N": n}[dim]
    assert f"config.json: {key} is " in line and str(bad) in line and f"{dim} = {held}" in line, line
    assert not out.exists()


def test_mixtrals_intermediate_size_is_the_experts_and_qwens_is_not(tmp_path):
    """Qwen's intermediate_size is the dense MLP's: any value converts; Mixtral's is the experts'."""
    src = _synth(tmp_path / "src", "qwen3_moe")
    edit_config(src, lambda c: c.__setitem__("intermediate_size", 12345))
    assert run_cli("convert", src, tmp_path / "out").returncode == EXIT_OK


# ------------------------------------------------------------------------------ fuzz: routers and config


def _plan_refusals(src) -> list[str]:
    from gptq2xpu.plan import build_plan
    from gptq2xpu.read import open_source

    with open_source(str(src)) as ckpt:
        return [f"{lyr.prefix}: {lyr.reason}" for lyr in build_plan(ckpt).layers if lyr.action == "refuse"]


_DIMS = st.sampled_from([1, 4, 7, 8, 16, 128, 255, 256, 512])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(["weight", "bias", "e_score_correction_bias"]),
       shape=st.lists(_DIMS, min_size=1, max_size=3).map(tuple))
def test_any_router_shape_plans_iff_it_is_the_experts(tmp_path_factory, field, shape):
    src = fixture_copy(tmp_path_factory.mktemp("router"))
    name = f"{L0}.gate.{field}"
    mutate(src, lambda t: t.__setitem__(name, ("BF16", np.zeros(shape, dtype=np.uint16))))
    fits = shape == ((8, 256) if field == "weight" else (8,))
    refusals = _plan_refusals(src)
    assert bool(refusals) != fits, (shape, refusals)
    if refusals:
        assert refusals == [f"{L0}: router tensor {name} has shape {list(shape)} but the layer's 8 experts of "
                            f"hidden size 256 need [{', '.join(map(str, (8, 256) if field == 'weight' else (8,)))}]"]


_TRUTH = {"num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "hidden_size": 256,
          "moe_intermediate_size": 256, "intermediate_size": 512}
_ODD = st.sampled_from([None, True, 256.0, "256", -1, 0, 7, 9, 128, 255, 256, 257, 512, 2**70])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.dictionaries(st.sampled_from(sorted(_TRUTH)), _ODD, max_size=4))
def test_any_config_dimensions_plan_iff_they_are_the_tensors(tmp_path_factory, edits):
    """Qwen3-MoE fixture (E 8, K 256, N 256): ``intermediate_size`` is the dense MLP's and free."""
    src = fixture_copy(tmp_path_factory.mktemp("dims"))

    def edit(cfg):
        for key, value in edits.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value

    edit_config(src, edit)
    wrong = [k for k, v in edits.items() if v is not None and k != "intermediate_size"
             and not (type(v) is int and v == _TRUTH[k])]
    refusals = _plan_refusals(src)
    assert len(refusals) == (2 if wrong else 0), (edits, refusals)  # both layers
    if wrong:
        assert all("config.json: " in r and any(f"config.json: {k} is " in r for k in wrong) for r in refusals)
