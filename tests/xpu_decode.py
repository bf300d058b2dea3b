"""Test-only, independent decoding of converted outputs (plain numpy, written from the contract).

Nothing here imports gptq2xpu's repack or verify code: it is the third path the tests compare.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np


def raw_tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) for every tensor of every safetensors file under a folder."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        hdr = json.loads(data[8 : 8 + n])
        for name, spec in hdr.items():
            if name == "__metadata__":
                continue
            s, e = spec["data_offsets"]
            out[name] = (spec["dtype"], tuple(spec["shape"]), data[8 + n + s : 8 + n + e])
    return out


def as_float32(dtype: str, shape, raw: bytes) -> np.ndarray:
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float32).reshape(shape)


def nibbles(raw: bytes, shape, encoding: str = "u4b8") -> np.ndarray:
    """uint8 [..., R, C/2] bytes -> codes [..., R, C]; byte j = (input 2j low, input 2j+1 high)."""
    b = np.frombuffer(raw, np.uint8).reshape(shape)
    if encoding == "s4":
        b = b ^ 0x88
    codes = np.empty(shape[:-1] + (shape[-1] * 2,), np.uint8)
    codes[..., 0::2] = b & 0xF
    codes[..., 1::2] = b >> 4
    return codes


def gptq_pack(codes: np.ndarray) -> np.ndarray:
    """codes [..., K, N] (0..15) -> GPTQ qweight int32 [..., K/8, N]: input 8r+j in bits 4j.."""
    k = codes.shape[-2]
    c = codes.astype(np.uint32).reshape(codes.shape[:-2] + (k // 8, 8) + codes.shape[-1:])
    words = np.zeros(codes.shape[:-2] + (k // 8,) + codes.shape[-1:], np.uint32)
    for j in range(8):
        words |= c[..., j, :] << np.uint32(4 * j)
    return words.view(np.int32)


def gptq_unpack(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight int32 [..., K/8, N] -> codes [..., K, N]."""
    w = qweight.view(np.uint32)
    codes = np.stack([(w >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=-2)  # [..., K/8, 8, N]
    return codes.reshape(w.shape[:-2] + (w.shape[-2] * 8, w.shape[-1])).astype(np.uint8)


def decode_layer(folder: Path, prefix: str, tensors=None) -> dict:
    """Converted layer -> codes and float32 scales, with the layout contract applied."""
    tensors = tensors or raw_tensors(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())["gptq2xpu"]
    enc = cfg["nibble_encoding"]
    out = {}
    for w in ("w13", "w2"):
        dt, shape, raw = tensors[f"{prefix}.experts.{w}_qweight"]
        assert dt == "U8"
        out[w] = nibbles(raw, shape, enc)
        sdt, sshape, sraw = tensors[f"{prefix}.experts.{w}_scales"]
        out[w + "_scales"] = as_float32(sdt, sshape, sraw)
        out[w + "_scale_dtype"] = sdt
    return out


def dequant(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    g = codes.shape[-1] // scales.shape[-1]
    return (codes.astype(np.float32) - 8) * np.repeat(scales, g, axis=-1)
