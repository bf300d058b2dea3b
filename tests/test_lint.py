"""The linters hold, as CI runs them through this suite: ruff with the rules of pyproject.toml
(``[tool.ruff]``) over the package, the tests and the scripts, and vulture (unused code,
``[tool.vulture]``; names only frameworks use are listed in ``tests/vulture_whitelist.py``).
Both come with the ``test`` extra; any finding fails the test with the linter's own report."""

from __future__ import annotations

import subprocess
import sys

from support.helpers import REPO


def _lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    proc = _lint("ruff", "check", "--no-cache", "gptq2xpu", "tests", "scripts")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vulture_finds_no_unused_code():
    proc = _lint("vulture")
    assert proc.returncode == 0, proc.stdout + proc.stderr
