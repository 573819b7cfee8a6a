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
from datetime import UTC, datetime, timedelta, timezone
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
    """The API's rules (SPEC §3), checked independently of sources.normalize_rate."""
    assert re.fullmatch(r"[A-Z]{3}", quote.base), quote
    assert re.fullmatch(r"[A-Z]{3}", quote.quote), quote
    assert quote.base != quote.quote, quote
    rate = quote.rate
    assert isinstance(rate, Decimal) and rate.is_finite(), quote
    assert Decimal("1e-12") <= rate < Decimal("1e12"), quote
    significant = format(rate, "f").replace(".", "").strip("0")
    assert 1 <= len(significant) <= 15, quote
    assert quote.as_of.tzinfo is not None and quote.as_of.utcoffset() == timedelta(0), quote


# Every recorded payload that is a valid feed: (feed, file, expected count, expected as_of).
VALID_FIXTURES = [
    ("ecb", "ecb/eurofxref-daily_2017-03-08.xml", 31, midnight(2017, 3, 8)),
    ("ecb", "ecb/eurofxref-daily_2022-07-08.xml", 31, midnight(2022, 7, 8)),
    ("ecb", "ecb/eurofxref-daily_2024-02-27.xml", 30, midnight(2024, 2, 27)),
    ("ecb", "ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml", 30, midnight(2024, 2, 27)),
    ("nbu", "nbu/statdirectory_exchange_2026-09-25.json", 45, midnight(2026, 9, 25)),
    ("nbu", "nbu/statdirectory_exchange_valcode-USD_2025-05-06.json", 1, midnight(2025, 5, 6)),
    ("nbu", "nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json", 45, midnight(2026, 3, 16)),
    ("nbu", "nbu/statdirectory_exchange_2019-02-18_xml-variant.xml", 61, midnight(2019, 2, 18)),
    ("cbr", "cbr/XML_daily_2022-03-15.xml", 34, midnight(2022, 3, 15)),
    ("cbr", "cbr/XML_daily_2024-03-28_vunitrate.xml", 43, midnight(2024, 3, 28)),
    ("cbr", "cbr/XML_daily_2026-04-25_saturday_vcr.xml", 54, midnight(2026, 4, 25)),
    ("privatbank", "privatbank/pubinfo_coursid5_committed-2018-04-23.json", 3, None),
    ("privatbank", "privatbank/pubinfo_coursid3_committed-2019-07-25.json", 3, None),
    ("privatbank", "privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json", 2, None),
    ("boc", "boc/FX_RATES_DAILY_start-2026-03-12_vcr.json", 23, midnight(2026, 3, 18)),
    (
        "boc",
        "boc/EDGE_FX_RATES_DAILY_recent-1_stale-2019-series_vcr.json",
        23,
        midnight(2026, 3, 13),
    ),
]

# Recorded error bodies served with HTTP 200: (feed, file, words the message must quote).
ERROR_FIXTURES = [
    ("nbu", "nbu/EDGE_xml_error_wrong_parameters_format.xml", "Wrong parameters format"),
    ("nbu", "nbu/EDGE_html_redirect_page_mistyped_path.html", "nbu"),
    ("cbr", "cbr/EDGE_error_in_parameters.xml", "Error in parameters"),
]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_urls() -> None:
    assert sources.SOURCE_NAMES == ("demo", "ecb", "nbu", "cbr", "privatbank", "boc")
    assert set(FEEDS) == set(sources.SOURCE_NAMES) - {"demo"}
    assert all(name == source.name for name, source in FEEDS.items())
    assert FEEDS["ecb"].default_url == (
        "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"
    )
    assert FEEDS["nbu"].default_url == (
        "https://bank.gov.ua/NBUStatService/v1/statdirectory/exchange?json"
    )
    assert FEEDS["cbr"].default_url == "https://www.cbr.ru/scripts/XML_daily.asp"
    assert FEEDS["privatbank"].default_url == (
        "https://api.privatbank.ua/p24api/pubinfo?exchange&coursid=5"
    )
    assert FEEDS["boc"].default_url == (
        "https://www.bankofcanada.ca/valet/observations/group/FX_RATES_DAILY/json?recent=5"
    )


def test_every_fixture_on_disk_is_covered() -> None:
    covered = {name for _, name, _, _ in VALID_FIXTURES} | {name for _, name, _ in ERROR_FIXTURES}
    on_disk = {
        str(path.relative_to(FIXTURES))
        for path in FIXTURES.rglob("*")
        if path.is_file() and path.name != "PROVENANCE.md"
    }
    assert on_disk == covered


@pytest.mark.parametrize(("feed", "name", "count", "as_of"), VALID_FIXTURES)
def test_every_recorded_payload_gives_valid_quotes(
    feed: str, name: str, count: int, as_of: datetime | None
) -> None:
    quotes = FEEDS[feed].parse(payload(name))
    assert len(quotes) == count
    assert len({(q.base, q.quote) for q in quotes}) == count
    for quote in quotes:
        assert_valid(quote)
    if as_of is not None:
        assert {q.as_of for q in quotes} == {as_of}


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


def test_ecb_hist_90d_takes_only_the_newest_day() -> None:
    hist = sources.parse_ecb(payload("ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml"))
    daily = sources.parse_ecb(payload("ecb/eurofxref-daily_2024-02-27.xml"))
    assert len(hist) == 30  # not the 1830 cubes of all 61 days
    assert {q.as_of for q in hist} == {midnight(2024, 2, 27)}
    # Same day, same values; the hist file has double quotes and strips trailing zeros.
    assert {(q.quote, q.rate) for q in hist} == {(q.quote, q.rate) for q in daily}
    assert str(by_quote(hist)["GBP"].rate) == "0.8562"


def test_ecb_newest_day_wins_whatever_the_order() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01"
  xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref"><Cube>
<Cube time="2024-02-26"><Cube currency="USD" rate="1.0800"/></Cube>
<Cube time="2024-02-27"><Cube currency="USD" rate="1.0856"/></Cube>
</Cube></gesmes:Envelope>"""
    [quote] = sources.parse_ecb(body)
    assert quote == Quote("EUR", "USD", Decimal("1.0856"), midnight(2024, 2, 27))


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


def test_nbu_crlf_range_payload_keeps_only_the_latest_day_per_unit() -> None:
    body = payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json")
    assert b"}\r\n," in body  # the recorded CRLF framing is really there
    quotes = sources.parse_nbu(body)
    rates = by_base(quotes)
    assert len(quotes) == 45  # one day of 45 codes, not 720 rows
    assert {q.as_of for q in quotes} == {midnight(2026, 3, 16)}
    assert rates["USD"].rate == Decimal("44.1381")  # 16.03, not 01.03's 43.2081
    # `rate` is for `units` units: 100 KZT = 9.0172 UAH, 1000 VND = 1.6789 UAH, 10 THB ...
    assert rates["KZT"].rate == Decimal("0.090172")
    assert rates["VND"].rate == Decimal("0.0016789")
    assert rates["THB"].rate == Decimal("1.37203")
    assert rates["LBP"].rate == Decimal("0.000492")


def test_nbu_range_rate_per_unit_agrees_with_rate_over_units() -> None:
    rows = json.loads(
        payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json"), parse_float=Decimal
    )
    latest = {r["cc"]: r for r in rows if r["exchangedate"] == "16.03.2026"}
    quotes = sources.parse_nbu(payload("nbu/exchange_site_2026-03-01_to_2026-03-16_vcr.json"))
    for quote in quotes:
        row = latest[quote.base]
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
        {"cc": "EUR", "rate": 47.1, "exchangedate": "05.05.2025"},  # stale day: dropped
        {"cc": "HUF", "rate": 11.5, "units": 100, "rate_per_unit": 0.115,
         "exchangedate": "06.05.2025"},
        {"cc": "JPY", "rate": 2.9, "units": 10, "rate_per_unit": 2.9,  # disagree: dropped
         "exchangedate": "06.05.2025"},
        {"cc": "GBP", "rate": "bad", "exchangedate": "06.05.2025"},
        {"cc": "CHF", "rate": 50, "exchangedate": "31.02.2025"},  # impossible date
        "not a row",
    ]
    rates = by_base(sources.parse_nbu(json.dumps(rows).encode()))
    assert {code: q.rate for code, q in rates.items()} == {
        "USD": Decimal("41.6036"),
        "HUF": Decimal("0.115"),
    }
    assert rates["USD"].as_of == midnight(2025, 5, 6)


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


def test_boc_latest_observation_per_series() -> None:
    quotes = sources.parse_boc(payload("boc/FX_RATES_DAILY_start-2026-03-12_vcr.json"))
    rates = by_base(quotes)
    assert {q.quote for q in quotes} == {"CAD"}
    assert {q.as_of for q in quotes} == {midnight(2026, 3, 18)}
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
    [quote] = sources.parse_boc(json.dumps(body).encode())
    assert quote == Quote("USD", "CAD", Decimal("1.3716"), midnight(2026, 3, 13))


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

_VALID_BY_FEED = {feed: [name for f, name, _, _ in VALID_FIXTURES if f == feed] for feed in FEEDS}


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
                         "base_ccy", "buy", "sale", "observations", "d", "FXUSDCAD", "v"]),
        children,
        max_size=6,
    ),
    max_leaves=25,
)


@pytest.mark.parametrize("feed", ["nbu", "privatbank", "boc"])
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
