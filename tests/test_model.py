"""model.Store against a real PostgreSQL: own writes guarded like fills, pool release cost."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from conftest import running, store_settings, wait_for

import model
import util

INSERT = ("INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1, $2, $3, 'manual', now()) "
          "ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate")


async def _true(value: object) -> bool:
    return bool(value)


def _settings(db_url: str, cache_size: int, refill: bool = True) -> util.Settings:
    return store_settings(db_url, XRATES_CACHE_SIZE=str(cache_size),
                          XRATES_WARM_REFILL="1" if refill else "0")


@pytest.fixture
async def store(db_url) -> AsyncIterator[model.Store]:
    # No warm refill: these tests drive misses, own writes and flushes by hand (the refill
    # has its own model check in test_cache.py and real-process tests in test_refill.py).
    async with running(model.Store(_settings(db_url, cache_size=1, refill=False)),
                       db_url) as store:
        yield store


async def test_refilled_rates_and_their_entries_are_untracked_by_the_cyclic_gc(db_url, sql) -> None:
    """A full collection walks every tracked object (the event loop stopped meanwhile): a
    cached rate and its entry hold only str, int and bytes, so they are left out."""
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT 'Q' || chr(65 + i / 26 % 26) || chr(65 + i % 26), "
                      "'U' || chr(65 + i / 676) || 'D', 1 + i, 'manual', now() "
                      "FROM generate_series(0, 1999) AS i")
    async with running(model.Store(_settings(db_url, cache_size=2000)), db_url) as store:
        await wait_for(lambda: _true(len(store.cache) == 2000 and not store.warming), 20,
                       what="the warm refill")
        entries = [store.cache.lookup(f"Q{chr(65 + i // 26 % 26)}{chr(65 + i % 26)}"
                                      f"U{chr(65 + i // 676)}D") for i in range(2000)]
        cached = [entry for entry in entries if entry is not None]
        assert len(cached) == 2000
        assert not any(gc.is_tracked(entry) or gc.is_tracked(entry.value) for entry in cached)
        rate = cached[1999].value
        assert (rate.base, rate.quote, rate.rate, rate.etag) == (
            "QYX", "UCD", "2000", f'"{rate.version}"')
        assert json.loads(rate.body)["rate"] == 2000


class GcWatchingStore(model.Store):
    """A real Store that notes whether the cyclic collector was on while each refill ran."""

    def __init__(self, settings: util.Settings) -> None:
        super().__init__(settings)
        self.collector_on_during_refill: list[bool] = []

    async def _refill(self, token):
        self.collector_on_during_refill.append(gc.isenabled())
        return await super()._refill(token)


async def test_a_flush_frees_the_old_entries_in_slices_and_the_refill_runs_with_the_collector_off(
        db_url, sql) -> None:
    """After a flush the old entries are set aside (freeing 65,536 at once stopped the loop
    ~40 ms) and freed a slice per loop iteration until none is left; the refill that follows
    runs with the cyclic collector paused, and it is back on after."""
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT 'Q' || chr(65 + i / 26 % 26) || chr(65 + i % 26), "
                      "'U' || chr(65 + i / 676) || 'D', 1 + i, 'manual', now() "
                      "FROM generate_series(0, 2999) AS i")
    assert gc.isenabled()
    async with running(GcWatchingStore(_settings(db_url, cache_size=4000)), db_url) as store:
        await wait_for(lambda: _true(len(store.cache) == 3000 and not store.warming), 20,
                       what="the warm refill")
        await sql.fetchrow(model.FLUSH_CACHES, model.CHANNEL)
        await wait_for(lambda: _true(len(store.collector_on_during_refill) == 2), 10,
                       what="the refill after the flush")
        await wait_for(lambda: _true(store.cache.retired == 0), 10,
                       what="every flushed entry freed")
        await wait_for(lambda: _true(len(store.cache) == 3000 and not store.warming), 20,
                       what="the cache refilled")
        assert store.collector_on_during_refill == [False, False]
        assert gc.isenabled()


def _refill_key(i: int) -> str:
    return f"Q{chr(65 + i // 26 % 26)}{chr(65 + i % 26)}USD"


@pytest.mark.parametrize("cache_size", [30, 200])
async def test_the_refill_reads_in_batches_and_caches_exactly_the_newest_rows(
        db_url, sql, monkeypatch, cache_size: int) -> None:
    """The refill's one statement is read through a cursor, READ_BATCH rows per round trip,
    so the event loop runs between batches (read whole, 65,536 rows were decoded in one loop
    iteration: a 50-90 ms stall of every request). Across the batches' boundaries no row is
    lost or doubled: a table larger than the cache refills exactly its newest rows, one that
    fits refills whole (and the cache is complete)."""
    monkeypatch.setattr(model, "READ_BATCH", 7)
    fetched: list[int] = []
    real_fetch = asyncpg.cursor.Cursor.fetch

    async def counted_fetch(self, n, **options):
        rows = await real_fetch(self, n, **options)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(asyncpg.cursor.Cursor, "fetch", counted_fetch)
    for i in range(100):  # one transaction each: updated_at (now()) rises with i
        await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                          "VALUES ($1, 'USD', $2, 'manual', now())", _refill_key(i)[:3], i + 1)
    async with running(model.Store(_settings(db_url, cache_size=cache_size)), db_url) as store:
        await wait_for(lambda: _true(not store.warming and len(store.cache) > 0), 20,
                       what="the warm refill")
        cached = {i for i in range(100) if store.cache.lookup(_refill_key(i)) is not None}
        newest = min(cache_size, 100)
        assert cached == set(range(100 - newest, 100))
        assert all(store.cache.lookup(_refill_key(i)).value.rate == str(i + 1) for i in cached)
        assert store.cache.complete == (cache_size > 100)
    assert fetched and max(fetched) <= 7 and sum(fetched) == newest
    assert len(fetched) >= newest // 7


async def test_a_big_list_from_the_database_is_built_a_slice_per_loop_iteration(
        store, sql, monkeypatch) -> None:
    """Building every rate of a list at once stopped the worker for 546 ms on the benchmark's
    66,536 rows: the loop runs between slices of LIST_SLICE, the unfiltered list's statement
    is read in batches, and the list is still every row once, ordered by base, quote."""
    monkeypatch.setattr(model, "LIST_SLICE", 50)
    monkeypatch.setattr(model, "READ_BATCH", 64)
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT 'Q' || chr(65 + i / 26 % 26) || chr(65 + i % 26), 'USD', 1 + i, "
                      "'manual', now() FROM generate_series(399, 0, -1) AS i")
    built = 0
    real_rate_from_record = model.rate_from_record

    def counted(record):
        nonlocal built
        built += 1
        return real_rate_from_record(record)

    monkeypatch.setattr(model, "rate_from_record", counted)
    seen: set[int] = set()

    async def watch() -> None:
        while True:
            seen.add(built)
            await asyncio.sleep(0)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        rates = await store.list_rates(None, None)
    finally:
        watcher.cancel()
    assert [r.base for r in rates] == [_refill_key(i)[:3] for i in range(400)]
    assert [r.rate for r in rates] == [str(i + 1) for i in range(400)]
    assert set(range(50, 400, 50)) <= seen  # the loop ran between every two slices


_GATED = contextvars.ContextVar("gated", default=False)


class GatedRelease:
    """A pool whose release of the gated writer's connection pauses until the test lets it go:
    the gap between a write's commit and its return to the handler, as wide as we like.
    (asyncpg releases in a shielded task, which inherits the writer's context.)"""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    async def reset(self, conn: asyncpg.Connection) -> None:
        if _GATED.get() and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()


async def _gate_pool(store: model.Store, db_url: str) -> GatedRelease:
    gated = GatedRelease()
    old = store.pool
    store.pool = await asyncpg.create_pool(db_url, min_size=0, max_size=4, reset=gated.reset)
    await old.close()
    return gated


async def _cached_version(store: model.Store, key: str) -> int | None:
    entry = store.cache.lookup(key)
    return entry.version if entry is not None else None


@pytest.mark.parametrize("newer", ["update", "delete", "truncate", "reconnect"])
async def test_a_late_own_write_never_replaces_a_newer_state(store, db_url, sql, pg, newer) -> None:
    """Race 1: the write commits, then (before the handler applies it to its own cache) a newer
    change arrives and its entry is evicted; the late own write must not bring back the older
    state, which no notification would ever correct."""
    gated = await _gate_pool(store, db_url)

    async def write() -> tuple[model.Rate, bool]:
        _GATED.set(True)
        return await store.put_rate("USD", "EUR", Decimal("1.00"), "manual", datetime.now(UTC))

    writer = asyncio.create_task(write())
    await asyncio.wait_for(gated.reached.wait(), 5)  # committed, not yet returned
    mine = await sql.fetchval("SELECT version FROM rate WHERE base = 'USD' AND quote = 'EUR'")
    await wait_for(lambda: _true(store.cache.lookup("USDEUR") is not None), 5, what="v1 pushed")
    if newer == "update":
        await sql.execute(INSERT, "USD", "EUR", "2.00")
    elif newer == "delete":
        await sql.execute("DELETE FROM rate WHERE base = 'USD' AND quote = 'EUR'")
    elif newer == "truncate":
        await sql.execute("TRUNCATE rate")
    else:  # the listener drops, a change is made in the gap, the listener comes back
        db = db_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(pg.url)
        try:
            await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            await sql.execute("SELECT pg_terminate_backend($1)", store.listener.backend_pid)
            await wait_for(lambda: _true(not store.listener_connected), 5, what="listener down")
            await sql.execute(INSERT, "USD", "EUR", "2.00")  # its notification is lost
        finally:
            await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            await admin.close()
        await wait_for(lambda: _true(store.listener_connected), 10, what="reconnected")
    if newer in ("update", "delete"):
        await wait_for(lambda: _true(store.cache.lookup("USDEUR") is not None
                                     and store.cache.lookup("USDEUR").version > mine), 5,
                       what="the newer change applied")
        await sql.execute(INSERT, "GBP", "USD", "1.27")  # evicts USDEUR (cache size 1)
        await wait_for(lambda: _true(store.cache.lookup("GBPUSD") is not None), 5,
                       what="eviction")
    await wait_for(lambda: _true(store.cache.lookup("USDEUR") is None), 5, what="USDEUR gone")
    gated.gate.set()
    written, _created = await writer
    assert written.version == mine
    row = await sql.fetchrow("SELECT rate::text AS rate, version FROM rate "
                             "WHERE base = 'USD' AND quote = 'EUR'")
    served, _how = await store.get_rate("USD", "EUR")
    if row is None:
        assert served is None, f"served the deleted v{mine} after a newer {newer}"
    else:
        assert (served.rate, served.version) == (row["rate"], row["version"])


async def test_a_pool_connection_is_returned_without_a_reset_round_trip(store, db_url, sql) -> None:
    """Race 5: pool connections never LISTEN, SET or hold session locks, so releasing one
    must not cost a reset query (a round trip on every miss, write and heartbeat)."""
    await sql.execute(INSERT, "USD", "EUR", "1.00")
    store.cache.flush()
    rate, how = await store.get_rate("USD", "EUR")
    assert (rate.rate, how) == ("1.00", model.MISS)
    db = db_url.rsplit("/", 1)[1]
    queries = [r["query"] for r in await sql.fetch(
        "SELECT query FROM pg_stat_activity WHERE datname = $1 AND application_name = 'xrates-api' "
        "AND state = 'idle'", db)]
    assert queries, "no idle pool connection"
    assert not [q for q in queries if "RESET ALL" in q or "UNLISTEN" in q], queries


class CountingStore(model.Store):
    """A real Store that counts its database reads of single rates; its first read's answer
    is held back until ``first_read_gate`` is set (when there is one)."""

    reads = 0
    first_read_gate: asyncio.Event | None = None

    async def read_rate(self, base: str, quote: str):
        self.reads += 1
        rate = await super().read_rate(base, quote)
        if self.reads == 1 and self.first_read_gate is not None:
            await self.first_read_gate.wait()
        return rate


@pytest.mark.parametrize("present", [True, False], ids=["found", "absent"])
async def test_concurrent_misses_of_one_key_share_one_database_read(db_url, sql, present) -> None:
    if present:
        await sql.execute(INSERT, "USD", "EUR", "1.25")
    # No warm refill: the row is there before the store starts, and this is about misses.
    async with running(CountingStore(_settings(db_url, cache_size=100, refill=False)),
                       db_url) as store:
        results = await asyncio.gather(*(store.get_rate("USD", "EUR") for _ in range(20)))
        assert store.reads == 1
        assert {(r.rate if r else None, how) for r, how in results} == {
            ("1.25" if present else None, model.MISS)}


async def test_a_miss_does_not_share_a_read_that_began_before_a_flush(db_url, sql) -> None:
    """After a change or a flush, a read already in flight may answer with an older state:
    a later miss reads again instead of sharing it."""
    await sql.execute(INSERT, "USD", "EUR", "1.00")
    async with running(CountingStore(_settings(db_url, cache_size=100, refill=False)),
                       db_url) as store:
        store.first_read_gate = asyncio.Event()
        first = asyncio.ensure_future(store.get_rate("USD", "EUR"))
        await wait_for(lambda: _true(store.reads == 1), 5, what="the first read in flight")
        store.cache.flush()  # e.g. a TRUNCATE's flush arrives meanwhile
        second = asyncio.ensure_future(store.get_rate("USD", "EUR"))
        await wait_for(lambda: _true(store.reads == 2), 5, what="a second read, not a shared one")
        store.first_read_gate.set()
        (_, first_how), (rate, how) = await first, await second
        assert (first_how, how, rate.rate) == (model.MISS, model.MISS, "1.00")


def test_the_collector_is_paused_while_refills_run_and_back_on_after_the_last_ends() -> None:
    """A refill cancelled by a flush can end after the next one began: the collector must
    come back on after the last, not after the first, and never if it was off before."""
    import gc

    assert gc.isenabled()
    first, second = model.cyclic_gc_paused(), model.cyclic_gc_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()
    first.__exit__(None, None, None)  # the cancelled one ends first
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()
    gc.disable()
    try:
        with model.cyclic_gc_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()
