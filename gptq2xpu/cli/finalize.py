"""``gptq2xpu finalize``: finish a split conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonOpt
from .output import Output


def finalize(
    output: Annotated[Path, typer.Argument(help="The shared OUTPUT folder that every `convert --part i/n` wrote into.")],
    json_out: JsonOpt = False,
):
    """Finish a split conversion: write index, config.json and manifest once every part is there.

    The result is byte-identical to a single `gptq2xpu convert` run.
    """
    from ..write import finalize as run

    out = Output(json_out)
    files = run(output)
    out.result({"output": str(output), "files": len(files), "finalized": True},
               lambda c, d: c.print(f"[green]finalized[/] {d['output']}: {d['files']} files"))
