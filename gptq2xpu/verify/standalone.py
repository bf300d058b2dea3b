"""Checks a converted checkpoint on its own (what CI pipelines run on shards they receive).

* every file in ``gptq2xpu-manifest.json`` exists with its size and sha256, and no other file is there;
* the index and the shards agree (no tensor missing or extra; headers validated as untrusted input);
* every converted MoE layer named in the config block has exactly its four tensors, with the
  contract's dtypes and shapes, group sizes the kernel runs (32/64/128/256), the recorded scale
  dtype and finite scales, and no per-expert leftovers;
* routers named in the block are present, and float unless recorded as passed-through quantized.

Nothing here imports the converter's repack code.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract import (
    CONFIG_BLOCK,
    EXPERT_TENSORS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    W2_QWEIGHT,
    W2_SCALES,
    W13_QWEIGHT,
    W13_SCALES,
    ConvertedBlock,
    ConvertedLayer,
    parse_block,
)
from ..errors import InputError
from ..read.checkpoint import Checkpoint, open_checkpoint
from ..read.paths import Folder, check_member_name, walk

FLOAT = {"F16", "BF16", "F32", "F64"}


@dataclass
class Findings:
    """Results of named checks; a failure never stops the other checks."""

    checks: list[dict] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    def fail(self, name: str, detail: str) -> bool:
        return self.add(name, False, detail)

    @property
    def failures(self) -> list[str]:
        return [f"{c['check']}: {c['detail']}" for c in self.checks if not c["ok"]]

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)  # stays in L2/L3 between the read and the hash (8 MiB: ~10 % slower)
    view = memoryview(buf)
    with open(fd, "rb", buffering=0, closefd=True) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def listing(problems: list[str], limit: int = 10) -> str:
    """Some problems and how many more: a detail line stays short whatever was found."""
    shown = "; ".join(problems[:limit])
    return shown + (f" (and {len(problems) - limit} more)" if len(problems) > limit else "")


def check_manifest(folder: Path, findings: Findings, jobs: int = 2,
                   progress: Callable[[int, int], None] | None = None) -> dict | None:
    """Every manifest file present with its size and sha256; nothing else in the folder (no
    unlisted file or folder, no link, FIFO or device).  ``progress(bytes hashed, bytes to hash)``
    is called as each file is done."""
    reader = Folder(folder, links="none")
    if not reader.exists(MANIFEST_NAME):
        findings.fail("manifest", f"{MANIFEST_NAME} is missing: not a gptq2xpu output, or an incomplete one")
        return None
    try:
        doc = reader.read_json(MANIFEST_NAME)
        files = doc.get("files")
        if not isinstance(files, dict):
            raise InputError("'files' is not an object")
        for name, rec in files.items():
            check_member_name(name, MANIFEST_NAME)
            if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and type(rec.get("size")) is int):
                raise InputError(f"entry {name[:80]!r} needs sha256 and size")
        tree = walk(folder)
    except InputError as exc:
        findings.fail("manifest", f"{MANIFEST_NAME} is malformed, or the folder cannot be listed ({exc})")
        return None

    def one(item):
        name, rec = item
        size = tree.files.get(name)
        if size is None:
            return f"{name}: listed in the manifest but missing" if name not in tree.others else None
        if size != rec["size"]:
            return f"{name}: size {size}, manifest says {rec['size']}"
        try:
            digest = sha256_fd(reader.open(name))
        except InputError as exc:
            return str(exc)
        if digest != rec["sha256"]:
            return f"{name}: sha256 {digest[:16]}..., manifest says {rec['sha256'][:16]}..."
        return None

    items = sorted(files.items(), key=lambda kv: -kv[1]["size"])  # biggest first keeps the pool busy
    total = sum(tree.files.get(name, 0) for name, _ in items)
    hashed = [0]
    lock = threading.Lock()

    def counted(item):
        problem = one(item)
        if progress is not None:
            with lock:
                hashed[0] += tree.files.get(item[0], 0)
                progress(hashed[0], total)
        return problem

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        problems = [p for p in pool.map(counted, items) if p]
    problems += [f"{name}: is {kind}; a gptq2xpu output holds plain files only"
                 for name, kind in sorted(tree.others.items())]
    extra = sorted(set(tree.files) - set(files) - {MANIFEST_NAME})
    problems += [f"{name}: present but not listed in the manifest" for name in extra]
    holders = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
    problems += [f"{name}/: a folder the manifest does not account for" for name in sorted(set(tree.folders) - holders)]
    findings.add("manifest", not problems,
                 listing(problems) if problems else f"{len(files)} files, sizes and sha256 match")
    return doc


def _scales_finite(ckpt: Checkpoint, name: str) -> bool:
    ref = ckpt.ref(name)
    raw = ckpt.read(name)
    if ref.dtype == "BF16":
        u = raw.view(np.uint16)
        return not bool(((u & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(raw).all())


def check_layout(ckpt: Checkpoint, block: ConvertedBlock, findings: Findings) -> set[str]:
    """The converted tensors against the contract and the config block; returns the prefixes of
    the layers whose tensors disagree with the block (nothing may read them by the block's shapes)."""
    problems = []
    mismatched = set()
    for layer in block.layers.values():
        found = _check_layer(ckpt, layer)
        if found:
            mismatched.add(layer.prefix)
        problems += found
    findings.add("layout", not problems, listing(problems, 20) if problems else
                 f"{len(block.layers)} layers: dtypes, shapes, groups, scale dtype, finite scales")

    leftovers = []
    for prefix in block.layers:
        pat = re.compile(re.escape(prefix) + r"\.experts\.\d+\.")
        leftovers += [n for n in ckpt.tensors if pat.match(n)]
    findings.add("no leftovers", not leftovers,
                 f"per-expert tensors left in converted layers: {', '.join(leftovers[:5])}" if leftovers
                 else "no per-expert tensors in converted layers")

    bad = []
    for name in block.routers:
        ref = ckpt.tensors.get(name)
        if ref is None:
            bad.append(f"{name} missing")
        elif name.endswith(".weight") and ref.dtype not in FLOAT:
            bad.append(f"{name} is {ref.dtype}, not float")
    for name in block.quantized_routers:
        if name not in ckpt.tensors:
            bad.append(f"{name} (quantized router, passed through) missing")
    for name in block.dequantized_routers:
        ref = ckpt.tensors.get(name)
        if ref is None or ref.dtype not in FLOAT:
            bad.append(f"{name} (dequantized router) missing or not float")
    n_routers = len(block.routers) + len(block.dequantized_routers)
    findings.add("routers", not bad, listing(bad) if bad else f"{n_routers} router tensors present and float")
    return mismatched


def check_ranks(folder: Path, ckpt: Checkpoint, block: ConvertedBlock, findings: Findings) -> None:
    """Each tensor-parallel rank folder holds exactly its slice of the full tensors."""
    if not block.tp_ranks:
        return
    t = block.tp_size
    problems = []
    for r, rel in enumerate(block.tp_ranks):
        try:
            Folder(folder, links="none").check(rel)
            rk = open_checkpoint(folder / rel, links="none")
        except InputError as exc:
            problems.append(str(exc))
            continue
        with rk:
            for layer in block.layers.values():
                p = layer.padded_intermediate_size
                pt = p // t
                for what in EXPERT_TENSORS:
                    name = layer.tensor(what)
                    if name not in rk.tensors or name not in ckpt.tensors:
                        problems.append(f"{rel}: {name} missing")
                        continue
                    whole = _as_words(ckpt, name)
                    part = _as_words(rk, name)
                    if whole.ndim != 3 or part.ndim != 3 or whole.shape[:1] != part.shape[:1]:
                        ok = False
                    elif what.startswith("w13"):
                        rows = part.shape[1] // 2
                        want = np.concatenate([whole[:, r * rows : (r + 1) * rows],
                                               whole[:, p + r * rows : p + (r + 1) * rows]], axis=1)
                        ok = rows * t == p and want.shape == part.shape and np.array_equal(want, part)
                    else:
                        cols = part.shape[2]
                        ok = cols * t == whole.shape[2] and np.array_equal(whole[:, :, r * cols : (r + 1) * cols], part)
                    if not ok:
                        problems.append(f"{rel}: {name} is not rank {r}'s slice of the full tensor "
                                        f"(N slice {r * pt}..{(r + 1) * pt})")
    findings.add("tensor-parallel ranks", not problems, listing(problems) if problems else
                 f"{t} rank folders, each exactly its slice of every converted tensor")


def _as_words(ckpt: Checkpoint, name: str) -> np.ndarray:
    ref = ckpt.ref(name)
    raw = ckpt.read(name)
    return raw.view(np.uint16).reshape(ref.shape) if ref.dtype in ("F16", "BF16") else raw.reshape(ref.shape)


def _check_layer(ckpt: Checkpoint, layer: ConvertedLayer) -> list[str]:
    out = []
    sd = layer.scale_dtype
    dtypes = {W13_QWEIGHT: "U8", W13_SCALES: sd, W2_QWEIGHT: "U8", W2_SCALES: sd}
    for what, shape in layer.shapes.items():
        name = layer.tensor(what)
        ref = ckpt.tensors.get(name)
        if ref is None:
            out.append(f"{name}: missing")
            continue
        if ref.dtype != dtypes[what] or tuple(ref.shape) != shape:
            out.append(f"{name}: {ref.dtype}{list(ref.shape)}, contract says {dtypes[what]}{list(shape)}")
            continue
        if what.endswith("scales") and not _scales_finite(ckpt, name):
            out.append(f"{name}: non-finite scales")
    return out


def open_output(folder: Path) -> tuple[Checkpoint, dict, ConvertedBlock | str]:
    """Open a converted folder (untrusted: no links, validated like any checkpoint) and its config
    block: ``(checkpoint, raw block, parsed block or why it does not parse)``.

    Raises InputError when the folder is not a gptq2xpu output at all (no config block)."""
    ckpt = open_checkpoint(folder, links="none")
    raw = ckpt.config.get(CONFIG_BLOCK)
    if raw is None:
        ckpt.close()
        hint = (" (it looks like a GPTQ checkpoint: convert it first)"
                if "quantization_config" in ckpt.config or ckpt.folder.exists("quantize_config.json") else "")
        raise InputError(f"{folder}: not a gptq2xpu output: its config.json has no '{CONFIG_BLOCK}' block{hint}")
    try:
        return ckpt, raw, parse_block(raw)
    except InputError as exc:
        return ckpt, raw, str(exc)


def check_output_folder(folder: Path) -> None:
    """OUTPUT must be a folder; say plainly what else it is."""
    if folder.is_dir():
        return
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    raise InputError(f"{folder}: is a file; verify takes the converted folder (the one holding config.json and "
                     f"{MANIFEST_NAME})")


def verify_standalone(folder: Path, findings: Findings, jobs: int = 2, *, skip_manifest: bool = False
                      ) -> tuple[Checkpoint | None, ConvertedBlock | None, set[str]]:
    """All standalone checks; ``skip_manifest`` when the caller hashes the manifest files itself
    (``runner.verify`` does, in the background, overlapping the hashing with the other checks).
    Returns the opened output, its validated config block and the prefixes of the layers whose
    tensors disagree with the block (Nones and nothing when the output cannot be opened or its
    block does not parse)."""
    folder = Path(folder)
    check_output_folder(folder)
    if not skip_manifest:
        check_manifest(folder, findings, jobs)
    try:
        ckpt, _, block = open_output(folder)
    except InputError as exc:
        if "not a gptq2xpu output" in str(exc):
            raise
        findings.fail("index and shards", str(exc))
        return None, None, set()
    findings.add("index and shards", True, f"{len(ckpt.shards)} shard(s), {len(ckpt.tensors)} tensors, headers "
                 "valid, index agrees")
    if isinstance(block, str):
        findings.fail("config block", block)
        ckpt.close()
        return None, None, set()
    findings.add("config block", True, f"format_version {FORMAT_VERSION}, nibble_encoding {block.nibble_encoding}, "
                 f"{len(block.layers)} converted layer(s)")
    mismatched = check_layout(ckpt, block, findings)
    check_ranks(folder, ckpt, block, findings)
    return ckpt, block, mismatched
