"""HTTP only: routes, request validation, response shaping, app lifecycle. No SQL.

    python sanic_app.py --host 127.0.0.1 --port 8000 [--workers N]

Each worker is an independent cache + listener (model.Store).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import gc
import hashlib
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
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from multidict import istr
from sanic import Blueprint, Request, Sanic
from sanic.compat import Header
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse
from sanic.response.types import BaseHTTPResponse
from sanic.worker.loader import AppLoader
from sanic_ext import Extend
from sanic_ext.extensions.http.extension import HTTPExtension
from sanic_ext.extensions.openapi.extension import OpenAPIExtension

import api_doc
import convert as convert_paths  # "convert" is the route's name below
import frankfurter
import internals
import metrics
import model
import sources as source_registry  # GET /v1/sources, the Frankfurter source: public metadata
import stream
import util
import views
from api_doc import FK_TYPE, HTML_TYPE, JSON_TYPE, RUN_STATUSES, doc
from sources import MAX_DIGITS, MAX_RATE, MIN_RATE, significant_digits  # the contract §3 rate rules

log = logging.getLogger("xrates.api")


MAX_BODY_BYTES = 64 * 1024

_CODE = re.compile(r"[A-Za-z]{3}\Z")
_DECIMAL_TEXT = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)\Z")
_SOURCE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")


# ----------------------------------------------------------------------------- errors
class ApiError(model.XratesError):
    """An error with its HTTP status (and headers); rendered as {"error": message} by the
    xrates error map (on_xrates_error), the one place that builds error responses."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


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
    """A rate or amount: a JSON number or plain decimal string within the contract §3 rules."""
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
    # Blank values count: `?quote=` is an invalid code, not "no filter".
    values = request.get_args(keep_blank_values=True).getlist(name)
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
    """contract §2: a token when configured (constant-time compare), else loopback peers only."""
    token = settings_of(request).api_token
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
# Every route hangs on this blueprint; create_app(settings) builds the application around it.
bp = Blueprint("xrates")


def settings_of(request: Request) -> util.Settings:
    """The settings the application was built with (read once, by create_app's caller)."""
    return request.app.ctx.settings


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


async def start_store(app: Sanic) -> None:
    settings = app.ctx.settings
    store = model.Store(settings)
    # A refill also copies the Frankfurter source's newest days (/ready waits for both).
    store.warmers.append(functools.partial(fk_days, store, app.ctx.frankfurter, counted=False))
    await store.start(settings.database_url or util.database_url(settings))
    app.ctx.store = store
    app.ctx.metrics = metrics.WorkerMetrics(store)
    app.ctx.metrics.start()


async def freeze_startup_heap(app: Sanic) -> None:
    # Everything built so far (Sanic, sanic-ext, the OpenAPI spec, the modules) lives as long
    # as the process: move it out of the cyclic collector's sight, so that a full collection
    # (triggered by a burst of new cache entries) walks the cache, not the framework.
    gc.collect()
    gc.freeze()
    app.ctx.metrics.watch_gc()  # the pauses serving meets, not start-up's collection


async def stop_store(app: Sanic) -> None:
    app.ctx.metrics.stop()
    await app.ctx.store.close()


def preflight_response() -> HTTPResponse:
    # CORS preflight: reads only. A write preflight gets no grant for its method.
    return HTTPResponse(status=204, headers={**READ_CORS, "Cache-Control": "no-store"})


def common_headers(request: Request, response: BaseHTTPResponse) -> None:
    """What every response gets: Cache-Control, read CORS, and its count and latency."""
    # A pre-encoded response (a rate's, /ping's) has both from its template already.
    if type(response) is not internals.PreEncodedResponse:
        headers = response.headers
        if "cache-control" not in headers:
            headers["Cache-Control"] = "no-store"
        if request.method in _READ_METHODS and "access-control-expose-headers" not in headers:
            headers["Access-Control-Allow-Origin"] = "*"
            headers["Access-Control-Expose-Headers"] = READ_EXPOSE
    t0 = internals.handler_started_at(request)
    if t0 is not None:
        route = request.route
        metrics.observe_request(route.name if route else "unmatched", response.status,
                                time.perf_counter() - t0)


def read_template(content_type: str, cache_control: str,
                  extra: Mapping[str, str] | None = None) -> Header:
    """A pre-encoded read answer's header template: everything common_headers would add is in
    it (Cache-Control, read CORS), so common_headers skips a PreEncodedResponse."""
    return internals.constant_headers({
        "content-type": content_type, **(extra or {}), "Cache-Control": cache_control,
        "Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": READ_EXPOSE})


class XratesRequest(Request):
    """Sanic's request with our response policy applied where Sanic connects each response
    (a handler's, an error's, a stream's) to the connection, instead of request and response
    middleware: Sanic's middleware machinery cost ~15% of a constant route's time here
    (README "Performance"). A routed OPTIONS (sanic-ext's automatic handler) is answered by
    the read-only CORS preflight."""

    __slots__ = ()  # as Sanic's Request: no per-request __dict__

    async def respond(self, response: BaseHTTPResponse | None = None, *, status: int = 200,
                      headers: Header | dict[str, str] | None = None,
                      content_type: str | None = None) -> Any:
        if (self.method == "OPTIONS" and self.route is not None and response is not None
                and response.status == 204):  # sanic-ext's automatic answer, not an error
            response = preflight_response()
        final = await super().respond(response, status=status, headers=headers,
                                      content_type=content_type)
        common_headers(self, final)
        return final


async def on_xrates_error(request: Request, exc: model.XratesError) -> HTTPResponse:
    if exc.status >= 500:
        log.warning("event=request_failed status=%d method=%s path=%s request_id=%s error=%r",
                    exc.status, request.method, request.path, request.id, str(exc))
    return error_response(exc.status, str(exc), getattr(exc, "headers", None))


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
    if status == 405 and "Allow" not in headers:
        # Sanic names the allowed methods only when the router itself refused the method;
        # a method it does not route at all (TRACE) comes without: RFC 9110 wants Allow.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(status, message, headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this request's path (HEAD and OPTIONS always)."""
    allowed = []
    for method in ("GET", "POST", "PUT", "DELETE"):
        try:
            request.app.router.get(request.path, method, request.headers.get("host"))
        except SanicException:
            continue
        allowed.append(method)
    return [*allowed, "HEAD", "OPTIONS"] if "GET" in allowed else [*allowed, "OPTIONS"]


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
    how: read_template(JSON_TYPE, "no-cache", {"X-Cache": how})
    for how in (model.HIT, model.MISS, model.BYPASS)
}
_HIT_HEADERS = _RATE_HEADERS[model.HIT]
# Header names as multidict's case-folded strings: a lookup skips folding the name.
_MIN_VERSION_HEADER = istr("x-xrates-min-version")
_IF_NONE_MATCH = istr("if-none-match")
# The query's separator as an int: `in` on bytes with an int needle is one memchr (0.05 µs
# here), with a bytes needle it goes through the buffer protocol (0.45 µs; ~1 µs in a handler).
_QUERY_MARK = ord("?")


def rate_response(rate: model.Rate, how: str) -> HTTPResponse:
    """200 with a rate's pre-encoded body, ETag, X-Cache, Cache-Control and read CORS."""
    return internals.PreEncodedResponse(rate.body, rate.etag, _RATE_HEADERS[how], JSON_TYPE)


def etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


# ----------------------------------------------------------------------------- routes: rates
@bp.get("/v1/rates/<base:str>/<quote:str>", name="rate_get")
@doc("rate_get")
async def rate_get(request: Request, base: str, quote: str) -> HTTPResponse:
    headers = request.headers
    if _QUERY_MARK in request.raw_url or _MIN_VERSION_HEADER in headers:
        answer = await rate_read_with_options(request, base, quote)
        if answer is not None:
            return answer
    # The cache only ever holds keys of valid, upper-case, distinct pairs (rows of the table,
    # or requests validated below), so a hit on the raw path is a hit on the validated pair.
    store: model.Store = request.app.ctx.store
    entry = store.cached(base + quote) if len(base) == 3 else None
    if entry is None:
        base, quote = parse_pair(base, quote)
        rate, how = await store.get_rate(base, quote)
    else:
        rate, how = entry.value, model.HIT
        if rate is not None and _IF_NONE_MATCH not in headers:  # a hit's answer, inlined
            return internals.PreEncodedResponse(rate.body, rate.etag, _HIT_HEADERS, JSON_TYPE)
    return answer_rate(request, base, quote, rate, how)


async def rate_read_with_options(request: Request, base: str, quote: str) -> HTTPResponse | None:
    """A single-pair read with a query or X-Xrates-Min-Version: a day of history (?date=, §8)
    or a read of at least a version (the live section); None for a plain read."""
    if wants_history(request):
        return await rate_on_day(request, base, quote)
    min_version = parse_min_version(request)
    if min_version is None:
        return None
    return await rate_get_at_least(request, store_of(request), base, quote, min_version)


def answer_rate(request: Request, base: str, quote: str, rate: model.Rate | None,
                how: str) -> HTTPResponse:
    """A single-pair read's answer: 404, 304 on a matching If-None-Match, or the rate."""
    if rate is None:
        raise ApiError(404, f"no rate for {base}/{quote}", {"X-Cache": how})
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, rate.etag):
        return HTTPResponse(status=304, headers=rate_headers(rate, how))
    return rate_response(rate, how)


@bp.get("/v1/rates", name="rates_list")
@doc("rates_list")
async def rates_list(request: Request) -> HTTPResponse:
    base, quote = query_arg(request, "base"), query_arg(request, "quote")
    base = parse_code(base, "base") if base is not None else None
    quote = parse_code(quote, "quote") if quote is not None else None
    store = store_of(request)
    if base is None and quote is None:
        return await all_rates_list(request, store)
    rates = await store.list_rates(base, quote)
    return content_response(request, list_body(rates), fixed=False)  # each body has its version


async def all_rates_list(request: Request, store: model.Store) -> HTTPResponse:
    """The unfiltered list: its answer is remembered for the cache generation it was made
    at (a poll of an unchanged cache neither joins nor hashes it again)."""
    memoised = store.views.all_answer()
    if memoised is not None:
        store.view_outcomes["memory"] += 1
        return content_answer(request, *memoised, fixed=False)
    cache = store.cache
    generation, from_memory = cache.generation, cache.complete
    rates = await store.list_rates(None, None)
    body = list_body(rates)
    etag = content_etag(body)
    if from_memory:  # remember_all keeps it only if that generation still lasts
        store.views.remember_all(generation, body, etag)
    return content_answer(request, body, etag, fixed=False)


def list_body(rates: list[model.Rate]) -> bytes:
    """``{"rates":[...],"count":n}`` in one allocation: a second copy of an 11 MB list (the
    benchmark's table) cost ~20 ms of page faults."""
    if not rates:
        return b'{"rates":[],"count":0}'
    bodies = [r.body for r in rates]
    bodies[0] = b'{"rates":[' + bodies[0]
    bodies[-1] += b'],"count":%d}' % len(rates)
    return b",".join(bodies)


@bp.post("/v1/rates", name="rate_create")
@doc("rate_create")
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


@bp.put("/v1/rates/<base:str>/<quote:str>", name="rate_put")
@doc("rate_put")
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


@bp.delete("/v1/rates/<base:str>/<quote:str>", name="rate_delete")
@doc("rate_delete")
async def rate_delete(request: Request, base: str, quote: str) -> HTTPResponse:
    authorise_write(request)
    base, quote = parse_pair(base, quote)
    version = await store_of(request).delete_rate(base, quote)
    return HTTPResponse(status=204, headers={VERSION_HEADER: str(version)})


# ----------------------------------------------------------------------------- routes: convert
plain = convert_paths.plain  # once to 15 significant digits, half-even; JSON, no exponent


@bp.get("/v1/convert", name="convert")
@doc("convert")
async def convert(request: Request) -> HTTPResponse:
    store = store_of(request)
    memoised = store.views.answer(request.query_string)  # only valid queries are kept
    if memoised is not None:
        store.view_outcomes["memory"] += 1
        return content_answer(request, *memoised, fixed=False)
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
    sources = settings_of(request).sources
    if request.query_string and ("date" in request.args or "source" in request.args):
        return await convert_on_day(request, store, src, dst, amount, sources)
    answer = await store.conversion_path(src, dst)
    if answer.path is None or answer.rate is None:
        raise ApiError(404, f"no rate path from {src} to {dst} "
                            "(direct, inverse or through up to two currencies)")
    rate = answer.rate
    result = rate if amount == 1 else Fraction(amount) * rate
    body = (_convert_body(src, dst, amount, rate, result, answer.path.via) + "}").encode()
    # The ETag covers the versions of the rows on the path, not only the rounded numbers.
    etag = content_etag(body + repr(answer.versions).encode())
    store.views.remember(request.query_string, answer, body, etag)
    return content_answer(request, body, etag, fixed=False)


def _convert_body(src: str, dst: str, amount: Decimal, rate: Fraction, result: Fraction,
                  via: list[str]) -> str:
    # Built by hand: the numbers are exact decimal literals, which json.dumps cannot write.
    return (f'{{"from":"{src}","to":"{dst}","amount":{plain(amount)},"rate":{plain(rate)},'
            f'"result":{plain(result)},"via":{json.dumps(via)}')


async def convert_on_day(request: Request, store: model.Store, src: str, dst: str,
                         amount: Decimal, sources: tuple[str, ...]) -> HTTPResponse:
    """`/v1/convert?date=` (history section: value_on_day's rule, content_response's caching)."""
    day, source = day_and_source(request)
    found = await value_on_day(store, src, dst, day, source, sources)
    if found is None:
        raise ApiError(404, f"no rate path from {src} to {dst} within {LOOKBACK_DAYS} days up "
                            f"to {day.isoformat()} (direct, inverse or through up to two "
                            "currencies on one day)")
    body = (_convert_body(src, dst, amount, found.rate, Fraction(amount) * found.rate, found.via)
            + f',"date":"{found.day.isoformat()}"}}').encode()
    return content_response(request, body, fixed=day < utc_today())


# ----------------------------------------------------------------------------- routes: sources
DEMO_METADATA = {  # the offline source has no Source entry in sources.FEEDS
    "title": "Offline demo: a deterministic random walk around ECB reference rates",
    "country": None, "url": None, "pivot": "EUR", "base_direction": source_registry.FOREIGN_PER_PIVOT,
    "cadence": "a new value every XRATES_INTERVAL seconds (offline)",
}


def source_metadata(name: str) -> dict[str, Any]:
    """What sources.py says about a source: public facts only (no configured override)."""
    if name == "demo":
        return {"name": name, **DEMO_METADATA}
    feed = source_registry.FEEDS[name]
    return {"name": name, "title": feed.title, "country": feed.country, "url": feed.url,
            "pivot": feed.pivot, "base_direction": feed.base_direction, "cadence": feed.cadence}


@bp.get("/v1/sources", name="sources_list")
@doc("sources_list")
async def sources_list(request: Request) -> HTTPResponse:
    names = settings_of(request).sources
    status = await store_of(request).source_status(names)
    listed = [{**source_metadata(name), **outcome} for name, outcome in zip(names, status,
                                                                              strict=True)]
    return json_response({"sources": listed}, cache_control="no-cache")


# ----------------------------------------------------------------------------- routes: updates
@bp.post("/v1/updates", name="updates_create")
@doc("updates_create")
async def updates_create(request: Request) -> HTTPResponse:
    authorise_write(request)
    data = read_json_object(request, optional=True)
    check_fields(data, ("sources",), ())
    if "sources" in data:
        sources = data["sources"]
        if not isinstance(sources, list) or not sources or len(sources) > 20:
            raise invalid("sources", "must be a non-empty list of source names")
        for name in sources:
            if not isinstance(name, str) or name.lower() not in util.KNOWN_SOURCES:
                raise invalid("sources", f"unknown source {str(name)[:40]!r}; known: "
                                         f"{', '.join(util.KNOWN_SOURCES)}")
        sources = list(dict.fromkeys(name.lower() for name in sources))
    else:
        sources = None
    run = await store_of(request).queue_run(sources)
    return json_response({"id": run["id"], "status": run["status"]}, status=202,
                         headers={"Location": f"/v1/updates/{run['id']}"})


@bp.get("/v1/updates", name="updates_list")
@doc("updates_list")
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


@bp.get("/v1/updates/<run_id:str>", name="updates_get")
@doc("updates_get")
async def updates_get(request: Request, run_id: str) -> HTTPResponse:
    if not run_id.isascii() or not run_id.isdigit() or len(run_id) > 18:
        raise invalid("id", "must be a positive integer")
    return json_response(await store_of(request).get_run(int(run_id)))


# ----------------------------------------------------------------------------- routes: ops
HEALTH_BODY = b'{"status":"ok"}'


@bp.get("/health", name="health")
@doc("health")
async def health(request: Request) -> HTTPResponse:
    return HTTPResponse(HEALTH_BODY, content_type=JSON_TYPE)


# The benchmark's ceiling: a constant answer sent exactly as a cache hit is (pre-encoded body,
# ETag and header lines, the same XratesRequest.respond), so "hit / ping" is the cost of the
# lookup alone.
PING_BODY = b'{"pong":true}'
_PING_HEADERS = read_template(JSON_TYPE, "no-cache", {"X-Cache": "constant"})


@bp.get("/ping", name="ping")
@doc("ping")
async def ping(request: Request) -> HTTPResponse:
    return internals.PreEncodedResponse(PING_BODY, '"0"', _PING_HEADERS, JSON_TYPE)


@bp.get("/ready", name="ready")
@doc("ready")
async def ready(request: Request) -> HTTPResponse:
    store = store_of(request)
    if not store.listener_connected:
        raise ApiError(503, "listener not connected")
    if store.warming:
        raise ApiError(503, "cache warming up (one bulk read after a flush)")
    try:
        await store.ping()
    except model.Unavailable:
        raise ApiError(503, "database unavailable") from None
    return json_response({"status": "ready"})


@bp.get("/metrics", name="metrics")
@doc("metrics")
async def metrics_route(request: Request) -> HTTPResponse:
    await request.app.ctx.metrics.sample_database()
    request.app.ctx.metrics.sync()
    body, content_type = metrics.render()
    return HTTPResponse(body, content_type=content_type)


def openapi_document(app: Sanic) -> HTTPResponse:
    from sanic_ext.extensions.openapi.builders import SpecificationBuilder

    return json_response(api_doc.finish(SpecificationBuilder().build(app).serialize()))


@bp.get("/openapi.json", name="openapi_json")
@doc("openapi_json")
async def openapi_json(request: Request) -> HTTPResponse:
    return openapi_document(request.app)


@bp.get("/v1/openapi.json", name="openapi_json_v1")
@doc("openapi_json_v1")
async def openapi_json_v1(request: Request) -> HTTPResponse:
    # Where Frankfurter v1's version document (GET /v1) points: the same document.
    return openapi_document(request.app)


@bp.get("/docs", name="docs")
@doc("docs")
async def docs(request: Request) -> HTTPResponse:
    return HTTPResponse(DOCS_PAGE, content_type=HTML_TYPE, headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- live: stream
# GET /v1/stream: the changes this worker's listener applies, as Server-Sent Events (stream.py).
STREAM_MAX_PAIRS = 500
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start_hub(app: Sanic) -> None:
    app.ctx.hub = app.ctx.store.hub  # registered after start_store: the store exists


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


@bp.get("/v1/stream", name="stream")
@doc("stream")
async def stream_route(request: Request) -> HTTPResponse | None:
    keys, base = parse_stream_selection(request)
    store, hub = store_of(request), request.app.ctx.hub
    try:
        sub = hub.subscribe(keys, base, request.transport)
    except stream.StreamUnavailable as exc:
        raise ApiError(503, str(exc), {"Retry-After": "1"}) from None
    try:
        # Subscribed first, then the snapshot: no change falls between the two, and the
        # deltas it already contains are dropped by version (Subscriber.set_snapshot).
        if keys is not None:
            rates = await store.list_pairs(keys)
        else:
            rates = await store.list_rates(base, None)
        sub.set_snapshot({r.base + r.quote: r.version for r in rates})
        snapshot = list_body(rates)  # the GET /v1/rates body for the selection (§12)
        response = await request.respond(content_type="text/event-stream; charset=utf-8",
                                         headers=STREAM_HEADERS)
        # retry: in the snapshot's own block (a block without data is no event for browsers,
        # but some client libraries hand it out as an empty message).
        await response.send(b"retry: %d\n" % stream.RETRY_MS + stream.frame("snapshot", snapshot))
        hub.events_total += 1
        writer = internals.chunk_writer(response, hub.direct_buffer_limit)
        while True:
            # Nothing queued behind what was sent: the hub writes the events from now on
            # (no await between the last send and this; see Subscriber.go_direct).
            if writer is not None and sub.go_direct(writer):
                writer = None
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


def _static_page(name: str) -> bytes:
    with open(os.path.join(STATIC_DIR, name), "rb") as page:
        return page.read()


DASHBOARD_PAGE = _static_page("dashboard.html")  # read once: served from memory
DOCS_PAGE = _static_page("docs.html")  # Swagger UI reading /openapi.json


@bp.get("/", name="dashboard")
@doc("dashboard")
async def dashboard(request: Request) -> HTTPResponse:
    return HTTPResponse(DASHBOARD_PAGE, content_type=HTML_TYPE,
                        headers={"Cache-Control": "no-cache"})


@bp.get("/v1/instance", name="instance")
@doc("instance")
async def instance(request: Request) -> HTTPResponse:
    store = store_of(request)
    listener, hub = store.listener, request.app.ctx.hub
    history = any(route.path.rstrip("/").endswith("/history") for route in request.app.router.routes)
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
    return answer_rate(request, base, quote, rate, how)


# ----------------------------------------------------------------------------- history: shared
# Responses about fixed past days may be kept by shared caches for a day; anything covering
# today revalidates. Both carry a content ETag, so it changes whenever the content does.
PAST_CACHE = "public, max-age=86400"
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
LOOKBACK_DAYS = 14  # ?date= and Frankfurter's snapping look back this many days
_WIDE = Context(prec=60, rounding=ROUND_HALF_EVEN)  # an inverse before plain()'s one rounding
MAX_SPAN_DAYS = 3652  # /history: end - start at most ten years


def utc_today() -> date:
    return datetime.now(UTC).date()


def days_before(day: date, days: int) -> date:
    """``day - days``, clamped at the first representable date."""
    return day - timedelta(days=days) if day.toordinal() > days else date.min


def parse_day_arg(value: str, field: str) -> date:
    """A query date YYYY-MM-DD; 422 for anything else, and for days that do not exist."""
    if not _ISO_DAY.match(value):
        raise invalid(field, "must be a date YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise invalid(field, "is not a real date") from None


def content_response(request: Request, body: bytes, fixed: bool,
                     content_type: str = JSON_TYPE, etag_of: bytes | None = None
                     ) -> HTTPResponse:
    """200 (or 304 on a matching If-None-Match) with a content ETag (of ``etag_of``, by
    default the body) and the §8 caching."""
    return content_answer(request, body, content_etag(body if etag_of is None else etag_of),
                          fixed, content_type)


def content_etag(data: bytes) -> str:
    """A strong ETag naming ``data`` (a content hash)."""
    return '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


# Content answers are reads with constant header lines but their ETag: pre-encoded, as hits.
_CONTENT_HEADERS = {
    (fixed, content_type): read_template(content_type, PAST_CACHE if fixed else "no-cache")
    for fixed in (False, True) for content_type in (JSON_TYPE, FK_TYPE)
}


def content_answer(request: Request, body: bytes, etag: str, fixed: bool,
                   content_type: str = JSON_TYPE) -> HTTPResponse:
    """``content_response`` with its ETag already made (a memoised answer)."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return HTTPResponse(status=304, headers={
            "ETag": etag, "Cache-Control": PAST_CACHE if fixed else "no-cache"})
    return internals.PreEncodedResponse(body, etag, _CONTENT_HEADERS[(fixed, content_type)],
                                        content_type)


def source_rank(source: str, sources: tuple[str, ...]) -> tuple[int, str]:
    """Priority order: manual, then XRATES_SOURCES order, then any other A-Z."""
    if source == "manual":
        return (0, "")
    if source in sources:
        return (1 + sources.index(source), "")
    return (1 + len(sources), source)


def best_rows_per_day(rows: list[model.HistoryRow], base: str, quote: str,
                      sources: tuple[str, ...]) -> dict[date, model.HistoryRow]:
    """Each day's row for base/quote: the highest-priority source quoting it directly or
    inversely that day (of one source, direct before inverse)."""
    best: dict[date, tuple[tuple[tuple[int, str], int], model.HistoryRow]] = {}
    ranks: dict[str, tuple[int, str]] = {}  # a year of rows comes from a few sources
    for row in rows:
        source_ranked = ranks.get(row.source)
        if source_ranked is None:
            source_ranked = ranks[row.source] = source_rank(row.source, sources)
        rank = (source_ranked, 0 if row.base == base else 1)
        if row.day not in best or rank < best[row.day][0]:
            best[row.day] = (rank, row)
    return {day: row for day, (_, row) in best.items()}


def best_per_day(rows: list[model.HistoryRow], base: str, quote: str,
                 sources: tuple[str, ...]) -> dict[date, tuple[Decimal, str]]:
    """Each day's value of base/quote (best_rows_per_day); the inverse is 1/r."""
    return {day: (row.rate if row.base == base else _WIDE.divide(1, row.rate), row.source)
            for day, row in best_rows_per_day(rows, base, quote, sources).items()}


class DayValue(NamedTuple):
    """A pair's value on one day: exact, the source reported, the intermediates (or [])."""

    day: date
    rate: Fraction
    source: str
    via: list[str]


def paths_per_day(rows: list[model.HistoryRow], base: str, quote: str,
                  sources: tuple[str, ...], *, newest_only: bool = False) -> dict[date, DayValue]:
    """Each day's best path base -> quote over that day's rows alone (legs never mix days),
    ranked by convert.py as /v1/convert ranks paths. Of several sources quoting one pair on a
    day only the highest-priority one is kept, so the graph has one row per pair as convert.py
    expects. The source reported is that of the path's lowest-priority leg (the one that ranks
    it). ``newest_only``: stop at the newest day with a path (?date=)."""
    per_day: dict[date, dict[tuple[str, str], model.HistoryRow]] = {}
    for row in rows:
        pairs = per_day.setdefault(row.day, {})
        kept = pairs.get((row.base, row.quote))
        if kept is None or source_rank(row.source, sources) < source_rank(kept.source, sources):
            pairs[(row.base, row.quote)] = row
    priority = convert_paths.Priority(sources)
    found: dict[date, DayValue] = {}
    for day in sorted(per_day, reverse=True):
        graph = convert_paths.Graph(
            ((r.base, r.quote, r.rate, r.source) for r in per_day[day].values()), priority)
        path = graph.best_path(base, quote)
        if path is None:
            continue
        source = max((leg.row.source for leg in path.legs),
                     key=lambda name: source_rank(name, sources))
        found[day] = DayValue(day, path.rate, source, path.via)
        if newest_only:
            break
    return found


async def value_on_day(store: model.Store, base: str, quote: str, day: date,
                       source: str | None, sources: tuple[str, ...]) -> DayValue | None:
    """The ?date= rule: the newest day of [day - 14, day] on which some source (or only
    ``source``) quotes the pair directly or inversely, its highest-priority such source; only
    if there is none, the newest day of the window with a one-day path (paths_per_day)."""
    start = days_before(day, LOOKBACK_DAYS)
    picked = best_rows_per_day(await model.pair_history(store, base, quote, start, day, source),
                               base, quote, sources)
    if picked:
        row = picked[max(picked)]
        exact = Fraction(row.rate)
        return DayValue(row.day, exact if row.base == base else 1 / exact, row.source, [])
    window = [start + timedelta(days=n) for n in range((day - start).days + 1)]
    rows = await model.path_rows(store, base, quote, window, source)
    paths = paths_per_day(rows, base, quote, sources, newest_only=True)
    return paths[max(paths)] if paths else None


def _history_rate_body(base: str, quote: str, rate: Decimal | Fraction, source: str, day: date,
                       via: list[str]) -> str:
    return (f'{{"base":"{base}","quote":"{quote}","rate":{plain(rate)},'
            f'"source":{json.dumps(source)},"date":"{day.isoformat()}","via":{json.dumps(via)}}}')


# ----------------------------------------------------------------------------- routes: history
def wants_history(request: Request) -> bool:
    """`GET /v1/rates/{base}/{quote}` with ?date= (or ?source=) reads history."""
    return "date" in request.args or "source" in request.args


@functools.lru_cache(maxsize=1024)
def _json_cached(value: str | tuple[str, ...]) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def day_and_source(request: Request) -> tuple[date, str | None]:
    """?date=YYYY-MM-DD (required when ?source= is given) and the optional ?source=."""
    raw_day = query_arg(request, "date")
    if raw_day is None:
        raise invalid("date", "is required with source")
    raw_source = query_arg(request, "source")
    return (parse_day_arg(raw_day, "date"),
            parse_source(raw_source) if raw_source is not None else None)


async def rate_on_day(request: Request, base: str, quote: str) -> HTTPResponse:
    """`?date=YYYY-MM-DD[&source=S]`: the pair's value on the newest day of [date - 14, date]
    on which some source (or S) quotes it directly or inversely."""
    base, quote = parse_pair(base, quote)
    day, source = day_and_source(request)
    found = await value_on_day(store_of(request), base, quote, day, source,
                               settings_of(request).sources)
    if found is None:
        raise ApiError(404, f"no rate for {base}/{quote} within {LOOKBACK_DAYS} days "
                            f"up to {day.isoformat()} (direct, inverse or through up to two "
                            "currencies on one day)")
    body = _history_rate_body(base, quote, found.rate, found.source, found.day,
                              found.via).encode()
    return content_response(request, body, fixed=day < utc_today())


@bp.get("/v1/rates/<base:str>/<quote:str>/history", name="rate_history")
@doc("rate_history")
async def rate_history(request: Request, base: str, quote: str) -> HTTPResponse:
    base, quote = parse_pair(base, quote)
    raw_start, raw_end = query_arg(request, "start"), query_arg(request, "end")
    if raw_start is None:
        raise invalid("start", "is required")
    start = parse_day_arg(raw_start, "start")
    today = utc_today()
    end = parse_day_arg(raw_end, "end") if raw_end is not None else today
    if start > end:
        raise invalid("start", "must not be after end")
    if (end - start).days > MAX_SPAN_DAYS:
        raise invalid("end", f"the range spans more than {MAX_SPAN_DAYS} days")
    raw_source = query_arg(request, "source")
    source = parse_source(raw_source) if raw_source is not None else None
    store, sources = store_of(request), settings_of(request).sources
    rows = await model.pair_history(store, base, quote, start, end, source)
    picked: dict[date, tuple[Decimal | Fraction, str, list[str]]] = {
        day: (rate, used, []) for day, (rate, used) in best_per_day(rows, base, quote,
                                                                      sources).items()}
    # Days without a direct or inverse value get the one-day path rule: one read of all the
    # missing days (not one per day), and none when every day has a value.
    span = (end - start).days + 1
    missing = [] if len(picked) == span else [
        day for day in (start + timedelta(days=n) for n in range(span)) if day not in picked]
    if missing:
        rows_on_missing = await model.path_rows(store, base, quote, missing, source)
        for day, found in paths_per_day(rows_on_missing, base, quote, sources).items():
            picked[day] = (found.rate, found.source, found.via)
    if not picked:
        raise ApiError(404, f"no rate for {base}/{quote} between {start} and {end}")
    days = sorted(picked)
    text = _json_cached  # a few sources and vias, a year of days: encode each once
    items = ",".join(
        f'{{"date":"{day.isoformat()}","rate":{plain(rate)},"source":{text(used)},'
        f'"via":{text(tuple(via)) if via else "[]"}}}'
        for day, (rate, used, via) in ((day, picked[day]) for day in days))
    body = (f'{{"base":"{base}","quote":"{quote}","start_date":"{days[0].isoformat()}",'
            f'"end_date":"{days[-1].isoformat()}","rates":[{items}]}}').encode()
    return content_response(request, body, fixed=end < today)


# ----------------------------------------------------------------------------- routes: Frankfurter v1
# Frankfurter's frozen v1 (https://frankfurter.dev/v1/), under /v1 and unversioned, over one
# source's history (XRATES_FRANKFURTER_SOURCE) rebased to "1 pivot = r code"; the pure rules
# are frankfurter.py's. Its own error dialect: {"message": ...} with v1's statuses, no-store.
@dataclasses.dataclass(frozen=True)
class FrankfurterSource:
    """The source behind the Frankfurter routes and how its rows read as "1 pivot = r code"."""

    name: str
    pivot: str
    pivot_per_foreign: bool

    @classmethod
    def of(cls, name: str) -> FrankfurterSource:
        feed = source_registry.FEEDS.get(name)
        if feed is None:  # demo: EUR -> X, like ECB
            return cls(name, "EUR", False)
        return cls(name, feed.pivot, feed.base_direction == source_registry.PIVOT_PER_FOREIGN)


# v1's routes match only digits in these places; anything else is no route (404).
FK_WHEN_ROUTE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:\.\.(?:[0-9]{4}-[0-9]{2}-[0-9]{2})?)?"


def fk_source(request: Request) -> FrankfurterSource:
    return request.app.ctx.frankfurter


async def on_frankfurter_error(request: Request, exc: frankfurter.FrankfurterError
                               ) -> HTTPResponse:
    return HTTPResponse(json.dumps(exc.body()).encode(), status=exc.status,
                        content_type=FK_TYPE, headers={"Cache-Control": "no-store"})


def fk_args(request: Request) -> frankfurter.QueryArgs:
    return request.get_args(keep_blank_values=True)


async def fk_history(store: model.Store, fk: FrankfurterSource, start: date,
                     end: date) -> frankfurter.History:
    rows = await model.source_days(store, fk.name, fk.pivot, start, end)
    return frankfurter.history_from_rows(((r.day, r.base, r.quote, r.rate) for r in rows),
                                         fk.pivot, fk.pivot_per_foreign)


def fk_response(request: Request, body: Mapping[str, object], fixed: bool) -> HTTPResponse:
    return content_response(request, frankfurter.encode(body), fixed, FK_TYPE)


def fk_routes(routes: tuple[tuple[str, str], ...], documented_as: str
              ) -> Callable[[Callable[..., Awaitable[HTTPResponse]]], Any]:
    """Register one handler under several (path, name) routes, each its own OpenAPI
    operation (stacked route decorators would share one operationId)."""
    def register(impl: Callable[..., Awaitable[HTTPResponse]]) -> Any:
        for path, name in routes:
            async def handler(request: Request, **params: str) -> HTTPResponse:
                return await impl(request, **params)

            handler.__name__ = handler.__qualname__ = name
            bp.add_route(doc(documented_as)(handler), path, methods=["GET"],
                         name=name)
        return impl
    return register


@fk_routes(
    (("/v1/latest", "fk_latest_v1"), ("/v1/current", "fk_current_v1"),
     ("/latest", "fk_latest"), ("/current", "fk_current")),
    "fk_latest",
)
async def fk_latest(request: Request) -> HTTPResponse:
    store, fk = store_of(request), fk_source(request)
    days = await fk_days(store, fk)
    known = days.bodies.get(request.query_string)  # only valid queries are kept
    if known is not None:
        return content_answer(request, *known, fixed=False, content_type=FK_TYPE)
    query = frankfurter.parse_query(fk_args(request))
    if days.newest is None:
        raise frankfurter.FrankfurterError(404, frankfurter.NOT_FOUND)
    body = frankfurter.encode(frankfurter.latest(days.history, fk.pivot, query, days.today))
    etag = content_etag(body)
    days.remember(request.query_string, body, etag)  # made once per query and copy
    return content_answer(request, body, etag, False, FK_TYPE)


async def fk_days(store: model.Store, fk: FrankfurterSource, counted: bool = True
                  ) -> views.SourceDays:
    """The Frankfurter source's newest day and the lookback before it: from memory while it
    is current (model.Store.source_window), else read from the database (``counted``: for a
    request, not the refill)."""
    today = utc_today()

    async def load() -> views.SourceDays:
        newest = await model.source_newest_day(store, fk.name, today)
        history = ({} if newest is None else
                   await fk_history(store, fk, days_before(newest, LOOKBACK_DAYS), newest))
        return views.SourceDays(today, newest, history)

    return await store.source_window(fk.name, today, load, counted)


@fk_routes(
    ((f"/v1/<when:{FK_WHEN_ROUTE}>", "fk_when_v1"), (f"/<when:{FK_WHEN_ROUTE}>", "fk_when")),
    "fk_when",
)
async def fk_when(request: Request, when: str) -> HTTPResponse:
    query = frankfurter.parse_query(fk_args(request), when)  # validates `when` in v1's order
    store, fk, today = store_of(request), fk_source(request), utc_today()
    if ".." not in when:
        day = frankfurter.parse_day(when)
        history = await fk_history(store, fk, days_before(day, LOOKBACK_DAYS), day)
        return fk_response(request, frankfurter.on_day(history, fk.pivot, query, day),
                           day < today)
    start, end = frankfurter.parse_range(when)
    if start > today:
        raise frankfurter.FrankfurterError(404, frankfurter.NOT_FOUND)
    last = today if end is None else end
    first = await model.source_newest_day(store, fk.name, start) or start
    history = await fk_history(store, fk, first, last) if first <= last else {}
    body = frankfurter.series(history, fk.pivot, query, start, end, today)
    return fk_response(request, body, end is not None and end < today)


@fk_routes(
    (("/v1/currencies", "fk_currencies_v1"), ("/currencies", "fk_currencies")),
    "fk_currencies",
)
async def fk_currencies(request: Request) -> HTTPResponse:
    store, fk = store_of(request), fk_source(request)
    days = await fk_days(store, fk)
    codes: set[str] = set()
    if days.newest is not None:
        codes = {code for rates in days.history.values() for code in rates} | {fk.pivot}
    return fk_response(request, frankfurter.currency_names(codes), False)


FK_VERSION_BODY = frankfurter.encode({"version": "v1", "status": "frozen",
                                      "openapi": "/v1/openapi.json", "docs": "/docs"})


@bp.get("/v1", name="fk_version")
@doc("fk_version")
async def fk_version(request: Request) -> HTTPResponse:
    return HTTPResponse(FK_VERSION_BODY, content_type=FK_TYPE,
                        headers={"Cache-Control": "public, max-age=86400"})


# ----------------------------------------------------------------------------- the factory
class DocumentOnly(OpenAPIExtension):
    """sanic-ext's OpenAPI builder without its UI pages (/openapi.json and /docs are ours):
    its start-up banner would otherwise link a UI page that is not there."""

    name = "openapidocument"  # extension names are unique and alphabetic

    def label(self) -> str:
        return ""


def create_app(settings: util.Settings, name: str = "xrates") -> Sanic:
    """The application for these settings: routes, middleware, error maps and lifecycle.
    Nothing reads the environment after load_settings: each worker process calls this with
    the settings its main process resolved (through Sanic's loader)."""
    util.setup_logging(settings)
    app = Sanic(name, log_config=util.sanic_log_config(settings), request_class=XratesRequest)
    app.ctx.settings = settings
    app.ctx.frankfurter = FrankfurterSource.of(settings.frankfurter_source)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.CORS = False  # ours, for reads only: READ_CORS, XratesRequest.respond
    # sanic-ext builds the document; /openapi.json (finished by api_doc) and /docs are ours,
    # so its own UI pages are off (its unfinished copy stays at /_sanic_ext/openapi.json).
    app.config.OAS_URL_PREFIX = "/_sanic_ext"
    app.config.OAS_UI_DEFAULT = None
    app.config.OAS_UI_SWAGGER = False
    app.config.OAS_UI_REDOC = False
    app.config.OAS_IGNORE_OPTIONS = True
    app.config.OAS_IGNORE_HEAD = True
    app.config.MOTD = False
    app.config.KEEP_ALIVE_TIMEOUT = 30
    # OpenAPI (/docs) and the HTTP helpers only. Not sanic-ext's dependency injection, which we
    # do not use and which dispatches a signal on every request (measured here: about 10 us of
    # the 45 us that a constant route cost with it).
    Extend(app, built_in_extensions=False, extensions=[DocumentOnly, HTTPExtension])
    app.ext.openapi.describe(
        "xrates",
        version="0.1.0",
        description="Currency exchange rates served from a LISTEN/NOTIFY-refreshed cache.",
    )
    app.before_server_start(start_store)
    app.before_server_start(start_hub)  # after start_store: the hub is the store's
    app.before_server_stop(end_streams)
    app.after_server_start(freeze_startup_heap)
    app.after_server_stop(stop_store)
    app.exception(frankfurter.FrankfurterError)(on_frankfurter_error)
    app.exception(model.XratesError)(on_xrates_error)
    app.exception(SanicException)(on_sanic_error)
    app.exception(Exception)(on_unexpected)
    app.blueprint(bp)
    app.static("/static", STATIC_DIR, name="static")
    if settings.profile:  # XRATES_PROFILE=1: log every handler's elapsed time
        import perf

        log.info("event=profiling handlers=%d", perf.profile_routes(app))
    return app


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sanic_app.py", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    settings = util.settings_or_exit()
    util.setup_logging(settings)
    try:
        internals.check()  # the private framework internals we rely on behave as assumed
    except internals.InternalsMismatch as exc:
        print(f"xrates: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("xrates: configuration error: --workers must be >= 1", file=sys.stderr)
        return 2
    # Resolve the database once, here: workers must not race to start an embedded server.
    settings = dataclasses.replace(settings, database_url=util.database_url(settings))
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Workers are separate processes: they share metrics through files here
        # (prometheus_client's own switch, read by it at import in every worker).
        directory = tempfile.mkdtemp(prefix="xrates-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    log.info("event=api_start host=%s port=%d workers=%d settings=%r", args.host, args.port,
             args.workers, settings)
    loader = AppLoader(factory=functools.partial(create_app, settings))
    app = loader.load()
    # One worker: serve in this process (no manager process to race at shutdown).
    single = args.workers == 1
    app.prepare(host=args.host, port=args.port, workers=args.workers,
                access_log=settings.access_log, single_process=single)
    if single:
        Sanic.serve_single(primary=app)
    else:
        Sanic.serve(primary=app, app_loader=loader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
