"""Open a hub repository for ``inspect`` from its headers, fetched over HTTP: no tensor data.

A plan needs the configs, the safetensors index and each shard's header: kilobytes to a few
megabytes, where the shards hold gigabytes.  :func:`open_hub_headers` fetches exactly those
through huggingface_hub (its session, token, ``HF_ENDPOINT``, proxies; every request bounded by
:mod:`gptq2xpu.read.hubclient`):

1. ``model_info``: the commit the revision points at and the repository's file list
   (:func:`gptq2xpu.read.resolve.repo_files`, shared with ``convert``); every later request names
   that commit, so a push during inspection cannot mix two revisions;
2. the JSON files a plan reads (``config.json``, the safetensors index, ``quantization_config.json``,
   ``quantize_config.json``), each at most :data:`MAX_JSON_BYTES`;
3. per shard, ``Range: bytes=0-7`` (the header length; ``Content-Range`` gives the file size) and
   ``Range: bytes=8-<8+N-1>`` (the header), validated by :func:`parse_header` exactly as a local
   header is.  The fingerprint is computed from those bytes with the formula a folder uses.

Which files are the shards is decided by :func:`gptq2xpu.read.shards.find_shards`, as for a folder.
Everything a server sends is untrusted and read bounded: the header length is checked against the
cap and the file size before the header is asked for; a server that ignores ``Range`` and sends the
whole file is read only as far as the header (and the report says so); a response that ends early,
a compressed or mismatched partial response, and HTTP errors (``hf_raise_for_status``: 404, 401,
gated, ...) become one-line :class:`InputError` naming the repository and file.

When every ``*.json`` and ``*.safetensors`` file of that commit is already in the local Hugging
Face cache, the cached snapshot is opened instead.  With ``HF_HUB_OFFLINE`` set, or when the hub
cannot be reached, the cache is the only source, as for ``convert``.  :class:`HubRead` records which
path was taken and how many bytes came over the network.
"""

from __future__ import annotations

import contextlib
import re
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..contract import INDEX_NAME
from ..errors import InputError
from ..safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, parse_header
from .checkpoint import Checkpoint, fingerprint_headers, open_checkpoint, tensor_map
from .hubclient import COMMIT, Meter, bounded, bounded_each
from .paths import MAX_JSON_BYTES, Folder, check_member_name
from .resolve import (
    OFFLINE,
    Unreachable,
    check_revision,
    endpoint,
    from_cache_or_explain,
    hub_error,
    looks_like_repo_id,
    repo_files,
)
from .shards import find_shards

#: The most a read from the connection gives (httpcore's read size): what a server ignoring
#: ``Range`` can push past the header.
CHUNK = 64 * 1024
#: Shard headers fetched at once.
MAX_WORKERS = 8
QUANT_FILES = ("quantization_config.json", "quantize_config.json")
#: What ``convert``'s download takes of a repository that a plan reads (see resolve.ALLOW_PATTERNS).
CACHE_PATTERNS = ("*.json", "*.safetensors")
#: How :attr:`HubRead.files` names the model-info request (the commit and the file list).
MODEL_INFO = "(model info)"
#: Largest file size a server may claim (a file offset must fit in a signed 64-bit integer).
MAX_FILE_SIZE = 2**63 - 1
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")
_LENGTH = re.compile(r"[0-9]{1,19}")


@dataclass
class HubRead:
    """How ``inspect`` read a hub repository: from the hub over HTTP (headers only) or from the cache."""

    repo_id: str
    revision: str | None
    endpoint: str
    read_from: str = "hub"            # "hub" (headers over HTTP) | "cache" (local Hugging Face cache)
    reason: str = ""
    commit: str | None = None
    meter: Meter = field(default_factory=Meter)   # requests, and bytes received per file and for MODEL_INFO
    tensor_bytes_fetched: int = 0     # bytes past a shard's header (0 unless a server ignores Range)
    range_ignored: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def requests(self) -> int:
        return self.meter.requests

    @property
    def bytes_fetched(self) -> int:
        return self.meter.bytes

    @property
    def files(self) -> dict[str, int]:
        return self.meter.files

    def to_dict(self) -> dict:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "read_from": self.read_from,
            "reason": self.reason,
            "requests": self.requests,
            "bytes_fetched": self.bytes_fetched,
            "tensor_bytes_fetched": self.tensor_bytes_fetched,
            "files": dict(sorted(self.files.items())),
            "range_ignored": sorted(self.range_ignored),
        }


@dataclass
class HubHeaders(Checkpoint):
    """A checkpoint known from headers fetched over HTTP: everything a plan needs, no tensor data.

    ``root`` is a private folder holding the fetched JSON files (removed by :meth:`close`)."""

    header_fingerprint: str = ""
    workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def fingerprint(self) -> str:
        return self.header_fingerprint

    def _reopen(self, file: str) -> int:
        raise InputError(f"{self.origin}: {file}: only its header was fetched over HTTP; "
                         "`convert` downloads the tensor data")

    def check_unchanged(self) -> None:
        return None

    def close(self) -> None:
        super().close()
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


# ------------------------------------------------------------------------------------- entry points


def open_for_inspect(source: str, *, revision: str | None = None,
                     token: str | None = None) -> tuple[Checkpoint, HubRead | None]:
    """A local folder as :func:`gptq2xpu.read.open_source` opens it; a hub repo id by its headers."""
    from . import open_source

    if Path(source).expanduser().exists() or not looks_like_repo_id(source):
        return open_source(source, revision=revision, token=token), None
    return open_hub_headers(source, revision=revision, token=token)


def open_hub_headers(repo_id: str, *, revision: str | None = None,
                     token: str | None = None) -> tuple[Checkpoint, HubRead]:
    """Open hub repository ``repo_id`` for planning; see the module docstring for what is fetched."""
    from huggingface_hub import constants

    revision = check_revision(revision)
    origin = repo_id if revision is None else f"{repo_id}@{revision}"
    read = HubRead(repo_id, revision, endpoint())
    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, token, origin, read, OFFLINE), read
    try:
        commit, files = repo_files(repo_id, revision, token, read.meter, MODEL_INFO)
    except Unreachable as exc:
        return _from_cache(repo_id, revision, token, origin, read, exc.message), read
    read.commit = commit
    snapshot = _complete_cached_snapshot(repo_id, commit, files)
    if snapshot is not None:
        read.read_from = "cache"
        read.reason = "all *.json and *.safetensors files of the commit are cached"
        return open_checkpoint(snapshot, origin, trusted_root=snapshot.parent.parent, revision=revision), read
    read.reason = "configs, index and safetensors headers fetched with HTTP range requests"
    return _open_over_http(_Files(read, commit, token), origin, files), read


# ------------------------------------------------------------------------------------- the cache


def _from_cache(repo_id, revision, token, origin, read: HubRead, why: str) -> Checkpoint:
    read.read_from = "cache"
    read.reason = why
    folder, trusted, _ = from_cache_or_explain(repo_id, revision, token, why)
    read.commit = folder.name
    return open_checkpoint(folder, origin, trusted_root=trusted, revision=revision)


def _complete_cached_snapshot(repo_id: str, commit: str, files: set[str]) -> Path | None:
    """The cached snapshot folder of ``commit`` (checked: a commit id) if it holds every file
    ``convert`` would download that a plan reads (``*.json``, ``*.safetensors``), else None."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    wanted = sorted(filter_repo_objects(files, allow_patterns=list(CACHE_PATTERNS)))
    if not wanted or not COMMIT.fullmatch(commit):
        return None
    folder = None
    for f in wanted:
        try:
            check_member_name(f, repo_id)
            path = try_to_load_from_cache(repo_id, f, revision=commit)
        except (InputError, ValueError, OSError):
            return None
        if not isinstance(path, str):
            return None
        folder = folder or Path(path).parents[f.count("/")]
    return folder


# ------------------------------------------------------------------------------------- over HTTP


def _open_over_http(http: _Files, origin: str, files: set[str]) -> HubHeaders:
    workdir = tempfile.TemporaryDirectory(prefix="gptq2xpu-hub-")
    try:
        root = Path(workdir.name)
        top = {f for f in files if "/" not in f}
        for name in ("config.json", *QUANT_FILES):
            if name in top:
                http.fetch_json(name, root)
        fetched_files = Folder(root, links="none")
        repo_id = http.read.repo_id
        config = fetched_files.read_json("config.json", f"{repo_id}/config.json") if "config.json" in top else {}
        index = sorted(f for f in top if f.endswith(".safetensors.index.json"))
        if INDEX_NAME in index or len(index) == 1:  # the index find_shards reads
            http.fetch_json(check_member_name(INDEX_NAME if INDEX_NAME in index else index[0], origin), root)
        try:
            found = find_shards(fetched_files, top, origin, exists=files.__contains__)
        except InputError as exc:  # name a fetched file as the repository's, as the other errors do
            fetched = next((f.name for f in root.iterdir() if exc.message.startswith(f"{f.name}:")), None)
            if fetched is None:
                raise
            raise InputError(f"{repo_id}/{exc.message}") from None
        fetched = http.fetch_headers(found.files)
        shards = {f: fetched[f][0] for f in found.files}
        tensors = tensor_map(shards, found.index, found.index_file)
        fp = fingerprint_headers((f, shards[f].file_size, fetched[f][1]) for f in found.files)
        return HubHeaders(root=root, origin=origin, config=config, shards=shards, tensors=tensors,
                          index_file=found.index_file, folder=fetched_files, revision=http.read.revision,
                          header_fingerprint=fp, workdir=workdir, warnings=found.warnings(origin))
    except BaseException:
        workdir.cleanup()
        raise


class _Files:
    """Bounded GETs of one commit's files through huggingface_hub's session, with its headers
    (token, user agent); every byte received is counted in :attr:`read`."""

    def __init__(self, read: HubRead, commit: str, token: str | None):
        from huggingface_hub.utils import build_hf_headers

        from .. import __version__

        self.read = read
        self.repo_id = read.repo_id
        self.commit = commit
        try:
            self.headers = build_hf_headers(token=token, library_name="gptq2xpu", library_version=__version__)
        except (ValueError, OSError) as exc:
            raise InputError(f"{self.repo_id}: cannot build the request headers ({exc})") from None
        self.headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, never of a compressed body

    @contextlib.contextmanager
    def _get(self, file: str, first: int | None = None, last: int | None = None):
        """The streamed answer to a GET of ``file`` (bytes ``first..last``), refused unless 200/206."""
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import get_session, hf_raise_for_status

        label = f"{self.repo_id}/{file}"
        headers = dict(self.headers)
        if first is not None:
            headers["Range"] = f"bytes={first}-{last}"
        url = hf_hub_url(self.repo_id, file, revision=self.commit, endpoint=self.read.endpoint)
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
                if response.status_code == 416:
                    raise InputError(f"{label}: the server cannot serve {headers.get('Range')} (HTTP 416)")
                hf_raise_for_status(response)
                if response.status_code not in (200, 206):
                    raise InputError(f"{label}: unexpected HTTP {response.status_code}")
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise InputError(f"{label}: the server sent a {encoding}-encoded body although gptq2xpu "
                                     "asked for the plain bytes (Accept-Encoding: identity)")
                yield response, response.iter_raw()  # as it arrives: nothing read ahead
        except InputError:
            raise
        except (httpx2.HTTPError, OSError) as exc:
            raise hub_error(exc, self.repo_id, self.read.revision, label) from None

    def fetch_json(self, name: str, folder: Path) -> None:
        """Download the small JSON file ``name`` into ``folder`` (at most MAX_JSON_BYTES)."""
        label = f"{self.repo_id}/{name}"

        def get() -> bytes:
            with self._get(name) as (_, chunks):
                return _read_at_most(chunks, MAX_JSON_BYTES)

        data = bounded(get, label, meter=self.read.meter, file=name)
        if len(data) > MAX_JSON_BYTES:
            raise InputError(f"{label}: more than {MAX_JSON_BYTES} bytes is too large for a JSON config")
        (folder / name).write_bytes(data)

    def fetch_headers(self, files: list[str]) -> dict[str, tuple[SafetensorsHeader, bytes]]:
        """``{file: (validated header, its raw bytes)}`` for each shard, a few at a time."""
        return bounded_each(self._header, files, lambda f: f"{self.repo_id}/{f}", MAX_WORKERS, self.read.meter)

    def _header(self, file: str) -> tuple[SafetensorsHeader, bytes]:
        label = f"{self.repo_id}/{file}"
        spans = []                     # (first, end) byte offsets of the file received
        with self._get(file, 0, 7) as (response, chunks):
            size, first, avail = self._extent(response, label, file, 0, 7)
            body = _Reader(chunks, label)
            head = body.exact(min(8, avail))
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if len(head) < 8 or n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                parse_header(head, size, label)  # raises with the precise reason
            rest = body.exact(n) if response.status_code == 200 else None  # Range ignored: read on, bounded
            spans.append((first, first + body.received))
        if rest is None:
            with self._get(file, 8, 7 + n) as (response, chunks):
                size2, first, _ = self._extent(response, label, file, 8, 7 + n)
                if size2 != size:
                    raise InputError(f"{label}: the file size changed between two requests ({size} then {size2} bytes)")
                body = _Reader(chunks, label)
                if response.status_code == 200 and body.exact(8) != head:
                    raise InputError(f"{label}: the file changed between two requests")
                rest = body.exact(n)
                spans.append((first, first + body.received))
        raw = head + rest
        hdr = parse_header(raw, size, label)
        hdr.path = file
        past_header = sum(max(0, end - max(start, hdr.data_start)) for start, end in spans)
        if past_header:
            with self.read._lock:
                self.read.tensor_bytes_fetched += past_header
        return hdr, raw

    def _extent(self, response, label: str, file: str, first: int, last: int) -> tuple[int, int, int]:
        """(file size, offset of the body's first byte, body bytes to use) for a GET of bytes first..last."""
        if response.status_code == 206:
            value = response.headers.get("Content-Range", "").strip()
            m = _CONTENT_RANGE.fullmatch(value)
            if not m:
                raise InputError(f"{label}: partial response without a usable Content-Range ({value[:80]!r})")
            a, b, size = map(int, m.groups())
            _check_size(size, label)
            # exactly the range asked for, or its part up to the end of a shorter file
            if a != first or not a <= b <= last or b >= size or (b < last and b != size - 1):
                raise InputError(f"{label}: asked for bytes {first}-{last}, the server sent {value[:80]!r}")
            return size, a, b - a + 1
        length = response.headers.get("Content-Length", "").strip()
        if not _LENGTH.fullmatch(length):
            raise InputError(f"{label}: the server ignored the byte range and sent no Content-Length, "
                             "so the file size is unknown")
        _check_size(int(length), label)
        with self.read._lock:
            if file not in self.read.range_ignored:
                self.read.range_ignored.append(file)
        return int(length), 0, int(length)


def _check_size(size: int, label: str) -> None:
    if size > MAX_FILE_SIZE:
        raise InputError(f"{label}: the server claims a size of {size} bytes, past the 2^63-1 a file can hold")


class _Reader:
    """Exactly-n reads from a response's chunks; counts what arrived."""

    def __init__(self, chunks, label: str):
        self._chunks, self._label = chunks, label
        self._buf = bytearray()
        self.received = 0

    def exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise InputError(f"{self._label}: the response ended after {self.received} bytes, "
                                 f"{n - len(self._buf)} short (truncated by the server or the connection)")
            self._buf += chunk
            self.received += len(chunk)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _read_at_most(chunks, limit: int) -> bytes:
    """The whole body, or its first ``limit + 1`` bytes when it is longer than ``limit``."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            break
    return bytes(buf[: limit + 1])
