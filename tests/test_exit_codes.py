"""The exit-code table of :mod:`gptq2xpu.errors`, produced by real CLI runs of convert, inspect and verify.

Each documented code is reached by at least one real scenario per command where the command can
meet that situation; every failure is one line on stderr without a traceback, and ``--debug``
(or ``GPTQ2XPU_DEBUG=1``) adds the traceback.

Interruptions are real signals: the command runs with one of its functions patched to send the
signal to its own process while the command is working (no sleeps, no races; ``helpers.run_cli``).
"""

from __future__ import annotations

import re

import pytest
from support.helpers import FIXTURE, run_cli
from support.hostile import L1, SHARD, assert_clean_failure, fixture_copy, leftovers, mutate

from gptq2xpu import errors
from gptq2xpu.errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY,
)

WRITE = "gptq2xpu.write.shards:ShardWriter.write"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("codes")
    out = base / "out"
    proc = run_cli("convert", FIXTURE, out)
    assert proc.returncode == EXIT_OK, proc.stderr
    return out


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    src = fixture_copy(tmp_path_factory.mktemp("broken") / "src")
    mutate(src, lambda t: t[f"{L1}.experts.7.up_proj.scales"][1].__setitem__((1, 5), float("nan")))
    return src


# ------------------------------------------------------------------------------ the table itself


def test_exit_code_table_is_documented():
    doc = errors.__doc__
    rows = {int(m[1]): m[2] for m in re.finditer(r"^(\d+)\s+(\S.*?)\s{2,}", doc, re.M)}
    assert rows.keys() == {0, 1, 2, 3, 4, 5, 130}
    for cls, code in ((errors.UsageError, EXIT_USAGE), (errors.InputError, EXIT_INPUT),
                      (errors.VerificationError, EXIT_VERIFY), (errors.OutputError, EXIT_IO),
                      (errors.Interrupted, EXIT_INTERRUPTED)):
        assert cls.exit_code == code
        assert cls.__name__ in rows[code]
        assert issubclass(cls, errors.Gptq2XpuError)
    codes = (EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_VERIFY, EXIT_IO, EXIT_INTERRUPTED)
    assert codes == (0, 1, 2, 3, 4, 5, 130)
    # the CLI's own help text repeats the same table
    from gptq2xpu import cli as cli_mod
    assert "0 ok, 1 internal error, 2 usage, 3 bad input" in " ".join(cli_mod.__doc__.split())


# ------------------------------------------------------------------------------ convert


def test_convert_codes(tmp_path, broken):
    out = tmp_path / "out"
    # 2: usage -- a bad --part, an unknown option, a missing argument, an existing OUTPUT
    assert_clean_failure(run_cli("convert", FIXTURE, out, "--part", "3/2"), EXIT_USAGE, out, "--part")
    assert_clean_failure(run_cli("convert", FIXTURE, out, "--no-such-option"), EXIT_USAGE, out, "--no-such-option")
    assert_clean_failure(run_cli("convert", FIXTURE), EXIT_USAGE, None, "output")
    assert_clean_failure(run_cli("convert", FIXTURE, out, "--jobs", "0"), EXIT_USAGE, out, "--jobs")
    assert_clean_failure(run_cli("convert", FIXTURE, out, "--max-shard-size", "lots"), EXIT_USAGE, out,
                         "--max-shard-size")
    # 3: bad input
    assert_clean_failure(run_cli("convert", broken, out), EXIT_INPUT, out, "non-finite scale")
    assert_clean_failure(run_cli("convert", tmp_path / "nope", out), EXIT_INPUT, out, "no such folder")
    # 5: I/O error -- OUTPUT's parent is a regular file
    (tmp_path / "file").write_text("")
    assert_clean_failure(run_cli("convert", FIXTURE, tmp_path / "file" / "out"), EXIT_IO, tmp_path / "file" / "out")
    # 130: SIGINT and SIGTERM while a shard is being written; the partial folder is removed
    for sig in ("SIGINT", "SIGTERM"):
        proc = run_cli("convert", FIXTURE, out, faults=[(WRITE, sig, 1)])
        assert_clean_failure(proc, EXIT_INTERRUPTED, out, "interrupted", sig)
    # 0, and then 2 because OUTPUT exists
    assert run_cli("convert", FIXTURE, out).returncode == EXIT_OK
    proc = run_cli("convert", FIXTURE, out)
    assert proc.returncode == EXIT_USAGE and "already exists" in proc.stderr and "Traceback" not in proc.stderr


def test_finalize_codes(tmp_path, converted):
    assert_clean_failure(run_cli("finalize", tmp_path), EXIT_USAGE, None, "no split conversion")
    assert_clean_failure(run_cli("finalize", converted), EXIT_USAGE, None, "already finalized")


# ------------------------------------------------------------------------------ inspect


def test_inspect_codes(tmp_path, broken):
    assert run_cli("inspect", FIXTURE).returncode == EXIT_OK
    assert_clean_failure(run_cli("inspect", FIXTURE, "--tp-size", "0"), EXIT_USAGE, None, "--tp-size")
    assert_clean_failure(run_cli("inspect", FIXTURE, "--bogus"), EXIT_USAGE, None, "--bogus")
    assert_clean_failure(run_cli("inspect", tmp_path / "nope"), EXIT_INPUT, None, "no such folder")
    src = fixture_copy(tmp_path / "src")
    (src / SHARD).write_bytes((src / SHARD).read_bytes()[:1000])
    assert_clean_failure(run_cli("inspect", src), EXIT_INPUT, None, SHARD)
    proc = run_cli("inspect", FIXTURE, faults=[("gptq2xpu.convert:build_plan", "SIGINT", 1)])
    assert_clean_failure(proc, EXIT_INTERRUPTED, None, "interrupted")


# ------------------------------------------------------------------------------ verify


def test_verify_codes(tmp_path, converted):
    assert run_cli("verify", converted).returncode == EXIT_OK
    assert_clean_failure(run_cli("verify", converted, "--backend", "nope"), EXIT_USAGE, None, "--backend")
    assert_clean_failure(run_cli("verify", converted, "--tokens", "0"), EXIT_USAGE, None, "--tokens")
    assert_clean_failure(run_cli("verify", tmp_path / "nope"), EXIT_INPUT, None, "no such folder")
    # 4: one flipped byte in the data of a converted shard
    bad = tmp_path / "bad"
    proc = run_cli("convert", FIXTURE, bad)
    assert proc.returncode == EXIT_OK
    shard = bad / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = run_cli("verify", bad)
    line = assert_clean_failure(proc, EXIT_VERIFY, None, "verification failed", "model.safetensors")
    assert "sha256" in (line + proc.stdout)
    # 130
    proc = run_cli("verify", converted, faults=[("gptq2xpu.verify.runner:verify", "SIGTERM", 1)])
    assert_clean_failure(proc, EXIT_INTERRUPTED, None, "interrupted", "SIGTERM")
    proc = run_cli("verify", converted, faults=[("gptq2xpu.verify.runner:verify", "SIGINT", 1)])
    assert_clean_failure(proc, EXIT_INTERRUPTED, None, "interrupted", "SIGINT")


# ------------------------------------------------------------------------------ internal errors, --debug


def test_unexpected_exception_is_exit_1_one_line(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", FIXTURE, out, faults=[(WRITE, "raise", 1)])
    line = assert_clean_failure(proc, EXIT_INTERNAL, out, "internal error", "RuntimeError", "--debug")
    assert "injected bug" in line
    proc = run_cli("--debug", "convert", FIXTURE, out, faults=[(WRITE, "raise", 1)])
    assert proc.returncode == EXIT_INTERNAL and "Traceback" in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_debug_shows_traceback_for_expected_failures(tmp_path, broken):
    out = tmp_path / "out"
    plain = run_cli("convert", broken, out)
    assert plain.returncode == EXIT_INPUT and "Traceback" not in plain.stderr
    for dbg in (run_cli("--debug", "convert", broken, out),
                run_cli("convert", broken, out, env={"GPTQ2XPU_DEBUG": "1"})):
        assert dbg.returncode == EXIT_INPUT
        assert "Traceback (most recent call last)" in dbg.stderr and "InputError" in dbg.stderr
        # the one-line message still ends the output
        assert dbg.stderr.strip().splitlines()[-1] == plain.stderr.strip()
    # usage errors too
    dbg = run_cli("--debug", "convert", FIXTURE, out, "--part", "9/2")
    assert dbg.returncode == EXIT_USAGE and "Traceback" in dbg.stderr
    assert not out.exists() and leftovers(out) == []


# ------------------------------------------------------------------------------ values at their limits


def test_empty_layers_and_one_pib_shards_from_the_command_line(tmp_path, converted):
    """``--layers ""`` is a usage error like any other malformed spec; ``--max-shard-size 1PiB``,
    the documented bound, is accepted."""
    proc = run_cli("verify", converted, "--source", FIXTURE, "--layers", "", "--no-numeric")
    assert_clean_failure(proc, EXIT_USAGE, None, "--layers")
    out = tmp_path / "out"
    proc = run_cli("convert", FIXTURE, out, "--max-shard-size", "1PiB", "-q")
    assert proc.returncode == EXIT_OK, proc.stderr
