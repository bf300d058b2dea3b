"""The documents beside the shards: config.json with its block, the index, the manifest, side files.

Each is written through a temporary name and renamed into place (:func:`atomic_write`), with its
sha256 and size for the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .. import __version__, serving
from ..contract import CONFIG_BLOCK, FORMAT_VERSION, INDEX_NAME, MANIFEST_FORMAT, MANIFEST_NAME
from ..errors import InputError, io_error
from ..naming import natural_key
from ..plan import Plan
from ..read import Checkpoint
from ..read.checkpoint import PICKLE_SUFFIXES
from ..read.paths import MAX_CONFIG_BYTES, Folder, portable_name
from .output import lock_file

WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
SKIP_FILES = {"config.json", INDEX_NAME, MANIFEST_NAME}


def side_files(folder: Folder) -> tuple[list[str], list[str]]:
    """Top-level files copied unchanged: tokenizer, generation, chat template, README, licence,
    other configs; and warnings about files left out.  Weights (safetensors, pickles...), the index,
    config.json and hidden files are not side files.

    A file that is a link pointing outside the checkpoint is refused: copying it would put an
    arbitrary file of this machine (``tokenizer.json -> ~/.ssh/id_rsa``) into OUTPUT.  Names a
    converted folder may not hold (``notes:v1.txt``, ``a\\b.md``) and what is not a regular file
    (FIFOs, devices) are left out, with a warning."""
    names, warnings = [], []
    for p in sorted(folder.root.iterdir()):
        name = p.name
        if name.startswith(".") or name in SKIP_FILES or p.is_dir():
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".safetensors.index.json"):
            continue
        if not portable_name(name):
            warnings.append(f"{name!r}: not copied into OUTPUT (the name is not a portable file name)")
            continue
        folder.check(name, f"{name} (it would be copied into OUTPUT)")
        if not p.is_file():
            warnings.append(f"{name}: not copied into OUTPUT (not a regular file)")
            continue
        names.append(name)
    return names, warnings


def config_bytes(plan: Plan, ckpt: Checkpoint) -> bytes:
    """OUTPUT's config.json, encoded once.  Indentation can make it several times the source's size,
    so one over the cap every reader of a converted folder enforces is refused before anything is
    written: convert never produces an output its own verify would reject."""
    cfg = serving.serving_config(ckpt.config, plan)  # quantization_config: the gptq2xpu method
    cfg[CONFIG_BLOCK] = plan.config_block()
    data = (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if len(data) > MAX_CONFIG_BYTES:
        raise InputError(f"{ckpt.root / 'config.json'}: written into OUTPUT it would be {len(data)} bytes, more than "
                         f"the {MAX_CONFIG_BYTES} a config.json may have")
    return data


def index_bytes(plan: Plan) -> bytes:
    wm = {}
    total = 0
    for s in plan.shards:
        for t in s.layout.tensors:
            wm[t.name] = s.name
            total += t.nbytes
    doc = {"metadata": {"total_size": total, "format": "gptq2xpu"},
           "weight_map": {k: wm[k] for k in sorted(wm, key=natural_key)}}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def manifest_base(plan: Plan) -> dict:
    """What the manifest says besides the file list (kept by split runs until ``finalize``)."""
    return {
        "tool_version": __version__,
        "source_fingerprint": plan.fingerprint,
        "layers": {
            "converted": [layer.prefix for layer in plan.converted],
            "passthrough": [layer.prefix for layer in plan.layers
                            if layer.action == "passthrough" and layer.kind != "unsupported"],
            "unconverted": [layer.prefix for layer in plan.layers if layer.kind == "unsupported"],
        },
    }


def manifest_bytes(base: dict, files: dict[str, dict]) -> bytes:
    doc = {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": base["tool_version"],
        "source_fingerprint": base["source_fingerprint"],
        "files": {k: files[k] for k in sorted(files)},
        "layers": base["layers"],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def side_documents(plan: Plan, ckpt: Checkpoint) -> dict[str, bytes | None]:
    """Every top-level side file OUTPUT gets: the bytes to write (quantization configs and the model
    card, rewritten for serving), or None to copy the source's file unchanged."""
    return serving.side_documents(plan, ckpt.folder, side_files(ckpt.folder)[0])


def write_side_files(plan: Plan, ckpt: Checkpoint, folder: Path) -> dict:
    """Write the side documents into ``folder``; returns their manifest records."""
    return {name: copy_file(ckpt.folder, name, folder) if data is None else write_doc(folder, name, data)
            for name, data in side_documents(plan, ckpt).items()}


#: The longest file name :func:`temp_stem` keeps: ``.<name>.tmp-<pid>-<8 random>`` then stays
#: within the usual NAME_MAX of 255 bytes.
MAX_TEMP_STEM = 255 - len("..tmp--") - 10 - 8


def temp_stem(name: str) -> str:
    """What the temporary name of ``folder/name`` holds of ``name``: the name itself, or, for a
    name so long that the temporary name would pass NAME_MAX, a digest of it (a side file may
    legally be named with 255 bytes)."""
    raw = os.fsencode(name)
    if len(raw) <= MAX_TEMP_STEM:
        return name
    return "~" + hashlib.sha256(raw).hexdigest()[:32]


def open_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new file beside ``folder/name`` under a fresh hidden name: created exclusively, never
    through a link planted there (``O_EXCL``), mode 0644, and locked (``flock``) for as long as the
    descriptor (or a duplicate of it) is open, so that ``finalize`` never removes a temporary file
    a live run is writing.  Returns (descriptor, path)."""
    for _ in range(100):
        fd, tmp = tempfile.mkstemp(prefix=f".{temp_stem(name)}.tmp-{os.getpid()}-", dir=folder)
        try:
            locked = lock_file(fd)
            # a finalize that took the lock first removed the file: make another
            if locked is False or os.fstat(fd).st_ino != os.stat(tmp, follow_symlinks=False).st_ino:
                raise FileNotFoundError(tmp)
            os.fchmod(fd, 0o644)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, Path(tmp)
    raise OSError(errno.EAGAIN, "cannot create a temporary file that stays", str(folder))


def atomic_write(folder: Path, name: str, blocks, action: str) -> dict:
    """Write ``blocks`` (bytes) to ``folder/name`` through a temporary name; sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    tmp = None
    try:
        fd, tmp = open_temp(folder, name)
        with open(fd, "wb", closefd=True) as fh:
            for block in blocks:
                digest.update(block)
                fh.write(block)
                size += len(block)
            fh.flush()
            os.replace(tmp, folder / name)  # before closing: the lock covers the file until it has its name
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise io_error(action, folder / name, exc) from None
    return {"sha256": digest.hexdigest(), "size": size}


def write_doc(folder: Path, name: str, data: bytes) -> dict:
    return atomic_write(folder, name, [data], "cannot write")


def copy_file(source: Folder, name: str, folder: Path) -> dict:
    """Copy side file ``name`` of the source (opened through its link policy) into ``folder``."""
    fd = source.open(name)

    def blocks():
        with open(fd, "rb", closefd=True) as fi:
            while block := fi.read(1 << 20):
                yield block

    return atomic_write(folder, name, blocks(), "cannot copy into")
