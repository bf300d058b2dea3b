#!/usr/bin/env python3
"""End-to-end run on a GPU host: generate a full-width checkpoint there, convert, verify on the GPU.

    python3 scripts/gpu_e2e.py --layers 48 --workdir /tmp/g --json-out $OUT/gpu_e2e.json

Steps, each timed: (1) a Qwen3-30B-A3B-shaped GPTQ checkpoint (128 experts, hidden 2048,
moe_intermediate 768, group 128, top-8) written by ``gptq2xpu.testing.synth`` (fast mode); (2) ``gptq2xpu
convert``; (3) ``gptq2xpu verify --source --device cuda`` over every layer (bit-exact part and the
reference MoE: per layer, the time to load both sides' packed bytes to the device and the time
to dequantize and run the MoE there); (4) the same numerical work on the CPU for ``--cpu-layers``
layers, for comparison.  Prints a summary and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_cli(*args) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "gptq2xpu", *map(str, args), "--json"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"gptq2xpu {args[0]} failed with {r.returncode}")
    return dt, json.loads(r.stdout)


def layer_stats(report: dict) -> dict:
    rows = report["layers"]
    load = [r["load_seconds"] for r in rows]
    comp = [r["compute_seconds"] for r in rows]
    packed = statistics.mean(r["packed_bytes"] for r in rows)
    return {
        "layers": len(rows),
        "load_ms_median": round(1000 * statistics.median(load), 2),
        "compute_ms_median": round(1000 * statistics.median(comp), 2),
        "compute_ms_min": round(1000 * min(comp), 2),
        "seconds_per_layer": round(statistics.mean(r["seconds"] for r in rows), 4),
        "packed_mb_per_layer": round(packed / 1e6, 1),
        "effective_gb_per_s": round(sum(r["packed_bytes"] for r in rows) / sum(r["seconds"] for r in rows) / 1e9, 3),
        "worst_rel": max(r["rel"] for r in rows),
        "all_ok": all(r["ok"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gptq2xpu-gpu"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-layers", default="0,1", help="layers for the CPU comparison ('' to skip)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from gptq2xpu.testing.synth import make_checkpoint

    src, out = args.workdir / "src", args.workdir / "out"
    res: dict = {"layers": args.layers}
    if not src.exists():
        t = time.perf_counter()
        info = make_checkpoint(src, family="qwen3_moe", hidden=2048, moe_intermediate=768, num_experts=128, top_k=8,
                               num_layers=args.layers, group_size=128, vocab=1024, fast=True, shard_size=4 * 10**9)
        res["generate_seconds"] = round(time.perf_counter() - t, 2)
        res["source_gib"] = round(info.total_size / 2**30, 3)
    t, conv = run_cli("convert", src, out, "--overwrite")
    res["convert_seconds"] = round(t, 2)
    res["convert_gib_per_s"] = round(conv["bytes_in"] / 2**30 / t, 3)
    t, gpu = run_cli("verify", out, "--source", src, "--device", args.device, "--tokens", args.tokens)
    res["gpu_verify"] = {"wall_seconds": round(t, 2), "status": gpu["status"],
                         "bit_exact_seconds": gpu.get("bit_exact_seconds"),
                         "numeric_seconds": gpu.get("numeric_seconds"), "device": gpu.get("device"),
                         "dtype": gpu.get("dtype"), **layer_stats(gpu)}
    if args.cpu_layers:
        t, cpu = run_cli("verify", out, "--source", src, "--device", "cpu", "--dtype", gpu.get("dtype", "bfloat16"),
                         "--layers", args.cpu_layers, "--tokens", args.tokens)
        res["cpu_verify"] = {"wall_seconds": round(t, 2), "status": cpu["status"], "threads": os.cpu_count(),
                             **layer_stats(cpu)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
