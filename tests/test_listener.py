"""The notification path (the listener connection and its protocol) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import asyncpg
from conftest import wait_for

import listener
import model
import perf
import util
from cache import ABSENT_VERSION


async def _true(value: object) -> bool:
    return bool(value)


class Recorder:
    """A listener.Sink that records what the feed tells it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.ups = 0
        self.downs: list[tuple[float, str]] = []

    def upserted(self, rows) -> None:
        self.events.extend(("u", row[0], row[1]) for row in rows)

    def deleted(self, rows) -> None:
        self.events.extend(("d", row[0], row[1]) for row in rows)

    def flushed(self) -> None:
        self.events.append(("flush",))

    def history_changed(self, sources) -> None:
        self.events.append(("h", sources))

    def barrier_passed(self, number: int) -> None:
        self.events.append(("barrier", number))

    def trusted(self) -> None:
        self.ups += 1

    def untrusted(self, reason: str) -> None:
        self.downs.append((time.monotonic(), reason))


async def test_a_stalled_heartbeat_send_is_found_within_the_timeout(db_url) -> None:
    """Race 2: a heartbeat send that hangs (a partition on the pool's path) must not stop the
    silence check: the listener goes down within the heartbeat timeout plus loop latency."""
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    stalled = asyncio.Event()
    never = asyncio.Event()

    async def send(channel: str, payload: str) -> None:
        if stalled.is_set():
            await never.wait()  # the send hangs
        await pool.execute("SELECT pg_notify($1, $2)", channel, payload)

    recorder = Recorder()
    feed = listener.Feed(db_url, recorder, send, heartbeat_s=0.2, heartbeat_timeout_s=0.6)
    feed.start()
    try:
        await wait_for(lambda: _true(feed.connected), 10, what="listener up")
        stalled.set()
        stalled_at = time.monotonic()
        await wait_for(lambda: _true(recorder.downs), 3, 0.01, "the listener to go down")
        detected_s = recorder.downs[0][0] - stalled_at
        # at most the timeout since the last heartbeat (which came before the stall), plus slack
        assert detected_s < 0.6 + 0.25, f"detected after {detected_s:.2f}s"
    finally:
        never.set()
        await feed.close()
        await pool.close()


def _burn(seconds: float) -> None:
    """CPU work standing in for an expensive apply (not a wait on a condition)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SlowStore(model.Store):
    """A real Store whose apply costs 1 ms a row: a backlog that grows faster than it drains."""

    def upserted(self, rows) -> None:
        _burn(0.001 * len(rows))
        super().upserted(rows)


def _flood(db_url: str, stop: threading.Event) -> None:
    """Bulk upserts from another thread (its own event loop), as fast as the database takes
    them, until told to stop: a producer the slow consumer cannot slow down."""

    async def run() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                await conn.execute(
                    "INSERT INTO rate (base, quote, rate, source, as_of) "
                    "SELECT 'AAA', 'Q' || chr(65 + n / 26) || chr(65 + n % 26), $1, 'manual', now() "
                    "FROM generate_series(0, 19) AS n "
                    "ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate", f"{i}.5")
        finally:
            await conn.close()

    asyncio.run(run())


async def test_a_backlog_that_outgrows_its_drain_takes_the_cache_out_of_service(db_url) -> None:
    """Race 4: liveness counts when a heartbeat has been applied, not when it reached the
    socket, and from its send: a backlog older than the heartbeat timeout means down (bypass),
    not 200 — also while late heartbeats keep leaving it more often than the timeout (a
    producer about twice as fast as the drain, as here on a 2-vCPU machine)."""
    settings = util.load_settings({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0",
                                   "XRATES_HEARTBEAT_INTERVAL": "0.1",
                                   "XRATES_HEARTBEAT_TIMEOUT": "0.5"})
    store = SlowStore(settings)
    await store.start(db_url)
    # Small slices keep event-loop iterations short, so heartbeats are sent and reach the
    # socket on time: only their place behind the backlog can make them late.
    store.listener.slice_rows = 5
    stop = threading.Event()
    producer = threading.Thread(target=_flood, args=(db_url, stop), daemon=True)
    try:
        await wait_for(lambda: _true(store.listener_connected), 10, what="listener up")
        producer.start()
        try:
            await wait_for(lambda: _true(not store.listener_connected), 8, 0.02,
                           "the listener to be declared down behind its backlog")
            assert not store.cache.enabled  # reads bypass the cache meanwhile
        finally:
            stop.set()
            await asyncio.to_thread(producer.join, 10)
        await wait_for(lambda: _true(store.listener_connected), 10, what="listener back")
    finally:
        await store.close()


async def test_heartbeats_do_not_fan_out_to_every_instance(db_url) -> None:
    """Race 6: each instance's heartbeats travel on its own channel (on its one listener
    connection), so L instances do not each receive the heartbeats of all the others."""
    settings = util.load_settings({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0",
                                   "XRATES_HEARTBEAT_INTERVAL": "0.05",
                                   "XRATES_HEARTBEAT_TIMEOUT": "1.0"})
    stores = [model.Store(settings) for _ in range(3)]
    watcher = await asyncpg.connect(db_url)
    shared: list[str] = []
    await watcher.add_listener(model.CHANNEL, lambda _c, _p, _ch, payload: shared.append(payload))
    # One connection receives every channel in commit order: once the marker on its own channel
    # has arrived, so has everything committed on the shared channel before it.
    await watcher.add_listener("xrates_test_marker",
                               lambda _c, _p, _ch, payload: shared.append(payload))
    try:
        for store in stores:
            await store.start(db_url)
        await wait_for(lambda: _true(all(s.listener.heartbeats_sent >= 5 for s in stores)), 10,
                       what="five heartbeats from every instance")
        await watcher.execute("SELECT pg_notify('xrates_test_marker', 'marker')")
        await wait_for(lambda: _true("marker" in shared), 5, what="the marker")
        assert [p for p in shared if p != "marker"] == []  # no heartbeat on the shared channel
    finally:
        await watcher.close()
        for store in stores:
            await store.close()


# --------------------------------------------------------------------------- the backlog
def _payload(first: int, count: int, version: int) -> str:
    codes = perf.pair_keys(first + count)[first:]
    rows = [[b + q, version + i, "1.5", "demo", "2026-11-21T16:00:00+00:00",
             "2026-11-21T16:00:01+00:00"] for i, (b, q) in enumerate(codes)]
    return json.dumps({"op": "u", "rows": rows})


def _heartbeat(number: int) -> str:
    return json.dumps({"n": number, "t": time.time()})


def _fed_store() -> tuple[model.Store, listener.Feed]:
    """A Store trusted by a Feed that is never connected: payloads are handed to it directly,
    as asyncpg's callbacks would."""
    store = model.Store(util.load_settings({"XRATES_CACHE_SIZE": "5000"}))
    feed = listener.Feed("postgresql://unused@127.0.0.1:1/x", store, _never_sent, 0.4, 1.4)
    store.cache.enable()
    return store, feed


async def _never_sent(_channel: str, _payload: str) -> None:
    raise AssertionError("not connected")


async def _drained(feed: listener.Feed) -> None:
    for _ in range(1000):
        if feed.idle:
            return
        await asyncio.sleep(0)  # one event-loop iteration: the drain runs a slice per iteration
    raise AssertionError("the backlog never drained")


async def test_a_burst_of_notifications_is_applied_in_slices_in_order() -> None:
    store, feed = _fed_store()
    for chunk in range(25):  # as asyncpg hands them over: all in one event-loop iteration
        feed.receive(_payload(chunk * 40, 40, 1000 + chunk * 40))
    assert 0 < store.notifications_applied <= listener.SLICE_ROWS + 40  # the rest waits its turn
    await _drained(feed)
    assert store.notifications_applied == 1000
    key = "".join(perf.pair_keys(1000)[999])
    assert store.cache.lookup(key).version == 1999


async def test_a_heartbeat_barrier_waits_behind_the_burst_that_arrived_before_it() -> None:
    # A negative result waiting for heartbeat 1 must not be cached while a change of its key
    # that arrived before the heartbeat is still in the backlog.
    store, feed = _fed_store()
    pairs = perf.pair_keys(1000)
    absent = "".join(pairs[990])  # changed by the last payload of the burst
    token = store.cache.begin_fill(absent)
    store.cache.finish_fill(token, ABSENT_VERSION, None, barrier=1)
    for chunk in range(25):
        feed.receive(_payload(chunk * 40, 40, 5000 + chunk * 40))
    feed.receive_heartbeat(_heartbeat(1))
    assert store.cache.lookup(absent) is None  # not a (stale) negative entry
    await _drained(feed)
    assert store.cache.lookup(absent).value is not None  # the change, not the 404



HISTORY_ROW = ("INSERT INTO rate_history (source, base, quote, day, rate, as_of) "
               "VALUES ($1, 'EUR', 'USD', '2026-11-30', $2, '2026-11-30T16:00:00Z') "
               "ON CONFLICT (source, base, quote, day) DO UPDATE SET rate = EXCLUDED.rate "
               "WHERE rate_history.rate <> EXCLUDED.rate")


async def test_history_changes_reach_the_feed_by_source_in_commit_order(db_url, sql) -> None:
    """triggers.sql's history notifications, on their own channel, through a real feed: the
    sources a statement changed, nothing for a statement that changed no row, null (every
    source) for a TRUNCATE, in commit order with the rate changes."""
    async def send(channel: str, payload: str) -> None:
        await sql.execute("SELECT pg_notify($1, $2)", channel, payload)

    recorder = Recorder()
    feed = listener.Feed(db_url, recorder, send, heartbeat_s=0.2, heartbeat_timeout_s=2.0)
    feed.start()
    try:
        await wait_for(lambda: _true(recorder.ups), 10, what="listener trusted")
        await sql.execute(HISTORY_ROW, "ecb", 1.08)
        await sql.execute(HISTORY_ROW, "ecb", 1.08)  # the same value: no row changes
        await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                          "VALUES ('EUR', 'USD', 1.08, 'ecb', now())")
        await sql.execute(HISTORY_ROW, "boc", 1.09)
        await sql.execute("TRUNCATE rate_history")

        def seen() -> list[tuple]:
            return [e for e in recorder.events if e[0] in ("h", "u")]

        await wait_for(lambda: _true(len(seen()) >= 4), 5, what="four notifications")
        assert [(e[0], e[1]) for e in seen()] == [
            ("h", ["ecb"]), ("u", "EURUSD"), ("h", ["boc"]), ("h", None)]
    finally:
        await feed.close()
