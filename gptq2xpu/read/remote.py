"""Open a hub repository for ``inspect`` from its headers, fetched over HTTP: no tensor data.

A plan needs the configs, the safetensors index and each shard's header: kilobytes to a few
megabytes, where the shards hold gigabytes.  :func:`open_hub_headers` fetches exactly those
through huggingface_hub's HTTP session (so its token, ``HF_ENDPOINT``, proxies and client factory
apply, as for ``convert``'s download):

1. ``GET {endpoint}/api/models/{repo}[/revision/{rev}]``: the commit the revision points at and the
   repository's file list; every later request names that commit, so a push during inspection
   cannot mix two revisions;
2. the JSON files a plan reads (``config.json``, the safetensors index, ``quantization_config.json``,
   ``quantize_config.json``), each at most :data:`MAX_JSON_BYTES`;
3. per shard, ``Range: bytes=0-7`` (the header length; ``Content-Range`` gives the file size) and
   ``Range: bytes=8-<8+N-1>`` (the header), validated by :func:`parse_header` exactly as a local
   header is.  The fingerprint is computed from those bytes with the formula a folder uses.

Everything a server sends is untrusted and read bounded: the header length is checked against the
cap and the file size before the header is asked for; a server that ignores ``Range`` and sends the
whole file is read only as far as the header (and the report says so); a response that ends early,
a compressed or mismatched partial response, and HTTP errors (404, 401, gated, ...) become one-line
:class:`InputError` naming the repository and file.  Error bodies are never read.

When every ``*.json`` and ``*.safetensors`` file of that commit is already in the local Hugging
Face cache, the cached snapshot is opened instead.  With ``HF_HUB_OFFLINE`` set, or when the hub
cannot be reached, the cache is the only source, as for ``convert``.  :class:`HubRead` records which
path was taken and how many bytes came over the network.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import os
import re
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .. import __version__
from ..contract import INDEX_NAME
from ..errors import InputError
from ..safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, parse_header
from .checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    _single_file_choice,
    fingerprint_headers,
    open_checkpoint,
    tensor_map,
)
from .paths import MAX_JSON_BYTES, Folder, check_member_name
from .resolve import cached_snapshot, looks_like_repo_id

#: Bytes asked of the transport per read: what a server ignoring ``Range`` can push past the header.
CHUNK = 64 * 1024
#: Shard headers fetched at once.
MAX_WORKERS = 8
QUANT_FILES = ("quantization_config.json", "quantize_config.json")
#: What ``convert``'s download takes of a repository that a plan reads (see resolve.ALLOW_PATTERNS).
CACHE_PATTERNS = ("*.json", "*.safetensors")
OFFLINE = "HF_HUB_OFFLINE is set"
#: How :attr:`HubRead.files` names the model-info request (the commit and the file list).
MODEL_INFO = "(model info)"
#: Cap on the model-info answer (the commit and the file list).
MAX_API_BYTES = 64 * 1024 * 1024
_COMMIT = re.compile(r"[0-9a-f]{40}")
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
    requests: int = 0
    bytes_fetched: int = 0            # response bodies received, every request together
    tensor_bytes_fetched: int = 0     # of those, bytes past a shard's header (0 unless a server ignores Range)
    files: dict[str, int] = field(default_factory=dict)   # bytes received per file, and for MODEL_INFO
    range_ignored: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, file: str, n: int) -> None:
        with self._lock:
            self.bytes_fetched += n
            self.files[file] = self.files.get(file, 0) + n

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


class _Unreachable(InputError):
    """The hub could not be reached at all (connection refused, timeout, offline mode)."""


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

    origin = repo_id if revision is None else f"{repo_id}@{revision}"
    read = HubRead(repo_id, revision, constants.ENDPOINT.rstrip("/"))
    if constants.HF_HUB_OFFLINE:
        return _from_cache(repo_id, revision, token, origin, read, OFFLINE), read
    http = _Http(read, token)
    try:
        commit, files = http.repo_files()
    except _Unreachable as exc:
        return _from_cache(repo_id, revision, token, origin, read, f"the hub cannot be reached: {exc.message}"), read
    read.commit = commit
    snapshot = _complete_cached_snapshot(repo_id, commit, files)
    if snapshot is not None:
        read.read_from = "cache"
        read.reason = "all *.json and *.safetensors files of the commit are cached"
        return open_checkpoint(snapshot, origin, trusted_root=snapshot.parent.parent, revision=revision), read
    read.reason = "configs, index and safetensors headers fetched with HTTP range requests"
    return _open_over_http(http, repo_id, revision, origin, files), read


# ------------------------------------------------------------------------------------- the cache


def _from_cache(repo_id, revision, token, origin, read: HubRead, why: str) -> Checkpoint:
    read.read_from = "cache"
    read.reason = why
    try:
        folder, trusted, _ = cached_snapshot(repo_id, revision=revision, token=token)
    except InputError as exc:
        detail = exc.message.removeprefix(f"{repo_id}: ")
        if why != OFFLINE:  # the cache's "the hub cannot be reached" is too vague: say why it was not
            detail = (f"not in the local Hugging Face cache, and {why.replace(f'{repo_id}: ', '')}"
                      if detail.startswith("not in the local Hugging Face cache") else f"{detail}; {why}")
        raise InputError(f"{repo_id}: no such folder; as a Hugging Face repo id: {detail}") from None
    if folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name):
        read.commit = folder.name
    return open_checkpoint(folder, origin, trusted_root=trusted, revision=revision)


def _complete_cached_snapshot(repo_id: str, commit: str, files: set[str]) -> Path | None:
    """The cached snapshot folder of ``commit`` if it holds every file ``convert`` would download
    that a plan reads (``*.json``, ``*.safetensors``), else None."""
    from huggingface_hub import try_to_load_from_cache

    wanted = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in CACHE_PATTERNS))
    if not wanted:
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


def _open_over_http(http: _Http, repo_id: str, revision: str | None, origin: str, files: set[str]) -> HubHeaders:
    workdir = tempfile.TemporaryDirectory(prefix="gptq2xpu-hub-")
    try:
        root = Path(workdir.name)
        top = {f for f in files if "/" not in f}
        for name in ("config.json", *QUANT_FILES):
            if name in top:
                http.fetch_json(name, root)
        fetched_files = Folder(root, links="none")
        config = fetched_files.read_json("config.json", f"{repo_id}/config.json") if "config.json" in top else {}

        index_files = sorted(f for f in top if f.endswith(".safetensors.index.json"))
        if INDEX_NAME in index_files:
            index_files = [INDEX_NAME]
        if len(index_files) > 1:
            raise InputError(f"{origin}: several safetensors index files ({', '.join(index_files)}); keep one")
        weight_map = index_file = None
        if index_files:
            # as find_shards checks a local index
            index_file = check_member_name(index_files[0], origin)
            http.fetch_json(index_file, root)
            doc = fetched_files.read_json(index_file, f"{repo_id}/{index_file}")
            weight_map = doc.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index_file}: 'weight_map' must be a non-empty object of tensor name -> shard file")
            for tensor, file in weight_map.items():
                check_member_name(file, f"{index_file}: tensor {tensor!r}")
            shard_files = sorted(set(weight_map.values()))
            for file in shard_files:
                if file not in files:
                    raise InputError(f"{index_file}: shard {file!r} named in the index does not exist in {origin}")
        else:
            candidates = sorted(f for f in top if f.endswith(".safetensors"))
            if not candidates:
                pickles = sorted(f for f in top if os.path.splitext(f)[1] in PICKLE_SUFFIXES)
                if pickles:
                    raise InputError(
                        f"{origin}: only pickle weights found ({', '.join(pickles[:3])}); gptq2xpu never loads "
                        "pickles (they can run code when opened): convert them to safetensors first")
                raise InputError(f"{origin}: no *.safetensors files and no {INDEX_NAME}")
            shard_files = _single_file_choice(fetched_files, candidates, where=origin)

        fetched = http.fetch_headers(shard_files)
        shards = {f: fetched[f][0] for f in shard_files}
        tensors = tensor_map(shards, weight_map, index_file)
        fp = fingerprint_headers((f, shards[f].file_size, fetched[f][1]) for f in shard_files)
        return HubHeaders(root=root, origin=origin, config=config, shards=shards, tensors=tensors,
                          index_file=index_file, folder=fetched_files, revision=revision,
                          header_fingerprint=fp, workdir=workdir)
    except BaseException:
        workdir.cleanup()
        raise


class _Body:
    """A streamed response body, read in bounded pieces; every byte received is counted."""

    def __init__(self, response, file: str, read: HubRead):
        self.status = response.status_code
        self.headers = response.headers
        self._chunks = response.iter_raw(CHUNK)
        self._buf = bytearray()
        self._file = file
        self._read = read
        self.received = 0

    def _pull(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._buf += chunk
        self.received += len(chunk)
        self._read.count(self._file, len(chunk))
        return True

    def read_exact(self, n: int, label: str) -> bytes:
        while len(self._buf) < n:
            if not self._pull():
                raise InputError(f"{label}: the response ended after {self.received} bytes, {n - len(self._buf)} short "
                                 "(truncated by the server or the connection)")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_at_most(self, limit: int) -> bytes:
        """The whole body, or its first ``limit + 1`` bytes when it is longer than ``limit``."""
        while len(self._buf) <= limit and self._pull():
            pass
        return bytes(self._buf[: limit + 1])


class _Http:
    """Bounded GETs through huggingface_hub's session, with its headers (token, user agent)."""

    def __init__(self, read: HubRead, token: str | None):
        from huggingface_hub.utils import build_hf_headers, get_session

        self.read = read
        self.repo_id = read.repo_id
        self.session = get_session()
        # huggingface_hub's session is an httpx-style client (httpx in 1.x, httpx2 in 2.x, or a user's
        # subclass from set_client_factory): take the exception types from the package that defines it
        pkg = next((m for c in type(self.session).__mro__
                    if hasattr(m := importlib.import_module(c.__module__.split(".")[0]), "TransportError")), None)
        if pkg is None or not hasattr(self.session, "stream"):
            import huggingface_hub

            raise InputError(f"{self.repo_id}: reading headers over HTTP needs huggingface_hub 1.0 or newer "
                             f"(installed: {huggingface_hub.__version__})")
        self._unreachable = (pkg.ConnectError, pkg.TimeoutException)
        self._failures = (pkg.HTTPError, pkg.StreamError, pkg.InvalidURL)
        self._cut_short = pkg.RemoteProtocolError
        try:
            self.headers = build_hf_headers(token=token, library_name="gptq2xpu", library_version=__version__)
        except (ValueError, OSError) as exc:
            raise InputError(f"{self.repo_id}: cannot build the request headers ({exc})") from None
        self.headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, never of a compressed body
        from huggingface_hub import constants

        self.timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
        self.commit: str | None = None

    # -------------------------------------------------------------------- one request
    @contextlib.contextmanager
    def _get(self, url: str, label: str, file: str, first: int | None = None, last: int | None = None, *, api=False):
        from huggingface_hub.errors import OfflineModeIsEnabled

        headers = dict(self.headers)
        if first is not None:
            headers["Range"] = f"bytes={first}-{last}"
        try:
            with self.session.stream("GET", url, headers=headers, timeout=self.timeout) as response:
                with self.read._lock:
                    self.read.requests += 1
                if response.status_code >= 300:
                    raise self._status_error(response, label, headers.get("Range"), api)
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise InputError(f"{label}: the server sent a {encoding}-encoded body although gptq2xpu "
                                     "asked for the plain bytes (Accept-Encoding: identity)")
                yield _Body(response, file, self.read)
        except InputError:
            raise
        except OfflineModeIsEnabled:
            raise _Unreachable(OFFLINE) from None
        except self._unreachable as exc:
            why = f"{type(exc).__name__}: {exc or 'no answer'}"
            raise _Unreachable(f"{label}: cannot reach {self.read.endpoint} ({why})") from None
        except self._failures as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, self._cut_short):
                reason = f"the response was cut short ({reason})"
            raise InputError(f"{label}: {reason}") from None

    def _status_error(self, response, label: str, rng: str | None, api: bool) -> InputError:
        status = response.status_code
        code = response.headers.get("X-Error-Code", "")
        detail = " ".join(response.headers.get("X-Error-Message", "").split())[:200]
        detail = f": {detail}" if detail else ""
        repo, endpoint = self.repo_id, self.read.endpoint
        if code == "GatedRepo":
            return InputError(f"{repo}: gated repository; accept its terms on the hub and pass --token "
                              f"(HTTP {status}{detail})")
        if code == "RepoNotFound" or status == 401 or (api and status == 404 and code != "RevisionNotFound"):
            return InputError(f"{repo}: repository not found at {endpoint} (or no access: pass --token) "
                              f"(HTTP {status}{detail})")
        if code == "RevisionNotFound":
            return InputError(f"{repo}: revision {self.read.revision!r} not found (HTTP {status}{detail})")
        if status == 404:
            return InputError(f"{label}: not found at {endpoint} (HTTP 404{detail})")
        if status == 403:
            return InputError(f"{label}: access denied (HTTP 403{detail}); check --token")
        if status == 416:
            return InputError(f"{label}: the server cannot serve {rng} (HTTP 416{detail})")
        if status < 400:
            return InputError(f"{label}: unexpected HTTP {status} (redirect without a usable Location)")
        return InputError(f"{label}: HTTP {status} from {endpoint}{detail}")

    # -------------------------------------------------------------------- what a plan needs
    def repo_files(self) -> tuple[str, set[str]]:
        """The commit ``revision`` points at, and the repository's file names."""
        rev = self.read.revision
        url = f"{self.read.endpoint}/api/models/{self.repo_id}"
        if rev is not None:
            url += f"/revision/{quote(rev, safe='')}"
        with self._get(url, self.repo_id, MODEL_INFO, api=True) as body:
            raw = body.read_at_most(MAX_API_BYTES)
        bad = f"{self.repo_id}: {self.read.endpoint} answered the model-info request with"
        if len(raw) > MAX_API_BYTES:
            raise InputError(f"{bad} more than {MAX_API_BYTES} bytes")
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InputError(f"{bad} invalid JSON ({exc})") from None
        sha = doc.get("sha") if isinstance(doc, dict) else None
        siblings = doc.get("siblings") if isinstance(doc, dict) else None
        if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
            raise InputError(f"{bad} no commit id (40 hex digits) in 'sha'")
        if not isinstance(siblings, list) or not all(isinstance(s, dict) and isinstance(s.get("rfilename"), str)
                                                     for s in siblings):
            raise InputError(f"{bad} no file list ('siblings' of {{'rfilename': ...}})")
        self.commit = sha
        return sha, {s["rfilename"] for s in siblings}

    def _url(self, file: str) -> str:
        # the hub's resolve URL (as hf_hub_url builds it), on the endpoint read at call time
        return f"{self.read.endpoint}/{self.repo_id}/resolve/{self.commit}/{quote(file)}"

    def fetch_json(self, name: str, folder: Path) -> None:
        """Download the small JSON file ``name`` into ``folder`` (at most MAX_JSON_BYTES)."""
        label = f"{self.repo_id}/{name}"
        with self._get(self._url(name), label, name) as body:
            if body.status != 200:
                raise InputError(f"{label}: unexpected HTTP {body.status}")
            data = body.read_at_most(MAX_JSON_BYTES)
        if len(data) > MAX_JSON_BYTES:
            raise InputError(f"{label}: more than {MAX_JSON_BYTES} bytes is too large for a JSON config")
        (folder / name).write_bytes(data)

    def fetch_headers(self, files: list[str]) -> dict[str, tuple[SafetensorsHeader, bytes]]:
        """``{file: (validated header, its raw bytes)}`` for each shard, a few at a time."""
        if not files:
            return {}
        pool = ThreadPoolExecutor(min(MAX_WORKERS, len(files)), thread_name_prefix="gptq2xpu-hub")
        try:
            return dict(zip(files, pool.map(self._header, files)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _header(self, file: str) -> tuple[SafetensorsHeader, bytes]:
        label = f"{self.repo_id}/{file}"
        url = self._url(file)
        spans = []                     # (first, end) byte offsets of the file received
        with self._get(url, label, file, 0, 7) as body:
            size, first, avail = self._extent(body, label, file, 0, 7)
            head = body.read_exact(min(8, avail), label)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if len(head) < 8 or n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                parse_header(head, size, label)  # raises with the precise reason
            rest = body.read_exact(n, label) if body.status == 200 else None  # Range ignored: read on, bounded
            spans.append((first, first + body.received))
        if rest is None:
            with self._get(url, label, file, 8, 7 + n) as body:
                size2, first, _ = self._extent(body, label, file, 8, 7 + n)
                if size2 != size:
                    raise InputError(f"{label}: the file size changed between two requests ({size} then {size2} bytes)")
                if body.status == 200 and body.read_exact(8, label) != head:
                    raise InputError(f"{label}: the file changed between two requests")
                rest = body.read_exact(n, label)
                spans.append((first, first + body.received))
        raw = head + rest
        hdr = parse_header(raw, size, label)
        hdr.path = file
        past_header = sum(max(0, end - max(start, hdr.data_start)) for start, end in spans)
        if past_header:
            with self.read._lock:
                self.read.tensor_bytes_fetched += past_header
        return hdr, raw

    def _extent(self, body: _Body, label: str, file: str, first: int, last: int) -> tuple[int, int, int]:
        """(file size, offset of the body's first byte, body bytes to use) for a GET of bytes first..last."""
        if body.status == 206:
            value = body.headers.get("Content-Range", "").strip()
            m = _CONTENT_RANGE.fullmatch(value)
            if not m:
                raise InputError(f"{label}: partial response without a usable Content-Range ({value[:80]!r})")
            a, b, size = map(int, m.groups())
            # exactly the range asked for, or its part up to the end of a shorter file
            if a != first or not a <= b <= last or b >= size or (b < last and b != size - 1):
                raise InputError(f"{label}: asked for bytes {first}-{last}, the server sent {value[:80]!r}")
            return size, a, b - a + 1
        if body.status == 200:
            length = body.headers.get("Content-Length", "").strip()
            if not _LENGTH.fullmatch(length):
                raise InputError(f"{label}: the server ignored the byte range and sent no Content-Length, "
                                 "so the file size is unknown")
            with self.read._lock:
                if file not in self.read.range_ignored:
                    self.read.range_ignored.append(file)
            return int(length), 0, int(length)
        raise InputError(f"{label}: unexpected HTTP {body.status} for a byte-range request")
