"""The OpenAPI document: every route's parameters, bodies and responses. No handlers.

`sanic_app.py` decorates each route with `doc(name)`; `/openapi.json` serves `finish(...)` of
what sanic-ext builds from these definitions, and `/docs` is a Swagger UI page reading it.

What JSON Schema can say, the schemas say (codes, real calendar days, decimal syntax, ranges,
enums). What it cannot — a pair's two codes differ, a rate's 15 significant digits, `as_of`
not in the future, `source` only with `date`, Ruby's `to_f` for Frankfurter's `amount` —
each operation's description states; the schema fuzzer's hooks (tests/fuzz_hooks.py) keep
its "valid" examples inside those rules, so anything else it finds is a real mismatch.
"""

from __future__ import annotations

from typing import Any

from sanic_ext import openapi
from sanic_ext.extensions.openapi.types import Schema as OpenAPISchema

import convert
import sources
import util

JSON_TYPE = "application/json"
FK_TYPE = "application/json; charset=utf-8"  # Frankfurter v1's media type, byte for byte
HTML_TYPE = "text/html; charset=utf-8"
RUN_STATUSES = ("queued", "running", "succeeded", "failed")
MAX_DECIMAL_CHARS = 64


# ----------------------------------------------------------------------------- patterns
def day_pattern(*, year_zero: bool) -> str:
    """A regular expression for the days that exist, YYYY-MM-DD (proleptic Gregorian).

    `year_zero`: Ruby's Date accepts year 0000 (a leap year, as Frankfurter's v1 does);
    Python's date starts at 0001, as xrates' own `?date=`/`start`/`end` do."""
    year = "[0-9]{4}" if year_zero else "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
    month_day = ("(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
                 "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
                 "|02-(?:0[1-9]|1[0-9]|2[0-8]))")
    leap = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00"
    leap += "|0000)" if year_zero else ")"
    return f"(?:{year}-{month_day}|{leap}-02-29)"


def _exact(pattern: str) -> str:
    return f"^{pattern}$"


def _any_case(name: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in name)


CODE = {"type": "string", "pattern": "^[A-Za-z]{3}$"}
DAY = {"type": "string", "pattern": _exact(day_pattern(year_zero=False)),
       "description": "a day that exists, YYYY-MM-DD"}
SOURCE_NAME = {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$"}
# A plain decimal (no sign, no exponent); at least 1e-12, below 1e12, at most 15
# significant digits (the contract's rate rules: the range and digits JSON Schema can't say
# of a string are in the operation's description).
DECIMAL_TEXT = {"type": "string", "pattern": r"^(?:[0-9]+\.?[0-9]*|\.[0-9]+)$",
                "maxLength": MAX_DECIMAL_CHARS}
DECIMAL_IN = {"oneOf": [{"type": "number", "minimum": float(sources.MIN_RATE),
                         "maximum": float(sources.MAX_RATE), "exclusiveMaximum": True},
                        DECIMAL_TEXT]}
MIN_VERSION = {"type": "integer", "minimum": 1, "maximum": 10**18 - 1}
_FK_DAY = day_pattern(year_zero=True)
FK_WHEN = {"type": "string", "pattern": _exact(f"{_FK_DAY}(?:\\.\\.(?:{_FK_DAY})?)?")}
# Ruby's String#to_f > 0: after optional white space and "+", digits (with "_" and ".")
# reaching a non-zero digit. Whether the whole prefix parses to a finite positive double
# (not "_5", "1e400" or "0.0e-400") is Ruby's rule, stated in the description.
FK_AMOUNT = {"type": "string", "pattern": r"^[ \t\n\v\f\r]*\+?[0-9_.]*[1-9]"}
RATE_RULES = ("`rate`: a JSON number or a plain decimal string, at least 1e-12 and below "
              "1e12, at most 15 significant digits. `as_of`: ISO 8601, after 1900 and not "
              "more than a day in the future (default: now).")


# ----------------------------------------------------------------------------- schemas
RATE = {
    "type": "object",
    "required": ["base", "quote", "rate", "source", "as_of", "updated_at", "version"],
    "properties": {
        "base": {"type": "string", "example": "USD"},
        "quote": {"type": "string", "example": "EUR"},
        "rate": {"type": "number", "example": 0.9213},
        "source": {"type": "string", "example": "ecb"},
        "as_of": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "version": {"type": "integer"},
    },
}
_WRITE_FIELDS = {
    "rate": DECIMAL_IN,
    "source": {**SOURCE_NAME, "default": "manual"},
    "as_of": {"type": "string", "format": "date-time"},
}
RATE_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["base", "quote", "rate"],
    "properties": {"base": CODE, "quote": CODE, **_WRITE_FIELDS},
}
RATE_PUT = {
    "type": "object", "additionalProperties": False, "required": ["rate"],
    "properties": {**_WRITE_FIELDS,
                   "base": {**CODE, "description": "if given, the path's base"},
                   "quote": {**CODE, "description": "if given, the path's quote"}},
}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
RUN = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"type": "string", "enum": list(RUN_STATUSES)},
        "trigger": {"type": "string", "enum": ["schedule", "manual", "backfill"]},
        "progress": {"type": "object", "properties": {"done": {"type": "integer"},
                                                      "total": {"type": "integer"}}},
        "sources": {"type": "object"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "format": "date-time", "nullable": True},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
        "error": {"type": "string", "nullable": True},
    },
}
_VIA = {"type": "array", "maxItems": convert.MAX_INTERMEDIATES, "items": {"type": "string"}}
HISTORY_RATE = {
    "type": "object",
    "required": ["base", "quote", "rate", "source", "date", "via"],
    "properties": {
        "base": {"type": "string"}, "quote": {"type": "string"}, "rate": {"type": "number"},
        "source": {"type": "string"}, "date": {"type": "string", "format": "date"},
        "via": _VIA,
    },
}
_CONVERT_FIELDS: dict[str, Any] = {
    "from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "number"},
    "rate": {"type": "number"}, "result": {"type": "number"}, "via": _VIA}
_CONVERT_REQUIRED = ["from", "to", "amount", "rate", "result", "via"]
CONVERT = {"type": "object", "required": _CONVERT_REQUIRED, "additionalProperties": False,
           "properties": _CONVERT_FIELDS}
CONVERT_ON_DAY = {"type": "object", "required": [*_CONVERT_REQUIRED, "date"], "properties": {
    **_CONVERT_FIELDS, "date": {"type": "string", "format": "date"}}}
_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}
SOURCE = {
    "type": "object",
    "required": ["name", "title", "country", "url", "pivot", "base_direction", "cadence",
                 "currencies", "last_success", "last_error", "next_run"],
    "properties": {
        "name": {"type": "string", "example": "ecb"},
        "title": {"type": "string"},
        "country": {"type": "string", "nullable": True, "example": "EU"},
        "url": {"type": "string", "nullable": True,
                "description": "the public URL (never an XRATES_<SOURCE>_URL override)"},
        "pivot": {"type": "string", "example": "EUR"},
        "base_direction": {"type": "string", "enum": [sources.FOREIGN_PER_PIVOT,
                                                      sources.PIVOT_PER_FOREIGN]},
        "cadence": {"type": "string"},
        "currencies": {"type": "array", "items": {"type": "string"},
                       "description": "sorted codes of its newest successful run"},
        "last_success": _NULLABLE_TIME,
        "last_error": {"type": "object", "nullable": True, "properties": {
            "message": {"type": "string"}, "at": {"type": "string", "format": "date-time"}}},
        "next_run": _NULLABLE_TIME,
    },
}
UPDATES_CREATE = {"type": "object", "additionalProperties": False, "properties": {
    "sources": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
        "type": "string", "description": "a source name, any case",
        "pattern": "^(?:" + "|".join(_any_case(n) for n in util.KNOWN_SOURCES) + ")$"}}}}
FK_MESSAGE = {"type": "object", "required": ["message"],
              "properties": {"message": {"type": "string"}}}
FK_RATES = {"type": "object", "required": ["amount", "base", "date", "rates"], "properties": {
    "amount": {"type": "number"}, "base": {"type": "string"},
    "date": {"type": "string", "format": "date"},
    "rates": {"type": "object", "additionalProperties": {"type": "number"}}}}
FK_SERIES = {"type": "object", "required": ["amount", "base", "start_date", "end_date", "rates"],
             "properties": {
    "amount": {"type": "number"}, "base": {"type": "string"},
    "start_date": {"type": "string", "format": "date"},
    "end_date": {"type": "string", "format": "date"},
    "rates": {"type": "object", "additionalProperties": {
        "type": "object", "additionalProperties": {"type": "number"}}}}}


# ----------------------------------------------------------------------------- building blocks
class _RawSchema(OpenAPISchema):
    """A JSON schema written out as given. sanic-ext reads a plain dict as a *type* (an
    object whose properties default to the dict's values), which documented
    {"type": "string", "pattern": ...} as an object with properties "type" and "pattern"."""

    def __init__(self, schema: dict[str, Any]) -> None:
        super().__init__()
        self.raw = schema

    def serialize(self) -> dict[str, Any]:
        return self.raw


def parameter(name: str, schema: dict[str, Any], where: str, *, required: bool = False,
              description: str | None = None) -> Any:
    """An OpenAPI parameter in `where` (path, query, header) with its JSON schema as is."""
    return openapi.definitions.Parameter(name, _RawSchema(schema), location=where,
                                         description=description,
                                         required=required or where == "path")


def _json(schema: dict[str, Any], media_type: str = JSON_TYPE) -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def body(schema: dict[str, Any]) -> Any:
    """A required JSON request body."""
    return openapi.definitions.RequestBody(_json(schema), required=True)


Answer = tuple[int, str, dict[str, Any] | None]


def responses(*answers: Answer, media_type: str = JSON_TYPE) -> list[Any]:
    """Responses (status, description, schema); 204/304 carry no body (see `finish`), a
    None schema is xrates' {"error"} body."""
    return [openapi.definitions.Response(_json(schema or ERROR, media_type), status=status,
                                         description=description)
            for status, description, schema in answers]


def _typed(media_type: str, description: str) -> list[Any]:
    return [openapi.definitions.Response({media_type: {"schema": {"type": "string"}}},
                                         status=200, description=description)]


ERRORS_READ: tuple[Answer, ...] = ((422, "invalid code or parameter", None),
                                   (503, "database unavailable", None))
ERRORS_WRITE: tuple[Answer, ...] = (
    (400, "malformed JSON", None), (401, "missing or wrong token", None),
    (403, "not loopback and no token configured", None), (413, "body over 64 KiB", None),
    (415, "not application/json", None), (422, "invalid field", None),
    (503, "database unavailable", None),
)
NOT_MODIFIED: Answer = (304, "not modified (If-None-Match)", None)
_PAIR = [parameter("base", CODE, "path"), parameter("quote", CODE, "path")]
_PAIR_RULE = "`base` and `quote` must differ (422 otherwise)."
_MIN_VERSION = [
    parameter("min_version", MIN_VERSION, "query"),
    parameter("X-Xrates-Min-Version", MIN_VERSION, "header",
              description="as ?min_version=; when both are given they must be equal"),
]
_DAY_AND_SOURCE = [parameter("date", DAY, "query"), parameter("source", SOURCE_NAME, "query")]
FK_PARAMS = [parameter(name, {"type": "string"}, "query") for name in ("from", "base", "to",
                                                                        "symbols")]
FK_PARAMS.append(parameter("amount", FK_AMOUNT, "query",
                           description="read like Ruby's String#to_f; must be > 0 and finite"))
FK_LENIENCY = ("Parameters are as lenient as v1's (`from` beats `base`, `to` beats `symbols`, "
               "`amount` read like Ruby's to_f and > 0 and finite); `symbols` equal to the "
               "base alone is 422 bad currency pair.")


def fk_responses(schema: dict[str, Any], *errors: tuple[int, str],
                 path_parameter: bool = False) -> list[Any]:
    """v1 bodies and {"message"} errors are `application/json; charset=utf-8`; a 503 is
    xrates' own {"error"}. With a `path_parameter`, a path that is no day matches no route:
    its 404 is xrates' {"error"} (`application/json`; one entry, as clients match the two
    media types as one)."""
    def error(status: int) -> dict[str, Any]:
        if status == 404 and path_parameter:
            return {"anyOf": [FK_MESSAGE, ERROR]}
        return FK_MESSAGE
    return [*responses((200, "v1 body", schema), media_type=FK_TYPE),
            *responses(NOT_MODIFIED),
            *responses(*((status, what, error(status)) for status, what in errors),
                       media_type=FK_TYPE),
            *responses((503, "database unavailable", None))]


# ----------------------------------------------------------------------------- operations
_RATE_GET = (
    "With `date=YYYY-MM-DD` (and optionally `source`): the newest day within "
    "[date - 14 days, date] on which some source (or `source`) quotes the pair directly or "
    "inversely, answered as {base, quote, rate, source, date, via}; only if none does, a "
    "path of at most two intermediate currencies whose legs all fall on one day (the newest "
    "such day in the window), ranked as /v1/convert ranks paths, `via` naming the "
    "intermediates and `source` the source of the path's lowest-priority leg; a date before "
    "today is `public, max-age=86400`, else `no-cache`. `source` without `date` is 422. "
    "With `X-Xrates-Min-Version: V` (or `?min_version=V`, V from a write's "
    "`X-Xrates-Version`) the answer is at least as new as that write, on any instance. "
    + _PAIR_RULE)
_CONVERT = (
    "Answered from the instance's memory while its cache holds the whole table. "
    "`no-cache` with an ETag that changes whenever a rate on the path does (or the answer). "
    "Paths rank by fewer hops, then the priority of their lowest-priority leg (manual, then "
    "XRATES_SOURCES order), then fewer inverted legs (a direct leg first), then "
    "intermediates EUR, USD, then A-Z; `via` lists them in order. Exact arithmetic, rounded "
    "once to 15 significant digits (half-even). `from` and `to` must differ; `amount` "
    "(default 1) follows the rate rules (at least 1e-12, below 1e12, at most 15 significant "
    "digits). With `date=YYYY-MM-DD` (and optionally `source`, which needs `date`) the "
    "conversion reads history by the `?date=` rule of `/v1/rates/{base}/{quote}`: the "
    "newest day of [date - 14 days, date] on which some source (or `source`) quotes the pair "
    "directly or inversely, its highest-priority such source; only if none does, the best "
    "path (ranked as above) whose legs all fall on one day, the newest such day of the "
    "window. The answer adds `date`, the day used; a date before today is "
    "`Cache-Control: public, max-age=86400`, else `no-cache`, both with an ETag. A date "
    "that is not YYYY-MM-DD or does not exist is 422.")
_HISTORY = (
    "For each day in [start, end] with a value: the highest-priority source quoting the pair "
    "directly or inversely that day (or only `source`); a day without one, the best path "
    "through at most two intermediate currencies over that day's rows alone (ranked as "
    "/v1/convert ranks paths; `via` names them, `source` is the source of the path's "
    "lowest-priority leg). `end` defaults to today (UTC). `start` after `end`, or "
    "`end - start` over 3652 days, is 422; a day that does not exist (2024-02-30) is 422. "
    "`start_date`/`end_date` are the first and last days returned. A range ending before "
    "today is `Cache-Control: public, max-age=86400` (a later correction reaches shared "
    "caches within a day); one covering today is `no-cache`. Both carry an ETag that "
    "changes with the content. " + _PAIR_RULE)
_STREAM = (
    "An endless `text/event-stream` response: first `event: snapshot` (data: the "
    "`GET /v1/rates` body for the selection), then `event: rate` (data: a rate object) or "
    "`event: delete` (data: `{base, quote, version}`) for every change this instance "
    "applies, with `id:` = the version, and a `: ping` comment at least every 15 s. "
    "`event: resync` (data `{reason}`: `slow`, `listener`, `flush`) ends the stream: "
    "reconnect for a new snapshot (a `Last-Event-ID` reconnect gets one too). `pairs` (up "
    "to 500 `BASE/QUOTE`, comma-separated) or `base`, not both. Generic fuzzers and "
    "crawlers must skip this route: it never ends by itself.")
_FK_WHEN = (
    "A day: each currency's newest value within 14 days before it. A series: only days with "
    "data, the start snapped back to the newest day with data on or before it, the end today "
    "when omitted; a start after today is 404. A response about days before today is "
    "`public, max-age=86400`, one covering today `no-cache` (a later correction reaches "
    "shared caches within a day); both with an ETag. 422 invalid date. " + FK_LENIENCY)
_SOURCES = (
    "`currencies` and `last_success` come from the newest finished update run in which the "
    "source had no error, `last_error` from the newest one in which it failed; `next_run` is "
    "when the leading updater's next scheduled run is due (null while no updater leads).")
_STREAM_PAIRS = {"type": "string", "pattern": "^[A-Za-z]{3}/[A-Za-z]{3}(?:,[A-Za-z]{3}/[A-Za-z]{3})*$"}

DEFINITIONS: dict[str, dict[str, Any]] = {
    "rate_get": dict(
        summary="One rate (served from the instance's cache), or with ?date= a day of history",
        description=_RATE_GET,
        parameter=[*_PAIR, *_MIN_VERSION, *_DAY_AND_SOURCE],
        response=responses((200, "the rate", {"oneOf": [RATE, HISTORY_RATE]}), NOT_MODIFIED,
                           (404, "no such rate", None), *ERRORS_READ)),
    "rates_list": dict(
        summary="All rates, optionally filtered (from memory while the cache is complete)",
        description="The current state, ordered by base, quote: answered from the instance's "
                    "memory while its cache holds the whole table, else from the database. "
                    "`no-cache` with an ETag that changes whenever a listed rate does.",
        parameter=[parameter("base", CODE, "query"), parameter("quote", CODE, "query")],
        response=responses((200, "rates ordered by base, quote", {
            "type": "object", "properties": {"rates": {"type": "array", "items": RATE},
                                             "count": {"type": "integer"}}}), NOT_MODIFIED,
                           *ERRORS_READ)),
    "rate_create": dict(
        summary="Create a rate (409 if the pair exists)",
        description=f"`base` and `quote` must differ. {RATE_RULES}",
        body=body(RATE_CREATE),
        response=responses((201, "created", RATE), (409, "the pair exists", None),
                           *ERRORS_WRITE)),
    "rate_put": dict(
        summary="Create or replace a rate",
        description=f"{_PAIR_RULE} {RATE_RULES}",
        parameter=_PAIR, body=body(RATE_PUT),
        response=responses((200, "updated", RATE), (201, "created", RATE), *ERRORS_WRITE)),
    "rate_delete": dict(
        summary="Delete a rate", description=_PAIR_RULE, parameter=_PAIR,
        response=responses((204, "deleted", None), (404, "no such rate", None),
                           *ERRORS_WRITE)),
    "convert": dict(
        summary="Convert an amount: direct, inverse, or through up to two intermediate "
                "currencies",
        description=_CONVERT,
        parameter=[parameter("from", CODE, "query", required=True),
                   parameter("to", CODE, "query", required=True),
                   parameter("amount", DECIMAL_TEXT, "query"), *_DAY_AND_SOURCE],
        response=responses((200, "the conversion (with `date` when ?date= was given)",
                            {"oneOf": [CONVERT, CONVERT_ON_DAY]}),
                           (304, "not modified (If-None-Match)", None),
                           (404, "no path between the currencies", None), *ERRORS_READ)),
    "rate_history": dict(
        summary="A pair's daily history (oldest first)",
        description=_HISTORY,
        parameter=[*_PAIR, parameter("start", DAY, "query", required=True),
                   parameter("end", DAY, "query"), parameter("source", SOURCE_NAME, "query")],
        response=responses((200, "the history", {
            "type": "object", "properties": {
                "base": {"type": "string"}, "quote": {"type": "string"},
                "start_date": {"type": "string", "format": "date"},
                "end_date": {"type": "string", "format": "date"},
                "rates": {"type": "array", "items": {"type": "object", "properties": {
                    "date": {"type": "string", "format": "date"}, "rate": {"type": "number"},
                    "source": {"type": "string"}, "via": _VIA}}}}}),
            NOT_MODIFIED, (404, "no day with data in the range", None), *ERRORS_READ)),
    "sources_list": dict(
        summary="The configured sources (XRATES_SOURCES order): metadata and latest outcomes",
        description=_SOURCES,
        response=responses((200, "the sources", {
            "type": "object", "properties": {"sources": {"type": "array", "items": SOURCE}}}),
            (503, "database unavailable", None))),
    "updates_create": dict(
        summary="Ask the updater to run now (all configured sources, or the ones named)",
        body=openapi.definitions.RequestBody(_json(UPDATES_CREATE), required=False),
        response=responses((202, "queued", {"type": "object", "properties": {
            "id": {"type": "integer"}, "status": {"type": "string"}}}), *ERRORS_WRITE)),
    "updates_list": dict(
        summary="Update runs, newest first",
        parameter=[parameter("limit", {"type": "integer", "minimum": 1, "maximum": 100},
                             "query"),
                   parameter("status", {"type": "string", "enum": list(RUN_STATUSES)},
                             "query")],
        response=responses((200, "runs", {"type": "object", "properties": {
            "updates": {"type": "array", "items": RUN}}}), *ERRORS_READ)),
    "updates_get": dict(
        summary="One update run with its progress",
        parameter=[parameter("run_id", {"type": "string", "pattern": "^[0-9]{1,18}$"}, "path")],
        response=responses((200, "the run", RUN), (404, "no such run", None), *ERRORS_READ)),
    "ping": dict(summary="A constant answer sent exactly as a cache hit is (the benchmark's "
                         "ceiling)",
                 response=responses((200, "pong", {"type": "object", "required": ["pong"],
                                                   "properties": {"pong": {"type": "boolean"}}}))),
    "health": dict(summary="Liveness (constant, no I/O)",
                   response=responses((200, "alive", {"type": "object"}))),
    "ready": dict(
        summary="Readiness: the database answers, the listener is connected and the cache's "
                "warm refill after the last flush is done",
        response=responses((200, "ready", {"type": "object"}), (503, "not ready", None))),
    "metrics": dict(summary="Prometheus metrics, aggregated over this instance's workers",
                    response=_typed("text/plain", "Prometheus text format")),
    "stream": dict(
        summary="Live changes as Server-Sent Events (endless: keep it out of generic fuzzers)",
        description=_STREAM,
        parameter=[parameter("pairs", _STREAM_PAIRS, "query"), parameter("base", CODE, "query")],
        response=[*_typed("text/event-stream", "the event stream"),
                  *responses((422, "invalid selection", None),
                             (503, "listener down, too many streams, or database unavailable",
                              None))]),
    "dashboard": dict(summary="The dashboard page (HTML): live rates, a chart, update runs, "
                              "this instance's state",
                      response=_typed("text/html", "the page")),
    "openapi_json": dict(summary="This document (OpenAPI 3.0)",
                         response=responses((200, "the document", {"type": "object"}))),
    "openapi_json_v1": dict(summary="This document, where Frankfurter's `GET /v1` points",
                            response=responses((200, "the document", {"type": "object"}))),
    "docs": dict(summary="This document in Swagger UI (HTML)",
                 response=_typed("text/html", "the page")),
    "instance": dict(summary="This worker's cache, listener and stream state (for the dashboard)",
                     response=responses((200, "the state", {"type": "object"}))),
    "fk_latest": dict(
        summary="Frankfurter v1: the newest day of the Frankfurter source, however old",
        description="Frankfurter v1 compatible, answered from the instance's in-memory copy "
                    "of the source's newest days (kept by history notifications). `no-cache` "
                    "with an ETag that changes with the content. " + FK_LENIENCY,
        parameter=FK_PARAMS,
        response=fk_responses(FK_RATES, (404, "not found"),
                              (422, "invalid amount / bad currency pair"))),
    "fk_when": dict(
        summary="Frankfurter v1: one day (YYYY-MM-DD) or a time series (START..END, START..)",
        description=_FK_WHEN,
        parameter=[parameter("when", FK_WHEN, "path"), *FK_PARAMS],
        response=fk_responses({"oneOf": [FK_RATES, FK_SERIES]}, (404, "not found"),
                              (422, "invalid amount / invalid date / bad currency pair"),
                              path_parameter=True)),
    "fk_currencies": dict(
        summary="Frankfurter v1: the currencies of the Frankfurter source, with ISO 4217 names",
        description="The codes quoted within 14 days of the source's newest day, plus its "
                    "pivot; `{}` when it has no data.",
        response=fk_responses({"type": "object", "additionalProperties": {"type": "string"}})),
    "fk_version": dict(summary="Frankfurter v1: the version document",
                       response=responses((200, "version", {"type": "object"}),
                                          media_type=FK_TYPE)),
}


def doc(name: str) -> Any:
    """The decorator documenting route `name`."""
    return openapi.definition(**DEFINITIONS[name])


# ----------------------------------------------------------------------------- the document
ALLOW_405 = {"description": "method not allowed", "headers": {
    "Allow": {"description": "the methods this path answers", "required": True,
              "schema": {"type": "string"}}}, "content": _json(ERROR)}


def finish(spec: dict[str, Any]) -> dict[str, Any]:
    """What sanic-ext's definitions cannot say: 204/304 have no body (it writes a content
    type for every response), and every operation may answer 405 with `Allow`."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            answers = operation.get("responses", {})
            for status in list(answers):
                if str(status) in ("204", "304"):
                    answers[status].pop("content", None)
            answers.setdefault("405", ALLOW_405)
    return spec

