"""HTTP only: routes, request validation, response shaping, app lifecycle. No SQL.

    python sanic_app.py --host 127.0.0.1 --port 8000 [--workers N]

Each worker is an independent cache + listener (model.Store).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse
from sanic_ext import Extend, openapi
from sanic_ext.extensions.http.extension import HTTPExtension
from sanic_ext.extensions.openapi.extension import OpenAPIExtension

import internals
import metrics
import model
import stream
import util
from sources import MAX_DIGITS, MAX_RATE, MIN_RATE, significant_digits  # the SPEC §3 rate rules

log = logging.getLogger("xrates.api")

SETTINGS = util.settings_or_exit()
util.setup_logging(SETTINGS)

MAX_BODY_BYTES = 64 * 1024
JSON_TYPE = "application/json"
RUN_STATUSES = ("queued", "running", "succeeded", "failed")
PIVOT_FIRST = ("EUR", "USD")

_CODE = re.compile(r"[A-Za-z]{3}\Z")
_DECIMAL_TEXT = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)\Z")
_SOURCE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
_WIDE = Context(prec=60, rounding=ROUND_HALF_EVEN)  # intermediate precision for convert
_RESULT = Context(prec=MAX_DIGITS, rounding=ROUND_HALF_EVEN)


# ----------------------------------------------------------------------------- errors
class ApiError(model.XratesError):
    """A client error with its HTTP status; rendered as {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def invalid(field: str, what: str) -> ApiError:
    return ApiError(422, f"{field}: {what}")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPResponse:
    body = json.dumps({"error": message}).encode()
    return HTTPResponse(body, status=status, content_type=JSON_TYPE,
                        headers={"Cache-Control": "no-store", **(headers or {})})


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                  cache_control: str = "no-store") -> HTTPResponse:
    body = json.dumps(data, separators=(",", ":")).encode()
    return HTTPResponse(body, status=status, content_type=JSON_TYPE,
                        headers={"Cache-Control": cache_control, **(headers or {})})


# ----------------------------------------------------------------------------- validation
class _NonFinite:
    """Stands for NaN/Infinity in a body, so the field gets a clear 422."""


def parse_code(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _CODE.match(value):
        raise invalid(field, "must be a three-letter currency code")
    return value.upper()


def parse_pair(base: Any, quote: Any) -> tuple[str, str]:
    base, quote = parse_code(base, "base"), parse_code(quote, "quote")
    if base == quote:
        raise invalid("quote", "must differ from base")
    return base, quote


def parse_decimal(value: Any, field: str) -> Decimal:
    """A rate or amount: a JSON number or plain decimal string within the SPEC §3 rules."""
    if isinstance(value, _NonFinite):
        raise invalid(field, "must be finite")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, str) and len(value) <= 64 and _DECIMAL_TEXT.match(value):
        number = Decimal(value)
    else:
        raise invalid(field, "must be a number or a plain decimal string like \"1.0832\"")
    if not number.is_finite():
        raise invalid(field, "must be finite")
    if not MIN_RATE <= number < MAX_RATE:
        raise invalid(field, "must be at least 1e-12 and below 1e12")
    if significant_digits(number) > MAX_DIGITS:
        raise invalid(field, f"has more than {MAX_DIGITS} significant digits")
    return number


def parse_source(value: Any) -> str:
    if not isinstance(value, str) or not _SOURCE.match(value):
        raise invalid("source", "must be 1-32 characters of a-z, 0-9, _ or -, starting with a letter")
    return value


def parse_as_of(value: Any) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise invalid("as_of", "must be an ISO 8601 date or date-time string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise invalid("as_of", "must be an ISO 8601 date or date-time string") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment.year < 1900 or moment > datetime.now(UTC) + timedelta(days=1):
        raise invalid("as_of", "must be after 1900 and not in the future")
    return moment


def read_json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object (415/400 otherwise). Numbers become Decimals."""
    if optional and not request.body:
        return {}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != JSON_TYPE:
        raise ApiError(415, "body must be sent with Content-Type: application/json")
    try:
        data = json.loads(request.body, parse_float=Decimal, parse_int=Decimal,
                          parse_constant=lambda _name: _NonFinite())
    except (ValueError, RecursionError):
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def check_fields(data: dict[str, Any], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for name in data:
        if name not in allowed:
            raise invalid(str(name)[:40], f"unknown field (allowed: {', '.join(allowed)})")
    for name in required:
        if name not in data:
            raise invalid(name, "is required")


def parse_rate_body(data: dict[str, Any]) -> tuple[Decimal, str, datetime]:
    rate = parse_decimal(data["rate"], "rate")
    source = parse_source(data["source"]) if "source" in data else "manual"
    as_of = parse_as_of(data["as_of"]) if "as_of" in data else datetime.now(UTC)
    return rate, source, as_of


def query_arg(request: Request, name: str) -> str | None:
    values = request.args.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise invalid(name, "given more than once")
    return values[0]


# ----------------------------------------------------------------------------- authorisation
def _is_loopback(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def authorise_write(request: Request) -> None:
    """SPEC §2: a token when configured (constant-time compare), else loopback peers only."""
    token = SETTINGS.api_token
    if token:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise ApiError(401, "missing or wrong bearer token")
        return
    if not _is_loopback(request.ip):
        raise ApiError(403, "writes are accepted only from loopback clients when "
                            "XRATES_API_TOKEN is not set")


# ----------------------------------------------------------------------------- app
app = Sanic("xrates", log_config=util.sanic_log_config(SETTINGS))
app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
app.config.FALLBACK_ERROR_FORMAT = "json"
app.config.CORS = False  # ours, for reads only: READ_CORS, preflight() and common_headers()
app.config.OAS_URL_PREFIX = "/docs"
app.config.OAS_UI_DEFAULT = "swagger"
app.config.OAS_IGNORE_OPTIONS = True
app.config.OAS_IGNORE_HEAD = True
app.config.MOTD = False
app.config.KEEP_ALIVE_TIMEOUT = 30
# OpenAPI (/docs) and the HTTP helpers only. Not sanic-ext's dependency injection, which we do
# not use and which dispatches a signal on every request (measured here: about 10 us of the
# 45 us that a constant route cost with it).
Extend(app, built_in_extensions=False, extensions=[OpenAPIExtension, HTTPExtension])
app.ext.openapi.describe(
    "xrates",
    version="0.1.0",
    description="Currency exchange rates served from a LISTEN/NOTIFY-refreshed cache.",
)

READ_EXPOSE = "ETag, X-Cache"
VERSION_HEADER = "X-Xrates-Version"  # a write's version: the read-your-writes token
READ_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "If-None-Match, X-Xrates-Min-Version",
    "Access-Control-Expose-Headers": READ_EXPOSE,
    "Access-Control-Max-Age": "600",
}
_READ_METHODS = frozenset(("GET", "HEAD"))


@app.before_server_start
async def start_store(app: Sanic) -> None:
    store = model.Store(SETTINGS)
    await store.start(os.environ.get("DATABASE_URL") or util.database_url(SETTINGS))
    app.ctx.store = store
    app.ctx.metrics = metrics.WorkerMetrics(store)
    app.ctx.metrics.start()


@app.after_server_start
async def freeze_startup_heap(app: Sanic) -> None:
    # Everything built so far (Sanic, sanic-ext, the OpenAPI spec, the modules) lives as long
    # as the process: move it out of the cyclic collector's sight, so that a full collection
    # (triggered by a burst of new cache entries) walks the cache, not the framework.
    gc.collect()
    gc.freeze()


@app.after_server_stop
async def stop_store(app: Sanic) -> None:
    app.ctx.metrics.stop()
    await app.ctx.store.close()


@app.on_request
async def preflight(request: Request) -> HTTPResponse | None:
    request.ctx.t0 = time.perf_counter()
    if request.method == "OPTIONS":
        # CORS preflight: reads only. A write preflight gets no grant for its method.
        return HTTPResponse(status=204, headers={**READ_CORS, "Cache-Control": "no-store"})
    return None


@app.on_response
async def common_headers(request: Request, response: HTTPResponse) -> None:
    headers = response.headers
    if "cache-control" not in headers:
        headers["Cache-Control"] = "no-store"
    # A rate response (rate_response) already carries the read CORS headers.
    if request.method in _READ_METHODS and "access-control-expose-headers" not in headers:
        headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Expose-Headers"] = READ_EXPOSE
    t0 = getattr(request.ctx, "t0", None)
    if t0 is not None:
        route = request.route
        metrics.observe_request(route.name if route else "unmatched", response.status,
                                time.perf_counter() - t0)


@app.exception(model.XratesError)
async def on_xrates_error(request: Request, exc: model.XratesError) -> HTTPResponse:
    if exc.status >= 500:
        log.warning("event=request_failed status=%d method=%s path=%s request_id=%s error=%r",
                    exc.status, request.method, request.path, request.id, str(exc))
    return error_response(exc.status, str(exc))


@app.exception(SanicException)
async def on_sanic_error(request: Request, exc: SanicException) -> HTTPResponse:
    status = exc.status_code
    if status >= 500:
        log.error("event=server_error status=%d method=%s path=%s request_id=%s", status,
                  request.method, request.path, request.id, exc_info=exc)
        return error_response(status, "internal server error")
    message = {
        400: "malformed request",
        404: "no such route",
        405: f"method {request.method} not allowed here",
        413: f"body larger than {MAX_BODY_BYTES} bytes",
    }.get(status, str(exc) or "request error")
    headers = dict(exc.headers or {})
    return error_response(status, message, headers)


@app.exception(Exception)
async def on_unexpected(request: Request, exc: Exception) -> HTTPResponse:
    # Unexpected stays a 500 (logged with its traceback); never disguised as a 4xx.
    log.error("event=server_error status=500 method=%s path=%s request_id=%s", request.method,
              request.path, request.id, exc_info=exc)
    return error_response(500, "internal server error")


def store_of(request: Request) -> model.Store:
    return request.app.ctx.store


def rate_headers(rate: model.Rate, how: str) -> dict[str, str]:
    return {"ETag": rate.etag, "X-Cache": how, "Cache-Control": "no-cache"}


# ----------------------------------------------------------------------------- the hit path
# A rate response's header lines are constant except its ETag and length: they are encoded
# once per process (internals.PreEncodedResponse; the bytes on the wire are Sanic's own).
_RATE_HEADERS = {
    how: internals.constant_headers({
        "content-type": JSON_TYPE, "X-Cache": how, "Cache-Control": "no-cache",
        "Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": READ_EXPOSE})
    for how in (model.HIT, model.MISS, model.BYPASS)
}


def rate_response(rate: model.Rate, how: str) -> HTTPResponse:
    """200 with a rate's pre-encoded body, ETag, X-Cache, Cache-Control and read CORS."""
    return internals.PreEncodedResponse(rate.body, rate.etag, _RATE_HEADERS[how], JSON_TYPE)


def etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


# ----------------------------------------------------------------------------- schemas (OpenAPI)
RATE_SCHEMA = {
    "type": "object",
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
DECIMAL_IN = {"oneOf": [{"type": "number"}, {"type": "string", "pattern": r"^[0-9]*\.?[0-9]*$"}]}
RATE_WRITE_FIELDS = {
    "rate": DECIMAL_IN,
    "source": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$", "default": "manual"},
    "as_of": {"type": "string", "format": "date-time"},
}
RATE_CREATE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["base", "quote", "rate"],
    "properties": {"base": {"type": "string"}, "quote": {"type": "string"}, **RATE_WRITE_FIELDS},
}
RATE_PUT_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["rate"],
    "properties": RATE_WRITE_FIELDS,
}
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}}
RUN_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"type": "string", "enum": list(RUN_STATUSES)},
        "trigger": {"type": "string", "enum": ["schedule", "manual"]},
        "progress": {"type": "object", "properties": {"done": {"type": "integer"},
                                                      "total": {"type": "integer"}}},
        "sources": {"type": "object"},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": "string", "format": "date-time", "nullable": True},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
        "error": {"type": "string", "nullable": True},
    },
}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON_TYPE: {"schema": schema}}


def _responses(*pairs: tuple[int, str, dict[str, Any] | None]) -> list[openapi.definitions.Response]:
    return [
        openapi.definitions.Response(_json_content(schema or ERROR_SCHEMA), status=status,
                                     description=description)
        for status, description, schema in pairs
    ]


_ERRORS_READ = ((422, "invalid code or parameter", None), (503, "database unavailable", None))
_ERRORS_WRITE = (
    (400, "malformed JSON", None), (401, "missing or wrong token", None),
    (403, "not loopback and no token configured", None), (413, "body over 64 KiB", None),
    (415, "not application/json", None), (422, "invalid field", None),
    (503, "database unavailable", None),
)


def _path_params(*names: str) -> list[openapi.definitions.Parameter]:
    return [openapi.definitions.Parameter(name, str, location="path", required=True)
            for name in names]


def _query_params(*names: str) -> list[openapi.definitions.Parameter]:
    return [openapi.definitions.Parameter(name, str, location="query") for name in names]


_MIN_VERSION_PARAMS = [
    openapi.definitions.Parameter("min_version", int, location="query"),
    openapi.definitions.Parameter("X-Xrates-Min-Version", int, location="header"),
]


# ----------------------------------------------------------------------------- routes: rates
@app.get("/v1/rates/<base:str>/<quote:str>", name="rate_get")
@openapi.definition(
    summary="One rate (served from the instance's cache)",
    description="With `X-Xrates-Min-Version: V` (or `?min_version=V`, V from a write's "
                "`X-Xrates-Version`) the answer is at least as new as that write, on any instance.",
    parameter=[*_path_params("base", "quote"), *_MIN_VERSION_PARAMS],
    response=_responses((200, "the rate", RATE_SCHEMA), (304, "not modified (If-None-Match)", {}),
                        (404, "no such rate", None), *_ERRORS_READ),
)
async def rate_get(request: Request, base: str, quote: str) -> HTTPResponse:
    store = store_of(request)
    if request.query_string or "x-xrates-min-version" in request.headers:
        min_version = parse_min_version(request)  # read your writes: see the live section
        if min_version is not None:
            return await rate_get_at_least(request, store, base, quote, min_version)
    # The cache only ever holds keys of valid, upper-case, distinct pairs (rows of the table,
    # or requests validated below), so a hit on the raw path is a hit on the validated pair.
    entry = store.cached(base + quote) if len(base) == 3 else None
    if entry is not None:
        rate, how = entry.value, model.HIT
    else:
        base, quote = parse_pair(base, quote)
        rate, how = await store.get_rate(base, quote)
    if rate is None:
        return error_response(404, f"no rate for {base}/{quote}", {"X-Cache": how})
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, rate.etag):
        return HTTPResponse(status=304, headers=rate_headers(rate, how))
    return rate_response(rate, how)


@app.get("/v1/rates", name="rates_list")
@openapi.definition(
    summary="All rates, optionally filtered (read from the database)",
    parameter=_query_params("base", "quote"),
    response=_responses((200, "rates ordered by base, quote", {
        "type": "object", "properties": {"rates": {"type": "array", "items": RATE_SCHEMA},
                                         "count": {"type": "integer"}}}), *_ERRORS_READ),
)
async def rates_list(request: Request) -> HTTPResponse:
    base, quote = query_arg(request, "base"), query_arg(request, "quote")
    base = parse_code(base, "base") if base is not None else None
    quote = parse_code(quote, "quote") if quote is not None else None
    rates = await store_of(request).list_rates(base, quote)
    body = b'{"rates":[' + b",".join(r.body for r in rates) + b'],"count":%d}' % len(rates)
    return HTTPResponse(body, content_type=JSON_TYPE, headers={"Cache-Control": "no-cache"})


@app.post("/v1/rates", name="rate_create")
@openapi.definition(
    summary="Create a rate (409 if the pair exists)",
    body=_json_content(RATE_CREATE_SCHEMA),
    response=_responses((201, "created", RATE_SCHEMA), (409, "the pair exists", None),
                        *_ERRORS_WRITE),
)
async def rate_create(request: Request) -> HTTPResponse:
    authorise_write(request)
    data = read_json_object(request)
    check_fields(data, ("base", "quote", "rate", "source", "as_of"), ("base", "quote", "rate"))
    base, quote = parse_pair(data["base"], data["quote"])
    rate, source, as_of = parse_rate_body(data)
    stored = await store_of(request).create_rate(base, quote, rate, source, as_of)
    headers = {**rate_headers(stored, model.BYPASS), "Location": f"/v1/rates/{base}/{quote}",
               VERSION_HEADER: str(stored.version)}
    del headers["X-Cache"]
    return HTTPResponse(stored.body, status=201, headers=headers, content_type=JSON_TYPE)


@app.put("/v1/rates/<base:str>/<quote:str>", name="rate_put")
@openapi.definition(
    summary="Create or replace a rate",
    parameter=_path_params("base", "quote"),
    body=_json_content(RATE_PUT_SCHEMA),
    response=_responses((200, "updated", RATE_SCHEMA), (201, "created", RATE_SCHEMA),
                        *_ERRORS_WRITE),
)
async def rate_put(request: Request, base: str, quote: str) -> HTTPResponse:
    authorise_write(request)
    base, quote = parse_pair(base, quote)
    data = read_json_object(request)
    check_fields(data, ("rate", "source", "as_of", "base", "quote"), ("rate",))
    for field, expected in (("base", base), ("quote", quote)):
        if field in data and parse_code(data[field], field) != expected:
            raise invalid(field, "does not match the path")
    rate, source, as_of = parse_rate_body(data)
    stored, created = await store_of(request).put_rate(base, quote, rate, source, as_of)
    headers = {"ETag": stored.etag, "Cache-Control": "no-cache", VERSION_HEADER: str(stored.version)}
    if created:
        headers["Location"] = f"/v1/rates/{base}/{quote}"
    return HTTPResponse(stored.body, status=201 if created else 200, headers=headers,
                        content_type=JSON_TYPE)


@app.delete("/v1/rates/<base:str>/<quote:str>", name="rate_delete")
@openapi.definition(
    summary="Delete a rate",
    parameter=_path_params("base", "quote"),
    response=_responses((204, "deleted", {}), (404, "no such rate", None), *_ERRORS_WRITE),
)
async def rate_delete(request: Request, base: str, quote: str) -> HTTPResponse:
    authorise_write(request)
    base, quote = parse_pair(base, quote)
    version = await store_of(request).delete_rate(base, quote)
    return HTTPResponse(status=204, headers={VERSION_HEADER: str(version)})


# ----------------------------------------------------------------------------- routes: convert
def _leg(rates: dict[tuple[str, str], Decimal], a: str, b: str) -> Decimal | None:
    """Price of one a in b: direct, else the inverse of b→a."""
    if (a, b) in rates:
        return rates[(a, b)]
    if (b, a) in rates:
        return _WIDE.divide(1, rates[(b, a)])
    return None


def find_path(rates: dict[tuple[str, str], Decimal], src: str, dst: str
              ) -> tuple[Decimal, list[str]] | None:
    """Direct, then inverse, then one pivot (EUR, USD, then the others A–Z)."""
    direct = _leg(rates, src, dst)
    if direct is not None:
        return direct, []
    neighbours = {c for pair in rates for c in pair if src in pair or dst in pair} - {src, dst}
    ordered = [p for p in PIVOT_FIRST if p in neighbours]
    ordered += sorted(neighbours - set(PIVOT_FIRST))
    for pivot in ordered:
        first, second = _leg(rates, src, pivot), _leg(rates, pivot, dst)
        if first is not None and second is not None:
            return _WIDE.multiply(first, second), [pivot]
    return None


def plain(number: Decimal) -> str:
    """Round once to 15 significant digits, half-even; as a JSON number without exponent."""
    return format(_RESULT.plus(number).normalize(_RESULT), "f")


@app.get("/v1/convert", name="convert")
@openapi.definition(
    summary="Convert an amount: direct, inverse, or through one pivot currency",
    parameter=_query_params("from", "to", "amount"),
    response=_responses((200, "the conversion", {
        "type": "object", "properties": {
            "from": {"type": "string"}, "to": {"type": "string"}, "amount": {"type": "number"},
            "rate": {"type": "number"}, "result": {"type": "number"},
            "via": {"type": "array", "items": {"type": "string"}}}}),
        (404, "no path between the currencies", None), *_ERRORS_READ),
)
async def convert(request: Request) -> HTTPResponse:
    src, dst = query_arg(request, "from"), query_arg(request, "to")
    if src is None:
        raise invalid("from", "is required")
    if dst is None:
        raise invalid("to", "is required")
    src, dst = parse_code(src, "from"), parse_code(dst, "to")
    if src == dst:
        raise invalid("to", "must differ from from")
    raw_amount = query_arg(request, "amount")
    amount = parse_decimal(raw_amount, "amount") if raw_amount is not None else Decimal(1)
    store = store_of(request)
    path = await _cached_path(store, src, dst)
    if path is None:
        rates = {(r.base, r.quote): r.decimal for r in await store.rates_touching([src, dst])}
        path = find_path(rates, src, dst)
    if path is None:
        raise ApiError(404, f"no rate path from {src} to {dst} (direct, inverse or one pivot)")
    rate, via = path
    # Built by hand: the numbers are exact decimal literals, which json.dumps cannot write.
    body = (
        f'{{"from":"{src}","to":"{dst}","amount":{plain(amount)},"rate":{plain(rate)},'
        f'"result":{plain(_WIDE.multiply(amount, rate))},"via":{json.dumps(via)}}}'
    ).encode()
    return HTTPResponse(body, content_type=JSON_TYPE, headers={"Cache-Control": "no-cache"})


async def _cached_path(store: model.Store, src: str, dst: str) -> tuple[Decimal, list[str]] | None:
    """Direct or inverse through the cache; None sends the caller to the pivot search."""
    direct, _ = await store.get_rate(src, dst)
    if direct is not None:
        return direct.decimal, []
    inverse, _ = await store.get_rate(dst, src)
    if inverse is not None:
        return _WIDE.divide(1, inverse.decimal), []
    return None


# ----------------------------------------------------------------------------- routes: updates
@app.post("/v1/updates", name="updates_create")
@openapi.definition(
    summary="Ask the updater to run now (all configured sources, or the ones named)",
    body=_json_content({"type": "object", "additionalProperties": False, "properties": {
        "sources": {"type": "array", "items": {"type": "string"}}}}),
    response=_responses((202, "queued", {"type": "object", "properties": {
        "id": {"type": "integer"}, "status": {"type": "string"}}}), *_ERRORS_WRITE),
)
async def updates_create(request: Request) -> HTTPResponse:
    authorise_write(request)
    data = read_json_object(request, optional=True)
    check_fields(data, ("sources",), ())
    sources = data.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not sources or len(sources) > 20:
            raise invalid("sources", "must be a non-empty list of source names")
        for name in sources:
            if not isinstance(name, str) or name.lower() not in util.KNOWN_SOURCES:
                raise invalid("sources", f"unknown source {str(name)[:40]!r}; known: "
                                         f"{', '.join(util.KNOWN_SOURCES)}")
        sources = list(dict.fromkeys(name.lower() for name in sources))
    run = await store_of(request).queue_run(sources)
    return json_response({"id": run["id"], "status": run["status"]}, status=202,
                         headers={"Location": f"/v1/updates/{run['id']}"})


@app.get("/v1/updates", name="updates_list")
@openapi.definition(
    summary="Update runs, newest first",
    parameter=_query_params("limit", "status"),
    response=_responses((200, "runs", {"type": "object", "properties": {
        "updates": {"type": "array", "items": RUN_SCHEMA}}}), *_ERRORS_READ),
)
async def updates_list(request: Request) -> HTTPResponse:
    raw_limit, status = query_arg(request, "limit"), query_arg(request, "status")
    limit = 20
    if raw_limit is not None:
        if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
            raise invalid("limit", "must be an integer from 1 to 100")
        limit = int(raw_limit)
    if status is not None and status not in RUN_STATUSES:
        raise invalid("status", f"must be one of {', '.join(RUN_STATUSES)}")
    runs = await store_of(request).list_runs(limit, status)
    return json_response({"updates": runs})


@app.get("/v1/updates/<run_id:str>", name="updates_get")
@openapi.definition(
    summary="One update run with its progress",
    parameter=_path_params("run_id"),
    response=_responses((200, "the run", RUN_SCHEMA), (404, "no such run", None), *_ERRORS_READ),
)
async def updates_get(request: Request, run_id: str) -> HTTPResponse:
    if not run_id.isascii() or not run_id.isdigit() or len(run_id) > 18:
        raise invalid("id", "must be a positive integer")
    return json_response(await store_of(request).get_run(int(run_id)))


# ----------------------------------------------------------------------------- routes: ops
HEALTH_BODY = b'{"status":"ok"}'


@app.get("/health", name="health")
@openapi.definition(summary="Liveness (constant, no I/O)",
                    response=_responses((200, "alive", {"type": "object"})))
async def health(request: Request) -> HTTPResponse:
    return HTTPResponse(HEALTH_BODY, content_type=JSON_TYPE)


@app.get("/ready", name="ready")
@openapi.definition(
    summary="Readiness: the database answers and the listener is connected",
    response=_responses((200, "ready", {"type": "object"}), (503, "not ready", None)),
)
async def ready(request: Request) -> HTTPResponse:
    store = store_of(request)
    if not store.listener_connected:
        return error_response(503, "listener not connected")
    try:
        await store.ping()
    except model.Unavailable:
        return error_response(503, "database unavailable")
    return json_response({"status": "ready"})


@app.get("/metrics", name="metrics")
@openapi.definition(summary="Prometheus metrics, aggregated over this instance's workers",
                    response=[openapi.definitions.Response(
                        {"text/plain": {"schema": {"type": "string"}}}, status=200,
                        description="Prometheus text format")])
async def metrics_route(request: Request) -> HTTPResponse:
    await request.app.ctx.metrics.sample_database()
    request.app.ctx.metrics.sync()
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)


@app.get("/openapi.json", name="openapi_json")
@openapi.exclude()
async def openapi_json(request: Request) -> HTTPResponse:
    from sanic_ext.extensions.openapi.builders import SpecificationBuilder

    return json_response(SpecificationBuilder().build(request.app).serialize())


# ----------------------------------------------------------------------------- live: stream
# GET /v1/stream: the changes this worker's listener applies, as Server-Sent Events (stream.py).
STREAM_MAX_PAIRS = 500
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@app.before_server_start
async def start_hub(app: Sanic) -> None:
    app.ctx.hub = app.ctx.store.hub  # registered after start_store: the store exists


@app.before_server_stop
async def end_streams(app: Sanic) -> None:
    # Before the server closes its connections: every stream gets its final chunk, so that
    # shutdown never waits on an endless response (see stream.Hub.close).
    await app.ctx.hub.close()


def parse_stream_selection(request: Request) -> tuple[list[str] | None, str | None]:
    """(keys of ?pairs=USD/EUR,GBP/USD, or None; ?base=EUR, or None); 422 if both or bad."""
    # Blank values count (a bare ?pairs= is an error, not "everything").
    args = request.get_args(keep_blank_values=True)
    for name in ("pairs", "base"):
        if len(args.getlist(name, [])) > 1:
            raise invalid(name, "given more than once")
    raw_pairs, raw_base = args.get("pairs"), args.get("base")
    if raw_pairs is not None and raw_base is not None:
        raise invalid("pairs", "give pairs or base, not both")
    if raw_base is not None:
        return None, parse_code(raw_base, "base")
    if raw_pairs is None:
        return None, None
    keys: list[str] = []
    for item in raw_pairs.split(","):
        base, slash, quote = item.strip().partition("/")
        if not slash:
            raise invalid("pairs", "must be a comma list of BASE/QUOTE like USD/EUR,GBP/USD")
        base, quote = parse_pair(base, quote)
        keys.append(base + quote)
    keys = list(dict.fromkeys(keys))
    if len(keys) > STREAM_MAX_PAIRS:
        raise invalid("pairs", f"at most {STREAM_MAX_PAIRS} pairs")
    return keys, None


@app.get("/v1/stream", name="stream")
@openapi.definition(
    summary="Live changes as Server-Sent Events (endless: keep it out of generic fuzzers)",
    description=(
        "An endless `text/event-stream` response: first `event: snapshot` (data: the "
        "`GET /v1/rates` body for the selection), then `event: rate` (data: a rate object) or "
        "`event: delete` (data: `{base, quote, version}`) for every change this instance "
        "applies, with `id:` = the version, and a `: ping` comment at least every 15 s. "
        "`event: resync` (data `{reason}`: `slow`, `listener`, `flush`) ends the stream: "
        "reconnect for a new snapshot (a `Last-Event-ID` reconnect gets one too). "
        "Generic fuzzers and crawlers must skip this route: it never ends by itself."),
    parameter=_query_params("pairs", "base"),
    response=[openapi.definitions.Response(
        {"text/event-stream": {"schema": {"type": "string"}}}, status=200,
        description="the event stream"),
        *_responses((422, "invalid selection", None),
                    (503, "listener down, too many streams, or database unavailable", None))],
)
async def stream_route(request: Request) -> HTTPResponse | None:
    keys, base = parse_stream_selection(request)
    store, hub = store_of(request), request.app.ctx.hub
    try:
        sub = hub.subscribe(keys, base, request.transport)
    except stream.StreamUnavailable as exc:
        return error_response(503, str(exc), {"Retry-After": "1"})
    try:
        # Subscribed first, then the snapshot: no change falls between the two, and the
        # deltas it already contains are dropped by version (Subscriber.set_snapshot).
        if keys is not None:
            rates = await store.list_pairs(keys)
        else:
            rates = await store.list_rates(base, None)
        sub.set_snapshot({r.base + r.quote: r.version for r in rates})
        snapshot = b'{"rates":[' + b",".join(r.body for r in rates) + b'],"count":%d}' % len(rates)
        response = await request.respond(content_type="text/event-stream; charset=utf-8",
                                         headers=STREAM_HEADERS)
        # retry: in the snapshot's own block (a block without data is no event for browsers,
        # but some client libraries hand it out as an empty message).
        await response.send(b"retry: %d\n" % stream.RETRY_MS + stream.frame("snapshot", snapshot))
        hub.events_total += 1
        while True:
            data, events, final = await sub.next_chunk()
            if data:
                await response.send(data)
                hub.events_total += events
            if final:
                break
        await response.eof()
    finally:
        hub.unsubscribe(sub)
    return None


# ----------------------------------------------------------------------------- live: dashboard
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
app.static("/static", STATIC_DIR, name="static")
with open(os.path.join(STATIC_DIR, "dashboard.html"), "rb") as _page:
    DASHBOARD_PAGE = _page.read()  # read once: served from memory


@app.get("/", name="dashboard")
@openapi.definition(summary="The dashboard page (HTML): live rates, a chart, update runs, "
                            "this instance's state",
                    response=[openapi.definitions.Response(
                        {"text/html": {"schema": {"type": "string"}}}, status=200,
                        description="the page")])
async def dashboard(request: Request) -> HTTPResponse:
    return HTTPResponse(DASHBOARD_PAGE, content_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


@app.get("/v1/instance", name="instance")
@openapi.definition(summary="This worker's cache, listener and stream state (for the dashboard)",
                    response=_responses((200, "the state", {"type": "object"})))
async def instance(request: Request) -> HTTPResponse:
    store = store_of(request)
    listener, hub = store.listener, request.app.ctx.hub
    history = any(route.path.rstrip("/").endswith("/history") for route in app.router.routes)
    return json_response({
        "pid": os.getpid(),
        "listener": {"connected": store.listener_connected,
                     "reconnects": listener.reconnects if listener is not None else 0,
                     "backend_pid": listener.backend_pid if listener is not None else None,
                     "lag_s": round(listener.heartbeat_lag_s, 4) if listener is not None else None},
        "cache": {"enabled": store.cache.enabled, "size": len(store.cache),
                  "max_size": store.cache.max_size, "hits": store.hits, "misses": store.misses,
                  "bypasses": store.bypasses},
        "stream": {"subscribers": hub.subscribers, "events": hub.events_total,
                   "dropped": hub.dropped_total, "max": hub.max_streams},
        "features": {"history": history},
    })


# ----------------------------------------------------------------------------- live: read your writes
def parse_min_version(request: Request) -> int | None:
    """X-Xrates-Min-Version or ?min_version (a positive integer; 422 otherwise), or None."""
    header = request.headers.get("x-xrates-min-version")
    query = query_arg(request, "min_version")
    if header is not None and query is not None and header.strip() != query.strip():
        raise invalid("min_version", "given as header and query parameter with different values")
    raw = header if header is not None else query
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or int(raw) < 1:
        raise invalid("min_version", "must be a positive integer (a write's X-Xrates-Version)")
    return int(raw)


async def rate_get_at_least(request: Request, store: model.Store, base: str, quote: str,
                            min_version: int) -> HTTPResponse:
    """GET of one rate at least as new as the write that produced ``min_version``."""
    base, quote = parse_pair(base, quote)
    rate, how = await store.get_rate_at_least(base, quote, min_version)
    if rate is None:
        return error_response(404, f"no rate for {base}/{quote}", {"X-Cache": how})
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, rate.etag):
        return HTTPResponse(status=304, headers=rate_headers(rate, how))
    return rate_response(rate, how)


# ----------------------------------------------------------------------------- profiling
if SETTINGS.profile:  # XRATES_PROFILE=1: log every handler's elapsed time (off by default)
    import perf

    log.info("event=profiling handlers=%d", perf.profile_routes(app))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sanic_app.py", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        internals.check()  # the private framework internals we rely on behave as assumed
    except internals.InternalsMismatch as exc:
        print(f"xrates: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("xrates: configuration error: --workers must be >= 1", file=sys.stderr)
        return 2
    # Resolve the database once, here: workers must not race to start an embedded server.
    os.environ["DATABASE_URL"] = util.database_url(SETTINGS)
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Workers are separate processes: they share metrics through files here.
        directory = tempfile.mkdtemp(prefix="xrates-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    log.info("event=api_start host=%s port=%d workers=%d settings=%r", args.host, args.port,
             args.workers, SETTINGS)
    app.run(host=args.host, port=args.port, workers=args.workers,
            access_log=SETTINGS.access_log,
            # One worker: serve in this process (no manager process to race at shutdown).
            single_process=args.workers == 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
