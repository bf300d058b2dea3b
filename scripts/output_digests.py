"""Convert a matrix of checkpoints and print, per output tensor, its dtype, shape and data sha256.

A tool for refactors and speed work that must not change a converted tensor: run it before and
after and compare.  Every family and option set the test suite exercises, and both fixtures, are in
the matrix.  Tensors are compared, not files: config.json, the manifest and the safetensors
metadata record the tool version and describe the layout in words, which a change may reword on
purpose.  Each tensor-parallel output is also loaded rank by rank through the loader
(:mod:`gptq2xpu.load`) and sliced by the vLLM plugin's slicing, and those slices are digested too.

    python scripts/output_digests.py --out before.json
    ... change the code ...
    python scripts/output_digests.py --against before.json     # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

FAMILIES = ["qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_next", "mixtral", "deepseek_v2", "deepseek_v3",
            "glm4_moe"]
SMALL = dict(hidden=128, moe_intermediate=64, num_experts=4, group_size=32)
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
FIXTURE = FIXTURES / "qwen3moe-g128"
CT_FIXTURE = FIXTURES / "ct-pack-quantized"


def matrix():
    """(name, synth spec or the path of a fixture, convert options)."""
    dense = dict(first_dense=1, num_layers=3)
    for fam in FAMILIES:
        extra = dense if fam in ("deepseek_v2", "deepseek_v3", "glm4_moe") else {}
        yield f"{fam}", dict(family=fam, **SMALL, **extra), {}
    yield "fixture", FIXTURE, {}
    yield "fixture-s4", FIXTURE, dict(nibble_encoding="s4")
    yield "fixture-bf16", FIXTURE, dict(scale_dtype="bfloat16")
    yield "fixture-tp4-ranks", FIXTURE, dict(tp_size=4, emit_ranks=True)
    yield "fixture-tp4-s4", FIXTURE, dict(tp_size=4, nibble_encoding="s4")
    yield "ct-fixture", CT_FIXTURE, {}
    yield "ct-fixture-tp2-ranks", CT_FIXTURE, dict(tp_size=2, emit_ranks=True, scale_dtype="float16")
    yield "bf16-scales", dict(family="qwen3_moe", scale_dtype="bfloat16", **SMALL), {}
    yield "bf16-to-f16", dict(family="qwen3_moe", scale_dtype="bfloat16", **SMALL), dict(scale_dtype="float16")
    yield "gptq_v2", dict(family="qwen3_moe", checkpoint_format="gptq_v2", **SMALL), {}
    yield "per-channel", dict(family="mixtral", **dict(SMALL, group_size=-1)), {}
    yield "group-512", dict(family="qwen3_moe", hidden=1024, moe_intermediate=512, num_experts=2, group_size=512), {}
    yield "tp2-regroup", dict(family="qwen3_moe", hidden=256, moe_intermediate=192, num_experts=2, group_size=64), \
        dict(tp_size=2, emit_ranks=True)
    yield "tp3-pad", dict(family="qwen3_moe", hidden=256, moe_intermediate=160, num_experts=2, group_size=32), \
        dict(tp_size=3)
    yield "tp3-pad-ranks", dict(family="qwen3_moe", hidden=256, moe_intermediate=160, num_experts=2, group_size=32), \
        dict(tp_size=3, emit_ranks=True, scale_dtype="bfloat16")
    yield "sharded", dict(family="deepseek_v3", shard_size=20_000, shuffle_index=True, **SMALL, **dense), \
        dict(max_shard_size=30_000)
    yield "compressed-tensors", dict(family="qwen3_moe", quant_format="compressed-tensors", **SMALL), {}
    yield "router-dequant", dict(family="qwen2_moe", quantized_router=True, **dict(SMALL, num_experts=8)), \
        dict(dequantize_router=True)
    yield "router-kept", dict(family="qwen2_moe", quantized_router=True, **dict(SMALL, num_experts=8)), {}
    yield "mtp-fused", dict(family="qwen3_5_moe", mtp=True, fused_float_mtp=True, **SMALL), {}
    yield "dynamic", dict(family="qwen3_moe", num_layers=3, **SMALL,
                          dynamic={r"-:.*layers\.1\.mlp\.experts\..*": {},
                                   r"+:.*layers\.2\.mlp\.experts\..*": {"group_size": 64}}), {}
    yield "keep-8bit", dict(family="qwen3_moe", num_layers=2, **SMALL,
                            dynamic={r"+:.*layers\.1\.mlp\.experts\..*": {"bits": 8}}), dict(keep_unsupported=True)
    yield "old-autogptq", dict(family="mixtral", old_autogptq=True, **SMALL), {}
    yield "vision", dict(family="qwen3_moe", vision=True, **SMALL), {}


def tensor_digests(folder: Path) -> dict[str, str]:
    """``{tensor: "DTYPE [shape] sha256"}`` of every safetensors file under ``folder``; a rank
    folder's tensors are named ``<rank folder>/<tensor>``.  The header is read by hand: the
    safetensors package hands BF16 only to torch, and this must not depend on the code under test."""
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        base = 8 + size
        where = path.parent.relative_to(folder).as_posix()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            key = name if where == "." else f"{where}/{name}"
            out[key] = f"{info['dtype']} {info['shape']} {hashlib.sha256(data[base + begin : base + end]).hexdigest()}"
    return out


def slice_digests(folder: Path) -> dict[str, str]:
    """Per rank of a tensor-parallel output: the digests of what the loader hands over (from the
    rank folders when written, else sliced from the whole tensors) and of the vLLM plugin's slices."""
    import torch

    from gptq2xpu.contract import EXPERT_TENSORS
    from gptq2xpu.load import open_converted
    from gptq2xpu.torch_io import torch_dtype
    from gptq2xpu.vllm_plugin.slices import copy_rank_slice, rank_shape

    def sha(t: torch.Tensor) -> str:
        return f"{t.dtype} {list(t.shape)} {hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()}"

    out = {}
    with open_converted(folder) as ck:
        size = ck.block.tp_size
        for prefix, info in ck.block.layers.items():
            dtype = torch_dtype(info.scale_dtype, prefix)
            full = {w: ck.tensor(info.tensor(w)) for w in EXPERT_TENSORS}
            for r in range(size):
                lw = ck.layer(prefix, tp_rank=r, tp_size=size, dtype=dtype)
                for w, t in zip(EXPERT_TENSORS, (lw.w13, lw.w13_scales, lw.w2, lw.w2_scales)):
                    out[f"load rank {r}/{size} {info.tensor(w)}"] = sha(t)
                for w in EXPERT_TENSORS:
                    dst = torch.empty(rank_shape(info, w, size), dtype=full[w].dtype)
                    copy_rank_slice(info, w, full[w], dst, r, size)
                    out[f"plugin rank {r}/{size} {info.tensor(w)}"] = sha(dst)
    return out


def run(only: set[str] | None, jobs: int = 2) -> dict[str, dict[str, str]]:
    from gptq2xpu.convert import convert
    from gptq2xpu.plan import ConvertOptions
    from gptq2xpu.testing.synth import make_checkpoint

    results = {}
    # a fixed folder: config.json records where the source was, and runs must be comparable
    tmp = Path(tempfile.gettempdir()) / "gptq2xpu-output-digests"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, spec, opts in matrix():
            if only and name not in only:
                continue
            if isinstance(spec, Path):
                src = spec
            else:
                src = Path(tmp) / name / "src"
                make_checkpoint(src, **spec)
            out = Path(tmp) / name / "out"
            convert(src, out, options=ConvertOptions(**opts), jobs=jobs)
            results[name] = tensor_digests(out)
            if opts.get("tp_size", 1) > 1:
                results[name].update(slice_digests(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the digests here (JSON)")
    ap.add_argument("--against", type=Path, help="compare with digests written earlier; exit 1 on a difference")
    ap.add_argument("--only", nargs="*", help="matrix entries to run")
    ap.add_argument("--jobs", type=int, default=2, help="convert's --jobs (bytes must not depend on it; default 2)")
    args = ap.parse_args()
    results = run(set(args.only) if args.only else None, args.jobs)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not args.against:
        if not args.out:
            print(json.dumps(results, indent=1, sort_keys=True))
        return 0
    before = json.loads(args.against.read_text())
    bad = 0
    for name, tensors in results.items():
        old = before.get(name, {})
        diff = sorted(k for k in set(tensors) | set(old) if tensors.get(k) != old.get(k))
        print(f"{'same' if not diff else 'DIFF'} {name}" + (f": {', '.join(diff)}" if diff else ""))
        bad += bool(diff)
    print(f"{len(results) - bad} identical, {bad} different")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
