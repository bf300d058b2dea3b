"""Regular expressions from untrusted configs, matched in linear time by RE2.

Quantization configs carry patterns (GPTQModel ``dynamic`` rules, AutoRound ``extra_config``
keys, compressed-tensors ``re:`` ignores) written in Python ``re`` syntax (vLLM and GPTQModel
match them with ``re``).  Python's ``re`` backtracks, so ``(a|a)*b`` would hang a conversion on a
long name; RE2 (``google-re2``) never backtracks: matching costs at most (program size) x (name
length) and its memory is capped.  A pattern is accepted only where both engines give it the same
meaning: it must compile in Python ``re`` (warnings included) and in RE2, and the few constructs
both accept but read differently are refused here, each with a message that says which:

* ``{,n}`` (a repeat in Python, literal text in RE2) and the ``i``/``m`` flags (case folding and
  line anchors differ in detail);
* ``\\d \\w \\s \\b`` (and negations) and ``$`` mean the same in both on printable ASCII only
  (Python's are Unicode-aware, and its ``$`` also matches before a final newline): a name outside
  printable ASCII is refused when matched by such a pattern, never answered differently; and
  ``\\B`` never matches an empty string in Python (before 3.14) but does in RE2: an empty name
  matched by a pattern using it is refused.

``\\Z`` (end of text) is passed to RE2 as ``\\z``, its spelling there.
"""

from __future__ import annotations

import re
import warnings

import re2

#: Largest pattern accepted, in characters.
MAX_PATTERN_LEN = 2000
#: RE2 program size (instructions) of all the patterns of one :class:`Budget` together.
MAX_PROGRAM = 100_000
#: Memory RE2 may use for one pattern (program and matching caches); past it RE2 still answers,
#: without a cache.
MAX_MEM_PER_PATTERN = 1 << 21

_ASCII_SENSITIVE = frozenset("dDwWsSbB")


class Unsupported(ValueError):
    """The pattern uses a construct that is not matched here (message says which)."""


class Budget:
    """RE2 program size shared by patterns that are matched together, such as the rules of one
    config: matching a name against every rule costs up to their total size x the name length."""

    def __init__(self, size: int = MAX_PROGRAM):
        self.size = size
        self.left = size

    def take(self, n: int) -> None:
        if n > self.left:
            raise Unsupported(f"patterns together compile to more than {self.size} RE2 instructions "
                              "(large bounded repeats or too many rules)")
        self.left -= n


class Regex:
    """A compiled pattern: :meth:`match` is ``re.match`` (anchored at the start, any prefix may
    match) and :meth:`fullmatch` is ``re.fullmatch``, both returning a bool."""

    def __init__(self, pattern: str, budget: Budget | None = None):
        if len(pattern) > MAX_PATTERN_LEN:
            raise Unsupported(f"pattern is longer than {MAX_PATTERN_LEN} characters")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. FutureWarning "possible nested set": [[:alpha:]]
                re.compile(pattern)
        except (re.error, OverflowError, FutureWarning, DeprecationWarning) as exc:
            raise Unsupported(f"invalid regular expression: {exc}") from None
        except RecursionError:
            raise Unsupported("invalid regular expression: nested too deeply") from None
        translated, self._ascii_only, self._nonboundary = _scan(pattern)
        options = re2.Options()
        options.max_mem = MAX_MEM_PER_PATTERN
        options.log_errors = False
        try:
            self._re2 = re2.compile(translated, options)
        except re2.error as exc:
            reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise Unsupported(f"not supported by the linear-time engine RE2 ({reason}): back-references, "
                              "look-arounds, atomic groups, possessive repeats, conditionals, comments, "
                              "the x/a/u flags and repeats past {1000} need backtracking or are not "
                              "matched here") from None
        (budget or Budget()).take(self._re2.programsize)

    def _text(self, text: str) -> str:
        if text and text.isascii() and text.isprintable():
            return text
        if not text and self._nonboundary:
            raise Unsupported("cannot match an empty name: the pattern uses \\B, which RE2 and Python re "
                              "read differently there")
        if self._ascii_only:
            raise Unsupported(f"cannot match the name {ascii(text)[:120]}: the pattern uses \\d, \\w, \\s, \\b "
                              "or $, which RE2 and Python re read differently outside printable ASCII")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Unsupported(f"cannot match the name {ascii(text)[:120]}: it is not valid Unicode") from None
        return text

    def match(self, text: str) -> bool:
        return self._re2.match(self._text(text)) is not None

    def fullmatch(self, text: str) -> bool:
        return self._re2.fullmatch(self._text(text)) is not None


def _scan(pattern: str) -> tuple[str, bool, bool]:
    """Walk a pattern Python ``re`` has accepted: refuse what RE2 would read differently, spell
    ``\\Z`` as RE2 does, and say whether the pattern uses a construct that is ASCII-only in RE2
    and whether it uses ``\\B``."""
    out: list[str] = []
    ascii_only = nonboundary = False
    i, n, in_class, class_start = 0, len(pattern), False, False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            ascii_only |= e in _ASCII_SENSITIVE
            nonboundary |= e == "B" and not in_class
            out.append("\\z" if e == "Z" and not in_class else c + e)
            i += 2
            continue
        if in_class:
            if c == "]" and not class_start:
                in_class = False
            class_start = False
        elif c == "[":
            in_class, class_start = True, True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            continue
        elif c == "$":
            ascii_only = True
        elif c == "{" and pattern.startswith(",", i + 1):
            raise Unsupported("'{,n}' is a repeat in Python re but text in RE2: write '{0,n}'")
        elif c == "(" and pattern.startswith("?", i + 1):
            flags = re.match(r"\(\?([a-zA-Z-]+)[:)]", pattern[i:])
            if flags and set(flags.group(1)) & set("im"):
                raise Unsupported(f"the flags in {flags.group(0)!r} are not supported (only (?s) is): "
                                  "case-insensitive and multi-line matching differ between RE2 and Python re")
        out.append(c)
        i += 1
    return "".join(out), ascii_only, nonboundary
