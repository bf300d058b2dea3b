"""Resolve SOURCE: a local folder, or a Hugging Face repo id downloaded into the hub's own cache.

Only what conversion needs is fetched (configs, index, ``*.safetensors``, tokenizer, generation,
chat-template, README and licence files) with huggingface_hub's ``model_info`` and
``hf_hub_download``, so its cache, token, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply.  What a
hub says is untrusted: the revision asked for and the commit it answers are checked before any
library call uses them (:func:`check_revision`, :data:`~gptq2xpu.read.hubclient.COMMIT`), and every
request is bounded (:mod:`gptq2xpu.read.hubclient`).  ``inspect`` (:mod:`gptq2xpu.read.remote`)
shares the model-info request, the error wording and the cache fallback defined here.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import InputError, UsageError
from . import hubclient
from .hubclient import COMMIT, Meter, bounded, bounded_each
from .paths import check_member_name, text_name

#: Files a conversion needs from a hub repository (fnmatch patterns for ``allow_patterns``).
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "merges.txt",
    "vocab*",
    "README*",
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY*",
]
#: Files downloaded at once.
DOWNLOAD_WORKERS = 8
OFFLINE = "HF_HUB_OFFLINE is set"
#: Cap on the model-info answer (the commit and the file list).
MAX_API_BYTES = 64 * 1024 * 1024
#: Longest revision accepted (a branch, tag or commit id).
MAX_REVISION = 255

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \\, no "..", no "@{"
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and ".." not in source and not source.endswith((".", "-"))


def check_revision(revision: str | None) -> str | None:
    """``revision`` if it is a branch or tag name (git's ref-name rules) or a commit id; a
    :class:`UsageError` otherwise.  Checked before any library call: huggingface_hub makes cache
    paths (``refs/<revision>``) of it."""
    if revision is None:
        return None
    shown = ascii(revision[:80])
    if not revision or len(revision) > MAX_REVISION:
        raise UsageError(f"--revision {shown}: a branch, tag or commit id of 1 to {MAX_REVISION} characters")
    parts = revision.split("/")
    if (not revision.isprintable() or _REF_BAD.search(revision) or revision == "@"
            or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts) or revision.endswith(".")):
        raise UsageError(f"--revision {shown}: not a branch, tag or commit id (no path syntax: '..', a leading "
                         "'/' or '.', '\\', control characters)")
    return revision


def resolve_source(source: str, *, revision: str | None = None, token: str | None = None) -> tuple[Path, Path, str]:
    """Return (folder, trusted_root, origin) for SOURCE.

    ``trusted_root`` is the folder that symlinks may point into: the folder itself for a local
    checkout, the repository's cache folder for a hub snapshot (whose files link to ``../../blobs``).
    """
    revision = check_revision(revision)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{source}: SOURCE must be a checkpoint folder, not a file: give the folder holding "
                             f"it, {path.parent}")
        if revision is not None:
            raise UsageError(f"--revision {revision!r}: SOURCE {source} is a local folder; --revision selects a "
                             "commit of a Hugging Face repo id (drop it, or name the repo id)")
        return path, path, str(source)
    if not looks_like_repo_id(source):
        raise InputError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    return _download(source, revision, token)


def provenance(source: str, folder: Path, revision: str | None) -> dict:
    """What a converted checkpoint records about its source: the same on every machine, and safe
    to publish (never a local path).  A hub repo id gives ``repo_id``, the ``revision`` asked for
    and the ``commit`` it resolved to; a local folder its name, or, for a folder of the Hugging
    Face cache (``models--owner--name/snapshots/<commit>``), the repo id and commit it holds.
    Names taken from the file system are recorded as text (:func:`~gptq2xpu.read.paths.text_name`):
    config.json is UTF-8, a folder name need not be."""
    local = Path(source).expanduser()
    folder = Path(folder)
    snapshot = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    if local.exists() and not snapshot:
        return {"folder": text_name(local.resolve().name)}
    repo_id = source if not local.exists() else folder.parent.parent.name[len("models--"):].replace("--", "/")
    return {"repo_id": text_name(repo_id), "revision": revision, "commit": text_name(folder.name) if snapshot else None}


def cached_snapshot(repo_id: str, *, revision: str | None = None, token: str | None = None) -> tuple[Path, Path, str]:
    """Like :func:`resolve_source` for a repo id, from the local Hugging Face cache only (no request)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    revision = check_revision(revision)
    try:
        folder = Path(snapshot_download(repo_id=repo_id, revision=revision, token=token,
                                        allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise InputError(f"{repo_id}: not in the local Hugging Face cache") from None
    except hf_errors.HFValidationError as exc:
        raise InputError(f"{repo_id}: not a valid repo id ({exc})") from None
    except OSError as exc:
        raise InputError(f"{repo_id}: the local Hugging Face cache cannot be read ({exc.strerror or exc})") from None
    # the commit a cached ref names becomes a path: it must be one, inside the repository's cache
    if folder.parent.name != "snapshots" or not COMMIT.fullmatch(folder.name):
        raise InputError(f"{repo_id}: the local Hugging Face cache names {text_name(folder.name)[:60]!r} as the "
                         f"commit of {revision or 'main'}, which is not a commit id (40 hex digits)")
    return folder, folder.parent.parent, _origin(repo_id, revision)


def _origin(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id}@{revision}"


# ------------------------------------------------------------------------------------- talking to the hub


class Unreachable(InputError):
    """The hub could not be reached at all (no connection, or offline mode)."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def not_found_either(repo_id: str, why: str) -> InputError:
    """The one message for a repository the hub cannot give and the cache does not hold."""
    return InputError(f"{repo_id}: no such folder; as a Hugging Face repo id: not in the local Hugging Face cache, "
                      f"and {why}")


def from_cache_or_explain(repo_id: str, revision: str | None, token: str | None, why: str) -> tuple[Path, Path, str]:
    """The cached snapshot when the hub cannot be asked (``why``: offline, or unreachable)."""
    try:
        return cached_snapshot(repo_id, revision=revision, token=token)
    except InputError as exc:
        if exc.message == f"{repo_id}: not in the local Hugging Face cache":
            raise not_found_either(repo_id, why) from None
        raise


def hub_error(exc: BaseException, repo_id: str, revision: str | None, label: str) -> InputError:
    """What a hub failure (a huggingface_hub or httpx2 exception) means, in one line.  The server's
    own answer (HTTP status, X-Error-Message) is named; only a failed connection reads as
    :class:`Unreachable`."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    where = endpoint()
    seen = exc
    while seen is not None and not isinstance(seen, (hf_errors.HfHubHTTPError, httpx2.HTTPError,
                                                    hf_errors.OfflineModeIsEnabled, InputError)):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, InputError):
        return seen
    if isinstance(seen, hf_errors.OfflineModeIsEnabled):
        return Unreachable(OFFLINE)
    is_http = isinstance(seen, hf_errors.HfHubHTTPError)  # an answer from the server (also an httpx2.HTTPError)
    if not is_http and isinstance(seen, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError)):
        return Unreachable(f"cannot reach {where} ({type(seen).__name__}: {seen or 'no answer'})")
    if not is_http and isinstance(seen, httpx2.TimeoutException):
        return InputError(f"{label}: {where} stopped answering ({type(seen).__name__})")
    if not is_http and isinstance(seen, httpx2.HTTPError):
        return InputError(f"{label}: the answer from {where} was cut short or malformed ({type(seen).__name__}: "
                          f"{str(seen)[:200]})")
    response = getattr(seen, "response", None)
    status = getattr(response, "status_code", None)
    headers = response.headers if response is not None else {}
    detail = " ".join(str(headers.get("X-Error-Message", "")).split())[:200]
    answer = f"HTTP {status}{': ' + detail if detail else ''}"
    if isinstance(seen, hf_errors.GatedRepoError):
        return InputError(f"{repo_id}: gated repository; accept its terms on the hub and pass --token ({answer})")
    if isinstance(seen, hf_errors.RepositoryNotFoundError):
        return InputError(f"{repo_id}: repository not found at {where} (or no access: pass --token) ({answer})")
    if isinstance(seen, hf_errors.RevisionNotFoundError):
        return InputError(f"{repo_id}: revision {revision!r} not found ({answer})")
    if isinstance(seen, hf_errors.RemoteEntryNotFoundError) or status == 404:
        return InputError(f"{label}: not found at {where} ({answer})")
    if status == 403:
        return InputError(f"{label}: access denied ({answer}); check --token")
    if seen is None:
        return InputError(f"{label}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    return InputError(f"{label}: {where} answered {answer}")


def repo_files(repo_id: str, revision: str | None, token: str | None, meter: Meter | None = None,
               label: str = "(model info)") -> tuple[str, set[str]]:
    """The commit ``revision`` points at (checked: 40 hex digits) and the repository's file names
    (checked: text, inside the repository), from one model-info request."""
    from huggingface_hub import HfApi

    def ask():
        try:
            return HfApi(endpoint=endpoint(), token=token, library_name="gptq2xpu").model_info(
                repo_id, revision=revision)
        except Exception as exc:
            raise hub_error(exc, repo_id, revision, repo_id) from None

    info = bounded(ask, repo_id, meter=meter, file=label, limit=MAX_API_BYTES)
    bad = f"{repo_id}: {endpoint()} answered the model-info request with"
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
        raise InputError(f"{bad} {ascii(sha)[:60]} as the commit id ('sha'), not 40 hex digits")
    siblings = getattr(info, "siblings", None)
    names = [getattr(s, "rfilename", None) for s in siblings] if isinstance(siblings, list) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise InputError(f"{bad} no file list ('siblings' of {{'rfilename': ...}})")
    for name in names:
        check_member_name(name, f"{repo_id}: file list")
    return sha, set(names)


def _download(repo_id: str, revision: str | None, token: str | None) -> tuple[Path, Path, str]:
    """Download what a conversion needs of ``repo_id`` at ``revision`` into the Hugging Face cache."""
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    if constants.HF_HUB_OFFLINE:
        return from_cache_or_explain(repo_id, revision, token, OFFLINE)
    try:
        commit, names = repo_files(repo_id, revision, token)
    except Unreachable as exc:
        return from_cache_or_explain(repo_id, revision, token, exc.message)
    wanted = sorted(filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS))
    paths = _fetch_files(repo_id, commit, token, wanted)
    # the snapshot folder: <cache>/models--owner--name/snapshots/<commit>, where every file was linked
    folder = Path(paths[0]).parents[wanted[0].count("/")] if paths else _snapshot(repo_id, commit)
    if folder != _snapshot(repo_id, commit):
        raise InputError(f"{repo_id}: huggingface_hub put the download in {folder}, not in its cache's snapshot "
                         f"of commit {commit}")
    folder.mkdir(parents=True, exist_ok=True)
    _remember_ref(folder.parent.parent, revision or "main", commit)
    return folder, folder.parent.parent, _origin(repo_id, revision)


def _remember_ref(repo_cache: Path, revision: str, commit: str) -> None:
    """Record in the cache that ``revision`` (checked by :func:`check_revision`) is ``commit``, as
    snapshot_download does (files downloaded by commit record no ref), so offline use finds it."""
    if revision == commit:
        return
    ref = repo_cache / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache: the download itself is complete


def _snapshot(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def _fetch_files(repo_id: str, commit: str, token: str | None, files: list[str]) -> list[str]:
    """``hf_hub_download`` of each file at ``commit``, a few at a time, each one bounded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    shown = hubclient.bars_shown()
    progress = hubclient.progress_class()

    def one(file: str) -> str:
        try:
            return hf_hub_download(repo_id, file, revision=commit, token=token, endpoint=endpoint(),
                                   library_name="gptq2xpu", tqdm_class=progress)
        except Exception as exc:
            raise hub_error(exc, repo_id, commit, f"{repo_id}/{file}") from None

    with contextlib.nullcontext() if shown else disable_progress_bars():
        paths = bounded_each(one, files, lambda f: f"{repo_id}/{f}", DOWNLOAD_WORKERS)
    return [paths[f] for f in files]
