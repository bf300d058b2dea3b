"""Nothing is lost: what OUTPUT may replace, split runs in shared folders, and every moment of
publishing (signals, a second Ctrl-C, SIGKILL) ending with either the old OUTPUT or the new one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
from support.helpers import FIXTURE, cli, run_cli
from support.hostile import fixture_copy, leftovers, tree_hashes

from gptq2xpu.contract import MANIFEST_NAME
from gptq2xpu.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from gptq2xpu.write.output import INCOMPLETE_MARKER, OLD_TAG, STAGE_TAG

PUBLISH = "gptq2xpu.write.output:_exchange"
RENAME = "gptq2xpu.write.output:os.rename"
RMTREE = "gptq2xpu.write.output:shutil.rmtree"
WRITE = "gptq2xpu.write.shards:ShardWriter.write"


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory):
    """An existing OUTPUT (u4b8) and the hashes of what replacing it with --nibble-encoding s4 gives."""
    base = tmp_path_factory.mktemp("publish")
    src = fixture_copy(base / "src", side_files=True)
    assert run_cli("convert", src, base / "old").returncode == 0
    assert run_cli("convert", src, base / "new", "--nibble-encoding", "s4").returncode == 0
    return src, tree_hashes(base / "old"), tree_hashes(base / "new"), base


def fresh_output(old_and_new, tmp_path):
    src, old, _, base = old_and_new
    out = tmp_path / "out"
    shutil.copytree(base / "old", out)
    assert tree_hashes(out) == old
    return src, out


def replace(src, out, *faults):
    return run_cli("convert", src, out, "--overwrite", "--nibble-encoding", "s4", faults=faults)


def hidden(out):
    return leftovers(out)


# ------------------------------------------------------------------------------ what may be replaced


def test_overwrite_never_replaces_another_models_folder(tmp_path):
    src = fixture_copy(tmp_path / "src")
    other = tmp_path / "my-model"
    shutil.copytree(FIXTURE, other)                      # a config.json, shards, the user's files
    (other / "notes.md").write_text("mine")
    before = tree_hashes(other)
    proc = run_cli("convert", src, other, "--overwrite")
    assert proc.returncode == EXIT_USAGE and "not a gptq2xpu output" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert tree_hashes(other) == before and hidden(other) == []


def test_overwrite_never_replaces_a_conversion_the_user_added_files_to(old_and_new, tmp_path):
    src, out = fresh_output(old_and_new, tmp_path)
    (out / "my-eval-results.json").write_text("{}")
    before = tree_hashes(out)
    proc = run_cli("convert", src, out, "--overwrite")
    assert proc.returncode == EXIT_USAGE and "my-eval-results.json" in proc.stderr, proc.stderr
    assert tree_hashes(out) == before


def test_overwrite_never_replaces_a_conversion_holding_a_link(old_and_new, tmp_path):
    src, out = fresh_output(old_and_new, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (out / "data").symlink_to(tmp_path / "elsewhere")
    proc = run_cli("convert", src, out, "--overwrite")
    assert proc.returncode == EXIT_USAGE and "symbolic link" in proc.stderr, proc.stderr
    assert (out / "data").is_symlink() and (tmp_path / "elsewhere").is_dir()


def test_overwrite_never_removes_an_empty_folder_the_user_added(old_and_new, tmp_path):
    src, out = fresh_output(old_and_new, tmp_path)
    (out / "placeholder").mkdir()
    before = tree_hashes(out)
    proc = run_cli("convert", src, out, "--overwrite")
    assert proc.returncode == EXIT_USAGE and "placeholder/" in proc.stderr, proc.stderr
    assert (out / "placeholder").is_dir() and tree_hashes(out) == before


def test_overwrite_replaces_an_output_with_rank_folders(tmp_path):
    """The folders a conversion's files lie in (tp-ranks/...) are part of it."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    assert run_cli("convert", src, out, "--tp-size", "2", "--emit-ranks").returncode == EXIT_OK
    proc = run_cli("convert", src, out, "--overwrite", "--tp-size", "2", "--emit-ranks", "--nibble-encoding", "s4")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert run_cli("verify", out).returncode == EXIT_OK


def test_an_empty_output_folder_is_used_without_overwrite(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (out / MANIFEST_NAME).is_file() and hidden(out) == []
    assert run_cli("verify", out).returncode == EXIT_OK


# ------------------------------------------------------------------------------ split runs


def test_part_never_writes_into_a_folder_it_did_not_make(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    out = tmp_path / "shared"
    out.mkdir()
    (out / "README.md").write_text("the user's own readme")
    (out / "config.json").write_text('{"mine": true}')
    before = tree_hashes(out)
    proc = run_cli("convert", src, out, "--part", "1/1")
    assert proc.returncode == EXIT_USAGE and "README.md" in proc.stderr, proc.stderr
    assert tree_hashes(out) == before


def test_parts_and_finalize_refuse_a_foreign_file_added_meanwhile(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    args = ("--max-shard-size", "2MB")
    assert run_cli("convert", src, out, "--part", "1/2", *args).returncode == EXIT_OK
    (out / "notes.txt").write_text("mine")
    proc = run_cli("convert", src, out, "--part", "2/2", *args)
    assert proc.returncode == EXIT_USAGE and "notes.txt" in proc.stderr
    (out / "notes.txt").unlink()
    assert run_cli("convert", src, out, "--part", "2/2", *args).returncode == EXIT_OK
    (out / "notes.txt").write_text("mine")
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_USAGE and "notes.txt" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine" and not (out / MANIFEST_NAME).exists()
    (out / "notes.txt").unlink()
    assert run_cli("finalize", out).returncode == EXIT_OK
    assert run_cli("verify", out).returncode == EXIT_OK


def test_finalize_again_after_it_was_cut_short(tmp_path):
    """An interrupted finalize (index and config written, no manifest yet) can simply be re-run;
    final documents that differ from what it writes are refused, not overwritten."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    assert run_cli("convert", src, out, "--part", "1/1").returncode == EXIT_OK
    proc = run_cli("finalize", out, faults=[("gptq2xpu.write.split:manifest_bytes", "SIGKILL", 1)])
    assert proc.returncode == -signal.SIGKILL
    assert (out / "config.json").is_file() and not (out / MANIFEST_NAME).exists()
    cfg = (out / "config.json").read_text()
    (out / "config.json").write_text(cfg.replace('"gptq2xpu"', '"edited"'))
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_USAGE and "config.json" in proc.stderr
    (out / "config.json").write_text(cfg)
    assert run_cli("finalize", out).returncode == EXIT_OK
    assert run_cli("verify", out).returncode == EXIT_OK


# ------------------------------------------------------------------------------ publishing


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_publishing_completes_the_swap(old_and_new, tmp_path, sig):
    """A signal that arrives during the swap is held: the run ends with the new OUTPUT, exit 0,
    and says so; nothing hidden is left."""
    src, out = fresh_output(old_and_new, tmp_path)
    _, old, new, _ = old_and_new
    for moment in (sig, f"after:{sig}"):
        shutil.rmtree(out)
        shutil.copytree(old_and_new[3] / "old", out)
        proc = replace(src, out, (PUBLISH, moment, 1))
        assert proc.returncode == EXIT_OK, proc.stderr
        assert sig in proc.stderr and "complete" in proc.stderr
        assert tree_hashes(out) == new and hidden(out) == []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_before_publishing_keeps_the_old_output(old_and_new, tmp_path, sig):
    src, out = fresh_output(old_and_new, tmp_path)
    _, old, _, _ = old_and_new
    proc = replace(src, out, (WRITE, sig, 1))
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert tree_hashes(out) == old and hidden(out) == []


def test_second_ctrl_c_during_cleanup_still_removes_the_partial_folder(old_and_new, tmp_path):
    src, out = fresh_output(old_and_new, tmp_path)
    _, old, _, _ = old_and_new
    proc = replace(src, out, (WRITE, "SIGINT", 1), ("shutil:rmtree", "SIGINT", 1))
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr
    assert tree_hashes(out) == old and hidden(out) == []


@pytest.mark.parametrize("moment,fallback,expect", [
    ("before the swap", False, "old"),
    ("after the swap, before the old copy is removed", False, "new"),
    ("after parking the old output (no exchange on this file system)", True, "old"),
    ("after the new output is in place (no exchange)", True, "new"),
])
def test_sigkill_at_every_moment_of_publishing(old_and_new, tmp_path, moment, fallback, expect):
    """A SIGKILL anywhere leaves either the old or the new OUTPUT, or (fallback, between the two
    renames) a parked old output that the next run puts back: never deletes."""
    src, out = fresh_output(old_and_new, tmp_path)
    _, old, new, _ = old_and_new
    faults = {
        "before the swap": [(PUBLISH, "SIGKILL", 1)],
        "after the swap, before the old copy is removed": [(RMTREE, "SIGKILL", 1)],
        "after parking the old output (no exchange on this file system)": [(PUBLISH, "false", 1),
                                                                            (RENAME, "SIGKILL", 2)],
        "after the new output is in place (no exchange)": [(PUBLISH, "false", 1), (RMTREE, "SIGKILL", 1)],
    }[moment]
    proc = replace(src, out, *faults)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if expect == "old" and fallback:
        assert not out.exists() and any(OLD_TAG in h for h in hidden(out))
    else:
        assert tree_hashes(out) == (old if expect == "old" else new)
    # the next run (here: a dry run is not enough, a real conversion elsewhere in the same folder
    # would not look; the next conversion to OUTPUT does) tidies: restores the parked old output,
    # removes the rest, and never deletes an output
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_USAGE and "already exists" in proc.stderr, proc.stderr
    assert tree_hashes(out) == (old if expect == "old" else new)
    assert hidden(out) == []
    assert run_cli("verify", out).returncode == EXIT_OK


DEAD = "dead0000beef"  # the random token of a killed run's hidden folder


def test_stale_folders_that_are_not_ours_are_left_alone(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    strangers = [tmp_path / f".out{STAGE_TAG}{DEAD}", tmp_path / f".out{OLD_TAG}{DEAD}",
                 tmp_path / f".out{STAGE_TAG}{'9' * 40}"]  # not a name a run gives
    for folder in strangers:
        folder.mkdir()
        (folder / "thesis.tex").write_text("not a conversion")
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    for folder in strangers:
        assert (folder / "thesis.tex").read_text() == "not a conversion"
    assert "left" in proc.stderr and "alone" in proc.stderr


def test_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, faults=[(WRITE, "SIGKILL", 1)])
    assert proc.returncode == -signal.SIGKILL
    assert any(STAGE_TAG in h for h in hidden(out)) and not out.exists()
    assert run_cli("convert", src, out).returncode == EXIT_OK
    assert hidden(out) == []
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert not any(name.startswith(".") for name in manifest["files"])
    assert not os.path.exists(out / ".gptq2xpu-incomplete")


# ------------------------------------------------------------------------------ after a SIGKILL, and hostile siblings


@pytest.mark.parametrize("token", [DEAD, "0123456789ab"])
def test_a_parked_output_is_never_deleted_when_output_exists(old_and_new, tmp_path, token):
    """A killed fallback publish left the old output parked, and OUTPUT holds something else now:
    the parked output stays, whatever the run does, and the user is told where it is."""
    src, _, _, base = old_and_new
    out = tmp_path / "out"
    park = tmp_path / f".out{OLD_TAG}{token}"
    shutil.copytree(base / "old", park)
    kept = tree_hashes(park)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_USAGE and "already exists" in proc.stderr, proc.stderr
    assert str(park) in proc.stderr and str(out) in proc.stderr
    assert tree_hashes(park) == kept and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()                            # an empty OUTPUT: the run goes ahead
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert str(park) in proc.stderr and tree_hashes(park) == kept


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "park-then-rename"])
def test_a_file_added_to_output_during_the_run_is_never_deleted(old_and_new, tmp_path, monkeypatch, exchange):
    """The user's file lands in OUTPUT after the run's first check, right before the swap: the
    old folder goes back to OUTPUT unchanged, nothing is published (exit 2), nothing is left."""
    from gptq2xpu.write import output

    src, out = fresh_output(old_and_new, tmp_path)
    real = output._exchange

    def add_then_exchange(a, b):
        if b == out:
            (out / "eval-results.json").write_text("hours of work")
        return real(a, b) if exchange else False

    monkeypatch.setattr(output, "_exchange", add_then_exchange)
    code, _, err = cli("convert", src, out, "--overwrite", "--nibble-encoding", "s4")
    assert code == EXIT_USAGE and "eval-results.json" in err and "published nothing" in err, err
    assert (out / "eval-results.json").read_text() == "hours of work"
    (out / "eval-results.json").unlink()
    assert tree_hashes(out) == old_and_new[1] and hidden(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "park-then-rename"])
def test_an_empty_folder_added_to_output_during_the_run_is_never_deleted(old_and_new, tmp_path, monkeypatch,
                                                                          exchange):
    from gptq2xpu.write import output

    src, out = fresh_output(old_and_new, tmp_path)
    real = output._exchange

    def add_then_exchange(a, b):
        if b == out:
            (out / "placeholder").mkdir()
        return real(a, b) if exchange else False

    monkeypatch.setattr(output, "_exchange", add_then_exchange)
    code, _, err = cli("convert", src, out, "--overwrite", "--nibble-encoding", "s4")
    assert code == EXIT_USAGE and "placeholder/" in err and "published nothing" in err, err
    assert (out / "placeholder").is_dir()
    (out / "placeholder").rmdir()
    assert tree_hashes(out) == old_and_new[1] and hidden(out) == []


def test_a_live_runs_stage_is_left_alone(tmp_path):
    """A folder whose lock another process holds belongs to a live run: never touched."""
    from gptq2xpu.write import output

    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "out"
    live = tmp_path / f".out{STAGE_TAG}0123456789ab"
    live.mkdir()
    (live / INCOMPLETE_MARKER).touch()
    fd = output.lock_folder(live)
    try:
        proc = run_cli("convert", src, out)
    finally:
        os.close(fd)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert (live / INCOMPLETE_MARKER).exists()


def test_an_uninspectable_stale_sibling_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from gptq2xpu.write import output

    stale = tmp_path / f".out{STAGE_TAG}{DEAD}"
    stale.mkdir()

    def denied(_folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(output, "converted_output_problem", denied)
    lines = output.recover_stale(tmp_path / "out")
    assert stale.is_dir() and len(lines) == 1 and "Permission denied" in lines[0] and str(stale) in lines[0]


def test_an_output_name_of_255_bytes(tmp_path):
    """Hidden sibling names stay within the file system's name limit."""
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / ("o" * 255)
    proc = run_cli("convert", src, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", out.name])
    assert run_cli("verify", out).returncode == EXIT_OK


def test_finalize_removes_temporary_files_of_killed_part_runs(tmp_path):
    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    args = ("--max-shard-size", "1MB")
    assert run_cli("convert", src, out, "--part", "1/2", *args).returncode == EXIT_OK
    shard = sorted(p.name for p in out.glob("*.safetensors"))[0]
    (out / f".{shard}.tmp-4000000-k1lled00").write_bytes(b"half a shard")  # what a SIGKILL leaves
    assert run_cli("convert", src, out, "--part", "2/2", *args).returncode == EXIT_OK
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert not any(p.name.startswith(".") for p in out.iterdir())
    verify = run_cli("verify", out)
    assert verify.returncode == EXIT_OK, verify.stdout + verify.stderr


# ------------------------------------------------------------------------------ aliases of SOURCE


@pytest.fixture
def bind(tmp_path):
    """``bind(src, dst)``: mount ``src`` again at ``dst`` (needs root); unmounted afterwards."""
    mounted = []

    def mount(src, dst):
        dst.mkdir()
        proc = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot bind-mount here (needs root and mount): {proc.stderr.strip()}")
        mounted.append(dst)

    yield mount
    for dst in reversed(mounted):
        subprocess.run(["umount", str(dst)], check=True)


def test_output_inside_source_reached_through_a_bind_mount_is_refused(tmp_path, bind):
    src = fixture_copy(tmp_path / "src")
    before = tree_hashes(src)
    bind(src, tmp_path / "alias")
    code, _, err = cli("convert", src, tmp_path / "alias" / "out")
    assert code == EXIT_USAGE and "inside it" in err, err
    assert tree_hashes(src) == before


def test_output_holding_the_source_through_a_bind_mount_is_refused(tmp_path, bind):
    outer = tmp_path / "outer"
    src = fixture_copy(outer / "src")
    before = tree_hashes(src)
    bind(outer, tmp_path / "alias")
    code, _, err = cli("convert", src, tmp_path / "alias", "--overwrite")
    assert code == EXIT_USAGE and "contains the source" in err, err
    assert tree_hashes(src) == before


# ------------------------------------------------------------------------------ finalize vouches for what it publishes


def three_parts(tmp_path):
    src = fixture_copy(tmp_path / "src", side_files=True)
    out = tmp_path / "shared"
    for i in (1, 2, 3):
        assert run_cli("convert", src, out, "--part", f"{i}/3", "--max-shard-size", "300KB").returncode == EXIT_OK
    return out, sorted(out.glob("*.safetensors"))[0]


def flip_last_bytes(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    with open(path, "r+b") as fh:                          # in place: same size, same inode
        fh.write(data)


def test_finalize_refuses_a_part_shard_changed_since_its_part_run(tmp_path):
    out, shard = three_parts(tmp_path)
    flip_last_bytes(shard)
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_INPUT and shard.name in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (out / MANIFEST_NAME).exists()


def test_finalize_refuses_a_record_without_its_shards_stat(tmp_path):
    """A part record always says how its shards stood on disk; one that does not is refused."""
    out, _ = three_parts(tmp_path)
    rec = sorted((out / ".gptq2xpu-parts").glob("part-*.json"))[0]
    doc = json.loads(rec.read_text())
    del doc["written"]
    rec.write_text(json.dumps(doc))
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_INPUT and rec.name in proc.stderr and "'written'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (out / MANIFEST_NAME).exists()


def test_finalize_catches_a_shard_edited_in_place_with_its_mtime_set_back(tmp_path):
    """Same size, same inode, mtime restored (``touch -r``): the change time still tells."""
    out, shard = three_parts(tmp_path)
    stat = shard.stat()
    flip_last_bytes(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (shard.stat().st_ino, shard.stat().st_size) == (stat.st_ino, stat.st_size)
    proc = run_cli("finalize", out)
    assert proc.returncode == EXIT_INPUT and shard.name in proc.stderr, proc.stderr


def test_finalize_of_a_copied_split_output_checks_and_accepts_it(tmp_path):
    out, _ = three_parts(tmp_path)
    copy = tmp_path / "copied"
    shutil.copytree(out, copy)                              # new inodes: every shard is hashed again
    proc = run_cli("finalize", copy)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert run_cli("verify", copy).returncode == EXIT_OK


def test_finalize_reads_no_shard_whose_stat_is_unchanged(tmp_path, monkeypatch):
    from gptq2xpu.write import split

    out, _ = three_parts(tmp_path)
    read = []
    real = split._sha256
    monkeypatch.setattr(split, "_sha256", lambda reader, name: read.append(name) or real(reader, name))
    code, _, err = cli("finalize", out)
    assert code == EXIT_OK, err
    assert read and not any(name.endswith(".safetensors") for name in read), read


def test_one_finalize_at_a_time(tmp_path):
    """A second finalize while one runs would remove the first one's temporary files: refused."""
    from gptq2xpu.write.output import lock_folder, unlock_folder
    from gptq2xpu.write.split import PARTS_DIR

    src = fixture_copy(tmp_path / "src")
    out = tmp_path / "shared"
    assert run_cli("convert", src, out, "--part", "1/1").returncode == EXIT_OK
    held = lock_folder(out / PARTS_DIR)
    try:
        proc = run_cli("finalize", out)
        assert proc.returncode == EXIT_USAGE and "another finalize is running" in proc.stderr, proc.stderr
    finally:
        unlock_folder(held)
    assert run_cli("finalize", out).returncode == EXIT_OK
    assert run_cli("verify", out).returncode == EXIT_OK



def test_an_output_name_too_long_for_the_file_system_is_refused_before_converting(tmp_path):
    src = fixture_copy(tmp_path / "src")
    proc = run_cli("convert", src, tmp_path / ("o" * 256))
    assert proc.returncode == EXIT_USAGE and "256 bytes, more than the 255" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing staged, nothing written
