"""Split conversions: ``convert --part i/n`` writes every n-th shard into a shared OUTPUT, and
``finalize`` writes index, config and manifest once every part is there (byte-identical to one run).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..contract import INDEX_NAME, MANIFEST_NAME
from ..errors import InputError, UsageError, io_error
from ..plan import Plan
from ..read import Checkpoint
from .documents import config_bytes, copy_file, index_bytes, manifest_base, manifest_bytes, side_files, write_doc
from .output import check_output
from .shards import write_shards

PARTS_DIR = ".gptq2xpu-parts"


def part_shards(plan: Plan, part: int, parts: int) -> list[int]:
    """Shards that part ``part`` (1-based) of ``parts`` writes: every ``parts``-th, deterministic."""
    return [i for i in range(len(plan.shards)) if i % parts == part - 1]


def write_part(plan: Plan, ckpt: Checkpoint, output: Path, part: int, parts: int, *, jobs: int = 1,
               progress: Callable[[int], None] | None = None,
               before_publish: Callable[[], None] | None = None) -> dict:
    """Write this part's shards into the shared OUTPUT folder, plus what ``finalize`` needs."""
    output = Path(os.path.abspath(output))
    check_output(output, ckpt.root, overwrite=False, part=True)
    side_files(ckpt.root, ckpt.trusted_root)  # refuse escaping links before writing anything
    if (output / MANIFEST_NAME).exists():
        raise UsageError(f"{output}: already finalized (it has {MANIFEST_NAME}); use a new OUTPUT")
    pdir = output / PARTS_DIR
    try:
        pdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error("cannot create", pdir, exc) from None
    docs = {
        "fingerprint": plan.fingerprint,
        "parts": parts,
        "shards": [s.name for s in plan.shards],
        "manifest": manifest_base(plan),
        "index": index_bytes(plan).decode(),
        "config": config_bytes(plan, ckpt).decode("utf-8"),
    }
    prev = pdir / "plan.json"
    if prev.exists():
        try:
            old = json.loads(prev.read_text())
        except (OSError, ValueError):
            old = None
        if not old or old.get("fingerprint") != plan.fingerprint or old.get("index") != docs["index"] or old.get("parts") != parts:
            raise UsageError(f"{output}: holds parts of a different conversion (source, options or part count differ)")
    write_doc(pdir, "plan.json", json.dumps(docs, indent=1).encode())
    files = write_shards(plan, ckpt, output, part_shards(plan, part, parts), jobs, progress)
    for name in side_files(ckpt.root, ckpt.trusted_root):
        files[name] = copy_file(ckpt.root / name, output, name)
    ckpt.check_unchanged()
    if before_publish is not None:
        before_publish()
    write_doc(pdir, f"part-{part}-of-{parts}.json", json.dumps({"files": files}, indent=1).encode())
    return files


def finalize(output: Path) -> dict:
    """Once every part is written: index, config.json and manifest; byte-identical to a single run."""
    output = Path(output)
    pdir = output / PARTS_DIR
    if not (pdir / "plan.json").is_file():
        if (output / MANIFEST_NAME).is_file():
            raise UsageError(f"{output}: already finalized")
        raise UsageError(f"{output}: no split conversion found here (missing {PARTS_DIR}/plan.json)")
    try:
        plan_doc = json.loads((pdir / "plan.json").read_text())
        parts = int(plan_doc["parts"])
        files: dict[str, dict] = {}
        missing = []
        for i in range(1, parts + 1):
            rec = pdir / f"part-{i}-of-{parts}.json"
            if not rec.is_file():
                missing.append(str(i))
                continue
            files.update(json.loads(rec.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{pdir}: unreadable part records ({exc})") from None
    if missing:
        raise UsageError(f"{output}: part(s) {', '.join(missing)} of {parts} not finished yet")
    for name in plan_doc["shards"]:
        if name not in files:
            raise InputError(f"{output}: no part wrote shard {name}")
    for name, rec in files.items():
        p = output / name
        if not p.is_file() or p.stat().st_size != rec["size"]:
            raise InputError(f"{p}: missing or of the wrong size; re-run its part")
    files[INDEX_NAME] = write_doc(output, INDEX_NAME, plan_doc["index"].encode())
    files["config.json"] = write_doc(output, "config.json", plan_doc["config"].encode("utf-8"))
    manifest = manifest_bytes(plan_doc["manifest"], files)
    write_doc(output, MANIFEST_NAME, manifest)
    shutil.rmtree(pdir, ignore_errors=True)
    return json.loads(manifest)["files"]
