"""Helpers of the hostile-input, interruption, fuzz and exit-code tests.

Everything here builds mutated *copies* of the AutoRound fixture (``helpers.FIXTURE``, never
modified) or checks the "fail cleanly, lose nothing" contract of a CLI run
(``helpers.run_cli`` or ``helpers.cli``; :func:`one_error_line` is its stderr part):

* the exit code;
* stderr holds exactly one non-empty line (warnings aside when allowed), naming what it should;
* no Python traceback;
* source files unchanged (sha256 before/after);
* nothing at OUTPUT and no hidden ``.OUTPUT.gptq2xpu-partial-*`` / ``-old-*`` folder beside it.

:func:`write_pickle_trap` writes a pickle that leaves a marker file if anything ever unpickles it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

from support.helpers import FIXTURE, load_tensors, write_arrays

SHARD = "model.safetensors"
L0 = "model.layers.0.mlp"
L1 = "model.layers.1.mlp"


def fixture_copy(dst: Path, *, side_files: bool = False) -> Path:
    """Copy the fixture's model.safetensors + config.json (and optionally the other files) to ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    names = [SHARD, "config.json"]
    if side_files:
        names += ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    for n in names:
        shutil.copyfile(FIXTURE / n, dst / n)
    return dst


# ------------------------------------------------------------------------------ mutations


def mutate(root: Path, fn, shard: str = SHARD) -> None:
    """Rewrite ``root/shard`` after ``fn(tensors)`` edited the ``{name: (dtype, array)}`` dict in place."""
    t = load_tensors(root / shard)
    fn(t)
    write_arrays(root / shard, t, {"format": "pt"})


def edit_config(root: Path, fn) -> None:
    p = root / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg, indent=2))


def split_into_index(root: Path, *, n_shards: int = 2) -> dict[str, str]:
    """Split the single model.safetensors into ``n_shards`` files with a model.safetensors.index.json."""
    tensors = load_tensors(root / SHARD)
    names = list(tensors)
    per = -(-len(names) // n_shards)
    wm = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        write_arrays(root / fname, part, {"format": "pt"})
        wm.update({n: fname for n in part})
    (root / SHARD).unlink()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    return wm


# ------------------------------------------------------------------------------ checks


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the link target of every symlink)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(output: Path) -> list[str]:
    """Hidden build folders beside OUTPUT (``.NAME.gptq2xpu-partial-*`` / ``.NAME.gptq2xpu-old-*``)."""
    parent = Path(output).parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(output).name}.gptq2xpu-"))


def one_error_line(stderr: str, *, ignore_warnings: bool = False, context: str | None = None) -> str:
    """The one line a failure writes: stderr holds exactly one non-empty line (lines starting with
    "warning" aside, with ``ignore_warnings``), ``gptq2xpu: ...``, and no traceback.  Returns it."""
    lines = [x for x in stderr.splitlines() if x.strip() and not (ignore_warnings and x.startswith("warning"))]
    assert len(lines) == 1 and lines[0].startswith("gptq2xpu: ") and "Traceback" not in stderr, context or stderr
    return lines[0]


def assert_clean_failure(proc, code: int, output: Path | None, *must_name: str) -> str:
    """The one contract every failure must keep.  Returns the error line."""
    ctx = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    assert proc.returncode == code, ctx
    line = one_error_line(proc.stderr, context=ctx)
    for word in must_name:
        assert word.lower() in line.lower(), f"{word!r} not named in: {line}"
    if output is not None:
        assert not Path(output).exists() and not Path(output).is_symlink(), ctx
        assert leftovers(output) == [], ctx
    return line


# ------------------------------------------------------------------------------ pickle trap


class _Trap:
    """Unpickling an instance calls ``builtins.open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_trap(path, marker_file) -> Path:
    """Write ``pytorch_model.bin`` (into directory ``path``, or to ``path`` itself if it names a
    ``.bin`` file): a pickle that creates ``marker_file`` when loaded (``pickle.load`` or
    ``torch.load(weights_only=False)``, which unpickles the legacy magic number first).  Only proves
    that a converter never unpickles; it does nothing else."""
    p = Path(path)
    target = p if p.suffix == ".bin" else p / "pytorch_model.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model.embed_tokens.weight": _Trap(os.fspath(marker_file))}
    target.write_bytes(pickle.dumps(payload, protocol=2))
    return target
