"""Nothing is read or written outside the folders: links, FIFOs, devices and names from untrusted
documents, in sources, converted folders handed to verify/finalize/the loader, and OUTPUT."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support.helpers import run_cli
from support.hostile import fixture_copy, one_error_line, split_into_index, tree_hashes

from gptq2xpu.contract import MANIFEST_NAME
from gptq2xpu.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, EXIT_VERIFY, InputError
from gptq2xpu.load import open_converted

SECRET = "the-secret-contents"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    src = fixture_copy(base / "src", side_files=True)
    out = base / "out"
    assert run_cli("convert", src, out, "--tp-size", "2", "--emit-ranks").returncode == EXIT_OK
    return src, out


@pytest.fixture
def secret(tmp_path):
    victim = tmp_path / "elsewhere" / "secret.txt"
    victim.parent.mkdir()
    victim.write_text(SECRET)
    return victim


def copy_of(out, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


# ------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("name", ["quantization_config.json", "quantize_config.json"])
def test_source_quant_config_linked_outside_is_refused(tmp_path, secret, name):
    src = fixture_copy(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(cfg))
    secret.write_text(json.dumps(qc))
    (src / name).symlink_to(secret)
    proc = run_cli("inspect", src)
    assert proc.returncode == EXIT_INPUT and name in one_error_line(proc.stderr) and "outside" in proc.stderr


def test_source_index_linked_outside_is_refused(tmp_path, secret):
    src = fixture_copy(tmp_path / "src")
    split_into_index(src)
    index = src / "model.safetensors.index.json"
    secret.write_text(index.read_text())
    index.unlink()
    index.symlink_to(secret)
    proc = run_cli("inspect", src)
    assert proc.returncode == EXIT_INPUT and "model.safetensors.index.json" in one_error_line(proc.stderr)


@pytest.mark.parametrize("what", ["fifo", "dev-zero", "folder"])
def test_source_config_that_is_not_a_file_is_an_error_not_an_absence(tmp_path, what):
    src = fixture_copy(tmp_path / "src")
    (src / "config.json").unlink()
    if what == "fifo":
        os.mkfifo(src / "config.json")
    elif what == "dev-zero":
        (src / "config.json").symlink_to("/dev/zero")
    else:
        (src / "config.json").mkdir()
    proc = run_cli("inspect", src, timeout=60)  # a FIFO must not block the open
    line = one_error_line(proc.stderr)
    assert proc.returncode == EXIT_INPUT and "config.json" in line


def test_side_file_fifo_and_bad_names_are_not_copied(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    os.mkfifo(src / "tokenizer.model")
    (src / "notes:v1.txt").write_text("x")
    (src / "a\\b.md").write_text("x")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "notes:v1.txt" in proc.stderr and "tokenizer.model" in proc.stderr  # warned about
    assert not any(p.name in ("tokenizer.model", "notes:v1.txt", "a\\b.md") for p in out.iterdir())
    assert run_cli("verify", out).returncode == EXIT_OK  # the conversion passes its own verification


# ------------------------------------------------------------------------------ OUTPUT


def test_split_output_with_planted_links_is_refused(tmp_path, secret):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    out.mkdir()
    (out / ".gptq2xpu-parts").symlink_to(secret.parent)
    before = tree_hashes(secret.parent)
    proc = run_cli("convert", src, out, "--part", "1/1")
    assert proc.returncode == EXIT_USAGE and ".gptq2xpu-parts" in one_error_line(proc.stderr)
    assert tree_hashes(secret.parent) == before
    (out / ".gptq2xpu-parts").unlink()
    (out / f".model.safetensors.tmp-{os.getpid()}-x").symlink_to(secret)
    proc = run_cli("convert", src, out, "--part", "1/1")
    assert proc.returncode == EXIT_USAGE
    assert secret.read_text() == SECRET


def test_finalize_refuses_records_naming_paths_outside(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    assert run_cli("convert", src, out, "--part", "1/1").returncode == EXIT_OK
    rec = out / ".gptq2xpu-parts" / "part-1-of-1.json"
    good = rec.read_text()
    for evil in ("../escape.txt", "/etc/passwd", "sub/../../x"):
        doc = json.loads(good)
        doc["files"][evil] = {"sha256": "0" * 64, "size": 1}
        rec.write_text(json.dumps(doc))
        proc = run_cli("finalize", out)
        assert proc.returncode == EXIT_INPUT and "part-1-of-1.json" in one_error_line(proc.stderr), proc.stderr
        assert not (out / MANIFEST_NAME).exists()
    rec.write_text(good)
    plan = out / ".gptq2xpu-parts" / "plan.json"
    doc = json.loads(plan.read_text())
    doc["parts"] = 10**12
    plan.write_text(json.dumps(doc))
    proc = run_cli("finalize", out, timeout=60)
    assert proc.returncode == EXIT_INPUT and "parts" in one_error_line(proc.stderr)


# ------------------------------------------------------------------------------ converted folders


@pytest.mark.parametrize("what", ["manifest-entry", "index", "rank-folder", "shard"])
def test_verify_never_reads_through_links(converted, tmp_path, secret, what):
    """Links inside a converted folder fail verification, even when their targets hold exactly the
    bytes the manifest expects (the check would otherwise pass by reading outside OUTPUT)."""
    _, out = converted
    out = copy_of(out, tmp_path)
    target = {"manifest-entry": "tokenizer.json", "index": "model.safetensors.index.json",
              "rank-folder": "tp-ranks", "shard": "model.safetensors"}[what]
    moved = tmp_path / "elsewhere" / target
    shutil.move(out / target, moved)
    (out / target).symlink_to(moved)
    proc = run_cli("verify", out)
    assert proc.returncode in (EXIT_VERIFY, EXIT_INPUT), proc.stdout + proc.stderr
    assert "link" in (proc.stdout + proc.stderr)


def test_loader_never_reads_a_rank_folder_linked_outside(converted, tmp_path):
    _, out = converted
    out = copy_of(out, tmp_path)
    moved = tmp_path / "elsewhere-ranks"
    shutil.move(out / "tp-ranks", moved)
    (out / "tp-ranks").symlink_to(moved)
    ckpt = open_converted(out)
    with pytest.raises(InputError, match="link"):
        ckpt.layer(ckpt.layers[0], tp_rank=0, tp_size=2)
    ckpt.close()


@pytest.mark.parametrize("what", ["fifo", "folder", "file"])
def test_verify_flags_anything_unlisted(converted, tmp_path, what):
    _, out = converted
    out = copy_of(out, tmp_path)
    extra = out / "extra"
    {"fifo": lambda: os.mkfifo(extra), "folder": lambda: extra.mkdir(), "file": lambda: extra.write_text("x")}[what]()
    proc = run_cli("verify", out, timeout=60)
    assert proc.returncode == EXIT_VERIFY and "extra" in proc.stdout + proc.stderr


def test_long_lists_of_problems_stay_one_short_line(converted, tmp_path):
    _, out = converted
    out = copy_of(out, tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for i in range(50_000):
        manifest["files"][f"missing/file-{i:05d}.bin"] = {"sha256": "0" * 64, "size": 1}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_cli("verify", out)
    assert proc.returncode == EXIT_VERIFY
    assert max(len(x) for x in (proc.stdout + proc.stderr).splitlines()) < 2000
    assert "more)" in proc.stdout + proc.stderr


def test_index_entry_with_a_dot_segment_is_named_for_what_it_is(tmp_path):
    """``./x`` stays inside the folder: the message says what is wrong with it instead."""
    src = fixture_copy(tmp_path / "src")
    wm = split_into_index(src)
    first = sorted(set(wm.values()))[0]
    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    tensor = next(k for k, v in doc["weight_map"].items() if v == first)
    doc["weight_map"][tensor] = "./" + first
    index.write_text(json.dumps(doc))
    proc = run_cli("inspect", src)
    line = one_error_line(proc.stderr)
    assert proc.returncode == EXIT_INPUT and "not a plain relative name" in line and "leaves" not in line, line


def test_shard_names_that_differ_only_in_unicode_normalisation_print_apart(tmp_path):
    import unicodedata

    src = fixture_copy(tmp_path / "src")
    wm = split_into_index(src)
    first = sorted(set(wm.values()))[0]
    nfc, nfd = (unicodedata.normalize(form, "modél.safetensors") for form in ("NFC", "NFD"))
    os.rename(src / first, src / nfc)
    shutil.copy(src / nfc, src / nfd)
    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    tensors = [k for k, v in doc["weight_map"].items() if v == first]
    for i, tensor in enumerate(tensors):
        doc["weight_map"][tensor] = nfc if i % 2 else nfd
    index.write_text(json.dumps(doc))
    proc = run_cli("inspect", src)
    line = one_error_line(proc.stderr)
    assert proc.returncode == EXIT_INPUT and "appears in both" in line, line
    assert ascii(nfc) in line and ascii(nfd) in line, line
