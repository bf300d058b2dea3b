"""The interface every on-disk format implements (see :mod:`gptq2xpu.formats`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProjSpec:
    """One quantized projection as the headers describe it (identical for every expert of a layer)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int        # in input elements; equals in_features for one group spanning the input
    scale_dtype: str       # safetensors dtype name of the stored scales
    has_zeros: bool
    has_g_idx: bool

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size


class QuantFormat:
    """Base class: a quantized-linear storage format."""

    name: str = ""
    #: tensor fields that identify the format (e.g. {"qweight", "scales"})
    required: frozenset = frozenset()
    #: fields the format may also carry
    optional: frozenset = frozenset()
    #: the field whose bytes dominate (for reporting)
    weight_field: str = ""

    @property
    def fields(self) -> frozenset:
        return self.required | self.optional

    def describe(self, ckpt, fields: dict[str, str], in_features: int, where: str) -> ProjSpec:
        raise NotImplementedError

    def in_out(self, ckpt, fields: dict[str, str]) -> tuple[int | None, int]:
        """(input size if the headers alone tell it, output size) of the projection."""
        raise NotImplementedError

    def check(self, ckpt, fields: dict[str, str], spec: ProjSpec, checkpoint_format: str, where: str) -> None:
        """Read the small metadata tensors and raise InputError if the kernel cannot run this data."""
        raise NotImplementedError

    def read_rows(self, ckpt, fields: dict[str, str], spec: ProjSpec, out_words: np.ndarray, scratch: np.ndarray) -> None:
        """Write the codes as XPU rows into ``out_words`` (int32 ``[out, in/8]``), u4b8 encoding.

        ``scratch`` is a reusable int32 buffer of at least ``out*in/8`` elements.
        """
        raise NotImplementedError

    def read_scales(self, ckpt, fields: dict[str, str], spec: ProjSpec) -> np.ndarray:
        """Scales as ``[out, in/group]`` in the stored dtype (BF16 as raw uint16)."""
        raise NotImplementedError

    def scratch_words(self, spec: ProjSpec) -> int:
        return spec.out_features * spec.in_features // 8
