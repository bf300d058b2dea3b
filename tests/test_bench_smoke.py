"""scripts/bench.py end to end on a tiny shape: every variant measured, the naive pipeline agrees.

No timing assertions: this machine's numbers say nothing; the benchmark itself is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support.helpers import REPO


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--hidden", "256", "--intermediate", "128",
         "--experts", "8", "--top-k", "2", "--layers", "2", "--reps", "1", "--warmups", "0", "--shard-size", "500MB",
         "--scaling", "--scaling-layers", "3", "--jobs-sweep", "1,2,4", "--workdir", str(work), "--json-out", str(out),
         "--markdown-out", str(tmp_path / "bench.md"), "--targets", "16core", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=REPO,  # a hang guard: it takes ~8 s unloaded
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "convert" in proc.stdout and "targets (16core):" in proc.stdout

    doc = json.loads(out.read_text())
    variants = doc["variants"]
    assert set(variants) == {"copy_cp", "copy_copytree", "convert", "naive", "verify", "verify_source",
                             "verify_numeric"}
    for name, v in variants.items():
        assert v["reps"] == 1, name
        assert v["wall_median_s"] > 0 and v["wall_min_s"] > 0, name
        assert v["peak_rss_mib"] > 0 and v["ratio_vs_cp"] > 0 and v["ratio_vs_copy"] > 0, name
        assert v["wall_min_s"] <= v["wall_median_s"] <= v["wall_max_s"], name
    assert variants["verify_source"]["bit_exact_seconds_last"] >= 0
    assert len(variants["verify_numeric"]["numeric_layer_seconds"]) == 1

    naive = doc["checks"]["naive_equals_convert"]
    assert naive["equal"] is True
    assert naive["tensors"] == {"w13_qweight": True, "w13_scales": True, "w2_qweight": True, "w2_scales": True}

    js = doc["jobs_sweep"]
    assert js["jobs"] == [1, 2, 4] and set(js["runs"]) == {"convert_jobs1", "convert_jobs2", "convert_jobs4"}
    assert js["identical"] is True and js["identical_to_default_run"] is True
    sc = doc["scaling"]
    assert sc["small"]["layers"] == 2 and sc["large"]["layers"] == 3
    assert sc["large"]["bytes"] > sc["small"]["bytes"] > 0
    assert set(doc["targets"]) == {"convert_vs_cp", "bit_exact_vs_convert", "verify_vs_cp", "convert_peak_rss_mib",
                                   "rss_large_vs_small", "naive_vs_convert", "jobs_outputs_identical"}
    assert all(isinstance(t["ok"], bool) and t["value"] > 0 for t in doc["targets"].values())
    assert doc["targets"]["convert_vs_cp"]["limit"] == "<= 1.0"
    md = (tmp_path / "bench.md").read_text()
    assert md == doc["markdown"] + "\n" and "| target | measured | limit | met |" in md and "| `--jobs` |" in md

    # the workdir holds nothing but what the benchmark did not create
    assert not work.exists() or list(work.iterdir()) == []
