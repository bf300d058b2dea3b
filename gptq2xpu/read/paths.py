"""Paths named by untrusted data: file names from an index or manifest, and where links lead."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def is_inside(root_real: str, path: Path) -> bool:
    """Whether ``path``, links resolved, is ``root_real`` or lies below it (``root_real``: a realpath)."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def check_member_name(name: object, what: str) -> str:
    """A file name from an untrusted index: relative, no ``..``, no drive/backslash tricks."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{what}: bad shard file name {name!r}")
    try:
        os.fsencode(name)
    except UnicodeError:  # e.g. a lone surrogate from a JSON \ud800 escape
        raise InputError(f"{what}: shard file name {name!r} cannot be a file name on this system") from None
    if name.startswith(("/", "\\")) or os.path.isabs(name) or "\\" in name or ":" in name:
        raise InputError(f"{what}: shard file {name!r} is an absolute path; it must stay inside the checkpoint folder")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(f"{what}: shard file {name!r} leaves the checkpoint folder")
    return name
