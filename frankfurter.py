"""Frankfurter v1 compatibility: the pure core behind `/v1/latest`, `/v1/{date}`, the time
series `/v1/{start}..{end}` and `/v1/currencies`.

No I/O, no clock, no Sanic, no SQL. The caller hands in one source's history, already
normalised to "1 pivot = r units of code":

    history: Mapping[date, Mapping[str, Decimal]]   # day -> {code: rate}; the pivot itself is ignored

plus the pivot code (the source's base, "EUR" for ECB) and, where v1 reads `Date.today`, the
UTC date as `today`. Every function either returns a body (a plain dict, ready for `encode`)
or raises `FrankfurterError(status, message)`, whose `body()` is v1's `{"message": ...}`.

What is reproduced from Frankfurter's Ruby source (lineofflight/frankfurter, `lib/versions/v1*`,
`lib/carry_forward.rb`, `lib/rate_scopes.rb`) and why it matters to clients:

* Parameters (`Query.build`): `from` beats `base`, `to` beats `symbols`, values upper-cased,
  symbols split on "," like Ruby's `String#split` (not trimmed, trailing empties dropped),
  `amount` read like Ruby's `String#to_f` ("10abc" is 10.0, "abc" is 0.0) and must be > 0,
  "bad currency pair" only when an explicit base is the only symbol. Checked in v1's order:
  amount, then the path date, then the pair. Unknown parameters are ignored.
* Rates are Ruby Floats: `v = amount * rate`, rounded by magnitude band when
  `amount != 1.0 or base != pivot`; a base other than the pivot is a second, rounded step
  `round(amount * v / divisor)` over the already rounded values. Above 5000 the value is an
  Integer (half away from zero), so JSON shows `12345`, not `12345.0`.
* `/{date}` takes each currency's newest row in `[date - 14, date]` (`CarryForward`), groups
  them by their day and answers with the *first* group only (`result.keys.first`); see
  `on_day` for which group that is.
* Ranges snap the start back to the newest day with data <= start, key only days with data
  and drop a day whose base is missing; a start after today is 404.

Deliberate differences (xrates contract): `latest` answers the source's newest day however old,
where v1 looks back 14 days from `Date.today` only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Final

import iso4217

History = Mapping[date, Mapping[str, Decimal]]
"""One source's history: day -> {code: units of code per 1 pivot}."""

QueryArgs = Mapping[str, Sequence[str]]
"""Query parameters as Sanic gives them: name -> every value, in request order."""

Number = float | int
"""A rate in a body: int in the > 5000 band, float otherwise (as v1's Ruby values)."""

Body = dict[str, object]

LOOKBACK_DAYS: Final = 14  # CarryForward::LOOKBACK_DAYS

INVALID_AMOUNT: Final = "invalid amount"
BAD_CURRENCY_PAIR: Final = "bad currency pair"
INVALID_DATE: Final = "invalid date"
NOT_FOUND: Final = "not found"


class FrankfurterError(Exception):
    """A v1 error response: HTTP `status` with the body `{"message": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, str]:
        """The JSON body v1 sends for this error."""
        return {"message": self.message}

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def _not_found() -> FrankfurterError:
    return FrankfurterError(404, NOT_FOUND)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class Query:
    """The v1 query parameters after v1's leniency.

    `base` is None when neither `from` nor `base` was given (the pivot is then the base);
    `symbols` is None when neither `to` nor `symbols` was given (every currency).
    """

    amount: float = 1.0
    base: str | None = None
    symbols: tuple[str, ...] | None = None

    def base_or(self, pivot: str) -> str:
        """The base currency of the response."""
        return self.base if self.base is not None else pivot


def parse_query(args: QueryArgs, path_date: str | None = None) -> Query:
    """Read v1's query parameters; raise `FrankfurterError` 422 as v1 does.

    `args` must keep blank values (Sanic: `request.get_args(keep_blank_values=True)`), since
    `amount=` is 422 in v1, not "no amount". A repeated parameter counts with its last value,
    as Rack parses it. `path_date` is the date segment of the path ("2024-01-31",
    "2024-01-01..2024-01-31", "2024-01-01..") when there is one: v1 validates it after the
    amount and before the currency pair, so passing it here reproduces which of several
    errors wins. The caller still calls `parse_day`/`parse_range` for the value.
    """
    amount = _amount(_last(args, "amount"))
    if path_date is not None:
        if ".." in path_date:
            parse_range(path_date)
        else:
            parse_day(path_date)
    base = _first_given(args, "from", "base")
    symbols_text = _first_given(args, "to", "symbols")
    query = Query(
        amount=1.0 if amount is None else amount,
        base=None if base is None else base.upper(),
        symbols=None if symbols_text is None else _ruby_split(symbols_text.upper()),
    )
    # Query.build compares [base] with symbols; an absent base is nil there, so `?to=EUR`
    # alone is no bad pair (it is a 404: EUR is never a quote of the pivot).
    if query.base is not None and query.symbols == (query.base,):
        raise FrankfurterError(422, BAD_CURRENCY_PAIR)
    return query


def _last(args: QueryArgs, name: str) -> str | None:
    # Sanic's RequestParameters is a dict of lists whose `get` returns the *first* value (a
    # str): read the lists themselves, or "from=USD" would be read as "D".
    values = dict.get(args, name) if isinstance(args, dict) else args.get(name)
    return values[-1] if values else None


def _first_given(args: QueryArgs, *names: str) -> str | None:
    # `values_at(:from, :base).compact.first`: only a missing parameter falls through; an
    # empty one ("from=") is a value.
    for name in names:
        value = _last(args, name)
        if value is not None:
            return value
    return None


def _ruby_split(text: str) -> tuple[str, ...]:
    """Ruby's `text.split(",")`: no trimming, trailing empty fields removed."""
    parts = text.split(",")
    while parts and parts[-1] == "":
        parts.pop()
    return tuple(parts)


# Ruby's String#to_f: optional leading whitespace, sign, digits with single underscores
# between them, an optional fraction and exponent; the longest such prefix counts.
_RUBY_FLOAT_RE = re.compile(
    r"[ \t\n\v\f\r]*"
    r"(?P<mantissa>[+-]?(?:\d+(?:_\d+)*(?:\.\d+(?:_\d+)*)?|\.\d+(?:_\d+)*))"
    r"(?P<exponent>[eE][+-]?\d+(?:_\d+)*)?"
)


def ruby_to_f(text: str) -> float:
    """Ruby's `String#to_f`: the numeric prefix of `text`, 0.0 when there is none.

    Hexadecimal ("0x1A") and words ("Infinity", "NaN") are 0.0, as in Ruby; an exponent
    beyond the double range gives infinity (Ruby warns and does the same).
    """
    match = _RUBY_FLOAT_RE.match(text)
    if match is None:
        return 0.0
    literal = match.group("mantissa") + (match.group("exponent") or "")
    return float(literal.replace("_", ""))


def _amount(text: str | None) -> float | None:
    if text is None:
        return None
    value = ruby_to_f(text)
    if not value > 0:  # Float#positive?
        raise FrankfurterError(422, INVALID_AMOUNT)
    return value


# v1's routes only match \d{4}-\d{2}-\d{2}; anything else never reaches Date.parse.
_DAY_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def parse_day(text: str) -> date:
    """A path date `YYYY-MM-DD`; 422 "invalid date" for 2024-02-30, 2010-31-01 or any
    other text. Year 0000 is a valid proleptic date in Ruby but not in Python: it becomes
    `date.min`, which holds no data either way."""
    match = _DAY_RE.fullmatch(text)
    if match is None:
        raise FrankfurterError(422, INVALID_DATE)
    year, month, day = (int(part) for part in match.groups())
    if year == 0:
        _check_ruby_year_zero(month, day)
        return date.min
    try:
        return date(year, month, day)
    except ValueError:
        raise FrankfurterError(422, INVALID_DATE) from None


def _check_ruby_year_zero(month: int, day: int) -> None:
    # Year 0 is a leap year in the proleptic Gregorian calendar (like 2000).
    try:
        date(2000, month, day)
    except ValueError:
        raise FrankfurterError(422, INVALID_DATE) from None


def parse_range(text: str) -> tuple[date, date | None]:
    """A path range `START..END` or `START..` (end None: the caller passes today)."""
    start_text, separator, end_text = text.partition("..")
    if not separator:
        raise FrankfurterError(422, INVALID_DATE)
    start = parse_day(start_text)
    return start, (parse_day(end_text) if end_text else None)


# --------------------------------------------------------------------------- rounding


def round_rate(value: float) -> Number:
    """v1's `Roundable#round`: magnitude bands, an Integer above 5000.

    The bands format with `%.Nf` exactly as Ruby's `format` does (both round the exact
    binary value correctly); above 5000 Ruby's `Float#round` rounds half away from zero,
    which Python's `round()` (half even) does not.
    """
    if value > 5000:
        return _round_half_away(value)
    if value > 80:
        return float(f"{value:.2f}")
    if value > 20:
        return float(f"{value:.3f}")
    if value > 1:
        return float(f"{value:.4f}")
    if value > 0.0001:
        return float(f"{value:.5f}")
    return float(f"{value:.6f}")


def _round_half_away(value: float) -> int:
    if math.isinf(value):
        # Ruby: Infinity.round raises FloatDomainError("Infinity"); v1's error handler
        # turns any exception into 422 with its message (e.g. amount=1e400).
        raise FrankfurterError(422, "Infinity")
    floor = math.floor(value)
    # value - floor is exact for doubles of this size, so the tie test is exact too.
    return floor + 1 if value - floor >= 0.5 else floor


# --------------------------------------------------------------------------- quoting


def _quote_day(
    rates: Mapping[str, float], query: Query, pivot: str
) -> dict[str, Number] | None:
    """One day's rates as v1's `prepare_rates` + `rebase_rates` make them, sorted by code;
    None when v1 drops the day (its base is missing, or nothing is left beside it)."""
    base = query.base_or(pivot)
    amount = query.amount
    should_round = amount != 1.0 or base != pivot
    prepared: dict[str, Number] = {}
    for code, rate in rates.items():
        value = amount * rate
        prepared[code] = round_rate(value) if should_round else value
    if base == pivot:
        return {code: prepared[code] for code in sorted(prepared)}
    if query.symbols is None or pivot in query.symbols:
        prepared[pivot] = amount
    divisor = prepared.pop(base, None)
    if divisor is None or not prepared:
        return None
    return {code: round_rate(amount * prepared[code] / divisor) for code in sorted(prepared)}


def _wanted(query: Query, pivot: str) -> frozenset[str] | None:
    # v1's `only(*(symbols + [base]))`: with symbols, only their rows and the base's.
    if query.symbols is None:
        return None
    return frozenset((*query.symbols, query.base_or(pivot)))


def _day_rates(
    day_rates: Mapping[str, Decimal], pivot: str, wanted: frozenset[str] | None
) -> dict[str, float]:
    """A day's rows as v1 scans them (by code) and stores them (Ruby Float, i.e. the
    nearest double to the published decimal)."""
    return {
        code: float(day_rates[code])
        for code in sorted(day_rates)
        if code != pivot and (wanted is None or code in wanted)
    }


def _carry_forward_groups(
    history: History, pivot: str, wanted: frozenset[str] | None, day: date
) -> dict[date, dict[str, float]]:
    """`CarryForward.latest` over the rows of `[day - 14, day]`, grouped by row day the way
    v1's `prepare_rates` fills `result`: groups in order of first appearance.

    v1 scans the rows unordered from SQLite; its unique index (provider, date, base, quote)
    yields them by day, then code, which is the order assumed here. Each currency keeps its
    position of first appearance (a Hash keeps insertion order when a key is overwritten)
    and the value of its newest day.
    """
    cutoff = _minus_days(day, LOOKBACK_DAYS)
    newest: dict[str, date] = {}
    for row_day in sorted(d for d in history if cutoff <= d <= day):
        for code in _day_rates(history[row_day], pivot, wanted):
            newest[code] = row_day
    groups: dict[date, dict[str, float]] = {}
    for code, row_day in newest.items():
        groups.setdefault(row_day, {})[code] = float(history[row_day][code])
    return groups


def _minus_days(day: date, days: int) -> date:
    return day - timedelta(days=days) if day - date.min >= timedelta(days=days) else date.min


def on_day(history: History, pivot: str, query: Query, day: date) -> Body:
    """v1 `/{date}`: `{"amount","base","date","rates"}`, or 404 "not found".

    Each currency's newest row within `[day - 14, day]` is taken, so a weekend or holiday
    answers the previous business day, tomorrow answers the newest day, and more than 14
    days past the data is 404. When currencies snap to *different* days, v1 keeps only the
    first group of its result (`result.keys.first` / `result.values.first`): the day of the
    first currency in scan order (oldest day in the window, then code) that survives the
    rebase. For a feed like ECB whose currencies all publish on the same days this is the
    newest day; a currency whose last row is older (a discontinued one) is then left out,
    not carried forward. Rates within the group are sorted by code.
    """
    for group_day, rates in _carry_forward_groups(
        history, pivot, _wanted(query, pivot), day
    ).items():
        quoted = _quote_day(rates, query, pivot)
        if quoted is not None:
            return {
                "amount": query.amount,
                "base": query.base_or(pivot),
                "date": group_day.isoformat(),
                "rates": quoted,
            }
    raise _not_found()


def latest(history: History, pivot: str, query: Query, today: date) -> Body:
    """`/latest` and `/current`, as xrates' contract defines them: `on_day` at the source's
    newest day on or before `today`, however old (v1 itself looks back only 14 days from
    `Date.today`). Days after `today` are ignored, as v1's window ends at today. 404 when
    the source has no such day."""
    days = [d for d in history if d <= today]
    if not days:
        raise _not_found()
    return on_day(history, pivot, query, max(days))


def series(
    history: History, pivot: str, query: Query, start: date, end: date | None, today: date
) -> Body:
    """v1 time series `/{start}..{end}` and `/{start}..`:
    `{"amount","base","start_date","end_date","rates":{"YYYY-MM-DD":{...}}}`.

    `end` None means today. The start snaps back to the newest day with data on or before
    it, whatever the symbols (v1's `between` looks at the whole source); only days with
    data become keys; a day whose base is missing is dropped; `start_date`/`end_date` are
    the first and last keys. A start after `today` is 404, as is an empty result. A range
    whose end precedes its start is not an error in v1: it holds whatever lies between the
    snapped start and the end (usually nothing, so 404).
    """
    if start > today:
        raise _not_found()
    last = today if end is None else end
    earlier = [d for d in history if d <= start]
    first = max(earlier) if earlier else start
    wanted = _wanted(query, pivot)
    rates: dict[str, dict[str, Number]] = {}
    for day in sorted(d for d in history if first <= d <= last):
        day_rates = _day_rates(history[day], pivot, wanted)
        quoted = _quote_day(day_rates, query, pivot) if day_rates else None
        if quoted is not None:
            rates[day.isoformat()] = quoted
    if not rates:
        raise _not_found()
    keys = list(rates)
    return {
        "amount": query.amount,
        "base": query.base_or(pivot),
        "start_date": keys[0],
        "end_date": keys[-1],
        "rates": rates,
    }


# --------------------------------------------------------------------------- currencies

# Frankfurter's names (Ruby `money` gem, config/currency_iso.json) for every currency ECB has
# quoted since 1999, kept to document where the ISO 4217 names xrates serves differ, and as
# the fallback for codes the current ISO list no longer has (BGN, HRK, ...). Not an override:
# clients key on the codes, which are identical.
FRANKFURTER_NAMES: Final[Mapping[str, str]] = {
    "AUD": "Australian Dollar", "BGN": "Bulgarian Lev", "BRL": "Brazilian Real",
    "CAD": "Canadian Dollar", "CHF": "Swiss Franc", "CNY": "Chinese Renminbi Yuan",
    "CZK": "Czech Koruna", "DKK": "Danish Krone", "EUR": "Euro", "GBP": "British Pound",
    "HKD": "Hong Kong Dollar", "HRK": "Croatian Kuna", "HUF": "Hungarian Forint",
    "IDR": "Indonesian Rupiah", "ILS": "Israeli New Sheqel", "INR": "Indian Rupee",
    "ISK": "Icelandic Króna", "JPY": "Japanese Yen", "KRW": "South Korean Won",
    "LTL": "Lithuanian Litas", "LVL": "Latvian Lats", "MXN": "Mexican Peso",
    "MYR": "Malaysian Ringgit", "NOK": "Norwegian Krone", "NZD": "New Zealand Dollar",
    "PHP": "Philippine Peso", "PLN": "Polish Złoty", "RON": "Romanian Leu",
    "RUB": "Russian Ruble", "SEK": "Swedish Krona", "SGD": "Singapore Dollar",
    "SKK": "Slovak Koruna", "THB": "Thai Baht", "TRY": "Turkish Lira",
    "USD": "United States Dollar", "ZAR": "South African Rand",
}  # fmt: skip


def iso_name(code: str) -> str | None:
    """The ISO 4217 name of `code` from the `iso4217` package (the maintenance agency's
    current list), or None when the list does not have it (withdrawn codes)."""
    entry = iso4217.raw_table.get(code)
    return None if entry is None else str(entry["CcyNm"])


def currency_name(code: str) -> str:
    """The name `/currencies` shows: the ISO 4217 name; for a code the current ISO list no
    longer has, Frankfurter's name; else the code itself (as Frankfurter's `Currency#to_h`)."""
    return iso_name(code) or FRANKFURTER_NAMES.get(code) or code


def currency_names(codes: Iterable[str]) -> dict[str, str]:
    """v1 `/currencies` body: `{code: name}` sorted by code. The caller passes the codes
    the source quotes plus its pivot (v1: the ECB codes of the last 14 days plus EUR;
    `{}` when there are none)."""
    return {code: currency_name(code) for code in sorted(set(codes))}


def name_differences() -> dict[str, tuple[str, str]]:
    """`{code: (xrates' name, Frankfurter's name)}` for the ECB currencies whose names
    differ, for the README."""
    return {
        code: (currency_name(code), theirs)
        for code, theirs in sorted(FRANKFURTER_NAMES.items())
        if currency_name(code) != theirs
    }


# --------------------------------------------------------------------------- encoding


def encode(body: Mapping[str, object]) -> bytes:
    """Compact JSON as v1 writes it (`Oj.dump(o, mode: :compat)`): no spaces, UTF-8, ints as
    ints, floats the way Oj's compat mode prints a Ruby Float (see `ruby_float`)."""
    return _encode_value(body).encode()


def _encode_value(value: object) -> str:
    if isinstance(value, Mapping):
        items = (f"{_encode_value(str(key))}:{_encode_value(item)}" for key, item in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ruby_float(value)
    if isinstance(value, Sequence):
        return "[" + ",".join(_encode_value(item) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


_LONG_LONG: Final = 2.0**63


def ruby_float(value: float) -> str:
    """A float as Oj compat mode prints it: integral values within a C long long as
    `%.1f` ("10.0", "100000000000000000.0"), others as Ruby's `Float#to_s`, which is the
    shortest round-trip digits like Python's `repr` but writes "1.0e-05" for `1e-05`."""
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not JSON")  # round_rate already refused it
    if value == int(value) and -_LONG_LONG <= value < _LONG_LONG:
        return f"{value:.1f}"
    text = repr(value)
    mantissa, marker, exponent = text.partition("e")
    if marker and "." not in mantissa:
        return f"{mantissa}.0e{exponent}"
    return text


# --------------------------------------------------------------------------- from storage

# One rounding for inverted rows: 1/r to 15 significant digits (xrates' rate precision, as
# /v1/convert rounds), half even; then the float conversion v1's own values go through.
_INVERT = Context(prec=15, rounding=ROUND_HALF_EVEN)


def history_from_rows(
    rows: Iterable[tuple[date, str, str, Decimal]], pivot: str, pivot_per_foreign: bool
) -> dict[date, dict[str, Decimal]]:
    """One source's stored rows `(day, base, quote, rate)` as a `History` of
    "1 pivot = r code".

    A `foreign_per_pivot` source stores Quote(pivot, X) and is taken as it is; a
    `pivot_per_foreign` source stores Quote(X, pivot) (1 X costs r pivot), inverted here once
    (`1 / r` rounded to 15 significant digits). Rows in the other direction (a source that
    publishes both) are used when the day has no row in the source's own direction; rows
    that do not touch the pivot are ignored.
    """
    own: dict[date, dict[str, Decimal]] = {}
    other: dict[date, dict[str, Decimal]] = {}
    for day, base, quote, rate in rows:
        if base == pivot and quote != pivot:
            target, code, value = (other if pivot_per_foreign else own), quote, rate
        elif quote == pivot and base != pivot:
            target, code = (own if pivot_per_foreign else other), base
            value = _INVERT.divide(Decimal(1), rate)
        else:
            continue
        target.setdefault(day, {})[code] = value
    for day, rates in other.items():
        merged = own.setdefault(day, {})
        for code, value in rates.items():
            merged.setdefault(code, value)
    return own
