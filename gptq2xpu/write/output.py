"""OUTPUT as a whole: refuse unsafe targets, stage in a hidden sibling, publish in one step.

A full run builds everything in a hidden sibling folder ``.<OUTPUT>.gptq2xpu-partial-<token>``
(``token``: random, so that runs never share a name, not even runs in containers that all get
the same pid; where OUTPUT's name is too long for that, a prefix of it and a hash of the whole
stand in for it).  The stage holds the marker file ``.gptq2xpu-incomplete`` until it is complete
and audited, and the run holds an exclusive ``flock`` on the stage folder as long as it lives:
that lock, not a pid, tells a live run's folder from a killed one's.  Publishing:

* no OUTPUT yet: one ``rename``;
* an OUTPUT to replace (``--overwrite``; only an empty folder or one that is provably a gptq2xpu
  output: its manifest and config block, and nothing else in it): one ``renameat2`` with
  ``RENAME_EXCHANGE`` swaps the two folders atomically.  Where the file system cannot exchange,
  OUTPUT is first parked at ``.<OUTPUT>.gptq2xpu-old-<token>`` and the new folder renamed into
  place.  The old folder (locked too) is checked again once it has left OUTPUT: a file added to
  OUTPUT during the run makes the run put the old folder back and fail (exit 2), so the user's
  file is never deleted; otherwise the old folder is removed.

SIGINT/SIGTERM are held while publishing and while removing a failed run's folder
(:mod:`gptq2xpu.interrupts`), and once publishing is done the outcome is decided: a later signal
no longer turns the run into a failure.  So at every moment OUTPUT is either the old output or
the new one, and the exit code says which.  After a SIGKILL, the next run tidies the hidden
folders whose lock it can take: a partial one is removed (a killed run publishes nothing), a
parked old output is put back at OUTPUT when OUTPUT is missing and otherwise kept, with a warning
naming both.  A parked output is never deleted; a hidden folder that is not provably gptq2xpu's,
or that cannot be inspected, is left alone with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from ..contract import CONFIG_BLOCK, MANIFEST_NAME
from ..errors import Gptq2XpuError, InputError, OutputError, UsageError, io_error
from ..interrupts import Held, decide, held
from ..read.paths import Folder, walk

STAGE_TAG = ".gptq2xpu-partial-"
OLD_TAG = ".gptq2xpu-old-"
INCOMPLETE_MARKER = ".gptq2xpu-incomplete"
_TOKEN_CHARS = 12  # hex digits of the random part of a hidden name
_LOCK_UNSUPPORTED = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)
_locks: dict[Path, int] = {}  # stage folder -> the open descriptor holding its lock


# ------------------------------------------------------------------------------ what OUTPUT holds


def converted_output_problem(folder: Path) -> str | None:
    """None when ``folder`` is provably a gptq2xpu output (manifest, config block, and only the
    files the manifest lists and the folders they lie in); else what disproves it, in a few words."""
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
    foreign += sorted(f"{rel}/" for rel in set(tree.folders) - _folders_of(files))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        return f"{foreign[0]}{more} is not part of the conversion"
    return None


def _folders_of(files: dict) -> set[str]:
    """The folders a conversion's listed files lie in; any other folder, even an empty one, is
    someone else's (replacing the output would delete it)."""
    return {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))


def check_output(output: Path, source_root: Path, *, overwrite: bool) -> None:
    """Refuse an OUTPUT that is the source, holds it, may not be replaced, or whose name the file
    system cannot hold (said before the conversion runs, not at its final rename); create its parent."""
    if len(os.fsencode(output.name)) > _name_max(output.parent):
        raise UsageError(f"{str(output)[:80]}...: OUTPUT's name is {len(os.fsencode(output.name))} bytes, more than "
                         f"the {_name_max(output.parent)} this file system allows")
    check_not_source(output, source_root)
    if os.path.lexists(output) and not is_empty_folder(output):
        if not overwrite and not os.path.lexists(output / MANIFEST_NAME):  # --overwrite would not help
            what = ("and is a folder gptq2xpu did not write (it has no " + MANIFEST_NAME + ")"
                    if output.is_dir() and not output.is_symlink() else "and is not a folder")
            raise UsageError(f"{output}: OUTPUT already exists {what}; choose a new or empty folder (--overwrite "
                             "replaces only a gptq2xpu output)")
        if not overwrite:
            raise UsageError(f"{output}: OUTPUT already exists; pass --overwrite to replace it")
        if output.is_symlink() or not output.is_dir():
            raise UsageError(f"{output}: OUTPUT exists and is not a folder; refusing to replace it")
        problem = converted_output_problem(output)
        if problem:
            raise UsageError(f"{output}: OUTPUT is not a gptq2xpu output ({problem}); refusing to replace it")
    make_parent(output)


def prepare_output(output: Path, source_root: Path, *, overwrite: bool) -> list[str]:
    """Tidy what killed runs left beside OUTPUT, then :func:`check_output`; returns the tidying's
    lines (warnings).  When OUTPUT is refused, they travel in the error: a parked earlier output
    that stays beside OUTPUT must be reported whatever the outcome."""
    done = recover_stale(output)
    try:
        check_output(output, source_root, overwrite=overwrite)
    except Gptq2XpuError as exc:
        if done:
            exc.hint = "; ".join(filter(None, [exc.hint, *done]))
        raise
    return done


def check_not_source(output: Path, source_root: Path) -> None:
    """Refuse an OUTPUT that is SOURCE, lies inside it or holds it.  Folders are compared by
    identity (device and inode), not by path: a bind mount or another alias of SOURCE spells a
    different path to the very same folder."""
    source_id = _identity(source_root)
    if source_id is not None and source_id in _lineage(output):
        raise UsageError(f"{output}: OUTPUT is the source folder or inside it; choose a folder outside {source_root}")
    output_id = _identity(output)
    if output_id is not None and output_id in _lineage(source_root):
        raise UsageError(f"{output}: OUTPUT contains the source folder {source_root}; choose another folder")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` leads to; None where nothing is there (yet)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _lineage(path: Path) -> set[tuple[int, int]]:
    """The identities of ``path`` and of every existing folder above it, both along the path as
    spelled (``..`` taken lexically) and along its resolved form, so no alias is missed."""
    found = set()
    for spelled in {os.path.abspath(path), os.path.realpath(path)}:
        here = Path(spelled)
        for folder in (here, *here.parents):
            ident = _identity(folder)
            if ident is not None:
                found.add(ident)
    return found


def make_parent(output: Path) -> None:
    parent = output.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise io_error("cannot create", parent, exc) from None


# ------------------------------------------------------------------------------ hidden names


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def hidden_base(output: Path) -> str:
    """OUTPUT's name as its hidden siblings spell it: the name itself, or, where a hidden name
    would pass the file system's name limit, a prefix of it and a hash of the whole name (so a
    255-byte OUTPUT name still gets its staging folder, and two long names never share one)."""
    room = _name_max(output.parent) - 1 - max(len(STAGE_TAG), len(OLD_TAG)) - _TOKEN_CHARS
    name = output.name
    if len(os.fsencode(name)) <= room:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    keep = name
    while keep and len(os.fsencode(keep)) > room - 1 - len(digest):
        keep = keep[:-1]
    return f"{keep}~{digest}"


def _hidden(output: Path, tag: str) -> Path:
    """A fresh hidden sibling name of OUTPUT (random token: unique per run, pid or not)."""
    return output.parent / f".{hidden_base(output)}{tag}{secrets.token_hex(_TOKEN_CHARS // 2)}"


def _is_run_folder(name: str, prefix: str) -> bool:
    """Whether a hidden sibling's name is one a run gives: ``prefix`` then the random hex token."""
    return re.fullmatch(re.escape(prefix) + rf"[0-9a-f]{{{_TOKEN_CHARS}}}", name) is not None


# ------------------------------------------------------------------------------ liveness


def lock_folder(folder: Path) -> int | None:
    """An exclusive ``flock`` on ``folder`` (an open descriptor), held until closed: a run holds
    one on every folder it owns, so a folder whose lock can be taken belongs to no live run.
    Raises BlockingIOError when a live run holds it; None where the file system has no locks."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _LOCK_UNSUPPORTED:
            return None
        raise
    return fd


def lock_file(fd: int) -> bool | None:
    """An exclusive ``flock`` on the open file ``fd`` (until it is closed): a run holds one on each
    temporary file it writes, so one whose lock can be taken belongs to no live run.  False when
    a live run holds it; None where the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _LOCK_UNSUPPORTED:
            return None
        raise
    return True


def unlock_folder(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


# ------------------------------------------------------------------------------ staging


def make_stage(output: Path) -> Path:
    """The hidden sibling folder a full run builds OUTPUT in (marked incomplete, locked by this
    run).  Another run tidying killed runs' folders may take a new folder's lock first and remove
    it: then this run simply makes another.  Whatever stops this function once it has made a
    folder (an error, running out of descriptors, a signal) removes that folder first."""
    for _ in range(100):
        stage = _hidden(output, STAGE_TAG)
        try:
            stage.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise io_error("cannot create", stage, exc) from None
        fd = None
        try:
            fd = lock_folder(stage)
            if fd is not None and os.fstat(fd).st_ino != os.stat(stage, follow_symlinks=False).st_ino:
                raise FileNotFoundError(stage)  # another run removed it and a folder of that name came back
            (stage / INCOMPLETE_MARKER).touch(exist_ok=False)
        except (BlockingIOError, FileNotFoundError):
            unlock_folder(fd)  # another run tidied it away: not ours any more
            continue
        except BaseException as exc:
            unlock_folder(fd)  # first: out of descriptors, removing needs the one it frees
            _remove_new_stage(stage)
            if isinstance(exc, OSError):
                raise io_error("cannot create", stage, exc) from None
            raise
        if fd is not None:
            _locks[stage] = fd
        return stage
    raise OutputError(f"{output.parent}: cannot create a staging folder for {output.name} there")


def _remove_new_stage(stage: Path) -> None:
    """Remove a stage folder that holds at most its marker, by name alone (no descriptor needed)."""
    with contextlib.suppress(OSError):
        os.unlink(stage / INCOMPLETE_MARKER)
    with contextlib.suppress(OSError):
        os.rmdir(stage)
    if os.path.lexists(stage):
        shutil.rmtree(stage, ignore_errors=True)


def _release(stage: Path) -> None:
    unlock_folder(_locks.pop(stage, None))


def discard(folder: Path) -> None:
    """Remove a failed run's folder completely (a second Ctrl-C does not cut it short)."""
    with held():
        _release(folder)  # first: out of descriptors, removing needs the one it frees
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ publishing


class Publishing:
    """Whether :func:`publish` has taken charge of the stage (signals held from then on): until it
    has, the caller removes the stage on any failure, a signal at the very start included."""

    started = False


def publish(stage: Path, output: Path, overwrite: bool, publishing: Publishing | None = None) -> Held:
    """Put the finished ``stage`` at ``output`` in one step; returns the signal held meanwhile.
    Once it returns, OUTPUT is the new output and the run's outcome is decided."""
    with held() as state:
        if publishing is not None:
            publishing.started = True
        try:
            if os.path.lexists(output):
                _replace(stage, output, overwrite)
            else:
                _place(stage, output)
        finally:
            _release(stage)
        decide()
    return state


def _place(stage: Path, output: Path) -> None:
    try:
        os.unlink(stage / INCOMPLETE_MARKER)
        os.rename(stage, output)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise io_error("cannot move the finished output into place at", output, exc) from None


def _replace_problem(folder: Path, overwrite: bool) -> str | None:
    """Why the folder at OUTPUT may not be replaced (None: it may): checked when the run starts,
    and again once the folder has left OUTPUT, since files may be added to it meanwhile."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return "it is not a folder"
        if is_empty_folder(folder):
            return None
        if not overwrite:
            return "it is not empty"
        return converted_output_problem(folder)
    except OSError as exc:
        return f"cannot inspect it: {exc.strerror or exc}"


def _changed(output: Path, problem: str) -> UsageError:
    return UsageError(f"{output}: OUTPUT changed during the run and may no longer be replaced ({problem}); "
                      "kept it as it is and published nothing")


def _replace(stage: Path, output: Path, overwrite: bool) -> None:
    """Swap the new folder in and remove the old one, unless the old one turns out to hold
    something that is not a gptq2xpu output's: then it goes back to OUTPUT unchanged."""
    problem = _replace_problem(output, overwrite)
    try:
        if problem:
            raise _changed(output, problem)
        old_lock = lock_folder(output)
    except BlockingIOError:
        shutil.rmtree(stage, ignore_errors=True)
        raise UsageError(f"{output}: another gptq2xpu run is publishing to OUTPUT right now") from None
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise io_error("cannot move the finished output into place at", output, exc) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        shutil.rmtree(_swap_in(stage, output, overwrite), ignore_errors=True)
    finally:
        unlock_folder(old_lock)


def _swap_in(stage: Path, output: Path, overwrite: bool) -> Path:
    """Exchange the folders (or, without exchange, park the old one, then rename the new one into
    place); the old one is checked again once it has left OUTPUT.  Returns where the old folder
    now is: the stage's name, which the next run removes should this one be killed before it
    does (a parked old output, by contrast, is never removed)."""
    try:
        os.unlink(stage / INCOMPLETE_MARKER)
        if _exchange(stage, output):
            _recheck(stage, stage, output, overwrite)
            return stage
        park = _hidden(output, OLD_TAG)
        os.rename(output, park)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise io_error("cannot move the finished output into place at", output, exc) from None
    _recheck(park, stage, output, overwrite)
    try:
        os.rename(stage, output)
    except OSError as exc:
        _put_back(park, output)
        shutil.rmtree(stage, ignore_errors=True)
        raise io_error("cannot move the finished output into place at", output, exc) from None
    try:
        os.rename(park, stage)
    except OSError:
        return park
    return stage


def _recheck(old: Path, stage: Path, output: Path, overwrite: bool) -> None:
    """The old folder, off OUTPUT now, may still be replaced; else it goes back, unchanged, and
    the new one is removed."""
    problem = _replace_problem(old, overwrite)
    if not problem:
        return
    if old == stage:  # exchanged: exchange back
        try:
            if not _exchange(stage, output):
                raise OSError(errno.ENOTSUP, "cannot exchange the folders back")
        except OSError as exc:
            raise OutputError(f"{output}: OUTPUT changed during the run and could not be put back "
                              f"({exc.strerror}); the new conversion is at OUTPUT, the replaced folder is kept at "
                              f"{old}") from None
    else:
        _put_back(old, output)
    shutil.rmtree(stage, ignore_errors=True)
    raise _changed(output, problem)


def _put_back(park: Path, output: Path) -> None:
    try:
        os.rename(park, output)
    except OSError as exc:
        raise OutputError(f"{output}: could not put the previous output back; it is kept at {park} "
                          f"({exc.strerror})") from None


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


def recover_stale(output: Path) -> list[str]:
    """Tidy the hidden folders that killed runs (their lock free) left beside OUTPUT; returns
    what was done or left, one line each.  Runs before OUTPUT is looked at, so a restored output
    counts.  Nothing here fails the run: a folder that cannot be inspected is left alone."""
    parent = output.parent
    if not parent.is_dir():
        return []
    try:
        names = sorted(e.name for e in os.scandir(parent))
    except OSError as exc:
        return [f"cannot look for folders killed runs left in {parent} ({exc.strerror or exc})"]
    done = []
    base = hidden_base(output)
    for tag in (OLD_TAG, STAGE_TAG):
        for name in names:
            if not _is_run_folder(name, f".{base}{tag}"):
                continue
            try:
                line = _tidy(parent / name, output, tag)
            except OSError as exc:
                line = f"left {parent / name} alone: cannot inspect it ({exc.strerror or exc})"
            if line:
                done.append(line)
    return done


def _tidy(path: Path, output: Path, tag: str) -> str | None:
    """One hidden folder: None when a live run owns it (or it is not a folder)."""
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        fd = lock_folder(path)
    except BlockingIOError:
        return None
    if fd is None:
        return (f"left {path} alone: this file system has no locks to tell whether the run that made it is "
                "still going; remove it (or, if it is an earlier output, move it back) once no run is")
    try:
        complete = converted_output_problem(path) is None
        ours = complete or is_empty_folder(path) or (path / INCOMPLETE_MARKER).exists()
        if tag == OLD_TAG:
            return _restore(path, output, complete or is_empty_folder(path))
        if not ours:
            return f"left {path.name} alone: a killed run's folder that is not provably gptq2xpu's"
        shutil.rmtree(path, ignore_errors=True)
        return f"removed {path.name}, left by a killed run"
    finally:
        unlock_folder(fd)


def _restore(park: Path, output: Path, restorable: bool) -> str:
    """A parked old output is never deleted: back to OUTPUT when OUTPUT is missing, else kept."""
    if os.path.lexists(output):
        return (f"{park} holds the output a killed run had moved aside, and {output} exists too: keep the one "
                f"you want (move {park.name} back to {output.name}, or delete it)")
    if not restorable:
        return (f"left {park.name} alone: a killed run's folder that is not provably gptq2xpu's (if it is your "
                f"earlier {output.name}, move it back)")
    os.rename(park, output)
    return f"restored {output.name} from {park.name}, where a killed run had parked it"
