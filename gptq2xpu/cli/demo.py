"""``gptq2xpu demo``: make a small GPTQ MoE checkpoint, convert it, verify it, print a summary.

Needs no download: the checkpoint is synthetic (random int4 experts with real GPTQ packing, an
AutoRound-style config, float router, attention and norms), written to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .. import interrupts
from ..errors import UsageError, VerificationError
from ..optional_torch import require_torch
from ..testing.synth import FAMILIES
from .options import DeviceOpt, choice, path_arg
from .output import human_bytes, session_output

EXAMPLES = [
    "gptq2xpu demo",
    "gptq2xpu demo --family mixtral --keep ./demo",
    "gptq2xpu demo --device cpu --json",
]

def _render(console, d: dict) -> None:
    console.print(f"[bold]gptq2xpu demo[/]: {d['family']} model, {d['moe_layers']} MoE layers x {d['experts']} experts "
                  f"(K={d['hidden_size']}, N={d['intermediate_size']}, group {d['group_size']})")
    gone = "" if d["kept"] else "; removed afterwards, --keep DIR keeps it"
    console.print(f"  source  {d['source']}  ({human_bytes(d['bytes_in'])}, GPTQ int4{gone})")
    console.print(f"  convert -> {d['output']}  {d['converted_layers']} layers converted in {d['convert_seconds']} s")
    for c in d["checks"]:
        console.print(f"  verify  {'[green]ok[/]  ' if c['ok'] else '[red]FAIL[/]'} {c['check']}: {c['detail']}")
    worst = max((r["rel"] for r in d["layers"]), default=0.0)
    console.print(f"  reference MoE: {len(d['layers'])} layers, worst relative error {worst:.3g} "
                  f"({d['device'].get('device_type')}, {d['dtype']}); {d['backend'].get('detail', '')}")
    verdict = "[red]FAIL[/]" if d["failures"] else "[green]PASS[/]"
    console.print(f"{verdict}  next: gptq2xpu inspect <your GPTQ MoE checkpoint>, then gptq2xpu convert SOURCE OUTPUT")


def demo(
    family: Annotated[str, choice("--family", FAMILIES,
                                  help="Model family of the synthetic checkpoint.")] = "qwen3_moe",
    keep: Annotated[Path | None, typer.Option(
        "--keep", metavar="DIR", parser=path_arg("--keep", "name a folder (. for the current one)"),
        help="Keep the source and converted folders under DIR instead of a temporary folder.")] = None,
    device: DeviceOpt = "auto",
):
    """Make a small GPTQ MoE checkpoint, convert it, verify it, and print a summary (no download).

    The checkpoint is synthetic (random int4 experts with real GPTQ packing, an AutoRound-style
    config, float router, attention and norms), written to a temporary folder that is removed
    afterwards unless --keep is given.
    """
    from ..convert import convert
    from ..testing.synth import make_checkpoint
    from ..verify.runner import verify

    out = session_output()
    require_torch("demo (it verifies against the source)")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="gptq2xpu-demo-"))
    try:
        if keep:
            _check_keep(root)
        spec = dict(family=family, hidden=512, moe_intermediate=256, num_experts=16, top_k=4, num_layers=3,
                    group_size=128)
        info = make_checkpoint(root / "source", **spec)
        result = convert(root / "source", root / "converted", jobs=None, progress=None)
        interrupts.begin()  # publishing decided the conversion, not the verification that follows
        report = verify(root / "converted", root / "source", device=device)
        data = {
            "family": family,
            "moe_layers": len(info.moe_layers),
            "experts": spec["num_experts"],
            "hidden_size": spec["hidden"],
            "intermediate_size": spec["moe_intermediate"],
            "group_size": spec["group_size"],
            "source": str(root / "source"),
            "bytes_in": result["bytes_in"],
            "output": str(root / "converted"),
            "converted_layers": result["converted_layers"],
            "convert_seconds": result["seconds"],
            # verify's own keys and values, as `verify --json` gives them
            "checks": report["checks"],
            "layers": report["layers"],
            "failures": report["failures"],
            "device": report.get("device", {}),
            "dtype": report.get("dtype"),
            "backend": report.get("backend", {}),
            "kept": bool(keep),
        }
        out.result(data, _render, f"demo {family}: converted and verified {data['converted_layers']} MoE layer(s)")
        if report["status"] != "pass":
            raise VerificationError(f"demo conversion failed verification: {report['failures'][0]}")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def _check_keep(root: Path) -> None:
    """--keep DIR must be able to take the demo's two folders; said before anything is made (demo
    takes no --overwrite, so the conversion's own refusal would point at an option it lacks)."""
    if os.path.lexists(root) and (root.is_symlink() or not root.is_dir()):
        raise UsageError(f"--keep {root}: not a folder; name a new or empty folder")
    for name in ("source", "converted"):
        if os.path.lexists(root / name):
            raise UsageError(f"{root / name} exists; choose a new or empty --keep folder")
