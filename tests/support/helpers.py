"""What the tests share: the fixtures' paths, raw safetensors files, and the two ways to run the CLI.

* ``REPO``, ``FIXTURE`` (the AutoRound Qwen3-MoE checkpoint, ``tests/fixtures/qwen3moe-g128``) and
  ``CT_FIXTURE`` (the compressed-tensors one, ``tests/fixtures/ct-pack-quantized``); neither is
  ever modified.
* Safetensors files read and written with ``struct`` and ``json`` alone, never with the package's
  own parser or writer (which the tests check): :func:`raw_header`, :func:`read_tensors`,
  :func:`read_tensor`, :func:`tensor_span`, :func:`load_tensors`; :func:`write_raw`,
  :func:`write_arrays`.  BF16 comes back as its raw uint16 bit patterns, float8 as uint8.
* :func:`cli` runs ``gptq2xpu ...`` in this process (the ``cli`` fixture of ``conftest.py``);
  :func:`run_cli` runs it in a fresh interpreter, optionally with faults injected at chosen
  moments (a signal, SIGKILL, an unexpected exception); :func:`start_cli` starts it that way
  without waiting, and :func:`wait_stopped` waits until such a run has stopped itself (SIGSTOP).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "qwen3moe-g128"
CT_FIXTURE = REPO / "tests" / "fixtures" / "ct-pack-quantized"


# ------------------------------------------------------------------------------ safetensors files

#: safetensors dtype -> numpy dtype of the values as read here (BF16 as raw bits; float8 as bytes)
NUMPY = {"BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "BF16": "<u2",
         "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8",
         "F8_E4M3": "u1", "F8_E5M2": "u1", "F8_E8M0": "u1"}
_NAMES = {np.dtype(v): k for k, v in NUMPY.items() if k in ("BOOL", "U8", "I8", "U16", "I16", "F16", "U32", "I32",
                                                           "F32", "U64", "I64", "F64")}


def _header(path: Path) -> tuple[dict, int]:
    """(header JSON object, where the data section starts), without validation."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def raw_header(path: Path) -> tuple[dict, bytes]:
    """(header JSON object, data section bytes) of a safetensors file, without validation."""
    header, start = _header(path)
    return header, Path(path).read_bytes()[start:]


def read_tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """``{name: (dtype, shape, raw bytes)}`` of a safetensors file, or of every ``*.safetensors``
    file directly in a folder."""
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        header, data = raw_header(f)
        for name, spec in header.items():
            if name != "__metadata__":
                begin, end = spec["data_offsets"]
                out[name] = (spec["dtype"], tuple(spec["shape"]), data[begin:end])
    return out


def as_array(dtype: str, shape, raw: bytes) -> np.ndarray:
    """Raw tensor bytes as a writeable numpy array (BF16 as uint16 bit patterns, float8 as uint8)."""
    return np.frombuffer(raw, dtype=NUMPY[dtype]).reshape(shape).copy()


def tensor_span(path: Path, name: str) -> tuple[str, tuple, int, int]:
    """``(dtype, shape, start, end)`` of one tensor, ``start`` and ``end`` absolute in the file."""
    header, data_start = _header(path)
    spec = header[name]
    begin, end = spec["data_offsets"]
    return spec["dtype"], tuple(spec["shape"]), data_start + begin, data_start + end


def read_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor of a safetensors file as a writeable numpy array (see :func:`as_array`)."""
    dtype, shape, start, end = tensor_span(path, name)
    with open(path, "rb") as fh:
        fh.seek(start)
        return as_array(dtype, shape, fh.read(end - start))


def load_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a safetensors file as ``{name: (dtype, array)}``, in file order, as writeable
    arrays (see :func:`as_array`); :func:`write_arrays` writes such a dict back."""
    header, data = raw_header(path)
    entries = sorted((spec["data_offsets"][0], name, spec) for name, spec in header.items() if name != "__metadata__")
    return {name: (spec["dtype"], as_array(spec["dtype"], spec["shape"], data[slice(*spec["data_offsets"])]))
            for _, name, spec in entries}


def _encode(header: dict | bytes) -> bytes:
    """8-byte length + the header (a dict as compact JSON), space padded to a multiple of 8."""
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """Write a safetensors file from any header (a dict or bytes, not validated) and data bytes."""
    Path(path).write_bytes(_encode(header) + data)


def write_arrays(path: Path, arrays: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: array}`` or ``{name: (dtype, array)}`` as a safetensors file, in that order.

    ``(dtype, array)`` stores dtypes numpy lacks (``("BF16", uint16_array)``)."""
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name, value in arrays.items():
        dtype, arr = value if isinstance(value, tuple) else (_NAMES[np.dtype(value.dtype)], value)
        arr = np.ascontiguousarray(arr)
        if math.prod(arr.shape) * np.dtype(NUMPY[dtype]).itemsize != arr.nbytes:
            raise ValueError(f"{name}: {dtype}{list(arr.shape)} does not match {arr.nbytes} bytes")
        doc[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        chunks.append(arr.reshape(-1).view(np.uint8))
        offset += arr.nbytes
    with open(path, "wb") as fh:
        fh.write(_encode(doc))
        for chunk in chunks:
            fh.write(memoryview(chunk))


# ------------------------------------------------------------------------------ running the CLI


def cli(*args) -> tuple[int, str, str]:
    """Run ``gptq2xpu *args`` in this process: ``(exit code, stdout, stderr)``."""
    from gptq2xpu.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    sigterm = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = 0 if exc.code is None else int(exc.code)
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return code, out.getvalue(), err.getvalue()


# Replaces each target function by a wrapper that, on its nth call, sends the signal to its own
# process (then calls the original; "after:SIG..." calls the original first), raises
# RuntimeError("injected bug") ("raise"), or returns False without calling it ("false").
_FAULTS = r"""
import importlib, json, os, signal, sys
for target, action, nth in json.loads(sys.argv[1]):
    module, _, qual = target.partition(":")
    obj = importlib.import_module(module)
    *parents, attr = qual.split(".")
    for p in parents:
        obj = getattr(obj, p)
    def hooked(*a, __orig=getattr(obj, attr), __action=action, __nth=nth, __calls=[0], **k):
        __calls[0] += 1
        if __calls[0] != __nth:
            return __orig(*a, **k)
        if __action == "false":
            return False
        if __action == "raise":
            raise RuntimeError("injected bug")
        if __action.startswith("after:"):
            rv = __orig(*a, **k)
            os.kill(os.getpid(), getattr(signal, __action[6:]))
            return rv
        os.kill(os.getpid(), getattr(signal, __action))
        return __orig(*a, **k)
    setattr(obj, attr, hooked)
from gptq2xpu.cli import main
main(sys.argv[2:])
"""


def run_cli(*args, faults=(), env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m gptq2xpu *args`` in a fresh interpreter (GPTQ2XPU_DEBUG unset, ``env`` added).

    ``faults``: ``(target, action, nth)`` triples, target ``"module:Qual.name"``, e.g.
    ``("gptq2xpu.write.output:_exchange", "SIGKILL", 1)`` kills the process on the first call of
    ``_exchange``; actions: a signal name, ``"after:SIG..."``, ``"raise"``, ``"false"`` (see above).
    """
    e = {k: v for k, v in os.environ.items() if k != "GPTQ2XPU_DEBUG"}
    e.update(env or {})
    run = ["-c", _FAULTS, json.dumps(list(faults))] if faults else ["-m", "gptq2xpu"]
    return subprocess.run([sys.executable, *run, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=e)


def start_cli(*args, faults=()) -> subprocess.Popen:
    """:func:`run_cli` without waiting: the running ``gptq2xpu *args`` (stdout and stderr piped, as text)."""
    e = {k: v for k, v in os.environ.items() if k != "GPTQ2XPU_DEBUG"}
    run = ["-c", _FAULTS, json.dumps(list(faults))] if faults else ["-m", "gptq2xpu"]
    return subprocess.Popen([sys.executable, *run, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=e)


def wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``proc`` has stopped itself (a ``"SIGSTOP"`` fault): from then on it is still, at
    a known point, however loaded the machine is.  Fails if it ends first; the timeout only guards
    against a hang."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it stopped: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not stop within {timeout:g} s")
        time.sleep(0.01)
