"""scripts/bench_reference.py end to end on a tiny layer: both variants measured, both pass, and
the float64 accuracy table is filled.

No timing assertions: this machine's numbers say nothing; the benchmark itself is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support.helpers import REPO


def test_bench_reference_smoke(tmp_path):
    out = tmp_path / "ref.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_reference.py"), "--experts", "8", "--hidden", "256",
         "--intermediate", "128", "--top-k", "2", "--tokens", "4", "--reps", "1", "--warmups", "0", "--threads", "2",
         "--accuracy", "--workdir", str(work), "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "streamed vs whole" in proc.stdout

    doc = json.loads(out.read_text())
    assert doc["config"]["threads"] == 2 and doc["config"]["experts"] == 8
    assert set(doc["variants"]) == {"whole", "streamed"}
    for name, v in doc["variants"].items():
        assert v["reps"] == 1 and v["ok"] is True, name
        assert v["compute_median_s"] > 0 and v["cpu_median_s"] > 0 and v["peak_rss_mib"] > 0, name
        assert 0 <= v["rel"] <= 1e-5 and 0 < v["every_expert_rel"] <= 1e-5, name
    assert set(doc["speedup"]) == {"compute", "cpu", "peak_rss"}

    acc = doc["accuracy"]
    assert acc["exact_sides_rel"] == [0.0, 0.0]  # float64 from either side: the same exact weights
    for variant in ("whole", "streamed"):
        for side in ("source", "converted", "between_sides"):
            for which in ("routed", "every"):
                st = acc["variants"][variant][side][which]
                assert st["rel"] <= acc["tolerance"]["rel"] / 2, (variant, side, which, st)
    # float32 rounding happened on each side (the float64 forward is a different computation)
    assert acc["variants"]["streamed"]["source"]["every"]["rel"] > 0

    # the workdir holds nothing but what the benchmark did not create
    assert not work.exists() or list(work.iterdir()) == []
