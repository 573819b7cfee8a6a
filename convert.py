"""Conversion paths and their arithmetic: pure, no I/O.

A *path* from ``src`` to ``dst`` is a chain of one to three *legs*, each priced by one current
rate: the row ``(a, b)`` prices ``a → b`` directly; the row ``(b, a)`` prices it inversely
(``1 / rate``). Between the legs stand at most two *intermediate* currencies, all distinct and
different from ``src`` and ``dst``.

Ranking (the best path is the smallest key, compared in this order):

1. **hops**: fewer legs first (direct or inverse, then one intermediate, then two);
2. **priority**: the rank of the path's lowest-priority leg, better first. A leg's rank is
   its row's source's: ``manual`` 0, then the configured sources in ``XRATES_SOURCES`` order
   (1, 2, ...), then every other source (all equal, below every configured one);
3. **direct before inverse**: fewer inverted legs first; then, leg by leg from ``src``, a
   direct leg before an inverted one (the tuple of "is inverted" flags, False < True);
4. **intermediates**: EUR, then USD, then the other codes A–Z, compared lexicographically
   over the sequence of intermediates (first intermediate first).

Two paths with equal keys are the same path (one row per pair: the intermediates and the
direction of every leg determine its rows), so the order is total and the answer
deterministic.

Arithmetic is exact: a path's rate is a ``Fraction`` (inverses are not finite decimals, so no
working precision can be exact; a fraction is), and the only rounding is the final one, to 15
significant digits, half-even (``rounded``, ``plain``).

``find_path`` builds an adjacency map once per call (``Graph``) and searches it by hop count,
stopping at the first count that has a path; two intermediates cost one set intersection per
neighbour of ``src``, not a pass over every triple of currencies. ``Graph`` can be kept and
searched again (``Graph.best_path``) while the rates do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from itertools import pairwise, product
from typing import NamedTuple

MAX_INTERMEDIATES = 2
RESULT_DIGITS = 15  # significant digits of every number /v1/convert answers
PREFERRED_INTERMEDIATES = ("EUR", "USD")
MANUAL = "manual"

_RESULT = Context(prec=RESULT_DIGITS, rounding=ROUND_HALF_EVEN)


class RateRow(NamedTuple):
    """One current rate: 1 ``base`` costs ``rate`` ``quote``, as published by ``source``."""

    base: str
    quote: str
    rate: Decimal
    source: str


class Leg(NamedTuple):
    """One step of a path: ``frm → to`` priced by ``row``, inverted when the row is ``(to, frm)``."""

    frm: str
    to: str
    row: RateRow
    inverted: bool

    @property
    def price(self) -> Fraction:
        """The exact price of one ``frm`` in ``to``."""
        value = Fraction(self.row.rate)
        return 1 / value if self.inverted else value


class Path(NamedTuple):
    """The chosen conversion: its legs from ``src`` to ``dst`` and the intermediates between."""

    legs: tuple[Leg, ...]

    @property
    def via(self) -> list[str]:
        """The intermediate currencies in order ([] when direct or inverse)."""
        return [leg.to for leg in self.legs[:-1]]

    @property
    def rate(self) -> Fraction:
        """The exact rate: the product of the legs' prices (nothing rounded)."""
        value = Fraction(1)
        for leg in self.legs:
            value *= leg.price
        return value


class Priority:
    """Source ranks: ``manual`` first, then ``configured`` in order, unknown sources last."""

    def __init__(self, configured: Sequence[str]) -> None:
        ranks = {MANUAL: 0}
        for name in configured:
            ranks.setdefault(name, len(ranks))
        self._ranks = ranks
        self._unknown = len(ranks)

    def rank(self, source: str) -> int:
        """Smaller is better."""
        return self._ranks.get(source, self._unknown)


def intermediate_key(code: str) -> tuple[int, str]:
    """EUR, then USD, then the others A–Z."""
    if code in PREFERRED_INTERMEDIATES:
        return PREFERRED_INTERMEDIATES.index(code), ""
    return len(PREFERRED_INTERMEDIATES), code


class Graph:
    """The current rates as an adjacency map: ``edges[a][b]`` lists the legs ``a → b``
    (the direct row ``(a, b)`` and/or the inverted row ``(b, a)``)."""

    def __init__(self, rates: Iterable[RateRow | tuple[str, str, Decimal, str]],
                 priority: Priority) -> None:
        self.priority = priority
        self.edges: dict[str, dict[str, list[Leg]]] = {}
        for base, quote, rate, source in rates:
            row = RateRow(base, quote, rate, source)
            self._add(Leg(base, quote, row, False))
            self._add(Leg(quote, base, row, True))

    def _add(self, leg: Leg) -> None:
        self.edges.setdefault(leg.frm, {}).setdefault(leg.to, []).append(leg)

    def best_path(self, src: str, dst: str, max_intermediates: int = MAX_INTERMEDIATES
                  ) -> Path | None:
        """The best path (module docstring) with at most ``max_intermediates``; None if none."""
        if src == dst or src not in self.edges or dst not in self.edges:
            return None
        for chains in (self._zero, self._one, self._two)[:max_intermediates + 1]:
            best = min((self._best_legs(chain) for chain in chains(src, dst)), default=None)
            if best is not None:
                return Path(best[-1])
        return None

    # -- candidate currency chains per hop count (src, intermediates..., dst) ----------------
    def _zero(self, src: str, dst: str) -> Iterable[tuple[str, ...]]:
        if dst in self.edges[src]:
            yield src, dst

    def _one(self, src: str, dst: str) -> Iterable[tuple[str, ...]]:
        from_src, into_dst = self.edges[src], self.edges[dst]
        for middle in from_src.keys() & into_dst.keys():
            if middle != src and middle != dst:
                yield src, middle, dst

    def _two(self, src: str, dst: str) -> Iterable[tuple[str, ...]]:
        edges, into_dst = self.edges, self.edges[dst].keys()
        for first in edges[src]:
            if first == dst:
                continue
            for second in edges[first].keys() & into_dst:
                if second != src and second != dst and second != first:
                    yield src, first, second, dst

    # -- ranking ----------------------------------------------------------------------------
    def _best_legs(self, chain: tuple[str, ...]) -> tuple[tuple, tuple[Leg, ...]]:
        """The best choice of legs along ``chain`` (a pair may be priced both ways), with its
        ranking key first (hops are equal within one search round, so they are left out)."""
        options = [self.edges[a][b] for a, b in pairwise(chain)]
        via = tuple(intermediate_key(code) for code in chain[1:-1])
        return min((self._key(legs, via), legs) for legs in product(*options))

    def _key(self, legs: tuple[Leg, ...], via: tuple[tuple[int, str], ...]) -> tuple:
        rank = self.priority.rank
        flags = tuple(leg.inverted for leg in legs)
        return max(rank(leg.row.source) for leg in legs), sum(flags), flags, via


def find_path(rates: Iterable[RateRow | tuple[str, str, Decimal, str]], src: str, dst: str,
              configured: Sequence[str], max_intermediates: int = MAX_INTERMEDIATES
              ) -> Path | None:
    """The best path from ``src`` to ``dst`` over ``rates`` (one row per pair), ranked as the
    module docstring says with ``configured`` as the XRATES_SOURCES order; None if there is
    no path with at most ``max_intermediates`` intermediate currencies."""
    return Graph(rates, Priority(configured)).best_path(src, dst, max_intermediates)


def rounded(value: Fraction | Decimal) -> Decimal:
    """``value`` rounded once to 15 significant digits, half-even, trailing zeros dropped
    (``normalize`` rounds to its context's precision, then strips the zeros)."""
    if isinstance(value, Fraction):
        value = _RESULT.divide(Decimal(value.numerator), Decimal(value.denominator))
    return value.normalize(_RESULT)


def plain(value: Fraction | Decimal) -> str:
    """``rounded(value)`` as a JSON number without an exponent (``1E+2`` → ``100``). A
    history series calls it once per day: a Decimal takes one C call, no Python frame more."""
    if type(value) is Decimal:
        return format(value.normalize(_RESULT), "f")
    return format(rounded(value), "f")


def convert(amount: Decimal, path: Path) -> tuple[Fraction, Fraction]:
    """The exact (rate, result) of converting ``amount`` along ``path``; round each with
    ``rounded``/``plain`` only when answering (the result is rounded from the exact product,
    not from the rounded rate)."""
    rate = path.rate
    return rate, Fraction(amount) * rate
