"""Shared pytest fixtures."""

from __future__ import annotations

import itertools

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


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("convert", src, out, "--json") -> (exit_code, stdout, stderr)``
    (``helpers.cli``)."""
    from support.helpers import cli

    return cli


@pytest.fixture
def released_kernel(monkeypatch):
    """The released vllm-xpu-kernels 0.1.16.2 Python interface, imported on CPU with its native ops
    faked (``tests/support/released_kernel.py``); skips, saying how to install it, when it is missing."""
    from support.released_kernel import install_released

    return install_released(monkeypatch)


# ------------------------------------------------------------------------------ CI: no skips
# In CI (the CI environment variable is set, as .ci/run and most CI services do) every test must
# run: a test skipped for a missing dependency (vLLM, the released XPU kernel's wheel, a mount
# that is not allowed) fails the run instead of passing silently.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    import os

    if _skipped and os.environ.get("CI") and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import os

    if _skipped and os.environ.get("CI"):
        terminalreporter.write_line(f"CI: {len(_skipped)} test(s) skipped; every test must run in CI:", red=True)
        for line in _skipped:
            terminalreporter.write_line(f"  {line}", red=True)
