"""Query semantics shared by every catalog: folder normalisation and `fnmatch` globs.

`FileQuery.filename_glob` has Python's `fnmatch.fnmatchcase` semantics (case-sensitive on every OS;
`*` and `?` match any character, `[seq]`/`[!seq]` are sets). Each backend wants that pushed down to
its own engine (SQLite `GLOB`, a MongoDB regular expression) so that a `limit` can be applied by the
engine and nothing is loaded just to be thrown away. The two engines differ from `fnmatch` in the
corners (SQLite negates with `^`, `fnmatch` with `!`; `fnmatch` silently drops reversed ranges), so
`Glob` translates only the unambiguous subset and says `exact=False` for the rest: the backend then
filters in Python while it streams the experiment's rows. Both backends also re-check every row with
`Glob.matches`, the reference implementation.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass


def folder(path: str) -> str:
    """The canonical form of a logical folder, as documents store it: "/models/checkpoints" or "/"."""
    return "/" + path.strip("/")


# Tokens: ("*",), ("?",), ("lit", char), ("set", negated, ((lo, hi), ...)).
_Token = tuple

_SET_SPECIAL = frozenset("]^-")


def _parse_set(content: str) -> tuple[bool, tuple[tuple[str, str], ...]] | None:
    """Items of a `[...]` body in the simple subset, or None (then only Python may decide)."""
    negated = content.startswith("!")
    body = content[1:] if negated else content
    items: list[tuple[str, str]] = []
    k = 0
    while k < len(body):
        char = body[k]
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = char, body[k + 2]
            if lo > hi or lo in _SET_SPECIAL or hi in _SET_SPECIAL:
                return None  # fnmatch drops reversed ranges; engines disagree
            items.append((lo, hi))
            k += 3
            continue
        if char in _SET_SPECIAL:
            return None  # a literal ']', '^' or '-' in a set: positional rules differ per engine
        items.append((char, char))
        k += 1
    if not items:
        return None
    return negated, tuple(items)


def _tokenize(pattern: str) -> list[_Token] | None:
    """Mirror of CPython's fnmatch.translate parsing, restricted to the simple subset."""
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if not tokens or tokens[-1] != ("*",):
                tokens.append(("*",))
        elif char == "?":
            tokens.append(("?",))
        elif char == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                tokens.append(("lit", "["))  # unterminated: a literal '[' (as fnmatch does)
                continue
            parsed = _parse_set(pattern[i:j])
            if parsed is None:
                return None
            tokens.append(("set", *parsed))
            i = j + 1
        else:
            tokens.append(("lit", char))
    return tokens


def _sqlite_glob(tokens: list[_Token]) -> str:
    out = []
    for token in tokens:
        if token[0] == "*":
            out.append("*")
        elif token[0] == "?":
            out.append("?")
        elif token[0] == "lit":
            out.append(f"[{token[1]}]" if token[1] in "*?[" else token[1])
        else:
            _, negated, items = token
            body = "".join(lo if lo == hi else f"{lo}-{hi}" for lo, hi in items)
            out.append(f"[{'^' if negated else ''}{body}]")
    return "".join(out)


def _set_char(char: str) -> str:
    return "\\" + char if char in "\\]^-[" else char


def _regex(tokens: list[_Token]) -> str:
    """A regex in the syntax Python `re` and PCRE (MongoDB) read the same way.

    Anchored with ^…$: filenames never contain a newline (names.py rejects control characters), so
    `$` cannot stop before a trailing newline.
    """
    out = ["^"]
    for token in tokens:
        if token[0] == "*":
            out.append(".*")
        elif token[0] == "?":
            out.append(".")
        elif token[0] == "lit":
            out.append(re.escape(token[1]))
        else:
            _, negated, items = token
            body = "".join(_set_char(lo) if lo == hi else f"{_set_char(lo)}-{_set_char(hi)}" for lo, hi in items)
            out.append(f"[{'^' if negated else ''}{body}]")
    out.append("$")
    return "".join(out)


@dataclass(frozen=True)
class Glob:
    """One `fnmatch` pattern, with its engine translations when they are exact."""

    pattern: str
    sqlite_glob: str | None   # for `filename GLOB ?`, or None: filter in Python
    regex: str | None         # for MongoDB `$regex`, or None: filter in Python
    _compiled: re.Pattern[str]

    @classmethod
    def parse(cls, pattern: str) -> Glob:
        with warnings.catch_warnings():
            # fnmatch emits patterns such as "[[:" that `re` flags as possible nested sets
            warnings.simplefilter("ignore", FutureWarning)
            compiled = re.compile(fnmatch.translate(pattern))
        tokens = _tokenize(pattern)
        if tokens is None:
            return cls(pattern, None, None, compiled)
        return cls(pattern, _sqlite_glob(tokens), _regex(tokens), compiled)

    @property
    def exact(self) -> bool:
        return self.sqlite_glob is not None

    def matches(self, name: str) -> bool:
        """The reference semantics: `fnmatch.fnmatchcase(name, pattern)`."""
        return self._compiled.match(name) is not None
