"""Shared pytest fixtures."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture
def synth(tmp_path):
    """``make(**spec_overrides) -> SynthInfo``: writes a synthetic checkpoint under ``tmp_path``
    (a fresh sub-directory per call; see :mod:`gptq2xpu.synth`)."""
    from gptq2xpu.synth import make_checkpoint

    counter = itertools.count()

    def make(**spec_overrides):
        return make_checkpoint(tmp_path / f"synth{next(counter)}", **spec_overrides)

    return make
