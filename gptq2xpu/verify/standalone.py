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
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..contract import (
    CONFIG_BLOCK,
    EXPERT_TENSORS,
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARTS_DIR,
    W2_QWEIGHT,
    W2_SCALES,
    W13_QWEIGHT,
    W13_SCALES,
    ConvertedBlock,
    ConvertedLayer,
    check_format_version,
    parse_block,
)
from ..errors import InputError
from ..interrupts import mapped, signals_to_the_main_thread
from ..read.checkpoint import Checkpoint, open_checkpoint
from ..read.paths import Folder, check_member_name, walk
from ..safetensors_io import DTYPE_SIZES

FLOAT = {"F16", "BF16", "F32", "F64"}
#: Tensor data is checked in pieces of at most this many bytes: what verify holds does not grow
#: with the size a (possibly crafted) header claims.
CHUNK_BYTES = 16 << 20


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


_LAYER_LISTS = ("converted", "passthrough", "unconverted")


def _check_manifest_fields(doc: dict, reader: Folder) -> None:
    """The manifest's format name and its layer lists; the converted ones must be the layers the
    config block describes (when config.json can be read: its own check reports it otherwise)."""
    if doc.get("format") != MANIFEST_FORMAT:
        raise InputError(f"'format' is {str(doc.get('format'))[:40]!r}, not {MANIFEST_FORMAT!r}")
    layers = doc.get("layers")
    if not (isinstance(layers, dict) and set(layers) == set(_LAYER_LISTS) and all(
            isinstance(layers[k], list) and all(isinstance(x, str) for x in layers[k]) for k in _LAYER_LISTS)):
        raise InputError(f"'layers' must hold the lists {', '.join(_LAYER_LISTS)} of layer names")
    try:
        block = reader.read_json("config.json").get(CONFIG_BLOCK)
    except InputError:
        return
    if isinstance(block, dict) and isinstance(block.get("layers"), dict) \
            and sorted(layers["converted"]) != sorted(block["layers"]):
        raise InputError("'layers.converted' does not list the layers config.json's block describes")


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
        check_format_version(doc, MANIFEST_NAME)
        _check_manifest_fields(doc, reader)
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

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="gptq2xpu-hash",
                            initializer=signals_to_the_main_thread) as pool:
        problems = [p for p in mapped(pool, counted, items) if p]
    problems += [f"{name}: is {kind}; a gptq2xpu output holds plain files only"
                 for name, kind in sorted(tree.others.items())]
    extra = sorted(set(tree.files) - set(files) - {MANIFEST_NAME})
    problems += [f"{name}: present but not listed in the manifest" for name in extra]
    holders = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
    problems += [f"{name}/: a folder the manifest does not account for" for name in sorted(set(tree.folders) - holders)]
    findings.add("manifest", not problems,
                 listing(problems) if problems else f"{len(files)} files, sizes and sha256 match")
    return doc


def _pieces(ckpt: Checkpoint, name: str) -> Iterator[np.ndarray]:
    """The tensor's bytes, in successive views of one reused buffer of at most CHUNK_BYTES (a
    multiple of 8, so every piece holds whole elements)."""
    ref = ckpt.ref(name)
    buf = np.empty(min(CHUNK_BYTES, ref.nbytes), dtype=np.uint8)
    for offset in range(0, ref.nbytes, CHUNK_BYTES):
        piece = buf[: min(CHUNK_BYTES, ref.nbytes - offset)]
        ckpt.read_into(ref, piece, offset=offset)
        yield piece


def _scales_finite(ckpt: Checkpoint, name: str) -> bool:
    """No inf or NaN among the scales (F16 or BF16), read piece by piece."""
    bf16 = ckpt.ref(name).dtype == "BF16"
    for piece in _pieces(ckpt, name):
        if bf16:
            if ((piece.view(np.uint16) & 0x7F80) == 0x7F80).any():
                return False
        elif not np.isfinite(piece.view(np.float16)).all():
            return False
    return True


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


def check_config_dims(ckpt: Checkpoint, block: ConvertedBlock, findings: Findings) -> None:
    """config.json's expert dimensions (what a runtime allocates each MoE layer with) are the ones
    each converted layer's tensors hold (``docs/checks.md``, Config dimensions)."""
    from ..naming import detect_family
    from ..plan.runtime_dims import disagreement, runtime_dims

    dims = runtime_dims(ckpt.config, detect_family(ckpt.config, ckpt.tensors))
    problems = [f"{prefix}: {why}" for prefix, layer in block.layers.items()
                if (why := disagreement(dims, layer.experts, layer.hidden_size, layer.intermediate_size))]
    findings.add("config dimensions", not problems, listing(problems) if problems else
                 f"config.json's {', '.join(dims) or 'no expert dimension keys'} agree with the tensors")


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
                    ok = _is_rank_slice(ckpt, rk, name, what, r, t, p)
                    if not ok:
                        problems.append(f"{rel}: {name} is not rank {r}'s slice of the full tensor "
                                        f"(N slice {r * pt}..{(r + 1) * pt})")
    findings.add("tensor-parallel ranks", not problems, listing(problems) if problems else
                 f"{t} rank folders, each exactly its slice of every converted tensor")


def _is_rank_slice(ckpt: Checkpoint, rk: Checkpoint, name: str, what: str, r: int, t: int, p: int) -> bool:
    """Whether rank ``r``'s ``name`` is its slice of the full tensor (w13: N rows of both halves at
    padded size ``p``; w2: K columns), compared one expert at a time so memory stays per expert."""
    whole_ref, part_ref = ckpt.ref(name), rk.ref(name)
    ws, ps = tuple(whole_ref.shape), tuple(part_ref.shape)
    if whole_ref.dtype != part_ref.dtype or len(ws) != 3 or len(ps) != 3 or ws[0] != ps[0]:
        return False
    if what.startswith("w13"):
        rows = ps[1] // 2
        if rows * t != p or ps[1:] != (2 * rows, ws[2]) or ws[1] < 2 * p:
            return False
    else:
        cols = ps[2]
        if cols * t != ws[2] or ps[1] != ws[1]:
            return False
    item = DTYPE_SIZES[whole_ref.dtype]
    for e in range(ws[0]):
        whole, part = _expert_rows(ckpt, name, e), _expert_rows(rk, name, e)
        if what.startswith("w13"):
            want = np.concatenate([whole[r * rows : (r + 1) * rows], whole[p + r * rows : p + (r + 1) * rows]])
        else:
            want = whole[:, r * cols * item : (r + 1) * cols * item]
        if not np.array_equal(want, part):
            return False
    return True


def _expert_rows(ckpt: Checkpoint, name: str, e: int) -> np.ndarray:
    """Expert ``e`` of a 3-D expert tensor as a (rows, bytes per row) array of its raw bytes."""
    ref = ckpt.ref(name)
    shape = tuple(ref.shape)
    per = ref.nbytes // shape[0]
    buf = np.empty(per, dtype=np.uint8)
    ckpt.read_into(ref, buf, offset=e * per)
    return buf.reshape(shape[1], shape[2] * DTYPE_SIZES[ref.dtype])


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


def check_compressed_tensors(ckpt: Checkpoint, block: ConvertedBlock, findings: Findings):
    """A compressed-tensors output: its per-expert tensors stack into the block's layout (the
    returned view presents them stacked, so the checks of the stacked layout run on it), every
    ``weight_shape`` holds its projection's shape, the linears outside the MoE layers are as the
    block says, and config.json's ``quantization_config`` is a valid compressed-tensors one."""
    from .ct_config import config_problems
    from .ct_view import StackedView, linear_problems, part_problems, shape_problems

    broken, problems = set(), []
    for prefix, layer in block.layers.items():
        found = part_problems(ckpt, layer)
        found = found or shape_problems(ckpt, layer)
        if found:
            broken.add(prefix)
        problems += found
    findings.add("compressed-tensors experts", not problems, listing(problems, 20) if problems else
                 f"{len(block.layers)} layer(s): every expert's weight_packed, weight_scale and weight_shape as the "
                 "block says")
    lin = linear_problems(ckpt, block, _scales_finite)
    findings.add("compressed-tensors linears", not lin, listing(lin, 20) if lin else
                 f"{len(block.linears)} linear(s) outside the MoE layers: dtypes, shapes, weight_shape, finite scales")
    cfg, how = config_problems(ckpt.config, block, broken)
    findings.add("quantization_config", not cfg, listing(cfg) if cfg else
                 f"compressed-tensors pack-quantized, weight-only 4-bit symmetric groups, every 4-bit module targeted "
                 f"with its group size and every router ignored ({how})")
    return StackedView(ckpt, block, skip=broken)


def open_output(folder: Path) -> tuple[Checkpoint, ConvertedBlock | str]:
    """Open a converted folder (untrusted: no links, validated like any checkpoint) and its config
    block: ``(checkpoint, parsed block or why it does not parse)``.

    Raises InputError when the folder is not a gptq2xpu output at all (no config block)."""
    ckpt = open_checkpoint(folder, links="none")
    raw = ckpt.config.get(CONFIG_BLOCK)
    if raw is None:
        ckpt.close()
        hint = (" (it looks like a GPTQ checkpoint: convert it first)"
                if "quantization_config" in ckpt.config or ckpt.folder.exists("quantize_config.json") else "")
        raise InputError(f"{folder}: not a gptq2xpu output: its config.json has no '{CONFIG_BLOCK}' block{hint}")
    try:
        return ckpt, parse_block(raw)
    except InputError as exc:
        return ckpt, str(exc)


def check_output_folder(folder: Path) -> None:
    """OUTPUT must be a folder; say plainly what else it is."""
    if folder.is_dir():
        return
    if not folder.exists():
        raise InputError(f"{folder}: no such folder")
    raise InputError(f"{folder}: is a file; verify takes the converted folder (the one holding config.json and "
                     f"{MANIFEST_NAME})")


def check_some_output(folder: Path) -> None:
    """A folder holding neither a manifest nor a config.json is no gptq2xpu output at all (bad
    input, exit 3); one holding either is judged by the checks (a damaged output fails them)."""
    if not any(os.path.lexists(folder / name) for name in (MANIFEST_NAME, "config.json")):
        if os.path.isdir(folder / PARTS_DIR):
            raise InputError(f"{folder}: a split conversion not finalized yet: once every `convert --part` "
                             f"has finished, run `gptq2xpu finalize {folder}`, then verify it")
        raise InputError(f"{folder}: not a gptq2xpu output: it holds neither {MANIFEST_NAME} nor config.json")


def verify_standalone(folder: Path, findings: Findings, jobs: int = 2, *, skip_manifest: bool = False
                      ) -> tuple[Checkpoint | None, ConvertedBlock | None, set[str]]:
    """All standalone checks; ``skip_manifest`` when the caller hashes the manifest files itself
    (``runner.verify`` does, in the background, overlapping the hashing with the other checks).
    Returns the opened output, its validated config block and the prefixes of the layers whose
    tensors disagree with the block (Nones and nothing when the output cannot be opened or its
    block does not parse)."""
    folder = Path(folder)
    check_output_folder(folder)
    check_some_output(folder)
    if not skip_manifest:
        check_manifest(folder, findings, jobs)
    try:
        ckpt, block = open_output(folder)
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
    kind = ", compressed-tensors" if block.compressed_tensors else ""
    findings.add("config block", True, f"format_version {FORMAT_VERSION}, nibble_encoding {block.nibble_encoding}, "
                 f"{len(block.layers)} converted layer(s){kind}")
    if block.compressed_tensors:
        ckpt = check_compressed_tensors(ckpt, block, findings)
    else:
        from .serving_config import declaration_problems

        declared = declaration_problems(ckpt.config)
        findings.add("quantization_config", not declared, listing(declared) if declared else
                     "declares the gptq2xpu method, the xpu format and the source's description")
    mismatched = check_layout(ckpt, block, findings)
    check_config_dims(ckpt, block, findings)
    check_ranks(folder, ckpt, block, findings)
    return ckpt, block, mismatched
