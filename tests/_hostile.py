"""Helpers shared by the hostile-input, interruption, fuzz and exit-code tests.

Not a test module (no ``test_`` prefix).  Everything here builds mutated *copies* of the real
AutoRound fixture (``tests/fixtures/qwen3moe-g128``, never modified) or drives the CLI as a
subprocess and checks the "fail cleanly, lose nothing" contract:

* the exit code;
* stderr holds exactly one non-empty line (warnings aside when allowed), naming what it should;
* no Python traceback;
* source files unchanged (sha256 before/after);
* nothing at OUTPUT and no hidden ``.OUTPUT.gptq2xpu-partial-*`` / ``-old-*`` folder beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import write_arrays

from gptq2xpu.safetensors_io import NUMPY_DTYPES, read_header

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "qwen3moe-g128"
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


# ------------------------------------------------------------------------------ tensors


def load_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a safetensors file as ``{name: (dtype, array)}`` in file order (writeable copies).

    numpy dtypes come back typed and shaped; BF16 as uint16, float8 as uint8 (shaped)."""
    hdr = read_header(path)
    raw = Path(path).read_bytes()
    out = {}
    for t in sorted(hdr.tensors.values(), key=lambda t: t.start):
        buf = np.frombuffer(raw[t.start:t.end], dtype=np.uint8).copy()
        dt = NUMPY_DTYPES.get(t.dtype) or (np.dtype("<u2") if t.dtype == "BF16" else np.dtype("u1"))
        out[t.name] = (t.dtype, buf.view(dt).reshape(t.shape))
    return out


def save_tensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    write_arrays(path, tensors, {"format": "pt"})


def mutate(root: Path, fn, shard: str = SHARD) -> None:
    """Rewrite ``root/shard`` after ``fn(tensors)`` edited the ``{name: (dtype, array)}`` dict in place."""
    t = load_tensors(root / shard)
    fn(t)
    save_tensors(root / shard, t)


def edit_config(root: Path, fn) -> None:
    p = root / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg, indent=2))


def raw_header(path: Path) -> tuple[dict, bytes]:
    """(header JSON object, data section bytes) of a safetensors file, without validation."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """Write a safetensors file from an arbitrary header (no validation) and data bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-(8 + len(body)) % 8)
    Path(path).write_bytes(len(body).to_bytes(8, "little") + body + data)


def split_into_index(root: Path, *, n_shards: int = 2) -> dict[str, str]:
    """Split the single model.safetensors into ``n_shards`` files with a model.safetensors.index.json."""
    tensors = load_tensors(root / SHARD)
    names = list(tensors)
    per = -(-len(names) // n_shards)
    wm = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
        save_tensors(root / fname, part)
        wm.update({n: fname for n in part})
    (root / SHARD).unlink()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    return wm


# ------------------------------------------------------------------------------ CLI + checks


def cli(*args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("GPTQ2XPU_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gptq2xpu", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=e)


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


def error_lines(stderr: str) -> list[str]:
    return [layer for layer in stderr.splitlines() if layer.strip()]


def assert_clean_failure(proc, code: int, output: Path | None, *must_name: str, source: Path | None = None,
                         before: dict | None = None, allow_warnings: bool = False) -> str:
    """The one contract every failure must keep.  Returns the error line."""
    ctx = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    assert proc.returncode == code, ctx
    assert "Traceback" not in proc.stderr, ctx
    lines = error_lines(proc.stderr)
    if allow_warnings:
        lines = [layer for layer in lines if "warning" not in layer.lower()]
    assert len(lines) == 1, ctx
    line = lines[0]
    assert line.startswith("gptq2xpu: "), ctx
    for word in must_name:
        assert word.lower() in line.lower(), f"{word!r} not named in: {line}"
    if output is not None:
        assert not Path(output).exists() and not Path(output).is_symlink(), ctx
        assert leftovers(output) == [], ctx
    if source is not None and before is not None:
        assert tree_hashes(source) == before, "source files were modified"
    return line
