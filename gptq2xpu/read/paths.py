"""Files inside a folder we were handed: every name, link and open is checked here, in one place.

A source checkpoint, a converted output handed to ``verify``/``finalize``/the loader, and OUTPUT
itself are all untrusted: a name from an index or manifest may try to leave the folder (``..``,
absolute paths), a file may be a link pointing elsewhere, a FIFO (opening it would block) or a
device (``/dev/zero`` never ends).  Two policies:

* ``links="inside"`` (sources): links are followed but must resolve inside the trusted root, or,
  for a Hugging Face cache snapshot (every file a link to ``../../blobs/<hash>``), inside that
  repository's ``blobs`` folder (:func:`hub_blobs`);
* ``links="none"`` (converted outputs, which gptq2xpu writes without links): no link anywhere
  below the folder.

Either way only regular files are opened, and JSON documents have a size cap.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, read_error

#: The largest JSON document (index, manifest, split records) read from an untrusted folder: the
#: index of the largest MoE checkpoints is tens of MB.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: The largest model or quantization config.  Real ones are kilobytes, and parsing JSON takes many
#: times its size in memory, so these get a cap of their own; gptq2xpu refuses to write a
#: config.json that its own readers would refuse.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
CONFIG_DOCUMENTS = frozenset({"config.json", "quantize_config.json", "quantization_config.json"})
LINK_POLICIES = ("inside", "none")


def is_inside(root_real: str, path: Path | str) -> bool:
    """Whether ``path``, links resolved, is ``root_real`` or lies below it (``root_real``: a realpath)."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def check_member_name(name: object, what: str) -> str:
    """A file name from an untrusted index or manifest: relative, no ``..``, no drive/backslash tricks."""
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > 4096:
        raise InputError(f"{what}: bad file name {_short(name)}")
    try:
        name.encode("utf-8")
        os.fsencode(name)
    except UnicodeError:  # a lone surrogate: a JSON \ud800 escape, or bytes of a name that are not UTF-8
        raise InputError(f"{what}: file name {_short(name)} is not valid UTF-8 text") from None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or "\\" in name or ":" in name:
        raise InputError(f"{what}: file {_short(name)} is an absolute path; it must stay inside the folder")
    parts = name.split("/")
    if ".." in parts:
        raise InputError(f"{what}: file {_short(name)} leaves the folder")
    if any(p in ("", ".") for p in parts):
        raise InputError(f"{what}: file {_short(name)} is not a plain relative name (no './', '//' or "
                         "trailing '/')")
    return name


def text_name(name: str) -> str:
    """``name`` as text any UTF-8 document can hold: the bytes of a file name that are not UTF-8
    (kept by :func:`os.fsdecode` as lone surrogates) written as ``\\xNN``; other names unchanged."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def portable_name(name: str) -> bool:
    """Whether a top-level file name passes :func:`check_member_name` (side files are copied only
    then): a name a manifest can list and ``verify`` accepts, so valid UTF-8 among the rest."""
    try:
        check_member_name(name, "")
    except InputError:
        return False
    return "/" not in name


@dataclass(frozen=True)
class Folder:
    """A folder whose members are opened under one link policy."""

    root: Path
    trusted_root: Path | None = None   # links may resolve anywhere below it ("inside"); default: root
    links: str = "inside"

    def __post_init__(self):
        if self.links not in LINK_POLICIES:
            raise ValueError(f"links={self.links!r}")

    @property
    def trusted_real(self) -> str:
        return os.path.realpath(self.trusted_root or self.root)

    def check(self, rel: str, what: str | None = None) -> Path:
        """The path of member ``rel``, refused when it is a link the policy forbids."""
        path = self.root / rel
        label = what or rel
        if self.links == "none":
            want = os.path.join(os.path.realpath(self.root), *rel.split("/"))
            if os.path.realpath(path) != want:
                raise InputError(f"{label}: is a symbolic link (or lies below one); a gptq2xpu output holds no links")
        elif not (is_inside(self.trusted_real, path) or self._in_hub_blobs(path)):
            raise InputError(f"{label}: is a link pointing outside the checkpoint folder; replace the link with the "
                             "file itself")
        return path

    def _in_hub_blobs(self, path: Path) -> bool:
        """Whether ``path`` resolves into the blobs of the Hugging Face cache repository whose
        snapshot this folder is (:func:`hub_blobs`): a snapshot given by its path links there."""
        blobs = hub_blobs(self.root)
        return blobs is not None and is_inside(blobs, path)

    def open(self, rel: str, what: str | None = None) -> int:
        """A read-only descriptor of member ``rel``: checked by the policy, and a regular file."""
        path = self.check(rel, what)
        label = what or rel
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        if self.links == "none":
            flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise read_error(label, exc, "cannot open") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{label}: is not a regular file ({_kind(st.st_mode)})")
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def exists(self, rel: str) -> bool:
        """Whether member ``rel`` exists as anything at all (a file, a link, a FIFO...).

        Callers then :meth:`open` it, which refuses what is not a regular file: an existing
        ``config.json`` that is a FIFO or a link to ``/dev/zero`` is an error, not an absence.
        """
        return os.path.lexists(self.root / rel)

    def read_bytes(self, rel: str, what: str | None = None, limit: int | None = None) -> bytes:
        fd = self.open(rel, what)
        try:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise InputError(f"{what or rel}: {size} bytes is more than the {limit} this file may have")
            chunks, got = [], 0
            while True:
                block = os.read(fd, 1 << 20)
                if not block:
                    break
                got += len(block)
                if limit is not None and got > limit:
                    raise InputError(f"{what or rel}: more than the {limit} bytes this file may have")
                chunks.append(block)
            return b"".join(chunks)
        except OSError as exc:
            raise read_error(what or rel, exc) from None
        finally:
            os.close(fd)

    def read_json(self, rel: str, what: str | None = None) -> dict:
        """A JSON object from member ``rel`` (size-capped by kind, UTF-8, every string writable again)."""
        label = what or rel
        return parse_json(self.read_bytes(rel, label, json_limit(rel)), label)


def json_limit(rel: str) -> int:
    """The size cap of JSON document ``rel``: configs have a smaller one than indexes and manifests."""
    return MAX_CONFIG_BYTES if Path(rel).name in CONFIG_DOCUMENTS else MAX_JSON_BYTES


_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_blobs(folder: Path) -> str | None:
    """The real path of the ``blobs`` folder of the Hugging Face cache repository when ``folder``
    is one of its snapshots (``<cache>/models--owner--name/snapshots/<commit>``, as huggingface_hub
    lays it out: every file a link to ``../../blobs/<hash>``), else None.  Only that repository's
    blobs folder is trusted, not the cache around it."""
    real = os.path.realpath(folder)
    snapshots, commit = os.path.split(real)
    repo, kind = os.path.split(snapshots)
    if kind != "snapshots" or not _COMMIT.fullmatch(commit) or not os.path.basename(repo).startswith("models--"):
        return None
    blobs = os.path.join(repo, "blobs")
    if os.path.realpath(blobs) != blobs or not os.path.isdir(blobs):
        return None
    return blobs


def parse_json(data: bytes, label: str, object_pairs_hook=None) -> dict:
    """A JSON object from untrusted bytes, one-line InputError otherwise (``object_pairs_hook`` as
    ``json.loads`` takes it).

    Strings must be valid Unicode (JSON allows ``"\\ud800"``, a lone surrogate no UTF-8 file can
    hold): a config gptq2xpu copies into OUTPUT must be writable again.
    """
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=object_pairs_hook)
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeError as exc:
        raise InputError(f"{label}: not valid UTF-8 text ({_short(str(exc))})") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{label}: not valid JSON ({_short(str(exc))})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{label}: expected a JSON object, found {type(doc).__name__}")
    return doc


@dataclass
class Tree:
    """What a folder holds, walked without following links: regular files, folders, and the rest."""

    files: dict[str, int] = field(default_factory=dict)     # relative name -> size
    folders: list[str] = field(default_factory=list)
    others: dict[str, str] = field(default_factory=dict)    # relative name -> what it is (link, FIFO...)


def walk(root: Path, *, limit: int = 1_000_000) -> Tree:
    """Every entry below ``root`` (relative POSIX names); links are reported, never followed."""
    tree = Tree()
    stack = [""]
    count = 0
    while stack:
        rel_dir = stack.pop()
        try:
            entries = list(os.scandir(root / rel_dir if rel_dir else root))
        except OSError as exc:
            raise read_error(str(root / rel_dir), exc, "cannot list") from None
        for entry in entries:
            count += 1
            if count > limit:
                raise InputError(f"{root}: holds more than {limit} entries")
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                tree.folders.append(rel)
                stack.append(rel)
            elif stat.S_ISREG(st.st_mode):
                tree.files[rel] = st.st_size
            else:
                tree.others[rel] = _kind(st.st_mode)
    return tree


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
