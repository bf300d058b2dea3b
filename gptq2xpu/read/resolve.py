"""Resolve SOURCE: a local folder, or a Hugging Face repo id fetched with ``snapshot_download``.

Only what conversion needs is fetched (configs, index, ``*.safetensors``, tokenizer, generation,
chat-template, README and licence files), and the hub's own cache and ``HF_HUB_OFFLINE`` are
honoured because the download goes through huggingface_hub itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError, UsageError
from .paths import text_name

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

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and ".." not in source and not source.endswith((".", "-"))


def resolve_source(source: str, *, revision: str | None = None, token: str | None = None) -> tuple[Path, Path, str]:
    """Return (folder, trusted_root, origin) for SOURCE.

    ``trusted_root`` is the folder that symlinks may point into: the folder itself for a local
    checkout, the repository's cache folder for a hub snapshot (whose files link to ``../../blobs``).
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{source}: SOURCE must be a checkpoint folder, not a file")
        if revision is not None:
            raise UsageError(f"--revision {revision!r}: SOURCE {source} is a local folder; --revision selects a "
                             "commit of a Hugging Face repo id (drop it, or name the repo id)")
        return path, path, str(source)
    if not looks_like_repo_id(source):
        raise InputError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        return _download(source, revision, token)
    except InputError as exc:  # say both readings of SOURCE: a typo'd folder reads as a repo id
        raise InputError(f"{source}: no such folder; as a Hugging Face repo id: "
                         f"{exc.message.removeprefix(f'{source}: ')}") from None


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
    return _download(repo_id, revision, token, local_files_only=True)


def _download(repo_id: str, revision: str | None, token: str | None, *,
              local_files_only: bool = False) -> tuple[Path, Path, str]:
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{repo_id}: huggingface_hub is needed for hub sources ({exc})") from None
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=local_files_only,
        )
    except hf_errors.GatedRepoError:
        raise InputError(f"{repo_id}: gated repository; accept its terms and pass --token") from None
    except hf_errors.RepositoryNotFoundError:
        raise InputError(f"{repo_id}: repository not found on the Hugging Face hub (or no access: pass "
                         "--token)") from None
    except hf_errors.RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision {revision!r} not found") from None
    except hf_errors.LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            "(HF_HUB_OFFLINE is set or there is no network)"
        ) from None
    except hf_errors.HFValidationError as exc:
        raise InputError(f"{repo_id}: not a valid repo id ({exc})") from None
    except hf_errors.HfHubHTTPError as exc:
        raise InputError(f"{repo_id}: download failed ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise InputError(f"{repo_id}: download failed ({exc.strerror or exc})") from None
    folder = Path(folder)
    # snapshots/<sha>/ -> the repo's cache folder (models--owner--name) holds the blobs it links to
    trusted = folder.parent.parent if folder.parent.name == "snapshots" else folder
    origin = repo_id if revision is None else f"{repo_id}@{revision}"
    return folder, trusted, origin
