"""``gptq2xpu finalize``: finish a split conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..contract import MANIFEST_NAME
from .options import OUTPUT_ARG
from .output import session_output

EXAMPLES = [
    "gptq2xpu finalize /shared/qwen3-xpu",
    "gptq2xpu finalize /shared/qwen3-xpu && gptq2xpu verify /shared/qwen3-xpu",
]


def finalize(
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="The shared OUTPUT folder that every "
                                           "`convert --part I/N` wrote into.", parser=OUTPUT_ARG)],
):
    """Finish a split conversion: write index, config.json and manifest once every part is there.

    The result is byte-identical to a single `gptq2xpu convert` run.
    """
    from ..write import finalize as run

    out = session_output()
    files = run(output)
    data = {"output": str(output), "files": len(files), "finalized": True}
    listed = f"{len(files)} files and {MANIFEST_NAME}, which lists them"
    out.result(data, lambda c, d: c.print(f"[green]finalized[/] {d['output']}: {listed}"),
               f"finalized {output}: {listed}")
