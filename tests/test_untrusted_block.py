"""A converted folder's config block is untrusted input: every field of it, set to a wrong type, an
absurd value or a well-typed lie about the tensors, and handed to ``verify`` (standalone, against
the source without and with the reference MoE) and to :func:`gptq2xpu.load.open_converted`, gives a
project error (never exit 1, never a traceback); lies about the tensors' shapes are verification
failures naming the layer."""

from __future__ import annotations

import json
import shutil

import pytest
from support.helpers import cli, run_cli
from support.hostile import L0, fixture_copy, mutate
from support.planting import reseal_all

from gptq2xpu.contract import CONFIG_BLOCK
from gptq2xpu.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, Gptq2XpuError
from gptq2xpu.load import open_converted

MISSING = object()
WRONG = [None, [], "x", -1, 0, 2**70, "x" * 100_000, MISSING]
LAYER_KEYS = ["experts", "hidden_size", "intermediate_size", "padded_intermediate_size", "w13_group_size",
              "w2_group_size", "scale_dtype", "source_format", "source_projections", "source_group_size"]
TOP_KEYS = ["format_version", "nibble_encoding", "tp_size", "tp_ranks", "layers", "routing", "routers",
            "quantized_routers", "dequantized_routers", "passthrough_layers", "unconverted_layers", "source"]


def _set(path: tuple, value):
    def edit(block):
        *parents, key = path
        for p in parents:
            block = block[p]
        if value is MISSING:
            block.pop(key, None)
        else:
            block[key] = value
    return edit


def _cases():
    for key in LAYER_KEYS:
        for v in WRONG:
            yield pytest.param(_set(("layers", L0, key), v), id=f"layer.{key}={_label(v)}")
    for key in TOP_KEYS:
        for v in WRONG:
            yield pytest.param(_set((key,), v), id=f"{key}={_label(v)}")
    for key in ("checkpoint_format", "fingerprint", "data_fingerprint"):
        for v in WRONG:
            yield pytest.param(_set(("source", key), v), id=f"source.{key}={_label(v)}")
    for key in ("top_k", "scoring", "renormalize", "routed_scaling_factor"):
        for v in WRONG:
            yield pytest.param(_set(("routing", key), v), id=f"routing.{key}={_label(v)}")


def _label(v) -> str:
    return "missing" if v is MISSING else "huge-str" if isinstance(v, str) and len(v) > 10 else repr(v)


#: well-typed values that parse but misdescribe the tensors: verify must say the output is wrong
LIES = {
    "intermediate_size=2": _set(("layers", L0, "intermediate_size"), 2),
    "intermediate_size=128": _set(("layers", L0, "intermediate_size"), 128),
    "padded_intermediate_size=512": _set(("layers", L0, "padded_intermediate_size"), 512),
    "hidden_size=128": _set(("layers", L0, "hidden_size"), 128),
    "experts=4": _set(("layers", L0, "experts"), 4),
    "experts=16": _set(("layers", L0, "experts"), 16),
    "w13_group_size=32": _set(("layers", L0, "w13_group_size"), 32),
    "w2_group_size=64": _set(("layers", L0, "w2_group_size"), 64),
    "scale_dtype=bfloat16": _set(("layers", L0, "scale_dtype"), "bfloat16"),
    "source_format=compressed-tensors": _set(("layers", L0, "source_format"), "compressed-tensors"),
    "source_group_size.gate=32": _set(("layers", L0, "source_group_size", "gate"), 32),
    "source_group_size.down=64": _set(("layers", L0, "source_group_size", "down"), 64),
    "source_projections.gate=down_proj": _set(("layers", L0, "source_projections", "gate"), "down_proj"),
    "source_projections.gate=nope": _set(("layers", L0, "source_projections", "gate"), "nope"),
    "nibble_encoding=s4": _set(("nibble_encoding",), "s4"),
    "checkpoint_format=gptq_v2": _set(("source", "checkpoint_format"), "gptq_v2"),
    "tp_size=4": _set(("tp_size",), 4),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("untrusted-block")
    src = fixture_copy(base / "src")
    out = base / "out"
    assert run_cli("convert", src, out, "-q").returncode == EXIT_OK
    return src, out


def _tampered(converted, tmp_path, edit):
    """A copy of the output with its block edited and its manifest updated to match, so that only
    the block itself can make verify fail."""
    _, out = converted
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg[CONFIG_BLOCK])
    (bad / "config.json").write_text(json.dumps(cfg))
    reseal_all(bad)
    return bad


def _runs(converted, bad, numeric: bool) -> list[tuple[tuple, int, str]]:
    src, _ = converted
    variants = [("verify", bad), ("verify", bad, "--source", src, "--no-numeric")]
    if numeric:
        variants.append(("verify", bad, "--source", src, "--tokens", "4"))
    runs = []
    for args in variants:
        code, stdout, stderr = cli(*args, "--json")
        assert code != EXIT_INTERNAL, (args, stderr[-2000:])
        assert "Traceback" not in stderr and len([ln for ln in stderr.splitlines() if ln.strip()]) <= 1, stderr
        runs.append((args, code, stdout))
    try:
        open_converted(bad).close()
    except Gptq2XpuError as exc:
        assert exc.exit_code != EXIT_INTERNAL and "\n" not in str(exc)
    return runs


@pytest.mark.parametrize("edit", list(_cases()))
def test_a_wrong_block_value_is_never_an_internal_error(converted, tmp_path, edit):
    _runs(converted, _tampered(converted, tmp_path, edit), numeric=True)


@pytest.mark.parametrize("name", list(LIES))
def test_a_block_that_misdescribes_the_tensors_fails_verification(converted, tmp_path, name):
    runs = _runs(converted, _tampered(converted, tmp_path, LIES[name]), numeric=True)
    with_source = [(args, code, stdout) for args, code, stdout in runs if "--source" in args]
    for args, code, stdout in with_source:
        assert code == EXIT_VERIFY, (args, code, stdout[-2000:])
        report = json.loads(stdout)
        assert report["status"] == "fail" and report["failures"], report


def test_a_router_recorded_as_dequantized_is_still_compared_when_the_source_has_it(converted, tmp_path):
    bad = _tampered(converted, tmp_path, _set(("dequantized_routers",), [f"{L0}.gate.weight"]))
    router = f"{L0}.gate.weight"
    mutate(bad, lambda t: t.__setitem__(router, (t[router][0], t[router][1] * 2)))
    reseal_all(bad)
    src, _ = converted
    code, stdout, _ = cli("verify", bad, "--source", src, "--no-numeric", "--json")
    assert code == EXIT_VERIFY and any(router in f for f in json.loads(stdout)["failures"]), stdout


def test_unedited_output_still_verifies(converted, tmp_path):
    bad = _tampered(converted, tmp_path, lambda block: None)
    for args, code, _ in _runs(converted, bad, numeric=True):
        assert code == EXIT_OK, args


@pytest.mark.parametrize("spec", ["sample:0", "sample:", "sample:-1", "sample:x", "1-0", ",", "0,,1", "9" * 30,
                                  "nope"])
def test_layers_out_of_bounds_is_a_usage_error(converted, spec):
    src, out = converted
    code, _, stderr = cli("verify", out, "--source", src, "--no-numeric", "--layers", spec)
    assert code == EXIT_USAGE, stderr
    assert "--layers" in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("spec", ["sample:1", "sample:999999", "-1", "0-1", "all"])
def test_layers_in_bounds_verify(converted, spec):
    src, out = converted
    code, _, stderr = cli("verify", out, "--source", src, "--layers", spec, "--tokens", "4")
    assert code == EXIT_OK, stderr


@pytest.mark.parametrize("kwargs", [{"tokens": 0}, {"tokens": -1}, {"seed": -1}, {"seed": 2**40}, {"jobs": -1},
                                    {"layers": "sample:0"}])
def test_library_verify_bounds_are_usage_errors(converted, kwargs):
    from gptq2xpu.errors import UsageError
    from gptq2xpu.verify.runner import verify

    src, out = converted
    with pytest.raises(UsageError):
        verify(out, src, numeric=False, **kwargs)


def test_source_block_absent_parses_as_not_recorded(converted, tmp_path):
    """A block without ``source`` parses (nothing recorded), but cannot be matched to a SOURCE."""
    bad = _tampered(converted, tmp_path, _set(("source",), MISSING))
    src, _ = converted
    code, _, stderr = cli("verify", bad, "--source", src, "--no-numeric")
    assert code == EXIT_INPUT and "records no source fingerprint" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert cli("verify", bad, "--no-numeric")[0] == EXIT_OK

