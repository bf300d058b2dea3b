"""`inspect REPO_ID` reads only configs and safetensors headers over HTTP.

The hub cannot be reached here: a local look-alike (tests/support/hubserver.py) serves a small sharded
synthetic checkpoint on 127.0.0.1 with range support, and huggingface_hub is pointed at it.
huggingface_hub reads ``HF_ENDPOINT`` once, at import, into ``constants.ENDPOINT`` and
``constants.HUGGINGFACE_CO_URL_TEMPLATE``: in-process tests patch those (and the cache folder);
one test runs the CLI as a subprocess with the environment variable only, as a user would.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import REPO
from support.hostile import one_error_line
from support.hubserver import FakeHub

from gptq2xpu.cli.output import ENVELOPE_KEYS
from gptq2xpu.convert import make_plan
from gptq2xpu.errors import InputError
from gptq2xpu.read import open_checkpoint, remote
from gptq2xpu.read.remote import open_hub_headers
from gptq2xpu.safetensors_io import MAX_HEADER_BYTES, read_header

REPO_ID = "acme/moe-gptq"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A sharded synthetic GPTQ MoE checkpoint with an index (4 shards of ~300 KB)."""
    from gptq2xpu.testing.synth import make_checkpoint

    root = tmp_path_factory.mktemp("hubsrc") / "ckpt"
    make_checkpoint(root, shard_size=300_000)
    assert (root / "model.safetensors.index.json").is_file() and len(list(root.glob("*.safetensors"))) >= 3
    return root


@pytest.fixture
def point(monkeypatch, tmp_path):
    """``point(url)``: huggingface_hub in this process talks to ``url``, with an empty cache and no token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent-harnesses.json"), raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    def to(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    return to


@pytest.fixture
def hub(point):
    with FakeHub() as h:
        point(h.url)
        yield h


def _ours(hub):
    """The requests gptq2xpu made: huggingface_hub itself may also ask for /api/agent-harnesses
    (its user-agent registry, at most once a day), which the fake hub answers 404."""
    return [s for s in hub.requests() if s.kind in ("api", "file")]


def _served_bytes(hub) -> int:
    return sum(s.end - s.start for s in _ours(hub))


def _header_ends(folder: Path) -> dict[str, int]:
    return {p.name: read_header(p).data_start for p in folder.glob("*.safetensors")}


def _one_line_error(code, err, *needles):
    assert code == 3, err
    line = one_error_line(err)
    for n in needles:
        assert n in line, line
    return line


# ------------------------------------------------------------------------------ the HTTP path


def test_headers_over_http_give_the_folder_plan_and_fingerprint(hub, folder):
    repo = hub.add_folder(REPO_ID, folder)
    ckpt, read = open_hub_headers(REPO_ID)
    with ckpt, open_checkpoint(folder, REPO_ID) as local:
        remote_plan, local_plan = make_plan(ckpt, _opts()), make_plan(local, _opts())
        assert remote_plan.to_dict() == local_plan.to_dict()
        assert remote_plan.config_block() == local_plan.config_block()
        assert ckpt.fingerprint() == local.fingerprint()
        assert ckpt.total_bytes == local.total_bytes
        with pytest.raises(InputError, match="only its header was fetched"):
            ckpt.read(next(iter(ckpt.tensors)))
        workdir = ckpt.root
        assert (workdir / "config.json").is_file()
    assert not workdir.exists()  # the fetched JSON files are removed on close

    assert (read.read_from, read.commit, read.tensor_bytes_fetched, read.range_ignored) == ("hub", repo.sha, 0, [])
    ends = _header_ends(folder)
    shards = [s for s in hub.file_requests() if s.file.endswith(".safetensors")]
    # per shard exactly two ranged GETs: the 8-byte length, then the header; nothing past the header
    assert all(s.method == "GET" and s.status == 206 and s.range is not None for s in shards)
    served = {f: sorted((s.start, s.end) for s in shards if s.file == f) for f in ends}
    assert served == {f: [(0, 8), (8, end)] for f, end in ends.items()}
    others = {s.file for s in hub.file_requests() if not s.file.endswith(".safetensors")}
    assert others == {"config.json", "model.safetensors.index.json"}
    # what the client counted is what the server wrote, and a small part of the checkpoint
    assert read.bytes_fetched == _served_bytes(hub)
    assert read.requests == len(_ours(hub))
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert read.bytes_fetched < total / 10
    assert all(s.auth is None for s in _ours(hub))  # no token configured, none sent


def _opts():
    from gptq2xpu.plan import ConvertOptions

    return ConvertOptions()


def test_inspect_cli_reports_the_http_path_and_bytes(hub, folder, cli):
    repo = hub.add_folder(REPO_ID, folder)
    code, out, err = cli("inspect", REPO_ID, "--revision", "main", "--json")
    assert code == 0, err
    data = json.loads(out)
    with open_checkpoint(folder, f"{REPO_ID}@main") as local:
        local_plan = make_plan(local, _opts())
        assert data["source_fingerprint"] == local_plan.fingerprint
        expected = json.loads(json.dumps(local_plan.to_dict()))
    assert {k: v for k, v in data.items() if k not in ("hub", "source_fingerprint", *ENVELOPE_KEYS)} == expected
    h = data["hub"]
    assert (h["read_from"], h["commit"], h["endpoint"], h["tensor_bytes_fetched"]) == ("hub", repo.sha, hub.url, 0)
    assert h["bytes_fetched"] == _served_bytes(hub) and h["requests"] == len(_ours(hub))
    assert sum(h["files"].values()) == h["bytes_fetched"]

    code, out, err = cli("inspect", REPO_ID)
    assert code == 0, err
    assert f"read {REPO_ID} at commit {repo.sha[:12]} from {hub.url} over HTTP" in out
    assert "no tensor data" in out and "source fingerprint sha256:" in out


def test_revision_is_resolved_once_and_every_file_is_read_at_that_commit(hub, folder, cli):
    repo = hub.add_folder(REPO_ID, folder)
    repo.refs["v1"] = repo.sha
    code, out, err = cli("inspect", REPO_ID, "--revision", "v1", "--json")
    assert code == 0, err
    assert json.loads(out)["source"] == f"{REPO_ID}@v1"
    assert [s.kind for s in _ours(hub)].count("api") == 1
    assert hub.file_requests() and {s.rev for s in hub.file_requests()} == {repo.sha}
    code, _, err = cli("inspect", REPO_ID, "--revision", "nope")
    _one_line_error(code, err, REPO_ID, "revision 'nope' not found")


def test_token_is_sent_and_a_gated_repo_without_it_is_one_line(hub, folder, cli):
    hub.add_folder(REPO_ID, folder, token="s3cret")
    code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, REPO_ID, "gated repository", "--token")
    hub.clear()
    code, out, err = cli("inspect", REPO_ID, "--token", "s3cret", "--json")
    assert code == 0, err
    assert _ours(hub) and all(s.auth == "Bearer s3cret" for s in _ours(hub))


# ------------------------------------------------------------------------------ hostile servers


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _first_shard(files):
    return sorted(f for f in files if f.endswith(".safetensors"))[0]


def test_header_length_beyond_the_cap_is_refused_after_8_bytes(hub, folder, cli):
    files = _files(folder)
    shard = _first_shard(files)
    files[shard] = struct.pack("<Q", MAX_HEADER_BYTES + 1) + files[shard][8:]
    hub.add_files(REPO_ID, files)
    code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, f"{REPO_ID}/{shard}", "header length", str(MAX_HEADER_BYTES))
    served = [(s.start, s.end) for s in hub.file_requests() if s.file == shard]
    assert served == [(0, 8)]


def test_header_longer_than_the_file_is_refused(hub, folder, cli):
    files = _files(folder)
    shard = _first_shard(files)
    files[shard] = struct.pack("<Q", len(files[shard])) + files[shard][8:]
    hub.add_files(REPO_ID, files)
    code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, f"{REPO_ID}/{shard}", "truncated")


def test_server_ignoring_range_is_read_only_as_far_as_the_headers(hub, folder, cli):
    hub.add_folder(REPO_ID, folder, ignore_range=True)
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    assert "ignored HTTP Range" in err
    h = json.loads(out)["hub"]
    ends = _header_ends(folder)
    assert sorted(h["range_ignored"]) == sorted(ends)
    for shard, end in ends.items():
        size = (folder / shard).stat().st_size
        assert h["files"][shard] <= end + remote.CHUNK < size  # bounded: never the whole shard
    assert 0 < h["tensor_bytes_fetched"] <= len(ends) * remote.CHUNK  # and said so
    with open_checkpoint(folder, REPO_ID) as local:
        assert json.loads(out)["source_fingerprint"] == local.fingerprint()


def test_truncated_response_is_one_line(hub, folder, cli):
    hub.add_folder(REPO_ID, folder, truncate=True)
    code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, f"{REPO_ID}/config.json")


@pytest.mark.parametrize("case", ["no-repo", "missing-shard", "index-names-absent-shard", "bad-index-json", "big-json"])
def test_broken_repositories_are_one_line(hub, folder, cli, monkeypatch, case):
    files = _files(folder)
    shard = _first_shard(files)
    if case == "no-repo":
        code, _, err = cli("inspect", "acme/absent")
        _one_line_error(code, err, "acme/absent: repository not found", hub.url)
        return
    if case == "missing-shard":
        hub.add_files(REPO_ID, files, missing=(shard,))
        needles = (f"{REPO_ID}/{shard}", "not found", "404")
    elif case == "index-names-absent-shard":
        del files[shard]
        hub.add_files(REPO_ID, files)
        needles = ("model.safetensors.index.json", shard, "does not exist")
    elif case == "bad-index-json":
        files["model.safetensors.index.json"] = b"{not json"
        hub.add_files(REPO_ID, files)
        needles = (f"{REPO_ID}/model.safetensors.index.json", "not valid JSON")
    else:
        monkeypatch.setattr(remote, "MAX_JSON_BYTES", 100)
        hub.add_files(REPO_ID, files)
        needles = (f"{REPO_ID}/config.json", "more than 100 bytes")
    code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, *needles)


def test_unreachable_hub_falls_back_to_the_cache_or_says_both(point, cli):
    with socket.socket() as s:  # a port nothing listens on: held (bound, not listening) so no one else takes it
        s.bind(("127.0.0.1", 0))
        point(f"http://127.0.0.1:{s.getsockname()[1]}")
        code, _, err = cli("inspect", REPO_ID)
    _one_line_error(code, err, REPO_ID, "not in the local Hugging Face cache", "cannot reach")


# ------------------------------------------------------------------------------ the cache, convert


def test_convert_still_downloads_and_a_full_cache_is_used_by_inspect(hub, folder, cli, tmp_path, monkeypatch):
    repo = hub.add_folder(REPO_ID, folder)
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    fingerprint = json.loads(out)["source_fingerprint"]

    hub.clear()
    code, out, err = cli("convert", REPO_ID, tmp_path / "out", "--json")
    assert code == 0, err
    whole = {s.file for s in hub.file_requests() if s.method == "GET" and s.range is None and s.status == 200}
    assert set(_header_ends(folder)) <= whole  # convert downloaded every shard in full
    block = json.loads((tmp_path / "out" / "config.json").read_text())["gptq2xpu"]
    assert block["source"]["fingerprint"] == fingerprint  # the headers-only fingerprint is the download's

    hub.clear()
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    data = json.loads(out)
    h = data["hub"]
    assert (h["read_from"], h["commit"], data["source_fingerprint"]) == ("cache", repo.sha, fingerprint)
    assert h["reason"] == "all *.json and *.safetensors files of the commit are cached"
    assert [s.kind for s in _ours(hub)] == ["api"]  # only the revision was resolved
    code, out, err = cli("inspect", REPO_ID)
    assert "from the local Hugging Face cache" in out

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear()
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    h = json.loads(out)["hub"]
    assert (h["read_from"], h["reason"], h["requests"], h["commit"]) == ("cache", "HF_HUB_OFFLINE is set", 0, repo.sha)
    assert _ours(hub) == []


def test_a_partly_cached_repository_is_read_over_http(hub, folder, cli):
    from huggingface_hub import hf_hub_download

    hub.add_folder(REPO_ID, folder)
    hf_hub_download(REPO_ID, "config.json")  # the cache holds one file of the commit, not the shards
    hub.clear()
    code, out, err = cli("inspect", REPO_ID, "--json")
    assert code == 0, err
    assert json.loads(out)["hub"]["read_from"] == "hub"
    assert {s.file for s in hub.file_requests()} >= set(_header_ends(folder))


def test_cli_subprocess_honours_hf_endpoint_and_keeps_torch_away(folder, tmp_path):
    script = ("import sys\nfrom gptq2xpu.cli import main\ncode = 0\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit as e:\n    code = e.code\nsys.stderr.write(f'TORCH={\"torch\" in sys.modules}\\n')\n"
              "sys.exit(code)\n")
    with FakeHub() as hub:
        hub.add_folder(REPO_ID, folder)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_HOME": str(tmp_path / "home"),
               "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("HF_HUB_OFFLINE", None)
        r = subprocess.run([sys.executable, "-c", script, "inspect", REPO_ID, "--json"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TORCH=False" in r.stderr
    h = json.loads(r.stdout)["hub"]
    assert (h["read_from"], h["endpoint"]) == ("hub", hub.url)
