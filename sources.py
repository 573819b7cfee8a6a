"""Upstream rate feeds: plan the requests, fetch the bytes, parse them into `Quote` rows.

Seventeen official sources plus the offline `demo`, registered in `FEEDS` (the pivot and the
published direction of each are in its `Source`):

    ecb         European Central Bank            EUR -> X  (foreign per pivot)
    nbu         National Bank of Ukraine         X -> UAH  (pivot per foreign)
    cbr         Central Bank of Russia           X -> RUB
    privatbank  PrivatBank (commercial, UA)      X -> UAH  (mid of buy and sale)
    boc         Bank of Canada                   X -> CAD
    bdi         Banca d'Italia                   EUR -> X
    nbp         Narodowy Bank Polski (A, B, gold) X -> PLN
    cnb         Czech National Bank              X -> CZK
    mnb         Magyar Nemzeti Bank (SOAP)       X -> HUF
    nb          Norges Bank (SDMX CSV)           X -> NOK
    rba         Reserve Bank of Australia (CSV)  AUD -> X
    nbg         National Bank of Georgia         X -> GEL
    nbk         National Bank of Kazakhstan      X -> KZT
    nbrb        National Bank of Belarus         X -> BYN
    sarb        South African Reserve Bank       ZAR -> X, and USD/GBP/EUR -> ZAR
    boe         Bank of England (CSV)            GBP -> X
    hkma        Hong Kong Monetary Authority     X -> HKD

Parsers are pure: they take the raw payload bytes (`Source.parse`, or `Source.parse_payloads`
for the several payloads of one run) and return one quote per pair **per day present** in
the payloads, already satisfying the API's rate and code rules, or raise `SourceError` when a
payload is not a usable feed (an error body served with HTTP 200, an HTML page, a truncated
or reshaped payload, no rates). A series whose latest observation is older than the newest
day of the feed is dropped entirely. `fetch_quotes` performs every request a source needs
for a daily run or a backfill and parses the results. Persistence, the jump guard and
scheduling belong to the updater.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from functools import lru_cache, partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger("xrates.sources")

MIN_RATE = Decimal("1e-12")  # inclusive, as in contract §3
MAX_RATE = Decimal("1e12")  # exclusive
MAX_DIGITS = 15  # significant digits; trailing zeros do not count
MAX_BODY_BYTES = 8 * 1024 * 1024  # real feeds are < 200 KB; a bigger body is a wrong URL

USER_AGENT = "xrates/0.1"

_CODE_RE = re.compile(r"[A-Z]{3}")
# Non-ISO codes some feeds still use for real currencies.
_CODE_ALIASES = {"RUR": "RUB"}
# Three-letter tickers that look like ISO 4217 codes but are not currencies we serve.
# TWI: Norges Bank's trade-weighted index.
_NOT_ISO = frozenset({"BTC", "ETH", "LTC", "TWI", "XBT", "XRP"})
# Unsigned decimal text as feeds publish it; bounded so that a hostile payload cannot make
# Decimal arithmetic expensive. An exponent is allowed: CBR writes tiny VunitRates that
# way (IRR: "5,39256E-05").
_DECIMAL_RE = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?(?:[eE][-+]?[0-9]{1,2})?")
_DOTTED_DATE_RE = re.compile(r"([0-9]{2})\.([0-9]{2})\.([0-9]{4})")
_ISO_DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_BOC_SERIES_RE = re.compile(r"FX([A-Z]{3})CAD")
_XML_ENCODING_RE = re.compile(
    rb"""\A\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]{1,40})["']"""
)
# No genuine feed carries a DTD; HTML pages do, and entity tricks need one.
_XML_DTD_RE = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, slots=True)
class Quote:
    """One published rate: 1 unit of `base` costs `rate` units of `quote`, as of `as_of`."""

    base: str
    quote: str
    rate: Decimal
    as_of: datetime

    def __post_init__(self) -> None:
        # Cheap invariant check: a parser bug must fail here, not as a 422 or a bad row later.
        for field_name in ("base", "quote"):
            code = getattr(self, field_name)
            if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
                raise ValueError(f"Quote.{field_name} must be 3 upper-case letters, got {code!r}")
        if self.base == self.quote:
            raise ValueError(f"Quote base and quote are both {self.base}")
        if not isinstance(self.rate, Decimal) or normalize_rate(self.rate) != self.rate:
            raise ValueError(f"Quote.rate {self.rate!r} breaks the rate rules")
        offset = self.as_of.utcoffset() if isinstance(self.as_of, datetime) else None
        if offset != timedelta(0):
            raise ValueError(f"Quote.as_of must be timezone-aware UTC, got {self.as_of!r}")


class SourceError(Exception):
    """The payload is not a usable feed (error body, HTML, empty, garbage, no rates)."""


class FetchError(SourceError):
    """The feed could not be downloaded (HTTP error, redirect, timeout, connection failure)."""


FOREIGN_PER_PIVOT = "foreign_per_pivot"  # 1 pivot costs `rate` foreign units: Quote(pivot, X)
PIVOT_PER_FOREIGN = "pivot_per_foreign"  # 1 foreign unit costs `rate` pivot: Quote(X, pivot)


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request of a source's run, exactly as the source publishes it."""

    url: str
    method: str = "GET"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    """An upstream feed: what it is, which requests a run makes, and its pure parser.

    `url` is the public documentation/feed URL (never an override). `daily_requests(today)`
    plans a daily run for the given UTC date; `history_requests(today, days)` plans a
    backfill of `days` days ending today, or is None when the source has no multi-day
    endpoint. `parse_payloads` takes the bodies of those requests, in order.
    `full_url_override`: an `XRATES_<SOURCE>_URL` with a path is a whole URL (the five
    original feeds, whose daily run is one request); for the others it is an error.
    """

    name: str
    title: str
    country: str
    url: str
    pivot: str
    base_direction: str
    cadence: str
    parse_payloads: Callable[[Sequence[bytes]], list[Quote]]
    daily_requests: Callable[[date], list[Request]]
    history_requests: Callable[[date, int], list[Request]] | None = None
    history_endpoint: str | None = None  # what a backfill reads, for the docs
    full_url_override: bool = False

    def parse(self, payload: bytes) -> list[Quote]:
        """The quotes of one payload (every day it holds)."""
        return self.parse_payloads([payload])


# --------------------------------------------------------------------------- shared helpers


def significant_digits(value: Decimal) -> int:
    """Significant digits of a finite decimal, not counting trailing zeros."""
    digits = value.as_tuple().digits
    end = len(digits)
    while end > 1 and digits[end - 1] == 0:
        end -= 1
    return end


def normalize_rate(value: object) -> Decimal | None:
    """Return `value` as a rate the API accepts, or None when it cannot be one.

    Rates must be finite, >= 1e-12 and < 1e12 with at most 15 significant digits. A value
    that needs more digits is rounded half-even to 15 (only division results do in practice);
    otherwise the published digits, trailing zeros included, are kept as they are.
    """
    if not isinstance(value, Decimal) or not value.is_finite() or value <= 0:
        return None
    if significant_digits(value) > MAX_DIGITS:
        with localcontext() as ctx:
            ctx.prec, ctx.rounding = MAX_DIGITS, ROUND_HALF_EVEN
            value = +value
    if not MIN_RATE <= value < MAX_RATE:
        return None
    return value


def _divide(numerator: Decimal, denominator: Decimal) -> Decimal:
    """Exact quotient when it fits 15 digits, else correctly rounded half-even (one rounding)."""
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = MAX_DIGITS, ROUND_HALF_EVEN
        return numerator / denominator


def _mid(buy: Decimal, sale: Decimal) -> Decimal:
    """(buy + sale) / 2 with a single rounding to 15 digits."""
    with localcontext() as ctx:
        # Wide enough for the sum to be exact for any two rates within 40 orders of
        # magnitude of each other (a real buy/sale pair is within one).
        ctx.prec = 100
        total = buy + sale
    return _divide(total, Decimal(2))


def _exponent(value: Decimal) -> int:
    """The exponent of a finite decimal (NaN and infinities never get here)."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite decimal: {value}")
    return exponent


def _agrees(exact: Decimal, published: Decimal) -> bool:
    """True when `published` is `exact` itself or `exact` rounded to the published digits."""
    half_ulp = Decimal(5).scaleb(_exponent(published) - 1)
    return abs(exact - published) <= half_ulp


def _decimal(raw: object, *, comma: bool = False) -> Decimal | None:
    """A positive-looking plain decimal from feed text or a JSON number; None if not one."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, Decimal):  # JSON numbers, parsed with parse_float=Decimal
        return raw if raw.is_finite() else None
    if isinstance(raw, int):
        return Decimal(raw)
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if comma:
        text = text.replace(",", ".")
    if not _DECIMAL_RE.fullmatch(text):
        return None
    return Decimal(text)


def _code(raw: object) -> str | None:
    """ISO-like currency code (3 ASCII letters, upper-cased, aliases mapped) or None."""
    if not isinstance(raw, str):
        return None
    code = raw.strip().upper()
    code = _CODE_ALIASES.get(code, code)
    if not _CODE_RE.fullmatch(code) or code in _NOT_ISO:
        return None
    return code


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _parse_day(raw: object, pattern: re.Pattern[str], order: tuple[int, int, int]) -> date | None:
    """A date from text matching `pattern`; `order` gives the group numbers of (y, m, d)."""
    if not isinstance(raw, str):
        return None
    match = pattern.fullmatch(raw.strip())
    if match is None:
        return None
    year, month, day = (int(match.group(i)) for i in order)
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _dotted_day(raw: object) -> date | None:
    """dd.mm.yyyy, as NBU and CBR write dates."""
    return _parse_day(raw, _DOTTED_DATE_RE, (3, 2, 1))


def _iso_day(raw: object) -> date | None:
    """yyyy-mm-dd, as ECB and the Bank of Canada write dates."""
    return _parse_day(raw, _ISO_DATE_RE, (1, 2, 3))


def _make_quote(base: object, quote: object, rate: Decimal | None, as_of: datetime) -> Quote | None:
    """A valid Quote, or None when a code or the rate breaks the rules."""
    base_code, quote_code = _code(base), _code(quote)
    clean = normalize_rate(rate)
    if base_code is None or quote_code is None or base_code == quote_code or clean is None:
        return None
    return Quote(base_code, quote_code, clean, as_of)


def _drop_stale(feed: str, candidates: Sequence[Quote | None]) -> list[Quote | None]:
    """Drop every quote of a pair whose latest observation is older than the newest day.

    Discontinued series (BoC's MYR/THB/VND stopped in 2019, still served by `recent=N`)
    would otherwise look current; unusable rows (None) pass through for `_finish` to count.
    """
    quotes = [q for q in candidates if q is not None]
    if not quotes:
        return list(candidates)
    newest = max(q.as_of for q in quotes)
    latest: dict[tuple[str, str], datetime] = {}
    for q in quotes:
        key = (q.base, q.quote)
        if key not in latest or q.as_of > latest[key]:
            latest[key] = q.as_of
    stale = {key for key, as_of in latest.items() if as_of < newest}
    if not stale:
        return list(candidates)
    log.info("%s: dropped stale series %s (older than %s)", feed,
             ", ".join(f"{b}/{q}" for b, q in sorted(stale)), newest.date())
    return [q for q in candidates if q is None or (q.base, q.quote) not in stale]


def _finish(feed: str, candidates: Iterable[Quote | None]) -> list[Quote]:
    """Drop unusable rows and duplicates of a (pair, day); no usable rate at all is an error."""
    kept: dict[tuple[str, str, datetime], Quote] = {}
    dropped = 0
    for quote in candidates:
        if quote is None:
            dropped += 1
            continue
        key = (quote.base, quote.quote, quote.as_of)
        if key in kept:
            # A currency of several countries (Banca d'Italia) or a holiday repeating the
            # previous day's table (NBG) gives the same row twice; a conflict is a feed bug.
            if kept[key].rate != quote.rate:
                log.warning("%s: conflicting %s/%s rates for %s; the first one kept", feed,
                            quote.base, quote.quote, quote.as_of.date())
                dropped += 1
            continue
        kept[key] = quote
    if not kept:
        raise SourceError(f"{feed}: payload holds no usable rates")
    if dropped:
        log.info("%s: %d quotes, %d unusable rows dropped", feed, len(kept), dropped)
    return list(kept.values())


RowParser = Callable[[bytes], list[Quote | None]]


def _parse_all(feed: str, rows: RowParser, payloads: Sequence[bytes], *,
               stale_per_payload: bool = False) -> list[Quote]:
    """Quotes of every payload of a run; the stale-series rule per payload or over all."""
    if not payloads:
        raise SourceError(f"{feed}: no payload")
    candidates: list[Quote | None] = []
    for body in payloads:
        got = rows(body)
        candidates.extend(_drop_stale(feed, got) if stale_per_payload else got)
    if not stale_per_payload:
        candidates = _drop_stale(feed, candidates)
    return _finish(feed, candidates)


def _single(feed: str, rows: RowParser, **options: bool) -> Callable[[bytes], list[Quote]]:
    """The one-payload parser (`parse_xxx`) of a row parser."""
    def parse(payload: bytes) -> list[Quote]:
        return _parse_all(feed, rows, [payload], **options)

    parse.__name__ = f"parse_{feed}"
    return parse


def _per_unit(value: Decimal | None, units: Decimal | None) -> Decimal | None:
    """The price of one unit when `value` is the price of `units` units (one rounding)."""
    if value is None or units is None or units <= 0:
        return None
    return value if units == 1 else _divide(value, units)


def _quote_for(direction: str, pivot: str, foreign: object, rate: Decimal | None,
               as_of: datetime) -> Quote | None:
    """A quote in the published direction: Quote(pivot, X) or Quote(X, pivot)."""
    if direction == FOREIGN_PER_PIVOT:
        return _make_quote(pivot, foreign, rate, as_of)
    return _make_quote(foreign, pivot, rate, as_of)


def _text(payload: bytes, feed: str) -> str:
    """UTF-8 text without a BOM; anything else is not a feed."""
    if not payload.strip():
        raise SourceError(f"{feed}: empty payload")
    try:
        return payload.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{feed}: payload is not UTF-8 text ({exc.reason})") from None


def _csv_table(payload: bytes, feed: str) -> list[list[str]]:
    """Non-empty CSV rows of a complete payload (a truncated one has no final newline)."""
    text = _text(payload, feed)
    if text.lstrip().startswith("<"):
        raise SourceError(f"{feed}: payload is HTML or XML, not CSV")
    if not text.endswith("\n"):
        raise SourceError(f"{feed}: CSV payload is truncated (no final newline)")
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise SourceError(f"{feed}: payload is not CSV ({exc})") from None
    if not rows:
        raise SourceError(f"{feed}: CSV payload has no rows")
    return rows


def _columns(header: Sequence[str], required: Sequence[str], feed: str) -> dict[str, int]:
    """Index of each required column; a missing one means the feed changed shape."""
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in required if name not in index]
    if missing:
        raise SourceError(f"{feed}: CSV header lacks column(s) {', '.join(missing)}")
    return {name: index[name] for name in required}


def _check_width(row: Sequence[str], width: int, feed: str, where: str) -> None:
    if len(row) != width:
        raise SourceError(f"{feed}: {where} has {len(row)} fields, the header {width} "
                          "(truncated or reshaped payload)")


def _data_rows(table: Sequence[list[str]], feed: str) -> list[list[str]]:
    """The rows below the header row, each checked to be as wide as the header."""
    for number, row in enumerate(table[1:], 2):
        _check_width(row, len(table[0]), feed, f"row {number}")
    return list(table[1:])


def _timestamp_day(raw: object) -> date | None:
    """The date of `2026-03-17T00:00:00` or `2026-02-28T00:00:00.000Z` (as written)."""
    if not isinstance(raw, str) or len(raw) < 10:
        return None
    head, tail = raw[:10], raw[10:]
    if tail and not tail.startswith("T"):
        return None
    return _iso_day(head)


_MONTHS = {name: i for i, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_NAMED_MONTH_RE = re.compile(r"([0-9]{1,2})[- ]([A-Z][a-z]{2})[- ]([0-9]{4})")


def _named_month_day(raw: object) -> date | None:
    """`03-Jan-2023` (RBA) or `17 Mar 2026` (BoE), independent of the locale."""
    if not isinstance(raw, str):
        return None
    match = _NAMED_MONTH_RE.fullmatch(raw.strip())
    if match is None or match.group(2) not in _MONTHS:
        return None
    try:
        return date(int(match.group(3)), _MONTHS[match.group(2)], int(match.group(1)))
    except ValueError:
        return None


def _load_json(payload: bytes, feed: str) -> object:
    """Parse JSON keeping numbers exact (Decimal); anything that is not JSON is a SourceError."""
    if not payload.strip():
        raise SourceError(f"{feed}: empty payload")
    try:
        return json.loads(payload, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise SourceError(f"{feed}: payload is not JSON ({type(exc).__name__}: {exc})") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"non-finite JSON number {name}")


def _listed(data: object, key: str, feed: str, where: str | None = None) -> list[Any]:
    """The list a JSON object holds under `key`; anything else means the feed changed shape."""
    items = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise SourceError(f"{feed}: payload has no {where or f'`{key}`'} list")
    return items


def _field(row: object, key: str) -> object:
    """`row[key]` of a JSON object, None for a missing key or a row that is not an object."""
    return row.get(key) if isinstance(row, Mapping) else None


def _json_quote(row: object, pivot: str, day: date | None, *, code: str, rate: str,
                units: str | None = None) -> Quote | None:
    """One JSON row of an X -> pivot feed: `row[code]` costs `row[rate]` pivot per `row[units]`
    units (per 1 unit without `units`) on `day`; None for a row that is not an object, or no day."""
    if not isinstance(row, Mapping) or day is None:
        return None
    value = _decimal(row.get(rate))
    per_unit = value if units is None else _per_unit(value, _decimal(row.get(units)))
    return _make_quote(row.get(code), pivot, per_unit, _midnight(day))


def _load_xml(payload: bytes, feed: str, *, default_encoding: str = "utf-8") -> ET.Element:
    """Parse an XML feed, decoding per its declaration (CBR serves windows-1251)."""
    if not payload.strip():
        raise SourceError(f"{feed}: empty payload")
    if _XML_DTD_RE.search(payload):
        raise SourceError(f"{feed}: payload has a DTD (an HTML page?), not a feed")
    declared = _XML_ENCODING_RE.match(payload)
    encoding = declared.group(1).decode("ascii") if declared else default_encoding
    try:
        # errors="replace": only ASCII fields (codes, numbers, dates) are read, so a
        # mis-declared encoding (UTF-8 bytes declared windows-1251) must not lose the feed.
        text = payload.decode(encoding, errors="replace").lstrip("\ufeff")
    except LookupError:
        raise SourceError(f"{feed}: unknown XML encoding {encoding!r}") from None
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise SourceError(f"{feed}: payload is not XML ({exc})") from None


def _local(tag: object) -> str:
    """Element name without its namespace."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _child_text(element: ET.Element, name: str) -> str | None:
    child = element.find(name)
    return child.text if child is not None else None


def _error_text(root: ET.Element) -> str:
    """Readable text of an error body, for the SourceError message."""
    text = " ".join("".join(root.itertext()).split())
    return text[:200] or f"<{_local(root.tag)}> without rates"


# --------------------------------------------------------------------------- ECB


def _ecb_rows(payload: bytes) -> list[Quote | None]:
    """ECB euro reference rates (daily, hist-90d or hist XML): EUR -> X, every day."""
    root = _load_xml(payload, "ecb")
    days: list[tuple[date, ET.Element]] = []
    for cube in root.iter():
        if _local(cube.tag) == "Cube" and "time" in cube.attrib:
            day = _iso_day(cube.get("time"))
            if day is not None:
                days.append((day, cube))
    if not days:
        raise SourceError(f"ecb: no dated <Cube time=...> in payload: {_error_text(root)}")
    return [
        _make_quote("EUR", row.get("currency"), _decimal(row.get("rate")), _midnight(day))
        for day, cube in days
        for row in cube
        if _local(row.tag) == "Cube"
    ]


parse_ecb = _single("ecb", _ecb_rows)


# --------------------------------------------------------------------------- NBU


def _nbu_rows(payload: bytes) -> list[Quote | None]:
    """National Bank of Ukraine: X -> UAH, every `exchangedate` present.

    Accepts the statdirectory JSON (`rate` is per 1 unit), the exchange_site range JSON
    (`rate` is per `units`, with `rate_per_unit`) and the statdirectory XML form.
    """
    rows: list[Mapping[str, Any]]
    if payload.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        rows = list(_nbu_xml_rows(_load_xml(payload, "nbu")))
    else:
        data = _load_json(payload, "nbu")
        if not isinstance(data, list):
            raise SourceError(f"nbu: expected a JSON list, got {type(data).__name__}")
        rows = [row for row in data if isinstance(row, Mapping)]
    dated = [(_dotted_day(row.get("exchangedate")), row) for row in rows]
    if not any(day is not None for day, _ in dated):
        raise SourceError("nbu: no rows with an exchangedate in payload")
    return [
        _make_quote(row.get("cc"), "UAH", _nbu_rate(row), _midnight(day)) if day else None
        for day, row in dated
    ]


parse_nbu = _single("nbu", _nbu_rows)


def _nbu_xml_rows(root: ET.Element) -> list[dict[str, str | None]]:
    """<exchange><currency><cc/><rate/><exchangedate/></currency>...; errors raise."""
    if _local(root.tag) != "exchange":
        raise SourceError(f"nbu: unexpected XML root <{_local(root.tag)}>: {_error_text(root)}")
    currencies = [child for child in root if _local(child.tag) == "currency"]
    if not currencies:
        raise SourceError(f"nbu: error body: {_error_text(root)}")
    fields = ("cc", "rate", "units", "rate_per_unit", "exchangedate")
    return [{name: _child_text(row, name) for name in fields} for row in currencies]


def _nbu_rate(row: Mapping[str, object]) -> Decimal | None:
    """UAH per 1 unit: `rate` / `units` when units are given, cross-checked with rate_per_unit."""
    rate = _decimal(row.get("rate"))
    if rate is None:
        return None
    if row.get("units") is None:
        return rate
    per_unit = _per_unit(rate, _decimal(row.get("units")))
    if per_unit is None:
        return None
    published = _decimal(row.get("rate_per_unit"))
    if published is not None and not _agrees(per_unit, published):
        log.warning("nbu: %s rate %s / units %s != rate_per_unit %s; row dropped",
                    row.get("cc"), rate, row.get("units"), published)
        return None
    return per_unit


# --------------------------------------------------------------------------- CBR


def _cbr_rows(payload: bytes) -> list[Quote | None]:
    """Central Bank of Russia XML_daily (windows-1251): X -> RUB per 1 unit (Value / Nominal)."""
    root = _load_xml(payload, "cbr", default_encoding="windows-1251")
    if _local(root.tag) != "ValCurs":
        raise SourceError(f"cbr: unexpected XML root <{_local(root.tag)}>")
    valutes = [child for child in root if _local(child.tag) == "Valute"]
    day = _dotted_day(root.get("Date"))
    if day is None or not valutes:
        # The error body is HTTP 200 with a bare <ValCurs>Error in parameters</ValCurs>.
        raise SourceError(f"cbr: error body: {_error_text(root)}")
    as_of = _midnight(day)
    return [_make_quote(_child_text(v, "CharCode"), "RUB", _cbr_rate(v), as_of) for v in valutes]


parse_cbr = _single("cbr", _cbr_rows)


def _cbr_rate(valute: ET.Element) -> Decimal | None:
    """RUB per 1 unit; `Value` is the price of `Nominal` units (e.g. 100 HUF)."""
    value = _decimal(_child_text(valute, "Value"), comma=True)
    nominal = _decimal(_child_text(valute, "Nominal"), comma=True)
    per_unit = _per_unit(value, nominal)
    if per_unit is None:
        return None
    vunit_text = _child_text(valute, "VunitRate")
    if vunit_text is not None:  # published since 2022; must say the same thing
        vunit = _decimal(vunit_text, comma=True)
        if vunit is None or not _agrees(per_unit, vunit):
            log.warning("cbr: %s Value %s / Nominal %s != VunitRate %r; row dropped",
                        _child_text(valute, "CharCode"), value, nominal, vunit_text)
            return None
    return per_unit


# --------------------------------------------------------------------------- PrivatBank


def parse_privatbank(payload: bytes, now: datetime | None = None) -> list[Quote]:
    """PrivatBank pubinfo JSON: ccy -> base_ccy at the mid of buy and sale.

    The feed carries no date, so `as_of` is `now` (default: the current UTC time), truncated
    to the minute so that repeated fetches within a minute agree.
    """
    return _finish("privatbank", _privatbank_rows(payload, now))


def _privatbank_rows(payload: bytes, now: datetime | None = None) -> list[Quote | None]:
    as_of = _minute(now if now is not None else datetime.now(UTC))
    data = _load_json(payload, "privatbank")
    if not isinstance(data, list):
        raise SourceError(f"privatbank: expected a JSON list, got {type(data).__name__}")
    return [_privatbank_quote(row, as_of) if isinstance(row, Mapping) else None for row in data]


def _minute(now: datetime) -> datetime:
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).replace(second=0, microsecond=0)


def _privatbank_quote(row: Mapping[str, object], as_of: datetime) -> Quote | None:
    buy, sale = _decimal(row.get("buy")), _decimal(row.get("sale"))
    if buy is None or sale is None or buy <= 0 or sale <= 0:
        return None
    return _make_quote(row.get("ccy"), row.get("base_ccy"), _mid(buy, sale), as_of)


# --------------------------------------------------------------------------- Bank of Canada


def _boc_rows(payload: bytes) -> list[Quote | None]:
    """Bank of Canada Valet FX_RATES_DAILY: X -> CAD, every observation.

    `recent=N` is per series, so discontinued series (MYR, THB, VND stopped in 2019) still
    appear with their last value; the stale-series rule drops them.
    """
    observations = _listed(_load_json(payload, "boc"), "observations", "boc")
    return [
        _make_quote(series, "CAD", rate, _midnight(day))
        for observation in observations
        for series, day, rate in _boc_values(observation)
    ]


parse_boc = _single("boc", _boc_rows)


def _boc_values(observation: object) -> Iterable[tuple[str, date, Decimal | None]]:
    """(base code, date, rate) for each FXxxxCAD series in one observation."""
    if not isinstance(observation, Mapping):
        return
    day = _iso_day(observation.get("d"))
    if day is None:
        return
    for key, cell in observation.items():
        match = _BOC_SERIES_RE.fullmatch(key) if isinstance(key, str) else None
        if match is not None:
            rate = _decimal(cell.get("v")) if isinstance(cell, Mapping) else None
            yield match.group(1), day, rate


# --------------------------------------------------------------------------- Banca d'Italia

_BDI_CONVENTION = "Foreign currency amount for 1 Euro."


def _bdi_rows(payload: bytes) -> list[Quote | None]:
    """Banca d'Italia dailyRates CSV: EUR -> X (foreign per 1 EUR), one row per country.

    `N.A.` rates (BYN, IRR, KPW, RUB) are dropped; a currency shared by several countries
    repeats with the same rate. The `#` disclaimer block after the data is skipped.
    """
    table = [row for row in _csv_table(payload, "bdi") if not row[0].lstrip().startswith("#")]
    if not table:
        raise SourceError("bdi: no CSV header in payload")
    header = table[0]
    cols = _columns(header, ("ISO Code", "Rate", "Rate convention", "Reference date (CET)"), "bdi")
    candidates: list[Quote | None] = []
    for row in _data_rows(table, "bdi"):
        day = _iso_day(row[cols["Reference date (CET)"]])
        convention = row[cols["Rate convention"]].strip()
        if day is None or convention != _BDI_CONVENTION:  # another direction: not guessed
            candidates.append(None)
            continue
        rate = _decimal(row[cols["Rate"]])  # "N.A." is no decimal: dropped
        candidates.append(_make_quote("EUR", row[cols["ISO Code"]], rate, _midnight(day)))
    return candidates


parse_bdi = _single("bdi", _bdi_rows)


# --------------------------------------------------------------------------- NBP

TROY_OUNCE_G = Decimal("31.1034768")  # grams per troy ounce, the unit of ISO 4217 XAU


def _nbp_rows(payload: bytes) -> list[Quote | None]:
    """NBP JSON: exchange-rate tables A/B (PLN per 1 unit, `mid`) or gold prices.

    Tables carry `effectiveDate` per table; there is no unit field, everything is per 1.
    Gold (`cenyzlota`) is PLN per gram: XAU -> PLN is `cena` x 31.1034768 (one rounding).
    """
    data = _load_json(payload, "nbp")
    if not isinstance(data, list) or not all(isinstance(item, Mapping) for item in data):
        raise SourceError("nbp: expected a JSON list of tables or gold prices")
    candidates: list[Quote | None] = []
    for item in data:
        if "rates" in item:
            day = _iso_day(item.get("effectiveDate"))
            rates = item.get("rates")
            if day is None or not isinstance(rates, list):
                raise SourceError("nbp: table without effectiveDate or rates list")
            candidates += [_json_quote(row, "PLN", day, code="code", rate="mid") for row in rates]
        elif "cena" in item:
            day, per_gram = _iso_day(item.get("data")), _decimal(item.get("cena"))
            per_ounce = None if per_gram is None else _multiply(per_gram, TROY_OUNCE_G)
            candidates.append(_make_quote("XAU", "PLN", per_ounce, _midnight(day)) if day else None)
        else:
            raise SourceError(f"nbp: unexpected item with keys {sorted(item)[:6]}")
    return candidates


def _multiply(left: Decimal, right: Decimal) -> Decimal:
    """left x right with a single rounding to 15 digits."""
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = MAX_DIGITS, ROUND_HALF_EVEN
        return left * right


# Table B is weekly and table A daily: the stale-series rule applies within each table.
parse_nbp = _single("nbp", _nbp_rows, stale_per_payload=True)


# --------------------------------------------------------------------------- CNB


def _cnb_rows(payload: bytes) -> list[Quote | None]:
    """Czech National Bank JSON API (daily or daily-year): X -> CZK, `rate` per `amount`."""
    return [
        _json_quote(row, "CZK", _iso_day(_field(row, "validFor")), code="currencyCode",
                    rate="rate", units="amount")
        for row in _listed(_load_json(payload, "cnb"), "rates", "cnb")
    ]


parse_cnb = _single("cnb", _cnb_rows)


# --------------------------------------------------------------------------- MNB


def _mnb_rows(payload: bytes) -> list[Quote | None]:
    """Magyar Nemzeti Bank SOAP GetExchangeRates: X -> HUF, `Rate` (decimal comma) per `unit`.

    The SOAP result holds the real document as escaped XML text, parsed a second time.
    """
    envelope = _load_xml(payload, "mnb")
    result = next((e for e in envelope.iter() if _local(e.tag) == "GetExchangeRatesResult"), None)
    if result is None or not (result.text or "").strip():
        raise SourceError(f"mnb: no GetExchangeRatesResult in SOAP body: {_error_text(envelope)}")
    root = _load_xml((result.text or "").encode("utf-8"), "mnb")
    if _local(root.tag) != "MNBExchangeRates":
        raise SourceError(f"mnb: unexpected result root <{_local(root.tag)}>")
    candidates: list[Quote | None] = []
    for day_element in root:
        if _local(day_element.tag) != "Day":
            continue
        day = _iso_day(day_element.get("date"))
        for rate in day_element:
            value = _per_unit(_decimal(rate.text, comma=True), _decimal(rate.get("unit")))
            candidates.append(
                _make_quote(rate.get("curr"), "HUF", value, _midnight(day)) if day else None
            )
    return candidates


parse_mnb = _single("mnb", _mnb_rows)


# --------------------------------------------------------------------------- Norges Bank


_SMALL_INT_RE = re.compile(r"[0-9]{1,2}")


def _nb_rows(payload: bytes) -> list[Quote | None]:
    """Norges Bank SDMX csvdata: X -> NOK, OBS_VALUE per 10^UNIT_MULT units of BASE_CUR.

    The indices I44 and TWI are not currencies and are dropped.
    """
    table = _csv_table(payload, "nb")
    header = table[0]
    cols = _columns(header, ("BASE_CUR", "QUOTE_CUR", "UNIT_MULT", "TIME_PERIOD", "OBS_VALUE"), "nb")
    candidates: list[Quote | None] = []
    for row in _data_rows(table, "nb"):
        day = _iso_day(row[cols["TIME_PERIOD"]])
        multiplier = row[cols["UNIT_MULT"]].strip()
        if day is None or row[cols["QUOTE_CUR"]].strip() != "NOK" or not _SMALL_INT_RE.fullmatch(multiplier):
            candidates.append(None)
            continue
        units = Decimal(10) ** int(multiplier)
        rate = _per_unit(_decimal(row[cols["OBS_VALUE"]]), units)
        candidates.append(_make_quote(row[cols["BASE_CUR"]], "NOK", rate, _midnight(day)))
    return candidates


parse_nb = _single("nb", _nb_rows)


# --------------------------------------------------------------------------- RBA


def _rba_rows(payload: bytes) -> list[Quote | None]:
    """RBA statistical table F11.1 CSV: AUD -> X (foreign per A$1), every day of the file.

    Metadata rows come first (`Title` says `A$1=USD`, `Units` gives the codes); `SDR` is
    mapped to XDR and the trade-weighted index column (`Index`) is dropped. Empty cells are
    days without an observation; the file is padded with blank lines.
    """
    table = _csv_table(payload, "rba")
    labelled = {row[0].strip(): row for row in table if row and not _named_month_day(row[0])}
    title, units = labelled.get("Title"), labelled.get("Units")
    if title is None or units is None:
        raise SourceError("rba: no Title/Units rows in payload (not table F11.1?)")
    _check_width(units, len(title), "rba", "the Units row")
    codes: list[str | None] = [None]
    for heading, unit in zip(title[1:], units[1:], strict=True):
        code = "XDR" if unit.strip() == "SDR" else unit.strip()
        codes.append(code if heading.strip() == f"A$1={unit.strip()}" else None)
    candidates: list[Quote | None] = []
    for row in table:
        day = _named_month_day(row[0])
        if day is None:
            continue
        _check_width(row, len(title), "rba", f"the row of {row[0]}")
        for column_code, cell in zip(codes[1:], row[1:], strict=True):
            if column_code is not None and cell.strip():
                candidates.append(_make_quote("AUD", column_code, _decimal(cell), _midnight(day)))
    return candidates


parse_rba = _single("rba", _rba_rows)


# --------------------------------------------------------------------------- NBG


def _nbg_rows(payload: bytes) -> list[Quote | None]:
    """National Bank of Georgia JSON: X -> GEL, `rate` per `quantity`.

    The date is the body's `date` (the day the set is in force), never the requested one:
    a request on a holiday returns the previous day's set, byte for byte.
    """
    data = _load_json(payload, "nbg")
    if not isinstance(data, list) or not data:
        raise SourceError("nbg: expected a non-empty JSON list")
    candidates: list[Quote | None] = []
    for entry in data:
        currencies = entry.get("currencies") if isinstance(entry, Mapping) else None
        day = _timestamp_day(entry.get("date")) if isinstance(entry, Mapping) else None
        if day is None or not isinstance(currencies, list):
            raise SourceError("nbg: entry without `date` or `currencies` list")
        candidates += [_json_quote(row, "GEL", day, code="code", rate="rate", units="quantity")
                       for row in currencies]
    return candidates


parse_nbg = _single("nbg", _nbg_rows)


# --------------------------------------------------------------------------- NBK


def _nbk_rows(payload: bytes) -> list[Quote | None]:
    """National Bank of Kazakhstan get_rates.cfm XML: X -> KZT, `description` per `quant`."""
    root = _load_xml(payload, "nbk")
    if _local(root.tag) != "rates":
        raise SourceError(f"nbk: unexpected XML root <{_local(root.tag)}>: {_error_text(root)}")
    day = _dotted_day(_child_text(root, "date"))
    items = [child for child in root if _local(child.tag) == "item"]
    if day is None or not items:
        raise SourceError(f"nbk: no <date> or no <item> in payload: {_error_text(root)[:120]}")
    as_of = _midnight(day)
    return [
        _make_quote(_child_text(item, "title"), "KZT",
                    _per_unit(_decimal(_child_text(item, "description")),
                              _decimal(_child_text(item, "quant"))), as_of)
        for item in items
    ]


parse_nbk = _single("nbk", _nbk_rows)


# --------------------------------------------------------------------------- NBRB


def parse_nbrb_payloads(payloads: Sequence[bytes]) -> list[Quote]:
    """National Bank of Belarus JSON: X -> BYN, `Cur_OfficialRate` per `Cur_Scale`.

    A `rates?periodicity=0` list names each `Cur_ID` (code and scale); `dynamics/{Cur_ID}`
    rows carry neither, so they are read through the lists among the same payloads
    (the scale of today's list is applied to the whole range).
    """
    if not payloads:
        raise SourceError("nbrb: no payload")
    documents: list[Any] = [_load_json(body, "nbrb") for body in payloads]
    names: dict[int, tuple[str, Decimal]] = {}
    for data in documents:
        if not isinstance(data, list) or not all(isinstance(row, Mapping) for row in data):
            raise SourceError("nbrb: expected a JSON list of rate objects")
        for row in data:
            scale = _decimal(row.get("Cur_Scale"))
            cur_id, code = row.get("Cur_ID"), row.get("Cur_Abbreviation")
            if isinstance(cur_id, int) and isinstance(code, str) and scale is not None:
                names[cur_id] = (code, scale)
    if not names and any(documents):
        raise SourceError("nbrb: no rates?periodicity=0 list among the payloads, and dynamics "
                          "rows name no currency")
    candidates: list[Quote | None] = []
    for data in documents:
        for row in data:
            day = _timestamp_day(row.get("Date"))
            if "Cur_OfficialRate" not in row or "Cur_ID" not in row:
                raise SourceError(f"nbrb: rate object with keys {sorted(row)[:6]}")
            cur_id = row["Cur_ID"]
            code, scale = names.get(cur_id, (None, None)) if isinstance(cur_id, int) else (None, None)
            rate = _per_unit(_decimal(row.get("Cur_OfficialRate")), scale)
            candidates.append(_make_quote(code, "BYN", rate, _midnight(day)) if day else None)
    return _finish("nbrb", _drop_stale("nbrb", candidates))


def parse_nbrb(payload: bytes) -> list[Quote]:
    return parse_nbrb_payloads([payload])


# --------------------------------------------------------------------------- SARB

# The only place the payload names a series is its English `Timeseries` title.
_SARB_TITLES: dict[str, tuple[str, str]] = {
    "Rand per US Dollar": ("USD", "ZAR"),
    "Rand per British Pound": ("GBP", "ZAR"),
    "Rand per Euro": ("EUR", "ZAR"),
    **{
        f"{title} per Rand": ("ZAR", code)
        for title, code in (
            ("Australia: Dollar", "AUD"), ("Botswana: Pula", "BWP"), ("Brazil: Real", "BRL"),
            ("Canada: Dollar", "CAD"), ("China: Yuan", "CNY"), ("Denmark: Krone", "DKK"),
            ("Hong Kong: Dollar", "HKD"), ("India: Rupee", "INR"), ("Israel: Shekel", "ILS"),
            ("Japan: Yen", "JPY"), ("Kenya: Schilling", "KES"), ("Malawi: Kwacha", "MWK"),
            ("New Zealand: Dollar", "NZD"), ("Norway: Krone", "NOK"), ("Sweden: Krona", "SEK"),
            ("Switzerland: Franc", "CHF"), ("Taiwan: NT Dollar", "TWD"), ("Thailand: Baht", "THB"),
            ("South Korea: Won", "KRW"), ("Zambia: Kwacha", "ZMW"),
        )
    },
}
# Series code -> title, in the order the requests are made.
SARB_SERIES: dict[str, str] = {
    "EXCX135D": "Rand per US Dollar", "EXCZ001D": "Rand per British Pound",
    "EXCZ002D": "Rand per Euro", "EXCB080D": "Australia: Dollar per Rand",
    "EXCB051D": "Botswana: Pula per Rand", "EXCB036D": "Brazil: Real per Rand",
    "EXCB031D": "Canada: Dollar per Rand", "EXCB121D": "China: Yuan per Rand",
    "EXCB003D": "Denmark: Krone per Rand", "EXCB122D": "Hong Kong: Dollar per Rand",
    "EXCB123D": "India: Rupee per Rand", "EXCB094D": "Israel: Shekel per Rand",
    "EXCB120D": "Japan: Yen per Rand", "EXCB059D": "Kenya: Schilling per Rand",
    "EXCB063D": "Malawi: Kwacha per Rand", "EXCB081D": "New Zealand: Dollar per Rand",
    "EXCB013D": "Norway: Krone per Rand", "EXCB015D": "Sweden: Krona per Rand",
    "EXCB016D": "Switzerland: Franc per Rand", "EXCB126D": "Taiwan: NT Dollar per Rand",
    "EXCB115D": "Thailand: Baht per Rand", "EXCB071D": "Zambia: Kwacha per Rand",
    "EXCB118D": "South Korea: Won per Rand",
}


def _sarb_rows(payload: bytes) -> list[Quote | None]:
    """SARB GetTimeseriesObservations JSON (one series): mostly ZAR -> X (foreign per rand);
    the USD, GBP and EUR series are X -> ZAR (rand per foreign unit), kept as published."""
    data = _load_json(payload, "sarb")
    if not isinstance(data, list) or not all(isinstance(row, Mapping) for row in data):
        raise SourceError("sarb: expected a JSON list of observations")
    candidates: list[Quote | None] = []
    for row in data:
        if "Timeseries" not in row or "Period" not in row:
            raise SourceError(f"sarb: observation with keys {sorted(row)[:6]}")
        pair, day = _SARB_TITLES.get(str(row["Timeseries"]).strip()), _timestamp_day(row["Period"])
        if pair is None or day is None:
            candidates.append(None)
            continue
        candidates.append(_make_quote(*pair, _decimal(row.get("Value")), _midnight(day)))
    return candidates


parse_sarb = _single("sarb", _sarb_rows)


# --------------------------------------------------------------------------- Bank of England

# Series codes of the Statistical Interactive Database: spot, foreign currency per 1 GBP.
_BOE_SERIES: dict[str, str] = {
    "XUDLUSS": "USD", "XUDLERS": "EUR", "XUDLJYS": "JPY", "XUDLCDS": "CAD", "XUDLSFS": "CHF",
    "XUDLADS": "AUD", "XUDLNDS": "NZD", "XUDLNKS": "NOK", "XUDLSKS": "SEK", "XUDLDKS": "DKK",
    "XUDLHDS": "HKD", "XUDLSGS": "SGD", "XUDLSRS": "SAR", "XUDLZRS": "ZAR", "XUDLTWS": "TWD",
    "XUDLBK25": "CZK", "XUDLBK33": "HUF", "XUDLBK47": "PLN", "XUDLBK78": "ILS",
    "XUDLBK83": "MYR", "XUDLBK87": "THB", "XUDLBK89": "CNY", "XUDLBK93": "KRW",
    "XUDLBK95": "TRY", "XUDLBK97": "INR", "XUDLZOS4": "RON",
}


def _boe_rows(payload: bytes) -> list[Quote | None]:
    """Bank of England IADB CSV (CSVF=TN): GBP -> X, one column per series code."""
    table = _csv_table(payload, "boe")
    header = [cell.strip() for cell in table[0]]
    if header[0] != "DATE":
        raise SourceError(f"boe: CSV header starts with {header[0][:40]!r}, not DATE")
    codes = [_BOE_SERIES.get(series) for series in header]
    if not any(codes):
        raise SourceError("boe: CSV header has no known series code")
    candidates: list[Quote | None] = []
    for row in _data_rows(table, "boe"):
        day = _named_month_day(row[0])
        for code, cell in zip(codes[1:], row[1:], strict=True):
            if code is not None and cell.strip():
                candidates.append(
                    _make_quote("GBP", code, _decimal(cell), _midnight(day)) if day else None
                )
    return candidates


parse_boe = _single("boe", _boe_rows)


# --------------------------------------------------------------------------- HKMA

# Euro predecessors the API still lists (always null) and its index fields are not quotes.
_HKMA_SKIP = frozenset({"dem", "nlg", "bef", "frf", "itl"})


def _hkma_rows(payload: bytes) -> list[Quote | None]:
    """HKMA er-eeri-daily JSON: X -> HKD per 1 unit, lower-case keys, `end_of_day` dates.

    Values are binary floats (`7.8245000000000005`); they are read at 15 significant
    digits with the float noise removed (7.8245). `null` values are no observation.
    """
    data: Any = _load_json(payload, "hkma")
    header = data.get("header") if isinstance(data, Mapping) else None
    if not isinstance(header, Mapping) or header.get("success") is not True:
        message = header.get("err_msg") if isinstance(header, Mapping) else None
        raise SourceError(f"hkma: API error: {str(message)[:120] if message else 'no header'}")
    candidates: list[Quote | None] = []
    for record in _listed(data.get("result"), "records", "hkma", "result.records"):
        day = _iso_day(_field(record, "end_of_day"))
        if day is None:
            raise SourceError("hkma: record without end_of_day")
        for key, value in record.items():
            code = "XDR" if key == "special_drawing_rights" else key
            if len(code) != 3 or key in _HKMA_SKIP or value is None:
                continue
            rate = _decimal(value)
            candidates.append(_make_quote(code.upper(), "HKD", None if rate is None else _denoise(rate),
                                          _midnight(day)))
    return candidates


parse_hkma = _single("hkma", _hkma_rows)


def _denoise(value: Decimal) -> Decimal:
    """A float's decimal text at 15 significant digits without trailing zeros."""
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = MAX_DIGITS, ROUND_HALF_EVEN
        rounded = +value
    if _exponent(rounded) >= 0:
        return rounded
    stripped = rounded.normalize()
    return stripped if _exponent(stripped) <= 0 else stripped.quantize(Decimal(1))


# --------------------------------------------------------------------------- request planning

DAILY_WINDOW_DAYS = 7  # a daily run of a range endpoint reads the last week: holidays, lags


def _window(today: date, days: int) -> tuple[date, date]:
    """The first and last day of a window of `days` days ending `today`."""
    return today - timedelta(days=max(days, 1) - 1), today


def _each_day(today: date, days: int, *, weekdays_only: bool = False) -> list[date]:
    start, _ = _window(today, days)
    every = (start + timedelta(days=i) for i in range((today - start).days + 1))
    return [day for day in every if not weekdays_only or day.weekday() < 5]


def _chunks(today: date, days: int, size: int, min_days: int = 1) -> list[tuple[date, date]]:
    """Windows of at most `size` days ending today that cover `days` days (newest first);
    the oldest reaches back far enough to span at least `min_days`."""
    start, _ = _window(today, days)
    windows = []
    end = today
    while end >= start:
        first = max(start, end - timedelta(days=size - 1))
        windows.append((min(first, end - timedelta(days=min_days - 1)), end))
        end = first - timedelta(days=1)
    return windows


def _get(url: str) -> list[Request]:
    return [Request(url)]


ECB_DAILY_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml"
ECB_HIST_90D_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-hist-90d.xml"
ECB_HIST_URL = "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-hist.xml"


def _ecb_history(today: date, days: int) -> list[Request]:
    return _get(ECB_HIST_90D_URL if days <= 90 else ECB_HIST_URL)


NBU_DAILY_URL = "https://bank.gov.ua/NBUStatService/v1/statdirectory/exchange?json"
NBU_RANGE_URL = "https://bank.gov.ua/NBU_Exchange/exchange_site"


def _nbu_history(today: date, days: int) -> list[Request]:
    return [
        Request(f"{NBU_RANGE_URL}?end={end:%Y%m%d}&json=&order=asc&sort=exchangedate"
                f"&start={start:%Y%m%d}")
        for start, end in _chunks(today, days, 93)
    ]


CBR_DAILY_URL = "https://www.cbr.ru/scripts/XML_daily.asp"


def _cbr_history(today: date, days: int) -> list[Request]:
    return [Request(f"{CBR_DAILY_URL}?date_req={day:%d/%m/%Y}") for day in _each_day(today, days)]


PRIVATBANK_URL = "https://api.privatbank.ua/p24api/pubinfo?exchange&coursid=5"
BOC_URL = "https://www.bankofcanada.ca/valet/observations/group/FX_RATES_DAILY/json"


def _boc_history(today: date, days: int) -> list[Request]:
    start, _ = _window(today, days)
    return _get(f"{BOC_URL}?start_date={start:%Y-%m-%d}")


BDI_URL = "https://tassidicambio.bancaditalia.it/terzevalute-wf-web/rest/v1.0/dailyRates"


def _bdi_day(day: date) -> Request:
    return Request(f"{BDI_URL}?currencyIsoCode=EUR&lang=en&referenceDate={day:%Y-%m-%d}")


def _bdi_daily(today: date) -> list[Request]:
    # Published in the afternoon (CET): the previous business day as well, for the morning.
    return [_bdi_day(day) for day in _each_day(today, 4, weekdays_only=True)[-2:]]


def _bdi_history(today: date, days: int) -> list[Request]:
    return [_bdi_day(day) for day in _each_day(today, days, weekdays_only=True)]


NBP_URL = "https://api.nbp.pl/api"


def _nbp_range(start: date, end: date, *, table_b_days: int = 0) -> list[Request]:
    # Table B is weekly (Wednesdays): its window needs two weeks to always hold a table.
    b_start = min(start, end - timedelta(days=table_b_days - 1)) if table_b_days else start
    return [
        Request(f"{NBP_URL}/exchangerates/tables/A/{start}/{end}/?format=json"),
        Request(f"{NBP_URL}/exchangerates/tables/B/{b_start}/{end}/?format=json"),
        Request(f"{NBP_URL}/cenyzlota/{start}/{end}/?format=json"),
    ]


def _nbp_daily(today: date) -> list[Request]:
    return _nbp_range(*_window(today, DAILY_WINDOW_DAYS), table_b_days=14)


def _nbp_history(today: date, days: int) -> list[Request]:
    # NBP serves at most 93 days per request (and 404 for a range without a table).
    # A short oldest window could hold no table (404): it spans two weeks at least.
    return [request for start, end in _chunks(today, days, 93, min_days=14)
            for request in _nbp_range(start, end)]


CNB_URL = "https://api.cnb.cz/cnbapi/exrates/daily-year"


def _cnb_year(year: int) -> Request:
    return Request(f"{CNB_URL}?lang=EN&year={year}")


def _cnb_daily(today: date) -> list[Request]:
    # Early in January the new year may have no fixing yet: read the old year too.
    years = [today.year - 1, today.year] if today.timetuple().tm_yday <= 7 else [today.year]
    return [_cnb_year(year) for year in years]


def _cnb_history(today: date, days: int) -> list[Request]:
    start, _ = _window(today, days)
    return [_cnb_year(year) for year in range(start.year, today.year + 1)]


MNB_URL = "http://www.mnb.hu/arfolyamok.asmx"
MNB_CURRENCIES = ("AUD,BRL,CAD,CHF,CNY,CZK,DKK,EUR,GBP,HKD,IDR,ILS,INR,ISK,JPY,KRW,MXN,MYR,NOK,"
                  "NZD,PHP,PLN,RON,RSD,RUB,SEK,SGD,THB,TRY,UAH,USD,ZAR")
_MNB_ACTION = "http://www.mnb.hu/webservices/MNBArfolyamServiceSoap/GetExchangeRates"


def _mnb_request(start: date, end: date) -> Request:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:web="http://www.mnb.hu/webservices/"><soap:Body><web:GetExchangeRates>'
        f"<web:startDate>{start}</web:startDate><web:endDate>{end}</web:endDate>"
        f"<web:currencyNames>{MNB_CURRENCIES}</web:currencyNames>"
        "</web:GetExchangeRates></soap:Body></soap:Envelope>"
    ).encode()
    headers = (("Content-Type", "text/xml; charset=utf-8"), ("SOAPAction", _MNB_ACTION))
    return Request(MNB_URL, "POST", body, headers)


def _mnb_daily(today: date) -> list[Request]:
    return [_mnb_request(*_window(today, DAILY_WINDOW_DAYS))]


def _mnb_history(today: date, days: int) -> list[Request]:
    return [_mnb_request(*_window(today, days))]


NB_URL = "https://data.norges-bank.no/api/data/EXR/B..NOK.SP"


def _nb_range(start: date, end: date) -> list[Request]:
    return _get(f"{NB_URL}?format=csvdata&startPeriod={start}&endPeriod={end}")


def _nb_daily(today: date) -> list[Request]:
    return _nb_range(*_window(today, DAILY_WINDOW_DAYS))


def _nb_history(today: date, days: int) -> list[Request]:
    return _nb_range(*_window(today, days))


RBA_URL = "https://www.rba.gov.au/statistics/tables/csv/f11.1-data.csv"


def _rba_requests(today: date, days: int = 0) -> list[Request]:
    return _get(RBA_URL)  # the whole current file (since 2023-01-03), daily or backfill


NBG_URL = "https://nbg.gov.ge/gw/api/ct/monetarypolicy/currencies/"


def _nbg_day(day: date) -> Request:
    return Request(f"{NBG_URL}?date={day:%Y-%m-%d}")


def _nbg_history(today: date, days: int) -> list[Request]:
    return [_nbg_day(day) for day in _each_day(today, days)]


NBK_URL = "https://nationalbank.kz/rss/get_rates.cfm"


def _nbk_day(day: date) -> Request:
    return Request(f"{NBK_URL}?fdate={day:%d.%m.%Y}")


def _nbk_history(today: date, days: int) -> list[Request]:
    return [_nbk_day(day) for day in _each_day(today, days)]


NBRB_URL = "https://api.nbrb.by/exrates/rates"
# Cur_IDs of the daily list (periodicity=0); their codes and scales come from the list itself.
NBRB_IDS = (440, 510, 514, 449, 450, 513, 431, 512, 451, 452, 508, 511, 461, 453, 371, 462,
            394, 454, 448, 455, 456, 457, 421, 458, 459, 460, 429, 463, 464, 426)


def _nbrb_history(today: date, days: int) -> list[Request]:
    return [Request(f"{NBRB_URL}?periodicity=0")] + [
        Request(f"{NBRB_URL}/dynamics/{cur_id}?endDate={end}&startDate={start}")
        for start, end in _chunks(today, days, 365)
        for cur_id in NBRB_IDS
    ]


SARB_URL = "https://custom.resbank.co.za/SarbWebApi/WebIndicators/Shared/GetTimeseriesObservations"


def _sarb_range(start: date, end: date) -> list[Request]:
    return [Request(f"{SARB_URL}/{series}/{start}T00:00:00/{end}T00:00:00") for series in SARB_SERIES]


def _sarb_daily(today: date) -> list[Request]:
    return _sarb_range(*_window(today, DAILY_WINDOW_DAYS))


def _sarb_history(today: date, days: int) -> list[Request]:
    return _sarb_range(*_window(today, days))


BOE_URL = "https://www.bankofengland.co.uk/boeapps/database/_iadb-fromshowcolumns.asp"


def _boe_range(start: date, end: date) -> list[Request]:
    def day(value: date) -> str:  # 17/Mar/2026, locale-independent
        return f"{value.day:02d}/{next(k for k, v in _MONTHS.items() if v == value.month)}/{value.year}"

    return _get(f"{BOE_URL}?CSVF=TN&Datefrom={day(start)}&Dateto={day(end)}"
                f"&SeriesCodes={','.join(_BOE_SERIES)}&UsingCodes=Y&csv.x=yes")


def _boe_daily(today: date) -> list[Request]:
    return _boe_range(*_window(today, DAILY_WINDOW_DAYS))


def _boe_history(today: date, days: int) -> list[Request]:
    return _boe_range(*_window(today, days))


HKMA_URL = ("https://api.hkma.gov.hk/public/market-data-and-statistics/"
            "monthly-statistical-bulletin/er-ir/er-eeri-daily")


def _hkma_range(start: date, end: date) -> Request:
    # At most one record per day, so a window of <= 100 days fits one page of 100.
    return Request(f"{HKMA_URL}?choose=end_of_day&from={start}&to={end}&offset=0&pagesize=100"
                   "&sortby=end_of_day&sortorder=desc")


def _hkma_daily(today: date) -> list[Request]:
    # A monthly bulletin: the daily rates appear about a month late.
    return [_hkma_range(*_window(today, 92))]


def _hkma_history(today: date, days: int) -> list[Request]:
    return [_hkma_range(start, end) for start, end in _chunks(today, days, 100)]


# --------------------------------------------------------------------------- registry

FEEDS: dict[str, Source] = {
    source.name: source
    for source in (
        Source("ecb", "European Central Bank euro reference rates", "EU",
               ECB_DAILY_URL, "EUR", FOREIGN_PER_PIVOT, "daily, business days",
               partial(_parse_all, "ecb", _ecb_rows), lambda today: _get(ECB_DAILY_URL),
               _ecb_history, "eurofxref-hist-90d.xml (eurofxref-hist.xml beyond 90 days)",
               full_url_override=True),
        Source("nbu", "National Bank of Ukraine official rates", "UA",
               NBU_DAILY_URL, "UAH", PIVOT_PER_FOREIGN,
               "daily, business days (set for the next day)",
               partial(_parse_all, "nbu", _nbu_rows), lambda today: _get(NBU_DAILY_URL),
               _nbu_history, "NBU_Exchange/exchange_site?start=&end= (93-day requests)",
               full_url_override=True),
        Source("cbr", "Central Bank of Russia official rates", "RU",
               CBR_DAILY_URL, "RUB", PIVOT_PER_FOREIGN,
               "daily, business days (set for the next day)",
               partial(_parse_all, "cbr", _cbr_rows), lambda today: _get(CBR_DAILY_URL),
               _cbr_history, "XML_daily.asp?date_req=DD/MM/YYYY (one request per day)",
               full_url_override=True),
        Source("privatbank", "PrivatBank cash rates (mid of buy and sale)", "UA",
               PRIVATBANK_URL, "UAH", PIVOT_PER_FOREIGN, "intraday (no date in the feed)",
               partial(_parse_all, "privatbank", _privatbank_rows),
               lambda today: _get(PRIVATBANK_URL), full_url_override=True),
        Source("boc", "Bank of Canada daily exchange rates", "CA",
               f"{BOC_URL}?recent=5", "CAD", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "boc", _boc_rows), lambda today: _get(f"{BOC_URL}?recent=5"),
               _boc_history, "FX_RATES_DAILY/json?start_date=", full_url_override=True),
        Source("bdi", "Banca d'Italia exchange rates against the euro", "IT",
               BDI_URL, "EUR", FOREIGN_PER_PIVOT, "daily, business days",
               partial(_parse_all, "bdi", _bdi_rows), _bdi_daily,
               _bdi_history, "dailyRates?referenceDate= (one request per business day)"),
        Source("nbp", "Narodowy Bank Polski tables A and B, gold", "PL",
               f"{NBP_URL}/exchangerates/tables/", "PLN", PIVOT_PER_FOREIGN,
               "daily, business days (table B weekly, Wednesdays)",
               partial(_parse_all, "nbp", _nbp_rows, stale_per_payload=True), _nbp_daily,
               _nbp_history, "tables/{A,B}/{start}/{end} and cenyzlota (93-day requests)"),
        Source("cnb", "Czech National Bank exchange rate fixing", "CZ",
               CNB_URL, "CZK", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "cnb", _cnb_rows), _cnb_daily,
               _cnb_history, "exrates/daily-year?year= (one request per year)"),
        Source("mnb", "Magyar Nemzeti Bank official rates (SOAP)", "HU",
               MNB_URL, "HUF", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "mnb", _mnb_rows), _mnb_daily,
               _mnb_history, "GetExchangeRates startDate/endDate (one POST)"),
        Source("nb", "Norges Bank exchange rates (SDMX)", "NO",
               NB_URL, "NOK", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "nb", _nb_rows), _nb_daily,
               _nb_history, "EXR/B..NOK.SP?startPeriod=&endPeriod="),
        Source("rba", "Reserve Bank of Australia table F11.1", "AU",
               RBA_URL, "AUD", FOREIGN_PER_PIVOT, "daily, business days",
               partial(_parse_all, "rba", _rba_rows), _rba_requests,
               _rba_requests, "f11.1-data.csv (the current file, since 2023-01-03)"),
        Source("nbg", "National Bank of Georgia official rates", "GE",
               NBG_URL, "GEL", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "nbg", _nbg_rows), lambda today: [_nbg_day(today)],
               _nbg_history, "currencies/?date= (one request per day)"),
        Source("nbk", "National Bank of Kazakhstan official rates", "KZ",
               NBK_URL, "KZT", PIVOT_PER_FOREIGN, "daily, business days",
               partial(_parse_all, "nbk", _nbk_rows), lambda today: [_nbk_day(today)],
               _nbk_history, "get_rates.cfm?fdate= (one request per day)"),
        Source("nbrb", "National Bank of the Republic of Belarus official rates", "BY",
               f"{NBRB_URL}?periodicity=0", "BYN", PIVOT_PER_FOREIGN, "daily, business days",
               parse_nbrb_payloads, lambda today: _get(f"{NBRB_URL}?periodicity=0"),
               _nbrb_history, "rates/dynamics/{Cur_ID} per currency (365-day requests)"),
        Source("sarb", "South African Reserve Bank weighted-average rates", "ZA",
               SARB_URL, "ZAR", FOREIGN_PER_PIVOT,
               "daily, business days",
               partial(_parse_all, "sarb", _sarb_rows), _sarb_daily,
               _sarb_history, "GetTimeseriesObservations/{series}/{start}/{end} per series"),
        Source("boe", "Bank of England spot rates", "GB",
               BOE_URL, "GBP", FOREIGN_PER_PIVOT, "daily, business days",
               partial(_parse_all, "boe", _boe_rows), _boe_daily,
               _boe_history, "_iadb-fromshowcolumns.asp?Datefrom=&Dateto="),
        Source("hkma", "Hong Kong Monetary Authority daily exchange rates", "HK",
               HKMA_URL, "HKD", PIVOT_PER_FOREIGN,
               "monthly (daily rates, published about a month late)",
               partial(_parse_all, "hkma", _hkma_rows), _hkma_daily,
               _hkma_history, "er-eeri-daily?from=&to= (100-day pages)"),
    )
}

SOURCE_NAMES: tuple[str, ...] = ("demo", *FEEDS)


# --------------------------------------------------------------------------- demo

# EUR reference rates of 2024-02-27 (ECB), with their published precision.
_DEMO_TABLE: dict[str, Decimal] = {
    code: Decimal(rate)
    for code, rate in (
        ("USD", "1.0856"), ("JPY", "163.04"), ("BGN", "1.9558"), ("CZK", "25.332"),
        ("DKK", "7.4551"), ("GBP", "0.85620"), ("HUF", "390.20"), ("PLN", "4.3153"),
        ("RON", "4.9668"), ("SEK", "11.1805"), ("CHF", "0.9544"), ("ISK", "149.30"),
        ("NOK", "11.4310"), ("TRY", "33.8132"), ("AUD", "1.6565"), ("BRL", "5.3945"),
        ("CAD", "1.4650"), ("CNY", "7.8140"), ("HKD", "8.4947"), ("IDR", "16976.12"),
        ("ILS", "3.9342"), ("INR", "89.9755"), ("KRW", "1445.31"), ("MXN", "18.5221"),
        ("MYR", "5.1696"), ("NZD", "1.7601"), ("PHP", "60.902"), ("SGD", "1.4584"),
        ("THB", "38.932"), ("ZAR", "20.7720"),
    )
}
_DEMO_WINDOW = 100  # ticks summed into the walk: bounded work, bounded drift
_DEMO_STEP = 0.0015  # max |log step| per tick; consecutive ticks differ by <= 2 steps (0.3 %)


@lru_cache(maxsize=8192)
def _demo_step(tick: int, code: str) -> float:
    # Seeded from the tick and the currency alone, so every process computes the same walk.
    return random.Random(f"xrates-demo:{tick}:{code}").uniform(-_DEMO_STEP, _DEMO_STEP)


def demo_quotes(now: datetime, interval_s: float = 600) -> list[Quote]:
    """Offline, deterministic rates: EUR -> ~30 currencies, a random walk per tick.

    `tick = floor(now.timestamp() / interval_s)`; the same tick always gives the same rates,
    and each rate is its table value times exp(sum of the last 100 seeded steps), so
    consecutive ticks differ by at most ~0.3 % (well inside the updater's jump guard).
    `as_of` is the start of the tick.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    if not interval_s > 0:
        raise ValueError("interval_s must be positive")
    tick = math.floor(now.timestamp() / interval_s)
    as_of = datetime.fromtimestamp(tick * interval_s, UTC)
    quotes = []
    for code, base_rate in _DEMO_TABLE.items():
        drift = math.fsum(_demo_step(t, code) for t in range(tick - _DEMO_WINDOW + 1, tick + 1))
        with localcontext() as ctx:
            # Keep the table's published precision (e.g. 5 significant digits for 1.0856).
            ctx.prec, ctx.rounding = len(base_rate.as_tuple().digits), ROUND_HALF_EVEN
            rate = +(base_rate * Decimal(math.exp(drift)))
        quotes.append(Quote("EUR", code, rate, as_of))
    return quotes


# --------------------------------------------------------------------------- HTTP

# Worth another attempt: the server may answer next time.
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, TimeoutError)


def make_client() -> httpx.AsyncClient:
    """An HTTP client for feeds: bounded timeouts, our User-Agent, no redirects followed."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, connect=5.0),
        headers={"User-Agent": USER_AGENT},
        follow_redirects=False,
    )


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    timeout_s: float = 10.0,
    attempts: int = 3,
    backoff_s: float = 0.5,
    method: str = "GET",
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """Request `url` (GET, or `method` with `body` and `headers`); the body of a 2xx response.

    Each attempt is bounded by `timeout_s` in total. Timeouts, connection errors and HTTP 5xx
    are retried with exponential backoff (`backoff_s`, 2x, 4x, ...); anything else (4xx, a
    redirect, an invalid URL) fails at once. Failures raise `FetchError` naming the URL and
    the reason.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    shown = f"{method} {_redact(url)}"
    reason = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            status, content = await _request_once(client, url, timeout_s, method, body, headers)
        except _RETRYABLE as exc:
            reason = _describe(exc, timeout_s)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"{shown} failed: {_describe(exc, timeout_s)}") from exc
        else:
            if 200 <= status < 300:
                return content
            if 300 <= status < 400:
                raise FetchError(f"{shown} failed: HTTP {status} (redirects are not followed)")
            if status < 500:
                raise FetchError(f"{shown} failed: HTTP {status}")
            reason = f"HTTP {status}"
        if attempt < attempts:
            delay_s = backoff_s * 2 ** (attempt - 1)
            log.warning("%s attempt %d/%d failed (%s); retrying in %.2f s",
                        shown, attempt, attempts, reason, delay_s)
            await asyncio.sleep(delay_s)
    raise FetchError(f"{shown} failed after {attempts} attempt(s): {reason}")


async def _request_once(client: httpx.AsyncClient, url: str, timeout_s: float, method: str,
                        body: bytes | None, headers: Sequence[tuple[str, str]]) -> tuple[int, bytes]:
    """One request; the body is read only for 2xx and capped at MAX_BODY_BYTES."""
    # httpx's timeout bounds each phase; asyncio.timeout bounds the whole attempt, so a
    # server that trickles bytes cannot hold a run forever.
    async with asyncio.timeout(timeout_s):
        async with client.stream(method, url, content=body, headers=list(headers),
                                 timeout=timeout_s, follow_redirects=False) as resp:
            if not resp.is_success:
                return resp.status_code, b""
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise FetchError(f"{method} {_redact(url)}: body over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"timed out after {timeout_s:g} s ({type(exc).__name__})"
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without credentials, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


# --------------------------------------------------------------------------- overrides


def override_url(url: str, override: str | None) -> str:
    """`url` with its scheme://host[:port] replaced by those of `override` (path and query kept).

    `override` must be just an origin (`http://mirror:8080`, a trailing `/` allowed); a
    value with a path is rejected here (see `planned_requests` for the original feeds).
    """
    if not override:
        return url
    parts = urlsplit(override.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SourceError(f"override {_redact(override)!r} must look like http(s)://host[:port]")
    if _has_path(override):
        raise SourceError(f"override {_redact(override)!r} has a path; give only "
                          "scheme://host[:port]")
    return urlunsplit(urlsplit(url)._replace(scheme=parts.scheme, netloc=parts.netloc))


def _has_path(override: str) -> bool:
    parts = urlsplit(override.strip())
    return parts.path not in ("", "/") or bool(parts.query) or bool(parts.fragment)


def planned_requests(source: Source, requests: Sequence[Request],
                     override: str | None) -> list[Request]:
    """The requests of a run under an override (`XRATES_<SOURCE>_URL` or `_HISTORY_URL`).

    An origin replaces the scheme://host[:port] of every request. For the five original
    feeds a value with a path keeps its old meaning, the whole URL of their one request.
    """
    if not override:
        return list(requests)
    if _has_path(override) and source.full_url_override and len(requests) == 1:
        [request] = requests
        return [Request(override.strip(), request.method, request.body, request.headers)]
    if _has_path(override):
        raise SourceError(f"{source.name}: override {_redact(override)!r} has a path; give only "
                          "scheme://host[:port]")
    return [Request(override_url(r.url, override), r.method, r.body, r.headers) for r in requests]


async def fetch_quotes(
    source: Source,
    client: httpx.AsyncClient,
    *,
    today: date,
    url_override: str | None = None,
    history: bool = False,
    history_url_override: str | None = None,
    days: int = 0,
    timeout_s: float = 10.0,
    attempts: int = 3,
) -> list[Quote]:
    """Make every request of a daily run (or, with `history`, a backfill of `days` days ending
    `today`) and parse the payloads; any failing request fails the whole source.

    Backfill requests use `history_url_override` when set, else `url_override`.
    Requests run one after the other: polite to the upstream, and bounded by
    `timeout_s` x `attempts` each.
    """
    if history:
        if source.history_requests is None:
            raise SourceError(f"{source.name}: no multi-day endpoint, cannot backfill")
        if days < 1:
            raise ValueError("days must be >= 1 for a backfill")
        plan = source.history_requests(today, days)
        override = history_url_override or url_override
    else:
        plan = source.daily_requests(today)
        override = url_override
    payloads = []
    for request in planned_requests(source, plan, override):
        try:
            payloads.append(await fetch(client, request.url, timeout_s=timeout_s,
                                        attempts=attempts, method=request.method,
                                        body=request.body, headers=request.headers))
        except FetchError as exc:
            raise FetchError(f"{source.name}: {exc}") from exc
    return source.parse_payloads(payloads)
