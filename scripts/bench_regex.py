#!/usr/bin/env python3
"""Time and peak memory of the two candidate engines for config patterns, on the hostile patterns
the tests hold: RE2 (``gptq2xpu.read.regex``, google-re2) and the ``regex`` package with
``timeout=``.  Each (engine, pattern) runs in its own fresh process: compile, then ``match`` and
``fullmatch`` on the name; wall seconds and the growth of peak RSS over the process's baseline
(after imports) are printed, one line each, and a Markdown table at the end.

    python scripts/bench_regex.py [--timeout 1.0]

It needs the ``regex`` package (``pip install regex``), which gptq2xpu itself does not use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = [  # (pattern, name): from tests/test_regex.py, test_quant_config.py and test_bounds.py
    (r"(a|a)*b", "a" * 5000), (r"(a+)+b", "a" * 5000), (r".*.*.*.*.*.*.*.*.*.*=", "x" * 5000),
    (r"(x+x+)+y", "x" * 5000), (r"(\w*)*\.", "w" * 5000), (r"^(a|ab)*c$", "ab" * 2500),
    (r"(.*a){2,}x", "a" * 3000), (r"((ab)+)+$", "ab" * 1500 + "c"), (r"(?:x|(y+))*z", "y" * 3000),
    (r"(a|a|ab)*c", "a" * 3000), (r"(?:[^Z]?){900}Z", "Y" * 20000), (r".*a.{9}b", "ac" * 5000),
]

CHILD = r"""
import json, resource, sys, time
engine, pattern, text, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if engine == "re2":
    from gptq2xpu.read.regex import Regex
else:
    import regex
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    if engine == "re2":
        r = Regex(pattern)
        answer = [r.match(text), r.fullmatch(text)]
    else:
        r = regex.compile(pattern)
        answer = [r.match(text, timeout=timeout) is not None, r.fullmatch(text, timeout=timeout) is not None]
except TimeoutError:
    answer = "timeout"
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_kib": peak - base, "answer": answer}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=1.0, help="regex's per-call timeout, seconds")
    args = ap.parse_args()
    rows = []
    for pattern, text in CASES:
        row = {"pattern": pattern, "len": len(text)}
        for engine in ("re2", "regex"):
            proc = subprocess.run([sys.executable, "-c", CHILD, engine, pattern, text, str(args.timeout)],
                                  capture_output=True, text=True, check=True)
            row[engine] = json.loads(proc.stdout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| pattern | name length | RE2 s | RE2 peak KiB | regex s | regex peak KiB | regex answer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["re2"], r["regex"]
        print(f"| `{r['pattern']}` | {r['len']} | {a['seconds']:.4f} | {a['rss_kib']} | {b['seconds']:.3f} | "
              f"{b['rss_kib']} | {b['answer']} |")


if __name__ == "__main__":
    main()
