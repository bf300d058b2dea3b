"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest


@pytest.fixture
def synth(tmp_path):
    """``make(**spec_overrides) -> SynthInfo``: writes a synthetic checkpoint under ``tmp_path``
    (a fresh sub-directory per call; see :mod:`gptq2xpu.testing.synth`)."""
    from gptq2xpu.testing.synth import make_checkpoint

    counter = itertools.count()

    def make(**spec_overrides):
        return make_checkpoint(tmp_path / f"synth{next(counter)}", **spec_overrides)

    return make


FIXTURE = Path(__file__).parent / "fixtures" / "qwen3moe-g128"


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``cli("convert", src, out, "--json") -> (exit_code, stdout, stderr)``."""
    from gptq2xpu.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
