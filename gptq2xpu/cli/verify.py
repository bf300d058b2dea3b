"""``gptq2xpu verify``: prove converted shards right."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import VerificationError
from ..optional_torch import require_torch
from ..verify import MAX_SEED, MAX_TOKENS
from .options import (
    BACKENDS,
    COMPUTE_DTYPES,
    MAX_JOBS,
    OUTPUT_ARG,
    SOURCE_OPT,
    DeviceOpt,
    RevisionOpt,
    TokenOpt,
    choice,
    given,
    nonempty,
    unused_token,
)
from .output import session_output

EXAMPLES = [
    "gptq2xpu verify ./qwen3-xpu",
    "gptq2xpu verify ./qwen3-xpu --source Qwen/Qwen3-30B-A3B-GPTQ-Int4",
    "gptq2xpu verify ./qwen3-xpu --source ./Qwen3-30B-A3B-GPTQ-Int4 --device xpu --layers sample:8",
    "gptq2xpu verify ./qwen3-xpu --json > verify-report.json",
]

#: options that only the checks against --source use: parameter -> option
_NEED_SOURCE = {"revision": "--revision", "token": "--token", "device": "--device", "dtype": "--dtype",
                "backend": "--backend", "layers": "--layers", "tokens": "--tokens", "seed": "--seed",
                "numeric": "--numeric", "exhaustive": "--exhaustive"}


def render_report(console, data: dict) -> None:
    for c in data["checks"]:
        mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
        console.print(f"{mark} {c['check']}: {c['detail']}")
    if data.get("layers"):
        t = Table(box=None, header_style="bold")
        for col in ("layer", "tokens", "experts hit", "max abs", "rel", "cosine", "every expert rel", "kernel", "s",
                    "ok"):
            t.add_column(col)
        for r in data["layers"]:
            k = r.get("kernel")
            t.add_row(r["prefix"], str(r.get("tokens", "")), str(r.get("experts_hit", "")), f"{r['max_abs']:.3g}",
                      f"{r['rel']:.3g}", f"{r['cosine']:.7f}", f"{r.get('every_expert_rel', float('nan')):.3g}",
                      ("ok" if k["ok"] else "FAIL") if k else "-", str(r.get("seconds", "")),
                      "[green]ok[/]" if r["ok"] else f"[red]FAIL[/] {r.get('error', '')}")
        console.print(t)
    if data.get("backend"):
        dev = data.get("device", {})
        console.print(f"device {dev.get('device_type')} ({dev.get('device_name')}), dtype {data.get('dtype')}; "
                      f"{data['backend']['detail']}")
    status = "[green]PASS[/]" if data["status"] == "pass" else "[red]FAIL[/]"
    console.print(f"{status} {data['output']} in {data['seconds']} s")


def verify(
    ctx: typer.Context,
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="A converted checkpoint folder (the one holding "
                                           "config.json and gptq2xpu-manifest.json).", parser=OUTPUT_ARG)],
    source: Annotated[str | None, typer.Option("--source", metavar="SOURCE", help="The GPTQ checkpoint OUTPUT was "
                                               "made from (folder or repo id): adds bit-exact and numerical "
                                               "checks.", parser=SOURCE_OPT)] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, choice("--dtype", COMPUTE_DTYPES, help="Compute dtype (auto: bfloat16 on a GPU, float32 "
                                 "on cpu).")] = "auto",
    backend: Annotated[str, choice("--backend", BACKENDS, help="auto also runs vllm_xpu_kernels on an xpu when it "
                                   "imports; xpu-kernels insists on it.")] = "auto",
    layers: Annotated[str | None, typer.Option(
        "--layers", metavar="SPEC", parser=nonempty("--layers", "leave it out for all layers, or give indices, "
                                                        "ranges such as 0,5,10-12, or sample:N"),
        help="Layers for the numerical check: all (default), indices and ranges such as 0,5,10-12, or "
             "sample:N.")] = None,
    tokens: Annotated[int, typer.Option(
        "--tokens", metavar="N", min=1, max=MAX_TOKENS, help="Seeded tokens per layer for the reference MoE.")] = 64,
    seed: Annotated[int, typer.Option("--seed", metavar="N", min=0, max=MAX_SEED, help="Seed of the token batch.")] = 0,
    numeric: Annotated[bool, typer.Option("--numeric/--no-numeric", help="Run the reference MoE (with "
                                          "--source).")] = True,
    exhaustive: Annotated[bool, typer.Option("--exhaustive", help="Decode every expert nibble by nibble, not a "
                                             "sample (bytes are always compared in full).")] = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", metavar="N", min=1, max=MAX_JOBS, help="Threads for "
                                             "hashing and the bit-exact checks (default: the cores "
                                             "available).")] = None,
):
    """Check a converted checkpoint: manifest, index, layout contract, config block; with --source,
    bit for bit and through a reference int4 MoE.

    Exit 0 only when everything holds, 4 when a check fails, 3 when OUTPUT is not a gptq2xpu output
    or SOURCE is not the checkpoint OUTPUT was made from.
    """
    from ..verify.runner import verify as run

    out = session_output()
    if source is not None:
        require_torch("verify --source")
    unused = [opt for name, opt in _NEED_SOURCE.items() if given(ctx, name)] if source is None else []
    unused = [opt if numeric or opt != "--numeric" else "--no-numeric" for opt in unused]  # the flag as typed
    if unused:
        out.warn(f"{', '.join(unused)} ignored: only the checks against the GPTQ source use "
                 f"{'it' if len(unused) == 1 else 'them'} (add --source SOURCE)")
    with out.progress() as update:
        report = run(output, source, revision=revision, token=token, device=device, dtype=dtype,
                     backend=backend, layers=layers, tokens=tokens, seed=seed, numeric=numeric,
                     exhaustive=exhaustive, jobs=jobs, progress=update)
    token_note = unused_token(ctx, source)
    if token_note:
        report["warnings"].insert(0, token_note)
    for w in report.get("warnings", []):
        out.warn(w)
    if unused:
        report["warnings"].insert(0, f"{', '.join(unused)} ignored without --source")
    checks = len(report["checks"])
    out.result(report, render_report, f"{output}: all {checks} checks passed")
    if report["status"] != "pass":
        raise VerificationError(f"{output}: {len(report['failures'])} check(s) failed: {report['failures'][0]}")
