"""Open a checkpoint folder lazily: configs, index and safetensors headers, validated; no tensor data.

A :class:`Checkpoint` knows where every tensor's bytes lie (:class:`TensorRef`) and reads them on
demand with ``pread`` (thread-safe, no memory maps, so reading a tensor never keeps pages of the
source resident in this process).  Everything read here is untrusted and checked:

* the index is a JSON object whose ``weight_map`` maps names to shard files that stay inside the
  checkpoint folder (no absolute paths, no ``..``); every file is opened through
  :class:`~gptq2xpu.read.paths.Folder` (no link leaving the trusted root, regular files only);
* every index entry is found in its shard, and every shard tensor is listed in the index;
* each safetensors header is validated by :func:`gptq2xpu.safetensors_io.read_header`;
* pickle weights (``*.bin``, ``*.pt``...) are never opened: they can run code when loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..safetensors_io import (
    NUMPY_DTYPES,
    FileTensors,
    SafetensorsHeader,
    TensorEntry,
    TensorTable,
    json_object_pairs,
    read_header_fd,
    read_into,
)
from .paths import MAX_JSON_BYTES, Folder, check_member_name, parse_json
from .shards import PICKLE_SUFFIXES as PICKLE_SUFFIXES  # the rule lives with shard discovery
from .shards import Shards, find_shards

#: windows of tensor data per shard hashed by :meth:`Checkpoint.data_fingerprint`, and their size
DATA_SAMPLES = 8
DATA_SAMPLE_BYTES = 4096


def _open_shard_limit() -> int:
    """How many shard descriptors a checkpoint keeps open: a quarter of the process's descriptor
    limit, at most 64 (checkpoints of thousands of shards must not exhaust it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 64 if soft == resource.RLIM_INFINITY else max(4, min(64, soft // 4))


MAX_OPEN_SHARDS = _open_shard_limit()


#: Where one source tensor lives: ``file`` (relative to the root), ``name``, ``dtype``, ``shape``,
#: absolute byte range ``start..end``, ``nbytes``.  Made on demand from the checkpoint's compact
#: :class:`~gptq2xpu.safetensors_io.TensorTable` (``ref.entry`` is the object itself).
TensorRef = TensorEntry


@dataclass
class Checkpoint:
    """A source checkpoint opened from its headers; tensors are read on demand."""

    root: Path
    origin: str
    config: dict
    shards: dict[str, SafetensorsHeader]
    tensors: Mapping[str, TensorRef]
    index_file: str | None = None
    folder: Folder | None = None
    revision: str | None = None
    #: what a published output may record about where the source came from (see
    #: :func:`gptq2xpu.read.resolve.provenance`): never a local path
    provenance: dict = field(default_factory=dict)
    #: what reading found worth a word (a ``*.safetensors`` file left out, and why)
    warnings: list[str] = field(default_factory=list)
    _stats: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _fds: OrderedDict[str, int] = field(default_factory=OrderedDict, repr=False)  # least recently used first
    _users: dict[str, int] = field(default_factory=dict, repr=False)
    _ids: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _keep_all: bool = field(default=False, repr=False)  # few enough shards to keep every one open

    # ------------------------------------------------------------------ reading tensor data
    # A checkpoint of at most MAX_OPEN_SHARDS shards keeps each one open once opened.  A larger
    # one keeps at most MAX_OPEN_SHARDS open (plus those in use right now): the least recently
    # used idle one is closed to make room (bookkeeping under a lock that many reader threads
    # would contend for, hence only there).  A shard opened again must be the same file
    # (device and inode) as the first time, so a file swapped during the run is still caught.

    @contextlib.contextmanager
    def _shard(self, file: str) -> Iterator[int]:
        """A descriptor of shard ``file``, not closed while the block runs."""
        if self._keep_all:  # the common case: no bookkeeping (and no lock) per read
            fd = self._fds.get(file)
            if fd is None:
                with self._lock:
                    fd = self._fds.get(file)
                    if fd is None:
                        fd = self._fds[file] = self._reopen(file)
            yield fd
            return
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                self._close_idle(MAX_OPEN_SHARDS - 1)
                fd = self._fds[file] = self._reopen(file)
            self._fds.move_to_end(file)
            self._users[file] = self._users.get(file, 0) + 1
        try:
            yield fd
        finally:
            with self._lock:
                self._users[file] -= 1
                self._close_idle(MAX_OPEN_SHARDS)

    def _reopen(self, file: str) -> int:
        fd = self.folder.open(file)
        try:
            st = os.fstat(fd)
            if self._ids.setdefault(file, (st.st_dev, st.st_ino)) != (st.st_dev, st.st_ino):
                raise InputError(f"{file}: source file was replaced during the run; re-run on a stable copy")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _close_idle(self, keep: int) -> None:
        """Close least recently used descriptors no one is reading through until ``keep`` remain."""
        if len(self._fds) <= keep:
            return
        for file in [f for f in self._fds if not self._users.get(f)][: max(0, len(self._fds) - keep)]:
            with contextlib.suppress(OSError):
                os.close(self._fds.pop(file))

    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"tensor {name!r} is missing from the checkpoint") from None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (BF16/float8 come back as raw uint8 bytes)."""
        ref = self.ref(name)
        buf = np.empty(ref.nbytes, dtype=np.uint8)
        self.read_into(ref, buf)
        dt = NUMPY_DTYPES.get(ref.dtype)
        return buf if dt is None else buf.view(dt).reshape(ref.shape)

    def read_into(self, ref: TensorRef, out: np.ndarray, *, offset: int = 0) -> None:
        """Fill contiguous ``out`` with the tensor's bytes starting ``offset`` bytes into it."""
        with self._shard(ref.file) as fd:
            read_into(fd, ref.start + offset, out, f"{ref.file}: tensor {ref.name!r}")

    # ------------------------------------------------------------------ integrity over a run
    def check_unchanged(self) -> None:
        """Raise if any shard's size or mtime changed since the checkpoint was opened."""
        for file, (size, mtime) in self._stats.items():
            try:
                st = os.stat(self.root / file)
            except OSError as exc:
                raise InputError(f"{file}: source file vanished during the run ({exc.strerror})") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise InputError(f"{file}: source file changed during the run (size or mtime differs); re-run on a "
                                 "stable copy")

    @property
    def trusted_root(self) -> Path:
        return self.folder.trusted_root or self.root

    def fingerprint(self) -> str:
        """sha256 over every shard's name, size and header bytes: identifies the source cheaply."""

        def prefix(file: str, hdr: SafetensorsHeader) -> bytes:
            buf = np.empty(hdr.data_start, dtype=np.uint8)
            with self._shard(file) as fd:
                read_into(fd, 0, buf, file)
            return buf.tobytes()

        return fingerprint_headers((f, hdr.file_size, prefix(f, hdr)) for f, hdr in sorted(self.shards.items()))

    def data_fingerprint(self) -> str:
        """sha256 over sampled windows of every shard's tensor data (at most
        ``DATA_SAMPLES`` x ``DATA_SAMPLE_BYTES`` bytes per shard, at offsets spread evenly over the
        data): tells apart checkpoints whose headers are identical but whose weights differ (two
        quantizations of one model), cheaply.  Not an integrity check of every byte."""
        h = hashlib.sha256()
        for file, hdr in sorted(self.shards.items()):
            start, size = hdr.data_start, hdr.file_size - hdr.data_start
            h.update(file.encode() + b"\0" + str(size).encode() + b"\0")
            if size <= DATA_SAMPLES * DATA_SAMPLE_BYTES:
                spans = [(start, size)] if size else []
            else:
                step = (size - DATA_SAMPLE_BYTES) / (DATA_SAMPLES - 1)
                spans = [(start + round(i * step), DATA_SAMPLE_BYTES) for i in range(DATA_SAMPLES)]
            for offset, length in spans:
                buf = np.empty(length, dtype=np.uint8)
                with self._shard(file) as fd:
                    read_into(fd, offset, buf, file)
                h.update(buf.tobytes())
        return "sha256:" + h.hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.shards.values())

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _local_shards(folder: Folder) -> Shards:
    """:func:`~gptq2xpu.read.shards.find_shards` for a local folder; every shard is checked against
    the folder's link policy."""
    root = folder.root
    entries = sorted(root.iterdir())
    indexed = any(p.name.endswith(".safetensors.index.json") for p in entries)
    names = []
    for p in entries:
        # without an index every candidate is checked (and must be a file); with one, the shards it names are
        if p.name.endswith(".safetensors") and not p.name.startswith(".") and not indexed:
            folder.check(p.name)
            if not p.is_file():
                continue
        names.append(p.name)
    found = find_shards(folder, names, str(root), exists=lambda f: os.path.lexists(root / f))
    if found.index_file:
        for file in found.files:
            folder.check(file, f"{found.index_file}: shard {file!r}")
    return found


def read_index(folder: Folder, name: str) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file) of the index ``name``: ``json.loads`` (a key given
    twice refused) under the size cap, then every shard file name checked once."""
    doc = parse_json(folder.read_bytes(name, name, MAX_JSON_BYTES), name, object_pairs_hook=json_object_pairs)
    return weight_map_of(doc, name)


def weight_map_of(doc: dict, name: str) -> dict[str, str]:
    """An index document's ``weight_map``, checked: a non-empty object of names of files that
    stay inside the checkpoint (see :func:`~gptq2xpu.read.paths.check_member_name`)."""
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{name}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    checked: set[str] = set()
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or file not in checked:
            check_member_name(file, f"{name}: tensor {tensor!r}")
            checked.add(file)
    return weight_map


def tensor_map(shards: dict[str, SafetensorsHeader], weight_map: dict[str, str] | None,
               index_file: str | None) -> TensorTable:
    """Every tensor of the validated shard headers (in the order given), checked against the index:
    no tensor in two shards, every shard tensor listed where it is stored, every listed tensor found.

    Headers read into one table (:func:`open_checkpoint` does) are used as they are; others are
    merged into a new one."""
    table = _shared_table(shards)
    if table is None:
        table = TensorTable()
        for file, hdr in shards.items():
            table._add_file(file, hdr.tensors)
    if weight_map is not None:
        rows = iter(table._rows)
        for i, file in enumerate(table.files):
            view = table.view(i)
            for name in islice(rows, view.last - view.first):
                where = weight_map.get(name)
                if where != file:
                    raise InputError(
                        f"{file}: tensor {name!r} is not listed in {index_file}"
                        if where is None
                        else f"{index_file}: tensor {name!r} is mapped to {where} but stored in {file}"
                    )
        if len(weight_map) != len(table):
            for name, file in weight_map.items():
                if name not in table:
                    raise InputError(f"{index_file}: tensor {name!r} is not in shard {file}")
    return table


def _shared_table(shards: dict[str, SafetensorsHeader]) -> TensorTable | None:
    """The one table all ``shards`` were read into, file by file in this order, or None."""
    views = [hdr.tensors for hdr in shards.values()]
    if not views or not all(isinstance(v, FileTensors) for v in views):
        return None
    table = views[0].table
    if table.files != list(shards) or any(v.table is not table for v in views):
        return None
    bounds = [(v.first, v.last) for v in views]
    if bounds != [(table.view(i).first, table.view(i).last) for i in range(len(views))]:
        return None
    return table


def fingerprint_headers(shards: Iterable[tuple[str, int, bytes]]) -> str:
    """The source fingerprint: sha256 over each shard's ``(file name, file size, header bytes)``, the
    header bytes being the file's first ``data_start`` bytes (length prefix and JSON).  Callers pass
    the shards sorted by file name; a folder and the same files read over HTTP give the same value."""
    h = hashlib.sha256()
    for file, size, header in shards:
        h.update(file.encode() + b"\0" + str(size).encode() + b"\0")
        h.update(header)
    return "sha256:" + h.hexdigest()


def open_checkpoint(root: Path, origin: str | None = None, *, trusted_root: Path | None = None,
                    revision: str | None = None, links: str = "inside") -> Checkpoint:
    """Open the checkpoint folder ``root`` (headers only).

    ``links``: "inside" for sources (links may resolve anywhere below ``trusted_root``: a hub cache
    snapshot), "none" for converted outputs (no link at all).  See :mod:`gptq2xpu.read.paths`.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder (a checkpoint is the folder holding config.json and the shards)")
    folder = Folder(root, Path(trusted_root) if trusted_root else None, links)
    # config.json goes into OUTPUT's config.json: an existing one must be a real file inside the folder
    config = folder.read_json("config.json") if folder.exists("config.json") else {}

    found = _local_shards(folder)
    files, weight_map, index_file = found.files, found.index, found.index_file
    shards: dict[str, SafetensorsHeader] = {}
    stats: dict[str, tuple[int, int]] = {}
    table = TensorTable()
    ckpt = Checkpoint(root=root, origin=origin or str(root), config=config, shards=shards, tensors=table,
                      index_file=index_file, folder=folder, revision=revision, _stats=stats,
                      _keep_all=len(files) <= MAX_OPEN_SHARDS, warnings=found.warnings(origin or str(root)))
    try:
        for file in files:
            with ckpt._shard(file) as fd:
                shards[file] = read_header_fd(fd, file, table=table)
                st = os.fstat(fd)
            stats[file] = (st.st_size, st.st_mtime_ns)
        ckpt.tensors = tensor_map(shards, weight_map, index_file)
    except BaseException:
        ckpt.close()
        raise
    return ckpt
