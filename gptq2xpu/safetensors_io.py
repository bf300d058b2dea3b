"""The safetensors file format, read defensively and written in a streaming way, without torch.

Layout of a file::

    [u64 little-endian N][N bytes of JSON header, space padded][data ...]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the start of the data section) plus an optional ``"__metadata__"`` of str -> str.

Everything read here is untrusted: :func:`read_header` checks the header length against the file
and a cap, that the JSON is an object with well-formed entries, known dtypes, byte ranges inside
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
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

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

#: Largest header we accept (the reference implementation caps at 100 MB as well).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_DIMS = 16


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor's header entry.  ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    """A validated header: where each tensor's bytes lie in ``path``."""

    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(raw: bytes, file_size: int, path: str = "<bytes>") -> SafetensorsHeader:
    """Validate a safetensors prefix (at least the 8-byte length + header) against ``file_size``."""
    if file_size < 8 or len(raw) < 8:
        raise InputError(f"{path}: not a safetensors file (only {file_size} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InputError(f"{path}: safetensors header length {n} is not in 1..{MAX_HEADER_BYTES}")
    if 8 + n > file_size:
        raise InputError(f"{path}: truncated: header claims {n} bytes but the file has {file_size}")
    if len(raw) < 8 + n:
        raise InputError(f"{path}: truncated header")
    try:
        text = raw[8 : 8 + n].decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    data_size = file_size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, TensorEntry] = {}
    for name, spec in doc.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in spec.items()
            ):
                raise InputError(f"{path}: __metadata__ must map strings to strings")
            metadata = dict(spec)
            continue
        tensors[name] = _parse_entry(path, name, spec, data_start, data_size)
    ranges = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_s0, e0, n0), (s1, _e1, n1) in zip(ranges, ranges[1:]):
        if s1 < e0:
            raise InputError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    return SafetensorsHeader(path, file_size, data_start, tensors, metadata)


def _parse_entry(path: str, name: str, spec, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise InputError(f"{where}: header entry is not an object")
    dtype = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(f"{where}: unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
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
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (reads no tensor data)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_header_fd(fd: int, path: str) -> SafetensorsHeader:
    """:func:`read_header` of an open file (``path`` names it in messages and the result)."""
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            return parse_header(head, size, path)  # raises with the precise reason
        raw = head + _pread_exact(fd, n, 8, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_header(raw, size, path)


def _pread_exact(fd: int, n: int, offset: int, path: str) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not block:
            raise InputError(f"{path}: truncated header")
        parts.append(block)
        got += len(block)
    return b"".join(parts)


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


def dtype_name(dt: np.dtype) -> str:
    """numpy dtype -> safetensors dtype name."""
    dt = np.dtype(dt)
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dt.newbyteorder("<") or candidate == dt:
            return name
    raise ValueError(f"no safetensors dtype for numpy {dt}")
