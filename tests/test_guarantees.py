"""contract §5, the cache guarantees, against a real PostgreSQL and real API processes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from conftest import (
    ApiProcess,
    answers_200,
    create_database,
    db_name,
    metric,
    running,
    serves_row,
    store_settings,
    wait_for,
)

import model
import util

INSERT = ("INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1, $2, $3, 'manual', now()) "
          "ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate")
DEFAULT_HEARTBEAT = {"XRATES_HEARTBEAT_INTERVAL": "0.4", "XRATES_HEARTBEAT_TIMEOUT": "1.4"}


async def get(api: ApiProcess, base: str, quote: str) -> httpx.Response:
    return await api.client.get(f"/v1/rates/{base}/{quote}")


async def db_state(conn: asyncpg.Connection) -> dict[str, tuple[str, int]]:
    rows = await conn.fetch("SELECT base || quote AS key, rate::text AS rate, version FROM rate")
    return {r["key"]: (r["rate"], r["version"]) for r in rows}


# --------------------------------------------------------------------------- 5.1 push
async def test_push_refresh_reaches_an_instance_that_never_read_the_key(db_url, start_api) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    written = (await a.client.put("/v1/rates/USD/EUR", json={"rate": "0.9213"})).json()
    await wait_for(lambda: _applied(b, 1), 5, what="B applied the notification")
    first = await get(b, "USD", "EUR")
    assert first.headers["x-cache"] == "hit"  # served from memory: no database read
    assert first.json() == written
    assert await metric(b, "xrates_cache_misses_total") == 0


async def _applied(api: ApiProcess, at_least: int) -> bool:
    return await metric(api, "xrates_notifications_applied_total") >= at_least


async def test_sql_writes_and_deletes_are_pushed(db_url, sql, start_api) -> None:
    api = await start_api(db_url)
    await sql.execute(INSERT, "GBP", "USD", "1.27")
    await wait_for(lambda: _applied(api, 1), 5, what="insert applied")
    response = await get(api, "GBP", "USD")
    assert (response.headers["x-cache"], response.json()["rate"]) == ("hit", 1.27)
    await sql.execute("DELETE FROM rate WHERE base = 'GBP'")
    await wait_for(lambda: _applied(api, 2), 5, what="delete applied")
    gone = await get(api, "GBP", "USD")
    assert (gone.status_code, gone.headers["x-cache"]) == (404, "hit")  # a versioned tombstone


# --------------------------------------------------------------------------- 5.2 no stale fill
class GatedStore(model.Store):
    """A real Store whose database read of one key pauses until the test lets it go,
    so the test can put a newer change in between the read and its fill."""

    def __init__(self, settings: util.Settings) -> None:
        super().__init__(settings)
        self.read_done = asyncio.Event()
        self.gate = asyncio.Event()

    async def read_rate(self, base: str, quote: str):
        rate = await super().read_rate(base, quote)
        if base == "USD":
            self.read_done.set()
            await self.gate.wait()
        return rate


@pytest.fixture
async def gated(db_url) -> AsyncIterator[GatedStore]:
    async with running(GatedStore(store_settings(db_url, XRATES_CACHE_SIZE="2")), db_url) as store:
        yield store


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("evict", [False, True], ids=["newer-entry-cached", "newer-entry-evicted"])
async def test_a_read_that_raced_with_a_newer_change_never_overwrites_it(gated, sql, evict) -> None:
    store = gated
    await sql.execute(INSERT, "USD", "EUR", "1.00")
    old_version = await sql.fetchval("SELECT version FROM rate WHERE base = 'USD'")
    await wait_for(lambda: _true(store.cache.lookup("USDEUR") is not None), 5, what="v1 pushed")
    store.cache.flush()  # force the next GET to miss and read the database

    reader = asyncio.create_task(store.get_rate("USD", "EUR"))
    await asyncio.wait_for(store.read_done.wait(), 5)  # its SELECT returned the old row
    await sql.execute(INSERT, "USD", "EUR", "2.00")  # a newer change commits ...
    new_version = await sql.fetchval("SELECT version FROM rate WHERE base = 'USD'")

    def cached_version() -> int | None:
        entry = store.cache.lookup("USDEUR")
        return entry.version if entry else None

    await wait_for(lambda: _true(cached_version() == new_version), 5, what="v2 pushed")
    if evict:  # ... and is evicted by other keys (cache size 2) before the stale fill lands
        applied = store.notifications_applied
        await sql.execute(INSERT, "AAA", "BBB", "1")
        await sql.execute(INSERT, "CCC", "DDD", "1")
        # (no lookups while waiting: a lookup would make USDEUR the most recently used)
        await wait_for(lambda: _true(store.notifications_applied >= applied + 2), 5,
                       what="two more notifications")
        assert store.cache.lookup("USDEUR") is None  # evicted
    store.gate.set()
    rate, how = await reader
    assert (rate.version, how) == (old_version, model.MISS)  # that response was already in flight
    assert cached_version() in (None, new_version)  # but the old row was not cached
    served, _ = await store.get_rate("USD", "EUR")
    assert served.version == new_version and served.rate == "2.00"


# --------------------------------------------------------------------------- 5.3 convergence
async def test_concurrent_writers_and_readers_converge_on_every_instance(db_url, sql,
                                                                        start_api) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    keys = [("USD", "EUR"), ("EUR", "GBP"), ("GBP", "JPY"), ("CHF", "USD"), ("AUD", "NZD")]
    rng = random.Random(7)
    writer_conn = await asyncpg.connect(db_url)

    async def http_writer(api: ApiProcess, n: int) -> None:
        for i in range(n):
            base, quote = rng.choice(keys)
            if rng.random() < 0.2:
                await api.client.delete(f"/v1/rates/{base}/{quote}")
            else:
                response = await api.client.put(f"/v1/rates/{base}/{quote}",
                                                json={"rate": f"{i + 1}.{rng.randint(1, 99)}"})
                # read your own write (5.7): the same instance serves it or something newer
                echo = await get(api, base, quote)
                if echo.status_code == 200:
                    assert echo.json()["version"] >= response.json()["version"]

    async def sql_writer(n: int) -> None:
        for i in range(n):
            base, quote = rng.choice(keys)
            if rng.random() < 0.2:
                await writer_conn.execute("DELETE FROM rate WHERE base = $1 AND quote = $2",
                                          base, quote)
            else:
                await writer_conn.execute(INSERT, base, quote, f"{i + 1}.5")

    async def reader(api: ApiProcess, n: int) -> None:
        for _ in range(n):
            base, quote = rng.choice(keys)
            assert (await get(api, base, quote)).status_code in (200, 404)

    await asyncio.gather(http_writer(a, 60), http_writer(b, 60), sql_writer(60),
                         reader(a, 150), reader(b, 150))
    await writer_conn.close()

    async def converged() -> bool:
        state = await db_state(sql)
        for api in (a, b):
            for base, quote in keys:
                response = await get(api, base, quote)
                expected = state.get(base + quote)
                if expected is None:
                    if response.status_code != 404:
                        return False
                elif response.status_code != 200 or response.json()["version"] != expected[1]:
                    return False
        return True

    await wait_for(converged, 10, 0.05, "every instance to serve the database state")


# --------------------------------------------------------------------------- 5.4 gap safety
async def _listener_pids(conn: asyncpg.Connection, db: str) -> list[int]:
    rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1 "
                            "AND application_name = 'xrates-listener'", db)
    return [r["pid"] for r in rows]


async def test_terminated_listener_bypasses_then_flushes(db_url, sql, pg, start_api) -> None:
    api = await start_api(db_url)
    db = db_name(db_url)
    await sql.execute(INSERT, "USD", "EUR", "1.10")
    await wait_for(lambda: _applied(api, 1), 5, what="first value pushed")
    assert (await get(api, "USD", "EUR")).headers["x-cache"] == "hit"
    admin = await asyncpg.connect(pg.url)
    try:
        # Keep the listener from coming back until we have looked at the gap.
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        [pid] = await _listener_pids(admin, db)
        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await wait_for(lambda: _status(api, "/ready", 503), 5, what="/ready 503")
        await sql.execute(INSERT, "USD", "EUR", "2.20")  # its notification is lost
        during = await get(api, "USD", "EUR")
        assert during.headers["x-cache"] == "bypass"
        assert during.json()["rate"] == 2.2  # read from the database, not the stale cache
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()
    await wait_for(lambda: _status(api, "/ready", 200), 10, what="listener back")
    after = await get(api, "USD", "EUR")
    assert after.json()["rate"] == 2.2  # the cache was flushed: never the pre-gap value
    assert after.headers["x-cache"] in ("miss", "hit")
    await sql.execute(INSERT, "USD", "EUR", "3.30")  # push refresh works again
    await wait_for(lambda: _rate_is(api, "USD", "EUR", 3.3, "hit"), 5, what="push after gap")
    assert await metric(api, "xrates_listener_reconnects_total") >= 1


async def _status(api: ApiProcess, path: str, status: int) -> bool:
    return (await api.client.get(path)).status_code == status


async def _rate_is(api: ApiProcess, base: str, quote: str, rate: float, how: str) -> bool:
    response = await get(api, base, quote)
    return (response.status_code == 200 and response.json()["rate"] == rate
            and response.headers["x-cache"] == how)


async def test_silently_dead_listener_is_found_by_the_heartbeat_within_2s(db_url, sql, start_api
                                                                         ) -> None:
    api = await start_api(db_url, env=DEFAULT_HEARTBEAT)  # the shipped defaults
    db = db_name(db_url)
    await sql.execute(INSERT, "USD", "EUR", "1.10")
    await wait_for(lambda: _applied(api, 1), 5, what="first value pushed")
    [pid] = await _listener_pids(sql, db)
    os.kill(pid, signal.SIGSTOP)  # socket open, nothing delivered: a silent loss
    try:
        stopped_at = time.monotonic()
        await sql.execute(INSERT, "USD", "EUR", "2.20")  # never delivered to that backend
        await wait_for(lambda: _status(api, "/ready", 503), 5, 0.01, "heartbeat to notice")
        detected_s = time.monotonic() - stopped_at
        # 2 s is the guarantee; the margin covers this poll and a loaded CI machine.
        assert detected_s < 2.5, detected_s
        await wait_for(lambda: _status(api, "/ready", 200), 10, what="a new listener")
        assert (await get(api, "USD", "EUR")).json()["rate"] == 2.2  # flushed, not stale
    finally:
        os.kill(pid, signal.SIGCONT)
    pids = await wait_for(lambda: _one_listener(sql, db, exclude=pid), 10, what="old backend gone")
    assert pid not in pids


async def _one_listener(conn: asyncpg.Connection, db: str, exclude: int) -> list[int] | None:
    pids = await _listener_pids(conn, db)
    return pids if len(pids) == 1 and exclude not in pids else None


async def test_postgres_restart_is_survived_without_restarting_the_api(tmp_path, start_api) -> None:
    server = util.EmbeddedPostgres(tmp_path / "pg-restart", durable=False)
    url = server.start()
    try:
        await util.migrate(url)
        api = await start_api(url)
        await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.25"})
        server.stop("fast")
        await wait_for(lambda: _status(api, "/ready", 503), 10, what="/ready 503 while down")
        for path in ("/v1/rates/USD/EUR", "/v1/rates", "/v1/convert?from=USD&to=EUR",
                     "/v1/updates"):
            response = await api.client.get(path)
            assert response.status_code == 503, (path, response.text)
            assert "error" in response.json()
        write = await api.client.put("/v1/rates/USD/EUR", json={"rate": "9"})
        assert write.status_code == 503
        server.start()
        await wait_for(lambda: _status(api, "/ready", 200), 20, what="recovery")
        response = await get(api, "USD", "EUR")
        assert response.status_code == 200 and response.json()["rate"] == 1.25
        conn = await asyncpg.connect(url)
        await conn.execute(INSERT, "USD", "EUR", "1.5")
        await conn.close()
        await wait_for(lambda: _rate_is(api, "USD", "EUR", 1.5, "hit"), 5, what="push after restart")
    finally:
        server.stop("immediate")


# --------------------------------------------------------------------------- 5.5 memory bound
async def test_lru_never_exceeds_its_size(db_url, sql, start_api) -> None:
    api = await start_api(db_url, env={"XRATES_CACHE_SIZE": "5"})
    codes = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF", "GGG"]
    pairs = [(b, q) for b in codes for q in codes if b != q][:30]
    for base, quote in pairs:
        await sql.execute(INSERT, base, quote, "1.5")
    for base, quote in pairs:
        assert (await get(api, base, quote)).status_code == 200
        assert await metric(api, "xrates_cache_size") <= 5
    for base, quote in [("ZZZ", "YYY"), ("YYY", "XXX")]:  # tombstones count too
        assert (await get(api, base, quote)).status_code == 404
    assert await metric(api, "xrates_cache_size") == 5


async def test_cache_size_zero_is_read_through(db_url, sql, start_api) -> None:
    api = await start_api(db_url, env={"XRATES_CACHE_SIZE": "0"})
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    for expected in ("1.1", "1.2", "1.3"):
        await sql.execute(INSERT, "USD", "EUR", expected)
        response = await get(api, "USD", "EUR")
        assert response.headers["x-cache"] == "bypass"
        assert response.json()["rate"] == float(expected)  # no waiting: it is the database
    assert await metric(api, "xrates_cache_size") == 0
    assert (await api.client.get("/ready")).status_code == 200


# --------------------------------------------------------------------------- 5.6 one listener
async def test_exactly_one_listener_connection_per_instance_worker(db_url, sql, start_api) -> None:
    await start_api(db_url)
    await start_api(db_url, workers=2)
    db = db_name(db_url)

    async def listeners() -> int:
        return len(await _listener_pids(sql, db))

    await wait_for(lambda: _equals(listeners(), 3), 10, what="3 listeners")
    names = {r["application_name"] for r in await sql.fetch(
        "SELECT application_name FROM pg_stat_activity WHERE datname = $1", db)}
    assert {"xrates-api", "xrates-listener"} <= names


async def _equals(awaitable, expected) -> bool:
    return (await awaitable) == expected


async def test_heartbeat_is_end_to_end_through_the_pool(db_url, sql, start_api) -> None:
    api = await start_api(db_url)
    db = db_name(db_url)
    # Each instance heartbeats on its own channel (it logs which): watch it from outside.
    [channel] = re.findall(r"heartbeat_channel=(xrates_hb_[0-9a-f]+)", api.log())
    heartbeats: asyncio.Queue = asyncio.Queue()
    watcher = await asyncpg.connect(db_url)
    await watcher.add_listener(channel, lambda _c, pid, _ch, payload: heartbeats.put_nowait(
        (pid, payload)))
    try:
        sender, payload = await asyncio.wait_for(heartbeats.get(), 5)
        assert set(json.loads(payload)) == {"n", "t"}
        name = await sql.fetchval("SELECT application_name FROM pg_stat_activity "
                                  "WHERE pid = $1 AND datname = $2", sender, db)
        assert name == "xrates-api"  # sent through the pool, received by the listener
        await asyncio.wait_for(heartbeats.get(), 5)  # and it keeps coming
    finally:
        await watcher.close()


# --------------------------------------------------------------------------- contract §3 version order
async def test_version_order_under_concurrent_delete_and_reinsert(db_url, sql, start_api) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    events: list[tuple[str, int]] = []
    watcher = await asyncpg.connect(db_url)

    def collect(_c, _pid, _ch, payload: str) -> None:
        message = json.loads(payload)
        for row in message.get("rows", []):
            events.append((message["op"], row[1]))

    await watcher.add_listener(model.CHANNEL, collect)
    conns = [await asyncpg.connect(db_url) for _ in range(6)]
    rng = random.Random(11)
    errors: list[str] = []

    async def hammer(conn: asyncpg.Connection, n: int) -> None:
        for i in range(n):
            choice = rng.random()
            try:
                if choice < 0.4:
                    await conn.execute("DELETE FROM rate WHERE base = 'USD' AND quote = 'EUR'")
                elif choice < 0.8:
                    await conn.execute(INSERT, "USD", "EUR", f"{i + 1}")
                else:
                    await conn.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                                       "VALUES ('USD', 'EUR', 7, 'manual', now())")
            except asyncpg.UniqueViolationError:
                pass  # a plain INSERT over a live row: expected
            except asyncpg.PostgresError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(hammer(c, 80) for c in conns))
    for conn in conns:
        await conn.close()
    assert not errors  # no deadlocks, no other failures

    final = await sql.fetchrow("SELECT version FROM rate WHERE base = 'USD' AND quote = 'EUR'")
    await wait_for(lambda: _true(events and events[-1][1] >= (final["version"] if final else 0)),
                   5, what="last notification")
    await watcher.close()
    versions = [v for _, v in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)  # commit order
    last_op, last_version = events[-1]
    if final is None:
        assert last_op == "d"
    else:
        assert (last_op, last_version) == ("u", final["version"])

    async def both_serve_db() -> bool:
        for api in (a, b):
            if not await serves_row(api, "USD", "EUR", final["version"] if final else None):
                return False
        return True

    await wait_for(both_serve_db, 5, what="no tombstone over a live row, nor the reverse")


# --------------------------------------------------------------------------- overload
async def test_a_database_call_that_hangs_answers_503_fast(db_url, sql, start_api) -> None:
    # Without the refill the cache is never complete, so the list and the absent pair read
    # the database (a complete cache answers both from memory, hang or not).
    api = await start_api(db_url, env={"XRATES_DB_TIMEOUT": "0.5", "XRATES_WARM_REFILL": "0"})
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    blocker = await asyncpg.connect(db_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE rate IN ACCESS EXCLUSIVE MODE")  # every query waits
        for method, path, body in (("GET", "/v1/rates", None), ("GET", "/v1/rates/CHF/JPY", None),
                                   ("PUT", "/v1/rates/USD/EUR", {"rate": 2})):
            started = time.monotonic()
            response = await api.client.request(method, path, json=body)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (path, response.text)
            assert "error" in response.json()
            assert elapsed < 3.0, (path, elapsed)  # bounded by the timeout, never a hang
        cached = await get(api, "USD", "EUR")  # the cache still answers from memory
        assert (cached.status_code, cached.headers["x-cache"]) == (200, "hit")
        await transaction.rollback()
    finally:
        await blocker.close()
    assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": 2})).status_code == 200


async def test_an_unmigrated_database_answers_503_not_500(pg, start_api) -> None:
    url = await create_database(pg, f"xrates_empty_{os.getpid()}_{random.randrange(10**6)}")
    api = await start_api(url, wait=False)  # XRATES_AUTO_MIGRATE=0: nobody creates the schema

    await wait_for(lambda: answers_200(api.client, "/health"), 30, 0.05, "the API to answer")
    assert (await api.client.get("/ready")).status_code == 503
    for path in ("/v1/rates", "/v1/rates/USD/EUR", "/v1/updates"):
        response = await api.client.get(path)
        assert response.status_code == 503, (path, response.text)
    await util.migrate(url)  # the migrate step runs late: the instance recovers by itself
    await wait_for(lambda: _status(api, "/ready", 200), 10, what="ready after migration")
    assert (await api.client.get("/v1/rates")).json() == {"rates": [], "count": 0}


async def test_a_huge_write_is_applied_without_losing_the_listener(db_url, sql, start_api) -> None:
    api = await start_api(db_url, env=DEFAULT_HEARTBEAT)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    codes = [a + b + c for a in letters[:6] for b in letters for c in letters][:3000]
    pairs = [(base, quote) for base in codes[:150] for quote in codes[150:250]]  # 15,000 rows
    await sql.execute(
        "INSERT INTO rate (base, quote, rate, source, as_of) "
        "SELECT b, q, 1.5, 'manual', now() FROM unnest($1::text[], $2::text[]) AS t(b, q)",
        [b for b, _ in pairs], [q for _, q in pairs])
    await wait_for(lambda: _applied(api, len(pairs)), 30, 0.1, "every row applied")
    for base, quote in (pairs[0], pairs[len(pairs) // 2], pairs[-1]):
        response = await get(api, base, quote)
        assert (response.status_code, response.headers["x-cache"]) == (200, "hit")
    assert await metric(api, "xrates_listener_reconnects_total") == 0  # no missed heartbeat
    assert await metric(api, "xrates_listener_connected") == 1


async def test_metrics_are_aggregated_over_workers(db_url, sql, start_api) -> None:
    api = await start_api(db_url, workers=2)  # /ready answered: at least one worker is up
    attempt = 0

    async def both_workers_cache_it() -> bool:  # each worker's listener applies every change
        nonlocal attempt
        attempt += 1
        await sql.execute(INSERT, "USD", "EUR", f"1.{attempt}")
        return await metric(api, "xrates_cache_size") == 2

    await wait_for(both_workers_cache_it, 15, 0.3, "the change cached by both workers")
    for _ in range(40):  # spread over both workers by the kernel
        assert (await get(api, "USD", "EUR")).headers["x-cache"] == "hit"

    async def all_hits_counted() -> bool:  # each worker copies its counters once a second
        return await metric(api, "xrates_cache_hits_total") >= 40

    await wait_for(all_hits_counted, 10, what="hits summed over workers")
    assert await metric(api, "xrates_cache_size") == 2  # one entry in each worker's cache
    assert await metric(api, "xrates_listener_connected") == 1


async def test_the_listener_can_use_its_own_url(db_url, sql, start_api) -> None:
    """XRATES_LISTEN_URL (for a pool behind transaction pooling): the listener, and only it,
    connects with that URL — here as another database role, to tell the two apart."""
    role = f"xrates_listen_{os.getpid()}_{random.randrange(10**6)}"
    await sql.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    listen_url = db_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    api = await start_api(db_url, env={"XRATES_LISTEN_URL": listen_url})
    db = db_name(db_url)
    users = {(r["application_name"], r["usename"]) for r in await sql.fetch(
        "SELECT application_name, usename FROM pg_stat_activity WHERE datname = $1 "
        "AND application_name LIKE 'xrates-%'", db)}
    assert ("xrates-listener", role) in users
    assert ("xrates-api", "postgres") in users
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    await wait_for(lambda: _rate_is(api, "USD", "EUR", 1.1, "hit"), 5, what="push via that URL")


async def test_an_instance_started_before_its_database_waits_for_it(tmp_path, start_api) -> None:
    server = util.EmbeddedPostgres(tmp_path / "pg-late", durable=False)
    url = server.start()
    server.stop("fast")  # the port is known; nothing listens on it now
    try:
        # auto-migrate on (the default): the schema is applied once the database comes
        api = await start_api(url, env={"XRATES_AUTO_MIGRATE": "1"}, wait=False)

        await wait_for(lambda: answers_200(api.client, "/health"), 30, 0.05,
                       "the API to answer without its database")
        assert (await api.client.get("/ready")).status_code == 503
        assert (await get(api, "USD", "EUR")).status_code == 503
        assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": 1})).status_code == 503
        server.start()
        await wait_for(lambda: _status(api, "/ready", 200), 30, what="ready once the database is up")
        assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": 1})).status_code == 201
        assert "event=migrate_deferred" in api.log() and "event=migrated" in api.log()
    finally:
        server.stop("immediate")
