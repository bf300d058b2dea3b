"""The interface every on-disk format implements (see :mod:`gptq2xpu.formats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjSpec:
    """One quantized projection as the headers describe it (identical for every expert of a layer)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int        # in input elements; equals in_features for one group spanning the input
    scale_dtype: str       # safetensors dtype name of the stored scales

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size


class QuantFormat:
    """A quantized-linear storage format: what its tensors are called and how they are laid out.

    Formats describe and check; they build no XPU bytes (:mod:`gptq2xpu.repack` does, from the
    packed words and scales named here, transposing them when the format stores them input-major).
    """

    name: str = ""
    #: tensor fields that identify the format (e.g. {"qweight", "scales"})
    required: frozenset = frozenset()
    #: field of the packed int32 words and of the scales
    packed: str = ""
    scales: str = ""
    #: True when packed words are stored input-major ``[in/8, out]`` and scales ``[groups, out]``
    #: (GPTQ); False when output-major ``[out, in/8]`` / ``[out, groups]``, i.e. already XPU rows.
    input_major: bool = False

    def in_out(self, ckpt, fields: dict[str, str]) -> tuple[int | None, int]:
        """(input size if the headers alone tell it, output size) of the projection."""
        raise NotImplementedError

    def describe(self, ckpt, fields: dict[str, str], in_features: int, where: str) -> ProjSpec:
        """The projection's spec from its headers; InputError when they do not fit together."""
        raise NotImplementedError

    def check(self, ckpt, fields: dict[str, str], spec: ProjSpec, checkpoint_format: str) -> None:
        """Read the small metadata tensors and raise InputError if the kernel cannot run this data."""
        raise NotImplementedError
