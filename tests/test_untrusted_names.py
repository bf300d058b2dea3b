"""Names and text from untrusted input: folder and file names that are not UTF-8 or very long,
tensor names JSON can spell but UTF-8 cannot hold, expert numbers with several spellings, and
a Hugging Face cache snapshot given by its path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support.helpers import FIXTURE, cli, raw_header, run_cli, write_raw
from support.hostile import L0, SHARD, fixture_copy, one_error_line
from test_hub import SHA, make_cache

from gptq2xpu.errors import EXIT_INPUT, EXIT_OK
from gptq2xpu.write.documents import temp_stem

LONG_NAME = "README-" + "x" * 240 + ".md"   # 250 bytes: legal, but '.<name>.tmp-<pid>-<random>' is not


def block_source(out) -> dict:
    return json.loads((out / "config.json").read_text(encoding="utf-8"))["gptq2xpu"]["source"]


def rewrite_header(src, edit) -> None:
    """Rewrite the source shard's header JSON text through ``edit(header dict)``, data unchanged."""
    header, data = raw_header(src / SHARD)
    edit(header)
    write_raw(src / SHARD, json.dumps(header).encode(), data)


# ------------------------------------------------------------------------------ file and folder names


def test_source_folder_name_that_is_not_utf8_is_recorded_as_text(tmp_path):
    src = fixture_copy(tmp_path / os.fsdecode(b"src\xff"))
    out = tmp_path / "out"
    code, _, err = cli("convert", src, out)
    assert code == EXIT_OK, err
    assert block_source(out)["folder"] == "src\\xff" == block_source(out)["origin"]
    assert run_cli("verify", out).returncode == EXIT_OK


def test_source_folder_name_in_utf8_is_recorded_unchanged(tmp_path):
    src = fixture_copy(tmp_path / "modèle-int4")
    out = tmp_path / "out"
    assert run_cli("convert", src, out).returncode == EXIT_OK
    assert block_source(out)["folder"] == "modèle-int4"


def test_side_file_with_a_long_legal_name_is_copied(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    (src / LONG_NAME).write_text("card")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (out / LONG_NAME).read_text() == "card"
    assert run_cli("verify", out).returncode == EXIT_OK


def test_finalize_accepts_the_temporary_of_a_long_side_file_name(tmp_path):
    """A finalize cut short may leave the temporary file of a side document; the re-run knows it."""
    src = fixture_copy(tmp_path / "src", side_files=True)
    (src / LONG_NAME).write_text("card")
    out = tmp_path / "shared"
    assert run_cli("convert", src, out, "--part", "1/1").returncode == EXIT_OK
    assert len(temp_stem(LONG_NAME)) < len(LONG_NAME) and temp_stem("tokenizer.json") == "tokenizer.json"
    leftover = out / f".{temp_stem(LONG_NAME)}.tmp-4242-abcd1234"
    leftover.write_text("car")
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (out / LONG_NAME).read_text() == "card"
    # and removes it: the finished OUTPUT holds what its manifest lists, nothing else
    assert not leftover.exists()
    assert run_cli("verify", out).returncode == EXIT_OK


def test_side_file_name_that_is_not_utf8_is_left_out_with_a_warning(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    (src / os.fsdecode(b"NOTICE\xfe")).write_text("licence")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "NOTICE" in proc.stderr and "not copied" in proc.stderr
    assert not any(p.name.startswith("NOTICE") for p in out.iterdir())
    assert run_cli("verify", out).returncode == EXIT_OK


# ------------------------------------------------------------------------------ tensor names


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_header_strings_that_utf8_cannot_hold_are_refused(tmp_path, where):
    src = fixture_copy(tmp_path / "src")

    def edit(header):
        if where == "tensor":
            header["model.layers.0.extra\ud800.weight"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        else:
            header["__metadata__"] = {"format": "pt", "note": "\udcfe"}

    rewrite_header(src, edit)
    code, _, err = cli("convert", src, tmp_path / "out")
    line = one_error_line(err)
    assert code == EXIT_INPUT and SHARD in line and "UTF-8" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ expert numbers


def _add_expert_spelling(src, spelling: str, *, keep_canonical: bool) -> None:
    """Copy (or move, without ``keep_canonical``) expert 1 of layer 0 to ``experts.<spelling>``:
    the copy's bytes appended to the data, its codes changed (a different expert, not an overlap)."""
    header, data = raw_header(src / SHARD)
    data = bytearray(data)
    for name in [n for n in header if f"{L0}.experts.1." in n]:
        spec = header[name] if keep_canonical else header.pop(name)
        begin, end = spec["data_offsets"]
        blob = bytes(data[begin:end])
        if name.endswith("qweight"):
            blob = bytes(b ^ 0x11 for b in blob)
        header[name.replace(".experts.1.", f".experts.{spelling}.")] = {
            **spec, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    write_raw(src / SHARD, json.dumps(header).encode(), bytes(data))


@pytest.mark.parametrize("spelling", ["01", "\u0661"])   # leading zero; ARABIC-INDIC DIGIT ONE
def test_two_spellings_of_one_expert_number_are_refused_naming_both(tmp_path, spelling):
    src = fixture_copy(tmp_path / "src")
    _add_expert_spelling(src, spelling, keep_canonical=True)
    code, _, err = cli("convert", src, tmp_path / "out")
    line = one_error_line(err)
    assert code == EXIT_INPUT, err
    assert f"{L0}.experts.1." in line and f"{L0}.experts.{spelling}." in line
    assert not (tmp_path / "out").exists()


def test_an_expert_number_not_written_canonically_is_refused(tmp_path):
    src = fixture_copy(tmp_path / "src")
    _add_expert_spelling(src, "0001", keep_canonical=False)
    code, _, err = cli("inspect", src)
    line = one_error_line(err)
    assert code == EXIT_INPUT and f"{L0}.experts.0001." in line and "'0001'" in line


# ------------------------------------------------------------------------------ hub cache snapshots


def test_local_hub_cache_snapshot_is_a_source(tmp_path):
    snap = make_cache(tmp_path / "cache")
    assert (snap / "config.json").is_symlink()
    out = tmp_path / "out"
    proc = run_cli("convert", snap, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    source = block_source(out)
    assert source["repo_id"] == "acme/tiny-moe-gptq" and source["commit"] == SHA
    assert run_cli("verify", out, "--source", snap, "--no-numeric").returncode == EXIT_OK


@pytest.mark.parametrize("target", ["outside", "other-repo-blob", "refs"])
def test_hub_cache_snapshot_links_leaving_its_blobs_are_refused(tmp_path, target):
    cache = tmp_path / "cache"
    snap = make_cache(cache)
    other = make_cache(cache, repo="acme/other")
    repo = snap.parent.parent
    victim = {"outside": tmp_path / "secret.json",
              "other-repo-blob": other.parent.parent / "blobs" / "planted",
              "refs": repo / "refs" / "planted"}[target]
    shutil.copyfile(FIXTURE / "tokenizer.json", victim)
    (snap / "tokenizer.json").unlink()
    os.symlink(os.path.relpath(victim, snap), snap / "tokenizer.json")
    code, _, err = cli("convert", snap, tmp_path / "out")
    line = one_error_line(err)
    assert code == EXIT_INPUT and "tokenizer.json" in line and "outside" in line


@pytest.mark.parametrize("layout", ["not-a-commit", "not-models"])
def test_links_into_blobs_are_refused_outside_the_hub_layout(tmp_path, layout):
    snap = make_cache(tmp_path / "cache")
    repo = snap.parent.parent
    renamed = (repo / "snapshots" / "main" if layout == "not-a-commit"
               else repo.parent / "stuff--acme--tiny" / "snapshots" / SHA)
    if layout == "not-a-commit":
        snap.rename(renamed)
    else:
        repo.rename(renamed.parent.parent)
    code, _, err = cli("inspect", renamed)
    assert code == EXIT_INPUT and "outside" in one_error_line(err)
