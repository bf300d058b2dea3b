"""Test runs clean up after themselves: pyproject.toml's pytest settings remove a
passing test's temporary folder at once and a passing session's base folder at the end, and keep
only what failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.helpers import REPO

PYPROJECT = REPO / "pyproject.toml"

SAMPLE = '''
import os
import pytest

@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    (d / "big").write_bytes(b"0" * 100_000)
    return d

def test_passes(tmp_path, shared):
    (tmp_path / "passing-file").write_bytes(b"1" * 100_000)

def test_may_fail(tmp_path, shared):
    (tmp_path / "failing-file").write_bytes(b"2")
    assert os.environ.get("SAMPLE_FAILS") != "1"
'''


def _run(tmp_path: Path, fails: bool) -> tuple[int, list[str]]:
    """Run the sample under the project's pytest settings; the files left under the temp root."""
    root = tmp_path / "temproot"
    root.mkdir(exist_ok=True)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTEST_DEBUG_TEMPROOT=str(root), SAMPLE_FAILS="1" if fails else "0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(PYPROJECT),
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, sorted(p.name for p in root.rglob("*") if p.is_file())


def test_a_passing_run_leaves_nothing(tmp_path):
    code, left = _run(tmp_path, fails=False)
    assert code == 0 and left == [], left


def test_a_failing_run_keeps_only_what_failed(tmp_path):
    code, left = _run(tmp_path, fails=True)
    assert code == 1
    assert "failing-file" in left and "passing-file" not in left, left
