"""OSC address-pattern matching in time linear in the pattern times the address.

Why not a regex: a pattern comes from the network, and the obvious translation (``*`` to
``[^/]*``) backtracks: ``/dd/`` followed by 32 ``*`` took Python's ``re`` exponential
time while holding the interpreter lock, freezing the generation thread with it. Here a
pattern is compiled into tokens once, and matched by simulating the automaton: the set
of pattern positions reachable after each character of the address, so each (pattern
position, address character) pair is visited at most once. `Steps` counts those visits,
so a test can hold the matcher to that bound instead of to a stopwatch.

Semantics (OSC 1.0, with OSC 1.1's path traversal):

- ``?`` one character, ``*`` any run of characters; neither crosses ``/``.
- ``[abc]``, ``[a-z]`` a character class, ``[!a-z]`` its complement; ``-`` first or last
  is a literal minus, ``!`` anywhere but first a literal ``!``. A reversed range
  (``[9-1]``) is an error, not an empty class: it is almost always a typo.
- ``{foo,bar}`` one of the literal strings (an empty one allowed: ``{,s}``); pattern
  characters and ``/`` inside braces are an error.
- ``//`` (OSC 1.1) any number of levels, zero included: ``/dd//weight`` matches
  ``/dd/prompt/3/weight``. A trailing ``/`` is ignored, as for plain addresses.
- Case-sensitive, as OSC is.

Bounds: at most `MAX_PATTERN` characters, `MAX_LEVELS` levels and `MAX_ALTERNATIVES`
brace alternatives; beyond them `PatternError` says which bound. With them, matching a
pattern against the whole registry stays far below a millisecond of CPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

MAX_PATTERN = 256  # characters; the longest dreamdeck address is under 30
MAX_LEVELS = 8  # '/'-separated levels; dreamdeck's deepest address has 4
MAX_ALTERNATIVES = 16  # '{a,b,...}' alternatives in one pattern, all groups together
SPECIAL = frozenset("*?[]{}")


class PatternError(ValueError):
    """A malformed or too costly address pattern; ``reason`` says what and where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Tokens of one level: ("c", char) literal, ("?",), ("*",), ("[", negated, ranges),
# ("{", alternatives). Ranges are (low, high) code point pairs.
Token = tuple


@dataclass(frozen=True)
class Level:
    """One '/'-separated level of a pattern, compiled."""

    text: str
    tokens: tuple[Token, ...]
    min_len: int  # fewest characters a match can have
    max_len: int | None  # most (None: a '*' makes it unbounded)
    literal: str | None  # the text itself when it has no pattern characters


DEEP = None  # a level that is OSC 1.1's '//': any number of levels


@dataclass(frozen=True)
class Pattern:
    text: str
    levels: tuple[Level | None, ...]  # None: DEEP

    @property
    def deep(self) -> bool:
        return DEEP in self.levels


@dataclass
class Steps:
    """Counts the matcher's work: one step per (pattern token, address position) visited
    and per character compared inside braces."""

    n: int = 0


@dataclass
class _Memo:
    """Level results by (level index, name): a registry repeats names (prompt/1..8/weight),
    so each distinct name is matched once per level of the pattern."""

    seen: dict[tuple[int, str], bool] = field(default_factory=dict)


def has_pattern(address: str) -> bool:
    """Whether an address uses pattern characters (or OSC 1.1's ``//``)."""
    return not SPECIAL.isdisjoint(address) or "//" in address.rstrip("/")


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Pattern:
    """Parse and check a pattern once (cached: controllers repeat the same few)."""
    if not isinstance(pattern, str):
        raise PatternError("an address pattern must be a string")
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"address pattern of {len(pattern)} characters, more than {MAX_PATTERN}")
    if not pattern.startswith("/"):
        raise PatternError("an address pattern starts with '/'")
    body = pattern.rstrip("/")
    raw = body[1:].split("/") if body else []
    if len(raw) > MAX_LEVELS:
        raise PatternError(f"address pattern of {len(raw)} levels, more than {MAX_LEVELS}")
    levels: list[Level | None] = []
    alternatives = 0
    for text in raw:
        if text == "":
            if levels and levels[-1] is DEEP:
                continue  # '///' is '//'
            levels.append(DEEP)
            continue
        level, n_alt = _compile_level(text)
        alternatives += n_alt
        if alternatives > MAX_ALTERNATIVES:
            raise PatternError(
                f"more than {MAX_ALTERNATIVES} '{{...}}' alternatives in the address pattern"
            )
        levels.append(level)
    return Pattern(pattern, tuple(levels))


def _compile_level(text: str) -> tuple[Level, int]:
    tokens: list[Token] = []
    i, n, alternatives = 0, len(text), 0
    while i < n:
        c = text[i]
        if c == "*":
            if not tokens or tokens[-1][0] != "*":  # '**' is '*'
                tokens.append(("*",))
        elif c == "?":
            tokens.append(("?",))
        elif c == "[":
            j = text.find("]", i + 1)
            if j < 0:
                raise PatternError(f"unclosed '[' in {text[:64]!r}")
            tokens.append(_char_class(text[i + 1 : j]))
            i = j
        elif c == "{":
            j = text.find("}", i + 1)
            if j < 0:
                raise PatternError(f"unclosed '{{' in {text[:64]!r}")
            inner = text[i + 1 : j]
            if not SPECIAL.isdisjoint(inner):
                raise PatternError(
                    f"pattern characters inside '{{{inner[:32]}}}': alternatives are plain text"
                )
            alts = tuple(dict.fromkeys(inner.split(",")))  # duplicates add nothing
            alternatives += len(alts)
            if len(alts) == 1:  # '{abc}' is 'abc', '{}' nothing
                tokens.extend(("c", ch) for ch in alts[0])
            elif alts != ("",):
                tokens.append(("{", alts))
            i = j
        elif c in "]}":
            raise PatternError(f"unmatched {c!r} in {text[:64]!r}")
        else:
            tokens.append(("c", c))
        i += 1
    lo, hi = 0, 0
    for t in tokens:
        if t[0] == "*":
            hi = None
        elif t[0] == "{":
            lo += min(len(a) for a in t[1])
            hi = None if hi is None else hi + max(len(a) for a in t[1])
        else:
            lo += 1
            hi = None if hi is None else hi + 1
    literal = "".join(t[1] for t in tokens) if all(t[0] == "c" for t in tokens) else None
    return Level(text, tuple(tokens), lo, hi, literal), alternatives


def _char_class(body: str) -> Token:
    neg = body.startswith("!")
    if neg:
        body = body[1:]
    if not body:
        raise PatternError("empty '[]' in the address pattern")
    ranges: list[tuple[int, int]] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            a, b = body[k], body[k + 2]
            if ord(a) > ord(b):
                raise PatternError(f"reversed range '{a}-{b}' in '[{body[:32]}]': write {b}-{a}")
            ranges.append((ord(a), ord(b)))
            k += 3
        else:
            ranges.append((ord(body[k]), ord(body[k])))
            k += 1
    return ("[", neg, tuple(ranges))


def match_level(level: Level, name: str, steps: Steps | None = None) -> bool:
    """Whether one level of a pattern matches one level of an address (no '/' in it).

    reach[j] is the bit set of token indices reachable after j characters; tokens are
    visited in order so a '*' (or an empty alternative) can pass on to the next token at
    the same position. Work: at most (tokens + brace characters + 1) per position.
    """
    if level.literal is not None:
        if steps is not None:
            steps.n += 1
        return level.literal == name
    n = len(name)
    if n < level.min_len or (level.max_len is not None and n > level.max_len):
        if steps is not None:
            steps.n += 1
        return False
    tokens = level.tokens
    t = len(tokens)
    reach = [0] * (n + 1)
    reach[0] = 1
    work = 0
    for j in range(n + 1):
        cur = todo = reach[j]
        if not cur:
            continue
        ch = name[j] if j < n else ""
        while todo:  # the reachable tokens, lowest first; only later ones get added
            low = todo & -todo
            todo ^= low
            i = low.bit_length() - 1
            if i == t:
                continue  # the end: nothing to consume
            work += 1
            tok = tokens[i]
            kind = tok[0]
            if kind == "*":
                cur |= low << 1  # zero characters
                todo |= low << 1
                if j < n:
                    reach[j + 1] |= low  # one more, staying on the '*'
            elif kind == "{":
                for alt in tok[1]:
                    work += len(alt) + 1
                    if not alt:
                        cur |= low << 1
                        todo |= low << 1
                    elif name.startswith(alt, j):
                        reach[j + len(alt)] |= low << 1
            elif j < n:
                if kind == "c":
                    ok = ch == tok[1]
                elif kind == "?":
                    ok = True
                else:  # "["
                    o = ord(ch)
                    work += len(tok[2])
                    ok = any(a <= o <= b for a, b in tok[2]) != tok[1]
                if ok:
                    reach[j + 1] |= low << 1
        reach[j] = cur
    if steps is not None:
        steps.n += work + 1
    return bool((reach[n] >> t) & 1)


def _match_levels(
    pattern: Pattern, parts: list[str], steps: Steps | None, memo: _Memo | None
) -> bool:
    """Levels of a pattern against the levels of an address: the same reachability, one
    level up (DEEP consumes any number of address levels)."""
    levels = pattern.levels
    m, n = len(levels), len(parts)
    if not pattern.deep:  # level by level, the common case
        if steps is not None:
            steps.n += 1
        if m != n:
            return False
        for i in range(m):
            key = (i, parts[i])
            hit = memo.seen.get(key) if memo is not None else None
            if hit is None:
                hit = match_level(levels[i], parts[i], steps)  # type: ignore[arg-type]
                if memo is not None:
                    memo.seen[key] = hit
            if not hit:
                return False
        return True
    reach = [False] * (n + 1)  # before pattern level i, address levels consumed j
    reach[0] = True
    for i in range(m):
        level = levels[i]
        nxt = [False] * (n + 1)
        if level is DEEP:
            on = False
            for j in range(n + 1):
                on = on or reach[j]
                nxt[j] = on
        else:
            for j in range(n):
                if not reach[j]:
                    continue
                key = (i, parts[j])
                hit = memo.seen.get(key) if memo is not None else None
                if hit is None:
                    hit = match_level(level, parts[j], steps)
                    if memo is not None:
                        memo.seen[key] = hit
                nxt[j + 1] = hit
        if steps is not None:
            steps.n += n + 1
        reach = nxt
    return reach[n]


def matches(pattern: str | Pattern, address: str, steps: Steps | None = None) -> bool:
    """Whether an OSC address pattern matches one address. Raises PatternError."""
    pat = pattern if isinstance(pattern, Pattern) else compile_pattern(pattern)
    body = address.rstrip("/")
    return _match_levels(pat, body[1:].split("/") if body else [], steps, None)


def filter_addresses(
    pattern: str | Pattern, addresses: Iterable[str], steps: Steps | None = None
) -> list[str]:
    """The addresses a pattern matches, in their order; each distinct level name is
    matched once per pattern level."""
    pat = pattern if isinstance(pattern, Pattern) else compile_pattern(pattern)
    memo = _Memo()
    out = []
    for a in addresses:
        body = a.rstrip("/")
        if _match_levels(pat, body[1:].split("/") if body else [], steps, memo):
            out.append(a)
    return out
