"""Which ``*.safetensors`` files make up a checkpoint: one rule for a local folder and a hub repository.

With a safetensors index, the files it names (each must exist); without one, ``model.safetensors``,
else AutoGPTQ's ``model_file_base_name`` from ``quantize_config.json``, else the only
``*.safetensors`` file.  Any other ``*.safetensors`` file beside the chosen ones is left out, and
:attr:`Shards.left_out` says which and why (the reader warns).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..contract import INDEX_NAME
from ..errors import InputError
from .paths import Folder, check_member_name

#: Weight files gptq2xpu never opens (pickles can run code when loaded).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class Shards:
    files: list[str]
    index: dict[str, str] | None = None  # the weight_map read from ``index_file``
    index_file: str | None = None
    left_out: list[str] = field(default_factory=list)   # one warning per left-out file

    def warnings(self, where: str) -> list[str]:
        return [f"{where}: {w}" for w in self.left_out]


def find_shards(folder: Folder, names: Iterable[str], where: str,
                exists: Callable[[str], bool] | None = None) -> Shards:
    """The shards among ``names`` (the top-level file names of the checkpoint; the index and
    ``quantize_config.json``, when there, are read from ``folder``).  ``exists(file)`` tells
    whether a file an index names exists (default: it is among ``names``)."""
    from .checkpoint import read_index

    names = sorted(set(names))
    index_files = [n for n in names if n.endswith(".safetensors.index.json")]
    if INDEX_NAME in index_files:
        index_files = [INDEX_NAME]
    if len(index_files) > 1:
        raise InputError(f"{where}: several safetensors index files ({', '.join(index_files)}); keep one")
    candidates = [n for n in names if n.endswith(".safetensors")]
    if index_files:
        name = check_member_name(index_files[0], where)
        index = read_index(folder, name)
        named = sorted(set(index.values()))
        exists = exists or set(names).__contains__
        for file in named:
            try:
                if not exists(file):
                    raise InputError(f"{name}: shard {file!r} named in the index does not exist in {where}")
            except OSError as exc:  # ENAMETOOLONG, EACCES...
                raise InputError(f"{name}: shard {file!r} cannot be checked ({exc.strerror or exc})") from None
        return Shards(named, index, name, _left_out(candidates, named, f"not named in {name}"))
    if not candidates:
        pickles = [n for n in names if os.path.splitext(n)[1] in PICKLE_SUFFIXES]
        if pickles:
            raise InputError(
                f"{where}: only pickle weights found ({', '.join(pickles[:3])}); gptq2xpu never loads "
                "pickles (they can run code when opened): convert them to safetensors first")
        raise InputError(f"{where}: no *.safetensors files and no {INDEX_NAME}")
    # Without an index, loaders read model.safetensors, or AutoGPTQ's model_file_base_name.
    why = None
    if "model.safetensors" in candidates:
        files, why = ["model.safetensors"], f"there is no {INDEX_NAME}, and loaders read model.safetensors"
    elif folder.exists("quantize_config.json") and isinstance(
            base := folder.read_json("quantize_config.json").get("model_file_base_name"), str) \
            and f"{base}.safetensors" in candidates:
        files, why = [f"{base}.safetensors"], f"quantize_config.json names {base}.safetensors"
    elif len(candidates) == 1:
        files = candidates
    else:
        raise InputError(f"{where}: several safetensors files ({', '.join(candidates[:4])}) and no {INDEX_NAME}; "
                         "cannot tell which hold the model")
    return Shards(files, left_out=_left_out(candidates, files, why or ""))


def _left_out(candidates: list[str], files: list[str], why: str) -> list[str]:
    chosen = set(files)
    return [f"{name} is not part of the checkpoint and is left out ({why})"
            for name in candidates if name not in chosen]
