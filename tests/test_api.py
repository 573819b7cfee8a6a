"""The HTTP contract of contract §4 against a real API process and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import pytest
from conftest import ApiProcess, fresh_database, serving, wait_for

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
async def shared(pg, template, tmp_path_factory) -> AsyncIterator[tuple[ApiProcess, str]]:
    """One instance and database for the whole module (tests clean up the pairs they use)."""
    url = await fresh_database(pg, template)
    async with serving(url, tmp_path_factory.mktemp("api")) as api:
        yield api, url


@pytest.fixture
async def api(shared) -> AsyncIterator[httpx.AsyncClient]:
    process, url = shared
    yield process.client
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM rate")
        await conn.execute("DELETE FROM update_run")
    finally:
        await conn.close()


@pytest.fixture
async def db(shared) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(shared[1])
    try:
        yield conn
    finally:
        await conn.close()


async def put(client: httpx.AsyncClient, base: str, quote: str, rate, **extra) -> httpx.Response:
    return await client.put(f"/v1/rates/{base}/{quote}", json={"rate": rate, **extra})


# --------------------------------------------------------------------------- CRUD
async def test_create_read_update_delete_round_trip(api: httpx.AsyncClient) -> None:
    created = await api.post("/v1/rates", json={"base": "usd", "quote": "eur", "rate": "0.9213"})
    assert created.status_code == 201
    assert created.headers["location"] == "/v1/rates/USD/EUR"
    body = created.json()
    assert (body["base"], body["quote"], body["source"]) == ("USD", "EUR", "manual")
    assert created.headers["etag"] == f'"{body["version"]}"'

    read = await api.get("/v1/rates/usd/EUR")
    assert read.status_code == 200
    assert read.json() == body
    assert read.headers["x-cache"] == "hit"  # read-your-own-write: already cached
    assert read.headers["cache-control"] == "no-cache"

    again = await api.post("/v1/rates", json={"base": "USD", "quote": "EUR", "rate": 1})
    assert again.status_code == 409
    assert "error" in again.json()

    updated = await put(api, "USD", "EUR", 0.95, source="ecb", as_of="2026-11-20")
    assert updated.status_code == 200
    assert updated.json()["version"] > body["version"]
    assert updated.json()["as_of"] == "2026-11-20T00:00:00+00:00"
    assert updated.json()["source"] == "ecb"

    deleted = await api.delete("/v1/rates/USD/EUR")
    assert deleted.status_code == 204
    gone = await api.get("/v1/rates/USD/EUR")
    assert gone.status_code == 404
    assert gone.headers["cache-control"] == "no-store"
    assert (await api.delete("/v1/rates/USD/EUR")).status_code == 404


async def test_put_creates_then_updates(api: httpx.AsyncClient) -> None:
    first = await put(api, "GBP", "USD", "1.27")
    assert first.status_code == 201
    assert first.headers["location"] == "/v1/rates/GBP/USD"
    second = await put(api, "GBP", "USD", "1.28")
    assert second.status_code == 200
    assert second.json()["rate"] == 1.28


async def test_exact_decimals_round_trip(api: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    cases = {"AAA": "0.1", "BBB": "0.300000000000004", "CCC": "0.85620",
             "DDD": "0.000000000001", "EEE": "999999999999.999"}
    for base, text in cases.items():
        assert (await put(api, base, "XXX", text)).status_code == 201
    for base, text in cases.items():
        response = await api.get(f"/v1/rates/{base}/XXX")
        raw = response.text
        assert f'"rate":{text},' in raw, raw
        assert json.loads(raw, parse_float=Decimal)["rate"] == Decimal(text)
        assert await db.fetchval("SELECT rate::text FROM rate WHERE base = $1", base) == text
    # a JSON number is kept exactly too (no float on the way)
    response = await api.put("/v1/rates/FFF/XXX", content=b'{"rate": 0.300000000000004}',
                             headers=JSON)
    assert '"rate":0.300000000000004,' in response.text


async def test_list_filters_and_order(api: httpx.AsyncClient) -> None:
    for base, quote in [("USD", "JPY"), ("EUR", "USD"), ("EUR", "GBP"), ("USD", "EUR")]:
        await put(api, base, quote, "1.5")
    everything = (await api.get("/v1/rates")).json()
    assert everything["count"] == 4
    assert [(r["base"], r["quote"]) for r in everything["rates"]] == [
        ("EUR", "GBP"), ("EUR", "USD"), ("USD", "EUR"), ("USD", "JPY")]
    by_base = (await api.get("/v1/rates", params={"base": "eur"})).json()
    assert [(r["base"], r["quote"]) for r in by_base["rates"]] == [("EUR", "GBP"), ("EUR", "USD")]
    both = (await api.get("/v1/rates", params={"base": "USD", "quote": "EUR"})).json()
    assert both["count"] == 1
    assert (await api.get("/v1/rates", params={"base": "EURO"})).status_code == 422


async def test_etag_and_if_none_match(api: httpx.AsyncClient) -> None:
    etag = (await put(api, "CHF", "EUR", "1.05")).headers["etag"]
    not_modified = await api.get("/v1/rates/CHF/EUR", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert (await api.get("/v1/rates/CHF/EUR", headers={"If-None-Match": '"0"'})).status_code == 200
    await put(api, "CHF", "EUR", "1.06")
    changed = await api.get("/v1/rates/CHF/EUR", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag


async def test_x_cache_hit_for_rows_and_for_absent_pairs(api: httpx.AsyncClient,
                                                         db: asyncpg.Connection) -> None:
    # Written straight through SQL: the notification puts it in the cache (push refresh)...
    await db.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                     "VALUES ('SEK', 'NOK', 0.98, 'manual', now())")

    async def cached_row() -> bool:
        again = await api.get("/v1/rates/SEK/NOK")
        return (again.status_code, again.headers["x-cache"]) == (200, "hit")

    await wait_for(cached_row, 5, what="the notified row to be cached")
    # ...and the cache is complete (the start-up refill read the whole table), so an absent
    # pair is a 404 from memory at once.
    absent = await api.get("/v1/rates/PLN/CZK")
    assert (absent.status_code, absent.headers["x-cache"]) == (404, "hit")


async def test_x_cache_miss_then_cached_404_without_a_refill(db_url: str, start_api) -> None:
    # Without the refill the cache never knows the whole table: an absent key is a miss
    # first, then (once the next heartbeat has proved that no change of it was in flight) a
    # cached negative result.
    api = (await start_api(db_url, env={"XRATES_WARM_REFILL": "0"})).client
    first = await api.get("/v1/rates/PLN/CZK")
    assert (first.status_code, first.headers["x-cache"]) == (404, "miss")

    async def cached_404() -> bool:
        again = await api.get("/v1/rates/PLN/CZK")
        assert again.status_code == 404
        return again.headers["x-cache"] == "hit"

    await wait_for(cached_404, 5, what="the negative result to be cached")


# --------------------------------------------------------------------------- convert
async def test_convert_direct_inverse_and_pivot(api: httpx.AsyncClient) -> None:
    await put(api, "EUR", "USD", "1.08")
    await put(api, "EUR", "GBP", "0.85")
    await put(api, "USD", "JPY", "150")
    direct = (await api.get("/v1/convert", params={"from": "EUR", "to": "USD", "amount": "10"})
              ).json()
    assert direct == {"from": "EUR", "to": "USD", "amount": 10, "rate": 1.08, "result": 10.8,
                      "via": []}
    inverse = await api.get("/v1/convert", params={"from": "usd", "to": "eur", "amount": "1.08"})
    body = json.loads(inverse.text, parse_float=Decimal)
    assert body["rate"] == Decimal("0.925925925925926")  # 1/1.08 to 15 significant digits
    assert body["result"] == Decimal("1")  # rounded once at the end, not twice
    assert body["via"] == []
    pivot = json.loads((await api.get("/v1/convert", params={"from": "GBP", "to": "USD"})).text,
                       parse_float=Decimal)
    assert pivot["via"] == ["EUR"]
    assert pivot["rate"] == Decimal("1.27058823529412")  # 1.08 / 0.85, half-even
    two_legs = json.loads((await api.get("/v1/convert", params={"from": "EUR", "to": "JPY"})).text,
                          parse_float=Decimal)
    assert two_legs["via"] == ["USD"]
    assert two_legs["rate"] == Decimal("162")
    missing = await api.get("/v1/convert", params={"from": "GBP", "to": "AUD"})
    assert missing.status_code == 404
    assert "error" in missing.json()


async def test_convert_prefers_eur_then_usd_then_alphabetical(api: httpx.AsyncClient) -> None:
    # AAA→BBB is reachable through CHF, USD and EUR: EUR must win.
    for pivot in ("CHF", "USD", "EUR"):
        await put(api, "AAA", pivot, "2")
        await put(api, pivot, "BBB", "3")
    body = (await api.get("/v1/convert", params={"from": "AAA", "to": "BBB"})).json()
    assert body["via"] == ["EUR"]
    await api.delete("/v1/rates/AAA/EUR")
    assert (await api.get("/v1/convert", params={"from": "AAA", "to": "BBB"})).json()["via"] == [
        "USD"]
    await api.delete("/v1/rates/AAA/USD")
    assert (await api.get("/v1/convert", params={"from": "AAA", "to": "BBB"})).json()["via"] == [
        "CHF"]


# --------------------------------------------------------------------------- headers
async def test_convert_through_two_intermediates(api: httpx.AsyncClient) -> None:
    # GBP→JPY has no pair and no common neighbour: GBP→EUR (inverse), EUR→USD, USD→JPY.
    await put(api, "EUR", "GBP", "0.85")
    await put(api, "EUR", "USD", "1.08")
    await put(api, "USD", "JPY", "150")
    response = await api.get("/v1/convert", params={"from": "GBP", "to": "JPY", "amount": "3"})
    assert response.status_code == 200
    body = json.loads(response.text, parse_float=Decimal)
    assert body["via"] == ["EUR", "USD"]
    assert body["rate"] == Decimal("190.588235294118")  # 1.08 × 150 / 0.85, rounded once
    assert body["result"] == Decimal("571.764705882353")  # from the exact rate, not the rounded
    assert body["amount"] == 3
    back = json.loads((await api.get("/v1/convert", params={"from": "JPY", "to": "GBP"})).text,
                      parse_float=Decimal)
    assert back["via"] == ["USD", "EUR"]
    assert back["rate"] == Decimal("0.00524691358024691")  # 0.85 / (1.08 × 150)
    # A one-intermediate path appears: it wins over the two-intermediate one.
    await put(api, "GBP", "CHF", "1.1")
    await put(api, "CHF", "JPY", "170")
    assert (await api.get("/v1/convert", params={"from": "GBP", "to": "JPY"})).json()["via"] == [
        "CHF"]
    # Three intermediates are too many.
    await put(api, "AAA", "BBB", "2")
    await put(api, "BBB", "CCC", "2")
    await put(api, "CCC", "DDD", "2")
    await put(api, "DDD", "EEE", "2")
    missing = await api.get("/v1/convert", params={"from": "AAA", "to": "EEE"})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": "no rate path from AAA to EEE (direct, inverse or through up to two currencies)"}
    assert (await api.get("/v1/convert", params={"from": "AAA", "to": "DDD"})).json()["via"] == [
        "BBB", "CCC"]


async def test_convert_ranks_a_pair_stored_both_ways_by_priority(api: httpx.AsyncClient) -> None:
    # The module's instance runs with the default XRATES_SOURCES=demo: manual outranks ecb.
    await put(api, "EUR", "USD", "1.08", source="ecb")
    assert (await api.get("/v1/convert", params={"from": "EUR", "to": "USD"})).json()["rate"] == 1.08
    await put(api, "USD", "EUR", "0.8")
    body = (await api.get("/v1/convert", params={"from": "EUR", "to": "USD"})).json()
    assert (body["rate"], body["via"]) == (1.25, [])  # the manual row, inverted
    await put(api, "USD", "EUR", "0.8", source="ecb")
    body = (await api.get("/v1/convert", params={"from": "EUR", "to": "USD"})).json()
    assert (body["rate"], body["via"]) == (1.08, [])  # equal priority: direct first


async def test_cors_is_for_reads_only(api: httpx.AsyncClient) -> None:
    read = await api.get("/health", headers={"Origin": "https://example.com"})
    assert read.headers["access-control-allow-origin"] == "*"
    preflight = await api.options("/v1/rates/USD/EUR", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "PUT"})
    # A real preflight answer (not a 405 without headers) that grants reads and only reads.
    assert preflight.status_code == 204
    allowed = {m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")}
    assert allowed == {"GET", "HEAD", "OPTIONS"}
    assert preflight.headers["access-control-allow-origin"] == "*"
    write = await put(api, "USD", "CAD", "1.36")
    assert "access-control-allow-origin" not in write.headers
    # No route, no grant: a preflight of a path nothing answers is that path's 404.
    nowhere = await api.options("/nope", headers={"Origin": "https://example.com"})
    assert (nowhere.status_code, nowhere.json()) == (404, {"error": "no such route"})
    assert "access-control-allow-origin" not in nowhere.headers


async def test_every_response_has_cache_control(api: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/metrics", "/v1/rates", "/v1/updates", "/nope",
                 "/v1/rates/USD/XYZ", "/openapi.json"):
        response = await api.get(path)
        assert "cache-control" in response.headers, path
    assert (await api.get("/nope")).headers["cache-control"] == "no-store"


async def test_health_ready_metrics(api: httpx.AsyncClient) -> None:
    assert (await api.get("/health")).json() == {"status": "ok"}
    assert (await api.get("/ready")).status_code == 200
    await put(api, "USD", "MXN", "17.1")
    await api.get("/v1/rates/USD/MXN")
    text = (await api.get("/metrics")).text
    for name in ("xrates_cache_size", "xrates_cache_hits_total", "xrates_cache_misses_total",
                 "xrates_notifications_applied_total", "xrates_listener_connected",
                 "xrates_listener_reconnects_total", "xrates_request_duration_seconds_bucket",
                 "xrates_notification_lag_seconds", "xrates_notification_queue_usage",
                 'xrates_gc_longest_pause_seconds{generation="2"}', "xrates_cache_complete",
                 'xrates_view_reads_total{served="memory"}'):
        assert name in text, name
    connected = [line for line in text.splitlines()
                 if line.startswith("xrates_listener_connected")]
    assert connected and connected[0].split()[-1] == "1.0"


async def request_counts(api: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """``xrates_request_duration_seconds_count`` per (route, status), /metrics' own left out."""
    counts = {}
    for line in (await api.get("/metrics")).text.splitlines():
        if line.startswith("xrates_request_duration_seconds_count{"):
            labels, value = line[len("xrates_request_duration_seconds_count{"):].split("} ")
            fields = dict(part.split("=", 1) for part in labels.split(","))
            route, status = fields["route"].strip('"'), fields["status"].strip('"')
            route = route.rsplit(".", 1)[-1]
            if route.endswith("_options"):  # sanic-ext names it after one route of the path
                route = "options"
            if route != "metrics":
                counts[(route, status)] = float(value)
    return counts


async def test_every_request_is_counted_once_by_route_and_status(api: httpx.AsyncClient) -> None:
    """/metrics counts every answer once, whichever way it was made: a handler's, an error's
    (no route, bad input), a preflight's (the automatic OPTIONS route)."""
    await put(api, "USD", "ISK", "138.5")
    before = await request_counts(api)
    for _ in range(3):
        assert (await api.get("/v1/rates/USD/ISK")).status_code == 200
    assert (await api.get("/v1/rates/USD/I5K")).status_code == 422
    assert (await api.get("/nope")).status_code == 404
    assert (await api.options("/v1/rates/USD/ISK")).status_code == 204
    expected = {("rate_get", "200"): 3, ("rate_get", "422"): 1, ("unmatched", "404"): 1,
                ("options", "204"): 1}

    added: dict[tuple[str, str], float] = {}

    async def counted() -> bool:
        after = await request_counts(api)
        added.clear()
        added.update({key: after[key] - before.get(key, 0) for key in after
                      if after[key] != before.get(key, 0)})
        return added == expected

    with contextlib.suppress(AssertionError):  # flushed once a second: wait for it, then compare
        await wait_for(counted, timeout_s=5, what="the requests counted on /metrics")
    assert added == expected


async def test_ping_is_sent_as_a_hit_is(api: httpx.AsyncClient) -> None:
    """The benchmark's ceiling must pay what a hit pays: the same header lines, pre-encoded."""
    await put(api, "USD", "NOK", "10.5")
    hit = await api.get("/v1/rates/USD/NOK")
    ping = await api.get("/ping")
    assert (hit.headers["x-cache"], ping.status_code, ping.json()) == ("hit", 200, {"pong": True})
    assert set(ping.headers) == set(hit.headers)
    assert ping.headers["etag"] == '"0"' and ping.headers["x-cache"] == "constant"


async def test_openapi_is_valid_and_complete(api: httpx.AsyncClient) -> None:
    from openapi_spec_validator import validate

    spec = (await api.get("/openapi.json")).json()
    validate(spec)
    paths = spec["paths"]
    for path, methods in {
        "/v1/rates": ("get", "post"), "/v1/rates/{base}/{quote}": ("get", "put", "delete"),
        "/v1/convert": ("get",), "/v1/updates": ("get", "post"), "/v1/updates/{run_id}": ("get",),
        "/health": ("get",), "/ready": ("get",), "/metrics": ("get",),
    }.items():
        assert path in paths, path
        for method in methods:
            operation = paths[path][method]
            assert operation["responses"], (path, method)
    assert "requestBody" in paths["/v1/rates"]["post"]
    assert (await api.get("/docs")).status_code == 200


# --------------------------------------------------------------------------- updates API
async def test_queue_and_read_update_runs(api: httpx.AsyncClient) -> None:
    queued = await api.post("/v1/updates", json={"sources": ["ecb", "demo"]})
    assert queued.status_code == 202
    run_id = queued.json()["id"]
    assert queued.json()["status"] == "queued"
    run = (await api.get(f"/v1/updates/{run_id}")).json()
    assert run["trigger"] == "manual"
    assert run["progress"] == {"done": 0, "total": 0}
    assert (await api.post("/v1/updates")).status_code == 202  # no body: every source
    runs = (await api.get("/v1/updates", params={"limit": "1"})).json()["updates"]
    assert len(runs) == 1 and runs[0]["id"] > run_id
    assert (await api.get("/v1/updates", params={"status": "queued"})).json()["updates"]
    assert (await api.get("/v1/updates/999999")).status_code == 404


async def test_identical_update_requests_join_the_waiting_run(api: httpx.AsyncClient) -> None:
    # No updater runs here, so requests stay queued.
    first = (await api.post("/v1/updates", json={"sources": ["ecb"]})).json()["id"]
    again = (await api.post("/v1/updates", json={"sources": ["ECB", "ecb"]})).json()["id"]
    assert again == first  # the same request joins the run still waiting
    other = (await api.post("/v1/updates", json={"sources": ["nbu"]})).json()["id"]
    everything = (await api.post("/v1/updates")).json()["id"]
    assert len({first, other, everything}) == 3
    assert (await api.post("/v1/updates")).json()["id"] == everything
    queued = (await api.get("/v1/updates", params={"status": "queued"})).json()["updates"]
    assert len(queued) == 3
