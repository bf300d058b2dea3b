"""scripts/bench.py end to end on a tiny shape: every variant measured, the naive pipeline agrees.

No timing assertions: this machine's numbers say nothing; the benchmark itself is the point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--hidden", "256", "--intermediate", "128",
         "--experts", "8", "--top-k", "2", "--layers", "2", "--reps", "1", "--warmups", "0", "--shard-size", "500MB",
         "--scaling", "--scaling-layers", "3", "--jobs-sweep", "--workdir", str(work), "--json-out", str(out),
         "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "convert" in proc.stdout and "targets:" in proc.stdout

    doc = json.loads(out.read_text())
    variants = doc["variants"]
    assert set(variants) == {"copy_cp", "copy_copytree", "convert", "naive", "verify", "verify_source", "verify_numeric"}
    for name, v in variants.items():
        assert v["reps"] == 1, name
        assert v["wall_median_s"] > 0 and v["wall_min_s"] > 0, name
        assert v["peak_rss_mib"] > 0 and v["ratio_vs_copy"] > 0, name
    assert variants["verify_source"]["bit_exact_seconds_last"] >= 0
    assert len(variants["verify_numeric"]["numeric_layer_seconds"]) == 1

    naive = doc["checks"]["naive_equals_convert"]
    assert naive["equal"] is True
    assert naive["tensors"] == {"w13_qweight": True, "w13_scales": True, "w2_qweight": True, "w2_scales": True}

    assert doc["jobs_sweep"]["identical"] is True and doc["jobs_sweep"]["identical_to_default_run"] is True
    sc = doc["scaling"]
    assert sc["small"]["layers"] == 2 and sc["large"]["layers"] == 3
    assert sc["large"]["bytes"] > sc["small"]["bytes"] > 0
    assert set(doc["targets"]) >= {"convert_le_2x_copy", "convert_rss_le_800MiB", "naive_ge_4x_convert",
                                   "verify_source_le_2x_convert", "bit_exact_part_le_2x_convert", "rss_flat_15pct",
                                   "time_linear", "time_scales_like_copy", "user_cpu_linear"}
    assert all(isinstance(t["ok"], bool) and t["value"] > 0 for t in doc["targets"].values())

    # the workdir holds nothing but what the benchmark did not create
    assert not work.exists() or list(work.iterdir()) == []
