"""Test-only, independent decoding of converted outputs (plain numpy, written from the contract).

Nothing here imports gptq2xpu: it is the third path the tests compare (files are read with
``helpers.read_tensors``, which does not either).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from support.helpers import read_tensors


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


def gptq_unpack(qweight: np.ndarray) -> np.ndarray:
    """GPTQ qweight int32 [..., K/8, N] -> codes [..., K, N]."""
    w = qweight.view(np.uint32)
    codes = np.stack([(w >> np.uint32(4 * j)) & 0xF for j in range(8)], axis=-2)  # [..., K/8, 8, N]
    return codes.reshape(w.shape[:-2] + (w.shape[-2] * 8, w.shape[-1])).astype(np.uint8)


def decode_layer(folder: Path, prefix: str, tensors=None) -> dict:
    """Converted layer -> codes and float32 scales, with the layout contract applied."""
    tensors = tensors or read_tensors(folder)
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


def check_layer_matches_truth(out_dir, layer, tensors=None) -> None:
    """A converted layer's codes and scales equal the synthetic checkpoint's ground truth (``layer``:
    a ``gptq2xpu.testing.synth`` MoE layer), bit for bit."""
    d = decode_layer(out_dir, layer.prefix, tensors)
    n = layer.codes["gate"].shape[1]
    p = d["w13"].shape[1] // 2
    np.testing.assert_array_equal(d["w13"][:, :n], layer.codes["gate"])
    np.testing.assert_array_equal(d["w13"][:, p : p + n], layer.codes["up"])
    np.testing.assert_array_equal(d["w2"][:, :, :n], layer.codes["down"])
    for role, got in (("gate", d["w13_scales"][:, :n]), ("up", d["w13_scales"][:, p : p + n]),
                      ("down", d["w2_scales"][:, :, : d["w2_scales"].shape[2] * n // p])):
        truth = layer.scales[role]
        rep = got.shape[-1] // truth.shape[-1]
        np.testing.assert_array_equal(got, np.repeat(truth, rep, axis=-1))
