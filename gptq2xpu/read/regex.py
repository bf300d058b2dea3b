"""Regular expressions from untrusted configs, matched in linear time.

Quantization configs carry patterns (GPTQModel ``dynamic`` rules, AutoRound ``extra_config``
keys, compressed-tensors ``re:`` ignores) that gptq2xpu matches against every module name.
Python's ``re`` backtracks: ``(a|a)*b``, ``(.*)*x`` or ``.*.*.*.*=`` take exponential or high
polynomial time on a name that does not match, so a config could hang a conversion.  Here the
pattern is parsed by Python's own parser (same syntax, same meaning) and run as a Thompson NFA:
every step advances a set of states, so matching costs at most (pattern size) x (name length),
whatever the pattern.

Supported: literals, ``.``, classes (``[a-z]``, ``[^...]``, ``\\d \\w \\s`` and negations),
alternation, groups (capturing or not: captures are not reported), greedy and lazy repeats
(``* + ? {m,n}``), anchors ``^ $ \\A \\Z \\b \\B``, and the flags ``(?s)``, ``(?x)``, ``(?a)``.
Refused with a clear error: back-references, look-arounds, atomic groups and possessive repeats
(whose meaning needs backtracking), case-insensitive and multi-line flags, conditionals.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:  # Python >= 3.11
        from re import _constants as C  # noqa: N812
        from re import _parser as _sre_parse
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as C  # noqa: N812
        import sre_parse as _sre_parse

import re

#: Largest pattern accepted, in characters and in NFA states (bounded repeats are unrolled).
#: MAX_STATES also bounds the patterns of one :class:`Budget` together.
MAX_PATTERN_LEN = 2000
MAX_STATES = 20_000
#: Memory of the lazily built DFA of a pattern, in NFA-state references per NFA state of the pattern.
DFA_WEIGHT_PER_STATE = 32

_ALLOWED_FLAGS = re.UNICODE | re.VERBOSE | re.DOTALL | re.ASCII


class Unsupported(ValueError):
    """The pattern uses a construct this matcher does not run (message says which)."""


class Budget:
    """NFA states shared by patterns that are matched together, such as the rules of one config.

    Matching a name against every rule costs up to (states of all rules) x (name length), and
    each rule's DFA memory grows with its state count, so it is the total over the rules that
    must be bounded, not each pattern alone."""

    def __init__(self, states: int = MAX_STATES):
        self.states = states
        self.left = states

    def take(self) -> None:
        if self.left <= 0:
            raise Unsupported(f"patterns together expand to more than {self.states} states "
                              "(large bounded repeats or too many rules)")
        self.left -= 1


# --------------------------------------------------------------------------------- the NFA


@dataclass
class _State:
    kind: str                 # "char" | "split" | "assert" | "match"
    test: object = None       # char: a predicate on one character; assert: one on (text, pos)
    out: int | None = None
    out2: int | None = None


class Regex:
    """A compiled pattern: :meth:`match` is ``re.match`` (anchored at the start, any prefix may
    match) and :meth:`fullmatch` is ``re.fullmatch``, both returning a bool."""

    def __init__(self, pattern: str, budget: Budget | None = None):
        if len(pattern) > MAX_PATTERN_LEN:
            raise Unsupported(f"pattern longer than {MAX_PATTERN_LEN} characters")
        try:
            tree = _sre_parse.parse(pattern)
        except (re.error, OverflowError, ValueError) as exc:
            raise Unsupported(f"invalid regular expression ({exc})") from None
        except RecursionError:
            raise Unsupported("regular expression nested too deeply") from None
        flags = tree.state.flags
        if flags & ~_ALLOWED_FLAGS:
            raise Unsupported("case-insensitive, multi-line and locale flags are not supported")
        self.pattern = pattern
        self._dotall = bool(flags & re.DOTALL)
        self._ascii = bool(flags & re.ASCII)
        self._asserts = False
        self._states: list[_State] = []
        self._word = self._category(C.CATEGORY_WORD)
        self._budget = budget or Budget()
        self._dfa: list[tuple[frozenset, bool]] = []
        self._dfa_ids: dict[tuple[frozenset, bool], int] = {}
        self._cache: dict = {}
        self._weight = 0
        self._generation = 0
        try:
            start, ends = self._build(list(tree))
        except RecursionError:
            raise Unsupported("regular expression nested too deeply") from None
        accept = self._add(_State("match"))
        self._patch(ends, accept)
        self._start = start
        self._weight_limit = DFA_WEIGHT_PER_STATE * (len(self._states) + 16)

    # ------------------------------------------------------------------ construction
    def _add(self, state: _State) -> int:
        if len(self._states) >= MAX_STATES:
            raise Unsupported(f"pattern expands to more than {MAX_STATES} states (large bounded repeats)")
        self._budget.take()
        self._states.append(state)
        return len(self._states) - 1

    def _patch(self, ends: list[tuple[int, str]], target: int) -> None:
        for index, slot in ends:
            setattr(self._states[index], slot, target)

    def _build(self, items: list) -> tuple[int, list[tuple[int, str]]]:
        """A fragment for a sequence: (start state, dangling exits to patch)."""
        if not items:
            s = self._add(_State("split"))  # an epsilon
            return s, [(s, "out")]
        start, ends = self._item(*items[0])
        for op, av in items[1:]:
            s2, e2 = self._item(op, av)
            self._patch(ends, s2)
            ends = e2
        return start, ends

    def _item(self, op, av):
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN, C.CATEGORY):
            s = self._add(_State("char", self._char_test(op, av)))
            return s, [(s, "out")]
        if op is C.AT:
            s = self._add(_State("assert", self._at_test(av)))
            return s, [(s, "out")]
        if op is C.SUBPATTERN:
            group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise Unsupported("inline flags inside a group are not supported")
            return self._build(list(sub))
        if op is C.BRANCH:
            first = prev = None
            ends = []
            alternatives = av[1]
            for i, alt in enumerate(alternatives):
                s, e = self._build(list(alt))
                ends += e
                node = s if i == len(alternatives) - 1 else self._add(_State("split", out=s))
                if prev is None:
                    first = node
                else:
                    self._states[prev].out2 = node
                prev = node
            return first, ends
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            return self._repeat(lo, hi, list(sub))
        names = {C.GROUPREF: "back-references", C.ASSERT: "look-arounds", C.ASSERT_NOT: "look-arounds",
                 C.GROUPREF_EXISTS: "conditional groups"}
        extra = {getattr(C, "ATOMIC_GROUP", None): "atomic groups", getattr(C, "POSSESSIVE_REPEAT", None):
                 "possessive repeats"}
        what = names.get(op) or extra.get(op) or str(op)
        raise Unsupported(f"{what} are not supported")

    def _repeat(self, lo: int, hi, sub: list):
        unbounded = hi is C.MAXREPEAT or hi == C.MAXREPEAT
        # lo mandatory copies, then (hi - lo) optional ones or one star
        start = None
        ends: list[tuple[int, str]] = []
        for _ in range(lo):
            s, e = self._build(sub)
            if start is None:
                start = s
            else:
                self._patch(ends, s)
            ends = e
        if unbounded:
            split = self._add(_State("split"))
            s, e = self._build(sub)
            self._states[split].out = s
            self._patch(e, split)
            if start is None:
                start = split
            else:
                self._patch(ends, split)
            return start, [(split, "out2")]
        optional_ends: list[tuple[int, str]] = []
        for _ in range(hi - lo):
            split = self._add(_State("split"))
            s, e = self._build(sub)
            self._states[split].out = s
            if start is None:
                start = split
            else:
                self._patch(ends, split)
            optional_ends.append((split, "out2"))
            ends = e
        if start is None:  # {0,0}
            s = self._add(_State("split"))
            return s, [(s, "out")]
        return start, ends + optional_ends

    # ------------------------------------------------------------------ predicates
    def _category(self, cat):
        ascii_only = self._ascii
        if cat in (C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT):
            base = (lambda ch: "0" <= ch <= "9") if ascii_only else str.isdecimal
        elif cat in (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD):
            base = (lambda ch: ch.isascii() and (ch.isalnum() or ch == "_")) if ascii_only else \
                (lambda ch: ch.isalnum() or ch == "_")
        elif cat in (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE):
            base = (lambda ch: ch in " \t\n\r\f\v") if ascii_only else str.isspace
        else:
            raise Unsupported(f"character category {cat} is not supported")
        negated = cat in (C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_WORD, C.CATEGORY_NOT_SPACE)
        return (lambda ch: not base(ch)) if negated else base

    def _char_test(self, op, av):
        if op is C.LITERAL:
            want = chr(av)
            return lambda ch: ch == want
        if op is C.NOT_LITERAL:
            avoid = chr(av)
            return lambda ch: ch != avoid
        if op is C.ANY:
            return (lambda _ch: True) if self._dotall else (lambda ch: ch != "\n")
        if op is C.CATEGORY:
            return self._category(av)
        # IN: a class
        negate = False
        chars: set[str] = set()
        ranges: list[tuple[int, int]] = []
        tests = []
        for iop, iav in av:
            if iop is C.NEGATE:
                negate = True
            elif iop is C.LITERAL:
                chars.add(chr(iav))
            elif iop is C.RANGE:
                ranges.append(iav)
            elif iop is C.CATEGORY:
                tests.append(self._category(iav))
            else:
                raise Unsupported(f"character class item {iop} is not supported")

        def test(ch: str) -> bool:
            hit = ch in chars or any(lo <= ord(ch) <= hi for lo, hi in ranges) or any(t(ch) for t in tests)
            return hit != negate

        return test

    def _at_test(self, where):
        """A predicate on the context of a position: (at start, at end, before a final newline,
        word character before, word character after)."""
        self._asserts = True
        if where in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return lambda ctx: ctx[0]
        if where is C.AT_END:
            return lambda ctx: ctx[1] or ctx[2]
        if where is C.AT_END_STRING:
            return lambda ctx: ctx[1]
        if where is C.AT_BOUNDARY:
            return lambda ctx: ctx[3] != ctx[4]
        if where is C.AT_NON_BOUNDARY:
            return lambda ctx: ctx[3] == ctx[4]
        raise Unsupported(f"anchor {where} is not supported")

    # ------------------------------------------------------------------ running
    # The NFA is run as a lazily built DFA: a set of NFA states is one DFA state, and each
    # (DFA state, character, position context) transition is computed once and cached, so a
    # step costs a dictionary lookup.  Without the cache the cost is still linear.  One DFA state
    # holds up to every NFA state, so the tables are weighed (NFA-state references plus cache
    # entries) and dropped whenever they outgrow a limit proportional to the pattern: memory stays
    # bounded by the pattern's size, and a dropped table only costs recomputation.

    def _context(self, text: str, pos: int):
        if not self._asserts:
            return None
        n = len(text)
        word = self._word
        return (pos == 0, pos == n, pos == n - 1 and text[pos] == "\n",
                pos > 0 and word(text[pos - 1]), pos < n and word(text[pos]))

    def _closure(self, seeds, ctx) -> int:
        """The DFA state (an id) of the NFA states reachable from ``seeds`` without consuming."""
        seen: set[int] = set()
        stack = list(seeds)
        chars = []
        accepted = False
        states = self._states
        while stack:
            i = stack.pop()
            if i is None or i in seen:
                continue
            seen.add(i)
            st = states[i]
            if st.kind == "char":
                chars.append(i)
            elif st.kind == "split":
                stack.append(st.out)
                stack.append(st.out2)
            elif st.kind == "assert":
                if st.test(ctx):
                    stack.append(st.out)
            else:
                accepted = True
        return self._intern((frozenset(chars), accepted))

    def _intern(self, key: tuple[frozenset, bool]) -> int:
        """The id of a DFA state, dropping all tables first if adding it would pass the limit."""
        dfa = self._dfa_ids.get(key)
        if dfa is None:
            if self._weight + len(key[0]) + 1 > self._weight_limit:
                self._forget()
            self._weight += len(key[0]) + 1
            dfa = self._dfa_ids[key] = len(self._dfa)
            self._dfa.append(key)
        return dfa

    def _remember(self, key: tuple, nxt: int) -> int:
        """Cache a transition; when the tables are full, drop them and keep only its target."""
        if self._weight >= self._weight_limit:
            target = self._dfa[nxt]
            self._forget()
            return self._intern(target)
        self._cache[key] = nxt
        self._weight += 1
        return nxt

    def _forget(self) -> None:
        """Drop the DFA and its transitions; ids handed out before are void (see ``_generation``)."""
        self._dfa.clear()
        self._dfa_ids.clear()
        self._cache.clear()
        self._weight = 0
        self._generation += 1

    def _run(self, text: str, full: bool) -> bool:
        cache, dfa, states = self._cache, self._dfa, self._states
        cur = self._closure([self._start], self._context(text, 0))
        for pos, ch in enumerate(text):
            chars, accepted = dfa[cur]
            if accepted and not full:
                return True
            if not chars:
                return False
            ctx = self._context(text, pos + 1)
            key = (cur, ch, ctx)
            nxt = cache.get(key)
            if nxt is None:
                generation = self._generation
                nxt = self._closure([states[i].out for i in chars if states[i].test(ch)], ctx)
                if generation == self._generation:  # else ``cur`` in ``key`` names a dropped state
                    nxt = self._remember(key, nxt)
            cur = nxt
        return dfa[cur][1]

    def match(self, text: str) -> bool:
        return self._run(text, full=False)

    def fullmatch(self, text: str) -> bool:
        return self._run(text, full=True)
