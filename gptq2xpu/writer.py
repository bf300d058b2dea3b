"""Execute a :class:`~gptq2xpu.plan.Plan`: stream every planned tensor into its shard, atomically.

How bytes move
--------------
Each output shard is a fixed sequence of chunks (its header, then every tensor in planned order),
and the plan fixes every chunk's offset.  A chunk is produced by a small task: copy a slice of a
source tensor, build one expert's w13 or w2 rows, or a layer's scales.  Up to ``jobs`` worker
threads run tasks ahead and ``pwrite`` each chunk at its offset (numpy, ``pread``/``pwrite`` and
hashing release the GIL); one thread feeds the chunks to sha256 strictly in file order, so files
and hashes are identical whatever ``jobs`` is.  Buffers are pooled and reused, so memory stays at
a few chunks (a few MB for real models) whatever the model size: nothing holds a layer, a shard or
a model, and no source file is memory-mapped.

Atomicity
---------
A full run builds everything in a hidden sibling folder ``.<OUTPUT>.gptq2xpu-partial-<pid>`` and
renames it to OUTPUT only when complete (an existing OUTPUT, with ``--overwrite``, is moved aside
first and removed after).  A killed run leaves only the hidden folder, which the next run removes.
A split run (``--part i/n``) writes each of its shards to a temporary name and renames it; the
``finalize`` step writes index, config and manifest once every part is there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import CONFIG_BLOCK, FORMAT_VERSION, MANIFEST_NAME, __version__, serving
from .errors import InputError, UsageError, io_error
from .formats import FORMATS
from .naming import natural_key
from .plan import Plan, ShardPlan
from .safetensors_io import ShardLayout
from .repack import (
    fill_w13,
    fill_w2,
    from_float32,
    layer_scales,
    to_float32,
)
from .read import Checkpoint
from .read.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, _inside

COPY_CHUNK = 16 * 1024 * 1024
PARTS_DIR = ".gptq2xpu-parts"
STAGE_TAG = ".gptq2xpu-partial-"
OLD_TAG = ".gptq2xpu-old-"
WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
SKIP_FILES = {"config.json", INDEX_NAME, MANIFEST_NAME}


# ------------------------------------------------------------------------------ buffers


class BufferPool:
    """Reusable byte buffers keyed by size: fresh pages cost more than the copy itself."""

    def __init__(self):
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            lst = self._free.get(nbytes)
            if lst:
                return lst.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(buf.nbytes, []).append(buf)


@dataclass
class Chunk:
    data: memoryview
    release: Callable[[], None] | None = None


# ------------------------------------------------------------------------------ chunk tasks


class ShardSource:
    """Turns a shard's planned items into an ordered list of chunk-producing tasks."""

    def __init__(self, plan: Plan, ckpt: Checkpoint, pool: BufferPool):
        self.plan = plan
        self.ckpt = ckpt
        self.pool = pool

    def tasks(self, shard: ShardPlan) -> list[tuple[int, Callable[[], Chunk]]]:
        """``(file offset, task)`` pairs in file order; each task's chunk starts at its offset."""
        out: list[tuple[int, Callable[[], Chunk]]] = [(0, lambda h=shard.layout.header: Chunk(memoryview(h)))]
        for item in shard.items:
            kind = item.source
            start = shard.layout.offsets[item.tensor.name][0]
            if kind == "copy":
                out.extend(self._copy_tasks(item.ref, start))
            elif kind in ("w13_qweight", "w2_qweight"):
                layer = self.plan.layer(item.ref)
                fn = self._w13 if kind == "w13_qweight" else self._w2
                step = item.tensor.nbytes // layer.experts
                out.extend((start + e * step, lambda e=e, l=layer, f=fn: f(l, e)) for e in range(layer.experts))
            elif kind in ("w13_scales", "w2_scales"):
                out.append((start, lambda l=self.plan.layer(item.ref), k=kind: self._scales(l, k)))
            elif kind == "router":
                out.append((start, lambda l=self.plan.layer(item.ref), t=item.tensor: self._router(l, t)))
            else:  # pragma: no cover - plan and writer are built together
                raise AssertionError(kind)
        return out

    def _copy_tasks(self, name: str, start: int):
        ref = self.ckpt.ref(name)
        for off in range(0, ref.nbytes, COPY_CHUNK):
            size = min(COPY_CHUNK, ref.nbytes - off)

            def task(off=off, size=size, ref=ref):
                buf = self.pool.get(size)
                self.ckpt.read_into(ref, buf, offset=off)
                return Chunk(memoryview(buf), lambda: self.pool.put(buf))

            yield start + off, task

    def _rows_reader(self, layer, e, role, scratch):
        fmt = FORMATS[layer.format]
        fields = layer.fields(e, role)
        spec = layer.specs[role]
        return lambda dst: fmt.read_rows(self.ckpt, fields, spec, dst, scratch)

    def _w13(self, layer, e) -> Chunk:
        geo = layer.geometry
        words = 2 * geo.padded * geo.hidden // 8
        buf = self.pool.get(words * 4)
        scratch = self.pool.get(geo.intermediate * geo.hidden // 8 * 4)
        out = buf.view(np.int32).reshape(2 * geo.padded, geo.hidden // 8)
        sc = scratch.view(np.int32)
        fill_w13(out, geo, self._rows_reader(layer, e, "gate", sc), self._rows_reader(layer, e, "up", sc),
                 self.plan.options.nibble_encoding)
        self.pool.put(scratch)
        return Chunk(memoryview(buf), lambda: self.pool.put(buf))

    def _w2(self, layer, e) -> Chunk:
        geo = layer.geometry
        buf = self.pool.get(geo.hidden * geo.padded // 8 * 4)
        scratch = self.pool.get(geo.hidden * geo.intermediate // 8 * 4 * 2)
        out = buf.view(np.int32).reshape(geo.hidden, geo.padded // 8)
        sc = scratch.view(np.int32)
        half = geo.hidden * geo.intermediate // 8
        fill_w2(out, geo, self._rows_reader(layer, e, "down", sc[:half]), sc[half:], self.plan.options.nibble_encoding)
        self.pool.put(scratch)
        return Chunk(memoryview(buf), lambda: self.pool.put(buf))

    def _scales(self, layer, kind) -> Chunk:
        fmt = FORMATS[layer.format]
        roles = ("gate", "up") if kind == "w13_scales" else ("down",)
        arr = layer_scales(
            lambda e, role: fmt.read_scales(self.ckpt, layer.fields(e, role), layer.specs[role]),
            layer.geometry,
            roles=roles,
            src_groups=layer.source_groups,
            src_dtype=layer.source_scale_dtype,
            dst_dtype=layer.scale_dtype,
        )
        return Chunk(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

    def _router(self, layer, tensor) -> Chunk:
        w = dequantize_gptq_linear(self.ckpt, {n.rsplit(".", 1)[1]: n for n in layer.routers},
                                   self.plan.quant.checkpoint_format)
        arr = from_float32(np.ascontiguousarray(w), tensor.dtype)
        return Chunk(memoryview(arr.reshape(-1).view(np.uint8)))


def dequantize_gptq_linear(ckpt: Checkpoint, fields: dict[str, str], checkpoint_format: str) -> np.ndarray:
    """A small GPTQ linear (e.g. a quantized router) as a float32 ``[out, in]`` weight."""
    qw = ckpt.read(fields["qweight"]).view(np.uint32)
    rows, n_out = qw.shape
    k = rows * 8
    codes = np.empty((k, n_out), dtype=np.float32)
    for j in range(8):
        codes[j::8] = (qw >> (4 * j)) & 0xF
    scales_ref = ckpt.ref(fields["scales"])
    scales = to_float32(ckpt.read(fields["scales"]).view(np.uint16).reshape(scales_ref.shape)
                        if scales_ref.dtype == "BF16" else ckpt.read(fields["scales"]), scales_ref.dtype)
    group = k // scales.shape[0]
    g_idx = ckpt.read(fields["g_idx"]).astype(np.int64) if "g_idx" in fields else np.arange(k) // group
    if "qzeros" in fields:
        qz = ckpt.read(fields["qzeros"]).view(np.uint32)
        zeros = np.empty((qz.shape[0], n_out), dtype=np.float32)
        for j in range(8):
            zeros[:, j::8] = (qz >> (4 * j)) & 0xF
        zeros += 1 if checkpoint_format == "gptq" else 0
    else:
        zeros = np.full((scales.shape[0], n_out), 8, dtype=np.float32)
    w = (codes - zeros[g_idx]) * scales[g_idx]
    return w.T


# ------------------------------------------------------------------------------ shard writing


def _write_all(fd: int, data: memoryview, path, offset: int) -> None:
    view = data.cast("B") if data.format != "B" else data
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise io_error("cannot write", path, exc) from None
        view = view[n:]
        offset += n


class ShardWriter:
    """Writes shards with a bounded look-ahead of worker tasks, hashing in file order.

    Every chunk's place in the file is known from the plan, so the worker that builds a chunk also
    writes it (``pwrite`` at its offset: the copy into the page cache runs in parallel), and this
    thread only feeds the chunks to sha256 strictly in file order -- the one serial step -- and
    recycles their buffers.  Bytes and hashes are the same whatever ``jobs`` is.
    """

    def __init__(self, plan: Plan, ckpt: Checkpoint, jobs: int = 1, progress: Callable[[int], None] | None = None):
        self.plan = plan
        self.ckpt = ckpt
        self.jobs = max(1, int(jobs))
        self.pool = BufferPool()
        self.source = ShardSource(plan, ckpt, self.pool)
        self.progress = progress or (lambda n: None)

    def write(self, shard: ShardPlan, path: Path) -> dict:
        tasks = self.source.tasks(shard)
        digest = hashlib.sha256()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise io_error("cannot create", path, exc) from None
        size = 0
        try:
            # closing() stops the workers (and waits for running ones) before fd is closed
            with contextlib.closing(self._run(tasks, fd, path)) as chunks:
                for offset, chunk in chunks:
                    if offset != size:  # pragma: no cover - guards the planner/writer contract
                        raise AssertionError(f"{shard.name}: chunk at {offset}, expected {size}")
                    digest.update(chunk.data)
                    size += chunk.data.nbytes
                    if chunk.release:
                        chunk.release()
                    self.progress(chunk.data.nbytes)
        finally:
            os.close(fd)
        if size != shard.layout.file_size:  # pragma: no cover - guards the planner/writer contract
            raise AssertionError(f"{shard.name}: wrote {size} bytes, planned {shard.layout.file_size}")
        return {"sha256": digest.hexdigest(), "size": size}

    @staticmethod
    def _produce(offset: int, task, fd: int, path) -> tuple[int, Chunk]:
        chunk = task()
        _write_all(fd, chunk.data, path, offset)
        return offset, chunk

    def _run(self, tasks, fd: int, path):
        if self.jobs == 1:
            for offset, t in tasks:
                yield self._produce(offset, t, fd, path)
            return
        window: deque = deque()
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="gptq2xpu") as ex:
            try:
                for offset, t in tasks:
                    window.append(ex.submit(self._produce, offset, t, fd, path))
                    if len(window) >= self.jobs * 3:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for f in window:
                    f.cancel()


# ------------------------------------------------------------------------------ side documents


def side_files(root: Path, trusted_root: Path | None = None) -> list[str]:
    """Top-level files copied unchanged: tokenizer, generation, chat template, README, licence,
    other configs.  Weights (safetensors, pickles...), the index, config.json and hidden files are not.

    A file that is a link pointing outside ``trusted_root`` (default ``root``) is refused: copying it
    would put an arbitrary file of this machine (``tokenizer.json -> ~/.ssh/id_rsa``) into OUTPUT."""
    root_real = os.path.realpath(trusted_root or root)
    out = []
    for p in sorted(root.iterdir()):
        name = p.name
        if name.startswith(".") or name in SKIP_FILES or not p.is_file():
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".safetensors.index.json"):
            continue
        if not _inside(root_real, p):
            raise InputError(f"{name}: is a link pointing outside the checkpoint folder; it would be copied "
                             "into OUTPUT: replace the link with the file itself")
        out.append(name)
    return out


def config_bytes(plan: Plan, ckpt: Checkpoint) -> bytes:
    cfg = serving.serving_config(ckpt.config, plan)  # quantization_config: the gptq2xpu method
    cfg[CONFIG_BLOCK] = plan.config_block()
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


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
            "converted": [l.prefix for l in plan.converted],
            "passthrough": [l.prefix for l in plan.layers if l.action == "passthrough" and l.kind != "unsupported"],
            "unconverted": [l.prefix for l in plan.layers if l.kind == "unsupported"],
        },
    }


def manifest_bytes(base: dict, files: dict[str, dict]) -> bytes:
    doc = {
        "format": "gptq2xpu-manifest",
        "format_version": FORMAT_VERSION,
        "tool_version": base["tool_version"],
        "source_fingerprint": base["source_fingerprint"],
        "files": {k: files[k] for k in sorted(files)},
        "layers": base["layers"],
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _atomic_write(folder: Path, name: str, blocks, action: str) -> dict:
    """Write ``blocks`` (bytes) to ``folder/name`` through a temporary name; sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            for block in blocks:
                digest.update(block)
                fh.write(block)
                size += len(block)
        os.replace(tmp, folder / name)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise io_error(action, folder / name, exc) from None
    return {"sha256": digest.hexdigest(), "size": size}


def _write_doc(folder: Path, name: str, data: bytes) -> dict:
    return _atomic_write(folder, name, [data], "cannot write")


def _copy_file(src: Path, folder: Path, name: str) -> dict:
    def blocks():
        with open(src, "rb") as fi:
            while block := fi.read(1 << 20):
                yield block

    return _atomic_write(folder, name, blocks(), "cannot copy into")


# ------------------------------------------------------------------------------ output folder safety


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


def _publish(stage: Path, output: Path, overwrite: bool) -> None:
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


# ------------------------------------------------------------------------------ entry points


def write_checkpoint(plan: Plan, ckpt: Checkpoint, output: Path, *, jobs: int = 1, overwrite: bool = False,
                     progress: Callable[[int], None] | None = None,
                     before_publish: Callable[[], None] | None = None) -> dict:
    """Write the whole converted checkpoint at ``output`` (atomically).  Returns the manifest files."""
    output = Path(os.path.abspath(output))  # "." or "out/.." must name the folder, not the cwd entry
    check_output(output, ckpt.root, overwrite=overwrite)
    side_files(ckpt.root, ckpt.trusted_root)  # refuse escaping links before writing anything
    remove_stale(output)
    stage = output.parent / f".{output.name}{STAGE_TAG}{os.getpid()}"
    try:
        stage.mkdir()
    except OSError as exc:
        raise io_error("cannot create", stage, exc) from None
    try:
        files = _write_parts(plan, ckpt, stage, range(len(plan.shards)), jobs, progress)
        files.update(_write_documents(plan, ckpt, stage, files))
        ckpt.check_unchanged()
        if before_publish is not None:
            before_publish()
        _publish(stage, output, overwrite)
        return files
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _write_parts(plan, ckpt, folder: Path, indices, jobs, progress) -> dict:
    writer = ShardWriter(plan, ckpt, jobs, progress)
    files = {}
    for i in indices:
        shard = plan.shards[i]
        tmp = folder / f".{shard.name}.tmp-{os.getpid()}"
        try:
            files[shard.name] = writer.write(shard, tmp)
            ckpt.check_unchanged()  # a few stats per shard: catch a changing source early
            os.replace(tmp, folder / shard.name)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
    return files


def _write_side_files(plan, ckpt, folder: Path) -> dict:
    """Side files: copied, or rewritten for serving (quantization configs, the model card)."""
    docs = serving.side_documents(plan, ckpt.root, side_files(ckpt.root, ckpt.trusted_root))
    return {name: _copy_file(ckpt.root / name, folder, name) if data is None else _write_doc(folder, name, data)
            for name, data in docs.items()}


def _write_documents(plan, ckpt, folder: Path, shard_files: dict) -> dict:
    files = _write_side_files(plan, ckpt, folder)
    files[INDEX_NAME] = _write_doc(folder, INDEX_NAME, index_bytes(plan))
    files["config.json"] = _write_doc(folder, "config.json", config_bytes(plan, ckpt))
    if plan.options.emit_ranks:
        files.update(write_ranks(plan, folder))
    _write_doc(folder, MANIFEST_NAME, manifest_bytes(manifest_base(plan), {**shard_files, **files}))
    return files


# ------------------------------------------------------------------------------ tensor-parallel ranks

RANKS_DIR = "tp-ranks"


def rank_folder(rank: int, size: int) -> str:
    return f"{RANKS_DIR}/rank-{rank:03d}-of-{size:03d}"


def write_ranks(plan: Plan, folder: Path) -> dict:
    """One folder per tensor-parallel rank holding that rank's slice of every converted layer.

    Rank r of T gets, per expert, gate and up rows ``[r*P/T, (r+1)*P/T)`` (w13 and its scales) and
    w2 columns (inputs) ``[r*P/T, (r+1)*P/T)`` with their scale groups, under the same tensor names
    as the full checkpoint.  The bytes are sliced from the full tensors just written, so each rank
    file is exactly a slice of the verified whole.
    """
    from .read.checkpoint import open_checkpoint

    t = plan.options.tp_size
    files: dict[str, dict] = {}
    full = open_checkpoint(folder)
    try:
        for r in range(t):
            sub = folder / rank_folder(r, t)
            try:
                sub.mkdir(parents=True)
            except OSError as exc:
                raise io_error("cannot create", sub, exc) from None
            items = []
            for l in plan.converted:
                for tensor, slicer in _rank_slicers(l, r, t):
                    items.append((tensor, slicer))
            layout = ShardLayout([it[0] for it in items], {"format": "pt", "tp_rank": str(r), "tp_size": str(t)})
            path = sub / "model.safetensors"
            digest = hashlib.sha256()
            try:
                with open(path, "wb") as fh:
                    fh.write(layout.header)
                    digest.update(layout.header)
                    for tensor, slicer in items:
                        for chunk in slicer(full):
                            mv = memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
                            digest.update(mv)
                            fh.write(mv)
            except OSError as exc:
                raise io_error("cannot write", path, exc) from None
            rel = f"{rank_folder(r, t)}/model.safetensors"
            files[rel] = {"sha256": digest.hexdigest(), "size": layout.file_size}
            doc = {"tp_rank": r, "tp_size": t, "layers": {l.prefix: {"intermediate_slice": [r * l.geometry.padded // t, (r + 1) * l.geometry.padded // t]}
                                                          for l in plan.converted}}
            files[f"{rank_folder(r, t)}/rank.json"] = _write_doc(sub, "rank.json", (json.dumps(doc, indent=2) + "\n").encode())
    finally:
        full.close()
    return files


def _rank_slicers(layer, r: int, t: int):
    """(PlannedTensor, slicer) for rank r's four tensors; slicer(full_ckpt) yields arrays per expert."""
    from .safetensors_io import PlannedTensor

    g = layer.geometry
    e, k, p = g.experts, g.hidden, g.padded
    pt = p // t
    sd = layer.scale_dtype
    item = 2 if sd in ("F16", "BF16") else 4
    specs = [
        ("w13_qweight", "U8", (e, 2 * pt, k // 2), 1, (2 * p, k // 2), "rows"),
        ("w13_scales", sd, (e, 2 * pt, k // g.g13), item, (2 * p, k // g.g13), "rows"),
        ("w2_qweight", "U8", (e, k, pt // 2), 1, (k, p // 2), "cols"),
        ("w2_scales", sd, (e, k, pt // g.g2), item, (k, p // g.g2), "cols"),
    ]
    for what, dtype, shape, isz, per_expert, how in specs:
        name = layer.output_name(what)

        def slicer(full, name=name, per_expert=per_expert, how=how, isz=isz, shape=shape):
            ref = full.ref(name)
            rows, cols = per_expert
            buf = np.empty(rows * cols * isz, dtype=np.uint8)
            for ex in range(e):
                full.read_into(ref, buf, offset=ex * buf.nbytes)
                m = buf.reshape(rows, cols * isz)
                if how == "rows":  # gate rows then up rows of this rank
                    yield m[r * pt : (r + 1) * pt]
                    yield m[p + r * pt : p + (r + 1) * pt]
                else:
                    c = shape[2] * isz
                    yield m[:, r * c : (r + 1) * c]

        yield PlannedTensor(name, dtype, shape), slicer


# ------------------------------------------------------------------------------ split runs


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
    _write_doc(pdir, "plan.json", json.dumps(docs, indent=1).encode())
    files = _write_parts(plan, ckpt, output, part_shards(plan, part, parts), jobs, progress)
    files.update(_write_side_files(plan, ckpt, output))
    ckpt.check_unchanged()
    if before_publish is not None:
        before_publish()
    _write_doc(pdir, f"part-{part}-of-{parts}.json", json.dumps({"files": files}, indent=1).encode())
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
    files[INDEX_NAME] = _write_doc(output, INDEX_NAME, plan_doc["index"].encode())
    files["config.json"] = _write_doc(output, "config.json", plan_doc["config"].encode("utf-8"))
    manifest = manifest_bytes(plan_doc["manifest"], files)
    _write_doc(output, MANIFEST_NAME, manifest)
    shutil.rmtree(pdir, ignore_errors=True)
    return json.loads(manifest)["files"]
