"""Upstream rate feeds: fetch bytes over HTTP and parse them into `Quote` rows.

One small pure parser per feed (`parse_ecb`, `parse_nbu`, `parse_cbr`, `parse_privatbank`,
`parse_boc`), registered in `FEEDS`, plus the offline `demo` source. Parsers take the raw
payload bytes and return quotes that already satisfy the API's rate and code rules, or raise
`SourceError` when the payload is not a usable feed (an error body served with HTTP 200, an
HTML page, garbage, no rates). Persistence, the jump guard and scheduling belong to the updater.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger("xrates.sources")

MIN_RATE = Decimal("1e-12")  # inclusive, as in SPEC §3
MAX_RATE = Decimal("1e12")  # exclusive
MAX_DIGITS = 15  # significant digits; trailing zeros do not count
MAX_BODY_BYTES = 8 * 1024 * 1024  # real feeds are < 200 KB; a bigger body is a wrong URL

USER_AGENT = "xrates/0.1"

_CODE_RE = re.compile(r"[A-Z]{3}")
# Non-ISO codes some feeds still use for real currencies.
_CODE_ALIASES = {"RUR": "RUB"}
# Three-letter tickers that look like ISO 4217 codes but are not currencies we serve.
_NOT_ISO = frozenset({"BTC", "ETH", "LTC", "XBT", "XRP"})
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


@dataclass(frozen=True, slots=True)
class Source:
    """An upstream feed: its name, public URL and pure parser."""

    name: str
    default_url: str
    parse: Callable[[bytes], list[Quote]]


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


def _agrees(exact: Decimal, published: Decimal) -> bool:
    """True when `published` is `exact` itself or `exact` rounded to the published digits."""
    half_ulp = Decimal(5).scaleb(published.as_tuple().exponent - 1)
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


def _finish(feed: str, candidates: Iterable[Quote | None]) -> list[Quote]:
    """Drop unusable rows and duplicate pairs; a payload with no usable rate is an error."""
    kept: dict[tuple[str, str], Quote] = {}
    dropped = 0
    for quote in candidates:
        if quote is None:
            dropped += 1
            continue
        key = (quote.base, quote.quote)
        if key in kept:
            # One bulk upsert cannot touch the same row twice; the first row wins.
            log.warning("%s: duplicate pair %s/%s dropped", feed, *key)
            dropped += 1
            continue
        kept[key] = quote
    if not kept:
        raise SourceError(f"{feed}: payload holds no usable rates")
    if dropped:
        log.info("%s: %d quotes, %d unusable rows dropped", feed, len(kept), dropped)
    return list(kept.values())


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


def parse_ecb(payload: bytes) -> list[Quote]:
    """ECB euro reference rates (daily or hist-90d XML): EUR -> X, newest day only."""
    root = _load_xml(payload, "ecb")
    days: list[tuple[date, ET.Element]] = []
    for cube in root.iter():
        if _local(cube.tag) == "Cube" and "time" in cube.attrib:
            day = _iso_day(cube.get("time"))
            if day is not None:
                days.append((day, cube))
    if not days:
        raise SourceError(f"ecb: no dated <Cube time=...> in payload: {_error_text(root)}")
    # The hist files list days newest first; max() does not rely on that order.
    day, cube = max(days, key=lambda item: item[0])
    as_of = _midnight(day)
    return _finish(
        "ecb",
        (
            _make_quote("EUR", row.get("currency"), _decimal(row.get("rate")), as_of)
            for row in cube
            if _local(row.tag) == "Cube"
        ),
    )


# --------------------------------------------------------------------------- NBU


def parse_nbu(payload: bytes) -> list[Quote]:
    """National Bank of Ukraine: X -> UAH, latest `exchangedate` only.

    Accepts the statdirectory JSON (`rate` is per 1 unit), the exchange_site range JSON
    (`rate` is per `units`, with `rate_per_unit`) and the statdirectory XML form.
    """
    if payload.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        rows = _nbu_xml_rows(_load_xml(payload, "nbu"))
    else:
        data = _load_json(payload, "nbu")
        if not isinstance(data, list):
            raise SourceError(f"nbu: expected a JSON list, got {type(data).__name__}")
        rows = [row for row in data if isinstance(row, Mapping)]
    dated = [(_dotted_day(row.get("exchangedate")), row) for row in rows]
    days = [day for day, _ in dated if day is not None]
    if not days:
        raise SourceError("nbu: no rows with an exchangedate in payload")
    latest = max(days)  # a range payload covers several days; keep only the newest
    as_of = _midnight(latest)
    return _finish(
        "nbu",
        (
            _make_quote(row.get("cc"), "UAH", _nbu_rate(row), as_of)
            for day, row in dated
            if day == latest
        ),
    )


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
    units = _decimal(row.get("units"))
    if units is None or units <= 0:
        return None
    per_unit = rate if units == 1 else _divide(rate, units)
    published = _decimal(row.get("rate_per_unit"))
    if published is not None and not _agrees(per_unit, published):
        log.warning("nbu: %s rate %s / units %s != rate_per_unit %s; row dropped",
                    row.get("cc"), rate, units, published)
        return None
    return per_unit


# --------------------------------------------------------------------------- CBR


def parse_cbr(payload: bytes) -> list[Quote]:
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
    return _finish(
        "cbr",
        (_make_quote(_child_text(v, "CharCode"), "RUB", _cbr_rate(v), as_of) for v in valutes),
    )


def _cbr_rate(valute: ET.Element) -> Decimal | None:
    """RUB per 1 unit; `Value` is the price of `Nominal` units (e.g. 100 HUF)."""
    value = _decimal(_child_text(valute, "Value"), comma=True)
    nominal = _decimal(_child_text(valute, "Nominal"), comma=True)
    if value is None or nominal is None or nominal <= 0:
        return None
    per_unit = value if nominal == 1 else _divide(value, nominal)
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
    as_of = _minute(now if now is not None else datetime.now(UTC))
    data = _load_json(payload, "privatbank")
    if not isinstance(data, list):
        raise SourceError(f"privatbank: expected a JSON list, got {type(data).__name__}")
    return _finish(
        "privatbank",
        (_privatbank_quote(row, as_of) if isinstance(row, Mapping) else None for row in data),
    )


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


def parse_boc(payload: bytes) -> list[Quote]:
    """Bank of Canada Valet FX_RATES_DAILY: X -> CAD, each series' latest observation.

    `recent=N` is per series, so discontinued series (MYR, THB, VND stopped in 2019) still
    appear with their last value; a series whose latest value is older than the feed's
    newest date is dropped.
    """
    data = _load_json(payload, "boc")
    observations = data.get("observations") if isinstance(data, Mapping) else None
    if not isinstance(observations, list):
        raise SourceError("boc: payload has no `observations` list")
    latest: dict[str, tuple[date, Decimal | None]] = {}
    for observation in observations:
        for series, day, rate in _boc_values(observation):
            if series not in latest or day > latest[series][0]:
                latest[series] = (day, rate)
    usable_days = [day for day, rate in latest.values() if rate is not None]
    if not usable_days:
        raise SourceError("boc: no usable observations in payload")
    newest = max(usable_days)
    stale = sorted(series for series, (day, _) in latest.items() if day < newest)
    if stale:
        log.info("boc: dropped stale series %s (older than %s)", ", ".join(stale), newest)
    as_of = _midnight(newest)
    return _finish(
        "boc",
        (
            _make_quote(series, "CAD", rate, as_of)
            for series, (day, rate) in latest.items()
            if day == newest
        ),
    )


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


# --------------------------------------------------------------------------- registry

FEEDS: dict[str, Source] = {
    source.name: source
    for source in (
        Source("ecb", "https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml", parse_ecb),
        Source(
            "nbu",
            "https://bank.gov.ua/NBUStatService/v1/statdirectory/exchange?json",
            parse_nbu,
        ),
        Source("cbr", "https://www.cbr.ru/scripts/XML_daily.asp", parse_cbr),
        Source(
            "privatbank",
            "https://api.privatbank.ua/p24api/pubinfo?exchange&coursid=5",
            parse_privatbank,
        ),
        Source(
            "boc",
            "https://www.bankofcanada.ca/valet/observations/group/FX_RATES_DAILY/json?recent=5",
            parse_boc,
        ),
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
) -> bytes:
    """GET `url` and return the body of a 2xx response.

    Each attempt is bounded by `timeout_s` in total. Timeouts, connection errors and HTTP 5xx
    are retried with exponential backoff (`backoff_s`, 2x, 4x, ...); anything else (4xx, a
    redirect, an invalid URL) fails at once. Failures raise `FetchError` naming the URL and
    the reason.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    shown = _redact(url)
    reason = "no attempt made"
    for attempt in range(1, attempts + 1):
        try:
            status, body = await _get_once(client, url, timeout_s)
        except _RETRYABLE as exc:
            reason = _describe(exc, timeout_s)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"GET {shown} failed: {_describe(exc, timeout_s)}") from exc
        else:
            if 200 <= status < 300:
                return body
            if 300 <= status < 400:
                raise FetchError(f"GET {shown} failed: HTTP {status} (redirects are not followed)")
            if status < 500:
                raise FetchError(f"GET {shown} failed: HTTP {status}")
            reason = f"HTTP {status}"
        if attempt < attempts:
            delay_s = backoff_s * 2 ** (attempt - 1)
            log.warning("GET %s attempt %d/%d failed (%s); retrying in %.2f s",
                        shown, attempt, attempts, reason, delay_s)
            await asyncio.sleep(delay_s)
    raise FetchError(f"GET {shown} failed after {attempts} attempt(s): {reason}")


async def _get_once(client: httpx.AsyncClient, url: str, timeout_s: float) -> tuple[int, bytes]:
    """One GET; the body is read only for 2xx and capped at MAX_BODY_BYTES."""
    # httpx's timeout bounds each phase; asyncio.timeout bounds the whole attempt, so a
    # server that trickles bytes cannot hold a run forever.
    async with asyncio.timeout(timeout_s):
        async with client.stream("GET", url, timeout=timeout_s, follow_redirects=False) as resp:
            if not resp.is_success:
                return resp.status_code, b""
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise FetchError(f"GET {_redact(url)}: body over {MAX_BODY_BYTES} bytes")
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
