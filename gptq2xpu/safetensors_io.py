"""The safetensors file format, read defensively and written in a streaming way, without torch.

Layout of a file::

    [u64 little-endian N][N bytes of JSON header, space padded][data ...]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data section) plus an optional ``"__metadata__"`` of str -> str.

Everything read here is untrusted: :func:`read_header` checks the header length against the file
and a cap, parses it with ``json.loads`` (a key given twice refused), and checks that it is an
object with well-formed entries, known dtypes, byte ranges inside
the file that match dtype x shape and do not overlap.  Any violation raises :class:`InputError`
naming the file (and tensor).

Writing: :class:`ShardLayout` decides every tensor's byte range up front (so writers can fill a
file in any order, or in parallel), and :func:`encode_header` produces the header bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from .errors import InputError, read_error

#: dtype name -> bytes per element.  BF16 and the float8 types have no numpy dtype: they are moved
#: as raw bytes (pass-through) or handed to torch where math runs.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: dtype name -> numpy dtype (little-endian), for the dtypes numpy can hold.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"), "F64": np.dtype("<f8"),
}

#: dtype name -> an unsigned numpy dtype of its size: for moving bits (slicing, copying), BF16 too.
BITS_DTYPES: dict[str, np.dtype] = {name: np.dtype(f"<u{size}") for name, size in DTYPE_SIZES.items()}

#: Largest header we accept (the reference implementation caps at 100 MB as well).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_DIMS = 16


#: Most tensors one checkpoint may hold, all shards together.  The largest MoE checkpoints hold a
#: few hundred thousand (a 1T-parameter GPTQ MoE: ~300 K); a header filled with millions of empty
#: tensors is refused before anything is built for them.
MAX_TENSORS = 1_000_000

_DTYPE_NAMES: tuple[str, ...] = tuple(DTYPE_SIZES)
_DTYPE_CODES: dict[str, int] = {name: i for i, name in enumerate(_DTYPE_NAMES)}
_ITEM_SIZES: tuple[int, ...] = tuple(DTYPE_SIZES[n] for n in _DTYPE_NAMES)


class TensorEntry:
    """One tensor of a checkpoint: name, dtype, shape, absolute byte range ``start..end`` and the
    shard ``file`` holding it (None for a header read on its own).  Made on demand from a
    :class:`TensorTable`; ``entry`` is the object itself (the checkpoint's ``TensorRef`` is this)."""

    __slots__ = ("name", "dtype", "shape", "start", "end", "file")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], start: int, end: int, file: str | None = None):
        self.name, self.dtype, self.shape, self.start, self.end, self.file = name, dtype, shape, start, end, file

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def entry(self) -> TensorEntry:
        return self

    def _key(self):
        return (self.name, self.dtype, self.shape, self.start, self.end, self.file)

    def __eq__(self, other):
        return isinstance(other, TensorEntry) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"TensorEntry({self.name!r}, {self.dtype}, {list(self.shape)}, {self.start}..{self.end}"
                + (f", {self.file!r})" if self.file is not None else ")"))


class TensorTable(Mapping):
    """The tensors of one or several headers, compact: per tensor only its name (a key of one dict)
    and a few machine words in arrays -- dtype code, interned shape, byte range -- instead of an
    object per tensor.  Measured on a 1 M-tensor header (96 MB, ``scripts/bench_header_memory.py``):
    the table holds 147 MiB, names included; one :class:`TensorEntry` per tensor would add 167 MiB.
    Looking a name up makes a :class:`TensorEntry`; files are added one after another
    (:meth:`view` is one file's part)."""

    def __init__(self):
        self._rows: dict[str, int] = {}
        self._dtype = array("B")
        self._shape = array("I")
        self._start = array("q")
        self._end = array("q")
        self._shapes: list[tuple[int, ...]] = []
        self._numels: list[int] = []
        self._shape_ids: dict[str, int] = {}   # shape as text ("[2048, 768]") -> id
        self.files: list[str | None] = []
        self._file_rows: list[int] = []        # first row of each file

    # ------------------------------------------------------------------ Mapping
    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)

    def __contains__(self, name) -> bool:
        return name in self._rows

    def __getitem__(self, name: str) -> TensorEntry:
        return self._entry(name, self._rows[name])

    def get(self, name, default=None):
        r = self._rows.get(name)
        return default if r is None else self._entry(name, r)

    def items(self):
        return ((name, self._entry(name, r)) for name, r in self._rows.items())

    def values(self):
        return (self._entry(name, r) for name, r in self._rows.items())

    def signature(self, name: str) -> int | None:
        """A number equal for two tensors of this table exactly when dtype and shape are equal
        (None for a name not here): compares tensors without making entries."""
        r = self._rows.get(name)
        return None if r is None else (self._shape[r] << 5) | self._dtype[r]

    def _entry(self, name: str, r: int) -> TensorEntry:
        files = self.files
        file = files[0] if len(files) == 1 else files[bisect_right(self._file_rows, r) - 1]
        return TensorEntry(name, _DTYPE_NAMES[self._dtype[r]], self._shapes[self._shape[r]], self._start[r],
                           self._end[r], file)

    # ------------------------------------------------------------------ building
    def _shape_id(self, dims: list[int] | tuple[int, ...]) -> int:
        """The id of a valid shape (ints >= 0), interned by its text ``str(list(dims))``."""
        key = str(list(dims))
        sid = self._shape_ids.get(key)
        if sid is None:
            sid = self._shape_ids[key] = len(self._shapes)
            self._shapes.append(tuple(dims))
            self._numels.append(math.prod(dims))
        return sid

    def _begin_file(self, file: str | None) -> int:
        self.files.append(file)
        self._file_rows.append(len(self._rows))
        return len(self._rows)

    def _file_of_row(self, r: int) -> str | None:
        return self.files[bisect_right(self._file_rows, r) - 1]

    def _add(self, name: str, code: int, sid: int, start: int, end: int, first_row: int, path: str) -> None:
        rows = self._rows
        r = rows.setdefault(name, len(rows))
        if r != len(self._start):
            if r >= first_row:
                raise InputError(f"{path}: safetensors header is not valid JSON (duplicate key {name!r})")
            raise InputError(f"tensor {name!r} appears in both {shown(self._file_of_row(r))} and {shown(path)}")
        if r >= MAX_TENSORS:
            del rows[name]
            raise InputError(f"{path}: more than {MAX_TENSORS} tensors; refusing a header this large")
        self._dtype.append(code)
        self._shape.append(sid)
        self._start.append(start)
        self._end.append(end)

    def _add_file(self, file: str, tensors: Mapping[str, TensorEntry]) -> None:
        """Append another header's tensors as file ``file`` (a tensor already here is refused)."""
        first = self._begin_file(file)
        for name, t in tensors.items():
            sid = self._shape_id(t.shape)
            self._add(name, _DTYPE_CODES[t.dtype], sid, t.start, t.end, first, file)

    def view(self, index: int) -> FileTensors:
        """The tensors of the ``index``-th file added."""
        first = self._file_rows[index]
        last = self._file_rows[index + 1] if index + 1 < len(self._file_rows) else len(self._rows)
        return FileTensors(self, first, last)

    def _check_overlaps(self, first: int, last: int, path: str) -> None:
        """No two non-empty tensors of rows ``first..last`` (one file) share a byte."""
        if last - first < 2:
            return
        starts = np.frombuffer(self._start, dtype=np.int64)[first:last]
        ends = np.frombuffer(self._end, dtype=np.int64)[first:last]
        keep = np.flatnonzero(ends > starts)
        order = keep[np.lexsort((ends[keep], starts[keep]))]
        s, e = starts[order], ends[order]
        bad = np.flatnonzero(s[1:] < e[:-1])
        if bad.size:
            i, j = int(order[bad[0]]) + first, int(order[bad[0] + 1]) + first
            names = dict.fromkeys((i, j))
            for name, r in self._rows.items():
                if r in names:
                    names[r] = name
            raise InputError(f"{path}: tensors {names[i]!r} and {names[j]!r} overlap in the file")


class FileTensors(Mapping):
    """One file's tensors in a :class:`TensorTable` (rows ``first..last``): name -> TensorEntry."""

    def __init__(self, table: TensorTable, first: int, last: int):
        self.table, self.first, self.last = table, first, last

    def _row(self, name):
        r = self.table._rows.get(name)
        return r if r is not None and self.first <= r < self.last else None

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self):
        return islice(iter(self.table._rows), self.first, self.last)

    def __contains__(self, name) -> bool:
        return self._row(name) is not None

    def __getitem__(self, name: str) -> TensorEntry:
        r = self._row(name)
        if r is None:
            raise KeyError(name)
        return self.table._entry(name, r)

    def get(self, name, default=None):
        r = self._row(name)
        return default if r is None else self.table._entry(name, r)



def shown(name: str | None) -> str:
    """A file name as a message that compares it with another prints it: as it is when plain
    printable ASCII, else escaped, so that names which differ only invisibly (Unicode NFC/NFD
    twins, control characters) never print alike."""
    return name if name is not None and name.isascii() and name.isprintable() else ascii(name)

@dataclass
class SafetensorsHeader:
    """A validated header: where each tensor's bytes lie in ``path``."""

    path: str
    file_size: int
    data_start: int
    tensors: Mapping[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def json_object_pairs(pairs):
    """``object_pairs_hook`` for untrusted JSON: a dict, refusing a key given twice (``json``
    alone would keep the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_SPEC_KEYS = ("dtype", "shape", "data_offsets")


def parse_header(raw: bytes, file_size: int, path: str = "<bytes>", *,
                 table: TensorTable | None = None) -> SafetensorsHeader:
    """Validate a safetensors prefix (at least the 8-byte length + header) against ``file_size``.

    The tensors go into ``table`` (a new one by default; :func:`open_checkpoint` passes one table
    for all shards, which also finds a tensor stored in two of them).  More than
    :data:`MAX_TENSORS` entries are refused before the JSON is parsed."""
    if file_size < 8 or len(raw) < 8:
        raise InputError(f"{path}: not a safetensors file (only {file_size} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InputError(f"{path}: safetensors header length {n} is not in 1..{MAX_HEADER_BYTES}")
    if 8 + n > file_size:
        raise InputError(f"{path}: truncated: header claims {n} bytes but the file has {file_size}")
    if len(raw) < 8 + n:
        raise InputError(f"{path}: truncated header")
    text = _decode(memoryview(raw)[8 : 8 + n], path)
    _check_count(text.count('"data_offsets"'), path)
    return _parse_text(text, n, file_size, path, table)


def _check_count(entries: int, path: str) -> None:
    # a count of the key's spellings: a name holding it can only make the count larger; an escaped
    # spelling is counted as the table grows (TensorTable._add)
    if entries > MAX_TENSORS:
        raise InputError(f"{path}: more than {MAX_TENSORS} tensors; refusing a header this large")


def _decode(data, path: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({exc})") from None


def _parse_text(text: str, n: int, file_size: int, path: str, table: TensorTable | None) -> SafetensorsHeader:
    """The header's JSON text (``n`` bytes, length checked) into a validated header.

    ``json.loads`` reads it; its hook turns each well-typed tensor entry into four numbers (dtype
    code, interned shape, byte range) as soon as it is parsed, so a header of a million entries
    never holds a dict and two lists per entry.  Syntax and duplicate keys are refused before what
    the entries mean (first bad entry in order)."""
    table = TensorTable() if table is None else table
    codes, shape_ids = _DTYPE_CODES, table._shape_ids

    def entry_or_object(pairs):
        if len(pairs) == 3 and (pairs[0][0], pairs[1][0], pairs[2][0]) == _SPEC_KEYS:
            (_, dtype), (_, shape), (_, offsets) = pairs
            code = codes.get(dtype) if type(dtype) is str else None
            if code is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2:
                # a shape's text is interned only once valid: [true] or [1.0] never meet [1]
                sid = shape_ids.get(str(shape))
                if sid is None and _valid_shape(shape):
                    sid = table._shape_id(shape)
                begin, end = offsets
                if sid is not None and type(begin) is int and type(end) is int:
                    return (code, sid, begin, end)
        return json_object_pairs(pairs)

    try:
        doc = json.loads(text, object_pairs_hook=entry_or_object, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: safetensors header is not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    first = table._begin_file(path)
    metadata = _add_entries(doc, path, table, first, 8 + n, file_size - 8 - n)
    table._check_overlaps(first, len(table), path)
    return SafetensorsHeader(path, file_size, 8 + n, table.view(len(table.files) - 1), metadata)


def _add_entries(doc: dict, path: str, table: TensorTable, first: int, data_start: int, data_size: int) -> dict:
    """The parsed header's entries into ``table``; returns ``__metadata__``."""
    metadata: dict = {}
    sizes, numels = _ITEM_SIZES, table._numels
    for name, spec in doc.items():
        _check_text(name, f"{path}: tensor name")
        if name == "__metadata__":
            metadata = _check_metadata(spec, path)
            continue
        if type(spec) is tuple:
            code, sid, begin, end = spec
            if not (0 <= begin <= end <= data_size and end - begin == numels[sid] * sizes[code]):
                spec = {"dtype": _DTYPE_NAMES[code], "shape": list(table._shapes[sid]), "data_offsets": [begin, end]}
        if type(spec) is not tuple:
            code, sid, begin, end = _check_entry(path, name, spec, table, data_size)
        table._add(name, code, sid, data_start + begin, data_start + end, first, path)
    return metadata


def _valid_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)


def _check_metadata(spec, path: str) -> dict:
    if not isinstance(spec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    for key, value in spec.items():
        _check_text(key, f"{path}: __metadata__ key")
        _check_text(value, f"{path}: __metadata__ value")
    return spec


def _check_text(text: str, what: str) -> None:
    """A string of the header must be writable as UTF-8: JSON allows a lone surrogate escape
    (``"\\ud800"``) that no UTF-8 document can hold, and a tensor name goes into OUTPUT's index."""
    try:
        text.encode("utf-8")
    except UnicodeError:
        raise InputError(f"{what} {text[:200]!r} is not valid UTF-8 text (a lone surrogate escape)") from None


def _check_entry(path: str, name: str, spec, table: TensorTable, data_size: int) -> tuple[int, int, int, int]:
    """One tensor's header entry, fully checked: (dtype code, shape id, begin, end) relative to the data."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InputError(f"{where}: header entry is not an object")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{where}: unknown dtype {dtype!r}")
    if not _valid_shape(shape):
        raise InputError(f"{where}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise InputError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise InputError(
            f"{where}: byte range {begin}..{end} lies outside the data section ({data_size} bytes)"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise InputError(
            f"{where}: byte range holds {end - begin} bytes but {dtype}{shape} needs {expected}"
        )
    return _DTYPE_CODES[dtype], table._shape_id(shape), begin, end


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (reads no tensor data)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise read_error(path, exc) from None
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path: str, *, table: TensorTable | None = None) -> SafetensorsHeader:
    """:func:`read_header` of an open file (``path`` names it in messages and the result; the
    tensors go into ``table``, see :func:`parse_header`)."""
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            return parse_header(head, size, path)  # raises with the precise reason
        data = bytearray(n)
        read_into(fd, 8, np.frombuffer(data, dtype=np.uint8), path)
    except OSError as exc:
        raise read_error(path, exc) from None
    _check_count(data.count(b'"data_offsets"'), path)  # before a text copy is made
    text = _decode(data, path)
    del data  # only the text while it is parsed
    return _parse_text(text, n, size, path, table)


def read_into(fd: int, offset: int, out: np.ndarray, what: str = "") -> None:
    """Fill the contiguous array ``out`` with bytes at ``offset`` of ``fd`` (loops on short reads)."""
    mv = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    total = len(mv)
    while done < total:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise InputError(f"{what}: file ended early (read {done} of {total} bytes)")
        done += got


# ----------------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor to be written: name, dtype name and shape (its size follows from them)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class ShardLayout:
    """The exact byte layout of one output file, decided before any byte is written.

    Tensors are stored in the order given (callers sort them deterministically); ``offsets``
    maps each name to its absolute (start, end) in the file.
    """

    tensors: list[PlannedTensor]
    metadata: dict[str, str]
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        doc: dict[str, object] = {}
        if self.metadata:
            doc["__metadata__"] = dict(self.metadata)
        rel = 0
        spans = {}
        for t in self.tensors:
            doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [rel, rel + t.nbytes]}
            spans[t.name] = (rel, rel + t.nbytes)
            rel += t.nbytes
        self.header = encode_header(doc)
        base = len(self.header)
        self.offsets = {k: (base + s, base + e) for k, (s, e) in spans.items()}

    @property
    def file_size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def encode_header(doc: dict) -> bytes:
    """8-byte length + compact JSON, space padded to a multiple of 8 (as the reference writer does)."""
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body

