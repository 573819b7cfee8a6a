"""Lists and conversion paths answered from a complete cache, and the in-memory copy of one
source's newest days behind Frankfurter's `/v1/latest`: pure, no I/O.

A complete cache (``cache.RateCache.complete``) holds every row of the table, so the rows a
list or a path needs are all in memory: ``CurrencyIndex`` finds them by currency and
``RateCache.peek`` reads them without reordering the LRU. The answers carry the §5 guarantees
of the entries they are made of (they are those entries). Work is memoised per cache
*generation* (it changes whenever any entry does), so a burst of changes costs one rebuild on
the next read, not one per change.

A path needs only the rows around its two ends: every direct, inverse or one-intermediate
path uses rows of ``src`` or ``dst``, and a two-intermediate path ``src → a → b → dst``
adds one row between a neighbour of ``src`` and one of ``dst``. The search runs on those rows
(``convert.Graph``), so it ranks exactly as over the whole table.

``SourceWindows`` keeps, per source, the days the Frankfurter routes read (its newest day and
the lookback before it), copied from the database and guarded like a fill: every history
change of the source (a notification on ``listener.HISTORY_CHANNEL``), every flush and every
listener gap bumps the generation, and a copy whose read began before the bump is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

import convert
from cache import RateCache

MEMO_PATHS = 4096  # (src, dst) answers kept per generation
MEMO_BODIES = 256  # answers kept per source window copy (by query)


class PathAnswer(NamedTuple):
    """The best path (None: there is none) and the versions of the rows on it (ETag input)."""

    path: convert.Path | None
    versions: tuple[int, ...]
    rate: Fraction | None  # the path's exact rate, computed once
    generation: int | None = None  # the cache generation it was found at (None: database)


class MemoryViews:
    """Lists and paths over a complete cache; every method answers None when the cache is not
    complete (the caller reads the database instead)."""

    def __init__(self, cache: RateCache, priority: convert.Priority,
                 source_of: Callable[[Any], str]) -> None:
        self.cache = cache
        self.priority = priority
        self.source_of = source_of  # the source of a cached value (a model.Rate)
        self._all: tuple[int, list[Any]] = (-1, [])
        # the unfiltered list's answer (generation, body, ETag): 11 MB joined and hashed for
        # the benchmark's table, ~44 ms, on every poll of an unchanged cache without it
        self._all_answer: tuple[int, bytes, str] = (-1, b"", "")
        self._paths: dict[tuple[str, str], PathAnswer] = {}
        self._paths_generation = -1
        # answers made from those paths, by query string: (body, ETag)
        self._answers: dict[str, tuple[bytes, str]] = {}

    # -- GET /v1/rates ---------------------------------------------------------------------
    def rates(self, base: str | None, quote: str | None) -> list[Any] | None:
        """The current values for the filters, ordered by base, quote."""
        cache = self.cache
        index = cache.index
        if not cache.complete or index is None:
            return None
        if base is not None and quote is not None:
            return self._live([base + quote])
        if base is not None:
            return self._live(base + q for q in sorted(index.by_base.get(base, ())))
        if quote is not None:
            return self._live(b + quote for b in sorted(index.by_quote.get(quote, ())))
        generation = cache.generation
        if self._all[0] != generation:
            keys = (b + q for b in sorted(index.by_base) for q in sorted(index.by_base[b]))
            self._all = (generation, self._live(keys))
        return self._all[1]

    def all_answer(self) -> tuple[bytes, str] | None:
        """The unfiltered list's answer (body, ETag) remembered at the cache's current
        generation (``remember_all``), if the cache is still complete."""
        generation, body, etag = self._all_answer
        if generation != self.cache.generation or not self.cache.complete:
            return None
        return body, etag

    def remember_all(self, generation: int, body: bytes, etag: str) -> None:
        """Keep the unfiltered list's answer made from ``rates(None, None)`` at
        ``generation``, while that generation lasts."""
        if generation == self.cache.generation and self.cache.complete:
            self._all_answer = (generation, body, etag)

    def _live(self, keys: Iterable[str]) -> list[Any]:
        peek = self.cache.peek
        values = []
        for key in keys:
            entry = peek(key)
            if entry is not None and entry.value is not None:
                values.append(entry.value)
        return values

    # -- GET /v1/convert -----------------------------------------------------------------
    def path(self, src: str, dst: str) -> PathAnswer | None:
        """The best path from ``src`` to ``dst`` (convert.py's ranking, at most two
        intermediates)."""
        cache = self.cache
        if not cache.complete or cache.index is None:
            return None
        if self._paths_generation != cache.generation or len(self._paths) >= MEMO_PATHS:
            self._paths.clear()
            self._answers.clear()
            self._paths_generation = cache.generation
        answer = self._paths.get((src, dst))
        if answer is None:
            answer = self._paths[(src, dst)] = self._search(src, dst)
        return answer

    def answer(self, query: str) -> tuple[bytes, str] | None:
        """A conversion's answer (body, ETag) remembered for this exact query string at the
        cache's current generation (``remember``), if the cache is still complete."""
        if self._paths_generation != self.cache.generation or not self.cache.complete:
            return None
        return self._answers.get(query)

    def remember(self, query: str, answer: PathAnswer, body: bytes, etag: str) -> None:
        """Keep the answer made from ``answer`` for ``query`` while the generation it was
        found at lasts (an answer read from the database is not kept)."""
        if (answer.generation is not None and answer.generation == self._paths_generation
                == self.cache.generation and len(self._answers) < MEMO_PATHS):
            self._answers[query] = (body, etag)

    def _search(self, src: str, dst: str) -> PathAnswer:
        index = self.cache.index
        assert index is not None  # path() checked
        near_src, near_dst = index.neighbours(src), index.neighbours(dst)
        rows = self._rows_around(src, near_src) | self._rows_around(dst, near_dst)
        path = convert.Graph(rows.values(), self.priority).best_path(src, dst, 1)
        if path is None:
            for first in near_src - {dst}:
                for second in index.neighbours(first) & near_dst:
                    if second != src:
                        rows |= self._rows_between(first, second)
            path = convert.Graph(rows.values(), self.priority).best_path(src, dst, 2)
        generation = self.cache.generation
        if path is None:
            return PathAnswer(None, (), None, generation)
        peek = self.cache.peek
        versions = []
        for leg in path.legs:
            entry = peek(leg.row.base + leg.row.quote)
            assert entry is not None  # the row was read from the cache just now
            versions.append(entry.version)
        return PathAnswer(path, tuple(versions), path.rate, generation)

    def _rows_around(self, code: str, near: set[str]) -> dict[str, convert.RateRow]:
        rows: dict[str, convert.RateRow] = {}
        for other in near:
            rows |= self._rows_between(code, other)
        return rows

    def _rows_between(self, a: str, b: str) -> dict[str, convert.RateRow]:
        """The live rows (a, b) and (b, a), by key."""
        rows = {}
        peek = self.cache.peek
        for key in (a + b, b + a):
            entry = peek(key)
            if entry is not None and entry.value is not None:
                value = entry.value
                rows[key] = convert.RateRow(value.base, value.quote, Decimal(value.rate),
                                            self.source_of(value))
        return rows


# ----------------------------------------------------------------------------- source windows
@dataclass
class SourceDays:
    """One source's newest day (None: it has none) and the days the routes read with it, as
    loaded for ``today``; ``bodies`` keeps answers (body, ETag) made from it, by query."""

    today: date
    newest: date | None
    history: Any
    bodies: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    def remember(self, query: str, body: bytes, etag: str) -> None:
        if len(self.bodies) >= MEMO_BODIES:
            self.bodies.clear()
        self.bodies[query] = (body, etag)


class SourceWindows:
    """The in-memory copies of sources' newest days (module docstring)."""

    def __init__(self) -> None:
        self.generation = 0
        self._copies: dict[str, SourceDays] = {}

    def changed(self, sources: Sequence[str] | None) -> None:
        """These sources' history changed (None: every source's, or trust was lost)."""
        self.generation += 1
        if sources is None:
            self._copies.clear()
        else:
            for source in sources:
                self._copies.pop(source, None)

    def cached(self, source: str, today: date) -> SourceDays | None:
        days = self._copies.get(source)
        return days if days is not None and days.today == today else None

    def offer(self, generation: int, source: str, days: SourceDays) -> bool:
        """Keep a copy read from the database since ``generation``: only if nothing changed
        since the read began."""
        if generation != self.generation:
            return False
        self._copies[source] = days
        return True
