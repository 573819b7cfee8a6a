"""Tests for sources.py: parsers on real recorded payloads, the demo walk, and fetch()."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sources
from sources import FEEDS, FetchError, Quote, SourceError

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"


def payload(name: str) -> bytes:
    """Bytes of a recorded payload, e.g. payload("ecb/eurofxref-daily_2024-02-27.xml")."""
    return (FIXTURES / name).read_bytes()


def by_base(quotes: list[Quote]) -> dict[str, Quote]:
    result = {q.base: q for q in quotes}
    assert len(result) == len(quotes), "one quote per base expected"
    return result


def by_quote(quotes: list[Quote]) -> dict[str, Quote]:
    result = {q.quote: q for q in quotes}
    assert len(result) == len(quotes), "one quote per quote currency expected"
    return result


def midnight(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def assert_valid(quote: Quote) -> None:
    """The API's rules (contract §3), checked independently of sources.normalize_rate."""
    assert re.fullmatch(r"[A-Z]{3}", quote.base), quote
    assert re.fullmatch(r"[A-Z]{3}", quote.quote), quote
    assert quote.base != quote.quote, quote
    rate = quote.rate
    assert isinstance(rate, Decimal) and rate.is_finite(), quote
    assert Decimal("1e-12") <= rate < Decimal("1e12"), quote
    significant = format(rate, "f").replace(".", "").strip("0")
    assert 1 <= len(significant) <= 15, quote
    assert quote.as_of.tzinfo is not None and quote.as_of.utcoffset() == timedelta(0), quote


# Every recorded payload that is a valid feed on its own:
# (feed, file, quotes, distinct days, newest as_of). Parsers return every day of a payload.
VALID_FIXTURES = [
    ("ecb", "ecb/eurofxref-daily_2017-03-08.xml", 31, 1, midnight(2017, 3, 8)),
    ("ecb", "ecb/eurofxref-daily_2022-07-08.xml", 31, 1, midnight(2022, 7, 8)),
    ("ecb", "ecb/eurofxref-daily_2024-02-27.xml", 30, 1, midnight(2024, 2, 27)),
    ("ecb", "ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml", 1830, 61, midnight(2024, 2, 27)),
    ("nbu", "nbu/statdirectory_exchange_2026-09-25.json", 45, 1, midnight(2026, 9, 25)),
    ("nbu", "nbu/statdirectory_exchange_valcode-USD_2025-05-06.json", 1, 1, midnight(2025, 5, 6)),
    ("nbu", "nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json", 720, 16, midnight(2026, 3, 16)),
    ("nbu", "nbu/statdirectory_exchange_2019-02-18_xml-variant.xml", 61, 1, midnight(2019, 2, 18)),
    ("cbr", "cbr/XML_daily_2022-03-15.xml", 34, 1, midnight(2022, 3, 15)),
    ("cbr", "cbr/XML_daily_2024-03-28_vunitrate.xml", 43, 1, midnight(2024, 3, 28)),
    ("cbr", "cbr/XML_daily_2026-04-25_saturday_vcr.xml", 54, 1, midnight(2026, 4, 25)),
    ("privatbank", "privatbank/pubinfo_coursid5_committed-2018-04-23.json", 3, 1, None),
    ("privatbank", "privatbank/pubinfo_coursid3_committed-2019-07-25.json", 3, 1, None),
    ("privatbank", "privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json", 2, 1, None),
    ("boc", "boc/FX_RATES_DAILY_start-2026-03-12_vcr.json", 115, 5, midnight(2026, 3, 18)),
    ("boc", "boc/EDGE_FX_RATES_DAILY_recent-1_stale-2019-series_vcr.json", 23, 1,
     midnight(2026, 3, 13)),
    # 171 country rows: 4 N.A. (BYN, IRR, KPW, RUB) and repeats (XCD, XOF, XAF, ...) -> 150.
    *(("bdi", f"bdi/dailyRates_currencyIsoCode-EUR_2026-02-{d}_vcr.csv", 150, 1,
       midnight(2026, 2, int(d))) for d in ("09", "10", "11")),
    ("nbp", "nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json", 128, 4,
     midnight(2026, 3, 5)),
    ("nbp", "nbp/exchangerates_tables-B_2026-03-01_to_2026-03-05_vcr.json", 116, 1,
     midnight(2026, 3, 4)),
    ("nbp", "nbp/cenyzlota_gold_2026-03-01_to_2026-03-05_vcr.json", 4, 4, midnight(2026, 3, 5)),
    ("cnb", "cnb/exrates_daily-year_2026_lang-EN_recorded-2026-04-02_vcr.json", 1950, 65,
     midnight(2026, 4, 2)),
    ("mnb", "mnb/GetExchangeRates_soap_2025-03-24_to_2025-03-28_vcr.xml", 160, 5,
     midnight(2025, 3, 28)),
    # 38 series x 7 days, without the indices I44 and TWI.
    ("nb", "nb/EXR_B-NOK-SP_csvdata_2026-03-16_to_2026-03-24_vcr.csv", 252, 7,
     midnight(2026, 3, 24)),
    ("rba", "rba/f11.1-data_publication-2026-03-20_vcr.csv", 14896, 808, midnight(2026, 3, 20)),
    ("nbg", "nbg/currencies_date-2026-03-02_vcr.json", 42, 1, midnight(2026, 2, 28)),
    ("nbg", "nbg/currencies_date-2026-03-03_vcr.json", 42, 1, midnight(2026, 3, 3)),
    ("nbg", "nbg/EDGE_currencies_date-2026-03-04_identical-to-03-03_vcr.json", 42, 1,
     midnight(2026, 3, 3)),
    *(("nbk", f"nbk/get_rates_fdate-0{d}.04.2026_vcr.xml", 39, 1, midnight(2026, 4, d))
      for d in (1, 2, 3)),
    ("nbrb", "nbrb/rates_periodicity-0_2026-03-17_vcr.json", 30, 1, midnight(2026, 3, 17)),
    *(("sarb", f"sarb/{path.name}", 4, 4, midnight(2026, 3, 27))
      for path in sorted((FIXTURES / "sarb").glob("*.json"))),
    ("boe", "boe/iadb-fromshowcolumns_26-XUDL-series_2026-03-17_to_2026-03-20_vcr.csv", 104, 4,
     midnight(2026, 3, 20)),
    # 17 currencies x 4 days; XDR is null on the newest day, so the whole series goes.
    ("hkma", "hkma/er-eeri-daily_end_of_day_2026-02-25_to_2026-02-28_vcr.json", 68, 4,
     midnight(2026, 2, 28)),
]

# NBRB dynamics files name no currency: they parse only beside the periodicity=0 list.
NBRB_DYNAMICS = sorted(f"nbrb/{path.name}" for path in (FIXTURES / "nbrb").glob("rates_dynamics_*"))

# Recorded error bodies served with HTTP 200: (feed, file, words the message must quote).
ERROR_FIXTURES = [
    ("nbu", "nbu/EDGE_xml_error_wrong_parameters_format.xml", "Wrong parameters format"),
    ("nbu", "nbu/EDGE_html_redirect_page_mistyped_path.html", "nbu"),
    ("cbr", "cbr/EDGE_error_in_parameters.xml", "Error in parameters"),
    *(("nbrb", name, "periodicity=0") for name in NBRB_DYNAMICS),
]


# --------------------------------------------------------------------------- registry

NEW_SOURCES = ("bdi", "nbp", "cnb", "mnb", "nb", "rba", "nbg", "nbk", "nbrb", "sarb", "boe", "hkma")


def test_registry_names_and_urls() -> None:
    assert sources.SOURCE_NAMES == (
        "demo", "ecb", "nbu", "cbr", "privatbank", "boc", *NEW_SOURCES
    )
    assert set(FEEDS) == set(sources.SOURCE_NAMES) - {"demo"}
    assert all(name == source.name for name, source in FEEDS.items())
    today = date(2026, 3, 18)
    daily = {name: [r.url for r in FEEDS[name].daily_requests(today)] for name in FEEDS}
    assert daily["ecb"] == ["https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"]
    assert daily["nbu"] == ["https://bank.gov.ua/NBUStatService/v1/statdirectory/exchange?json"]
    assert daily["cbr"] == ["https://www.cbr.ru/scripts/XML_daily.asp"]
    assert daily["privatbank"] == ["https://api.privatbank.ua/p24api/pubinfo?exchange&coursid=5"]
    assert daily["boc"] == [
        "https://www.bankofcanada.ca/valet/observations/group/FX_RATES_DAILY/json?recent=5"
    ]
    for name, source in FEEDS.items():
        assert source.url.startswith("https://") or name == "mnb", name  # the public URL
        assert source.base_direction in ("foreign_per_pivot", "pivot_per_foreign"), name
        assert re.fullmatch(r"[A-Z]{3}", source.pivot) and re.fullmatch(r"[A-Z]{2}", source.country)
        assert source.title and source.cadence
        assert source.full_url_override == (name in ("ecb", "nbu", "cbr", "privatbank", "boc"))


def test_configuration_accepts_every_source_name() -> None:
    import util

    assert util.KNOWN_SOURCES == sources.SOURCE_NAMES
    settings = util.load_settings({"XRATES_SOURCES": ",".join(FEEDS),
                                   "XRATES_HKMA_URL": "http://127.0.0.1:9"})
    assert settings.sources == tuple(FEEDS)
    assert settings.source_urls == {"hkma": "http://127.0.0.1:9"}


# The published direction of each feed, as its documentation states it.
FOREIGN_PER_PIVOT_FEEDS = ("ecb", "bdi", "rba", "boe", "sarb")
PIVOT_PER_FOREIGN_FEEDS = ("nbu", "cbr", "boc", "nbp", "cnb", "mnb", "nb", "nbg", "nbk", "nbrb",
                           "hkma", "privatbank")


@pytest.mark.parametrize(("name", "direction"), [
    *((name, "foreign_per_pivot") for name in FOREIGN_PER_PIVOT_FEEDS),
    *((name, "pivot_per_foreign") for name in PIVOT_PER_FOREIGN_FEEDS),
])
def test_quotes_follow_the_documented_direction(name: str, direction: str) -> None:
    source = FEEDS[name]
    assert source.base_direction == direction
    [first, *_] = [n for f, n, *_ in VALID_FIXTURES if f == name]
    quotes = source.parse(payload(first))
    side = {q.base for q in quotes} if direction == "foreign_per_pivot" else {q.quote for q in quotes}
    if name == "sarb":  # three series are rand per foreign unit, kept as published
        assert {q.base for q in source.parse_payloads(_all_sarb())} == {"ZAR", "USD", "GBP", "EUR"}
    else:
        assert side == {source.pivot}


def test_every_fixture_on_disk_is_covered() -> None:
    covered = {name for _, name, *_ in VALID_FIXTURES} | {name for _, name, _ in ERROR_FIXTURES}
    # frankfurter/ holds responses of the Frankfurter API, not a feed: tests/test_frankfurter.py
    on_disk = {
        str(path.relative_to(FIXTURES))
        for path in FIXTURES.rglob("*")
        if path.is_file() and path.name != "PROVENANCE.md"
        and path.relative_to(FIXTURES).parts[0] != "frankfurter"
    }
    assert on_disk == covered
    # Every folder has its section in PROVENANCE.md.
    provenance = (FIXTURES / "PROVENANCE.md").read_text()
    for folder in {name.split("/")[0] for name in on_disk}:
        assert f"(`{folder}/`)" in provenance, folder


@pytest.mark.parametrize(("feed", "name", "count", "days", "newest"), VALID_FIXTURES)
def test_every_recorded_payload_gives_valid_quotes(
    feed: str, name: str, count: int, days: int, newest: datetime | None
) -> None:
    quotes = FEEDS[feed].parse(payload(name))
    assert len(quotes) == count
    assert len({(q.base, q.quote, q.as_of) for q in quotes}) == count  # one per pair per day
    assert len({q.as_of for q in quotes}) == days
    for quote in quotes:
        assert_valid(quote)
    if newest is not None:
        assert max(q.as_of for q in quotes) == newest
    # Every pair is quoted on the newest day: stale series are dropped whole.
    latest: dict[tuple[str, str], datetime] = {}
    for q in quotes:
        latest[(q.base, q.quote)] = max(q.as_of, latest.get((q.base, q.quote), q.as_of))
    assert set(latest.values()) == {max(q.as_of for q in quotes)}


@pytest.mark.parametrize(("feed", "name", "words"), ERROR_FIXTURES)
def test_recorded_error_bodies_raise(feed: str, name: str, words: str) -> None:
    with pytest.raises(SourceError, match=words):
        FEEDS[feed].parse(payload(name))


@pytest.mark.parametrize("feed", list(FEEDS))
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \r\n",
        b"[]",
        b"{}",
        b"null",
        b'"text"',
        b"\x00\xff\xfe garbage \x81\x82",
        b"<html><body>Service Unavailable</body></html>",
        b'<?xml version="1.0"?><root/>',
        b'{"error": "rate limit exceeded"}',
        b"[1, 2, 3]",
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        b"[" * 100_000,
    ],
    ids=lambda body: repr(body[:24]),
)
def test_non_feed_payloads_raise_source_error(feed: str, body: bytes) -> None:
    with pytest.raises(SourceError):
        FEEDS[feed].parse(body)


def test_payload_of_another_feed_is_rejected() -> None:
    # A mirror URL pointing at the wrong feed must fail, not produce nonsense rows.
    assert_raises_all = {
        "ecb": "cbr/XML_daily_2022-03-15.xml",
        "cbr": "ecb/eurofxref-daily_2024-02-27.xml",
        "nbu": "ecb/eurofxref-daily_2024-02-27.xml",
        "privatbank": "boc/FX_RATES_DAILY_start-2026-03-12_vcr.json",
        "boc": "nbu/statdirectory_exchange_2026-09-25.json",
        "bdi": "nb/EXR_B-NOK-SP_csvdata_2026-03-16_to_2026-03-24_vcr.csv",
        "nbp": "cnb/exrates_daily-year_2026_lang-EN_recorded-2026-04-02_vcr.json",
        "cnb": "nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json",
        "mnb": "nbk/get_rates_fdate-01.04.2026_vcr.xml",
        "nb": "boe/iadb-fromshowcolumns_26-XUDL-series_2026-03-17_to_2026-03-20_vcr.csv",
        "rba": "bdi/dailyRates_currencyIsoCode-EUR_2026-02-09_vcr.csv",
        "nbg": "nbrb/rates_periodicity-0_2026-03-17_vcr.json",
        "nbk": "mnb/GetExchangeRates_soap_2025-03-24_to_2025-03-28_vcr.xml",
        "nbrb": "nbg/currencies_date-2026-03-03_vcr.json",
        "sarb": "hkma/er-eeri-daily_end_of_day_2026-02-25_to_2026-02-28_vcr.json",
        "boe": "rba/f11.1-data_publication-2026-03-20_vcr.csv",
        "hkma": "nbp/cenyzlota_gold_2026-03-01_to_2026-03-05_vcr.json",
    }
    for feed, name in assert_raises_all.items():
        with pytest.raises(SourceError):
            FEEDS[feed].parse(payload(name))


# --------------------------------------------------------------------------- ECB


def test_ecb_daily_2024_keeps_published_digits() -> None:
    quotes = sources.parse_ecb(payload("ecb/eurofxref-daily_2024-02-27.xml"))
    rates = by_quote(quotes)
    assert {q.base for q in quotes} == {"EUR"}
    assert rates["USD"].rate == Decimal("1.0856")
    assert str(rates["GBP"].rate) == "0.85620"  # trailing zero kept, as published
    assert str(rates["HUF"].rate) == "390.20"
    assert str(rates["IDR"].rate) == "16976.12"
    assert rates["USD"].as_of == midnight(2024, 2, 27)
    assert "BGN" in rates and "RUB" not in rates and "HRK" not in rates
    assert [q.quote for q in quotes[:3]] == ["USD", "JPY", "BGN"]  # feed order kept


def test_ecb_older_files_with_rub_and_hrk() -> None:
    rates_2017 = by_quote(sources.parse_ecb(payload("ecb/eurofxref-daily_2017-03-08.xml")))
    assert rates_2017["RUB"].rate == Decimal("61.7573")
    assert rates_2017["HRK"].rate == Decimal("7.4213")
    rates_2022 = by_quote(sources.parse_ecb(payload("ecb/eurofxref-daily_2022-07-08.xml")))
    assert rates_2022["USD"].rate == Decimal("1.0163")
    assert str(rates_2022["GBP"].rate) == "0.84585"
    assert "HRK" in rates_2022 and "RUB" not in rates_2022  # RUB suspended in March 2022


def test_ecb_hist_90d_gives_all_61_days() -> None:
    hist = sources.parse_ecb(payload("ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml"))
    daily = sources.parse_ecb(payload("ecb/eurofxref-daily_2024-02-27.xml"))
    assert len(hist) == 1830  # every cube of all 61 days, for history
    days = Counter(q.as_of for q in hist)
    assert len(days) == 61 and set(days.values()) == {30}
    # The oldest cube is 2023-11-30 (the file name says 12-01).
    assert min(days) == midnight(2023, 11, 30) and max(days) == midnight(2024, 2, 27)
    newest = [q for q in hist if q.as_of == midnight(2024, 2, 27)]
    # Same day, same values; the hist file has double quotes and strips trailing zeros.
    assert {(q.quote, q.rate) for q in newest} == {(q.quote, q.rate) for q in daily}
    assert str(by_quote(newest)["GBP"].rate) == "0.8562"
    # The current table keeps the newest day per pair (updater.dedupe).
    from updater import dedupe

    assert dedupe(hist) == sorted(newest, key=lambda q: (q.base, q.quote))


def test_ecb_every_day_whatever_the_order() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01"
  xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref"><Cube>
<Cube time="2024-02-26"><Cube currency="USD" rate="1.0800"/></Cube>
<Cube time="2024-02-27"><Cube currency="USD" rate="1.0856"/></Cube>
</Cube></gesmes:Envelope>"""
    assert sources.parse_ecb(body) == [
        Quote("EUR", "USD", Decimal("1.0800"), midnight(2024, 2, 26)),
        Quote("EUR", "USD", Decimal("1.0856"), midnight(2024, 2, 27)),
    ]


def test_ecb_drops_unusable_rows_but_keeps_the_rest() -> None:
    rows = [
        ("USD", "1.0856"), ("JPY", "abc"), ("GBP", "-0.8"), ("CHF", "0"), ("XYZ1", "1.2"),
        ("EUR", "1"), ("SEK", ""), ("NOK", "1e-20"), ("PLN", "NaN"), ("btc", "0.00002"),
        ("CZK", "25,332"), ("huf", "390.20"),
    ]
    cubes = "".join(f"<Cube currency='{code}' rate='{rate}'/>" for code, rate in rows)
    body = (
        "<gesmes:Envelope xmlns:gesmes='http://www.gesmes.org/xml/2002-08-01' "
        "xmlns='http://www.ecb.int/vocabulary/2002-08-01/eurofxref'>"
        f"<Cube><Cube time='2024-02-27'>{cubes}</Cube></Cube></gesmes:Envelope>"
    ).encode()
    rates = by_quote(sources.parse_ecb(body))
    assert {code: str(q.rate) for code, q in rates.items()} == {"USD": "1.0856", "HUF": "390.20"}


def test_ecb_without_rates_or_date_is_an_error() -> None:
    no_rates = b"<Envelope><Cube><Cube time='2024-02-27'></Cube></Cube></Envelope>"
    no_date = b"<Envelope><Cube><Cube><Cube currency='USD' rate='1.08'/></Cube></Cube></Envelope>"
    for body in (no_rates, no_date):
        with pytest.raises(SourceError):
            sources.parse_ecb(body)


def test_xml_with_a_dtd_is_rejected() -> None:
    # Entity expansion needs a DTD; no genuine feed has one, HTML pages do.
    body = b"""<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaaaaaaaa">]>
<Envelope><Cube><Cube time='2024-02-27'><Cube currency='USD' rate='1.08'/></Cube></Cube>
</Envelope>"""
    with pytest.raises(SourceError, match="DTD"):
        sources.parse_ecb(body)


# --------------------------------------------------------------------------- NBU


def test_nbu_statdirectory_full_list() -> None:
    quotes = sources.parse_nbu(payload("nbu/statdirectory_exchange_2026-09-25.json"))
    rates = by_base(quotes)
    assert {q.quote for q in quotes} == {"UAH"}
    assert rates["USD"].rate == Decimal("44.9729")
    assert rates["EUR"].rate == Decimal("51.122")
    assert rates["HUF"].rate == Decimal("0.139594")  # already per 1 unit in this endpoint
    assert rates["LBP"].rate == Decimal("0.000502")
    assert rates["XAU"].rate == Decimal("191676.39")  # metals carry ISO 4217 codes too
    assert rates["USD"].as_of == midnight(2026, 9, 25)


def test_nbu_single_record_without_special_field() -> None:
    [quote] = sources.parse_nbu(payload("nbu/statdirectory_exchange_valcode-USD_2025-05-06.json"))
    assert quote == Quote("USD", "UAH", Decimal("41.6036"), midnight(2025, 5, 6))


def test_nbu_crlf_range_payload_gives_every_day_per_unit() -> None:
    body = payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json")
    assert b"}\r\n," in body  # the recorded CRLF framing is really there
    quotes = sources.parse_nbu(body)
    assert len(quotes) == 720  # 45 codes x 16 calendar days, weekends included
    first = by_base([q for q in quotes if q.as_of == midnight(2026, 3, 1)])
    assert first["USD"].rate == Decimal("43.2081")
    rates = by_base([q for q in quotes if q.as_of == midnight(2026, 3, 16)])
    assert len(rates) == 45
    assert rates["USD"].rate == Decimal("44.1381")
    # `rate` is for `units` units: 100 KZT = 9.0172 UAH, 1000 VND = 1.6789 UAH, 10 THB ...
    assert rates["KZT"].rate == Decimal("0.090172")
    assert rates["VND"].rate == Decimal("0.0016789")
    assert rates["THB"].rate == Decimal("1.37203")
    assert rates["LBP"].rate == Decimal("0.000492")


def test_nbu_range_rate_per_unit_agrees_with_rate_over_units() -> None:
    rows = json.loads(
        payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json"), parse_float=Decimal
    )
    by_day = {(r["cc"], r["exchangedate"]): r for r in rows}
    quotes = sources.parse_nbu(payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json"))
    for quote in quotes:
        row = by_day[(quote.base, f"{quote.as_of:%d.%m.%Y}")]
        assert quote.rate == row["rate_per_unit"] == row["rate"] / row["units"]


def test_nbu_xml_variant() -> None:
    quotes = sources.parse_nbu(payload("nbu/statdirectory_exchange_2019-02-18_xml-variant.xml"))
    rates = by_base(quotes)
    assert rates["AUD"].rate == Decimal("19.374292")
    assert rates["AUD"].as_of == midnight(2019, 2, 18)  # the next business day, published early


def test_nbu_mixed_dates_and_inconsistent_units() -> None:
    rows = [
        {"cc": "USD", "rate": 41.5, "exchangedate": "05.05.2025"},
        {"cc": "USD", "rate": 41.6036, "exchangedate": "06.05.2025"},
        {"cc": "EUR", "rate": 47.1, "exchangedate": "05.05.2025"},  # stale series: dropped
        {"cc": "HUF", "rate": 11.5, "units": 100, "rate_per_unit": 0.115,
         "exchangedate": "06.05.2025"},
        {"cc": "JPY", "rate": 2.9, "units": 10, "rate_per_unit": 2.9,  # disagree: dropped
         "exchangedate": "06.05.2025"},
        {"cc": "GBP", "rate": "bad", "exchangedate": "06.05.2025"},
        {"cc": "CHF", "rate": 50, "exchangedate": "31.02.2025"},  # impossible date
        "not a row",
    ]
    quotes = sources.parse_nbu(json.dumps(rows).encode())
    assert {(q.base, q.as_of.day, q.rate) for q in quotes} == {
        ("USD", 5, Decimal("41.5")),
        ("USD", 6, Decimal("41.6036")),
        ("HUF", 6, Decimal("0.115")),
    }


def test_nbu_json_error_object_and_future_day_empty_list() -> None:
    with pytest.raises(SourceError):
        sources.parse_nbu(b'{"message": "Wrong date format"}')
    with pytest.raises(SourceError):
        sources.parse_nbu(b"[]\r\n")  # NBU answers [] for a day it has no rates for


# --------------------------------------------------------------------------- CBR


def test_cbr_is_windows_1251_and_decoded_per_declaration() -> None:
    body = payload("cbr/XML_daily_2022-03-15.xml")
    assert body.startswith(b'<?xml version="1.0" encoding="windows-1251"?>')
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")  # Cyrillic names in cp1251 are not valid UTF-8
    as_utf8 = body.decode("cp1251").replace("windows-1251", "utf-8").encode("utf-8")
    assert sources.parse_cbr(as_utf8) == sources.parse_cbr(body)


def test_cbr_mis_declared_utf8_bytes_still_parse() -> None:
    # A re-encoded copy that still declares windows-1251 (seen in the wild): codes and
    # numbers are ASCII, so the rates must come out the same.
    body = payload("cbr/XML_daily_2022-03-15.xml")
    mis_declared = body.decode("cp1251").encode("utf-8")
    assert sources.parse_cbr(mis_declared) == sources.parse_cbr(body)


def test_cbr_2022_value_over_nominal() -> None:
    rates = by_base(sources.parse_cbr(payload("cbr/XML_daily_2022-03-15.xml")))
    assert {q.quote for q in rates.values()} == {"RUB"}
    assert rates["USD"].rate == Decimal("115.1963")
    assert rates["AMD"].rate == Decimal("0.223221")  # 100 AMD = 22,3221 RUB
    assert rates["JPY"].rate == Decimal("0.994486")  # 100 JPY = 99,4486 RUB
    assert rates["UZS"].rate == Decimal("0.0105423")  # 1000 UZS = 10,5423 RUB
    assert rates["KRW"].rate == Decimal("0.0927618")
    assert rates["USD"].as_of == midnight(2022, 3, 15)


def test_cbr_2026_saturday_and_tiny_rates() -> None:
    rates = by_base(sources.parse_cbr(payload("cbr/XML_daily_2026-04-25_saturday_vcr.xml")))
    assert rates["USD"].rate == Decimal("75.5273")
    assert rates["HUF"].rate == Decimal("0.240609")
    # 1,000,000 IRR = 53,9256 RUB; VunitRate is written "5,39256E-05".
    assert rates["IRR"].rate == Decimal("0.0000539256")
    assert rates["USD"].as_of == midnight(2026, 4, 25)  # a Saturday, as published


@pytest.mark.parametrize(
    "name", ["cbr/XML_daily_2024-03-28_vunitrate.xml", "cbr/XML_daily_2026-04-25_saturday_vcr.xml"]
)
def test_cbr_value_over_nominal_agrees_with_vunitrate(name: str) -> None:
    root = ET.fromstring(payload(name))
    rates = by_base(sources.parse_cbr(payload(name)))
    checked = 0
    for valute in root.iter("Valute"):

        def number(tag: str, valute: ET.Element = valute) -> Decimal:
            return Decimal(valute.findtext(tag, "").replace(",", "."))

        per_unit = number("Value") / number("Nominal")
        assert per_unit == number("VunitRate"), valute.findtext("CharCode")
        assert rates[valute.findtext("CharCode", "")].rate == per_unit
        checked += 1
    assert checked == len(rates)


def test_cbr_vunitrate_disagreeing_with_value_drops_the_row() -> None:
    body = (
        '<?xml version="1.0" encoding="windows-1251"?><ValCurs Date="28.03.2024">'
        "<Valute><CharCode>HUF</CharCode><Nominal>100</Nominal><Value>25,3878</Value>"
        "<VunitRate>25,3878</VunitRate></Valute>"  # a missed Nominal: 100x off
        "<Valute><CharCode>THB</CharCode><Nominal>10</Nominal><Value>25,4320</Value>"
        "<VunitRate>2,5432</VunitRate></Valute>"
        "<Valute><CharCode>XXX</CharCode><Nominal>0</Nominal><Value>1,0</Value></Valute>"
        "</ValCurs>"
    ).encode("cp1251")
    [quote] = sources.parse_cbr(body)
    assert (quote.base, quote.rate) == ("THB", Decimal("2.5432"))


def test_cbr_division_is_rounded_half_even_to_15_digits() -> None:
    body = (
        b'<ValCurs Date="01.04.2024">'
        b"<Valute><CharCode>AAA</CharCode><Nominal>3</Nominal><Value>1,0000</Value></Valute>"
        b"<Valute><CharCode>BBB</CharCode><Nominal>7</Nominal><Value>20,0000</Value></Valute>"
        b"</ValCurs>"
    )
    rates = by_base(sources.parse_cbr(body))
    assert rates["AAA"].rate == Decimal("0.333333333333333")
    assert rates["BBB"].rate == Decimal("2.85714285714286")  # 2.857142857142857... rounded


def test_cbr_error_body_and_missing_date() -> None:
    with pytest.raises(SourceError, match="Error in parameters"):
        sources.parse_cbr(payload("cbr/EDGE_error_in_parameters.xml"))
    no_date = (
        b"<ValCurs><Valute><CharCode>USD</CharCode><Nominal>1</Nominal>"
        b"<Value>92,5919</Value></Valute></ValCurs>"
    )
    with pytest.raises(SourceError):
        sources.parse_cbr(no_date)


# --------------------------------------------------------------------------- PrivatBank

NOW = datetime(2026, 11, 21, 16, 42, 37, 123456, tzinfo=UTC)


def test_privatbank_2018_mid_rur_and_btc() -> None:
    body = payload("privatbank/pubinfo_coursid5_committed-2018-04-23.json")
    quotes = sources.parse_privatbank(body, now=NOW)
    rates = by_base(quotes)
    assert set(rates) == {"USD", "EUR", "RUB"}  # RUR mapped, BTC (base USD) dropped
    assert {q.quote for q in quotes} == {"UAH"}
    assert str(rates["USD"].rate) == "26.07500"  # (25.95000 + 26.20000) / 2, exact
    assert rates["EUR"].rate == Decimal("32.125")
    assert rates["RUB"].rate == Decimal("0.4275")
    assert {q.as_of for q in quotes} == {datetime(2026, 11, 21, 16, 42, tzinfo=UTC)}


def test_privatbank_2019_narrow_spread() -> None:
    body = payload("privatbank/pubinfo_coursid3_committed-2019-07-25.json")
    rates = by_base(sources.parse_privatbank(body, now=NOW))
    assert rates["USD"].rate == Decimal("25.63658")
    assert rates["EUR"].rate == Decimal("28.6976")
    assert rates["RUB"].rate == Decimal("0.406585")


def test_privatbank_2024_shape() -> None:
    body = payload("privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json")
    rates = by_base(sources.parse_privatbank(body, now=NOW))
    assert {code: q.rate for code, q in rates.items()} == {
        "EUR": Decimal("41.1"),
        "USD": Decimal("38.1"),
    }


def test_privatbank_now_is_converted_to_utc_minute() -> None:
    kyiv = timezone(timedelta(hours=2))
    body = payload("privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json")
    quotes = sources.parse_privatbank(body, now=datetime(2026, 1, 5, 10, 7, 59, tzinfo=kyiv))
    assert {q.as_of for q in quotes} == {datetime(2026, 1, 5, 8, 7, tzinfo=UTC)}
    with pytest.raises(ValueError):
        sources.parse_privatbank(body, now=datetime(2026, 1, 5, 10, 7))  # naive


def test_privatbank_registry_parser_uses_the_clock() -> None:
    body = payload("privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json")
    before = datetime.now(UTC).replace(second=0, microsecond=0)
    quotes = FEEDS["privatbank"].parse(body)
    after = datetime.now(UTC)
    [as_of] = {q.as_of for q in quotes}
    assert before <= as_of <= after
    assert as_of.second == 0 and as_of.microsecond == 0 and as_of.tzinfo is UTC


def test_privatbank_duplicates_and_bad_rows() -> None:
    rows = [
        {"ccy": "RUR", "base_ccy": "UAH", "buy": "0.41000", "sale": "0.44500"},
        {"ccy": "RUB", "base_ccy": "UAH", "buy": "0.40000", "sale": "0.45000"},  # dup pair
        {"ccy": "usd", "base_ccy": "uah", "buy": "37.8", "sale": "38.4"},
        {"ccy": "EUR", "base_ccy": "UAH", "buy": "abc", "sale": "41.6"},
        {"ccy": "GBP", "base_ccy": "UAH", "buy": "0", "sale": "41.6"},
        {"ccy": "UAH", "base_ccy": "UAH", "buy": "1", "sale": "1"},
        {"ccy": "US", "base_ccy": "UAH", "buy": "1", "sale": "1"},
        {"ccy": "BTC", "base_ccy": "USD", "buy": "8477.8155", "sale": "9370.2171"},
        {"ccy": "PLN", "base_ccy": "UAH"},
        ["not", "a", "row"],
    ]
    rates = by_base(sources.parse_privatbank(json.dumps(rows).encode(), now=NOW))
    assert {code: q.rate for code, q in rates.items()} == {
        "RUB": Decimal("0.4275"),  # the first row for the pair wins
        "USD": Decimal("38.1"),
    }


# --------------------------------------------------------------------------- Bank of Canada


def test_boc_every_observation_per_series() -> None:
    quotes = sources.parse_boc(payload("boc/FX_RATES_DAILY_start-2026-03-12_vcr.json"))
    assert {q.quote for q in quotes} == {"CAD"}
    assert Counter(q.as_of.day for q in quotes) == {12: 23, 13: 23, 16: 23, 17: 23, 18: 23}
    rates = by_base([q for q in quotes if q.as_of == midnight(2026, 3, 18)])
    assert rates["USD"].rate == Decimal("1.3706")
    assert str(rates["JPY"].rate) == "0.008590"  # published digits kept
    assert rates["IDR"].rate == Decimal("0.000081")
    assert not {"MYR", "THB", "VND"} & set(rates)  # in seriesDetail, never observed


def test_boc_edge_drops_series_discontinued_in_2019() -> None:
    body = payload("boc/EDGE_FX_RATES_DAILY_recent-1_stale-2019-series_vcr.json")
    quotes = sources.parse_boc(body)
    rates = by_base(quotes)
    assert not {"MYR", "THB", "VND"} & set(rates)
    assert {q.as_of for q in quotes} == {midnight(2026, 3, 13)}
    assert rates["USD"].rate == Decimal("1.3716")
    # The live day is identical to the same day in the other recording.
    other = json.loads(payload("boc/FX_RATES_DAILY_start-2026-03-12_vcr.json"))
    [day] = [o for o in other["observations"] if o["d"] == "2026-03-13"]
    assert {q.base: str(q.rate) for q in quotes} == {
        key[2:5]: cell["v"] for key, cell in day.items() if key != "d"
    }


def test_boc_series_missing_from_the_newest_day_is_dropped() -> None:
    body = {
        "observations": [
            {"d": "2026-03-12", "FXUSDCAD": {"v": "1.3617"}, "FXEURCAD": {"v": "1.5693"}},
            {"d": "2026-03-13", "FXUSDCAD": {"v": "1.3716"}, "FXGBPCAD": {"v": "bad"},
             "FXCADUSD": {"v": "0.73"}, "FXXAUCAD": {}, "FXJPYCAD": "0.0086"},
        ]
    }
    # EUR's latest value is older than the feed's date: the whole series goes.
    assert sources.parse_boc(json.dumps(body).encode()) == [
        Quote("USD", "CAD", Decimal("1.3617"), midnight(2026, 3, 12)),
        Quote("USD", "CAD", Decimal("1.3716"), midnight(2026, 3, 13)),
    ]


def test_boc_without_observations_is_an_error() -> None:
    for body in (b'{"observations": []}', b'{"message": "Series not found"}',
                 b'{"observations": [{"d": "2026-03-13"}]}'):
        with pytest.raises(SourceError):
            sources.parse_boc(body)


# --------------------------------------------------------------------------- rate rules


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.85620", "0.85620"),  # published digits kept
        ("1.000000000000000000000", "1.000000000000000000000"),  # zeros do not count
        ("0.1000000000000005", "0.100000000000000"),  # 16 digits: half-even, down
        ("0.1000000000000015", "0.100000000000002"),  # 16 digits: half-even, up
        ("1E-12", "1E-12"),
        ("999999999999.999", "999999999999.999"),
        ("9.99E-13", None),
        ("1E+12", None),
        ("999999999999.9999", None),  # rounds up to 1e12
        ("0", None),
        ("-1.5", None),
        ("NaN", None),
        ("Infinity", None),
    ],
)
def test_normalize_rate(raw: str, expected: str | None) -> None:
    result = sources.normalize_rate(Decimal(raw))
    assert (None if result is None else str(result)) == expected


def test_quote_rejects_invalid_values() -> None:
    as_of = midnight(2024, 1, 1)
    bad = [
        ("usd", "EUR", Decimal("1"), as_of),
        ("USD", "USD", Decimal("1"), as_of),
        ("USD", "EUR", Decimal("0"), as_of),
        ("USD", "EUR", Decimal("0.1000000000000005"), as_of),
        ("USD", "EUR", 1.08, as_of),
        ("USD", "EUR", Decimal("1"), datetime(2024, 1, 1)),
        ("USD", "EUR", Decimal("1"), datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            Quote(*args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzzing

_VALID_BY_FEED = {feed: [name for f, name, *_ in VALID_FIXTURES if f == feed] for feed in FEEDS}


def _parse_or_source_error(feed: str, body: bytes) -> None:
    try:
        quotes = FEEDS[feed].parse(body)
    except SourceError:
        return
    assert quotes
    for quote in quotes:
        assert_valid(quote)


@pytest.mark.parametrize("feed", list(FEEDS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_recordings_never_crash(feed: str, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(_VALID_BY_FEED[feed]))
    body = bytearray(payload(name))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(body)))
    _parse_or_source_error(feed, bytes(body[:cut]))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["USD", "UAH", "1.08", "06.05.2025", "2026-03-13"]),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(
        st.sampled_from(["cc", "rate", "units", "rate_per_unit", "exchangedate", "ccy",
                         "base_ccy", "buy", "sale", "observations", "d", "FXUSDCAD", "v",
                         "rates", "code", "mid", "effectiveDate", "data", "cena", "currencyCode",
                         "amount", "validFor", "date", "currencies", "quantity", "Cur_ID",
                         "Cur_Abbreviation", "Cur_Scale", "Cur_OfficialRate", "Date", "Period",
                         "Timeseries", "Value", "header", "success", "result", "records",
                         "end_of_day", "usd"]),
        children,
        max_size=6,
    ),
    max_leaves=25,
)


@pytest.mark.parametrize("feed", ["nbu", "privatbank", "boc", "nbp", "cnb", "nbg", "nbrb", "sarb",
                                  "hkma"])
@settings(max_examples=150, deadline=None)
@given(value=_json_values)
def test_arbitrary_json_never_crashes(feed: str, value: object) -> None:
    _parse_or_source_error(feed, json.dumps(value).encode())


# --------------------------------------------------------------------------- demo


def test_demo_is_deterministic_and_ticks_align() -> None:
    now = datetime(2026, 11, 21, 16, 42, 37, tzinfo=UTC)
    first = sources.demo_quotes(now)
    assert first == sources.demo_quotes(now)
    # Any instant inside the same 600 s tick gives the same rates, stamped at the tick start.
    assert first == sources.demo_quotes(datetime(2026, 11, 21, 16, 49, 59, tzinfo=UTC))
    assert {q.as_of for q in first} == {datetime(2026, 11, 21, 16, 40, tzinfo=UTC)}
    assert first != sources.demo_quotes(now + timedelta(seconds=600))
    hourly = sources.demo_quotes(now, interval_s=3600)
    assert {q.as_of for q in hourly} == {datetime(2026, 11, 21, 16, 0, tzinfo=UTC)}


def test_demo_table_is_realistic() -> None:
    quotes = sources.demo_quotes(datetime(2026, 11, 21, tzinfo=UTC))
    rates = by_quote(quotes)
    assert 28 <= len(quotes) <= 35
    assert {q.base for q in quotes} == {"EUR"}
    for code, around in {"USD": 1.08, "JPY": 160, "GBP": 0.85, "CHF": 0.95}.items():
        assert abs(float(rates[code].rate) / around - 1) < 0.15, code
    for quote in quotes:
        assert_valid(quote)
        assert len(quote.rate.as_tuple().digits) <= 7  # published-style precision


def test_demo_consecutive_ticks_move_less_than_half_a_percent() -> None:
    start = datetime(2026, 11, 21, tzinfo=UTC)
    previous = by_quote(sources.demo_quotes(start))
    drift = Counter[str]()
    for step in range(1, 300):
        current = by_quote(sources.demo_quotes(start + timedelta(seconds=600 * step)))
        assert current.keys() == previous.keys()
        for code, quote in current.items():
            change = abs(quote.rate / previous[code].rate - 1)
            assert change < Decimal("0.005"), (code, step, change)
            drift[code] += change > 0
        previous = current
    assert all(moves > 100 for moves in drift.values())  # it does walk


def test_demo_rejects_naive_time() -> None:
    with pytest.raises(ValueError):
        sources.demo_quotes(datetime(2026, 11, 21))


# --------------------------------------------------------------------------- fetch

HANG_LIMIT_S = 10.0  # a hanging handler gives up by itself even if a test forgets it


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


class FeedServer:
    """A real HTTP server on 127.0.0.1 that plays scripted replies per path."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.port = self.httpd.server_address[1]
        # A short poll interval keeps shutdown() (and so each test's teardown) fast.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def serve(self, path: str, *replies: Reply) -> str:
        """Script replies for `path` (the last one repeats); returns its URL."""
        self.scripts[path] = list(replies)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def next_reply(self, path: str, user_agent: str) -> Reply:
        with self._lock:
            self.hits[path] += 1
            self.user_agents.append(user_agent)
            script = self.scripts.get(path) or [Reply(404, b"not found")]
            return script.pop(0) if len(script) > 1 else script[0]


def _make_handler(feed_server: FeedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            feed_server.posts.append((self.path, dict(self.headers), self.rfile.read(length)))
            self.do_GET()

        def do_GET(self) -> None:
            reply = feed_server.next_reply(self.path, self.headers.get("User-Agent", ""))
            if reply.hang:
                # Hang until the test is over (or the safety deadline), then drop the line.
                feed_server.release.wait(HANG_LIMIT_S)
                self.close_connection = True
                return
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            except OSError:
                pass  # the client gave up; nothing to report

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

    return Handler


@pytest.fixture
def server() -> Iterator[FeedServer]:
    feed_server = FeedServer()
    feed_server.thread.start()
    try:
        yield feed_server
    finally:
        feed_server.release.set()  # end any hanging handler before shutting down
        feed_server.httpd.shutdown()
        feed_server.httpd.server_close()
        feed_server.thread.join(timeout=5)


async def test_fetch_returns_the_exact_bytes(server: FeedServer) -> None:
    body = payload("cbr/XML_daily_2026-04-25_saturday_vcr.xml")
    url = server.serve("/scripts/XML_daily.asp", Reply(200, body, {"Content-Type": "text/xml"}))
    async with sources.make_client() as client:
        assert await sources.fetch(client, url) == body
    assert server.hits["/scripts/XML_daily.asp"] == 1
    assert server.user_agents == ["xrates/0.1"]


async def test_fetch_retries_a_5xx_then_succeeds(
    server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = payload("ecb/eurofxref-daily_2024-02-27.xml")
    url = server.serve("/ecb", Reply(500, b"oops"), Reply(503), Reply(200, body))
    caplog.set_level(logging.WARNING, logger="xrates.sources")
    async with sources.make_client() as client:
        got = await sources.fetch(client, url, attempts=3, backoff_s=0.01)
    assert got == body
    assert server.hits["/ecb"] == 3
    # Exponential backoff: 0.01 s, then 0.02 s.
    assert [m for m in caplog.messages if "retrying in" in m] == [
        f"GET {url} attempt 1/3 failed (HTTP 500); retrying in 0.01 s",
        f"GET {url} attempt 2/3 failed (HTTP 503); retrying in 0.02 s",
    ]


async def test_fetch_gives_up_after_all_attempts(server: FeedServer) -> None:
    url = server.serve("/down", Reply(502, b"bad gateway"))
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match=r"/down failed after 4 attempt\(s\): HTTP 502"):
            await sources.fetch(client, url, attempts=4, backoff_s=0.001)
    assert server.hits["/down"] == 4


async def test_fetch_does_not_retry_a_4xx(server: FeedServer) -> None:
    url = server.serve("/missing", Reply(404, b"no"), Reply(200, b"would succeed"))
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match="HTTP 404") as caught:
            await sources.fetch(client, url, attempts=3, backoff_s=0.001)
    assert url in str(caught.value)
    assert server.hits["/missing"] == 1


async def test_fetch_does_not_retry_a_200_with_garbage(server: FeedServer) -> None:
    body = payload("nbu/EDGE_html_redirect_page_mistyped_path.html")
    url = server.serve("/nbu", Reply(200, body))
    async with sources.make_client() as client:
        got = await sources.fetch(client, url, attempts=3, backoff_s=0.001)
    assert server.hits["/nbu"] == 1
    with pytest.raises(SourceError):
        sources.parse_nbu(got)


async def test_fetch_times_out_a_hanging_server_quickly(server: FeedServer) -> None:
    url = server.serve("/slow", Reply(hang=True))
    started = time.monotonic()
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match=r"after 2 attempt\(s\): timed out after 0.2 s"):
            await sources.fetch(client, url, timeout_s=0.2, attempts=2, backoff_s=0.01)
    assert time.monotonic() - started < 2.0
    assert server.hits["/slow"] == 2


async def test_fetch_treats_a_redirect_as_failure(server: FeedServer) -> None:
    url = server.serve("/old", Reply(302, b"", {"Location": "/new"}))
    server.serve("/new", Reply(200, b"should not be fetched"))
    # Even a client configured to follow redirects must not follow them for feeds.
    async with httpx.AsyncClient(follow_redirects=True) as client:
        with pytest.raises(FetchError, match="HTTP 302"):
            await sources.fetch(client, url, attempts=3, backoff_s=0.001)
    assert server.hits["/old"] == 1
    assert server.hits["/new"] == 0


async def test_fetch_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://user:secret@127.0.0.1:{port}/feed"
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match=r"after 2 attempt\(s\): ConnectError") as caught:
            await sources.fetch(client, url, timeout_s=1.0, attempts=2, backoff_s=0.001)
    assert "secret" not in str(caught.value)  # credentials never reach logs or run records


async def test_fetch_invalid_url_fails_without_retry() -> None:
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match="UnsupportedProtocol"):
            await sources.fetch(client, "ftp://example.invalid/feed", attempts=3)


async def test_fetch_caps_the_body_size(
    server: FeedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_BODY_BYTES", 1000)
    url = server.serve("/huge", Reply(200, b"x" * 5000))
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match="body over 1000 bytes"):
            await sources.fetch(client, url, attempts=3, backoff_s=0.001)
    assert server.hits["/huge"] == 1


async def test_make_client_settings() -> None:
    async with sources.make_client() as client:
        assert client.headers["User-Agent"] == "xrates/0.1"
        assert client.follow_redirects is False
        assert client.timeout.read == 10.0 and client.timeout.connect == 5.0


# =========================================================================== the twelve new sources


def on_day(quotes: list[Quote], year: int, month: int, dom: int) -> dict[tuple[str, str], Decimal]:
    return {(q.base, q.quote): q.rate for q in quotes if q.as_of == midnight(year, month, dom)}


def _all_sarb() -> list[bytes]:
    return [path.read_bytes() for path in sorted((FIXTURES / "sarb").glob("*.json"))]


def _nbrb_payloads() -> list[bytes]:
    return [payload("nbrb/rates_periodicity-0_2026-03-17_vcr.json")] + [
        payload(name) for name in NBRB_DYNAMICS
    ]


def test_bdi_foreign_per_euro_na_dropped_repeats_merged() -> None:
    body = payload("bdi/dailyRates_currencyIsoCode-EUR_2026-02-11_vcr.csv")
    assert b",BYN,280,N.A.," in body and body.count(b",XCD,137,") > 1
    assert "# Banca d\u2019Italia" in body.decode()  # the UTF-8 disclaimer block is skipped
    rates = by_quote(sources.parse_bdi(body))
    assert {q.base for q in rates.values()} == {"EUR"}
    assert str(rates["JPY"].rate) == "182.7900"  # as published, trailing zeros kept
    assert not {"BYN", "IRR", "KPW", "RUB", "EUR"} & set(rates)
    assert {"ZWG", "SLE", "VES", "XCG", "BMD", "BTN", "FKP", "KYD", "SHP"} <= set(rates)
    three = FEEDS["bdi"].parse_payloads([
        payload(f"bdi/dailyRates_currencyIsoCode-EUR_2026-02-{d}_vcr.csv") for d in ("09", "10", "11")
    ])
    assert len(three) == 450 and len({q.as_of for q in three}) == 3


def test_bdi_other_rate_convention_is_not_guessed() -> None:
    body = payload("bdi/dailyRates_currencyIsoCode-EUR_2026-02-11_vcr.csv").replace(
        b"JAPAN,Japanese Yen,JPY,071,182.7900,Foreign currency amount for 1 Euro.",
        b"JAPAN,Japanese Yen,JPY,071,182.7900,Euro amount for 1 unit of foreign currency.")
    assert "JPY" not in by_quote(sources.parse_bdi(body))


def test_nbp_tables_a_b_and_gold() -> None:
    a = payload("nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json")
    b = payload("nbp/exchangerates_tables-B_2026-03-01_to_2026-03-05_vcr.json")
    gold = payload("nbp/cenyzlota_gold_2026-03-01_to_2026-03-05_vcr.json")
    table_a = sources.parse_nbp(a)
    assert [on_day(table_a, 2026, 3, d)[("USD", "PLN")] for d in (2, 3, 4, 5)] == [
        Decimal("3.6056"), Decimal("3.6820"), Decimal("3.6770"), Decimal("3.6771")]
    assert on_day(table_a, 2026, 3, 2)[("HUF", "PLN")] == Decimal("0.011155")
    assert on_day(table_a, 2026, 3, 2)[("XDR", "PLN")]  # "SDR (MFW)" carries the ISO code
    table_b = by_base(sources.parse_nbp(b))
    assert table_b["MGA"] == Quote("MGA", "PLN", Decimal("0.000881"), midnight(2026, 3, 4))
    [first, *_] = sources.parse_nbp(gold)
    # 595.71 PLN per gram; XAU is one troy ounce (31.1034768 g), exact here.
    assert first == Quote("XAU", "PLN", Decimal("595.71") * Decimal("31.1034768"),
                          midnight(2026, 3, 2))
    # One run: weekly table B (03-04) is not stale beside daily table A (03-05).
    run = FEEDS["nbp"].parse_payloads([a, b, gold])
    assert len(run) == 128 + 116 + 4
    assert not {q.base for q in table_a} & set(table_b)  # the tables do not overlap


def test_cnb_rate_per_amount_all_days_of_the_year() -> None:
    quotes = sources.parse_cnb(payload("cnb/exrates_daily-year_2026_lang-EN_recorded-2026-04-02_vcr.json"))
    last = on_day(quotes, 2026, 4, 2)
    assert last[("JPY", "CZK")] == Decimal("0.13338")  # 13.338 CZK per 100 JPY
    assert last[("IDR", "CZK")] == Decimal("0.001253")  # per 1000 IDR
    assert last[("XDR", "CZK")] and len(last) == 30
    assert on_day(quotes, 2026, 1, 2)[("AUD", "CZK")] == Decimal("13.797")
    with pytest.raises(SourceError, match="cnb: payload holds no usable rates"):
        sources.parse_cnb(b'{"rates":[]}')  # a year before its first fixing


def test_mnb_soap_escaped_result_decimal_comma_and_unit() -> None:
    body = payload("mnb/GetExchangeRates_soap_2025-03-24_to_2025-03-28_vcr.xml")
    assert b"&lt;MNBExchangeRates&gt;" in body  # the payload is XML inside SOAP text
    quotes = sources.parse_mnb(body)
    assert on_day(quotes, 2025, 3, 28)[("JPY", "HUF")] == Decimal("2.4817")  # 248,17 per 100
    assert on_day(quotes, 2025, 3, 28)[("USD", "HUF")] == Decimal("373.72")
    assert on_day(quotes, 2025, 3, 24)[("USD", "HUF")] == Decimal("367.60")  # days newest first
    fault = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
             b"<faultstring>Server was unable to process request</faultstring></s:Fault>"
             b"</s:Body></s:Envelope>")
    with pytest.raises(SourceError, match="unable to process request"):
        sources.parse_mnb(fault)


def test_nb_unit_mult_and_indices() -> None:
    quotes = sources.parse_nb(payload("nb/EXR_B-NOK-SP_csvdata_2026-03-16_to_2026-03-24_vcr.csv"))
    last = on_day(quotes, 2026, 3, 24)
    assert last[("HUF", "NOK")] == Decimal("0.028805")  # 2.8805 NOK per 100 HUF (UNIT_MULT 2)
    assert last[("USD", "NOK")] == Decimal("9.7049")
    assert last[("XDR", "NOK")] == Decimal("13.2271")
    assert not {"I44", "TWI"} & {q.base for q in quotes}


def test_rba_bom_padding_sdr_and_sparse_columns() -> None:
    body = payload("rba/f11.1-data_publication-2026-03-20_vcr.csv")
    assert body.startswith(b"\xef\xbb\xbfF11.1  EXCHANGE RATES") and body.endswith(b"\n" * 1000)
    quotes = sources.parse_rba(body)
    last = on_day(quotes, 2026, 3, 20)
    assert last[("AUD", "USD")] == Decimal("0.7088")
    assert last[("AUD", "XDR")] == Decimal("0.5217")  # SDR mapped to ISO XDR
    assert last[("AUD", "PGK")] == Decimal("3.0565")
    assert on_day(quotes, 2023, 1, 3)[("AUD", "USD")] == Decimal("0.6828")
    codes = {q.quote for q in quotes}
    assert not {"AED", "ZAR", "SDR", "IND"} & codes and len(codes) == 20  # index column dropped
    assert not any(q.quote == "PGK" and q.as_of < midnight(2026, 1, 7) for q in quotes)


def test_nbg_date_from_the_body_and_holiday_repeat() -> None:
    monday = sources.parse_nbg(payload("nbg/currencies_date-2026-03-02_vcr.json"))
    # Requested for 03-02, the body's set is the one in force since Saturday 02-28.
    assert {q.as_of for q in monday} == {midnight(2026, 2, 28)}
    assert by_base(monday)["AMD"].rate == Decimal("0.007096")  # 7.0960 GEL per 1000 AMD
    holiday = payload("nbg/EDGE_currencies_date-2026-03-04_identical-to-03-03_vcr.json")
    assert holiday == payload("nbg/currencies_date-2026-03-03_vcr.json")
    run = FEEDS["nbg"].parse_payloads([payload("nbg/currencies_date-2026-03-02_vcr.json"),
                                       payload("nbg/currencies_date-2026-03-03_vcr.json"), holiday])
    assert len(run) == 84  # 03-04 repeats 03-03: no third day invented
    assert {q.as_of for q in run} == {midnight(2026, 2, 28), midnight(2026, 3, 3)}


def test_nbk_quant_and_empty_index() -> None:
    body = payload("nbk/get_rates_fdate-01.04.2026_vcr.xml")
    assert b"<index></index>" in body
    rates = by_base(sources.parse_nbk(body))
    assert rates["IRR"] == Quote("IRR", "KZT", Decimal("0.0004"), midnight(2026, 4, 1))
    assert rates["AMD"].rate == Decimal("1.272")  # 12.72 KZT per 10 AMD
    assert rates["AUD"].rate == Decimal("328.01") and "XDR" in rates


def test_nbrb_list_and_dynamics_by_cur_id() -> None:
    rates = by_base(sources.parse_nbrb(payload("nbrb/rates_periodicity-0_2026-03-17_vcr.json")))
    assert rates["IRR"].rate == Decimal("0.000002229")  # 0.2229 BYN per 100000 IRR
    assert rates["AMD"].rate == Decimal("0.0078014")
    run = FEEDS["nbrb"].parse_payloads(_nbrb_payloads())
    assert len(run) == 30 * 17  # 17 calendar days per currency; 03-17 twice, identical
    assert on_day(run, 2026, 3, 8)[("USD", "BYN")] == Decimal("2.9013")  # a Sunday, as published
    assert on_day(run, 2026, 3, 1)[("IRR", "BYN")] == _per(on_day_raw("461", "2026-03-01"), 100000)


def on_day_raw(cur_id: str, day: str) -> Decimal:
    [name] = [n for n in NBRB_DYNAMICS if f"_{cur_id}-" in n]
    [row] = [r for r in json.loads(payload(name), parse_float=Decimal) if r["Date"].startswith(day)]
    return row["Cur_OfficialRate"]


def _per(value: Decimal, units: int) -> Decimal:
    return value / units


def test_sarb_titles_give_codes_and_mixed_direction() -> None:
    run = FEEDS["sarb"].parse_payloads(_all_sarb())
    assert len(run) == 23 * 4
    # 2026-03-23 was requested, and is missing from every series.
    assert {q.as_of.day for q in run} == {24, 25, 26, 27}
    last = on_day(run, 2026, 3, 27)
    assert last[("USD", "ZAR")] == Decimal("17.1302")  # "Rand per US Dollar"
    assert last[("ZAR", "KRW")] == Decimal("87.9759")  # "South Korea: Won per Rand"
    assert {pair for pair in last if "ZAR" == pair[1]} == {("USD", "ZAR"), ("GBP", "ZAR"),
                                                           ("EUR", "ZAR")}
    unknown = b'[{"Period":"2026-03-27T00:00:00","Timeseries":"Mars: Credit per Rand","Value":1.5}]'
    with pytest.raises(SourceError, match="sarb: payload holds no usable rates"):
        sources.parse_sarb(unknown)


def test_boe_series_codes_crlf() -> None:
    body = payload("boe/iadb-fromshowcolumns_26-XUDL-series_2026-03-17_to_2026-03-20_vcr.csv")
    assert body.endswith(b"\r\n")
    first = on_day(sources.parse_boe(body), 2026, 3, 17)
    assert len(first) == 26
    assert first[("GBP", "USD")] == Decimal("1.3343")
    assert first[("GBP", "CZK")] == Decimal("28.3025")  # XUDLBK25
    assert first[("GBP", "RON")] == Decimal("5.8963")  # XUDLZOS4


def test_hkma_float_noise_nulls_and_indices() -> None:
    body = payload("hkma/er-eeri-daily_end_of_day_2026-02-25_to_2026-02-28_vcr.json")
    assert b'"usd":7.8245000000000005' in body
    quotes = sources.parse_hkma(body)
    last = on_day(quotes, 2026, 2, 28)  # a Saturday, as published
    assert str(last[("USD", "HKD")]) == "7.8245"
    assert last[("IDR", "HKD")] == Decimal("0.0004666")
    assert {q.base for q in quotes} == {
        "USD", "GBP", "JPY", "CAD", "AUD", "SGD", "TWD", "CHF", "CNY", "KRW", "THB", "MYR", "EUR",
        "PHP", "INR", "IDR", "ZAR"}  # no DEM..ITL (null), no XDR (null on the newest day)
    error = b'{"header":{"success":false,"err_code":"1001","err_msg":"Invalid parameter"}}'
    with pytest.raises(SourceError, match="Invalid parameter"):
        sources.parse_hkma(error)


# Per source: a renamed element or column, as a changed feed would send it.
RENAMES = {
    "ecb": ("ecb/eurofxref-daily_2024-02-27.xml", b"time=", b"tyme="),
    "nbu": ("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json", b'"exchangedate"', b'"date"'),
    "cbr": ("cbr/XML_daily_2024-03-28_vunitrate.xml", b"Valute", b"Valuta"),
    "privatbank": ("privatbank/pubinfo_coursid5_committed-2018-04-23.json", b'"buy"', b'"bid"'),
    "boc": ("boc/FX_RATES_DAILY_start-2026-03-12_vcr.json", b'"observations"', b'"obs"'),
    "bdi": ("bdi/dailyRates_currencyIsoCode-EUR_2026-02-09_vcr.csv", b"ISO Code", b"ISO"),
    "nbp": ("nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json", b"effectiveDate", b"date"),
    "cnb": ("cnb/exrates_daily-year_2026_lang-EN_recorded-2026-04-02_vcr.json", b'"rates"', b'"r"'),
    "mnb": ("mnb/GetExchangeRates_soap_2025-03-24_to_2025-03-28_vcr.xml", b"ExchangeRatesResult",
            b"RatesResult"),
    "nb": ("nb/EXR_B-NOK-SP_csvdata_2026-03-16_to_2026-03-24_vcr.csv", b"OBS_VALUE", b"VALUE"),
    "rba": ("rba/f11.1-data_publication-2026-03-20_vcr.csv", b"\nUnits,", b"\nUnit,"),
    "nbg": ("nbg/currencies_date-2026-03-03_vcr.json", b'"currencies"', b'"list"'),
    "nbk": ("nbk/get_rates_fdate-01.04.2026_vcr.xml", b"date>", b"day>"),
    "nbrb": ("nbrb/rates_periodicity-0_2026-03-17_vcr.json", b"Cur_OfficialRate", b"Cur_Rate"),
    "sarb": (f"sarb/{sorted((FIXTURES / 'sarb').glob('*.json'))[0].name}", b"Timeseries", b"Series"),
    "boe": ("boe/iadb-fromshowcolumns_26-XUDL-series_2026-03-17_to_2026-03-20_vcr.csv", b"DATE,",
            b"DAY,"),
    "hkma": ("hkma/er-eeri-daily_end_of_day_2026-02-25_to_2026-02-28_vcr.json", b'"records"',
             b'"rows"'),
}


def test_every_feed_has_a_shape_change_case() -> None:
    assert set(RENAMES) == set(FEEDS)


@pytest.mark.parametrize("feed", list(RENAMES))
def test_renamed_element_or_column_fails_cleanly(feed: str) -> None:
    name, old, new = RENAMES[feed]
    body = payload(name)
    assert old in body
    with pytest.raises(SourceError, match=rf"^{feed}: "):
        FEEDS[feed].parse(body.replace(old, new))


@pytest.mark.parametrize("feed", list(RENAMES))
def test_payload_cut_in_half_fails_cleanly(feed: str) -> None:
    body = payload(RENAMES[feed][0])
    with pytest.raises(SourceError, match=rf"^{feed}: "):
        FEEDS[feed].parse(body[: len(body) // 2])


@pytest.mark.parametrize("feed", ["bdi", "nb", "rba", "boe"])
def test_csv_row_with_a_missing_field_fails(feed: str) -> None:
    name = RENAMES[feed][0]
    lines = payload(name).split(b"\n")
    row = next(i for i, line in enumerate(lines) if line[:1].isdigit() or line[:2] in (b"AF", b"B,"))
    lines[row] = lines[row].rsplit(b",", 1)[0]
    with pytest.raises(SourceError, match=rf"^{feed}: .*fields"):
        FEEDS[feed].parse(b"\n".join(lines))


# =========================================================================== requests


def urls(requests: list[sources.Request]) -> list[str]:
    return [request.url for request in requests]


def test_daily_request_plans() -> None:
    assert urls(FEEDS["nbp"].daily_requests(date(2026, 3, 5))) == [
        "https://api.nbp.pl/api/exchangerates/tables/A/2026-02-27/2026-03-05/?format=json",
        "https://api.nbp.pl/api/exchangerates/tables/B/2026-02-20/2026-03-05/?format=json",
        "https://api.nbp.pl/api/cenyzlota/2026-02-27/2026-03-05/?format=json",
    ]
    assert urls(FEEDS["nbk"].daily_requests(date(2026, 4, 1))) == [
        "https://nationalbank.kz/rss/get_rates.cfm?fdate=01.04.2026"]
    base = "https://tassidicambio.bancaditalia.it/terzevalute-wf-web/rest/v1.0/dailyRates"
    assert urls(FEEDS["bdi"].daily_requests(date(2026, 2, 9))) == [  # a Monday: Friday too
        f"{base}?currencyIsoCode=EUR&lang=en&referenceDate=2026-02-06",
        f"{base}?currencyIsoCode=EUR&lang=en&referenceDate=2026-02-09"]
    assert urls(FEEDS["nbg"].daily_requests(date(2026, 3, 2))) == [
        "https://nbg.gov.ge/gw/api/ct/monetarypolicy/currencies/?date=2026-03-02"]
    assert urls(FEEDS["cnb"].daily_requests(date(2026, 1, 3))) == [
        "https://api.cnb.cz/cnbapi/exrates/daily-year?lang=EN&year=2025",
        "https://api.cnb.cz/cnbapi/exrates/daily-year?lang=EN&year=2026"]
    assert urls(FEEDS["cnb"].daily_requests(date(2026, 4, 2))) == [
        "https://api.cnb.cz/cnbapi/exrates/daily-year?lang=EN&year=2026"]
    [boe] = urls(FEEDS["boe"].daily_requests(date(2026, 3, 20)))
    assert boe.startswith("https://www.bankofengland.co.uk/boeapps/database/_iadb-fromshowcolumns"
                          ".asp?CSVF=TN&Datefrom=14/Mar/2026&Dateto=20/Mar/2026&SeriesCodes=XUDLUSS,")
    assert boe.endswith(",XUDLZOS4&UsingCodes=Y&csv.x=yes")
    sarb = urls(FEEDS["sarb"].daily_requests(date(2026, 3, 27)))
    assert len(sarb) == 23 and sarb[0] == (
        "https://custom.resbank.co.za/SarbWebApi/WebIndicators/Shared/GetTimeseriesObservations/"
        "EXCX135D/2026-03-21T00:00:00/2026-03-27T00:00:00")
    [mnb] = FEEDS["mnb"].daily_requests(date(2025, 3, 28))
    assert (mnb.method, mnb.url) == ("POST", "http://www.mnb.hu/arfolyamok.asmx")
    assert b"<web:startDate>2025-03-22</web:startDate><web:endDate>2025-03-28</web:endDate>" in mnb.body
    assert dict(mnb.headers)["SOAPAction"].endswith("/MNBArfolyamServiceSoap/GetExchangeRates")


def test_history_request_plans() -> None:
    assert FEEDS["privatbank"].history_requests is None
    assert all(FEEDS[name].history_requests for name in FEEDS if name != "privatbank")
    today = date(2026, 3, 17)
    nbrb = urls(FEEDS["nbrb"].history_requests(today, 17))
    assert nbrb[0] == "https://api.nbrb.by/exrates/rates?periodicity=0" and len(nbrb) == 31
    assert nbrb[7] == ("https://api.nbrb.by/exrates/rates/dynamics/431?endDate=2026-03-17"
                       "&startDate=2026-03-01")
    assert urls(FEEDS["nbk"].history_requests(date(2026, 4, 3), 3)) == [
        f"https://nationalbank.kz/rss/get_rates.cfm?fdate=0{d}.04.2026" for d in (1, 2, 3)]
    assert len(FEEDS["bdi"].history_requests(date(2026, 2, 15), 14)) == 10  # business days
    assert urls(FEEDS["ecb"].history_requests(today, 90)) == [
        "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-hist-90d.xml"]
    assert urls(FEEDS["boc"].history_requests(today, 6)) == [
        "https://www.bankofcanada.ca/valet/observations/group/FX_RATES_DAILY/json"
        "?start_date=2026-03-12"]
    # NBP serves <= 93 days per request: 200 days take three windows of each kind.
    nbp = urls(FEEDS["nbp"].history_requests(today, 200))
    assert len(nbp) == 9 and nbp[0].endswith("/tables/A/2025-12-15/2026-03-17/?format=json")
    hkma = urls(FEEDS["hkma"].history_requests(today, 250))
    assert len(hkma) == 3 and "from=2025-12-08&to=2026-03-17" in hkma[0]
    assert urls(FEEDS["cnb"].history_requests(today, 500)) == [
        f"https://api.cnb.cz/cnbapi/exrates/daily-year?lang=EN&year={y}" for y in (2024, 2025, 2026)]


def test_override_replaces_only_scheme_host_and_port() -> None:
    url = "https://api.nbp.pl/api/exchangerates/tables/A/2026-02-27/2026-03-05/?format=json"
    assert sources.override_url(url, "http://127.0.0.1:8080") == (
        "http://127.0.0.1:8080/api/exchangerates/tables/A/2026-02-27/2026-03-05/?format=json")
    assert sources.override_url(url, "http://mirror.invalid/") == (
        "http://mirror.invalid/api/exchangerates/tables/A/2026-02-27/2026-03-05/?format=json")
    assert sources.override_url(url, "https://u:p@proxy.invalid:8443").startswith(
        "https://u:p@proxy.invalid:8443/api/")
    assert sources.override_url(url, None) == url and sources.override_url(url, "") == url
    for bad in ("ftp://mirror.invalid", "mirror.invalid:80", "http://", "http://u:secret@m/x"):
        with pytest.raises(SourceError) as caught:
            sources.override_url(url, bad)
        assert "secret" not in str(caught.value)


def test_override_with_a_path_keeps_its_full_url_meaning_for_the_five_feeds() -> None:
    ecb = FEEDS["ecb"]
    plan = ecb.daily_requests(date(2024, 2, 27))
    [full] = sources.planned_requests(ecb, plan, "http://127.0.0.1:9/mirror/ecb.xml")
    assert full.url == "http://127.0.0.1:9/mirror/ecb.xml"
    [origin] = sources.planned_requests(ecb, plan, "http://127.0.0.1:9")
    assert origin.url == "http://127.0.0.1:9/stats/eurofxref/eurofxref-daily.xml"
    nbp = FEEDS["nbp"]
    with pytest.raises(SourceError, match=r"nbp: override 'http://\*\*\*@m.invalid/api' has a path"):
        sources.planned_requests(nbp, nbp.daily_requests(date(2026, 3, 5)), "http://u:pw@m.invalid/api")
    cbr = FEEDS["cbr"]  # a full URL cannot stand for one request per day
    with pytest.raises(SourceError, match="has a path"):
        sources.planned_requests(cbr, cbr.history_requests(date(2026, 3, 5), 3), "http://m.invalid/x")


async def test_fetch_quotes_makes_every_request_of_a_run(server: FeedServer) -> None:
    files = {
        "/api/exchangerates/tables/A/2026-02-27/2026-03-05/?format=json":
            "nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json",
        "/api/exchangerates/tables/B/2026-02-20/2026-03-05/?format=json":
            "nbp/exchangerates_tables-B_2026-03-01_to_2026-03-05_vcr.json",
        "/api/cenyzlota/2026-02-27/2026-03-05/?format=json":
            "nbp/cenyzlota_gold_2026-03-01_to_2026-03-05_vcr.json",
    }
    for path, name in files.items():
        server.serve(path, Reply(200, payload(name)))
    async with sources.make_client() as client:
        quotes = await sources.fetch_quotes(FEEDS["nbp"], client, today=date(2026, 3, 5),
                                            url_override=server.url(""), attempts=1)
    assert len(quotes) == 248 and all(server.hits[path] == 1 for path in files)

    # One failing request fails the whole source, naming it and its URL without credentials.
    server.serve("/api/cenyzlota/2026-02-27/2026-03-05/?format=json", Reply(500))
    override = f"http://user:secret@127.0.0.1:{server.port}"
    async with sources.make_client() as client:
        with pytest.raises(FetchError, match=r"^nbp: GET http://\*\*\*@127.0.0.1:\d+/api/cenyzlota/"
                                             r".*HTTP 500") as caught:
            await sources.fetch_quotes(FEEDS["nbp"], client, today=date(2026, 3, 5),
                                       url_override=override, attempts=1)
    assert "secret" not in str(caught.value)


async def test_fetch_quotes_posts_the_soap_request(server: FeedServer) -> None:
    server.serve("/arfolyamok.asmx", Reply(200, payload(RENAMES["mnb"][0])))
    async with sources.make_client() as client:
        quotes = await sources.fetch_quotes(FEEDS["mnb"], client, today=date(2025, 3, 28),
                                            url_override=server.url("/"), attempts=1)
    assert len(quotes) == 160
    [(path, headers, body)] = server.posts
    assert path == "/arfolyamok.asmx" and headers["SOAPAction"] == (
        "http://www.mnb.hu/webservices/MNBArfolyamServiceSoap/GetExchangeRates")
    assert b"<web:currencyNames>AUD,BRL," in body


async def test_fetch_quotes_backfill_uses_the_history_override(server: FeedServer) -> None:
    hist = "ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml"
    server.serve("/stats/eurofxref/eurofxref-hist-90d.xml", Reply(200, payload(hist)))
    with socket.socket() as probe:  # the daily override: nobody listens there
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    async with sources.make_client() as client:
        quotes = await sources.fetch_quotes(
            FEEDS["ecb"], client, today=date(2024, 2, 27), url_override=dead, history=True,
            history_url_override=server.url(""), days=61, attempts=1)
        assert len(quotes) == 1830
        with pytest.raises(SourceError, match="privatbank: no multi-day endpoint"):
            await sources.fetch_quotes(FEEDS["privatbank"], client, today=date(2024, 2, 27),
                                       history=True, days=5)
        # Without a history override, XRATES_<SOURCE>_URL serves backfills too.
        again = await sources.fetch_quotes(FEEDS["ecb"], client, today=date(2024, 2, 27),
                                           url_override=server.url(""), history=True, days=61)
    assert again == quotes
