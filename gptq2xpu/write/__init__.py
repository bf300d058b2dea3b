"""Execute a :class:`~gptq2xpu.plan.Plan`: stream every planned tensor into its shard, atomically.

    chunks.py     where every output byte comes from (tasks building chunks, pooled buffers)
    shards.py     one shard: parallel builders writing at planned offsets, sha256 in file order
    documents.py  config.json with its block, index, manifest, side files
    output.py     OUTPUT as a whole: safety checks, staging, publishing by rename
    ranks.py      tensor-parallel rank folders
    split.py      split runs (--part i/n) and finalize
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..contract import INDEX_NAME, MANIFEST_NAME
from ..plan import Plan
from ..read import Checkpoint
from .documents import config_bytes, index_bytes, manifest_base, manifest_bytes, side_files, write_doc, write_side_files
from .output import Publishing, discard, make_stage, prepare_output, publish
from .ranks import write_ranks
from .shards import write_shards
from .split import finalize, write_part

__all__ = ["write_checkpoint", "write_part", "finalize"]


def write_checkpoint(plan: Plan, ckpt: Checkpoint, output: Path, *, jobs: int = 1, overwrite: bool = False,
                     progress: Callable[[int], None] | None = None,
                     before_publish: Callable[[], None] | None = None,
                     stop_reading: Callable[[], None] | None = None) -> dict:
    """Write the whole converted checkpoint at ``output`` (atomically: see :mod:`.output`).
    Returns the manifest's file records.  ``stop_reading`` (on failure, before the stage is
    removed) stops whatever else reads ``ckpt``; then the checkpoint's descriptors are closed:
    a run out of descriptors needs them to remove its stage folder."""
    output = Path(os.path.abspath(output))  # "." or "out/.." must name the folder, not the cwd entry
    plan.warnings.extend(prepare_output(output, ckpt.root, overwrite=overwrite))
    plan.warnings.extend(side_files(ckpt.folder)[1])  # refuses escaping links before writing anything
    config = config_bytes(plan, ckpt)  # refuses one too large before writing anything
    stage = make_stage(output)
    # The stage is removed on any failure until publish() holds the signals and takes charge of it:
    # a Ctrl-C between the last file written and publishing removes it too.
    publishing = Publishing()
    try:
        files = write_shards(plan, ckpt, stage, range(len(plan.shards)), jobs, progress)
        files.update(write_documents(plan, ckpt, stage, files, config))
        ckpt.check_unchanged()
        if before_publish is not None:
            before_publish()
        ckpt.close()  # reading is over; publishing may have to remove a folder, which takes descriptors
        late = publish(stage, output, overwrite, publishing)
    except BaseException:
        if not publishing.started:
            try:
                if stop_reading is not None:
                    stop_reading()
                ckpt.close()  # reopened if read again
            finally:
                discard(stage)
        raise
    if late.signal is not None:
        plan.warnings.append(f"{late.name} arrived while OUTPUT was being published; the conversion completed "
                             "and OUTPUT is the new, complete checkpoint")
    return files


def write_documents(plan: Plan, ckpt: Checkpoint, folder: Path, shard_files: dict, config: bytes) -> dict:
    """Side files, index, config.json (``config``: its bytes), rank folders, and last the manifest."""
    files = {}
    files.update(write_side_files(plan, ckpt, folder))
    files[INDEX_NAME] = write_doc(folder, INDEX_NAME, index_bytes(plan))
    files["config.json"] = write_doc(folder, "config.json", config)
    if plan.options.emit_ranks:
        files.update(write_ranks(plan, folder))
    write_doc(folder, MANIFEST_NAME, manifest_bytes(manifest_base(plan), {**shard_files, **files}))
    return files
