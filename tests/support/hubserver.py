"""A small Hugging Face Hub look-alike on 127.0.0.1 for tests (not a test module).

It serves the endpoints huggingface_hub 2.4 calls for a model repository:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``sha``,
  ``siblings``), as ``model_info`` / ``repo_info`` read it;
* ``GET /api/models/{repo}/tree/{rev}``: the file listing ``snapshot_download`` reads;
* ``HEAD`` and ``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Accept-Ranges``; a single ``Range: bytes=a-b`` is answered with 206 and
  ``Content-Range`` (416 when it starts past the end); errors carry ``X-Error-Code`` as the hub's do.

Per repository it can misbehave on purpose: ``ignore_range`` (200 and the whole file, whatever the
Range), ``truncate`` (announce the full length, send half, close), ``missing`` (listed files that
answer 404 ``EntryNotFound``), ``token`` (gated: without
``Authorization: Bearer <token>`` file requests get 401 ``GatedRepo``).  Every request is logged;
for file bodies the log holds the byte range actually written, so a test can prove which bytes
left the server.

The server listens on 127.0.0.1 with port 0, answers at most ``max_requests`` requests, and stops
by itself after ``lifetime_s`` seconds even if the test never stops it (a guard against a test
that hangs, not a limit a test should ever meet: a loaded machine may run a test ten times slower).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str
    refs: dict[str, str]
    token: str | None = None
    ignore_range: bool = False
    truncate: bool = False
    missing: tuple[str, ...] = ()   # listed in the file list, but 404 when asked for
    # hostile answers (tests/test_hub_hostile.py):
    info_sha: str | None = None     # the commit model info and X-Repo-Commit name, whatever is asked
    file_commit: str | None = None  # the X-Repo-Commit of file answers (model info stays right)
    etag: str | None = None         # the ETag of every file answer
    fail: dict = field(default_factory=dict)   # kind ("api"/"file") -> (status, headers) answered instead
    trickle: tuple[str, ...] = ()   # kinds ("api"/"file") whose body is sent one byte per trickle_s
    trickle_s: float = 1.0
    slow_file: str | None = None    # this file's full GET is sent slow_piece bytes per 0.1 s; slow_started is set then
    slow_piece: int = 4096
    slow_started: threading.Event = field(default_factory=threading.Event)
    claim_size: int | None = None   # the file size Content-Range / Content-Length claim


@dataclass
class Served:
    """One request: method, what was asked (``api``/``tree``/``file``), the file, the Range header,
    the status, the byte range of the file written (end exclusive), the Authorization header and
    the revision named in a file URL."""

    method: str
    kind: str
    repo: str
    file: str | None
    range: str | None
    status: int
    start: int = 0
    end: int = 0
    auth: str | None = None
    rev: str | None = None


@dataclass
class FakeHub:
    max_requests: int = 400
    lifetime_s: float = 900.0
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)

    # ------------------------------------------------------------------ content
    def add_folder(self, repo_id: str, folder: Path, **kw) -> FakeRepo:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}
        return self.add_files(repo_id, files, **kw)

    def add_files(self, repo_id: str, files: dict[str, bytes], **kw) -> FakeRepo:
        sha = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        repo = FakeRepo(dict(files), sha, {"main": sha}, **kw)
        self.repos[repo_id] = repo
        return repo

    def requests(self) -> list[Served]:
        """Every request answered so far, once no answer is still being written (the client can
        go on before the server thread has logged what it sent)."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=10)
            return list(self.log)

    def file_requests(self, repo: str | None = None) -> list[Served]:
        return [s for s in self.requests() if s.kind == "file" and (repo is None or s.repo == repo)]

    def clear(self) -> None:
        self.requests()
        with self._lock:
            self.log.clear()

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> FakeHub:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._stop = threading.Event()
        self._count = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.timeout = 0.05
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._loop, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and self._count < self.max_requests:
                self._server.handle_request()
        finally:
            self._server.server_close()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _begin(self) -> None:
        with self._lock:
            self._count += 1
            self._busy += 1

    def _record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)
            self._busy -= 1
            self._idle.notify_all()


_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?")
_TREE = re.compile(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5  # a stalled client cannot hold a handler thread for long

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_GET(self):
            self._dispatch("GET")

        # -------------------------------------------------------------- routing
        def _dispatch(self, method: str) -> None:
            hub._begin()
            self.close_connection = True
            self._served = None
            try:
                path = unquote(urlsplit(self.path).path)
                auth = self.headers.get("Authorization")
                if m := _TREE.fullmatch(path):
                    return self._tree(method, m[1], m[2], auth)
                if m := _API.fullmatch(path):
                    return self._info(method, m[1], m[2], auth)
                if m := _RESOLVE.fullmatch(path):
                    return self._file(method, m[1], m[2], m[3], auth)
                self._error(404, None, "NotFound", Served(method, "other", "", self.path, None, 404, auth=auth))
            finally:
                hub._record(self._served or Served(method, "broken", "", self.path, None, 0))

        def _repo(self, repo_id: str, rev: str | None):
            repo = hub.repos.get(repo_id)
            if repo is None:
                return None, None, "RepoNotFound"
            rev = rev or "main"
            sha = repo.refs.get(rev, rev if rev == repo.sha else None)
            if sha is None:
                return repo, None, "RevisionNotFound"
            return repo, sha, None

        def _info(self, method, repo_id, rev, auth):
            repo, sha, err = self._repo(repo_id, rev)
            served = Served(method, "api", repo_id, None, None, 200, auth=auth)
            if err:
                return self._error(404, sha, err, served)
            if "api" in repo.fail:
                return self._fail(repo.fail["api"], served)
            sha = repo.info_sha or sha
            body = json.dumps({"id": repo_id, "sha": sha, "private": False, "gated": "auto" if repo.token else False,
                               "siblings": [{"rfilename": f} for f in sorted(repo.files)]}).encode()
            self._send(200, {"Content-Type": "application/json"}, body if method == "GET" else b"", served,
                       trickle=repo.trickle_s if "api" in repo.trickle else 0)

        def _fail(self, answer, served):
            status, headers = answer
            served.status = status
            self._send(status, {"Content-Type": "application/json", **headers}, b'{"error": "busy"}', served)

        def _tree(self, method, repo_id, rev, auth):
            repo, sha, err = self._repo(repo_id, rev)
            served = Served(method, "tree", repo_id, None, None, 200, auth=auth)
            if err:
                return self._error(404, sha, err, served)
            entries = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                       for f, d in sorted(repo.files.items())]
            self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), served)

        def _file(self, method, repo_id, rev, name, auth):
            repo, sha, err = self._repo(repo_id, rev)
            rng = self.headers.get("Range")
            served = Served(method, "file", repo_id, name, rng, 200, auth=auth, rev=rev)
            if err:
                return self._error(404, sha, err, served)
            if "file" in repo.fail:
                return self._fail(repo.fail["file"], served)
            sha = repo.file_commit or repo.info_sha or sha
            if repo.token and auth != f"Bearer {repo.token}":
                return self._error(401, sha, "GatedRepo", served)
            data = None if name in repo.missing else repo.files.get(name)
            if data is None:
                return self._error(404, sha, "EntryNotFound", served)
            headers = {"X-Repo-Commit": sha, "ETag": repo.etag or f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            start, end, status = 0, len(data), 200
            m = _RANGE.fullmatch(rng or "")
            if m and not repo.ignore_range:
                start = int(m[1])
                end = min(int(m[2]) + 1, len(data)) if m[2] else len(data)
                if start >= len(data) or end <= start:
                    headers["Content-Range"] = f"bytes */{len(data)}"
                    served.status = 416
                    return self._send(416, headers, b"", served)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{repo.claim_size or len(data)}"
            headers["Content-Length"] = str(end - start if not (repo.claim_size and method == "HEAD")
                                            else repo.claim_size)
            body = data[start:end] if method == "GET" else b""
            if repo.truncate and method == "GET":
                body = body[: len(body) // 2]
            served.status = status
            slow = method == "GET" and name == repo.slow_file and rng is None
            if slow:
                repo.slow_started.set()
            self._send(status, headers, body, served, offset=start, announce=False,
                       trickle=repo.trickle_s if "file" in repo.trickle else 0,
                       piece=repo.slow_piece if slow else 16384, pause=0.1 if slow else 0)

        # -------------------------------------------------------------- answers
        def _error(self, status, sha, code, served: Served):
            headers = {"X-Error-Code": code, "X-Error-Message": f"{code} (fake hub)",
                       "Content-Type": "application/json"}
            if sha:
                headers["X-Repo-Commit"] = sha
            served.status = status
            self._send(status, headers, json.dumps({"error": code}).encode(), served)

        def _send(self, status, headers, body: bytes, served: Served, *, offset=0, announce=True,
                  trickle=0.0, piece=16384, pause=0.0):
            self._served = served
            sent = 0
            try:
                self.send_response(status)
                if announce:
                    headers = {**headers, "Content-Length": str(len(body))}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                if trickle:
                    piece, pause = 1, trickle
                for i in range(0, len(body), piece):
                    self.wfile.write(body[i : i + piece])
                    sent += len(body[i : i + piece])
                    if pause:
                        self.wfile.flush()
                        time.sleep(pause)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client stopped reading (as it should when a server ignores Range)
            finally:
                served.start, served.end = offset, offset + sent

    return Handler
