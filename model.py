"""Every SQL statement of xrates, and the cache policy that model.Store drives.

Handlers (sanic_app.py) and the updater call functions here; they never build SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

import asyncpg

import convert
import stream
import util
import views
from cache import ABSENT_VERSION, Entry, FillToken, RateCache, RefillToken, untracked
from listener import CHANNEL, DeleteRow, Feed, UpsertRow

log = logging.getLogger("xrates.model")
T = TypeVar("T")

__all__ = ["CHANNEL"]  # re-exported: the notification channel's name lives in listener.py
RUNS_CHANNEL = "xrates_runs"

HIT, MISS, BYPASS = "hit", "miss", "bypass"

# ----------------------------------------------------------------------------- SQL
# Timestamps as the text to_json gives (ISO 8601 whatever the session's DateStyle, the same text
# the notification payloads carry): a value Python's datetime cannot hold ('infinity', year
# 10000, BC), which plain SQL can store, then still reads, is served as that text (_iso_text).
_RATE_COLUMNS = (
    "base, quote, rate::text AS rate, source, to_json(as_of) #>> '{}' AS as_of, "
    "to_json(updated_at) #>> '{}' AS updated_at, version"
)

SELECT_RATE = f"SELECT {_RATE_COLUMNS} FROM rate WHERE base = $1 AND quote = $2"
SELECT_RATES = (
    f"SELECT {_RATE_COLUMNS} FROM rate "
    "WHERE ($1::text IS NULL OR base = $1) AND ($2::text IS NULL OR quote = $2) "
    "ORDER BY base, quote"
)
# History: a day keeps the newest value a source gave for it; an identical value (or
# an older one of the same day) changes nothing, so re-storing a payload writes no row.
HISTORY_ON_CONFLICT = (
    "ON CONFLICT (source, base, quote, day) DO UPDATE "
    "SET rate = EXCLUDED.rate, as_of = EXCLUDED.as_of, updated_at = now() "
    "WHERE h.rate <> EXCLUDED.rate AND EXCLUDED.as_of >= h.as_of"
)
# The API's writes record their value in the same statement: the CTE `written` runs first
# (the history insert reads it), so the lock order is the rate row, then its history row, as
# in the updater's transaction.
_HISTORY_OF_WRITTEN = (
    "recorded AS (INSERT INTO rate_history AS h (source, base, quote, day, rate, as_of) "
    # `written` returns as_of as text (see _RATE_COLUMNS): read it back as a timestamp
    "SELECT source, base, quote, (as_of::timestamptz AT TIME ZONE 'UTC')::date, rate::numeric, "
    f"as_of::timestamptz FROM written {HISTORY_ON_CONFLICT})"
)
INSERT_RATE = (
    "WITH written AS ("
    "INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1, $2, $3, $4, $5) "
    f"RETURNING {_RATE_COLUMNS}), {_HISTORY_OF_WRITTEN} "
    "SELECT * FROM written"
)
UPSERT_RATE = (
    "WITH written AS ("
    "INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (base, quote) DO UPDATE "
    "SET rate = EXCLUDED.rate, source = EXCLUDED.source, as_of = EXCLUDED.as_of "
    f"RETURNING {_RATE_COLUMNS}, (xmax = 0) AS created), {_HISTORY_OF_WRITTEN} "
    "SELECT * FROM written"
)
DELETE_RATE = "SELECT rate_delete($1, $2)"  # returns the tombstone's version, or NULL
# A delete through the API also removes the pair's manual history entry of the deleted row's
# day (a correction; feed history stays). One transaction: lock the row (taking it before
# rate_delete does keeps the one lock order: rate row, floor row, history row), delete it,
# then drop that day's manual entry.
LOCK_RATE_AS_OF = "SELECT as_of FROM rate WHERE base = $1 AND quote = $2 FOR UPDATE"
DELETE_MANUAL_HISTORY = (
    "DELETE FROM rate_history WHERE source = 'manual' AND base = $1 AND quote = $2 "
    "AND day = ($3::timestamptz AT TIME ZONE 'UTC')::date"
)
NOTIFY = "SELECT pg_notify($1, $2)"
# `python admin.py flush`: every instance forgets its cache (listener.py, op "flush"). For writes
# that bypassed the notify triggers (session_replication_role = replica, DISABLE TRIGGER). The
# fresh version keeps the payload unique (PostgreSQL folds identical payloads of a transaction).
FLUSH_CACHES = (
    "WITH v AS (SELECT nextval('rate_version_seq') AS version) "
    "SELECT version, pg_notify($1, '{\"op\":\"flush\",\"version\":' || version "
    "|| ',\"reason\":\"operator\"}') FROM v"
)
PING = "SELECT 1 FROM rate LIMIT 0"  # also proves the schema is there
NOTIFY_QUEUE_USAGE = "SELECT pg_notification_queue_usage()"
# Live (stream snapshots, read-your-writes): the rates of a set of pairs, and the last version
# issued (0 before the first nextval: last_value is then the start value, not an issued one).
SELECT_RATES_OF_PAIRS = (
    f"SELECT {_RATE_COLUMNS} FROM rate "
    "WHERE (base, quote) IN (SELECT * FROM unnest($1::char(3)[], $2::char(3)[])) ORDER BY base, quote"
)
SELECT_LAST_VERSION = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rate_version_seq"
MIN_VERSION_WAIT_S = 0.25  # how long a min-version read waits for its notification

_RUN_COLUMNS = (
    "id, status, trigger, requested, progress_done, progress_total, sources::text AS sources, "
    "created_at, started_at, finished_at, error"
)
INSERT_MANUAL_RUN = (
    "INSERT INTO update_run (trigger, requested) VALUES ('manual', $1) "
    f"RETURNING {_RUN_COLUMNS}"
)
# POST /v1/updates: a request identical to one still queued joins it instead of queueing
# another run, so repeated requests (a retrying client, an impatient user) cannot pile up
# runs the updater would then execute one after another.
QUEUE_MANUAL_RUN = (
    "WITH waiting AS ("
    f"SELECT {_RUN_COLUMNS} FROM update_run WHERE status = 'queued' AND trigger = 'manual' "
    "AND requested IS NOT DISTINCT FROM $1::text[] ORDER BY id LIMIT 1), "
    "queued AS (INSERT INTO update_run (trigger, requested) SELECT 'manual', $1::text[] "
    f"WHERE NOT EXISTS (SELECT 1 FROM waiting) RETURNING {_RUN_COLUMNS}) "
    "SELECT * FROM queued UNION ALL SELECT * FROM waiting"
)
SELECT_RUN = f"SELECT {_RUN_COLUMNS} FROM update_run WHERE id = $1"
SELECT_RUNS = (
    f"SELECT {_RUN_COLUMNS} FROM update_run "
    "WHERE ($2::text IS NULL OR status = $2) ORDER BY id DESC LIMIT $1"
)

# ----- /v1/convert through intermediates, GET /v1/sources
# Every current rate with its source, for the path search (convert.py): one row per pair, a
# few thousand at most. rate as numeric: asyncpg gives an exact Decimal.
# /v1/convert when the cache is not complete: the rows around a path's two ends, and only if
# they hold no path of at most one intermediate, the rows between their neighbours (views.py
# searches the same rows in memory). Both in one read-only snapshot.
_PATH_COLUMNS = "base, quote, rate, source, version"
ONE_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
SELECT_PATH_ROWS_AROUND = (
    f"SELECT {_PATH_COLUMNS} FROM rate WHERE base IN ($1, $2) OR quote IN ($1, $2)")
SELECT_PATH_ROWS_BETWEEN = (
    f"SELECT {_PATH_COLUMNS} FROM rate WHERE (base = ANY($1::text[]) AND quote = ANY($2::text[])) "
    "OR (base = ANY($2::text[]) AND quote = ANY($1::text[]))")
# The warm refill's one statement: the most recently changed rows the cache can hold.
SELECT_REFILL = f"SELECT {_RATE_COLUMNS} FROM rate ORDER BY updated_at DESC LIMIT $1"
# A big answer (the refill's, an unfiltered list's) is read through a cursor, this many rows
# per round trip: read whole, 65,536 rows arrived within one event-loop iteration (libuv reads
# a readable socket up to 32 times before it returns to the loop) and were decoded there, a
# 50-90 ms stall of every request (`perf.py bench --only refill`).
READ_BATCH = 2000
# Rows offered per loop iteration (about 3 ms of building rates on the benchmark machine):
# the listener and requests run in between.
REFILL_SLICE = 100
# Entries of a flushed cache freed per event-loop iteration (~0.6 ms a thousand here).
SHED_SLICE = 1000
# Rates of a list read from the database built per event-loop iteration (~3 ms here): built
# at once, an unfiltered list of the benchmark's 66,536 rows stopped the worker for 546 ms.
LIST_SLICE = 500
# Per source ($1, in that order): the newest finished run where it had no error (its time and
# the currencies it quoted), the newest where it failed (time and error text), and when the
# leader's next scheduled run is due, only while some session holds the leader lock ($2).
_NEWEST_SOURCE_RESULT = (
    "SELECT finished_at, sources -> s.name AS result FROM update_run "
    "WHERE finished_at IS NOT NULL AND sources ? s.name "
    "AND (sources -> s.name ->> 'error') IS {} NULL "
    "ORDER BY finished_at DESC, id DESC LIMIT 1"
)
SELECT_SOURCE_STATUS = (
    "SELECT s.name, ok.finished_at AS last_success, "
    "(ok.result -> 'currencies')::text AS currencies, "
    "bad.finished_at AS last_error_at, bad.result ->> 'error' AS last_error, "
    "(SELECT next_run FROM updater_schedule WHERE EXISTS ("
    "SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = ($2::bigint >> 32)::oid AND l.objid = ($2::bigint & 4294967295)::oid)"
    ") AS next_run "
    "FROM unnest($1::text[]) WITH ORDINALITY AS s(name, position) "
    f"LEFT JOIN LATERAL ({_NEWEST_SOURCE_RESULT.format('')}) ok ON true "
    f"LEFT JOIN LATERAL ({_NEWEST_SOURCE_RESULT.format('NOT')}) bad ON true "
    "ORDER BY s.position"
)
# The leader's next scheduled run (one row, replaced by each leader at each scheduled run).
RECORD_NEXT_RUN = (
    "INSERT INTO updater_schedule (singleton, next_run, runner) "
    "VALUES (true, now() + $1 * interval '1 second', $2) "
    "ON CONFLICT (singleton) DO UPDATE "
    "SET next_run = EXCLUDED.next_run, runner = EXCLUDED.runner, updated_at = now()"
)


# ----------------------------------------------------------------------------- errors
class XratesError(Exception):
    """Base of the errors a client can cause or must be told about (mapped to HTTP)."""

    status = 500


class NotFound(XratesError):
    status = 404


class Conflict(XratesError):
    status = 409


class TooNewVersion(XratesError):
    """A min version the sequence never issued (a token from another database, or made up)."""

    status = 422


class Unavailable(XratesError):
    """The database is unreachable or a call exceeded its timeout: 503, never a hang."""

    status = 503


# Connection-level failures: the database (or the path to it) is down or overloaded.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.DeadlockDetectedError,  # only once the retries below are used up
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.ConnectionFailureError,
    # The schema is not (yet) migrated, e.g. API pods that started before the migrate job.
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.UndefinedFunctionError,
)


# A statement that lost a deadlock or a serialization conflict was rolled back whole (every
# pooled statement is its own transaction), so running it again is safe; the user's opposite-
# order transaction that won has usually committed by then.
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
RETRY_ATTEMPTS = 3  # attempts in all, within one database timeout
RETRY_BACKOFF_S = 0.005  # first pause (doubled each time), jittered


# ----------------------------------------------------------------------------- values
def iso(ts: datetime) -> str:
    """One canonical text for timestamps, whatever produced them: UTC ISO 8601."""
    return ts.astimezone(UTC).isoformat()


_intern = sys.intern  # currency codes: a few hundred strings shared by every cached rate


class Rate(NamedTuple):
    """One rate as served: its pair, exact rate text and version, plus its JSON body and ETag
    encoded once (the hit path only copies bytes).

    Immutable and small, since the cache holds one per pair: source and timestamps live only
    in the body, and the currency codes are interned. Its fields are all str, int and bytes,
    so make_rate hides it from the cyclic GC (cache.untracked); the LRU then does its entry.
    """

    base: str
    quote: str
    rate: str  # the exact decimal text, as stored
    version: int
    body: bytes
    etag: str

    @property
    def decimal(self) -> Decimal:
        return Decimal(self.rate)


@functools.lru_cache(maxsize=256)
def _json_text(text: str) -> str:
    return json.dumps(text)


@functools.lru_cache(maxsize=1024)
def _iso_text(text: str) -> str:
    """iso() of a timestamp as PostgreSQL's to_json wrote it (in the writer's TimeZone).
    Memoised: a bulk write's rows share their updated_at (and usually their as_of).

    A value outside Python's datetime ('infinity', year 10000, BC) is served as PostgreSQL's
    own text, with one warning line per distinct value (while memoised), rather than failing
    the read (a 500) or the notification (a listener reconnect)."""
    try:
        return iso(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        log.warning("event=timestamp_unparsed value=%r action=served_as_text", text[:40])
        return json.dumps(text)[1:-1]  # inside the body's quotes: escaped like any JSON string


def make_rate(base: str, quote: str, rate: str, source: str, as_of: str, updated_at: str,
              version: int) -> Rate:
    """Build a Rate, untracked, and encode its body once (the hit path only copies bytes)."""
    body = (
        f'{{"base":"{base}","quote":"{quote}","rate":{rate},"source":{_json_text(source)},'
        f'"as_of":"{as_of}","updated_at":"{updated_at}","version":{version}}}'
    ).encode()
    return untracked(Rate(_intern(base), _intern(quote), rate, version, body, f'"{version}"'))


def rate_from_record(rec: asyncpg.Record) -> Rate:
    """A Rate from a row of ``_RATE_COLUMNS`` (timestamps as text)."""
    return make_rate(rec["base"], rec["quote"], rec["rate"], rec["source"],
                     _iso_text(rec["as_of"]), _iso_text(rec["updated_at"]), rec["version"])


def rate_from_notification(row: Sequence[Any]) -> Rate:
    key, version, rate, source, as_of, updated_at = row
    return make_rate(key[:3], key[3:], rate, source, _iso_text(as_of), _iso_text(updated_at),
                     version)


def run_from_record(rec: asyncpg.Record) -> dict[str, Any]:
    """An update run as the API shows it."""
    def ts(value: datetime | None) -> str | None:
        return iso(value) if value is not None else None

    return {
        "id": rec["id"],
        "status": rec["status"],
        "trigger": rec["trigger"],
        "requested": list(rec["requested"]) if rec["requested"] is not None else None,
        "progress": {"done": rec["progress_done"], "total": rec["progress_total"]},
        "sources": json.loads(rec["sources"]),
        "created_at": ts(rec["created_at"]),
        "started_at": ts(rec["started_at"]),
        "finished_at": ts(rec["finished_at"]),
        "error": rec["error"],
    }


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()



def rate_source(rate: Rate) -> str:
    """The source of a served rate (kept only in its body, see Rate)."""
    return json.loads(rate.body)["source"]


def source_status_from_record(rec: asyncpg.Record) -> dict[str, Any]:
    """One row of SELECT_SOURCE_STATUS as GET /v1/sources shows it."""
    def ts(value: datetime | None) -> str | None:
        return iso(value) if value is not None else None

    currencies = json.loads(rec["currencies"]) if rec["currencies"] is not None else []
    last_error = None
    if rec["last_error_at"] is not None:
        last_error = {"message": rec["last_error"], "at": ts(rec["last_error_at"])}
    return {
        "name": rec["name"],
        "currencies": sorted(c for c in currencies if isinstance(c, str)) if isinstance(
            currencies, list) else [],
        "last_success": ts(rec["last_success"]),
        "last_error": last_error,
        "next_run": ts(rec["next_run"]),
    }


# ----------------------------------------------------------------------------- store
_gc_pauses = 0  # cyclic_gc_paused() holders: a cancelled refill may end after the next began
_gc_was_enabled = True


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a warm refill runs (about a second): its bulk
    read makes up to XRATES_CACHE_SIZE tracked Records at once, and every collection meanwhile
    walked them (longest /health stall during a 65,536-row refill 90-95 ms, 28-60 ms with the
    collector off; `perf.py bench --only refill`). Reference counting still frees everything;
    cycles made meanwhile wait for the next collection. Overlapping holders (a cancelled refill
    ending after its successor began) turn it back on only when the last one ends, and only
    if it was on before the first began."""
    global _gc_pauses, _gc_was_enabled
    if _gc_pauses == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_pauses += 1
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0 and _gc_was_enabled:
            gc.enable()


class Store:
    """The rate store of one API instance: data access, and the pure cache it drives from
    its reads, its writes and the notification feed (it is the feed's ``listener.Sink``)."""

    def __init__(self, settings: util.Settings) -> None:
        self.settings = settings
        self.cache = RateCache(settings.cache_size)
        # Lists and conversion paths from the cache while it is complete (views.py).
        self.views = views.MemoryViews(self.cache, convert.Priority(settings.sources),
                                       rate_source)
        # how list, conversion and Frankfurter reads were answered: memory or database
        self.view_outcomes = {"memory": 0, "database": 0}
        # The Frankfurter source's newest days, kept by history notifications (views.py), and
        # the loads a refill runs after the rates' (sanic_app registers the Frankfurter one).
        self.source_windows = views.SourceWindows()
        self.warmers: list[Callable[[], Awaitable[object]]] = []
        self.pool: asyncpg.Pool | None = None
        self.listener: Feed | None = None
        self.timeout_s = settings.db_timeout_s
        self.hits = self.misses = self.bypasses = 0
        self.notifications_applied = 0
        self._closed = False
        self._migrate_task: asyncio.Task | None = None
        # key -> (token, the database read in flight for it): concurrent misses share it
        self._reads: dict[str, tuple[FillToken, asyncio.Future]] = {}
        # The live stream of this worker, fed right after each change is applied (stream.py).
        self.hub = stream.Hub(settings.stream_queue, settings.stream_max)
        # how min-version reads were answered: from the cache at once, after waiting for the
        # notification, or from the database
        self.min_version_outcomes = {"cached": 0, "waited": 0, "database": 0}
        # key -> [(version wanted, future)]: reads with a min version waiting for the stream
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = {}
        self._refill_task: asyncio.Task | None = None
        self._shed_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self, url: str) -> None:
        """Pool first, then the feed (which enables the cache once proven alive)."""
        self.pool = await util.create_pool(url, self.settings)
        if self.settings.auto_migrate and not await self._migrate():
            # The database is not there yet: keep answering 503 (the schema check of /ready
            # fails) and migrate as soon as it comes.
            self._migrate_task = asyncio.get_running_loop().create_task(
                self._migrate_until_done(), name="xrates-migrate")
        # The feed runs even with the cache off: /ready reports on it. It may need its own
        # URL: LISTEN is session state, so it must bypass a transaction-pooling PgBouncer that
        # the pool goes through (XRATES_LISTEN_URL).
        self.listener = Feed(self.settings.listen_url or url, self, self._send_notify,
                             self.settings.heartbeat_s, self.settings.heartbeat_timeout_s)
        self.listener.start()

    async def _migrate(self) -> bool:
        """Apply triggers.sql once; False if the database cannot be reached."""
        try:
            async with asyncio.timeout(self.settings.db_timeout_s * 5):
                assert self.pool is not None  # start() made it
                async with self.pool.acquire() as conn:
                    await util.apply_schema(conn)
            return True
        except _UNAVAILABLE as exc:
            log.warning("event=migrate_deferred reason=%r", f"{type(exc).__name__}: {exc}")
            return False

    async def _migrate_until_done(self, retry_s: float = 1.0) -> None:
        while True:
            if await self._migrate():
                log.info("event=migrated")
                return
            await asyncio.sleep(retry_s)  # a retry period, not a wait for a condition

    async def close(self) -> None:
        """Feed first (it uses the pool for heartbeats), then the pool. Idempotent.

        The pool is terminated, not awaited: the server has drained its requests by now,
        and an awaited close can outlive the worker's event loop at shutdown.
        """
        if self._closed:
            return
        self._closed = True
        if self._migrate_task is not None:
            self._migrate_task.cancel()
        for task in (self._refill_task, self._shed_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.listener is not None:
            await self.listener.close()
        if self.pool is not None:
            self.pool.terminate()
        log.info("event=store_closed")

    def _next_heartbeat(self) -> int:
        listener = self.listener
        return listener.next_heartbeat if listener is not None else 1

    async def _send_notify(self, channel: str, payload: str) -> None:
        await self._execute(NOTIFY, channel, payload)

    # -- the feed's sink (synchronous: called from the listener's callbacks) -------------
    def upserted(self, rows: Sequence[UpsertRow]) -> None:
        cache = self.cache
        hub = self.hub
        if hub.listening:  # one test per payload when nobody streams
            for row in rows:
                rate = rate_from_notification(row)
                cache.apply(row[0], row[1], rate)
                hub.rate(row[0], row[1], rate.body)
        elif cache.enabled:
            for row in rows:
                cache.apply(row[0], row[1], rate_from_notification(row))
        else:  # nothing is stored: skip building the values
            for row in rows:
                cache.apply(row[0], row[1], None)
        self.notifications_applied += len(rows)
        if self._waiters:
            for row in rows:
                self._signal(row[0], row[1])

    def deleted(self, rows: Sequence[DeleteRow]) -> None:
        apply = self.cache.apply
        for key, version in rows:
            apply(key, version, None)
        self.notifications_applied += len(rows)
        hub = self.hub
        if hub.listening:
            for key, version in rows:
                hub.delete(key, version)
        if self._waiters:
            for key, version in rows:
                self._signal(key, version)

    def history_changed(self, sources: Sequence[str] | None) -> None:
        self.source_windows.changed(sources)

    def flushed(self) -> None:
        self.source_windows.changed(None)
        self.cache.flush()
        self._start_shedding()
        self.hub.flushed()
        self._wake_all()  # the entries they wait for are gone: read the database
        self._start_refill()

    def barrier_passed(self, number: int) -> None:
        self.cache.pass_barrier(number)

    def trusted(self) -> None:
        self.source_windows.changed(None)  # a read begun before is not trusted
        self.cache.enable()
        self._start_shedding()
        self.hub.listener_up()
        self._start_refill()

    def untrusted(self, _reason: str) -> None:
        self.source_windows.changed(None)
        self.cache.disable()
        self._start_shedding()
        self.hub.listener_down()
        self._wake_all()  # no notification will come: read the database

    # -- flushed entries are freed in slices ----------------------------------------------
    def _start_shedding(self) -> None:
        if self._shed_task is None or self._shed_task.done():
            self._shed_task = asyncio.get_running_loop().create_task(
                self._shed(), name="xrates-shed")

    async def _shed(self) -> None:
        """Free what flushes set aside, SHED_SLICE entries per event-loop iteration."""
        cache = self.cache
        for _ in iter(lambda: cache.shed(SHED_SLICE), False):
            await asyncio.sleep(0)  # yield: requests and notifications run between slices

    # -- warm refill ----------------------------------------------------------------------
    @property
    def warming(self) -> bool:
        """A refill after the last flush is still running (/ready waits for it)."""
        return self._refill_task is not None and not self._refill_task.done()

    def _start_refill(self) -> None:
        if not self.settings.warm_refill or not self.cache.enabled or self._closed:
            return
        if self._refill_task is not None:
            self._refill_task.cancel()  # its rows are void after this flush anyway
        self._refill_task = asyncio.get_running_loop().create_task(self._refill_logged(),
                                                                  name="xrates-refill")

    async def _refill_logged(self) -> None:
        started = time.perf_counter()
        try:
            stored = await self.refill()
            for warm in self.warmers:
                await warm()
        except Unavailable as exc:  # the cache fills by misses instead
            log.warning("event=refill_failed reason=%r", str(exc))
            return
        log.info("event=refilled rows=%d ms=%.1f complete=%d", stored,
                 (time.perf_counter() - started) * 1000, self.cache.complete)

    async def refill(self) -> int:
        """One bulk read of the most recently changed rows, offered to the cache in slices
        (the listener applies what arrives in between; RateCache.refill_rows decides)."""
        cache = self.cache
        token = cache.begin_refill()
        with cyclic_gc_paused():
            return await self._refill(token)

    async def _refill(self, token: RefillToken) -> int:
        cache = self.cache
        try:
            records = await self._fetch_in_batches(SELECT_REFILL, cache.max_size)
            whole = len(records) < cache.max_size  # the table fits: the cache can be complete
            stored = 0
            for start in range(0, len(records), REFILL_SLICE):
                chunk = records[start:start + REFILL_SLICE]
                # Each slice's records die with it: freeing 65,536 at once took 10-13 ms.
                records[start:start + REFILL_SLICE] = [None] * len(chunk)
                rows = [(r["base"] + r["quote"], r["version"], rate_from_record(r))
                        for r in chunk]
                stored += cache.refill_rows(token, rows, self._next_heartbeat())
                await asyncio.sleep(0)  # one loop iteration: notifications and requests run
        except BaseException:
            cache.end_refill(token)
            raise
        cache.end_refill(token, whole=whole)
        return stored

    # -- database calls -----------------------------------------------------------------
    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        """Run one statement on a pooled connection (see ``_retried``)."""
        async def once(conn: asyncpg.Connection) -> Any:
            return await getattr(conn, method)(sql, *args)

        return await self._retried(once)

    async def _in_transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``work(conn)`` in one transaction on a pooled connection (see ``_retried``)."""
        async def once(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await work(conn)

        return await self._retried(once)

    async def _retried(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection, bounded by the database timeout; errors mapped
        to Conflict/Unavailable. Work that loses a deadlock or a serialization failure was
        rolled back whole, so it is run again (up to ``RETRY_ATTEMPTS`` in all, with a short
        jittered pause), still within that timeout."""
        if self.pool is None:
            raise Unavailable("database not connected yet")
        try:
            async with asyncio.timeout(self.timeout_s):
                for attempt in range(1, RETRY_ATTEMPTS + 1):
                    try:
                        return await self._on_a_connection(work)
                    except _RETRYABLE as exc:
                        if attempt == RETRY_ATTEMPTS:
                            raise
                        log.info("event=statement_retry attempt=%d error=%s", attempt,
                                 type(exc).__name__)
                        pause = RETRY_BACKOFF_S * 2 ** (attempt - 1)
                        await asyncio.sleep(random.uniform(pause / 2, pause))  # de-synchronise
                raise AssertionError("not reached")  # the last attempt returned or raised
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise Conflict("rate already exists") from exc
        except _UNAVAILABLE as exc:
            raise Unavailable(f"database unavailable ({type(exc).__name__})") from exc

    async def _on_a_connection(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        assert self.pool is not None  # _retried checked it
        try:
            conn = await self.pool.acquire()
        except asyncpg.PostgresError as exc:
            # The server refused a new pooled connection (a database not accepting
            # connections, being dropped, or refusing the role): unavailable for now, not a
            # statement of ours that failed.
            raise Unavailable(f"database unavailable ({type(exc).__name__})") from exc
        try:
            return await work(conn)
        finally:
            if conn.is_in_transaction():
                # Only work cut short leaves one open: close the connection rather than
                # pay a ROLLBACK to reuse it.
                conn.terminate()
            await self.pool.release(conn)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._call("fetchrow", sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call("fetch", sql, *args)

    async def _fetch_in_batches(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """``_fetch`` for a big answer: READ_BATCH rows per round trip, in one read-only
        transaction (one statement, one snapshot), the event loop free between the batches.
        Two round trips more than ``_fetch`` (BEGIN, COMMIT): for big answers only."""
        async def read(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            records: list[asyncpg.Record] = []
            async with conn.transaction(readonly=True):  # a cursor lives in a transaction
                cursor = await conn.cursor(sql, *args)
                while batch := await cursor.fetch(READ_BATCH):
                    records += batch
            return records

        return await self._retried(read)

    async def _execute(self, sql: str, *args: Any) -> str:
        return await self._call("execute", sql, *args)

    async def ping(self) -> None:
        await self._call("fetchval", PING)

    async def notification_queue_usage(self) -> float:
        return await self._call("fetchval", NOTIFY_QUEUE_USAGE)

    # -- reads --------------------------------------------------------------------------
    def cached(self, key: str) -> Entry | None:
        """The cache entry of ``key`` (base + quote) if it can be served from memory now,
        counted as a hit; None on a miss or while the cache is bypassed. The hit path of
        ``get_rate`` without a coroutine: callers fall back to ``get_rate`` on None."""
        entry = self.cache.lookup(key)
        if entry is not None:
            self.hits += 1
        return entry

    async def get_rate(self, base: str, quote: str) -> tuple[Rate | None, str]:
        """The current rate of a pair (None if absent) and how it was served."""
        cache = self.cache
        if not cache.enabled:
            self.bypasses += 1
            return await self.read_rate(base, quote), BYPASS
        key = base + quote
        entry = cache.lookup(key)
        if entry is not None:
            self.hits += 1
            return entry.value, HIT
        if cache.complete:  # every row is cached: no entry, no row
            self.hits += 1
            return None, HIT
        shared = self._reads.get(key)
        if shared is not None and cache.unchanged_since(shared[0]):
            # Single flight: a read of this key is in flight and nothing changed since it
            # began, so its answer is as current as a new read's would be; share it.
            self.misses += 1
            return await asyncio.shield(shared[1]), MISS
        token = cache.begin_fill(key)
        read = asyncio.ensure_future(self.read_rate(base, quote))
        read.add_done_callback(_retrieve)  # its error is raised to whoever awaits it, if anyone
        self._reads[key] = (token, read)
        try:
            rate = await asyncio.shield(read)
        except BaseException:
            cache.cancel_fill(token)
            raise
        finally:
            if self._reads.get(key, (None,))[0] is token:
                del self._reads[key]
        # A found row is cached at once (guarded by the next heartbeat as its floor); a 404
        # once that heartbeat proves no change of the key was in flight.
        barrier = self._next_heartbeat()
        if rate is not None:
            cache.finish_fill(token, rate.version, rate, barrier=barrier)
        else:
            cache.finish_fill(token, ABSENT_VERSION, None, barrier=barrier)
        self.misses += 1
        return rate, MISS

    async def read_rate(self, base: str, quote: str) -> Rate | None:
        """The pair's row straight from the database (no cache)."""
        rec = await self._fetchrow(SELECT_RATE, base, quote)
        return rate_from_record(rec) if rec is not None else None

    async def list_rates(self, base: str | None, quote: str | None) -> list[Rate]:
        """The current rates for the filters, ordered by base, quote: from memory while the
        cache is complete, else from the database."""
        rates = self.views.rates(base, quote)
        if rates is not None:
            self.view_outcomes["memory"] += 1
            return rates
        self.view_outcomes["database"] += 1
        if base is not None or quote is not None:
            return await rates_in_slices(await self._fetch(SELECT_RATES, base, quote))
        with cyclic_gc_paused():  # a full collection walked the 66,536 Records: 34 ms
            return await rates_in_slices(await self._fetch_in_batches(SELECT_RATES, None, None))

    # -- writes (each applied to this instance's cache as it returns: read your own writes) --
    async def create_rate(self, base: str, quote: str, rate: Decimal, source: str,
                          as_of: datetime) -> Rate:
        token = self.cache.begin_fill(base + quote)  # before the statement: see finish_write
        rec = await self._guarded(token, self._fetchrow(INSERT_RATE, base, quote, rate, source,
                                                        as_of))
        return self._written(token, rate_from_record(rec))

    async def put_rate(self, base: str, quote: str, rate: Decimal, source: str,
                       as_of: datetime) -> tuple[Rate, bool]:
        """Upsert; returns the stored rate and whether it was created."""
        token = self.cache.begin_fill(base + quote)
        rec = await self._guarded(token, self._fetchrow(UPSERT_RATE, base, quote, rate, source,
                                                        as_of))
        return self._written(token, rate_from_record(rec)), rec["created"]

    async def delete_rate(self, base: str, quote: str) -> int:
        """Delete a pair; its tombstone's version."""
        token = self.cache.begin_fill(base + quote)
        version = await self._guarded(token, self._in_transaction(
            functools.partial(_delete_with_history, base=base, quote=quote)))
        if version is None:
            self.cache.cancel_fill(token)
            raise NotFound(f"no rate for {base}/{quote}")
        self.cache.finish_write(token, version, None, self._next_heartbeat())
        return version

    async def _guarded(self, token: FillToken, statement: Any) -> Any:
        try:
            return await statement
        except BaseException:
            self.cache.cancel_fill(token)
            raise

    def _written(self, token: FillToken, rate: Rate) -> Rate:
        self.cache.finish_write(token, rate.version, rate, self._next_heartbeat())
        return rate

    # -- update runs --------------------------------------------------------------------
    async def queue_run(self, sources: list[str] | None) -> dict[str, Any]:
        """Queue a manual run, or return the identical one already waiting."""
        return run_from_record(await self._fetchrow(QUEUE_MANUAL_RUN, sources))

    async def get_run(self, run_id: int) -> dict[str, Any]:
        rec = await self._fetchrow(SELECT_RUN, run_id)
        if rec is None:
            raise NotFound(f"no update run {run_id}")
        return run_from_record(rec)

    async def list_runs(self, limit: int, status: str | None) -> list[dict[str, Any]]:
        return [run_from_record(r) for r in await self._fetch(SELECT_RUNS, limit, status)]

    # -- /v1/convert through intermediates, GET /v1/sources ------------------------------
    async def conversion_path(self, src: str, dst: str) -> views.PathAnswer:
        """The best path from ``src`` to ``dst`` (convert.py's ranking) and the versions of
        its rows: from memory while the cache is complete, else direct or inverse through
        single-pair reads, then over the rows around its ends read from the database."""
        answer = self.views.path(src, dst)
        if answer is not None:
            self.view_outcomes["memory"] += 1
            return answer
        self.view_outcomes["database"] += 1
        direct = await self._direct_path(src, dst)
        if direct is not None:
            return direct
        records = await self._in_transaction(
            functools.partial(_path_records, src=src, dst=dst, priority=self.views.priority))
        rows = [(r["base"], r["quote"], r["rate"], r["source"]) for r in records.values()]
        path = convert.Graph(rows, self.views.priority).best_path(src, dst)
        if path is None:
            return views.PathAnswer(None, (), None)
        return views.PathAnswer(path, tuple(records[leg.row.base + leg.row.quote]["version"]
                                            for leg in path.legs), path.rate)

    async def source_window(self, source: str, today: date,
                            load: Callable[[], Awaitable[views.SourceDays]],
                            counted: bool = True) -> views.SourceDays:
        """A source's newest days as of ``today``: the in-memory copy while the listener is
        trusted and no change of the source's history arrived since it was read; else
        ``load()`` from the database (kept as the copy if nothing changed meanwhile).
        ``counted``: a read that answers a request (the refill's is not)."""
        windows = self.source_windows
        if self.cache.enabled:
            days = windows.cached(source, today)
            if days is not None:
                self.view_outcomes["memory"] += counted
                return days
        self.view_outcomes["database"] += counted
        generation = windows.generation
        days = await load()
        if self.cache.enabled:
            windows.offer(generation, source, days)
        return days

    async def _direct_path(self, src: str, dst: str) -> views.PathAnswer | None:
        """Direct or inverse through the cache's single-pair reads (hits, or misses that fill
        it); None sends the caller to the full search. When both rows exist, convert.py ranks
        them (priority first, then direct before inverse)."""
        found = [rate for rate in ((await self.get_rate(src, dst))[0],
                                   (await self.get_rate(dst, src))[0]) if rate is not None]
        if not found:
            return None
        rows = [(rate.base, rate.quote, rate.decimal, rate_source(rate) if len(found) == 2 else "")
                for rate in found]
        path = convert.Graph(rows, self.views.priority).best_path(src, dst, 0)
        assert path is not None  # a row of the pair is a path
        chosen = next(rate for rate in found if rate.base == path.legs[0].row.base)
        return views.PathAnswer(path, (chosen.version,), path.rate)

    async def source_status(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """Per source, in ``names`` order: ``currencies`` (sorted codes of its newest
        successful run, [] if none), ``last_success`` (that run's finished_at), ``last_error``
        ({"message", "at"} of its newest failed run, or None) and ``next_run`` (the leader's
        next scheduled run, None while no updater leads). Times are ISO 8601 UTC or None."""
        records = await self._fetch(SELECT_SOURCE_STATUS, list(names), LEADER_LOCK_KEY)
        return [source_status_from_record(r) for r in records]

    # -- health -------------------------------------------------------------------------
    @property
    def listener_connected(self) -> bool:
        return self.listener is not None and self.listener.connected

    # -- live: stream snapshots and read-your-writes ------------------------------------
    async def list_pairs(self, keys: Sequence[str]) -> list[Rate]:
        """The stored rates of these keys (base + quote), ordered by base, quote."""
        recs = await self._fetch(SELECT_RATES_OF_PAIRS, [k[:3] for k in keys], [k[3:] for k in keys])
        return [rate_from_record(r) for r in recs]

    async def last_version(self) -> int:
        """The last version the sequence handed out (0 if none yet)."""
        return await self._call("fetchval", SELECT_LAST_VERSION)

    async def get_rate_at_least(self, base: str, quote: str, version: int,
                                wait_s: float = MIN_VERSION_WAIT_S) -> tuple[Rate | None, str]:
        """The pair's state as of some moment after the write that produced ``version``
        committed (read your writes on any instance), and how it was served.

        From the cache if its entry is at ``version`` or above; else after waiting up to
        ``wait_s`` for the notification; else from the database (a bypass read: never a
        shared or cached older read). TooNewVersion if the sequence never issued ``version``.
        """
        key = base + quote
        outcomes = self.min_version_outcomes
        entry = self.cache.lookup(key)
        if entry is not None and entry.version >= version:
            self.hits += 1
            outcomes["cached"] += 1
            return entry.value, HIT
        last = await self.last_version()
        if version > last:
            raise TooNewVersion(f"min_version: {version} is above the last version issued ({last})")
        if self.cache.enabled and wait_s > 0:
            await self._wait_version(key, version, wait_s)
            entry = self.cache.lookup(key)
            if entry is not None and entry.version >= version:
                self.hits += 1
                outcomes["waited"] += 1
                return entry.value, HIT
        self.bypasses += 1
        outcomes["database"] += 1
        return await self.read_rate(base, quote), BYPASS

    async def _wait_version(self, key: str, version: int, timeout_s: float) -> None:
        """Until a change of ``key`` at ``version`` or above is applied (or the feed is lost,
        or the cache flushed), at most ``timeout_s``."""
        future = asyncio.get_running_loop().create_future()
        item = (version, future)
        waiting = self._waiters.setdefault(key, [])
        waiting.append(item)
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            pass
        finally:
            waiting.remove(item)
            if not waiting:
                self._waiters.pop(key, None)

    def _signal(self, key: str, version: int) -> None:
        for wanted, future in self._waiters.get(key, ()):
            if wanted <= version and not future.done():
                future.set_result(None)

    def _wake_all(self) -> None:
        for waiting in self._waiters.values():
            for _wanted, future in waiting:
                if not future.done():
                    future.set_result(None)


# ===== updater: SQL and functions (updater.py) =====
# The leading updater holds this session-level advisory lock on its own connection
# (a bigint key: distinct from util.SCHEMA_LOCK_KEY and from the two-int keys of the rate triggers).
LEADER_LOCK_KEY = 7_823_011_002
RUN_HISTORY_KEEP = 1000  # finished runs kept (contract §6)

_UPDATER_RUN_COLUMNS = f"{_RUN_COLUMNS}, runner"

TRY_LEADER_LOCK = "SELECT pg_try_advisory_lock($1)"
RELEASE_LEADER_LOCK = "SELECT pg_advisory_unlock($1)"
# A bigint advisory key shows in pg_locks as classid = high 32 bits, objid = low 32 bits, objsubid 1.
SELECT_LEADER = (
    "SELECT l.pid, a.application_name FROM pg_locks l "
    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid"
)

# Only the leader runs jobs, so once a process holds the lock every 'running' run is an orphan.
FAIL_ORPHANED_RUNS = (
    "UPDATE update_run SET status = 'failed', error = $1, finished_at = now() "
    "WHERE status = 'running' RETURNING id, runner"
)
# The oldest queued run (or run $3 when given); SKIP LOCKED so two claimers never block or collide.
CLAIM_QUEUED_RUN = (
    "UPDATE update_run SET status = 'running', started_at = now(), runner = $1, "
    "progress_total = COALESCE(cardinality(requested), $2) "
    "WHERE status = 'queued' AND id = ("
    "SELECT id FROM update_run WHERE status = 'queued' AND ($3::bigint IS NULL OR id = $3) "
    "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) "
    f"RETURNING {_UPDATER_RUN_COLUMNS}"
)
# A run that starts at once (schedule, or --once as leader); status 'running' sends no NOTIFY.
INSERT_STARTED_RUN = (
    "INSERT INTO update_run (trigger, status, started_at, runner, progress_total) "
    "VALUES ($1, 'running', now(), $2, $3) "
    f"RETURNING {_UPDATER_RUN_COLUMNS}"
)
RECORD_SOURCE_RESULT = (
    "UPDATE update_run SET progress_done = progress_done + 1, "
    "sources = sources || jsonb_build_object($2::text, $3::jsonb) "
    "WHERE id = $1 AND status = 'running'"
)
# Guarded by status: a run a successor already declared orphaned keeps that verdict.
FINISH_RUN = (
    "UPDATE update_run SET status = $2, error = $3, finished_at = now() "
    "WHERE id = $1 AND status = 'running' "
    f"RETURNING {_UPDATER_RUN_COLUMNS}"
)
SELECT_UPDATER_RUN = f"SELECT {_UPDATER_RUN_COLUMNS} FROM update_run WHERE id = $1"
# Queued and running runs are never deleted: they are requests not yet answered.
DELETE_OLD_RUNS = (
    "DELETE FROM update_run WHERE status IN ('succeeded', 'failed') AND id < "
    "(SELECT id FROM update_run ORDER BY id DESC OFFSET $1 - 1 LIMIT 1)"
)

# The stored rows for a feed's pairs (char(3) arrays so the primary key index is used).
SELECT_STORED_RATES = (
    "SELECT base, quote, rate, source, as_of FROM rate "
    "WHERE (base, quote) IN (SELECT * FROM unnest($1::char(3)[], $2::char(3)[]))"
)
# One bulk upsert per source run. A row changes only if its source does not outrank the feed
# ($5 lists the sources that do), the rate differs and as_of is not older (contract §3); unchanged
# rows are not rewritten, so they draw no version and send no notification.
UPSERT_FEED_RATES = (
    "INSERT INTO rate (base, quote, rate, source, as_of) "
    "SELECT b, q, r, $4, a FROM unnest($1::text[], $2::text[], $3::numeric[], $6::timestamptz[]) "
    "AS t(b, q, r, a) "
    "ON CONFLICT (base, quote) DO UPDATE "
    "SET rate = EXCLUDED.rate, source = EXCLUDED.source, as_of = EXCLUDED.as_of "
    "WHERE rate.source <> ALL($5::text[]) AND rate.rate <> EXCLUDED.rate "
    "AND EXCLUDED.as_of >= rate.as_of "
    "RETURNING base, quote"
)


async def try_leader_lock(conn: asyncpg.Connection) -> bool:
    """Take the leader lock on this (dedicated) connection if no session holds it."""
    return await conn.fetchval(TRY_LEADER_LOCK, LEADER_LOCK_KEY)


async def release_leader_lock(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval(RELEASE_LEADER_LOCK, LEADER_LOCK_KEY)


async def leader(conn: asyncpg.Connection) -> asyncpg.Record | None:
    """The session holding the leader lock in this database (pid, application_name), or None."""
    return await conn.fetchrow(SELECT_LEADER, LEADER_LOCK_KEY)


async def fail_orphaned_runs(conn: asyncpg.Connection, error: str) -> list[asyncpg.Record]:
    """Mark every 'running' run failed with ``error``; the (id, runner) of each."""
    return await conn.fetch(FAIL_ORPHANED_RUNS, error)


async def claim_queued_run(conn: asyncpg.Connection, runner: str, default_total: int,
                           run_id: int | None = None) -> asyncpg.Record | None:
    """Start the oldest queued run (or run ``run_id``) as ``runner``; None if there is none."""
    return await conn.fetchrow(CLAIM_QUEUED_RUN, runner, default_total, run_id)


async def insert_started_run(conn: asyncpg.Connection, trigger: str, runner: str,
                             total: int) -> asyncpg.Record:
    return await conn.fetchrow(INSERT_STARTED_RUN, trigger, runner, total)


async def record_source_result(conn: asyncpg.Connection, run_id: int, source: str,
                               result: dict[str, Any]) -> None:
    """Count one more source done and store its {fetched, changed, error, currencies}."""
    await conn.execute(RECORD_SOURCE_RESULT, run_id, source, json.dumps(result))


async def finish_run(conn: asyncpg.Connection, run_id: int, status: str,
                     error: str | None) -> asyncpg.Record | None:
    """Close a running run; None if it was no longer running (a successor failed it)."""
    return await conn.fetchrow(FINISH_RUN, run_id, status, error)


async def get_updater_run(conn: asyncpg.Connection, run_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(SELECT_UPDATER_RUN, run_id)


async def record_next_run(conn: asyncpg.Connection, in_s: float, runner: str) -> None:
    """The leader's next scheduled run is due ``in_s`` seconds from now (GET /v1/sources)."""
    await conn.execute(RECORD_NEXT_RUN, in_s, runner)


async def queue_manual_run(conn: asyncpg.Connection,
                           sources: Sequence[str] | None = None) -> asyncpg.Record:
    """What POST /v1/updates does: a queued manual run (NOTIFYs the leader)."""
    return await conn.fetchrow(INSERT_MANUAL_RUN, list(sources) if sources is not None else None)


async def delete_old_runs(conn: asyncpg.Connection, keep: int = RUN_HISTORY_KEEP) -> int:
    """Delete finished runs older than the newest ``keep`` runs; how many were deleted."""
    status = await conn.execute(DELETE_OLD_RUNS, keep)
    return int(status.rsplit(" ", 1)[1])


async def stored_rates(conn: asyncpg.Connection,
                       pairs: Sequence[tuple[str, str]]) -> list[asyncpg.Record]:
    """The stored (base, quote, rate, source, as_of) of these pairs (rate as Decimal)."""
    return await conn.fetch(SELECT_STORED_RATES, [b for b, _ in pairs], [q for _, q in pairs])


async def upsert_feed_rates(conn: asyncpg.Connection, source: str,
                            rows: Sequence[tuple[str, str, Decimal, datetime]],
                            outranking: Sequence[str]) -> int:
    """Bulk upsert a feed's (base, quote, rate, as_of) rows; how many rows changed."""
    changed = await conn.fetch(
        UPSERT_FEED_RATES,
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], source,
        list(outranking), [r[3] for r in rows],
    )
    return len(changed)


# ===== history: SQL and functions (history, Frankfurter routes) =====
# The updater's history write: every day of a payload (deduplicated per day by the caller, as
# one INSERT ... ON CONFLICT may not touch a row twice), in the source run's transaction, after
# the current-table upsert (the API's lock order: rate rows, then history rows).
UPSERT_FEED_HISTORY = (
    "INSERT INTO rate_history AS h (source, base, quote, day, rate, as_of) "
    "SELECT $1, b, q, (a AT TIME ZONE 'UTC')::date, r, a "
    "FROM unnest($2::text[], $3::text[], $4::numeric[], $5::timestamptz[]) AS t(b, q, r, a) "
    f"{HISTORY_ON_CONFLICT} "
    "RETURNING 1"
)
# A backfill run starts at once, like a scheduled one, and names its sources.
INSERT_BACKFILL_RUN = (
    "INSERT INTO update_run (trigger, status, started_at, runner, requested, progress_total) "
    "VALUES ('backfill', 'running', now(), $1, $2::text[], cardinality($2::text[])) "
    f"RETURNING {_UPDATER_RUN_COLUMNS}"
)
HAS_HISTORY = "SELECT EXISTS (SELECT 1 FROM rate_history WHERE source = $1)"
# A pair in both directions over a day range, every source (or only $5): the ?date= and
# /history reads (index rate_history_pair_day, one range per direction).
SELECT_PAIR_HISTORY = (
    "SELECT day, base, quote, rate::text AS rate, source FROM rate_history "
    "WHERE ((base = $1 AND quote = $2) OR (base = $2 AND quote = $1)) "
    "AND day BETWEEN $3 AND $4 AND ($5::text IS NULL OR source = $5) "
    "ORDER BY day"
)
# One source's newest day on or before $2 (index rate_history_source_day).
SELECT_SOURCE_NEWEST_DAY = (
    "SELECT max(day) FROM rate_history WHERE source = $1 AND day <= $2"
)
# One source's rows against its pivot ($4) over a day range (the Frankfurter routes).
SELECT_SOURCE_DAYS = (
    "SELECT day, base, quote, rate::text AS rate FROM rate_history "
    "WHERE source = $1 AND day BETWEEN $2 AND $3 AND (base = $4 OR quote = $4)"
)

# The one-day path fallback's read: on each of the days $3, every source's rows (or only $4's)
# that can be a leg of a path $1 -> $2 through at most two intermediates: those touching $1 or
# $2, and those between two currencies one leg from $1 or $2 that day (a middle leg). The
# distinct sources come from a loose index scan of the primary key (source first), so each
# source's days are read through rate_history_source_day and not by a scan of every day.
SELECT_PATH_ROWS = (
    "WITH RECURSIVE srcs(s) AS ("
    " SELECT min(source) FROM rate_history WHERE $4::text IS NULL OR source = $4"
    " UNION ALL"
    " SELECT (SELECT min(source) FROM rate_history WHERE source > s AND $4::text IS NULL)"
    " FROM srcs WHERE s IS NOT NULL"
    "), w AS MATERIALIZED ("
    " SELECT h.day, h.base, h.quote, h.rate, h.source FROM srcs"
    " JOIN rate_history h ON h.source = srcs.s AND h.day = ANY($3::date[])"
    "), near AS ("
    " SELECT DISTINCT day, CASE WHEN base IN ($1, $2) THEN quote ELSE base END AS code"
    " FROM w WHERE base IN ($1, $2) OR quote IN ($1, $2)"
    ") "
    "SELECT day, base, quote, rate::text AS rate, source FROM w "
    "WHERE base IN ($1, $2) OR quote IN ($1, $2) "
    "OR (EXISTS (SELECT 1 FROM near n WHERE n.day = w.day AND n.code = w.base) "
    "AND EXISTS (SELECT 1 FROM near n WHERE n.day = w.day AND n.code = w.quote))"
)


class HistoryRow(NamedTuple):
    """One stored history value: on `day`, 1 `base` cost `rate` `quote` (exact decimal)."""

    day: date
    base: str
    quote: str
    rate: Decimal
    source: str


def history_rows_of(quotes: Sequence[Any]) -> list[tuple[str, str, Decimal, datetime]]:
    """(base, quote, rate, as_of) per (pair, UTC day) of a payload's quotes: the newest as_of
    of each day (of equals, the first), sorted by pair and day so writers lock in one order."""
    kept: dict[tuple[str, str, date], Any] = {}
    for quote in quotes:
        key = (quote.base, quote.quote, quote.as_of.astimezone(UTC).date())
        if key not in kept or quote.as_of > kept[key].as_of:
            kept[key] = quote
    return [(q.base, q.quote, q.rate, q.as_of) for _, q in sorted(kept.items(),
                                                                  key=lambda item: item[0])]


async def upsert_feed_history(conn: asyncpg.Connection, source: str,
                              rows: Sequence[tuple[str, str, Decimal, datetime]]) -> int:
    """Store (base, quote, rate, as_of) rows as ``source``'s history (one row per pair and
    day, see history_rows_of); how many rows were inserted or changed."""
    if not rows:
        return 0
    changed = await conn.fetch(
        UPSERT_FEED_HISTORY, source,
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
    )
    return len(changed)


async def insert_backfill_run(conn: asyncpg.Connection, runner: str,
                              names: Sequence[str]) -> asyncpg.Record:
    """A started run with trigger ``backfill`` for these sources."""
    return await conn.fetchrow(INSERT_BACKFILL_RUN, runner, list(names))


async def has_history(conn: asyncpg.Connection, source: str) -> bool:
    """Whether ``source`` has any history yet (admin.py up: the demo backfill runs once)."""
    return await conn.fetchval(HAS_HISTORY, source)


async def rates_in_slices(records: list[asyncpg.Record]) -> list[Rate]:
    """The records' rates, LIST_SLICE per event-loop iteration (other requests and the
    listener run in between; the rows are still one statement's snapshot)."""
    rates: list[Rate] = []
    for start in range(0, len(records), LIST_SLICE):
        if start:
            await asyncio.sleep(0)
        rates += [rate_from_record(r) for r in records[start:start + LIST_SLICE]]
    return rates


async def _path_records(conn: asyncpg.Connection, *, src: str, dst: str,
                        priority: convert.Priority) -> dict[str, asyncpg.Record]:
    """The rows a path from ``src`` to ``dst`` can use (see SELECT_PATH_ROWS_AROUND), by key,
    read in one snapshot (the caller's transaction, made repeatable here)."""
    await conn.execute(ONE_SNAPSHOT)
    records = {r["base"] + r["quote"]: r
               for r in await conn.fetch(SELECT_PATH_ROWS_AROUND, src, dst)}
    rows = [(r["base"], r["quote"], r["rate"], r["source"]) for r in records.values()]
    if convert.Graph(rows, priority).best_path(src, dst, 1) is not None:
        return records
    near: dict[str, set[str]] = {src: set(), dst: set()}
    for key in records:
        base, quote = key[:3], key[3:]
        for end, other in ((base, quote), (quote, base)):
            if end in near:
                near[end].add(other)
    near_src, near_dst = near[src] - {dst}, near[dst] - {src}
    if near_src and near_dst:
        for r in await conn.fetch(SELECT_PATH_ROWS_BETWEEN, list(near_src), list(near_dst)):
            records[r["base"] + r["quote"]] = r
    return records


async def _delete_with_history(conn: asyncpg.Connection, *, base: str, quote: str) -> int | None:
    """Store.delete_rate's transaction: the tombstone version, or None if there was no row."""
    as_of = await conn.fetchval(LOCK_RATE_AS_OF, base, quote)
    if as_of is None:
        return None
    version = await conn.fetchval(DELETE_RATE, base, quote)
    await conn.execute(DELETE_MANUAL_HISTORY, base, quote, as_of)
    return version


async def pair_history(store: Store, base: str, quote: str, start: date, end: date,
                       source: str | None = None) -> list[HistoryRow]:
    """Every stored value of the pair, in either direction, on days [start, end] (oldest
    first), from every source or only ``source``."""
    records = await store._fetch(SELECT_PAIR_HISTORY, base, quote, start, end, source)
    # A year of days from several sources is a few thousand rows: built positionally (the
    # codes are exactly three letters, a CHECK says so, so char(3) carries no padding).
    return [HistoryRow(day, row_base, row_quote, Decimal(rate), row_source)
            for day, row_base, row_quote, rate, row_source in records]


async def source_newest_day(store: Store, source: str, on_or_before: date) -> date | None:
    """The newest day ``source`` has history for, on or before ``on_or_before``."""
    return await store._call("fetchval", SELECT_SOURCE_NEWEST_DAY, source, on_or_before)


async def source_days(store: Store, source: str, pivot: str, start: date,
                      end: date) -> list[HistoryRow]:
    """``source``'s rows against ``pivot`` (either direction) on days [start, end]."""
    records = await store._fetch(SELECT_SOURCE_DAYS, source, start, end, pivot)
    return [HistoryRow(r["day"], r["base"].strip(), r["quote"].strip(), Decimal(r["rate"]),
                       source) for r in records]


async def path_rows(store: Store, src: str, dst: str, days: Sequence[date],
                    source: str | None = None) -> list[HistoryRow]:
    """The rows of ``days`` that can be a leg of a path ``src`` -> ``dst`` with at most two
    intermediates (SELECT_PATH_ROWS), from every source or only ``source``."""
    if not days:
        return []
    records = await store._fetch(SELECT_PATH_ROWS, src, dst, list(days), source)
    return [HistoryRow(r["day"], r["base"].strip(), r["quote"].strip(), Decimal(r["rate"]),
                       r["source"]) for r in records]
