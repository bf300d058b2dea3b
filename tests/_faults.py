"""Run the CLI in a subprocess with faults injected at chosen moments (signals, SIGKILL, errors).

``run_with_faults([("gptq2xpu.write.output:_exchange", "SIGKILL", 1)], "convert", src, out)`` runs
``gptq2xpu convert src out`` with ``_exchange`` replaced by a wrapper that, on its first call,
sends SIGKILL to the process before calling the original.  Actions: a signal name (sent to the
process itself, then the original runs), ``"after:SIG..."`` (the original runs first), or
``"false"`` (the original is not called; the wrapper returns False).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_WRAPPER = r"""
import importlib, json, os, signal, sys
faults = json.loads(sys.argv[1])
argv = sys.argv[2:]
for target, action, nth in faults:
    module, _, qual = target.partition(":")
    obj = importlib.import_module(module)
    *parents, attr = qual.split(".")
    for p in parents:
        obj = getattr(obj, p)
    orig = getattr(obj, attr)
    def hooked(*a, __orig=orig, __action=action, __nth=nth, __calls=[0], **k):
        __calls[0] += 1
        if __calls[0] != __nth:
            return __orig(*a, **k)
        if __action == "false":
            return False
        if __action.startswith("after:"):
            rv = __orig(*a, **k)
            os.kill(os.getpid(), getattr(signal, __action[6:]))
            return rv
        os.kill(os.getpid(), getattr(signal, __action))
        return __orig(*a, **k)
    setattr(obj, attr, hooked)
from gptq2xpu.cli import main
main(argv)
"""


def run_with_faults(faults: list[tuple[str, str, int]], *args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GPTQ2XPU_DEBUG", None)
    return subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(faults), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
