"""The linear-time matcher for config patterns agrees with Python's re, and never backtracks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptq2xpu.read import regex as regex_module
from gptq2xpu.read.regex import MAX_STATES, Budget, Regex, Unsupported

# ------------------------------------------------------------------------- same answers as re

ATOMS = ["a", "b", ".", r"\.", r"\d", r"\w", r"\W", "[ab]", "[^a]", "[a-c0-9]", r"[\d.]"]


@st.composite
def patterns(draw, depth=3):
    """Patterns built from the constructs the matcher supports (no backtracking-only features)."""
    if depth == 0 or draw(st.booleans()):
        return draw(st.sampled_from(ATOMS))
    kind = draw(st.sampled_from(["seq", "alt", "group", "star", "plus", "opt", "lazy", "count", "anchor"]))
    sub = draw(patterns(depth=depth - 1))
    if kind == "seq":
        return sub + draw(patterns(depth=depth - 1))
    if kind == "alt":
        return f"(?:{sub}|{draw(patterns(depth=depth - 1))})"
    if kind == "group":
        return f"({sub})"
    if kind == "count":
        lo = draw(st.integers(0, 3))
        return f"(?:{sub}){{{lo},{lo + draw(st.integers(0, 2))}}}"
    if kind == "anchor":
        return draw(st.sampled_from(["^", r"\A", ""])) + sub + draw(st.sampled_from(["$", r"\Z", r"\b", ""]))
    return f"(?:{sub})" + {"star": "*", "plus": "+", "opt": "?", "lazy": "*?"}[kind]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.lists(st.text(alphabet="ab.1_ \n", max_size=8), min_size=1, max_size=6))
def test_agrees_with_python_re(pattern, texts):
    ours, theirs = Regex(pattern), re.compile(pattern)
    for text in texts:
        assert ours.match(text) == (theirs.match(text) is not None), (pattern, text)
        assert ours.fullmatch(text) == (theirs.fullmatch(text) is not None), (pattern, text)


REAL = [r".*\.mlp\.gate$", r"model\.layers\.[0-9]+\.mlp\.experts\..*", r".*(shared_expert|gate)$",
        r".*layers\.(1|2)\.mlp\.experts\.(?:\d+)\.down_proj", r"lm_head", r"(?s).*"]
NAMES = ["model.layers.0.mlp.gate", "model.layers.12.mlp.experts.7.up_proj", "lm_head",
         "model.layers.1.mlp.experts.3.down_proj", "mtp.layers.0.mlp.shared_expert", "x\ny", ""]


@pytest.mark.parametrize("pattern", REAL)
def test_real_config_patterns(pattern):
    ours, theirs = Regex(pattern), re.compile(pattern)
    for name in NAMES:
        assert ours.match(name) == (theirs.match(name) is not None)
        assert ours.fullmatch(name) == (theirs.fullmatch(name) is not None)


# ------------------------------------------------------------------------- refused, clearly


@pytest.mark.parametrize("pattern,words", [
    (r"(a)\1", "back-references"), (r"(?=a)b", "look-arounds"), (r"(?<!a)b", "look-arounds"),
    (r"(?i)a", "case-insensitive"), (r"(?>a*)a", "atomic groups"), (r"a*+", "possessive"),
    (r"a{99999999999}", "invalid"), ("(" * 600 + ")" * 600, "nested too deeply"), ("a" * 2001, "longer than"),
    (r"(?:a{100}){100}b{100}" * 3, "states"), (r"(?P<x>a)(?(x)b|c)", "conditional"), ("[", "invalid"),
])
def test_unsupported_constructs_are_refused(pattern, words):
    with pytest.raises(Unsupported, match=words):
        Regex(pattern)
    assert MAX_STATES < 100 * 100 * 3


# ------------------------------------------------------------------------- linear time


def test_catastrophic_patterns_finish(tmp_path):
    """Patterns and names on which Python's re would run for hours; a generous subprocess timeout
    is only a hang guard (this takes well under a second)."""
    code = (
        "from gptq2xpu.read.regex import Regex\n"
        "cases = [(r'(a|a)*b', 'a' * 5000), (r'(a+)+b', 'a' * 5000), (r'.*.*.*.*.*.*.*.*.*.*=', 'x' * 5000),\n"
        "         (r'(x+x+)+y', 'x' * 5000), (r'(\\w*)*\\.', 'w' * 5000), (r'^(a|ab)*c$', 'ab' * 2500)]\n"
        "assert not any(Regex(p).match(t) or Regex(p).fullmatch(t) for p, t in cases)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------- bounded memory


def _dfa_weight(regex: Regex) -> int:
    return sum(len(chars) + 1 for chars, _ in regex._dfa) + len(regex._cache)


def test_dfa_memory_stays_bounded_by_the_pattern_size():
    """``.*a.{9}`` has a DFA of 2**10 states; matching many names must not keep them all."""
    regex, theirs = Regex(r".*a.{9}b"), re.compile(r".*a.{9}b")
    limit = 64 * (len(regex._states) + 16)
    for n in range(3000):
        text = format(n * 2654435761 % (1 << 24), "024b").replace("0", "a").replace("1", "c")
        assert regex.match(text) == (theirs.match(text) is not None)
        assert _dfa_weight(regex) <= limit


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(), st.lists(st.text(alphabet="ab.1_ \n", max_size=12), min_size=1, max_size=8))
def test_agrees_with_python_re_while_dropping_tables(pattern, texts):
    """With the smallest table limit the DFA is dropped mid-match all the time: same answers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(regex_module, "DFA_WEIGHT_PER_STATE", 1)
        ours, theirs = Regex(pattern), re.compile(pattern)
        for text in texts * 2:
            assert ours.match(text) == (theirs.match(text) is not None), (pattern, text)
            assert ours.fullmatch(text) == (theirs.fullmatch(text) is not None), (pattern, text)


def test_patterns_sharing_a_budget_are_bounded_together():
    budget = Budget(60)
    Regex("a{40}", budget)
    with pytest.raises(Unsupported, match="together"):
        Regex("b{40}", budget)
    Regex("b{40}")  # alone it is fine
