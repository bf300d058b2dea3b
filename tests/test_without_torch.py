"""torch is an optional dependency: convert, inspect, finalize and standalone verify run with torch
made unimportable (and never import it); verify --source, demo, the loader and the vLLM plugin say
in one line how to get it (exit 2 on the command line)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.helpers import FIXTURE, REPO
from support.hostile import one_error_line

from gptq2xpu.errors import EXIT_OK, EXIT_USAGE
from gptq2xpu.optional_torch import INSTALL_HINT

#: a meta-path finder that makes ``import torch`` fail as on a machine without torch
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""

CLI = BLOCK_TORCH + """
from gptq2xpu.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def _run(code: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), CI="1")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _without_torch(*args) -> subprocess.CompletedProcess:
    proc = _run(CLI, *args)
    assert proc.stderr.rstrip().endswith("torch imported: False"), proc.stderr
    proc.stderr = proc.stderr.rstrip().rsplit("\n", 1)[0] if "\n" in proc.stderr.rstrip() else ""
    return proc


def test_the_blocker_blocks():
    proc = _run(BLOCK_TORCH + "import torch")
    assert proc.returncode == 1 and "No module named 'torch'" in proc.stderr


def test_convert_inspect_finalize_and_standalone_verify_need_no_torch(tmp_path):
    for args in (("inspect", FIXTURE), ("convert", FIXTURE, tmp_path / "out"), ("verify", tmp_path / "out"),
                 ("convert", FIXTURE, tmp_path / "split", "--part", "1/1"), ("finalize", tmp_path / "split"),
                 ("verify", tmp_path / "split", "--json")):
        proc = _without_torch(*args, "-q")
        assert proc.returncode == EXIT_OK, (args, proc.stderr)
    assert (tmp_path / "split" / "gptq2xpu-manifest.json").read_bytes() == \
        (tmp_path / "out" / "gptq2xpu-manifest.json").read_bytes()


def test_what_needs_torch_says_how_to_get_it_in_one_line(tmp_path):
    assert _without_torch("convert", FIXTURE, tmp_path / "out", "-q").returncode == EXIT_OK
    for args, what in ((("verify", tmp_path / "out", "--source", FIXTURE), "verify --source"),
                       (("demo",), "demo")):
        proc = _without_torch(*args)
        line = one_error_line(proc.stderr)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert line.startswith(f"gptq2xpu: usage error: {what}") and INSTALL_HINT in line, line
        assert ": pip install torch (" in line and "'gptq2xpu[torch]'" not in line, line  # no index's gptq2xpu


def test_the_loader_and_the_plugin_say_how_to_get_torch():
    proc = _run(BLOCK_TORCH + """
try:
    import gptq2xpu.load
except ImportError as exc:
    print(type(exc).__name__, exc)
import logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from gptq2xpu.vllm_plugin import register
register()
""")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out == [f"TorchMissing gptq2xpu.load (the loader) needs torch, which cannot be imported (No module "
                   f"named 'torch'): {INSTALL_HINT}"], proc.stdout
    warning = [x for x in proc.stderr.splitlines() if x.startswith("gptq2xpu:")]
    assert len(warning) == 1 and "the gptq2xpu vLLM plugin needs torch" in warning[0] and INSTALL_HINT in warning[0]


@pytest.mark.parametrize("module", ["gptq2xpu.cli", "gptq2xpu.convert", "gptq2xpu.verify.standalone",
                                    "gptq2xpu.read.remote", "gptq2xpu.write"])
def test_the_torch_free_modules_import_without_torch(module):
    proc = _run(BLOCK_TORCH + f"import {module}; print('torch' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
