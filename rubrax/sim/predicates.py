"""The predicate language in which the simulated world states requirements and the
simulated proposer writes criteria.

Five predicates over a response (a whitespace-separated word sequence):

    contains(w)          w occurs at least once
    absent(w)            w does not occur
    count(w, lo, hi)     lo <= #occurrences of w <= hi
    order(a, b)          a occurs, b occurs, and the first a comes before the last b
    length(lo, hi)       lo <= number of words <= hi
    max_repeat(hi)       no word occurs more than hi times

Each predicate has one canonical English text (``Predicate.text``) and
``parse_predicate`` reads it back, so a criterion travels as plain text through
the shared rubric code (JSONL files, RTD lineage, reports) exactly as an LLM
criterion would, and the simulated verifier decides it by parsing that text.
Text it cannot parse gets the verdict "unknown", as an LLM verifier's failure would.

Host side only: no jax.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

Kind = Literal["contains", "absent", "count", "order", "length", "max_repeat"]
KINDS: tuple[str, ...] = ("contains", "absent", "count", "order", "length", "max_repeat")


@dataclasses.dataclass(frozen=True)
class Predicate:
    """One checkable property of a response. `a`, `b` are words; `lo`, `hi` bounds."""

    kind: Kind
    a: str = ""
    b: str = ""
    lo: int = 0
    hi: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Predicate.kind must be one of {KINDS}, got {self.kind!r}")
        needs_a = self.kind in ("contains", "absent", "count", "order")
        if needs_a and (not self.a or " " in self.a or '"' in self.a):
            raise ValueError(f"Predicate({self.kind}): field a must be one word, got {self.a!r}")
        if self.kind == "order" and (not self.b or " " in self.b or '"' in self.b):
            raise ValueError(f"Predicate(order): field b must be one word, got {self.b!r}")
        if self.kind == "max_repeat" and self.hi < 1:
            raise ValueError(f"Predicate(max_repeat): hi must be >= 1, got {self.hi}")
        if self.kind in ("count", "length") and not 0 <= self.lo <= self.hi:
            raise ValueError(f"Predicate({self.kind}): need 0 <= lo <= hi, got lo={self.lo} hi={self.hi}")

    @property
    def text(self) -> str:
        if self.kind == "contains":
            return f'mentions "{self.a}"'
        if self.kind == "absent":
            return f'does not mention "{self.a}"'
        if self.kind == "count":
            return f'mentions "{self.a}" between {self.lo} and {self.hi} times'
        if self.kind == "order":
            return f'mentions "{self.a}" before "{self.b}"'
        if self.kind == "max_repeat":
            return f"repeats no word more than {self.hi} times"
        return f"is between {self.lo} and {self.hi} words long"

    def words(self) -> tuple[str, ...]:
        return tuple(w for w in (self.a, self.b) if w)

    def check(self, words: Sequence[str]) -> bool:
        """Whether the word sequence satisfies the predicate."""
        if self.kind == "contains":
            return self.a in words
        if self.kind == "absent":
            return self.a not in words
        if self.kind == "count":
            return self.lo <= sum(w == self.a for w in words) <= self.hi
        if self.kind == "order":
            if self.a not in words or self.b not in words:
                return False
            last_b = len(words) - 1 - list(reversed(words)).index(self.b)
            return words.index(self.a) < last_b
        if self.kind == "max_repeat":
            return all(words.count(w) <= self.hi for w in set(words))
        return self.lo <= len(words) <= self.hi


_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'^mentions "([^" ]+)" between (\d+) and (\d+) times$'), "count"),
    (re.compile(r'^mentions "([^" ]+)" before "([^" ]+)"$'), "order"),
    (re.compile(r'^does not mention "([^" ]+)"$'), "absent"),
    (re.compile(r'^mentions "([^" ]+)"$'), "contains"),
    (re.compile(r"^is between (\d+) and (\d+) words long$"), "length"),
    (re.compile(r"^repeats no word more than (\d+) times$"), "max_repeat"),
)


def parse_predicate(text: str) -> Predicate | None:
    """The predicate whose canonical text is `text` (surrounding space ignored), else None."""
    text = text.strip()
    for pattern, kind in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "count":
            lo, hi = int(g[1]), int(g[2])
            return Predicate("count", a=g[0], lo=lo, hi=hi) if lo <= hi else None
        if kind == "order":
            return Predicate("order", a=g[0], b=g[1])
        if kind == "length":
            lo, hi = int(g[0]), int(g[1])
            return Predicate("length", lo=lo, hi=hi) if lo <= hi else None
        if kind == "max_repeat":
            return Predicate("max_repeat", hi=int(g[0])) if int(g[0]) >= 1 else None
        return Predicate(kind, a=g[0])  # type: ignore[arg-type]
    return None
