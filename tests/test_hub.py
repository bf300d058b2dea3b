"""Hub sources, tested through huggingface_hub's own offline cache (no network here).

The cache is laid out as huggingface_hub writes it: ``models--org--name/{refs,snapshots,blobs}``
with snapshot files symlinked into ``blobs``.  ``HF_HUB_OFFLINE=1`` makes ``snapshot_download``
resolve from it; the CLI runs as a subprocess so the variables are read at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from support.helpers import FIXTURE, run_cli

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache, repo="acme/tiny-moe-gptq", src=FIXTURE, revision_ref="main"):
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / revision_ref).write_text(SHA)
    snap = base / "snapshots" / SHA
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in sorted(src.iterdir()):
        if f.name == "reference.safetensors":
            continue
        data = f.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return snap


def run(args, cache):
    """The CLI in a fresh interpreter: huggingface_hub reads these variables at import."""
    return run_cli(*args, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                               "HF_HOME": str(cache.parent / "hfhome")})


def test_convert_from_repo_id_via_offline_cache(tmp_path):
    cache = tmp_path / "cache"
    make_cache(cache)
    r = run(["convert", "acme/tiny-moe-gptq", tmp_path / "out", "--json"], cache)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["source"] == "acme/tiny-moe-gptq" and summary["converted_layers"] == 2
    r = run(["verify", tmp_path / "out", "--source", "acme/tiny-moe-gptq", "--no-numeric"], cache)
    assert r.returncode == 0, r.stdout + r.stderr
    block = json.loads((tmp_path / "out" / "config.json").read_text())["gptq2xpu"]
    assert block["source"]["origin"] == "acme/tiny-moe-gptq"
    # the repo id and the commit it resolved to are recorded, never the cache path
    assert block["source"]["repo_id"] == "acme/tiny-moe-gptq" and block["source"]["commit"] == SHA
    assert str(cache) not in (tmp_path / "out" / "config.json").read_text()
    # the cache (the source) is untouched: no file was added or changed
    r = run(["inspect", "acme/tiny-moe-gptq", "--revision", "main", "--json"], cache)
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "qwen3_moe"


def test_repo_not_in_cache_is_a_clean_error(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    r = run(["convert", "acme/absent-model", tmp_path / "out"], cache)
    assert r.returncode == 3
    assert "acme/absent-model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_revision_in_cache(tmp_path):
    cache = tmp_path / "cache"
    make_cache(cache)
    r = run(["inspect", "acme/tiny-moe-gptq", "--revision", "v9"], cache)
    assert r.returncode == 3 and "acme/tiny-moe-gptq" in r.stderr and "Traceback" not in r.stderr


def test_snapshot_symlink_escaping_the_repo_cache_is_refused(tmp_path):
    cache = tmp_path / "cache"
    snap = make_cache(cache)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(FIXTURE / "model.safetensors", outside)
    (snap / "model.safetensors").unlink()
    os.symlink(outside, snap / "model.safetensors")
    r = run(["inspect", "acme/tiny-moe-gptq"], cache)
    assert r.returncode == 3 and "outside" in r.stderr
