"""convert.py: path search, ranking and exact arithmetic (pure, no database)."""

from __future__ import annotations

import random
import time
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convert
from convert import Graph, Priority, RateRow, find_path, plain, rounded

SOURCES = ("ecb", "nbu", "cbr")


def row(base: str, quote: str, rate: str, source: str = "manual") -> RateRow:
    return RateRow(base, quote, Decimal(rate), source)


def best(rates: list[RateRow], src: str, dst: str, configured=SOURCES) -> convert.Path | None:
    return find_path(rates, src, dst, configured)


def shape(path: convert.Path | None) -> list[tuple[str, str, bool]] | None:
    """(row pair, source, inverted) per leg, for compact assertions."""
    if path is None:
        return None
    return [(leg.row.base + leg.row.quote, leg.row.source, leg.inverted) for leg in path.legs]


# --------------------------------------------------------------------------- priority
def test_priority_manual_then_configured_then_unknown() -> None:
    priority = Priority(("ecb", "nbu"))
    assert [priority.rank(s) for s in ("manual", "ecb", "nbu", "boc", "zzz")] == [0, 1, 2, 3, 3]
    assert Priority(()).rank("manual") < Priority(()).rank("ecb")


# --------------------------------------------------------------------------- hops
def test_direct_and_inverse_have_no_intermediates() -> None:
    rates = [row("EUR", "USD", "1.08")]
    direct = best(rates, "EUR", "USD")
    assert direct.via == [] and direct.rate == Fraction("1.08")
    inverse = best(rates, "USD", "EUR")
    assert inverse.via == [] and inverse.rate == 1 / Fraction("1.08")
    assert shape(inverse) == [("EURUSD", "manual", True)]


def test_fewer_hops_win_over_priority_and_direction() -> None:
    # A one-intermediate path of manual, direct legs loses to an inverse, low-priority pair.
    rates = [row("BBB", "AAA", "2", "unknown"), row("AAA", "EUR", "1"), row("EUR", "BBB", "1")]
    assert best(rates, "AAA", "BBB").via == []
    # One intermediate beats two, whatever their sources.
    rates = [row("AAA", "ZZZ", "2", "cbr"), row("ZZZ", "BBB", "3", "cbr"),
             row("AAA", "EUR", "5"), row("EUR", "USD", "7"), row("USD", "BBB", "11")]
    assert best(rates, "AAA", "BBB").via == ["ZZZ"]


def test_two_intermediates_found_when_no_single_one_exists() -> None:
    rates = [row("AAA", "CCC", "2"), row("DDD", "CCC", "4"), row("DDD", "BBB", "10")]
    path = best(rates, "AAA", "BBB")
    assert path.via == ["CCC", "DDD"]
    assert shape(path) == [("AAACCC", "manual", False), ("DDDCCC", "manual", True),
                           ("DDDBBB", "manual", False)]
    assert path.rate == Fraction(2) / 4 * 10
    assert best(rates, "BBB", "AAA").via == ["DDD", "CCC"]


def test_three_intermediates_are_not_searched() -> None:
    rates = [row("AAA", "CCC", "2"), row("CCC", "DDD", "2"), row("DDD", "EEE", "2"),
             row("EEE", "BBB", "2")]
    assert best(rates, "AAA", "BBB") is None
    assert best(rates, "AAA", "EEE").via == ["CCC", "DDD"]
    assert find_path(rates, "AAA", "EEE", SOURCES, max_intermediates=1) is None


def test_paths_never_revisit_a_currency() -> None:
    # AAA→CCC→AAA→BBB would "reach" BBB only by passing through src again.
    rates = [row("AAA", "CCC", "2"), row("CCC", "DDD", "3")]
    assert best(rates, "AAA", "DDD").via == ["CCC"]
    assert best(rates, "AAA", "ZZZ") is None
    assert best(rates, "AAA", "AAA") is None
    assert best([], "AAA", "BBB") is None


# --------------------------------------------------------------------------- priority of the weakest leg
def test_lowest_priority_leg_decides_between_paths_of_equal_hops() -> None:
    # Through EUR: manual + nbu (weakest rank 2). Through ZZZ: ecb + ecb (weakest rank 1).
    rates = [row("AAA", "EUR", "1"), row("EUR", "BBB", "1", "nbu"),
             row("AAA", "ZZZ", "2", "ecb"), row("ZZZ", "BBB", "3", "ecb")]
    assert best(rates, "AAA", "BBB").via == ["ZZZ"]
    # Reordering XRATES_SOURCES reverses the verdict.
    assert best(rates, "AAA", "BBB", configured=("nbu", "ecb")).via == ["EUR"]


def test_priority_beats_alphabetical_and_preferred_intermediates() -> None:
    # USD and CHF paths are manual; the EUR path has an unknown source leg.
    rates = [row("AAA", "EUR", "2"), row("EUR", "BBB", "3", "someone"),
             row("AAA", "USD", "2", "cbr"), row("USD", "BBB", "3"),
             row("AAA", "CHF", "2"), row("CHF", "BBB", "3")]
    assert best(rates, "AAA", "BBB").via == ["CHF"]


def test_unknown_sources_rank_equal_and_last() -> None:
    rates = [row("AAA", "EUR", "1", "xyz"), row("EUR", "BBB", "1", "abc"),
             row("AAA", "CHF", "1", "abc"), row("CHF", "BBB", "1", "cbr")]
    # EUR path: worst is unknown; CHF path: worst is unknown too → tie → EUR first.
    assert best(rates, "AAA", "BBB").via == ["EUR"]


def test_zero_hops_direct_and_inverse_rank_by_priority_then_direction() -> None:
    both = [row("EUR", "USD", "1.08", "ecb"), row("USD", "EUR", "0.9", "manual")]
    # The manual inverse outranks ecb's direct row: priority comes before direction.
    assert shape(best(both, "EUR", "USD")) == [("USDEUR", "manual", True)]
    same = [row("EUR", "USD", "1.08", "ecb"), row("USD", "EUR", "0.9", "ecb")]
    assert shape(best(same, "EUR", "USD")) == [("EURUSD", "ecb", False)]
    assert shape(best(same, "USD", "EUR")) == [("USDEUR", "ecb", False)]


# --------------------------------------------------------------------------- direction
def test_fewer_inverted_legs_win() -> None:
    # Both paths manual. Through USD: one inversion; through CHF: none.
    rates = [row("AAA", "USD", "2"), row("BBB", "USD", "3"),
             row("AAA", "CHF", "2"), row("CHF", "BBB", "3")]
    assert best(rates, "AAA", "BBB").via == ["CHF"]


def test_equal_inversions_prefer_a_direct_first_leg() -> None:
    # Through USD: inverted then direct; through CHF: direct then inverted.
    rates = [row("USD", "AAA", "2"), row("USD", "BBB", "3"),
             row("AAA", "CHF", "2"), row("BBB", "CHF", "3")]
    path = best(rates, "AAA", "BBB")
    assert path.via == ["CHF"]
    assert [leg.inverted for leg in path.legs] == [False, True]


def test_a_pair_priced_both_ways_uses_the_better_row() -> None:
    rates = [row("AAA", "CCC", "2", "cbr"), row("CCC", "AAA", "0.5", "ecb"),
             row("CCC", "BBB", "3", "ecb")]
    # AAA→CCC: cbr direct (rank 3) vs ecb inverted (rank 1): priority first.
    assert shape(best(rates, "AAA", "BBB")) == [("CCCAAA", "ecb", True), ("CCCBBB", "ecb", False)]


# --------------------------------------------------------------------------- intermediates order
def test_eur_then_usd_then_alphabetical() -> None:
    rates = []
    for pivot in ("CHF", "USD", "EUR", "AUD"):
        rates += [row("AAA", pivot, "2"), row(pivot, "BBB", "3")]
    assert best(rates, "AAA", "BBB").via == ["EUR"]
    without_eur = [r for r in rates if "EUR" not in (r.base, r.quote)]
    assert best(without_eur, "AAA", "BBB").via == ["USD"]
    only_others = [r for r in without_eur if "USD" not in (r.base, r.quote)]
    assert best(only_others, "AAA", "BBB").via == ["AUD"]


def test_two_intermediates_compare_lexicographically() -> None:
    # AAA and BBB share no neighbour; all legs manual and direct. Chains: EUR-USD, EUR-GBP,
    # CHF-USD.
    rates = [row("AAA", "EUR", "2"), row("AAA", "CHF", "2"), row("EUR", "USD", "3"),
             row("EUR", "GBP", "3"), row("CHF", "USD", "3"), row("USD", "BBB", "5"),
             row("GBP", "BBB", "5")]
    assert best(rates, "AAA", "BBB").via == ["EUR", "USD"]
    # Without EUR→USD: EUR first beats CHF first, although USD second would beat GBP second.
    no_eur_usd = [r for r in rates if (r.base, r.quote) != ("EUR", "USD")]
    assert best(no_eur_usd, "AAA", "BBB").via == ["EUR", "GBP"]


# --------------------------------------------------------------------------- arithmetic
def test_arithmetic_is_exact_and_rounded_once() -> None:
    rates = [row("EUR", "USD", "1.08"), row("EUR", "GBP", "0.85")]
    path = best(rates, "GBP", "USD")
    assert path.via == ["EUR"]
    assert path.rate == Fraction(108, 85)  # exact: no working precision involved
    assert plain(path.rate) == "1.27058823529412"
    rate, result = convert.convert(Decimal("0.85"), path)
    assert rate == path.rate
    assert plain(result) == "1.08"  # from the exact product, not from the rounded rate
    inverse = best([row("EUR", "USD", "3")], "USD", "EUR")
    assert plain(convert.convert(Decimal("3"), inverse)[1]) == "1"


def test_rounding_is_half_even_at_15_digits() -> None:
    assert plain(Decimal("1.000000000000005")) == "1.00000000000000".rstrip("0").rstrip(".")
    assert plain(Decimal("1.000000000000015")) == "1.00000000000002"
    assert plain(Fraction(1, 3)) == "0.333333333333333"
    assert plain(Fraction(2, 3)) == "0.666666666666667"
    # A tie only when exact: 1 + 5e-15 is a tie (down to even); one part in 1e30 more is not.
    assert plain(Fraction(10**15 + 5, 10**15)) == "1"
    assert plain(Fraction(10**15 + 5, 10**15) + Fraction(1, 10**30)) == "1.00000000000001"


def test_plain_keeps_its_json_form() -> None:
    assert plain(Decimal("100")) == "100"
    assert plain(Decimal("1E+2")) == "100"
    assert plain(Decimal("0.0000012300")) == "0.00000123"
    assert plain(Fraction(162)) == "162"
    assert plain(Decimal("123456789012345678")) == "123456789012346000"
    assert rounded(Decimal("2.50")) == Decimal("2.5")


# --------------------------------------------------------------------------- size
def test_three_thousand_rates_are_searched_quickly() -> None:
    rng = random.Random(7)
    codes = [a + b + c for a in "ABCDEFG" for b in "HIJKL" for c in "MNOPQ"][:170]
    pairs = {tuple(rng.sample(codes, 2)) for _ in range(3000)}
    rates = [row(a, b, "1.5", rng.choice(("ecb", "nbu", "cbr", "x"))) for a, b in pairs]
    rates = [r for r in rates if {r.base, r.quote} != {codes[0], codes[1]}]
    # Two currencies reachable only through two intermediates (a sparse corner), and two
    # with 80 neighbours each but none in common: about a thousand two-intermediate chains.
    rates += [row("QQQ", codes[0], "2"), row(codes[0], codes[1], "5"), row(codes[1], "RRR", "3")]
    rates += [row("SSS", code, "2") for code in codes[:80]]
    rates += [row(code, "TTT", "2") for code in codes[80:160]]
    started = time.perf_counter()
    graph = Graph(rates, Priority(SOURCES))
    paths = [graph.best_path("QQQ", "RRR"), graph.best_path("SSS", "TTT"),
             graph.best_path(codes[5], codes[9])]
    elapsed = time.perf_counter() - started
    assert paths[0].via == [codes[0], codes[1]]
    assert len(paths[1].via) == 2
    assert paths[2] is not None
    assert elapsed < 1.0, elapsed  # measured far below this; a generous bound on a shared CPU


@pytest.mark.parametrize("src, dst", [("AAA", "BBB"), ("BBB", "AAA")])
def test_via_lists_intermediates_in_order(src: str, dst: str) -> None:
    rates = [row("AAA", "CCC", "2"), row("CCC", "DDD", "3"), row("DDD", "BBB", "5")]
    via = best(rates, src, dst).via
    assert via == (["CCC", "DDD"] if src == "AAA" else ["DDD", "CCC"])


@settings(max_examples=400, deadline=None)
@given(st.decimals(min_value=Decimal("1E-30"), max_value=Decimal("1E+30"), allow_nan=False,
                   allow_infinity=False, places=None))
def test_a_decimal_prints_as_the_same_value_as_an_exact_fraction(value: Decimal) -> None:
    # A history day's direct row (Decimal) and a path's exact rate (Fraction) of one value
    # must be one JSON number: the Decimal shortcut in plain() rounds as the division does.
    assert plain(value) == plain(Fraction(value))
    assert rounded(value) == rounded(Fraction(value))
