"""OUTPUT as a whole: refuse unsafe targets, stage in a hidden sibling, publish in one step.

A full run builds everything in a hidden sibling folder ``.<OUTPUT>.gptq2xpu-partial-<pid>``
(which holds the marker file ``.gptq2xpu-incomplete`` until it is complete and audited) and then
publishes it:

* no OUTPUT yet: one ``rename``;
* an OUTPUT to replace (``--overwrite``; only an empty folder or one that is provably a gptq2xpu
  output: its manifest and config block, and nothing else in it): one ``renameat2`` with
  ``RENAME_EXCHANGE`` swaps the two folders atomically, then the old one (now at the hidden name)
  is removed.  Where the file system cannot exchange, OUTPUT is first parked at
  ``.<OUTPUT>.gptq2xpu-old-<pid>`` and the new folder renamed into place.

SIGINT/SIGTERM are held while publishing and while removing a failed run's folder
(:mod:`gptq2xpu.interrupts`).  So at every moment OUTPUT is either the old output or the new
one; after a SIGKILL, the next run tidies the hidden folders a dead run left: a partial one is
removed (a killed run publishes nothing), a parked old output is put back at OUTPUT when OUTPUT
is missing and removed otherwise.  A hidden folder that is not provably gptq2xpu's is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from ..contract import CONFIG_BLOCK, MANIFEST_NAME
from ..errors import InputError, UsageError, io_error
from ..interrupts import Held, held
from ..read.paths import Folder, walk

STAGE_TAG = ".gptq2xpu-partial-"
OLD_TAG = ".gptq2xpu-old-"
INCOMPLETE_MARKER = ".gptq2xpu-incomplete"
_PID_MAX = 1 << 22  # Linux's largest pid_max


# ------------------------------------------------------------------------------ what OUTPUT holds


def converted_output_problem(folder: Path) -> str | None:
    """None when ``folder`` is provably a gptq2xpu output (manifest, config block, and only the
    files the manifest lists); else what disproves it, in a few words."""
    try:
        tree = walk(folder)
        if tree.others:
            rel, kind = next(iter(sorted(tree.others.items())))
            return f"{rel} is {kind}"
        if MANIFEST_NAME not in tree.files:
            held = sorted(tree.files) or sorted(tree.folders)
            return f"it has no {MANIFEST_NAME}" + (f"; it holds {held[0]}" if held else "")
        reader = Folder(folder, links="none")
        files = reader.read_json(MANIFEST_NAME).get("files")
        if not isinstance(files, dict):
            return f"its {MANIFEST_NAME} lists no files"
        if not isinstance(reader.read_json("config.json").get(CONFIG_BLOCK), dict):
            return f"its config.json has no '{CONFIG_BLOCK}' block"
    except InputError as exc:
        return str(exc)
    foreign = sorted(set(tree.files) - set(files) - {MANIFEST_NAME})
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        return f"{foreign[0]}{more} is not part of the conversion"
    return None


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))


def check_output(output: Path, source_root: Path, *, overwrite: bool) -> None:
    """Refuse an OUTPUT that is the source, holds it, or may not be replaced; create its parent."""
    check_not_source(output, source_root)
    if os.path.lexists(output) and not is_empty_folder(output):
        if not overwrite:
            raise UsageError(f"{output}: OUTPUT already exists; pass --overwrite to replace it")
        if output.is_symlink() or not output.is_dir():
            raise UsageError(f"{output}: OUTPUT exists and is not a folder; refusing to replace it")
        problem = converted_output_problem(output)
        if problem:
            raise UsageError(f"{output}: OUTPUT is not a gptq2xpu output ({problem}); refusing to replace it")
    make_parent(output)


def check_not_source(output: Path, source_root: Path) -> None:
    out_real = os.path.realpath(output)
    src_real = os.path.realpath(source_root)
    if out_real == src_real or out_real.startswith(src_real.rstrip(os.sep) + os.sep):
        raise UsageError(f"{output}: OUTPUT is the source folder or inside it; choose a folder outside {source_root}")
    if src_real.startswith(out_real.rstrip(os.sep) + os.sep):
        raise UsageError(f"{output}: OUTPUT contains the source folder {source_root}; choose another folder")


def make_parent(output: Path) -> None:
    parent = output.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise io_error("cannot create", parent, exc) from None


# ------------------------------------------------------------------------------ staging


def make_stage(output: Path) -> Path:
    """The hidden sibling folder a full run builds OUTPUT in (marked incomplete)."""
    stage = output.parent / f".{output.name}{STAGE_TAG}{os.getpid()}"
    try:
        stage.mkdir()
        (stage / INCOMPLETE_MARKER).touch(exist_ok=False)
    except OSError as exc:
        raise io_error("cannot create", stage, exc) from None
    return stage


def discard(folder: Path) -> None:
    """Remove a failed run's folder completely (a second Ctrl-C does not cut it short)."""
    with held():
        shutil.rmtree(folder, ignore_errors=True)


def publish(stage: Path, output: Path, overwrite: bool) -> Held:
    """Put the finished ``stage`` at ``output`` in one step; returns the signal held meanwhile."""
    with held() as state:
        try:
            os.unlink(stage / INCOMPLETE_MARKER)
            if os.path.lexists(output):
                if not overwrite and not is_empty_folder(output):  # another writer raced us
                    raise UsageError(f"{output}: OUTPUT appeared during the run; not replacing it")
                if _exchange(stage, output):
                    shutil.rmtree(stage, ignore_errors=True)  # the old OUTPUT, now at the hidden name
                else:
                    park = output.parent / f".{output.name}{OLD_TAG}{os.getpid()}"
                    os.rename(output, park)
                    try:
                        os.rename(stage, output)
                    except OSError:
                        os.rename(park, output)
                        raise
                    shutil.rmtree(park, ignore_errors=True)
            else:
                os.rename(stage, output)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise io_error("cannot move the finished output into place at", output, exc) from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return state


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


# ------------------------------------------------------------------------------ after a SIGKILL


def _pid_of(name: str, prefix: str) -> int | None:
    m = re.fullmatch(re.escape(prefix) + r"(\d{1,7})", name)
    if not m or not 0 < int(m[1]) < _PID_MAX:
        return None
    return int(m[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(output: Path) -> list[str]:
    """Tidy the hidden folders that killed runs (process gone) left beside OUTPUT; returns what
    was done, one line each.  Runs before OUTPUT is looked at, so a restored output counts.

    A parked old output (the fallback publish) goes back to OUTPUT when OUTPUT is missing and is
    removed otherwise; a staging folder is removed (it was never published: a killed run
    publishes nothing).  Only folders that are provably gptq2xpu's are touched."""
    done = []
    parent = output.parent
    if not parent.is_dir():
        return done
    for tag in (OLD_TAG, STAGE_TAG):
        prefix = f".{output.name}{tag}"
        for entry in sorted(os.scandir(parent), key=lambda e: e.name):
            pid = _pid_of(entry.name, prefix)
            if pid is None or pid == os.getpid() or _pid_alive(pid) or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            complete = converted_output_problem(path) is None
            ours = complete or (path / INCOMPLETE_MARKER).exists() or is_empty_folder(path)
            if not ours:
                done.append(f"left {entry.name} alone: a killed run's folder that is not provably gptq2xpu's")
            elif tag == OLD_TAG and complete and not os.path.lexists(output):
                os.rename(path, output)
                done.append(f"restored {output.name} from {entry.name}, where a killed run had parked it")
            else:
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {entry.name}, left by a killed run")
    return done
