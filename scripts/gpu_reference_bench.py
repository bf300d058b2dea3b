#!/usr/bin/env python3
"""Time the verifier's reference path on one full-width Qwen3-30B-A3B-shaped MoE layer.

The layer is built in memory on the device (nothing is read from disk): 128 experts, hidden
K = 2048, moe_intermediate N = 768, group 128, random packed XPU uint8 weights
``w13 [E, 1536, 1024]`` and ``w2 [E, 2048, 384]``, fp16 scales, a ``[E, 2048]`` router. Per
layer, over ``--reps`` repetitions after ``--warmup`` untimed ones, it times:

  (a) h2d      host -> device copy of the packed bytes from pinned memory
  (b) dequant  xpu_dequant of w13 + w2 to the compute dtype (bf16 by default)
  (c) moe      route + moe_forward with ``--tokens`` tokens, top ``--top-k``
  (d) total    (a) + (b) + (c), end to end

Each stage ends with a device synchronize before the clock is read. The budget the verifier
aims at is dequant + moe <= 25 ms per layer on an H100.

    python scripts/gpu_reference_bench.py --device cuda
    python scripts/gpu_reference_bench.py --device cpu --experts 16 --reps 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gptq2xpu.verify.device import runtime_info, select_device, synchronize  # noqa: E402
from gptq2xpu.verify.reference import compare, moe_forward, route, within_tolerance  # noqa: E402
from gptq2xpu.verify.unpack import xpu_dequant  # noqa: E402

HIDDEN = 2048
INTER = 768
GROUP = 128
TARGET_MS = 25.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "xpu", "cpu"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--experts", type=int, default=128, help="shrink for a CPU smoke run")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one extra rep")
    p.add_argument(
        "--check",
        action="store_true",
        help="also check the device's results against the CPU: dequant bit for bit, the MoE output "
        "against a float32 CPU forward within TOLERANCES",
    )
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k must be in 1..{args.experts}")
    if args.tokens < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--tokens and --reps must be >= 1, --warmup >= 0")
    return args


def host_tensor(shape, dtype, pin: bool, gen: torch.Generator) -> torch.Tensor:
    """Random bytes / values on the host, pinned when the device can use pinned memory."""
    if dtype == torch.uint8:
        t = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    else:
        t = torch.randn(shape, generator=gen).to(dtype)
    if pin:
        try:
            return t.pin_memory()
        except RuntimeError:
            return t
    return t


def build_layer(device: torch.device, experts: int, tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pin = device.type != "cpu"
    host = {
        "w13": host_tensor((experts, 2 * INTER, HIDDEN // 2), torch.uint8, pin, gen),
        "w2": host_tensor((experts, HIDDEN, INTER // 2), torch.uint8, pin, gen),
    }
    dev = {name: torch.empty_like(t, device=device) for name, t in host.items()}
    s13 = (torch.rand(experts, 2 * INTER, HIDDEN // GROUP, generator=gen) * 0.02 + 0.002).half()
    s2 = (torch.rand(experts, HIDDEN, INTER // GROUP, generator=gen) * 0.02 + 0.002).half()
    router = torch.randn(experts, HIDDEN, generator=gen) / HIDDEN**0.5
    x = torch.randn(tokens, HIDDEN, generator=gen)
    return host, dev, s13.to(device), s2.to(device), router.to(device), x.to(device)


def run(args: argparse.Namespace) -> dict:
    device = select_device(args.device)
    dtype = DTYPES[args.dtype]
    host, dev, s13, s2, router, x = build_layer(device, args.experts, args.tokens, args.seed)
    x = x.to(dtype)

    def one_rep():
        t0 = time.perf_counter()
        for name in host:
            dev[name].copy_(host[name], non_blocking=True)
        synchronize(device)
        t1 = time.perf_counter()
        w13 = xpu_dequant(dev["w13"], s13, "u4b8", dtype)
        w2 = xpu_dequant(dev["w2"], s2, "u4b8", dtype)
        synchronize(device)
        t2 = time.perf_counter()
        topk_weights, topk_ids = route(x, router, args.top_k)
        out = moe_forward(x, w13, w2, topk_weights, topk_ids)
        synchronize(device)
        t3 = time.perf_counter()
        return (t1 - t0, t2 - t1, t3 - t2, t3 - t0), out

    for _ in range(args.warmup):
        one_rep()
    samples = []
    out = None
    for _ in range(args.reps):
        times, out = one_rep()
        samples.append(times)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            one_rep()
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=15), file=sys.stderr)
    if not bool(torch.isfinite(out).all()):
        raise SystemExit("moe_forward produced non-finite values")

    stages = ("h2d", "dequant", "moe", "total")
    timings = {}
    for i, stage in enumerate(stages):
        ms = [s[i] * 1e3 for s in samples]
        timings[stage] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "mean_ms": statistics.fmean(ms),
            "max_ms": max(ms),
        }
    dm = [(s[1] + s[2]) * 1e3 for s in samples]
    timings["dequant+moe"] = {
        "median_ms": statistics.median(dm),
        "min_ms": min(dm),
        "mean_ms": statistics.fmean(dm),
        "max_ms": max(dm),
    }
    packed_bytes = sum(t.numel() for t in host.values())
    check = cross_check(dtype, dev, s13, s2, router, x, args.top_k, out) if args.check else None
    return {
        "config": {
            "experts": args.experts,
            "hidden": HIDDEN,
            "moe_intermediate": INTER,
            "group": GROUP,
            "tokens": args.tokens,
            "top_k": args.top_k,
            "dtype": args.dtype,
            "reps": args.reps,
            "warmup": args.warmup,
            "packed_bytes": packed_bytes,
            "pinned": bool(host["w13"].is_pinned()),
        },
        "runtime": runtime_info(device),
        "timings": timings,
        "h2d_gb_per_s": packed_bytes / (timings["h2d"]["median_ms"] * 1e-3) / 1e9,
        "target_ms": TARGET_MS,
        "meets_target": timings["dequant+moe"]["median_ms"] <= TARGET_MS,
        "check": check,
    }


def cross_check(dtype, dev, s13, s2, router, x, top_k, out) -> dict:
    """The device's dequant must equal the CPU's bit for bit; its MoE output must be within the
    compute dtype's TOLERANCES of a float32 forward on the CPU over the same weights."""
    cpu = torch.device("cpu")
    w13_cpu, w2_cpu = dev["w13"].to(cpu), dev["w2"].to(cpu)
    s13_cpu, s2_cpu = s13.to(cpu), s2.to(cpu)
    experts = slice(0, min(4, w13_cpu.shape[0]))
    bitwise = torch.equal(
        xpu_dequant(dev["w13"][experts], s13[experts], "u4b8", dtype).to(cpu),
        xpu_dequant(w13_cpu[experts], s13_cpu[experts], "u4b8", dtype),
    ) and torch.equal(
        xpu_dequant(dev["w2"][experts], s2[experts], "u4b8", dtype).to(cpu),
        xpu_dequant(w2_cpu[experts], s2_cpu[experts], "u4b8", dtype),
    )
    tw, ti = route(x.to(cpu), router.to(cpu), top_k)
    ref = moe_forward(
        x.to(cpu).float(),
        xpu_dequant(w13_cpu, s13_cpu, "u4b8", torch.float32),
        xpu_dequant(w2_cpu, s2_cpu, "u4b8", torch.float32),
        tw,
        ti,
    )
    stats = compare(out, ref)
    return {
        "dequant_bitwise_equal_to_cpu": bool(bitwise),
        "moe_vs_cpu_fp32": stats,
        "moe_within_tolerance": within_tolerance(stats, dtype),
    }


def print_table(result: dict) -> None:
    cfg, rt = result["config"], result["runtime"]
    print(
        f"device {rt['device_type']} ({rt['device_name']}), torch {rt['torch']}; {cfg['experts']} experts, "
        f"K={cfg['hidden']} N={cfg['moe_intermediate']} g={cfg['group']}, {cfg['tokens']} tokens top-{cfg['top_k']}, "
        f"{cfg['dtype']}, {cfg['reps']} reps"
    )
    print(f"{'stage':<12} {'median ms':>10} {'min ms':>10} {'mean ms':>10} {'max ms':>10}")
    for stage, t in result["timings"].items():
        print(f"{stage:<12} {t['median_ms']:>10.2f} {t['min_ms']:>10.2f} {t['mean_ms']:>10.2f} {t['max_ms']:>10.2f}")
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(
        f"h2d {result['h2d_gb_per_s']:.1f} GB/s ({cfg['packed_bytes'] / 1e6:.0f} MB, pinned={cfg['pinned']}); "
        f"dequant+moe {verdict} the {result['target_ms']:.0f} ms/layer target (set for an H100)"
    )
    if result["check"]:
        c = result["check"]
        st = c["moe_vs_cpu_fp32"]
        print(
            f"check: dequant bitwise equal to CPU: {c['dequant_bitwise_equal_to_cpu']}; MoE vs CPU fp32 "
            f"rel {st['rel']:.3g} cosine {st['cosine']:.9f} max_abs {st['max_abs']:.3g} "
            f"-> {'within' if c['moe_within_tolerance'] else 'OUTSIDE'} tolerance"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
