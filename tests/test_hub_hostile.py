"""A hub (or an HF_ENDPOINT mirror) is as untrusted as a folder: what it answers cannot make
gptq2xpu touch files outside its folders, wait for ever, ignore a signal, crash, or misname the
failure.  The look-alike (tests/support/hubserver.py) misbehaves on purpose."""

# ruff: noqa: F811  (pytest fixtures imported from test_hub_headers, used as arguments)
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.helpers import REPO
from support.hostile import fixture_copy, one_error_line
from support.hubserver import FakeHub
from test_hub_headers import REPO_ID, folder, hub, point  # noqa: F401 (fixtures)

ENV_TIMEOUT = "GPTQ2XPU_HUB_TIMEOUT"  # docs/hub.md


def _canary(tmp_path: Path) -> tuple[Path, dict]:
    """A folder outside every folder gptq2xpu is given, with a file in it: nothing may change there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"canary": true}')
    return outside, _tree(outside)


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _fails(code, err, expected, *needles):
    assert code == expected, err
    line = one_error_line(err)
    for n in needles:
        assert n in line, line
    return line


# ------------------------------------------------------------------------------ commits and revisions


@pytest.mark.parametrize("form", ["absolute", "dotdot"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_commit_id_that_is_a_path_is_refused(hub, folder, cli, tmp_path, form, command):
    outside, before = _canary(tmp_path)
    bad = str(outside / "snap") if form == "absolute" else "../../../outside/snap"
    hub.add_folder(REPO_ID, folder, info_sha=bad)
    args = [command, REPO_ID] + ([tmp_path / "out"] if command == "convert" else [])
    code, _, err = cli(*args)
    _fails(code, err, 3, REPO_ID, "commit id")
    assert _tree(outside) == before and not (tmp_path / "out").exists()


def test_an_x_repo_commit_that_is_a_path_is_refused_by_the_download(hub, folder, cli, tmp_path):
    """Model info names the real commit; the file answers name a path as theirs (huggingface_hub
    builds the snapshot path from that header)."""
    outside, before = _canary(tmp_path)
    hub.add_folder(REPO_ID, folder, file_commit="../../../outside/snap")
    code, _, err = cli("convert", REPO_ID, tmp_path / "out")
    _fails(code, err, 3, "X-Repo-Commit", "commit id")
    assert _tree(outside) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("etag", ['"../../../../outside/blob"', '"/abs/blob"', 'W/"a/b"'])
def test_an_etag_that_is_a_path_is_refused_by_the_download(hub, folder, cli, tmp_path, etag):
    """huggingface_hub names the cached blob after the ETag."""
    outside, before = _canary(tmp_path)
    hub.add_folder(REPO_ID, folder, etag=etag)
    code, _, err = cli("convert", REPO_ID, tmp_path / "out")
    _fails(code, err, 3, "ETag", "plain tag")
    assert _tree(outside) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rev", ["../../x", "/abs", "a\\b", "main/../../x", "x" * 300, "a\x00b", ".hidden"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_revision_with_path_syntax_is_a_usage_error_before_any_request(hub, folder, cli, tmp_path, rev, command):
    outside, before = _canary(tmp_path)
    hub.add_folder(REPO_ID, folder)
    args = [command, REPO_ID] + ([tmp_path / "out"] if command == "convert" else []) + ["--revision", rev]
    code, _, err = cli(*args)
    _fails(code, err, 2, "--revision")
    assert [s for s in hub.requests() if s.kind in ("api", "file")] == []
    assert _tree(outside) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_offline_a_revision_or_a_cached_ref_with_path_syntax_reads_nothing_outside(tmp_path, command):
    from test_hub import make_cache, run

    cache = tmp_path / "cache"
    make_cache(cache)
    outside, before = _canary(tmp_path)
    # a file a ../ revision would read as the commit, and a snapshot folder it would then open
    (cache / "x").write_text("../../../outside")
    out = tmp_path / "out"
    r = run([command, "acme/tiny-moe-gptq", *([out] if command == "convert" else []), "--revision", "../../x"], cache)
    _fails(r.returncode, r.stderr, 2, "--revision")
    # a cached ref whose commit is a path (the cache is a folder like any other)
    (cache / "models--acme--tiny-moe-gptq" / "refs" / "main").write_text("../../../outside")
    r = run([command, "acme/tiny-moe-gptq", *([out] if command == "convert" else [])], cache)
    _fails(r.returncode, r.stderr, 3, "acme/tiny-moe-gptq", "commit")
    assert _tree(outside) == before and not out.exists()


# ------------------------------------------------------------------------------ bounded requests


@pytest.mark.parametrize("kind", ["api", "file"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_trickling_hub_is_stopped_after_the_bound(hub, folder, cli, tmp_path, monkeypatch, kind, command):
    monkeypatch.setenv(ENV_TIMEOUT, "2")
    hub.add_folder(REPO_ID, folder, trickle=(kind,), trickle_s=0.5)
    t0 = time.monotonic()
    code, _, err = cli(command, REPO_ID, *([tmp_path / "out"] if command == "convert" else []))
    took = time.monotonic() - t0
    _fails(code, err, 3, REPO_ID, "2 s", ENV_TIMEOUT, f"from {hub.url}/")
    assert took < 8 and not (tmp_path / "out").exists(), took


def test_a_download_that_keeps_moving_may_take_longer_than_the_bound(hub, folder, cli, tmp_path, monkeypatch):
    """The bound is on time without progress: each RENEW_BYTES received renews it."""
    from gptq2xpu.read import hubclient

    monkeypatch.setenv(ENV_TIMEOUT, "2")
    monkeypatch.setattr(hubclient, "RENEW_BYTES", 16 * 1024)
    shard = sorted(p.name for p in folder.glob("*.safetensors"))[0]
    size = (folder / shard).stat().st_size
    repo = hub.add_folder(REPO_ID, folder, slow_file=shard, slow_piece=8 * 1024)  # 80 KiB/s
    assert size / (80 * 1024) > 3  # the slow shard takes longer than the bound
    code, _, err = cli("convert", REPO_ID, tmp_path / "out")
    assert code == 0, err
    assert repo.slow_started.is_set()


@pytest.mark.parametrize("wait", [{"Retry-After": "100000"}, {"RateLimit": '"api";r=0;t=100000'}])
@pytest.mark.parametrize("kind", ["api", "file"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_long_retry_after_is_not_waited_for(hub, folder, cli, tmp_path, monkeypatch, kind, command, wait):
    monkeypatch.setenv(ENV_TIMEOUT, "2")
    hub.add_folder(REPO_ID, folder, fail={kind: (429, wait)})
    t0 = time.monotonic()
    code, _, err = cli(command, REPO_ID, *([tmp_path / "out"] if command == "convert" else []))
    _fails(code, err, 3, "HTTP 429", "100000", "2 s", ENV_TIMEOUT)
    assert time.monotonic() - t0 < 8 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1e9"])
def test_a_bad_bound_is_a_usage_error(hub, folder, cli, monkeypatch, value):
    hub.add_folder(REPO_ID, folder)
    monkeypatch.setenv(ENV_TIMEOUT, value)
    code, _, err = cli("inspect", REPO_ID)
    _fails(code, err, 2, ENV_TIMEOUT)


# ------------------------------------------------------------------------------ what the server said


@pytest.mark.parametrize("status", [500, 429, 503])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_server_error_is_named_not_taken_for_no_network(hub, folder, cli, tmp_path, status, command):
    hub.add_folder(REPO_ID, folder, fail={"api": (status, {})})
    code, _, err = cli(command, REPO_ID, *([tmp_path / "out"] if command == "convert" else []))
    line = _fails(code, err, 3, REPO_ID, f"HTTP {status}")
    assert "HF_HUB_OFFLINE" not in line and "no network" not in line


def test_inspect_and_convert_word_an_unreachable_hub_the_same(point, cli, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: held (bound, not listening) so no one else takes it
        s.bind(("127.0.0.1", 0))
        point(f"http://127.0.0.1:{s.getsockname()[1]}")
        _, _, err_inspect = cli("inspect", REPO_ID)
        code, _, err_convert = cli("convert", REPO_ID, tmp_path / "out")
    line = _fails(code, err_convert, 3, REPO_ID, "not in the local Hugging Face cache", "cannot reach")
    assert one_error_line(err_inspect) == line


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_file_name_with_a_lone_surrogate_is_bad_input(hub, folder, cli, tmp_path, command):
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["model\ud800.safetensors"] = b"x"
    hub.add_files(REPO_ID, files)
    code, _, err = cli(command, REPO_ID, *([tmp_path / "out"] if command == "convert" else []))
    _fails(code, err, 3, REPO_ID, "UTF-8")


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_shard_size_past_2_63_is_bad_input(hub, folder, cli, tmp_path, command):
    hub.add_folder(REPO_ID, folder, claim_size=2**64 + 5)
    code, _, err = cli(command, REPO_ID, *([tmp_path / "out"] if command == "convert" else []))
    _fails(code, err, 3, REPO_ID, str(2**64 + 5))


# ------------------------------------------------------------------------------ the process: bars, signals


def _env(hub, tmp_path, **extra):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "home"), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **extra}
    for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(k, None)
    return env


def test_quiet_convert_in_ci_prints_no_download_bars(folder, tmp_path):
    with FakeHub() as hub:
        hub.add_folder(REPO_ID, folder)
        r = subprocess.run([sys.executable, "-m", "gptq2xpu", "convert", REPO_ID, str(tmp_path / "out"), "-q"],
                           capture_output=True, text=True, env=_env(hub, tmp_path, CI="1"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_download_stops_within_seconds(tmp_path, sig):
    src = fixture_copy(tmp_path / "src")
    parent = tmp_path / "outdir"
    parent.mkdir()
    with FakeHub() as hub:
        repo = hub.add_folder(REPO_ID, src, slow_file="model.safetensors")
        proc = subprocess.Popen([sys.executable, "-m", "gptq2xpu", "convert", REPO_ID, str(parent / "out")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(hub, tmp_path))
        try:
            assert repo.slow_started.wait(60), "the download never started"
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert took < 5, took
    one_error_line(err)
    assert list(parent.iterdir()) == []  # no OUTPUT, no stage folder


# ------------------------------------------------------------------------------ files left out


def test_a_safetensors_file_beside_the_checkpoint_is_named_as_left_out(hub, cli, tmp_path):
    src = fixture_copy(tmp_path / "src")
    (src / "reference.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    code, out, err = cli("inspect", src, "--json")
    assert code == 0, err
    warned = [w for w in json.loads(out)["warnings"] if "reference.safetensors" in w]
    assert len(warned) == 1 and "left out" in warned[0] and "model.safetensors" in warned[0]
    code, out, err = cli("convert", src, tmp_path / "out", "--json")
    assert code == 0 and any("reference.safetensors" in w for w in json.loads(out)["warnings"]), err

    hub.add_folder(REPO_ID, src)
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    assert any("reference.safetensors" in w and "left out" in w for w in json.loads(out)["warnings"])
    code, out, err = cli("convert", REPO_ID, tmp_path / "out2", "--json")
    assert code == 0 and any("reference.safetensors" in w for w in json.loads(out)["warnings"]), err


def test_a_file_the_index_does_not_name_is_named_as_left_out(cli, folder, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "extra.safetensors").write_bytes(next(src.glob("model-*.safetensors")).read_bytes())
    code, out, err = cli("inspect", src, "--json")
    assert code == 0, err
    assert any("extra.safetensors" in w and "not named in model.safetensors.index.json" in w
               for w in json.loads(out)["warnings"])


def test_a_model_info_answer_past_its_cap_is_refused(hub, folder, cli, monkeypatch):
    from gptq2xpu.read import resolve

    hub.add_folder(REPO_ID, folder)
    monkeypatch.setattr(resolve, "MAX_API_BYTES", 100)
    code, _, err = cli("inspect", REPO_ID)
    _fails(code, err, 3, REPO_ID, "more than 100 bytes")
