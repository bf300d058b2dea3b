#!/usr/bin/env python3
"""Engine start time and peak memory of a vLLM load: vLLM's GPTQ path on a source, and the
gptq2xpu plugin on its conversion (default path, and experts dequantized).

It generates a synthetic GPTQ Qwen3-MoE (``synth.make_checkpoint(fast=True)``; by default
Qwen3-30B-A3B's layer shapes: hidden 2048, moe_intermediate 768, group 128, ``--experts 128``,
``--layers 4``), converts it, and loads each variant with vLLM in its own fresh process
(``tests/support/vllm_runner.py``, the engine in that process: its peak RSS is the load's).  vLLM's GPTQ
path needs an int4 MoE backend for the platform (x86 with AMX, XPU, CUDA); where there is none,
that row shows vLLM's error.  Run it where vLLM and this package's plugin are installed:

    python scripts/vllm_load_bench.py --json-out load.json
    python scripts/vllm_load_bench.py --experts 8 --layers 2 --hidden 256 --moe-intermediate 128  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "support" / "vllm_runner.py"


def load(model: Path, env: dict, work: Path, name: str) -> dict:
    spec = work / f"{name}.jobs.json"
    out = work / f"{name}.results.json"
    spec.write_text(json.dumps({"prompts": [[5, 6, 7, 8, 9, 10, 11, 12]],
                                "jobs": [{"name": name, "model": str(model)}]}))
    penv = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **env}
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run([sys.executable, str(RUNNER), str(spec), str(out)], env=penv, stdout=log,
                       stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())[name] if out.exists() else {"error": "runner died; see its log"}
    return {"variant": name, "process_wall_s": round(wall, 1), **{k: r.get(k) for k in (
        "load_s", "peak_rss_mib_before_load", "peak_rss_mib_loaded", "error")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--keep", type=Path, help="build in this folder (kept) instead of a temporary one")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gptq2xpu.convert import convert
    from gptq2xpu.testing.synth import make_checkpoint

    work = a.keep or Path(tempfile.mkdtemp(prefix="gptq2xpu-vllm-load-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source"
    if not src.exists():
        make_checkpoint(src, family="qwen3_moe", hidden=a.hidden, moe_intermediate=a.moe_intermediate,
                        num_experts=a.experts, top_k=8 if a.experts >= 8 else 2, num_layers=a.layers,
                        group_size=a.group_size, vocab=128, fast=True)
    out = work / "converted"
    if not out.exists():
        convert(src, out)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = [
        load(src, {}, work, "vllm-gptq-source"),
        load(out, {"GPTQ2XPU_VLLM_EXPERTS": "auto"}, work, "plugin-converted"),
        load(out, {"GPTQ2XPU_VLLM_EXPERTS": "dequantize"}, work, "plugin-converted-dequantized"),
    ]
    print(f"checkpoint: {a.layers} layers, {a.experts} experts, hidden {a.hidden}, moe_intermediate "
          f"{a.moe_intermediate}, group {a.group_size}: {size / 2**30:.2f} GiB of safetensors")
    print(f"{'variant':32} {'LLM() s':>8} {'process s':>10} {'RSS before MiB':>15} {'peak RSS MiB':>13}  error")
    for r in rows:
        print(f"{r['variant']:32} {r['load_s'] or '-':>8} {r['process_wall_s']:>10} "
              f"{r['peak_rss_mib_before_load'] or '-':>15} {r['peak_rss_mib_loaded'] or '-':>13}  "
              f"{(r['error'] or '')[:90]}")
    if a.json_out:
        a.json_out.write_text(json.dumps({"checkpoint_bytes": size, "args": vars(a) | {"json_out": str(a.json_out),
                                          "keep": str(a.keep)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
