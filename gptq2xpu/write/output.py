"""OUTPUT as a whole: refuse unsafe targets, stage in a hidden sibling, publish by rename.

A full run builds everything in a hidden sibling folder ``.<OUTPUT>.gptq2xpu-partial-<pid>`` and
renames it to OUTPUT only when complete (an existing OUTPUT, with ``--overwrite``, is moved aside
first and removed after).  A killed run leaves only the hidden folder, which the next run removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..contract import MANIFEST_NAME
from ..errors import UsageError, io_error

STAGE_TAG = ".gptq2xpu-partial-"
OLD_TAG = ".gptq2xpu-old-"


def check_output(output: Path, source_root: Path, *, overwrite: bool, part: bool = False) -> None:
    out_real = os.path.realpath(output)
    src_real = os.path.realpath(source_root)
    if out_real == src_real or out_real.startswith(src_real.rstrip(os.sep) + os.sep):
        raise UsageError(f"{output}: OUTPUT is the source folder or inside it; choose a folder outside {source_root}")
    if src_real.startswith(out_real.rstrip(os.sep) + os.sep):
        raise UsageError(f"{output}: OUTPUT contains the source folder {source_root}; choose another folder")
    if part:
        if output.exists() and not output.is_dir():
            raise UsageError(f"{output}: OUTPUT exists and is not a folder")
        return
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise UsageError(f"{output}: OUTPUT already exists; pass --overwrite to replace it")
        if not output.is_dir() or output.is_symlink():
            raise UsageError(f"{output}: OUTPUT exists and is not a folder; refusing to replace it")
        entries = [p.name for p in output.iterdir()]
        if entries and MANIFEST_NAME not in entries and "config.json" not in entries:
            raise UsageError(f"{output}: OUTPUT is a non-empty folder that is not a converted checkpoint; refusing to replace it")
    parent = output.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise io_error("cannot create", parent, exc) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(output: Path) -> list[str]:
    """Remove build folders that earlier, killed runs left beside OUTPUT (their process is gone)."""
    removed = []
    parent = output.parent
    if not parent.is_dir():
        return removed
    for tag in (STAGE_TAG, OLD_TAG):
        for p in parent.glob(f".{output.name}{tag}*"):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def publish(stage: Path, output: Path, overwrite: bool) -> None:
    old = None
    try:
        if output.exists():
            if not overwrite:  # raced with another writer
                raise UsageError(f"{output}: OUTPUT appeared during the run; not replacing it")
            old = output.parent / f".{output.name}{OLD_TAG}{os.getpid()}"
            os.rename(output, old)
        os.rename(stage, output)
    except OSError as exc:
        if old is not None and not output.exists():
            os.rename(old, output)
        raise io_error("cannot move the finished output into place at", output, exc) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
