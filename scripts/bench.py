#!/usr/bin/env python3
"""Benchmark ``gptq2xpu convert`` and ``verify`` against a plain copy, every target a ratio of one run.

It generates (``synth.make_checkpoint(fast=True)``, flat memory) a GPTQ MoE checkpoint with real
shapes -- by default Qwen3-30B-A3B: hidden 2048, moe_intermediate 768, 128 experts, top-8, group
128, attention and router tensors, ``--layers 4`` (about 1.2 GiB) -- or takes one (``--source``),
and then, in one run, with a warm page cache, measures each variant as its own subprocess:

  copy_cp          ``cp -r SRC DST`` (the reference of every "x cp" ratio)
  copy_copytree    ``python -c shutil.copytree(SRC, DST)``
  convert          ``python -m gptq2xpu convert SRC OUT -q`` (default ``--jobs``: the cores)
  naive            ``python scripts/naive_repack.py SRC OUT`` (load whole, torch.stack, transpose,
                   save_file whole); its four expert tensors of layer 0 must equal convert's
  verify           ``python -m gptq2xpu verify OUT`` (standalone: manifest hashes, layout)
  verify_source    ``python -m gptq2xpu verify OUT --source SRC --no-numeric`` (+ bit-exact part,
                   whose own seconds come from its JSON)
  verify_numeric   ``... --source SRC --layers 0 --device cpu`` (reference MoE on one layer;
                   ``--numeric-reps``, 0 skips it)
  verify_gpu       ``... --source SRC --device DEVICE`` over every layer (``--gpu DEVICE``)

``--jobs-sweep 1,2,4,8,16`` converts with each ``--jobs`` (interleaved) and checks every output
file's sha256 against the others and the default run's.  ``--scaling`` converts (and copies) a
second checkpoint of ``--scaling-layers`` (or ``--scaling-source``) interleaved with the main
one: peak RSS and time of the larger against the smaller (memory must not grow with the model).

Every variant gets ``--warmups`` untimed runs, then ``--reps`` timed runs, interleaved round-robin
so drift hits every variant alike; wall time is reported with its spread and beside user/sys CPU
(and the CPU other processes used meanwhile: on a shared machine, the noise).  Each run's output
is removed right after it (untimed), so only one output exists at a time (``--sync`` also calls
``sync`` before every run).  Peak RSS is that of the one measured process (GNU ``/usr/bin/time
-f %M``; ``os.wait4``'s ``ru_maxrss`` where it is missing).

Performance targets, each a ratio measured in this run; ``--targets 2core|16core`` (default: by
the core count) picks the limits:

  convert_vs_cp             2-core, 4 layers: <= 3.0;  16-core, 48 layers: <= 1.0
  bit_exact_vs_convert      <= 1.0 (the bit-exact part of verify --source against convert)
  verify_vs_cp              16-core: <= 1.0 (standalone verify)
  convert_peak_rss_mib      16-core: <= 400
  rss_large_vs_small        --scaling: <= 1.15 (e.g. 48 against 4 layers)
  verify_gpu_vs_convert     --gpu: <= 1.5 (the whole verify --source on the device)

    python scripts/bench.py --json-out bench.json                       # 4 layers, ~1.2 GiB
    python scripts/bench.py --scaling --scaling-layers 48 --jobs-sweep --json-out bench.json
    python scripts/bench.py --hidden 256 --intermediate 128 --experts 8 --layers 2 --reps 1  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptq2xpu.cli.options import parse_size  # noqa: E402

MIB = 1024 * 1024
EXPERT_TENSORS = ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales")
LIMITS = {
    "2core": {"convert_vs_cp": 3.0, "bit_exact_vs_convert": 1.0, "rss_large_vs_small": 1.15},
    "16core": {"convert_vs_cp": 1.0, "bit_exact_vs_convert": 1.0, "verify_vs_cp": 1.0, "convert_peak_rss_mib": 400,
               "rss_large_vs_small": 1.15, "verify_gpu_vs_convert": 1.5},
}


# ------------------------------------------------------------------------------ measuring


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


TIME = shutil.which("time", path="/usr/bin:/bin")


def busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used so far (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_measured(argv: list[str], log: Path) -> dict:
    """Run ``argv`` as one child process: wall time, that process's own peak RSS and CPU time.

    The RSS comes from GNU ``/usr/bin/time -f %M`` (a 2 MB process forks the command, so the
    number is the command's own).  Without it, ``os.wait4``'s ``ru_maxrss`` of the child is used,
    which on Linux also counts the RSS this (larger) process had when the child was forked.
    """
    rfile = log.with_suffix(".rusage")
    cmd = [TIME, "-f", "%M %U %S", "-o", str(rfile)] + list(argv) if TIME else list(argv)
    err = log.with_suffix(".err")
    with open(log, "wb") as fh, open(err, "wb") as eh:
        busy0 = busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=eh, env=_env(), cwd=REPO)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy1 = busy_cpu_s()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (log.read_text(errors="replace")[-1500:] + err.read_text(errors="replace")[-1500:])
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{tail}")
    if TIME:
        kb, user, system = rfile.read_text().split()[-3:]
        rfile.unlink()
        r = {"wall": wall, "rss_mib": int(kb) * 1024 / MIB, "user": float(user), "sys": float(system)}
    else:
        r = {"wall": wall, "rss_mib": ru.ru_maxrss * 1024 / MIB, "user": ru.ru_utime, "sys": ru.ru_stime}
    r["cpu"] = r["user"] + r["sys"]
    # CPU other processes used meanwhile (kernel writeback included): > 0.1 s means a busy machine
    r["other_cpu"] = max(0.0, busy1 - busy0 - r["cpu"]) if busy0 is not None and busy1 is not None else None
    return r


def _sync() -> None:
    if hasattr(os, "sync"):
        os.sync()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Variant:
    """A command writing into ``out`` or reading only (``out`` None).

    ``out`` is removed right after each run (untimed), so at most one output exists at a time:
    no run is throttled by another's dirty pages, and the pages the removal frees are what the
    next run writes into.  With ``keep`` the output of the last run stays (verify reads it).
    """

    def __init__(self, name: str, argv: list[str], out: Path | None, what: str, reps: int | None = None,
                 warmup: bool = True, json_stdout: bool = False, keep: bool = False, digest: bool = False):
        self.name, self.argv, self.out, self.what = name, argv, out, what
        self.reps, self.warmup, self.json_stdout, self.keep = reps, warmup, json_stdout, keep
        self.digest = digest  # sha256 of every output file after each run (untimed), then removed
        self.digests: list[dict[str, str]] = []
        self.runs: list[dict] = []
        self.last_json: dict | None = None

    def run(self, logdir: Path, sync: bool, last: bool = False) -> dict:
        if self.out is not None:
            _remove(self.out)
        if sync:
            _sync()
        log = logdir / f"{self.name}.log"
        r = run_measured(self.argv, log)
        if self.json_stdout:
            self.last_json = json.loads(log.read_text())
            r["json"] = self.last_json
        if self.digest and self.out is not None:
            self.digests.append(sha256_tree(self.out))
        if self.out is not None and not (self.keep and last):
            _remove(self.out)
        return r

    def summary(self) -> dict:
        walls = [r["wall"] for r in self.runs]
        return {
            "what": self.what,
            "reps": len(walls),
            "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "walls_s": [round(w, 4) for w in walls],
            "peak_rss_mib": max(r["rss_mib"] for r in self.runs),
            "cpu_median_s": statistics.median(r["cpu"] for r in self.runs),
            "user_cpu_median_s": statistics.median(r["user"] for r in self.runs),
            "sys_cpu_median_s": statistics.median(r["sys"] for r in self.runs),
            "other_cpu_s": [None if r["other_cpu"] is None else round(r["other_cpu"], 2) for r in self.runs],
            "other_cpu_median_s": (statistics.median(r["other_cpu"] for r in self.runs)
                                   if all(r["other_cpu"] is not None for r in self.runs) else None),
        }


def measure(variants: list[Variant], reps: int, logdir: Path, say, sync: bool = False,
            warmups: int = 1) -> dict[str, dict]:
    """``warmups`` untimed runs of each variant, then ``reps`` timed runs, round-robin."""
    for _ in range(warmups):
        for v in variants:
            if v.warmup:
                say(f"  warm-up {v.name}")
                v.run(logdir, sync)
    rounds = max([reps] + [v.reps for v in variants if v.reps is not None])
    for i in range(rounds):
        for v in variants:
            n = v.reps if v.reps is not None else reps
            if i < n:
                r = v.run(logdir, sync, last=i == n - 1)
                v.runs.append(r)
                other = f", others {r['other_cpu']:.2f} s" if r["other_cpu"] is not None else ""
                say(f"  rep {i + 1} {v.name}: {r['wall']:.3f} s, {r['rss_mib']:.0f} MiB, CPU {r['cpu']:.2f} s{other}")
    return {v.name: v.summary() for v in variants if v.runs}


# ------------------------------------------------------------------------------ checkpoints


def make_source(path: Path, args, layers: int) -> dict:
    """Generate a Qwen3-30B-A3B-shaped checkpoint of ``layers`` layers at ``path``."""
    from gptq2xpu.testing.synth import make_checkpoint

    t0 = time.perf_counter()
    info = make_checkpoint(path, family="qwen3_moe", hidden=args.hidden, moe_intermediate=args.intermediate,
                           num_experts=args.experts, top_k=args.top_k, num_layers=layers, group_size=args.group,
                           fast=True, shard_size=args.shard_size)
    return {"path": str(path), "layers": layers, "generated_s": round(time.perf_counter() - t0, 2),
            "files": len(info.files)}


def _timings(r: dict) -> dict:
    return {k: r[k] for k in ("wall_median_s", "wall_min_s", "wall_max_s", "walls_s", "peak_rss_mib", "cpu_median_s",
                              "user_cpu_median_s", "sys_cpu_median_s")}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    """Read every file once so the page cache holds the source."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as fh:
                while fh.read(16 << 20):
                    pass


def sha256_tree(path: Path) -> dict[str, str]:
    """sha256 of every file below ``path`` (files hashed in parallel)."""
    files = sorted(p for p in path.rglob("*") if p.is_file())

    def one(p: Path) -> str:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as fh:
            while True:
                b = fh.read(16 << 20)
                if not b:
                    break
                h.update(b)
        return h.hexdigest()

    with ThreadPoolExecutor(min(8, max(1, len(files)))) as pool:
        return {p.relative_to(path).as_posix(): d for p, d in zip(files, pool.map(one, files))}


def compare_naive(naive_out: Path, conv_out: Path) -> dict:
    """The four expert tensors of the first converted layer: naive bytes == gptq2xpu bytes."""
    import numpy as np
    from safetensors import safe_open

    block = json.loads((conv_out / "config.json").read_text())["gptq2xpu"]
    prefix = next(iter(block["layers"]))
    index = json.loads((conv_out / "model.safetensors.index.json").read_text())["weight_map"]
    result = {"layer": prefix, "tensors": {}}
    with safe_open(str(naive_out / "model.safetensors"), "np") as a:
        for what in EXPERT_TENSORS:
            name = f"{prefix}.experts.{what}"
            with safe_open(str(conv_out / index[name]), "np") as b:
                x, y = a.get_tensor(name), b.get_tensor(name)
            result["tensors"][what] = bool(x.shape == y.shape and np.array_equal(x.reshape(-1).view(np.uint8),
                                                                                  y.reshape(-1).view(np.uint8)))
            del x, y
    result["equal"] = all(result["tensors"].values())
    return result


# ------------------------------------------------------------------------------ reporting


def _ratio_cell(r: dict, ref: float | None) -> str:
    return f"{r['wall_median_s'] / ref:.2f}" if ref else "-"


def table(rows: dict[str, dict], cp_wall: float | None) -> str:
    head = (f"{'variant':<18} {'wall med s':>10} {'min..max s':>15} {'usr/sys s':>11} {'others s':>8} "
            f"{'peak RSS MiB':>13} {'x cp':>6}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        us = f"{r['user_cpu_median_s']:.2f}/{r['sys_cpu_median_s']:.2f}"
        spread = f"{r['wall_min_s']:.3f}..{r['wall_max_s']:.3f}"
        others = f"{r['other_cpu_median_s']:.2f}" if r.get("other_cpu_median_s") is not None else "-"
        lines.append(f"{name:<18} {r['wall_median_s']:>10.3f} {spread:>15} {us:>11} {others:>8} "
                     f"{r['peak_rss_mib']:>13.1f} {_ratio_cell(r, cp_wall):>6}")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The results as README-ready Markdown: variants, jobs sweep, scaling, targets."""
    cp = report["headline"]["cp_wall_s"]
    out = ["| variant | wall median (min..max) | user / sys CPU | peak RSS | x `cp -r` |", "|---|---|---|---|---|"]
    for r in report["variants"].values():
        out.append(f"| {r['what']} | {r['wall_median_s']:.3f} s ({r['wall_min_s']:.3f}..{r['wall_max_s']:.3f}) | "
                   f"{r['user_cpu_median_s']:.2f} / {r['sys_cpu_median_s']:.2f} s | {r['peak_rss_mib']:.0f} MiB | "
                   f"{_ratio_cell(r, cp)} |")
    js = report.get("jobs_sweep")
    if js:
        out += ["", "| `--jobs` | convert wall median (min..max) | user / sys CPU | peak RSS | x `cp -r` | speed-up |",
                "|---|---|---|---|---|---|"]
        base = None
        for name, r in js["runs"].items():
            base = base or r["wall_median_s"]
            out.append(f"| {name.removeprefix('convert_jobs')} | {r['wall_median_s']:.3f} s ({r['wall_min_s']:.3f}.."
                       f"{r['wall_max_s']:.3f}) | {r['user_cpu_median_s']:.2f} / {r['sys_cpu_median_s']:.2f} s | "
                       f"{r['peak_rss_mib']:.0f} MiB | {_ratio_cell(r, cp)} | {base / r['wall_median_s']:.2f} |")
        out.append(f"\nOutputs byte-identical for every `--jobs`: {js['identical']}.")
    sc = report.get("scaling")
    if sc:
        out += ["", "| checkpoint | size | convert wall median (min..max) | `cp -r` | x `cp -r` | peak RSS |",
                "|---|---|---|---|---|---|"]
        for d in (sc["small"], sc["large"]):
            out.append(f"| {d['layers']} layers | {d['bytes'] / 2**30:.2f} GiB | {d['wall_median_s']:.3f} s "
                       f"({d['wall_min_s']:.3f}..{d['wall_max_s']:.3f}) | {d['copy_wall_median_s']:.3f} s | "
                       f"{d['ratio_vs_copy']:.2f} | {d['peak_rss_mib']:.0f} MiB |")
    out += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for name, t in report["targets"].items():
        out.append(f"| {name} | {t['value']:.3g} | {t['limit']} | {'yes' if t['ok'] else '**no**'} |")
    return "\n".join(out)


def targets(report: dict, profile: str) -> dict:
    """The performance targets, each a value of this run against the limit of ``profile``."""
    limits = LIMITS[profile]
    h = report["headline"]
    values = {"convert_vs_cp": h["convert_vs_cp"], "bit_exact_vs_convert": h.get("bit_exact_vs_convert"),
              "verify_vs_cp": h.get("verify_vs_cp"), "convert_peak_rss_mib": h["convert_peak_rss_mib"],
              "verify_gpu_vs_convert": h.get("verify_gpu_vs_convert")}
    sc = report.get("scaling")
    if sc:
        values["rss_large_vs_small"] = sc["rss_ratio"]
    t = {}
    for name, value in values.items():
        if value is None:
            continue
        limit = limits.get(name)
        t[name] = {"value": value, "limit": f"<= {limit}" if limit is not None else "(reported)",
                   "ok": bool(limit is None or value <= limit)}
    if "naive_vs_convert" in h:
        t["naive_vs_convert"] = {"value": h["naive_vs_convert"], "limit": "(reported)", "ok": True}
    js = report.get("jobs_sweep")
    if js:
        t["jobs_outputs_identical"] = {"value": 1.0 if js["identical"] else 0.0, "limit": "== 1", "ok": js["identical"]}
    return t


# ------------------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path,
                    help="scratch folder (default: a new temp dir under /tmp, removed at the end)")
    ap.add_argument("--source", type=Path, help="benchmark this existing checkpoint instead of generating one")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shard-size", default="4GB", help="source shard size (e.g. 4GB, 500MB)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmups", type=int, default=1, help="untimed runs of each variant before the timed ones")
    ap.add_argument("--jobs", type=int, help="--jobs for convert (default: gptq2xpu's default, the cores available)")
    ap.add_argument("--numeric-reps", type=int, default=1,
                    help="runs of verify with the reference MoE on layer 0 (0: skip)")
    ap.add_argument("--gpu", metavar="DEVICE", help="also time the whole verify --source --device DEVICE (e.g. cuda)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive pipeline")
    ap.add_argument("--no-verify", action="store_true", help="skip the verify variants")
    ap.add_argument("--scaling", action="store_true", help="also convert a --scaling-layers checkpoint: RSS and time")
    ap.add_argument("--scaling-layers", type=int, default=12)
    ap.add_argument("--scaling-source", type=Path, help="the second checkpoint for --scaling, instead of generating it")
    ap.add_argument("--jobs-sweep", nargs="?", const="auto", metavar="LIST",
                    help="convert with each --jobs of LIST (e.g. 1,2,4,8,16; default: powers of 2 up to the cores)")
    ap.add_argument("--sweep-reps", type=int, help="timed runs per --jobs value (default: --reps)")
    ap.add_argument("--targets", choices=sorted(LIMITS), help="whose limits to apply (default: 16core with >= 16 "
                    "cores, else 2core)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--markdown-out", type=Path, help="write the README-ready tables here too")
    ap.add_argument("--sync", action="store_true", help="call sync before every run (untimed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.shard_size = parse_size(args.shard_size)
    say = (lambda *_: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    profile = args.targets or ("16core" if cpus >= 16 else "2core")
    sweep = _sweep_list(args.jobs_sweep, cpus)

    own_workdir = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="gptq2xpu-bench-", dir="/tmp")) if own_workdir else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []

    def scratch(name: str) -> Path:
        p = work / name
        if p.exists():
            raise SystemExit(f"bench: {p} already exists; use an empty --workdir")
        created.append(p)
        return p

    py = sys.executable
    gx = [py, "-m", "gptq2xpu"]
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    report: dict = {
        "machine": {"cpus": cpus, "python": platform.python_version(), "platform": platform.platform(),
                    "rss_from": "/usr/bin/time %M" if TIME else "os.wait4 ru_maxrss"},
        "shape": {"hidden": args.hidden, "moe_intermediate": args.intermediate, "experts": args.experts,
                  "top_k": args.top_k, "group": args.group, "layers": args.layers, "shard_size": args.shard_size},
        "reps": args.reps,
        "warmups": args.warmups,
        "targets_profile": profile,
    }
    logdir = scratch("logs")
    logdir.mkdir()
    try:
        # ---------------------------------------------------------------- the checkpoint
        if args.source:
            src = args.source
            report["source"] = {"path": str(src), "given": True, "layers": _layers_of(src)}
        else:
            src = scratch("src")
            say(f"generating a {args.layers}-layer checkpoint in {src}")
            report["source"] = make_source(src, args, args.layers)
        report["source"]["bytes"] = folder_bytes(src)
        say(f"source: {report['source']['bytes'] / 2**30:.2f} GiB")
        warm(src)

        out = scratch("out")
        variants = [
            Variant("copy_cp", ["cp", "-r", str(src), str(scratch("copy_cp"))], work / "copy_cp", "`cp -r SRC DST`"),
            Variant("copy_copytree", [py, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                                      str(src), str(scratch("copy_tree"))], work / "copy_tree", "`shutil.copytree`"),
            Variant("convert", gx + ["convert", str(src), str(out), "-q"] + jobs, out,
                    "**`gptq2xpu convert`**" + (f" `--jobs {args.jobs}`" if args.jobs else ""), keep=True),
        ]
        if not args.no_naive:
            variants.append(Variant("naive", [py, str(REPO / "scripts" / "naive_repack.py"), str(src),
                                              str(scratch("naive"))], work / "naive",
                                    "naive pipeline (load whole, torch.stack + transpose, save whole)", keep=True))
        measured = measure(variants, args.reps, logdir, say, args.sync, args.warmups)
        checks: dict = {}
        if not args.no_naive:
            checks["naive_equals_convert"] = compare_naive(work / "naive", out)
            _remove(work / "naive")
            if not checks["naive_equals_convert"]["equal"]:
                raise RuntimeError(f"naive and gptq2xpu expert tensors differ: {checks['naive_equals_convert']}")

        # verify reads the last convert output, which stays in place from here on
        if not args.no_verify:
            ver = [
                Variant("verify", gx + ["verify", str(out), "--json"], None, "`gptq2xpu verify OUT` (standalone)",
                        json_stdout=True),
                Variant("verify_source", gx + ["verify", str(out), "--source", str(src), "--no-numeric", "--json"],
                        None, "`gptq2xpu verify OUT --source SRC --no-numeric`", json_stdout=True),
            ]
            if args.numeric_reps > 0:
                ver.append(Variant("verify_numeric", gx + ["verify", str(out), "--source", str(src), "--layers", "0",
                                                           "--device", "cpu", "--json"], None,
                                   "`gptq2xpu verify OUT --source SRC --layers 0 --device cpu`",
                                   reps=args.numeric_reps, warmup=False, json_stdout=True))
            if args.gpu:
                ver.append(Variant("verify_gpu", gx + ["verify", str(out), "--source", str(src), "--device", args.gpu,
                                                       "--json"], None,
                                   f"`gptq2xpu verify OUT --source SRC --device {args.gpu}` (every layer)",
                                   json_stdout=True))
            say("verify")
            measured.update(measure(ver, args.reps, logdir, say, args.sync, args.warmups))
            for v in ver:
                doc = v.last_json or {}
                if doc.get("status") != "ok":  # the --json contract: ok, fail or error
                    raise RuntimeError(f"{v.name}: status {doc.get('status')}: {doc.get('failures')}")
                extra = measured[v.name]
                if "bit_exact_seconds" in doc:
                    extra["bit_exact_seconds_last"] = doc["bit_exact_seconds"]
                    extra["bit_exact_seconds_median"] = statistics.median(
                        r["json"]["bit_exact_seconds"] for r in v.runs if "json" in r)
                if doc.get("numeric_seconds") is not None:
                    extra["numeric_seconds_median"] = statistics.median(
                        r["json"]["numeric_seconds"] for r in v.runs
                        if r.get("json", {}).get("numeric_seconds") is not None)
                if doc.get("layers"):
                    extra["numeric_layer_seconds"] = [r["seconds"] for r in doc["layers"]]
                    extra["numeric_seconds"] = doc.get("numeric_seconds")
                    extra["cpu_s_per_layer"] = extra["cpu_median_s"] / len(doc["layers"])  # whole process, upper bound

        cp_wall = measured["copy_cp"]["wall_median_s"]
        copy_wall = min(measured[n]["wall_median_s"] for n in ("copy_cp", "copy_copytree"))
        for r in measured.values():
            r["ratio_vs_cp"] = r["wall_median_s"] / cp_wall
            r["ratio_vs_copy"] = r["wall_median_s"] / copy_wall
        report["variants"] = measured
        report["checks"] = checks
        conv = measured["convert"]
        headline = {
            "cp_wall_s": cp_wall,
            "copy_wall_s": copy_wall,
            "copy_variant": min(("copy_cp", "copy_copytree"), key=lambda n: measured[n]["wall_median_s"]),
            "convert_vs_cp": conv["wall_median_s"] / cp_wall,
            "convert_vs_copy": conv["wall_median_s"] / copy_wall,
            "convert_peak_rss_mib": conv["peak_rss_mib"],
        }
        if "verify" in measured:
            headline["verify_vs_cp"] = measured["verify"]["wall_median_s"] / cp_wall
            vs = measured["verify_source"]
            headline["verify_source_vs_convert"] = vs["wall_median_s"] / conv["wall_median_s"]
            headline["bit_exact_vs_convert"] = vs["bit_exact_seconds_median"] / conv["wall_median_s"]
        if "verify_gpu" in measured:
            headline["verify_gpu_vs_convert"] = measured["verify_gpu"]["wall_median_s"] / conv["wall_median_s"]
        if "naive" in measured:
            headline["naive_vs_convert"] = measured["naive"]["wall_median_s"] / conv["wall_median_s"]
        report["headline"] = headline

        # ---------------------------------------------------------------- jobs sweep
        if sweep:
            say(f"jobs sweep: {sweep}")
            outs = {j: scratch(f"out_jobs{j}") for j in sweep}
            # each output is hashed (untimed) and removed after its run: one at a time on disk
            runs = [Variant(f"convert_jobs{j}", gx + ["convert", str(src), str(o), "-q", "--jobs", str(j)], o,
                            f"gptq2xpu convert --jobs {j}", digest=True) for j, o in outs.items()]
            res = measure(runs, args.sweep_reps or args.reps, logdir, say, args.sync, args.warmups)
            for r in res.values():
                r["ratio_vs_cp"] = r["wall_median_s"] / cp_wall
            digests = [d for v in runs for d in v.digests]
            first = digests[0]
            report["jobs_sweep"] = {
                "jobs": sweep,
                "runs": res,
                "sha256": first,
                "identical": all(d == first for d in digests),
                "identical_to_default_run": first == sha256_tree(out),
            }
            for o in outs.values():
                _remove(o)
            if not (report["jobs_sweep"]["identical"] and report["jobs_sweep"]["identical_to_default_run"]):
                raise RuntimeError(f"outputs differ between --jobs values {sweep}")

        # ---------------------------------------------------------------- scaling
        if args.scaling:
            if args.scaling_source:
                big = args.scaling_source
                info = {"path": str(big), "given": True, "layers": _layers_of(big)}
            else:
                big = scratch(f"src{args.scaling_layers}")
                say(f"scaling: generating a {args.scaling_layers}-layer checkpoint")
                info = make_source(big, args, args.scaling_layers)
            info["bytes"] = folder_bytes(big)
            warm(big)
            warm(src)
            # both sizes again, interleaved, each with its own plain copy: the kernel's cost of
            # taking GBs of fresh page cache grows with size for cp as much as for convert
            outs = {n: scratch(f"scaling_{n}") for n in ("convert_main", "copy_main", "convert_other", "copy_other")}
            sv = [
                Variant("convert_main", gx + ["convert", str(src), str(outs["convert_main"]), "-q"] + jobs,
                        outs["convert_main"], "gptq2xpu convert, main checkpoint"),
                Variant("copy_main", ["cp", "-r", str(src), str(outs["copy_main"])], outs["copy_main"],
                        "cp -r, main checkpoint"),
                Variant("convert_other", gx + ["convert", str(big), str(outs["convert_other"]), "-q"] + jobs,
                        outs["convert_other"], "gptq2xpu convert, scaling checkpoint"),
                Variant("copy_other", ["cp", "-r", str(big), str(outs["copy_other"])], outs["copy_other"],
                        "cp -r, scaling checkpoint"),
            ]
            res = measure(sv, args.reps, logdir, say, args.sync, args.warmups)
            main_d = {"layers": report["source"].get("layers"), "bytes": report["source"]["bytes"],
                      **_timings(res["convert_main"]), "copy_wall_median_s": res["copy_main"]["wall_median_s"]}
            other_d = {"layers": info.get("layers"), "bytes": info["bytes"], **_timings(res["convert_other"]),
                       "copy_wall_median_s": res["copy_other"]["wall_median_s"]}
            small, large = sorted((main_d, other_d), key=lambda d: d["bytes"])
            for d in (small, large):
                d["ratio_vs_copy"] = d["wall_median_s"] / d["copy_wall_median_s"]
            sc = {"runs": res, "small": small, "large": large,
                  "rss_ratio": large["peak_rss_mib"] / small["peak_rss_mib"],
                  "bytes_ratio": large["bytes"] / small["bytes"],
                  "time_ratio": large["wall_median_s"] / small["wall_median_s"],
                  "copy_time_ratio": large["copy_wall_median_s"] / small["copy_wall_median_s"],
                  # the converter's own work, without the kernel's page-cache costs
                  "user_cpu_ratio": large["user_cpu_median_s"] / small["user_cpu_median_s"]}
            if small["layers"] and large["layers"] and large["layers"] != small["layers"]:
                for d in (small, large):
                    d["s_per_layer"] = d["wall_median_s"] / d["layers"]
                sc["marginal_s_per_layer"] = ((large["wall_median_s"] - small["wall_median_s"])
                                              / (large["layers"] - small["layers"]))
            report["scaling"] = sc
            if not args.scaling_source:
                _remove(big)

        report["targets"] = targets(report, profile)
    finally:
        if not args.keep:
            for p in created:
                _remove(p)
            if own_workdir:
                shutil.rmtree(work, ignore_errors=True)

    h = report["headline"]
    print(table(report["variants"], h["cp_wall_s"]))
    print(f"\nsource {report['source']['bytes'] / 2**30:.2f} GiB; cp -r {h['cp_wall_s']:.3f} s; "
          f"convert = {h['convert_vs_cp']:.2f} x cp, peak RSS {h['convert_peak_rss_mib']:.0f} MiB"
          + (f"; naive = {h['naive_vs_convert']:.1f} x convert" if "naive_vs_convert" in h else "")
          + (f"; verify = {h['verify_vs_cp']:.2f} x cp; verify --source --no-numeric = "
             f"{h['verify_source_vs_convert']:.2f} x convert (its bit-exact part {h['bit_exact_vs_convert']:.2f} x)"
             if "verify_vs_cp" in h else "")
          + (f"; verify on {args.gpu} = {h['verify_gpu_vs_convert']:.2f} x convert"
             if "verify_gpu_vs_convert" in h else ""))
    vn = report["variants"].get("verify_numeric")
    if vn:
        print(f"reference MoE on CPU: {vn['numeric_layer_seconds']} s per layer "
              f"(process CPU {vn['cpu_median_s']:.1f} s)")
    if "jobs_sweep" in report:
        js = report["jobs_sweep"]
        print("jobs sweep: " + ", ".join(f"{k.removeprefix('convert_')} {v['wall_median_s']:.3f} s "
                                         f"({v['ratio_vs_cp']:.2f} x cp)" for k, v in js["runs"].items())
              + f"; outputs identical: {js['identical']}")
    if "scaling" in report:
        sc = report["scaling"]
        for d in (sc["small"], sc["large"]):
            print(f"scaling: {d['layers']} layers, {d['bytes'] / 2**30:.2f} GiB: convert {d['wall_median_s']:.3f} s"
                  + (f" ({d['s_per_layer']:.3f} s/layer)" if "s_per_layer" in d else "")
                  + f", cp {d['copy_wall_median_s']:.3f} s, ratio {d['ratio_vs_copy']:.2f}, "
                    f"peak RSS {d['peak_rss_mib']:.0f} MiB")
        print(f"scaling: size x{sc['bytes_ratio']:.2f}: convert time x{sc['time_ratio']:.2f} "
              f"(user CPU x{sc['user_cpu_ratio']:.2f}), cp time x{sc['copy_time_ratio']:.2f}; "
              f"RSS x{sc['rss_ratio']:.2f}")
    print(f"targets ({profile}): " + ", ".join(f"{k} {'ok' if v['ok'] else 'MISSED'} ({v['value']:.3g} vs {v['limit']})"
                                              for k, v in report["targets"].items()))
    md = markdown(report)
    report["markdown"] = md
    print("\n" + md)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(md + "\n")
    return 0


def _sweep_list(spec: str | None, cpus: int) -> list[int]:
    if not spec:
        return []
    if spec == "auto":
        out, j = [], 1
        while j <= cpus:
            out.append(j)
            j *= 2
        return out if len(out) > 1 else [1, 2]
    try:
        out = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"bench: --jobs-sweep {spec!r}: a comma-separated list of integers") from None
    if not out or out[0] < 1:
        raise SystemExit(f"bench: --jobs-sweep {spec!r}: jobs must be >= 1")
    return out


def _layers_of(path: Path) -> int | None:
    """The number of MoE layers of a checkpoint, from its config (for labels only)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("num_hidden_layers") or (cfg.get("text_config") or {}).get("num_hidden_layers")


if __name__ == "__main__":
    sys.exit(main())
