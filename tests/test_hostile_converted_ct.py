"""A converted folder is untrusted input, in either output format: one tampered the way an attacker
or a corrupted download would (its quantization_config, config.json's dimensions, tensors added or
dropped, the config block's record of the linears), and re-sealed so that its manifest agrees,
must fail ``verify`` (standalone and against the source) with exit 4 and one line naming what is
wrong; never pass, never exit 1, never change the folder or write beside it.
``gptq2xpu.load`` raises the project's own errors only.  A split conversion's plan, tampered
before ``finalize``, is caught by ``finalize`` or by the ``verify`` that follows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.helpers import cli, raw_header, write_raw
from support.hostile import fixture_copy, tree_hashes
from support.planting import patch_tensor, reseal_all, shard_of

from gptq2xpu.contract import MANIFEST_NAME
from gptq2xpu.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY, Gptq2XpuError
from gptq2xpu.load import open_converted

L0 = "model.layers.0.mlp"
E0 = f"{L0}.experts.0"
Q = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"
K_PROJ_PATTERN = r"re:model\.layers\.0\.self_attn\.k_proj$"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-converted")
    src = fixture_copy(base / "src")
    outs = {}
    for fmt, extra in (("ct", ("--format", "compressed-tensors")), ("xpu", ())):
        code, _, err = cli("convert", src, base / fmt, "-q", *extra)
        assert code == EXIT_OK, err
        outs[fmt] = base / fmt
    return src, outs


# ------------------------------------------------------------------------------ tampering


def config(fn):
    def edit(folder):
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        fn(cfg)
        path.write_text(json.dumps(cfg, indent=2))  # NaN and Infinity written as JSON's literals
    return edit


def qc(fn):
    return config(lambda c: fn(c["quantization_config"]))


def group(key, value, name="group_0"):
    return qc(lambda q: q["config_groups"][name].__setitem__(key, value))


def weights(key, value):
    return qc(lambda q: q["config_groups"]["group_0"]["weights"].__setitem__(key, value))


def top(key, value):
    return qc(lambda q: q.__setitem__(key, value))


def ignore_also(entry):
    return qc(lambda q: q["ignore"].append(entry))


def second_group(targets, group_size, *more):
    """Groups added after group_0: (targets, group size) each."""
    def edit(q):
        for i, (listed, size) in enumerate(((targets, group_size), *more), 1):
            g = json.loads(json.dumps(q["config_groups"]["group_0"]))
            g["targets"], g["weights"]["group_size"] = listed, size
            q["config_groups"][f"group_{i}"] = g
    return qc(edit)


def block(fn):
    return config(lambda c: fn(c["gptq2xpu"]))


def tensor(name, fn):
    return lambda folder: patch_tensor(shard_of(folder, name), name, fn)


def add_tensor(name, dtype, array):
    """A tensor appended to the shard, and listed in the index."""
    def edit(folder):
        shard = folder / "model.safetensors"
        header, data = raw_header(shard)
        span = [len(data), len(data) + array.nbytes]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": span}
        write_raw(shard, header, data + array.tobytes())
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"][name] = "model.safetensors"
        index["metadata"]["total_size"] += array.nbytes
        (folder / INDEX).write_text(json.dumps(index))
    return edit


def raw_text(name, fn):
    def edit(folder):
        (folder / name).write_text(fn((folder / name).read_text()))
    return edit


def truncate(folder):
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def index_entry(name, file):
    def edit(folder):
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"][name] = file
        (folder / INDEX).write_text(json.dumps(index))
    return edit


def config_link(folder):
    (folder / "real.json").write_bytes((folder / "config.json").read_bytes())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("real.json")


def _nan_first(a):
    a.flat[0] = np.float16("nan")
    return a


def _inf_first(a):
    a.flat[0] = np.float16("inf")
    return a


# (format, edit, words the error line must hold); each must fail verify with exit 4
CASES = {
    # quantization_config: what a runtime would apply beyond 4-bit weights, or to other modules
    "ct/targets-empty": ("ct", group("targets", []), "no config group targets"),
    "ct/targets-a-class-no-linear-is": ("ct", group("targets", ["Embedding"]), "names no 4-bit module"),
    "ct/a-class-target-placed-first": ("ct", qc(lambda q: q.__setitem__("config_groups", {"first": dict(
        q["config_groups"]["group_0"], targets=["RowParallelLinear"], weights=dict(
            q["config_groups"]["group_0"]["weights"], group_size=32)), **q["config_groups"]})), "RowParallelLinear"),
    "ct/a-pattern-matching-a-class": ("ct", second_group(["re:.*Experts$"], 64), "matches the module class"),
    "ct/group-format-int-quantized": ("ct", group("format", "int-quantized"), "int-quantized"),
    "ct/input-activations-int8": ("ct", group("input_activations", {"num_bits": 8, "type": "int", "symmetric": True,
                                                                       "strategy": "token", "dynamic": True}),
                                  "input_activations"),
    "ct/actorder-group": ("ct", weights("actorder", "group"), "actorder"),
    "ct/dynamic-weights": ("ct", weights("dynamic", True), "dynamic"),
    "ct/sparsity-2of4": ("ct", top("sparsity_config", {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                                       "targets": ["Linear"], "ignore": [], "global_sparsity": 0.5}),
                         "sparsity_config"),
    "ct/hadamard-transform": ("ct", top("transform_config", {"config_groups": {"u": {"type": "hadamard", "apply": [
        {"targets": ["Linear"], "location": "weight_input"}]}}}), "transform_config"),
    "ct/fp8-kv-cache": ("ct", top("kv_cache_scheme", {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                      "dynamic": False, "symmetric": True}), "kv_cache_scheme"),
    "ct/status-initialized": ("ct", top("quantization_status", "initialized"), "quantization_status"),
    "ct/ignore-a-4bit-linear": ("ct", ignore_also(Q), f"lists {Q}"),
    "ct/ignore-every-expert-by-pattern": ("ct", ignore_also("re:.*experts.*"), "experts"),
    "ct/ignore-the-moe-layer": ("ct", ignore_also(f"{L0}.experts"), f"lists {L0}.experts"),
    "ct/router-not-ignored": ("ct", qc(lambda q: q["ignore"].remove(f"{L0}.gate")), f"{L0}.gate"),
    "ct/linear-target-regrouped": ("ct", second_group(["Linear"], 32), "group_size 32"),
    "ct/one-linear-named-in-another-group": ("ct", second_group([K_PROJ], 64), f"{K_PROJ}: its config group says "
                                                                                "group_size 64"),
    "ct/a-pattern-placed-before-the-name-wins": ("ct", second_group([K_PROJ_PATTERN], 64, ([K_PROJ], 128)),
                                                 "group_size 64"),
    "ct/ignore-pattern-not-matchable": ("ct", ignore_also("re:(?i)LM_HEAD"), "regular expression"),
    # what already failed, kept as it is
    "ct/no-quantization-config": ("ct", config(lambda c: c.pop("quantization_config")), "no quantization_config"),
    "ct/num-bits-8": ("ct", weights("num_bits", 8), "not a 4-bit"),
    "ct/group-size-64": ("ct", weights("group_size", 64), "no config group for group size"),
    "ct/group-size-nan": ("ct", weights("group_size", float("nan")), "no config group for group size"),
    "ct/group-size-huge": ("ct", weights("group_size", 10**400), "no config group for group size"),
    "ct/strategy-channel": ("ct", weights("strategy", "channel"), "not a 4-bit"),
    "ct/asymmetric": ("ct", weights("symmetric", False), "not a 4-bit"),
    "ct/quantization-config-a-list": ("ct", top("config_groups", [1, 2]), "quantization_config"),
    "ct/deep-nesting": ("ct", raw_text("config.json", lambda t: t.replace('"observer_kwargs": {}', '"observer_kwargs": '
                                                                         + "[" * 100_000 + "]" * 100_000, 1)),
                        "config.json"),
    # config.json's dimensions against the tensors (either format)
    "ct/num-experts-4": ("ct", config(lambda c: c.__setitem__("num_experts", 4)), "num_experts is 4"),
    "ct/moe-intermediate-128": ("ct", config(lambda c: c.__setitem__("moe_intermediate_size", 128)),
                                "moe_intermediate_size is 128"),
    "xpu/moe-intermediate-128": ("xpu", config(lambda c: c.__setitem__("moe_intermediate_size", 128)),
                                 "moe_intermediate_size is 128"),
    "xpu/hidden-size-512": ("xpu", config(lambda c: c.__setitem__("hidden_size", 512)), "hidden_size is 512"),
    "xpu/num-experts-a-string": ("xpu", config(lambda c: c.__setitem__("num_experts", "8")), "not a whole number"),
    # tensors beside or instead of what the block describes
    "ct/stacked-xpu-tensor-added": ("ct", add_tensor(f"{L0}.experts.w13_qweight", "U8",
                                                     np.zeros((8, 512, 128), np.uint8)), "w13_qweight"),
    "ct/linear-with-g-idx": ("ct", add_tensor(f"{Q}.weight_g_idx", "I32", np.zeros(256, np.int32)),
                             f"{Q}.weight_g_idx"),
    "ct/linear-with-zero-points": ("ct", add_tensor(f"{Q}.weight_zero_point", "I32", np.zeros((32, 2), np.int32)),
                                   f"{Q}.weight_zero_point"),
    "ct/block-says-xpu-format": ("ct", block(lambda b: b.__setitem__("output_format", "xpu")), "check(s) failed"),
    "xpu/block-says-compressed-tensors": ("xpu", block(lambda b: b.__setitem__("output_format", "compressed-tensors")),
                                          "gate_proj.weight_packed: missing"),
    "ct/block-claims-millions-of-experts": ("ct", block(lambda b: b["layers"].update(
        {f"model.layers.{i}.mlp": dict(b["layers"][L0], experts=65536) for i in range(2, 20)})), "check(s) failed"),
    "ct/linear-the-block-omits": ("ct", block(lambda b: b["linears"].pop(Q)), "does not describe"),
    "ct/unknown-linear-added": ("ct", add_tensor("model.layers.0.mlp.shared_expert.down_proj.weight_packed", "I32",
                                                 np.zeros((256, 32), np.int32)), "does not describe"),
    "ct/expert-beyond-the-block": ("ct", add_tensor(f"{L0}.experts.8.gate_proj.weight_packed", "I32",
                                                    np.zeros((256, 32), np.int32)), "experts.8"),
    "ct/expert-weight-shape-wrong": ("ct", tensor(f"{E0}.down_proj.weight_shape",
                                                  lambda a: np.array([128, 256], a.dtype)), "weight_shape"),
    "ct/linear-weight-shape-reversed": ("ct", tensor(f"{K_PROJ}.weight_shape", lambda a: a[::-1].copy()),
                                        "weight_shape"),
    "ct/expert-scale-nan": ("ct", tensor(f"{E0}.gate_proj.weight_scale", _nan_first), "non-finite"),
    "ct/linear-scale-inf": ("ct", tensor(f"{Q}.weight_scale", _inf_first), "non-finite"),
    "ct/index-leaves-the-folder": ("ct", index_entry(f"{Q}.weight_packed", "../ct/model.safetensors"),
                                   "leaves the folder"),
    "ct/index-odd-unicode-shard": ("ct", index_entry(f"{Q}.weight_packed", "model\u202e.safetensors"),
                                   "does not exist"),
    "ct/config-a-link": ("ct", config_link, "link"),
    # what an xpu output declares a runtime must serve it with
    "xpu/quant-method-gptq": ("xpu", qc(lambda q: q.__setitem__("quant_method", "gptq")), "quant_method"),
    "xpu/declared-compressed-tensors": ("xpu", top("quant_method", "compressed-tensors"), "quant_method"),
    "xpu/no-quantization-config": ("xpu", config(lambda c: c.pop("quantization_config")), "no quantization_config"),
    "xpu/config-a-link": ("xpu", config_link, "link"),
}
def manifest(fn):
    def edit(folder):
        doc = json.loads((folder / MANIFEST_NAME).read_text())
        fn(doc["files"])
        (folder / MANIFEST_NAME).write_text(json.dumps(doc))
    return edit


#: edits the manifest is not re-sealed after (a corrupted download, a crafted manifest)
UNSEALED = {
    "ct/truncated-shard": ("ct", truncate, "size"),
    "xpu/truncated-shard": ("xpu", truncate, "size"),
    "ct/manifest-names-a-dot-path": ("ct", manifest(lambda f: f.__setitem__("./model.safetensors", f["config.json"])),
                                     "not a plain relative name"),
    "ct/manifest-names-a-nul": ("ct", manifest(lambda f: f.__setitem__("a\x00b", f["config.json"])), "bad file name"),
    "ct/manifest-size-a-boolean": ("ct", manifest(lambda f: f["config.json"].__setitem__("size", True)),
                                   "needs sha256 and size"),
    "ct/manifest-drops-the-shard": ("ct", manifest(lambda f: f.pop("model.safetensors")), "not listed"),
}
#: what only the source can tell: a block that misdescribes a linear's groups (its tensors are then
#: not read by it), an xpu output's description of the source's quantization (which serves its
#: other layers) that is not the source's
WITH_SOURCE_ONLY = {
    "ct/block-linear-group-64": ("ct", block(lambda b: b["linears"][Q].__setitem__("group_size", 64)),
                                 f"{Q}.weight_scale"),
    "xpu/source-description-gptq-v2": ("xpu", qc(lambda q: q["source_quantization_config"].__setitem__(
        "checkpoint_format", "gptq_v2")), "source_quantization_config differs"),
    "xpu/source-description-asymmetric": ("xpu", qc(lambda q: q["source_quantization_config"].__setitem__(
        "sym", False)), "source_quantization_config differs"),
    # written before the method was declared, config.json held the source's description itself
    "xpu/old-style-description-gptq-v2": ("xpu", config(lambda c: c.__setitem__("quantization_config", dict(
        c["quantization_config"]["source_quantization_config"], checkpoint_format="gptq_v2"))),
        "quantization_config differs"),
}


def _tampered(good: Path, tmp_path: Path, edit, *, seal: bool = True) -> Path:
    bad = tmp_path / "out"
    shutil.copytree(good, bad)
    edit(bad)
    if seal:
        reseal_all(bad)
    return bad


def _fails_cleanly(args, words: str) -> None:
    code, _, stderr = cli(*args)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == EXIT_VERIFY, (args, code, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("gptq2xpu: verification failed: ") and "Traceback" not in stderr, \
        stderr[-3000:]
    assert words.lower() in lines[0].lower(), (words, lines[0])


def _loader_says_one_line(folder: Path, fmt: str) -> None:
    try:
        with open_converted(folder) as ckpt:
            for prefix in ckpt.layers:
                ckpt.layer(prefix, tp_rank=0)
    except Gptq2XpuError as exc:
        assert exc.exit_code in (EXIT_INPUT, EXIT_VERIFY) and "\n" not in str(exc), exc
    else:
        assert fmt == "xpu", "the loader opened a compressed-tensors output"


def _check(outputs, tmp_path, case, *, standalone=True, seal=True):
    src, outs = outputs
    fmt, edit, words = case
    bad = _tampered(outs[fmt], tmp_path, edit, seal=seal)
    before, beside = tree_hashes(bad), sorted(p.name for p in tmp_path.iterdir())
    if standalone:
        _fails_cleanly(("verify", bad), words)
    _fails_cleanly(("verify", bad, "--source", src, "--no-numeric"), words)
    _loader_says_one_line(bad, fmt)
    assert tree_hashes(bad) == before, "the folder was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == beside, "something was written beside the folder"


@pytest.mark.parametrize("name", list(CASES))
def test_a_tampered_output_fails_verify_with_one_line(outputs, tmp_path, name):
    _check(outputs, tmp_path, CASES[name])


@pytest.mark.parametrize("name", list(UNSEALED))
def test_a_corrupted_download_fails_verify_with_one_line(outputs, tmp_path, name):
    _check(outputs, tmp_path, UNSEALED[name], seal=False)


@pytest.mark.parametrize("name", list(WITH_SOURCE_ONLY))
def test_what_only_the_source_can_tell_fails_verify_against_it(outputs, tmp_path, name):
    _check(outputs, tmp_path, WITH_SOURCE_ONLY[name], standalone=False)


#: edits after which a runtime still reads every module as its tensors hold it: verify passes
HARMLESS = {
    # patterns Python's re would backtrack on are matched by RE2 (they match no module here)
    "ignore-backtracking-alternation": ignore_also("re:(a|aa)*c"),
    "ignore-nested-plus": ignore_also("re:(x+x+)+y"),
    "ignore-optional-run": ignore_also("re:" + "(a?)" * 30 + "a" * 30),
    # a name placed before a pattern that matches it too wins
    "a-name-placed-before-the-pattern-wins": second_group([K_PROJ], 128, ([K_PROJ_PATTERN], 64)),
    # many names of modules the model does not have
    "thousands-of-other-names": qc(lambda q: (q["config_groups"]["group_0"]["targets"].extend(
        f"model.x.{i}.proj" for i in range(20_000)), q["ignore"].extend(f"model.y.{i}.proj" for i in range(20_000)))),
}


@pytest.mark.parametrize("name", list(HARMLESS))
def test_a_config_a_runtime_reads_the_same_still_passes(outputs, tmp_path, name):
    src, outs = outputs
    bad = _tampered(outs["ct"], tmp_path, HARMLESS[name])
    for args in (("verify", bad), ("verify", bad, "--source", src, "--no-numeric")):
        code, _, stderr = cli(*args)
        assert code == EXIT_OK, stderr[-2000:]


# ------------------------------------------------------------------------------ finalize


@pytest.fixture(scope="module")
def split_ct(outputs, tmp_path_factory):
    src, _ = outputs
    out = tmp_path_factory.mktemp("split") / "ct"
    for part in ("1/2", "2/2"):
        code, _, err = cli("convert", src, out, "--part", part, "--max-shard-size", "1MB", "-q",
                           "--format", "compressed-tensors")
        assert code == EXIT_OK, err
    return out


def _plan(fn):
    def edit(folder):
        path = folder / ".gptq2xpu-parts" / "plan.json"
        doc = json.loads(path.read_text())
        fn(doc)
        path.write_text(json.dumps(doc))
    return edit


def _plan_config(fn):
    def edit(doc):
        cfg = json.loads(doc["config"])
        fn(cfg)
        doc["config"] = json.dumps(cfg, indent=2)
    return _plan(edit)


# edit of the parts folder -> exit code of finalize, and of the verify after it when finalize passes
FINALIZE = {
    "plan-config-ignores-a-linear": (_plan_config(lambda c: c["quantization_config"]["ignore"].append(Q)), EXIT_OK),
    "plan-config-num-experts-4": (_plan_config(lambda c: c.__setitem__("num_experts", 4)), EXIT_OK),
    "plan-parts-nan": (_plan(lambda d: d.__setitem__("parts", float("nan"))), EXIT_INPUT),
    "plan-shard-leaves-the-folder": (_plan(lambda d: d["shards"].append("../evil.safetensors")), EXIT_INPUT),
    "plan-index-not-a-map": (_plan(lambda d: d.__setitem__("index", '{"weight_map": 5}')), EXIT_INPUT),
    "plan-index-names-another-file": (_plan(lambda d: d.__setitem__("index", json.dumps(
        {"weight_map": {"x.weight": "config.json"}}))), EXIT_INPUT),
}


@pytest.mark.parametrize("name", list(FINALIZE))
def test_a_tampered_split_plan_is_caught_by_finalize_or_the_verify_after_it(split_ct, tmp_path, name):
    edit, finalize_code = FINALIZE[name]
    folder = tmp_path / "ct"
    shutil.copytree(split_ct, folder)
    edit(folder)
    code, _, stderr = cli("finalize", folder)
    assert code == finalize_code and code != EXIT_INTERNAL and "Traceback" not in stderr, stderr[-2000:]
    if code == EXIT_OK:
        code, _, stderr = cli("verify", folder)
        assert code == EXIT_VERIFY and len([ln for ln in stderr.splitlines() if ln.strip()]) == 1, stderr[-2000:]
    else:
        assert len([ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning")]) == 1, stderr
