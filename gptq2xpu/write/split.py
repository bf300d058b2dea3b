"""Split conversions: ``convert --part i/n`` writes every n-th shard into a shared OUTPUT, and
``finalize`` writes index, config and manifest once every part is there (byte-identical to one run).

OUTPUT is shared by parts running at once (a CI matrix, a Slurm array), so nothing is staged: each
file is written through a temporary name and renamed.  What may be in a split OUTPUT is exactly
known (its planned shards and side files, ``.gptq2xpu-parts/`` with the plan and one record per
finished part, temporary files of those), and both steps refuse a folder holding anything else, so
a user's own files are never overwritten.  Part records are untrusted when ``finalize`` reads them,
and it publishes only what it can vouch for: a shard whose size, mtime and inode are still what its
part run recorded keeps the recorded sha256 (reading a large model again would double finalize's
cost); any other file (side files, shards edited, replaced or copied since) is hashed again and
refused when it differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..contract import CONFIG_BLOCK, INDEX_NAME, MANIFEST_NAME, PARTS_DIR, parse_block
from ..errors import InputError, UsageError, io_error
from ..plan import Plan
from ..read import Checkpoint
from ..read.paths import Folder, parse_json, portable_name
from ..verify.standalone import sha256_fd
from .documents import (
    config_bytes,
    index_bytes,
    manifest_base,
    manifest_bytes,
    side_documents,
    side_files,
    temp_stem,
    write_doc,
    write_side_files,
)
from .output import check_not_source, lock_file, lock_folder, make_parent, unlock_folder
from .shards import write_shards

PLAN_DOC = "plan.json"
MAX_PARTS = 10_000
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-\d+-[A-Za-z0-9_]+")
_RECORD = re.compile(r"part-(\d{1,5})-of-(\d{1,5})\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
WRITTEN = "written"
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino")


def part_shards(plan: Plan, part: int, parts: int) -> list[int]:
    """Shards that part ``part`` (1-based) of ``parts`` writes: every ``parts``-th, deterministic."""
    return [i for i in range(len(plan.shards)) if i % parts == part - 1]


def check_part(plan: Plan, part: int, parts: int) -> None:
    """Every part writes at least one shard: n is at most the number of shards (also said by a dry run)."""
    if parts > len(plan.shards):
        raise UsageError(f"--part {part}/{parts}: the output has {len(plan.shards)} shard(s), so n can be at most "
                         f"{len(plan.shards)} (a smaller --max-shard-size makes more shards)")


def write_part(plan: Plan, ckpt: Checkpoint, output: Path, part: int, parts: int, *, jobs: int = 1,
               progress: Callable[[int], None] | None = None,
               before_publish: Callable[[], None] | None = None) -> dict:
    """Write this part's shards into the shared OUTPUT folder, plus what ``finalize`` needs."""
    output = Path(os.path.abspath(output))
    check_not_source(output, ckpt.root)
    check_part(plan, part, parts)
    plan.warnings.extend(side_files(ckpt.folder)[1])  # refuses escaping links before writing anything
    side = sorted(side_documents(plan, ckpt))
    docs = {
        "fingerprint": plan.fingerprint,
        "parts": parts,
        "shards": [s.name for s in plan.shards],
        "side_files": side,
        "manifest": manifest_base(plan),
        "index": index_bytes(plan).decode(),
        "config": config_bytes(plan, ckpt).decode("utf-8"),
    }
    make_parent(output)
    _check_split_folder(output, set(docs["shards"]) | set(side))
    pdir = output / PARTS_DIR
    try:
        pdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error("cannot create", pdir, exc) from None
    if pdir.is_symlink() or not pdir.is_dir():
        raise UsageError(f"{pdir}: is not a folder of its own; refusing to write into it")
    reader = Folder(output, links="none")
    if reader.exists(f"{PARTS_DIR}/{PLAN_DOC}"):
        old = reader.read_json(f"{PARTS_DIR}/{PLAN_DOC}")
        if any(old.get(k) != docs[k] for k in ("fingerprint", "parts", "shards", "side_files", "index", "config")):
            raise UsageError(f"{output}: holds parts of a different conversion (source, options or part count differ)")
    write_doc(pdir, PLAN_DOC, json.dumps(docs, indent=1).encode())
    files = write_shards(plan, ckpt, output, part_shards(plan, part, parts), jobs, progress)
    written = {name: _stat_record(output / name) for name in files}
    files.update(write_side_files(plan, ckpt, output))
    ckpt.check_unchanged()
    if before_publish is not None:
        before_publish()
    record = {"files": files, WRITTEN: written}
    write_doc(pdir, f"part-{part}-of-{parts}.json", json.dumps(record, indent=1).encode())
    return files


def finalize(output: Path) -> dict:
    """Once every part is written: index, config.json and manifest; byte-identical to a single run.
    One ``finalize`` at a time: it holds a lock on the parts folder (a second one would remove
    the first one's temporary files)."""
    output = Path(output)
    if output.is_symlink() or not output.is_dir():
        raise UsageError(f"{output}: not a folder; finalize takes the OUTPUT folder every `convert --part` wrote into")
    reader = Folder(output, links="none")
    if not reader.exists(f"{PARTS_DIR}/{PLAN_DOC}"):
        if reader.exists(MANIFEST_NAME):
            raise UsageError(f"{output}: already finalized, nothing to do; check it with "
                             f"`gptq2xpu verify {output}`")
        raise UsageError(f"{output}: no split conversion found here (missing {PARTS_DIR}/{PLAN_DOC})")
    try:
        lock = lock_folder(output / PARTS_DIR)
    except BlockingIOError:
        raise UsageError(f"{output}: another finalize is running on this OUTPUT") from None
    except OSError as exc:
        raise io_error("cannot lock", output / PARTS_DIR, exc) from None
    try:
        return _finalize(output, reader)
    finally:
        unlock_folder(lock)


def _finalize(output: Path, reader: Folder) -> dict:
    _refuse_live_temps(output / PARTS_DIR, output)  # the parts folder goes at the end
    plan_doc = _read_plan(reader)
    parts = plan_doc["parts"]
    allowed = set(plan_doc["shards"]) | set(plan_doc["side_files"])
    finals = {INDEX_NAME: plan_doc["index"].encode(), "config.json": plan_doc["config"].encode("utf-8")}
    files: dict[str, dict] = {}
    written: dict[str, dict] = {}
    missing = []
    for i in range(1, parts + 1):
        rec = f"{PARTS_DIR}/part-{i}-of-{parts}.json"
        if not reader.exists(rec):
            missing.append(str(i))
            continue
        listed, stats = _read_record(reader, rec, allowed)
        files.update(listed)
        written.update(stats)
    if missing:
        raise UsageError(f"{output}: part(s) {', '.join(missing[:10])} of {parts} not finished yet; run "
                         f"`gptq2xpu convert SOURCE {output} --part {missing[0]}/{parts}` (with the options the "
                         "other parts had) for each, or wait for the runs still writing, then finalize again")
    for name in plan_doc["shards"]:
        if name not in files:
            raise InputError(f"{output}: no part wrote shard {name}")
    # an interrupted finalize may have written some final documents already: only identical ones
    _check_split_folder(output, allowed, finals={**finals, MANIFEST_NAME: None})
    for name, rec in files.items():
        p = output / name
        if not p.is_file() or p.is_symlink() or p.stat().st_size != rec["size"]:
            raise InputError(f"{p}: missing or of the wrong size; re-run its part")
        if written.get(name) != _stat_record(p) and _sha256(reader, name) != rec["sha256"]:
            raise InputError(f"{p}: changed since its part run wrote it (its sha256 is not the recorded one); "
                             "re-run its part")
    _remove_temps(output, allowed | set(finals) | {MANIFEST_NAME})
    for name, data in finals.items():
        files[name] = write_doc(output, name, data)
    manifest = manifest_bytes(plan_doc["manifest"], files)
    write_doc(output, MANIFEST_NAME, manifest)
    shutil.rmtree(output / PARTS_DIR, ignore_errors=True)
    return json.loads(manifest)["files"]


# ------------------------------------------------------------------------------ checks


def _check_split_folder(output: Path, allowed: set[str], finals: dict[str, bytes | None] | None = None) -> None:
    """OUTPUT may hold only what a split conversion writes (``finals``: final documents an
    interrupted ``finalize`` wrote, allowed when identical to what it writes again)."""
    if not os.path.lexists(output):
        return
    if output.is_symlink() or not output.is_dir():
        raise UsageError(f"{output}: OUTPUT exists and is not a folder")
    if finals is None and os.path.lexists(output / MANIFEST_NAME):
        raise UsageError(f"{output}: already finalized (it has {MANIFEST_NAME}); use a new OUTPUT")
    finals = finals or {}
    stems = {temp_stem(n) for n in allowed | set(finals)}
    entries = sorted(os.scandir(output), key=lambda e: e.name)
    in_progress = os.path.isfile(output / PARTS_DIR / PLAN_DOC) and not (output / PARTS_DIR).is_symlink()
    if not in_progress:  # only the parts folder another part is creating right now may be there
        allowed = set()
    for entry in entries:
        name = entry.name
        if name == PARTS_DIR and entry.is_dir(follow_symlinks=False):
            bad = [e.name for e in os.scandir(entry.path) if not _part_member(e)]
            if bad:
                raise UsageError(f"{output}: {PARTS_DIR}/{sorted(bad)[0]} was not written by a split conversion; "
                                 "refusing to use this folder")
            continue
        regular = entry.is_file(follow_symlinks=False)
        if regular and name in allowed:
            continue
        if regular and name in finals and (finals[name] is None or _same_bytes(entry.path, finals[name])):
            continue
        m = _TEMP.fullmatch(name)
        if regular and m and m["name"] in stems:
            continue
        raise UsageError(f"{output}: holds {name}, which a split conversion of this source did not write; use an "
                         "empty or new OUTPUT folder")


def _remove_temps(output: Path, names: set[str]) -> None:
    """Remove the temporary files of ``names`` that runs which are gone left (a killed part), so
    that the finished OUTPUT holds exactly what its manifest lists (:func:`_gone_runs_temp`).
    Temporary names hold a digest instead of a name too long for them (:func:`temp_stem`)."""
    stems = {temp_stem(n) for n in names}
    for entry in os.scandir(output):
        m = _TEMP.fullmatch(entry.name)
        if m and m["name"] in stems and entry.is_file(follow_symlinks=False):
            _gone_runs_temp(output, entry, remove=True)


def _refuse_live_temps(folder: Path, output: Path) -> None:
    """Stop (exit 2) when a live run is writing a temporary file in ``folder``."""
    for entry in os.scandir(folder):
        if _TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            _gone_runs_temp(output, entry, remove=False)


def _gone_runs_temp(output: Path, entry: os.DirEntry, *, remove: bool) -> None:
    """A run holds a lock on each temporary file it writes (:func:`.documents.open_temp`): one
    whose lock is held belongs to a live run (a part run again while finalize runs), is left
    alone, and stops finalize (exit 2); one whose lock can be taken is a gone run's (removed when
    ``remove``)."""
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise io_error("cannot remove the temporary file", Path(entry.path), exc) from None
    try:
        if lock_file(fd) is False:
            raise UsageError(f"{output}: a `convert --part` run is still writing {entry.name}; run finalize again "
                             "once every part run has finished")
        if remove:
            os.unlink(entry.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise io_error("cannot remove the temporary file", Path(entry.path), exc) from None
    finally:
        os.close(fd)


def _part_member(entry: os.DirEntry) -> bool:
    if not entry.is_file(follow_symlinks=False):
        return False
    m = _TEMP.fullmatch(entry.name)
    name = m["name"] if m else entry.name
    return name == PLAN_DOC or bool(_RECORD.fullmatch(name))


def _same_bytes(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(data) + 1) == data
    except OSError:
        return False


def _read_plan(reader: Folder) -> dict:
    where = f"{PARTS_DIR}/{PLAN_DOC}"
    doc = reader.read_json(where)
    shards, side = doc.get("shards"), doc.get("side_files")
    for key, names in (("shards", shards), ("side_files", side)):
        if not isinstance(names, list) or not all(isinstance(n, str) and portable_name(n) for n in names):
            raise InputError(f"{where}: '{key}' must be a list of file names in the folder")
    if not shards:
        raise InputError(f"{where}: lists no shards")
    parts = doc.get("parts")
    if type(parts) is not int or not 1 <= parts <= min(MAX_PARTS, len(shards)):
        raise InputError(f"{where}: 'parts' must be an integer in 1..{min(MAX_PARTS, len(shards))}, found "
                         f"{str(parts)[:40]}")
    manifest = doc.get("manifest")
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k), str)
                                                 for k in ("tool_version", "source_fingerprint")) \
            or not isinstance(manifest.get("layers"), dict):
        raise InputError(f"{where}: 'manifest' is not what convert --part writes")
    if not isinstance(doc.get("index"), str) or not isinstance(doc.get("config"), str):
        raise InputError(f"{where}: 'index' and 'config' must be the documents' text")
    index = parse_json(doc["index"].encode("utf-8"), f"{where}: index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            and set(weight_map.values()) == set(shards)):
        raise InputError(f"{where}: 'index' does not map the tensors to the planned shards")
    config = parse_json(doc["config"].encode("utf-8"), f"{where}: config")
    parse_block(config.get(CONFIG_BLOCK), f"{where}: config.json:{CONFIG_BLOCK}")
    return doc


def _read_record(reader: Folder, rel: str, allowed: set[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """A part's record: the manifest records of the files it wrote, and how its shards stood on
    disk just after it wrote them."""
    doc = reader.read_json(rel)
    files, written = doc.get("files"), doc.get(WRITTEN)
    if not isinstance(files, dict):
        raise InputError(f"{rel}: 'files' must map file names to their sha256 and size")
    for name, rec in files.items():
        if name not in allowed:
            raise InputError(f"{rel}: names {name[:80]!r}, which is not a shard or side file of this conversion")
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _SHA256.fullmatch(rec["sha256"])
                and type(rec.get("size")) is int and rec["size"] >= 0):
            raise InputError(f"{rel}: the record of {name} needs a sha256 and a size")
    if not isinstance(written, dict) or not all(
            name in files and isinstance(st, dict) and set(st) == set(_STAT_FIELDS)
            and all(type(v) is int for v in st.values()) for name, st in written.items()):
        raise InputError(f"{rel}: '{WRITTEN}' must map the files it wrote to their {', '.join(_STAT_FIELDS)}")
    return files, written


def _stat_record(path: Path) -> dict[str, int]:
    """How a file stands on disk: unchanged size, mtime, change time and inode let ``finalize``
    trust a part's sha256 without reading a shard again; anything else (edited, replaced, copied)
    means reading it.  The change time is the one a user cannot set back (``touch -r`` restores
    the mtime of a file edited in place, not its ctime)."""
    st = os.stat(path, follow_symlinks=False)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _sha256(reader: Folder, name: str) -> str:
    return sha256_fd(reader.open(name))
