#!/usr/bin/env python3
"""Time ``verify``'s reference MoE on CPU, per layer: whole-layer against streamed.

It builds a full-width Qwen3-30B-A3B MoE layer (``synth.make_checkpoint(fast=True)``: 128 experts,
hidden K = 2048, moe_intermediate N = 768, group 128, top-8, GPTQ v1 with fp16 scales) and its
conversion, or takes both (``--source SRC --output OUT``), and runs
:func:`gptq2xpu.verify.numeric.numeric_layer` on one layer, on the CPU, ``--tokens`` tokens, in
float32 (the CPU default), with ``--threads`` torch threads:

  whole      ``streamed=False``: both sides dequantized as whole layers [E, 2N, K] + [E, K, N],
             two batched GEMMs per pass (the GPU path)
  streamed   ``streamed=True``: one expert at a time into reused buffers (the CPU default)

Each run is its own child process (so its peak RSS is its own), variants interleaved round-robin
over ``--reps`` after one untimed warm-up each, so drift on a shared machine hits both alike.
Reported per run, from inside the child, around the one ``numeric_layer`` call:

  compute_s  the reference MoE of both sides (dequant + routed + every-expert passes), as
             ``numeric_layer`` reports it (``compute_seconds``); ``load_s`` reading the packed
             tensors from disk (page cache warm after the warm-up)
  wall_s     the whole call; ``cpu_s`` (user + sys of every thread of the process) over it
  peak_rss   the process's peak RSS (``VmHWM``), and its RSS before the call
  other_cpu  CPU seconds every other process on the machine used meanwhile (``/proc/stat``): a
             busy, shared machine shows here, and then wall times mean little

and each variant's check result (``rel`` and ``every_expert_rel`` between the two sides).

``--accuracy`` (in this process, untimed) also measures how far each side of each variant is from
a float64 forward of the same weights (the exact products (q - 8) * scale, float64 GEMMs), on the
layer's own seeded tokens, routed and every-expert: the numbers TOLERANCES' rationale is about.

    python scripts/bench_reference.py --threads 16                 # the 16-core figure
    python scripts/bench_reference.py --threads 2 --reps 3 --json-out ref.json
    python scripts/bench_reference.py --experts 8 --hidden 256 --intermediate 128 --reps 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import busy_cpu_s  # noqa: E402  (scripts/ is on the path when this runs as a script)

VARIANTS = ("whole", "streamed")


def _status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of this process from ``/proc/self/status``, in MiB, or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    """This process's peak RSS. ``VmHWM`` where there is one: on Linux ``ru_maxrss`` survives
    ``exec``, so a child would report its parent's peak when that was larger."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ child


def child(args) -> dict:
    """One measured ``numeric_layer`` call, in this process."""
    import torch

    from gptq2xpu.contract import CONFIG_BLOCK, parse_block
    from gptq2xpu.read import open_source
    from gptq2xpu.read.checkpoint import open_checkpoint
    from gptq2xpu.verify.numeric import numeric_layer

    torch.set_num_threads(args.threads)
    with open_source(args.source) as src, open_checkpoint(args.output) as conv:
        block = parse_block(conv.config[CONFIG_BLOCK])
        prefixes = list(block.layers)
        prefix = prefixes[args.layer]
        rss0 = _status_mib("VmRSS")
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        row = numeric_layer(src, conv, prefix, block.layers[prefix], block, device=torch.device("cpu"),
                            dtype=torch.float32, tokens=args.tokens, seed=args.seed,
                            streamed=args.variant == "streamed")
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_s()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime
    return {
        "variant": args.variant,
        "threads": torch.get_num_threads(),
        "prefix": prefix,
        "wall_s": wall,
        "compute_s": row["compute_seconds"],
        "load_s": row["load_seconds"],
        "cpu_s": user + system,
        "user_s": user,
        "sys_s": system,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_mib": rss0,
        "other_cpu_s": None if busy0 is None else max(0.0, busy1 - busy0 - user - system),
        "ok": row["ok"],
        "rel": row["rel"],
        "every_expert_rel": row["every_expert_rel"],
        "experts_hit": row["experts_hit"],
    }


# ------------------------------------------------------------------------------ accuracy


def accuracy(args, src_path: Path, out_path: Path) -> dict:
    """rel (and 1 - cosine) of each variant's two sides against a float64 forward, in float32."""
    import torch

    from gptq2xpu.contract import CONFIG_BLOCK, parse_block
    from gptq2xpu.read import open_source
    from gptq2xpu.read.checkpoint import open_checkpoint
    from gptq2xpu.verify.experts import ConvertedExperts, SourceExperts
    from gptq2xpu.verify.numeric import (
        _source_offset_and_cast,
        converted_weights,
        dequant_source,
        layer_inputs,
        load_source,
    )
    from gptq2xpu.verify.reference import TOLERANCES, compare, moe_forward, moe_forward_streamed
    from gptq2xpu.verify.unpack import xpu_dequant

    torch.set_num_threads(args.threads)
    cpu, f32 = torch.device("cpu"), torch.float32
    with open_source(src_path) as src, open_checkpoint(out_path) as conv:
        block = parse_block(conv.config[CONFIG_BLOCK])
        prefix = list(block.layers)[args.layer]
        info = block.layers[prefix]
        x, x_cov, tw, tid = layer_inputs(src, conv, prefix, info, block, device=cpu, tokens=args.tokens, seed=args.seed)
        loaded = load_source(src, prefix, info, cpu)
        w13, s13, w2, s2 = converted_weights(conv, prefix, block, f32, cpu, raw=True)
    enc = block.nibble_encoding
    offset, cast = _source_offset_and_cast(info, block)
    e = x_cov.shape[0]
    ones, ids = torch.ones(e, 1), torch.arange(e).unsqueeze(1)

    def source(dtype, fast=None):
        return SourceExperts(loaded, dtype, zero_offset=offset, scale_cast=cast, fast=fast)

    def converted(dtype, fast=None):
        return ConvertedExperts(w13, s13, w2, s2, enc, dtype, fast=fast)

    # float64: the plain dequantizers (exact products), streamed so that no float64 layer exists
    exact = moe_forward_streamed(x, converted(torch.float64, fast=False), tw, tid, every=x_cov)
    exact_src = moe_forward_streamed(x, source(torch.float64, fast=False), tw, tid, every=x_cov)
    outs = {
        "streamed": {"source": moe_forward_streamed(x, source(f32), tw, tid, every=x_cov),
                     "converted": moe_forward_streamed(x, converted(f32), tw, tid, every=x_cov)},
    }
    sw13, sw2 = dequant_source(loaded, info, block, f32)
    whole_src = (moe_forward(x, sw13, sw2, tw, tid), moe_forward(x_cov, sw13, sw2, ones, ids))
    del sw13, sw2
    cw13, cw2 = xpu_dequant(w13, s13, enc, f32), xpu_dequant(w2, s2, enc, f32)
    whole_conv = (moe_forward(x, cw13, cw2, tw, tid), moe_forward(x_cov, cw13, cw2, ones, ids))
    del cw13, cw2
    outs["whole"] = {"source": whole_src, "converted": whole_conv}

    def stats(a, b):
        st = compare(a, b)
        return {"rel": st["rel"], "one_minus_cosine": 1 - st["cosine"]}

    result = {"tolerance": TOLERANCES["float32"],
              "exact_sides_rel": [stats(a, b)["rel"] for a, b in zip(exact_src, exact)], "variants": {}}
    for variant, sides in outs.items():
        row = {}
        for side, (routed, every) in sides.items():
            row[side] = {"routed": stats(routed, exact[0]), "every": stats(every, exact[1])}
        row["between_sides"] = {"routed": stats(sides["converted"][0], sides["source"][0]),
                                "every": stats(sides["converted"][1], sides["source"][1])}
        result["variants"][variant] = row
    return result


def print_accuracy(acc: dict) -> None:
    tol = acc["tolerance"]
    exact_routed, exact_every = acc["exact_sides_rel"]
    print(f"float32 against a float64 forward (rel; bound rel <= {tol['rel']:g}, 1 - cosine <= "
          f"{1 - tol['cosine']:.0e}); float64 source vs converted: rel {exact_routed:.2g} routed, "
          f"{exact_every:.2g} every")
    print(f"{'variant':<9} {'side':<14} {'routed rel':>11} {'every rel':>11} {'1-cos routed':>13} {'1-cos every':>12}")
    for variant, row in acc["variants"].items():
        for side, st in row.items():
            print(f"{variant:<9} {side:<14} {st['routed']['rel']:>11.3g} {st['every']['rel']:>11.3g} "
                  f"{st['routed']['one_minus_cosine']:>13.3g} {st['every']['one_minus_cosine']:>12.3g}")


# ------------------------------------------------------------------------------ parent


def build(workdir: Path, args) -> tuple[Path, Path]:
    from gptq2xpu.cli import main as cli_main
    from gptq2xpu.testing.synth import make_checkpoint

    src, out = workdir / "src", workdir / "out"
    make_checkpoint(src, family="qwen3_moe", hidden=args.hidden, moe_intermediate=args.intermediate,
                    num_experts=args.experts, top_k=args.top_k, group_size=args.group, num_layers=1,
                    attention=False, vocab=64, fast=True)
    try:
        cli_main(["convert", str(src), str(out), "-q"])
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"convert exited {exc.code}") from None
    return src, out


def run_child(args, variant: str, src: Path, out: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--variant", variant, "--source", str(src),
            "--output", str(out), "--threads", str(args.threads), "--tokens", str(args.tokens), "--seed",
            str(args.seed), "--layer", str(args.layer)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in runs)

    return {
        "reps": len(runs),
        "compute_median_s": med("compute_s"),
        "compute_s": [round(r["compute_s"], 3) for r in runs],
        "wall_median_s": med("wall_s"),
        "load_median_s": med("load_s"),
        "cpu_median_s": med("cpu_s"),
        "cpu_s": [round(r["cpu_s"], 2) for r in runs],
        "user_median_s": med("user_s"),
        "sys_median_s": med("sys_s"),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_before_mib": max(r["rss_before_mib"] or 0 for r in runs),
        "other_cpu_s": [None if r["other_cpu_s"] is None else round(r["other_cpu_s"], 1) for r in runs],
        "ok": all(r["ok"] for r in runs),
        "rel": runs[-1]["rel"],
        "every_expert_rel": runs[-1]["every_expert_rel"],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads in each run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, default=0, help="index of the MoE layer to check")
    p.add_argument("--source", type=Path, help="a GPTQ source (with --output: its conversion); default: build one")
    p.add_argument("--output", type=Path)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--workdir", type=Path, help="where to build the layer (default: a temporary folder)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--accuracy", action="store_true", help="also: each side's error against a float64 forward")
    p.add_argument("--no-timing", action="store_true", help="skip the timed runs (with --accuracy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.source is None) != (args.output is None):
        p.error("--source and --output go together")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or any(v not in VARIANTS for v in args.variant_list):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.threads < 1 or args.reps < 1 or args.warmups < 0:
        p.error("--threads and --reps must be >= 1, --warmups >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    tmp = None
    if args.source is None:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="bench_reference.", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        src, out = (args.source, args.output) if tmp is None else build(tmp, args)
        print(f"layer ready in {time.perf_counter() - t0:.1f} s: {src} -> {out}", flush=True)
        runs: dict[str, list[dict]] = {v: [] for v in args.variant_list}
        if args.no_timing:
            args.warmups = args.reps = 0
        for _ in range(args.warmups):
            for v in args.variant_list:
                r = run_child(args, v, src, out)
                print(f"  warm-up {v}: compute {r['compute_s']:.2f} s", flush=True)
        for i in range(args.reps):
            for v in args.variant_list:
                r = run_child(args, v, src, out)
                runs[v].append(r)
                other = "" if r["other_cpu_s"] is None else f", other processes {r['other_cpu_s']:.1f} CPU s"
                print(f"  rep {i + 1} {v:<8}: compute {r['compute_s']:.2f} s, wall {r['wall_s']:.2f} s, "
                      f"CPU {r['cpu_s']:.2f} s (user {r['user_s']:.2f} sys {r['sys_s']:.2f}), "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB{other}", flush=True)
        acc = accuracy(args, src, out) if args.accuracy else None  # after the timed runs: it holds whole layers
        if acc is not None:
            print_accuracy(acc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "config": {"threads": args.threads, "tokens": args.tokens, "experts": args.experts, "hidden": args.hidden,
                   "moe_intermediate": args.intermediate, "group": args.group, "top_k": args.top_k,
                   "dtype": "float32", "source": str(args.source) if args.source else "synth (fast)",
                   "reps": args.reps, "warmups": args.warmups},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "variants": {v: summarize(rs) for v, rs in runs.items() if rs},
        "accuracy": acc,
    }
    import torch

    result["host"]["torch"] = torch.__version__
    if result["variants"]:
        print(f"{'variant':<9} {'compute s':>10} {'wall s':>8} {'CPU s':>7} {'user':>6} {'sys':>6} {'peak RSS':>9} "
              f"{'rel':>9} {'every rel':>9}  ok")
    for v, s in result["variants"].items():
        print(f"{v:<9} {s['compute_median_s']:>10.2f} {s['wall_median_s']:>8.2f} {s['cpu_median_s']:>7.2f} "
              f"{s['user_median_s']:>6.2f} {s['sys_median_s']:>6.2f} {s['peak_rss_mib']:>7.0f} M "
              f"{s['rel']:>9.2g} {s['every_expert_rel']:>9.2g}  {s['ok']}")
    if {"whole", "streamed"} <= set(result["variants"]):
        w, s = result["variants"]["whole"], result["variants"]["streamed"]
        result["speedup"] = {"compute": w["compute_median_s"] / s["compute_median_s"],
                             "cpu": w["cpu_median_s"] / s["cpu_median_s"],
                             "peak_rss": w["peak_rss_mib"] / s["peak_rss_mib"]}
        print("streamed vs whole: compute {compute:.1f}x faster, CPU {cpu:.1f}x less, peak RSS {peak_rss:.1f}x less"
              .format(**result["speedup"]))
    if result["variants"]:
        print(f"({args.threads} threads, median of {args.reps}; per-run CPU used by other processes: "
              + "; ".join(f"{v} {s['other_cpu_s']}" for v, s in result["variants"].items()) + ")")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    ok = all(s["ok"] for s in result["variants"].values())
    if acc is not None:  # the two sides of each variant within the float32 bound of each other
        tol = acc["tolerance"]
        ok = ok and all(st["rel"] <= tol["rel"] and st["one_minus_cosine"] <= 1 - tol["cosine"]
                        for row in acc["variants"].values() for st in row["between_sides"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
