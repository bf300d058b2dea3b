"""Convert a matrix of synthetic checkpoints and print the sha256 of every file written.

A tool for refactors and speed work that must not change a byte: run it before and after and
compare. Every family and every option set the test suite exercises is in the matrix.

    python scripts/output_digests.py --out before.json
    ... change the code ...
    python scripts/output_digests.py --against before.json     # exit 1 on any difference

``--weights-only`` compares only the tensor files (shards and rank files): config.json and the
manifest also record the tool version and what the source was, which a refactor may change on
purpose.
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
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen3moe-g128"


def matrix():
    """(name, synth spec or None for the AutoRound fixture, convert options)."""
    dense = dict(first_dense=1, num_layers=3)
    for fam in FAMILIES:
        extra = dense if fam in ("deepseek_v2", "deepseek_v3", "glm4_moe") else {}
        yield f"{fam}", dict(family=fam, **SMALL, **extra), {}
    yield "fixture", None, {}
    yield "fixture-s4", None, dict(nibble_encoding="s4")
    yield "fixture-bf16", None, dict(scale_dtype="bfloat16")
    yield "fixture-tp4-ranks", None, dict(tp_size=4, emit_ranks=True)
    yield "bf16-scales", dict(family="qwen3_moe", scale_dtype="bfloat16", **SMALL), {}
    yield "bf16-to-f16", dict(family="qwen3_moe", scale_dtype="bfloat16", **SMALL), dict(scale_dtype="float16")
    yield "gptq_v2", dict(family="qwen3_moe", checkpoint_format="gptq_v2", **SMALL), {}
    yield "per-channel", dict(family="mixtral", **dict(SMALL, group_size=-1)), {}
    yield "group-512", dict(family="qwen3_moe", hidden=1024, moe_intermediate=512, num_experts=2, group_size=512), {}
    yield "tp2-regroup", dict(family="qwen3_moe", hidden=256, moe_intermediate=192, num_experts=2, group_size=64), \
        dict(tp_size=2, emit_ranks=True)
    yield "tp3-pad", dict(family="qwen3_moe", hidden=256, moe_intermediate=160, num_experts=2, group_size=32), \
        dict(tp_size=3)
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


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
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
            src = FIXTURE if spec is None else Path(tmp) / name / "src"
            if spec is not None:
                make_checkpoint(src, **spec)
            out = Path(tmp) / name / "out"
            convert(src, out, options=ConvertOptions(**opts), jobs=jobs)
            results[name] = digests(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the digests here (JSON)")
    ap.add_argument("--against", type=Path, help="compare with digests written earlier; exit 1 on a difference")
    ap.add_argument("--weights-only", action="store_true", help="compare *.safetensors files only")
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
    for name, files in results.items():
        old = before.get(name, {})
        keys = set(files) | set(old)
        if args.weights_only:
            keys = {k for k in keys if k.endswith(".safetensors")}
        diff = sorted(k for k in keys if files.get(k) != old.get(k))
        print(f"{'same' if not diff else 'DIFF'} {name}" + (f": {', '.join(diff)}" if diff else ""))
        bad += bool(diff)
    print(f"{len(results) - bad} identical, {bad} different")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
