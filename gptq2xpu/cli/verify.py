"""``gptq2xpu verify``: prove converted shards right."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import VerificationError
from .options import JsonOpt, RevisionOpt, TokenOpt
from .output import Output


def render_report(console, data: dict) -> None:
    for c in data["checks"]:
        mark = "[green]ok[/]  " if c["ok"] else "[red]FAIL[/]"
        console.print(f"{mark} {c['check']}: {c['detail']}")
    if data.get("layers"):
        t = Table(box=None, header_style="bold")
        for col in ("layer", "tokens", "experts hit", "max abs", "rel", "cosine", "every expert rel", "kernel", "s", "ok"):
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
        console.print(f"device {dev.get('device_type')} ({dev.get('device_name')}), dtype {data.get('dtype')}; {data['backend']['detail']}")
    status = "[green]PASS[/]" if data["status"] == "pass" else "[red]FAIL[/]"
    console.print(f"{status} {data['output']} in {data['seconds']} s")


def verify(
    output: Annotated[Path, typer.Argument(help="A converted checkpoint folder.")],
    source: Annotated[str | None, typer.Option("--source", help="The GPTQ source (folder or repo id): adds bit-exact and numerical checks.")] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    device: Annotated[str, typer.Option(help="auto (xpu, else cuda, else cpu), xpu, cuda or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (bfloat16 on a GPU, float32 on cpu), bfloat16, float16, float32.")] = "auto",
    backend: Annotated[str, typer.Option(help="auto (also run vllm_xpu_kernels on xpu when it imports), reference, xpu-kernels.")] = "auto",
    layers: Annotated[str | None, typer.Option(help="Layers for the numerical check: all (default), indices/ranges '0,5,10-12', or 'sample:N'.")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Seeded tokens per layer for the reference MoE.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the token batch.")] = 0,
    numeric: Annotated[bool, typer.Option("--numeric/--no-numeric", help="Run the reference MoE (with --source).")] = True,
    exhaustive: Annotated[bool, typer.Option("--exhaustive", help="Decode every expert nibble by nibble, not a sample (bytes are always compared in full).")] = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Threads for hashing and the bit-exact checks (default: the cores available).")] = None,
    json_out: JsonOpt = False,
):
    """Check converted shards: manifest, index, layout contract, config block; with --source, bit
    for bit and through a reference int4 MoE.  Exit 0 only when everything holds, 4 otherwise."""
    from ..verify.runner import verify as run

    out = Output(json_out)
    report = run(output, source, revision=revision, token=token, device=device, dtype=dtype, backend=backend,
                 layers=layers, tokens=tokens, seed=seed, numeric=numeric, exhaustive=exhaustive, jobs=jobs)
    out.result(report, render_report)
    if report["status"] != "pass":
        raise VerificationError(f"{output}: {len(report['failures'])} check(s) failed: {report['failures'][0]}")
