"""Config patterns are matched by RE2 only where RE2 and Python's re agree, and never backtrack."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptq2xpu.read.regex import MAX_PROGRAM, Budget, Regex, Unsupported

# ------------------------------------------------------------------------- same answers as re

ATOMS = ["a", "b", ".", r"\.", r"\d", r"\w", r"\W", r"\s", r"\S", "[ab]", "[^a]", "[a-c0-9]", r"[\d.]", "[]a]",
         "é", "[^é]", r"\n", r"\x41"]


@st.composite
def patterns(draw, depth=3):
    """Patterns built from constructs both engines accept."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["seq", "alt", "group", "star", "plus", "opt", "lazy", "count", "anchor", "dotall"]))
    sub = draw(patterns(depth=depth - 1))
    if kind == "seq":
        return sub + draw(patterns(depth=depth - 1))
    if kind == "alt":
        return f"(?:{sub}|{draw(patterns(depth=depth - 1))})"
    if kind == "group":
        return f"({sub})"
    if kind == "dotall":
        return f"(?s:{sub})"
    if kind == "count":
        lo = draw(st.integers(0, 3))
        return f"(?:{sub}){{{lo},{lo + draw(st.integers(0, 2))}}}"
    if kind == "anchor":
        return draw(st.sampled_from(["^", r"\A", ""])) + sub + draw(st.sampled_from(["$", r"\Z", r"\b", r"\B", ""]))
    return f"(?:{sub})" + {"star": "*", "plus": "+", "opt": "?", "lazy": "*?"}[kind]


def same_as_re(pattern: str, texts) -> None:
    ours, theirs = Regex(pattern), re.compile(pattern)
    for text in texts:
        for mine, python in ((ours.match, theirs.match), (ours.fullmatch, theirs.fullmatch)):
            try:
                got = mine(text)
            except Unsupported as exc:
                # refused, never answered differently, and only where the meanings may differ
                assert not (text and text.isascii() and text.isprintable()), (pattern, text)
                assert "differently" in str(exc) or "Unicode" in str(exc)
                continue
            assert got == (python(text) is not None), (pattern, text)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.lists(st.text(alphabet="ab.1_ A\néÉ٣\x0b\x85", max_size=8), min_size=1, max_size=6))
@example(r"(?:^(?:a){0,0}\B|a)", [""])
def test_agrees_with_python_re(pattern, texts):
    same_as_re(pattern, texts)


def test_names_outside_printable_ascii_are_still_matched_by_patterns_without_ascii_classes():
    assert Regex("layer.é+").fullmatch("layerXéé") and Regex("(?s)a.b").fullmatch("a\nb")
    assert not Regex("a.b").match("a\nb")
    with pytest.raises(Unsupported, match="differently"):
        Regex(r"\w+").fullmatch("é")
    with pytest.raises(Unsupported, match="differently"):
        Regex("a$").match("a\n")  # Python's $ matches before a final newline, RE2's does not
    with pytest.raises(Unsupported, match="not valid Unicode"):
        Regex("a").match("a\ud800")
    assert Regex(r"a\B").match("ab") and not Regex(r"a\B").match("a.") and not Regex("a").match("")
    with pytest.raises(Unsupported, match=r"empty name.*\\B"):
        Regex(r"(?:^\B|a)").match("")  # Python (before 3.14): no match; RE2: a match


def test_the_differential_check_has_teeth():
    """A matcher that read \\d as RE2 does on non-ASCII (without the refusal) would be caught."""
    class Unguarded(Regex):
        def _text(self, text):
            return text
    with pytest.raises(AssertionError), pytest.MonkeyPatch.context() as mp:
        mp.setitem(globals(), "Regex", Unguarded)
        same_as_re(r"\d", ["٣"])


REAL = [r".*\.mlp\.gate$", r"model\.layers\.[0-9]+\.mlp\.experts\..*", r".*(shared_expert|gate)$",
        r".*layers\.(1|2)\.mlp\.experts\.(?:\d+)\.down_proj", r"lm_head", r"(?s).*", r"model\.layers\.\d+\Z"]
NAMES = ["model.layers.0.mlp.gate", "model.layers.12.mlp.experts.7.up_proj", "lm_head",
         "model.layers.1.mlp.experts.3.down_proj", "mtp.layers.0.mlp.shared_expert", "model.layers.3", ""]


@pytest.mark.parametrize("pattern", REAL)
def test_real_config_patterns(pattern):
    same_as_re(pattern, NAMES)


# ------------------------------------------------------------------------- refused, clearly


@pytest.mark.parametrize("pattern,words", [
    (r"(a)\1", "back-references"), (r"(?=a)b", "look-arounds"), (r"(?<!a)b", "look-arounds"),
    (r"(?i)a", "case-insensitive"), (r"(?m)^a", "multi-line"), (r"x(?i:a)", "case-insensitive"),
    (r"(?>a*)a", "atomic groups"), (r"a*+", "possessive"), (r"(?x)a b", "x/a/u flags"), (r"(?a)\w", "x/a/u"),
    (r"a{99999999999}", "invalid"), ("(" * 600 + ")" * 600, "nested too deeply"), ("a" * 2001, "longer than"),
    (r"(?:a{100}){100}", "RE2"), (r"a{1001}", "RE2"), (r"(?P<x>a)(?(x)b|c)", "conditional"), ("[", "invalid"),
    (r"a{,3}", "{0,n}"), (r"[[:alpha:]]", "nested set"), (r"(?#note)a", "comments"), (r"(?P<n>a)(?P=n)", "RE2"),
    (r"\pL", "invalid"), (r"\Qa\E", "invalid"),
])
def test_unsupported_constructs_are_refused(pattern, words):
    with pytest.raises(Unsupported, match=re.escape(words)) as caught:
        Regex(pattern)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------- linear time


def test_catastrophic_patterns_finish(tmp_path):
    """Patterns and names on which Python's re would run for hours; a generous subprocess timeout
    is only a hang guard (this takes well under a second)."""
    code = (
        "from gptq2xpu.read.regex import Regex\n"
        "cases = [(r'(a|a)*b', 'a' * 5000), (r'(a+)+b', 'a' * 5000), (r'.*.*.*.*.*.*.*.*.*.*=', 'x' * 5000),\n"
        "         (r'(x+x+)+y', 'x' * 5000), (r'(\\w*)*\\.', 'w' * 5000), (r'^(a|ab)*c$', 'ab' * 2500),\n"
        "         (r'(?:[^Z]?){900}Z', 'Y' * 20000), (r'(.*a){20}x', 'a' * 20000)]\n"
        "assert not any(Regex(p).match(t) or Regex(p).fullmatch(t) for p, t in cases)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_patterns_sharing_a_budget_are_bounded_together():
    one = Regex("a{40}")._re2.programsize
    budget = Budget(one + one // 2)
    Regex("a{40}", budget)
    with pytest.raises(Unsupported, match="together"):
        Regex("b{40}", budget)
    Regex("b{40}")  # alone it is fine
    assert Regex(r"(?:[^Z]?){900}Z")._re2.programsize * 20 > MAX_PROGRAM
