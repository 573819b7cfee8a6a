"""The standalone updater: schedule, leader lock, runs, writing rates (contract §6).

    python updater.py            run forever: a run at start, then every XRATES_INTERVAL s (±10 %)
    python updater.py --once     one run of every configured source; exit 0 only if all succeeded
    python updater.py --check    exit 0 if the database answers and an updater holds the leader lock
    python updater.py --backfill DAYS [--sources a,b]
                                 fill DAYS days of history (a recorded run, trigger backfill)

Several updaters may run (HA): the one holding a PostgreSQL advisory lock on a dedicated
connection runs jobs; the others retry the lock every ~0.5 s and take over within seconds when
the leader's session ends. The lock connection also LISTENs for queued manual runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import httpx

import model
import sources
import util

log = logging.getLogger("xrates.updater")

APPLICATION_NAME = "xrates-updater"
LOCK_RETRY_S = 0.5  # how often a follower tries the leader lock
QUEUE_POLL_S = 2.0  # fallback poll for queued runs, should a NOTIFY be missed
ONCE_WAIT_S = 60.0  # how long --once waits for the leader to run its queued request
ONCE_POLL_S = 0.2
JITTER = 0.1  # scheduled runs every interval_s × U(1 - JITTER, 1 + JITTER)
WRITE_TIMEOUT_S = 30.0  # one source's write transaction
CLOSE_TIMEOUT_S = 5.0
MAX_BACKOFF_S = 5.0

ORPHANED_ERROR = "updater died (leader lost)"
SHUTDOWN_ERROR = "interrupted by shutdown"
LEADER_LOST_ERROR = "leader lock lost"
DAY_S = 86_400
MAX_BACKFILL_DAYS = 36_600  # about a century: ECB's full file starts in 1999

T = TypeVar("T")

# The connection (or the server) is gone: start over with new connections.
CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalClientError,
)


class LeaderLost(Exception):
    """The leader lock's session ended: no commit may follow."""


class Interrupted(Exception):
    """Shutdown was requested while a source was being fetched."""


class JumpRejected(Exception):
    """A source's rates moved more than XRATES_MAX_JUMP: the whole source is rejected."""


def runner_name() -> str:
    """How runs name the process that ran them: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def outranking_sources(source: str, configured: Sequence[str]) -> list[str]:
    """Sources whose rows ``source`` must leave alone (contract §3).

    ``manual`` outranks every feed; configured feeds rank in XRATES_SOURCES order; a source that
    is not configured ranks below every configured one.
    """
    if source in configured:
        return ["manual", *configured[: configured.index(source)]]
    return ["manual", *configured]


def dedupe(quotes: Sequence[sources.Quote]) -> list[sources.Quote]:
    """One quote per pair for the current table: the newest as_of (of equals, the first),
    sorted by pair so writers lock keys in one order. Parsers return every day of a payload."""
    kept: dict[tuple[str, str], sources.Quote] = {}
    for quote in quotes:
        key = (quote.base, quote.quote)
        if key not in kept or quote.as_of > kept[key].as_of:
            kept[key] = quote
    return [kept[key] for key in sorted(kept)]


def find_jump(quotes: Sequence[sources.Quote], stored: Sequence[asyncpg.Record],
              outranking: Sequence[str], max_jump: Decimal) -> str | None:
    """Why these quotes must be rejected (the largest jump over ``max_jump``), or None.

    Only rows this feed would actually update are compared: not those owned by a source that
    outranks it, nor those with a newer as_of, nor unchanged ones.
    """
    incoming = {(q.base, q.quote): q for q in quotes}
    jumps: list[tuple[Decimal, str, Decimal, Decimal]] = []
    for row in stored:
        quote = incoming.get((row["base"], row["quote"]))
        old = row["rate"]
        if (quote is None or row["source"] in outranking or quote.as_of < row["as_of"]
                or quote.rate == old or old <= 0):
            continue
        jump = abs(quote.rate / old - 1)
        if jump > max_jump:
            jumps.append((jump, f"{quote.base}/{quote.quote}", old, quote.rate))
    if not jumps:
        return None
    jump, pair, old, new = max(jumps)
    more = f" (and {len(jumps) - 1} more pair(s))" if len(jumps) > 1 else ""
    return (f"rejected by the jump guard: {pair} moved {jump:.2%} ({old} -> {new}), "
            f"over XRATES_MAX_JUMP {max_jump:.2%}{more}")


def backfill_window(today: date, days: int) -> tuple[date, date]:
    """The first and last UTC day of a backfill of ``days`` days ending ``today``."""
    return today - timedelta(days=max(days, 1) - 1), today


def demo_history(today: date, days: int) -> list[sources.Quote]:
    """The offline demo's deterministic history: one value per day, ``demo_quotes`` at each
    day's midnight UTC with one walk step per day (so every process, every run, gives the
    same days; consecutive days differ by at most ~0.3 %)."""
    first, _ = backfill_window(today, days)
    quotes: list[sources.Quote] = []
    for offset in range((today - first).days + 1):
        midnight = datetime.combine(first + timedelta(days=offset), datetime.min.time(), UTC)
        quotes += sources.demo_quotes(midnight, DAY_S)
    return quotes


def summarise_failures(failures: dict[str, str]) -> str:
    text = "; ".join(f"{name}: {error}" for name, error in failures.items())
    return f"{len(failures)} source(s) failed: {text}"[:2000]


class Updater:
    """The updater process's state: connections, leadership and runs.

    ``run()`` works forever (until ``stop()``), ``run_once()`` does what ``--once`` does,
    ``close()`` releases the lock and closes every connection.
    """

    def __init__(self, settings: util.Settings, url: str, runner: str | None = None) -> None:
        self.settings = settings
        self.url = url
        self.runner = runner or runner_name()
        self.conn: asyncpg.Connection | None = None  # runs' writes and bookkeeping
        self.lock_conn: asyncpg.Connection | None = None  # holds the leader lock, LISTENs
        self.lock_pid: int | None = None  # backend pid of the lock session while leading
        self.client: httpx.AsyncClient | None = None
        self._migrated = not settings.auto_migrate
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()  # the lock connection ended
        self._interrupt = asyncio.Event()  # stopping or lost: abandon the current fetch
        self._wake = asyncio.Event()  # a run was queued (NOTIFY) or something to react to

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def leading(self) -> bool:
        return self.lock_pid is not None and not self._lost.is_set()

    def stop(self, reason: str = "stop requested") -> None:
        """Stop taking new work; the current source's transaction finishes or rolls back."""
        if not self._stopping.is_set():
            log.info("event=stopping reason=%s", reason)
        self._stopping.set()
        self._interrupt.set()
        self._wake.set()

    async def _data_conn(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = await util.connect(self.url, APPLICATION_NAME)
            if not self._migrated:
                await util.apply_schema(self.conn)
                self._migrated = True
                log.info("event=schema_applied")
        return self.conn

    async def close(self) -> None:
        """Release the lock, then close the connections and the HTTP client."""
        await self._drop_lock()
        if self.conn is not None:
            await _close(self.conn)
            self.conn = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    # -- leadership -----------------------------------------------------------------------
    def _on_run_queued(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    def _on_lock_terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self.lock_conn and self.lock_pid is not None:
            self._lost.set()
            self._interrupt.set()
            self._wake.set()

    async def try_lead(self) -> bool:
        """Take the leader lock if it is free (what ``run()`` retries every LOCK_RETRY_S); True
        if this updater now leads. On success it LISTENs for queued runs and fails the runs
        orphaned before. ``close()`` (or the end of the lock session) gives the lock up."""
        conn = await self._data_conn()
        if self.lock_conn is None or self.lock_conn.is_closed():
            self.lock_conn = await util.connect(self.url, APPLICATION_NAME)
            self.lock_conn.add_termination_listener(self._on_lock_terminated)
        if not await model.try_leader_lock(self.lock_conn):
            return False
        self._lost.clear()
        if not self._stopping.is_set():
            self._interrupt.clear()
        self.lock_pid = self.lock_conn.get_server_pid()
        # LISTEN before the first claim, so a run queued in between still wakes us.
        await self.lock_conn.add_listener(model.RUNS_CHANNEL, self._on_run_queued)
        log.info("event=leader_acquired runner=%s backend_pid=%s", self.runner, self.lock_pid)
        for orphan in await model.fail_orphaned_runs(conn, ORPHANED_ERROR):
            log.warning("event=run_orphaned run_id=%s runner=%s error=%r", orphan["id"],
                        orphan["runner"], ORPHANED_ERROR)
        return True

    async def _drop_lock(self) -> None:
        """Give up leadership: unlock (best effort) and close the lock connection."""
        conn, self.lock_conn = self.lock_conn, None
        was_leading, self.lock_pid = self.lock_pid is not None, None
        if conn is None:
            return
        released = False
        if was_leading and not conn.is_closed():
            with contextlib.suppress(Exception):
                released = await asyncio.wait_for(model.release_leader_lock(conn), CLOSE_TIMEOUT_S)
        await _close(conn)  # ends the session, which releases the lock in any case
        if released:
            log.info("event=leader_released runner=%s", self.runner)

    async def _check_leader(self, conn: asyncpg.Connection) -> None:
        """Raise LeaderLost unless our lock session still holds the lock (cheap; before commits)."""
        if self._lost.is_set() or self.lock_pid is None:
            raise LeaderLost("the lock connection ended")
        holder = await model.leader(conn)
        if holder is None or holder["pid"] != self.lock_pid:
            self._lost.set()
            self._interrupt.set()
            raise LeaderLost(f"lock held by backend {holder['pid'] if holder else None}, "
                             f"not ours ({self.lock_pid})")

    # -- forever ------------------------------------------------------------------------
    async def run(self) -> None:
        """Follow until the lock is free, then lead: queued runs at once, scheduled runs on time.

        Returns after ``stop()``. Connection failures drop leadership and start over with backoff.
        """
        backoff_s = LOCK_RETRY_S
        waiting_logged = False
        while not self.stopping:
            try:
                if await self.try_lead():
                    waiting_logged = False
                    backoff_s = LOCK_RETRY_S
                    await self._lead()
                    continue
                if not waiting_logged:
                    holder = await model.leader(await self._data_conn())
                    log.info("event=leader_waiting holder_backend_pid=%s",
                             holder["pid"] if holder else None)
                    waiting_logged = True
                await self._sleep(LOCK_RETRY_S)
            except LeaderLost as exc:
                log.warning("event=leader_lost runner=%s reason=%r", self.runner, str(exc))
                await self._drop_lock()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("event=database_error error=%r retry_in_s=%.1f",
                            f"{type(exc).__name__}: {exc}", backoff_s)
                await self._drop_lock()
                if self.conn is not None:
                    self.conn.terminate()
                    self.conn = None
                await self._sleep(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
        await self._drop_lock()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on stop()."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _lead(self) -> None:
        """Run jobs while leading; returns on stop(), raises LeaderLost when the lock is gone."""
        loop = asyncio.get_running_loop()
        next_due = loop.time()  # first run at once
        total = len(self.settings.sources)
        while not self.stopping:
            conn = await self._data_conn()
            self._wake.clear()  # before the claim: a NOTIFY from now on is not lost
            await self._check_leader(conn)
            run = await model.claim_queued_run(conn, self.runner, total)
            if run is None and loop.time() >= next_due:
                started = loop.time()
                run = await model.insert_started_run(conn, "schedule", self.runner, total)
                jitter = random.uniform(1 - JITTER, 1 + JITTER)
                next_due = started + self.settings.interval_s * jitter
                await model.record_next_run(conn, next_due - loop.time(), self.runner)
            if run is not None:
                await self._execute(run)
                continue
            if self.stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, min(QUEUE_POLL_S, next_due - loop.time())))
            if self._lost.is_set():
                raise LeaderLost("the lock connection ended")
            if self.lock_conn is not None:  # exercise the lock connection: a dead socket shows
                await self.lock_conn.fetchval(model.PING, timeout=CLOSE_TIMEOUT_S)

    # -- once -----------------------------------------------------------------------------
    async def run_once(self, wait_s: float = ONCE_WAIT_S) -> dict[str, Any] | None:
        """One run of every configured source (``--once``); the finished run, or None on timeout.

        With the lock free this process runs it itself (trigger manual). While another updater
        leads, it queues a manual run for the leader and waits for its outcome, still trying the
        lock meanwhile (should the leader die, it runs the queued request itself).
        """
        deadline = time.monotonic() + wait_s
        queued_id: int | None = None
        total = len(self.settings.sources)
        try:
            while True:
                conn = await self._data_conn()
                if self.lock_pid is None and not self.stopping and await self.try_lead():
                    if queued_id is None:
                        run = await model.insert_started_run(conn, "manual", self.runner, total)
                    else:
                        run = await model.claim_queued_run(conn, self.runner, total, queued_id)
                    if run is not None:
                        return await self._execute(run)
                if queued_id is None:
                    queued = await model.queue_manual_run(conn, None)
                    queued_id = queued["id"]
                    holder = await model.leader(conn)
                    log.info("event=run_queued run_id=%s reason=another_updater_leads "
                             "leader_backend_pid=%s wait_s=%g", queued_id,
                             holder["pid"] if holder else None, wait_s)
                run = await model.get_updater_run(conn, queued_id)
                if run is not None and run["status"] in ("succeeded", "failed"):
                    result = model.run_from_record(run)
                    log.info("event=run_outcome run_id=%s status=%s runner=%s error=%r",
                             queued_id, run["status"], run["runner"], run["error"])
                    return {**result, "runner": run["runner"]}
                if self.stopping:
                    log.warning("event=once_interrupted run_id=%s status=%s", queued_id,
                                run["status"] if run else None)
                    return None
                if time.monotonic() > deadline:
                    log.error("event=once_timeout run_id=%s status=%s waited_s=%g message=%r",
                              queued_id, run["status"] if run else None, wait_s,
                              "the leader did not finish the queued run in time")
                    return None
                await self._sleep(ONCE_POLL_S)
        finally:
            await self._drop_lock()

    # -- backfill -------------------------------------------------------------------------
    async def run_backfill(self, days: int, names: Sequence[str]) -> dict[str, Any]:
        """``--backfill DAYS``: one recorded run (trigger ``backfill``) that reads each named
        source's multi-day endpoint and stores every day as history, plus the current table
        under the usual as_of rule. Idempotent. It takes no leader lock: it may run beside a
        leading updater (both write through the same priority and as_of rules), and a
        source without a multi-day endpoint fails alone."""
        conn = await self._data_conn()
        run = await model.insert_backfill_run(conn, self.runner, list(names))
        run_id = run["id"]
        log.info("event=run_started run_id=%s trigger=backfill days=%d sources=%s runner=%s",
                 run_id, days, ",".join(names), self.runner)
        failures: dict[str, str] = {}
        error: str | None = None
        try:
            for name in names:
                if self.stopping:
                    raise Interrupted(SHUTDOWN_ERROR)
                result = await self._run_source(conn, name, backfill_days=days)
                if result["error"] is not None:
                    failures[name] = result["error"]
                await model.record_source_result(conn, run_id, name, result)
            error = summarise_failures(failures) if failures else None
        except Interrupted:
            error = SHUTDOWN_ERROR
        except BaseException as exc:
            await self._finish_quietly(conn, run_id, f"{type(exc).__name__}: {exc}")
            raise
        status = "failed" if error is not None else "succeeded"
        finished = await model.finish_run(conn, run_id, status, error)
        if finished is None:  # an updater taking the lead marked it orphaned meanwhile
            finished = await model.get_updater_run(conn, run_id)
        assert finished is not None  # runs are never deleted while running
        log.log(logging.INFO if status == "succeeded" else logging.WARNING,
                "event=run_finished run_id=%s status=%s error=%r", run_id, finished["status"],
                finished["error"])
        return {**model.run_from_record(finished), "runner": finished["runner"]}

    # -- a run ----------------------------------------------------------------------------
    async def _execute(self, run: asyncpg.Record) -> dict[str, Any]:
        """Run every source of a claimed run, record progress, finish it; the finished run."""
        conn = await self._data_conn()
        run_id = run["id"]
        names = list(run["requested"]) if run["requested"] is not None else list(self.settings.sources)
        log.info("event=run_started run_id=%s trigger=%s sources=%s runner=%s", run_id,
                 run["trigger"], ",".join(names), self.runner)
        started = time.perf_counter()
        failures: dict[str, str] = {}
        status, error = "failed", None
        try:
            for name in names:
                if self.stopping:
                    raise Interrupted(SHUTDOWN_ERROR)
                result = await self._run_source(conn, name)
                if result["error"] is not None:
                    failures[name] = result["error"]
                await model.record_source_result(conn, run_id, name, result)
            status = "failed" if failures else "succeeded"
            error = summarise_failures(failures) if failures else None
        except Interrupted:
            error = SHUTDOWN_ERROR
        except LeaderLost as exc:
            error = f"{LEADER_LOST_ERROR}: {exc}"
            await self._finish_quietly(conn, run_id, error)
            raise
        except BaseException as exc:
            await self._finish_quietly(conn, run_id, f"{type(exc).__name__}: {exc}")
            raise
        if status == "succeeded":  # never claim success without the lock
            try:
                await self._check_leader(conn)
            except LeaderLost as exc:
                await self._finish_quietly(conn, run_id, f"{LEADER_LOST_ERROR}: {exc}")
                raise
        finished = await model.finish_run(conn, run_id, status, error)
        if finished is None:  # a successor failed it meanwhile
            finished = await model.get_updater_run(conn, run_id)
        assert finished is not None  # runs are never deleted while running
        ms = (time.perf_counter() - started) * 1000
        log.log(logging.INFO if status == "succeeded" else logging.WARNING,
                "event=run_finished run_id=%s status=%s ms=%.0f error=%r", run_id,
                finished["status"], ms, finished["error"])
        deleted = await model.delete_old_runs(conn)
        if deleted:
            log.info("event=runs_pruned deleted=%d keep=%d", deleted, model.RUN_HISTORY_KEEP)
        return {**model.run_from_record(finished), "runner": finished["runner"]}

    async def _finish_quietly(self, conn: asyncpg.Connection, run_id: int, error: str) -> None:
        """Mark the run failed if the database still answers (else the next leader will)."""
        try:
            await asyncio.wait_for(model.finish_run(conn, run_id, "failed", error), CLOSE_TIMEOUT_S)
            log.warning("event=run_finished run_id=%s status=failed error=%r", run_id, error)
        except Exception as exc:
            log.warning("event=run_unfinished run_id=%s error=%r cause=%r", run_id, error,
                        f"{type(exc).__name__}: {exc}")

    async def _run_source(self, conn: asyncpg.Connection, name: str,
                          backfill_days: int | None = None) -> dict[str, Any]:
        """Fetch, parse, guard and write one source; its {fetched, changed, error, currencies}
        (``currencies``: the sorted codes of the quotes fetched, the pivot included).

        ``backfill_days``: read the source's multi-day endpoint instead (``--backfill``);
        ``fetched`` then counts the payload's quotes of every day, not the pairs.
        """
        started = time.perf_counter()
        fetched = changed = 0
        error: str | None = None
        currencies: list[str] = []
        try:
            payload = await self._interruptible(self._fetch_quotes(name, backfill_days))
            quotes = dedupe(payload)
            fetched = len(quotes) if backfill_days is None else len(payload)
            currencies = sorted({code for q in quotes for code in (q.base, q.quote)})
            changed = await self._write(conn, name, quotes, payload,
                                        backfill=backfill_days is not None)
        except (sources.SourceError, JumpRejected) as exc:
            error = str(exc)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            error = f"database error: {type(exc).__name__}: {exc}"
        except (Interrupted, LeaderLost, *CONNECTION_ERRORS):
            raise
        except Exception as exc:  # a parser bug must fail this source, not the run
            log.exception("event=source_bug source=%s", name)
            error = f"unexpected {type(exc).__name__}: {exc}"
        ms = (time.perf_counter() - started) * 1000
        if error is None:
            log.info("event=source_done source=%s fetched=%d changed=%d ms=%.0f", name, fetched,
                     changed, ms)
        else:
            log.warning("event=source_failed source=%s fetched=%d ms=%.0f error=%r", name,
                        fetched, ms, error)
        return {"fetched": fetched, "changed": changed, "error": error, "currencies": currencies}

    async def _interruptible(self, work: Awaitable[T]) -> T:
        """Await ``work`` unless stop() or the loss of the lock comes first (then cancel it)."""
        task = asyncio.ensure_future(work)
        interrupted = asyncio.ensure_future(self._interrupt.wait())
        try:
            await asyncio.wait({task, interrupted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            interrupted.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self._lost.is_set():
            raise LeaderLost("the lock connection ended during a fetch")
        raise Interrupted(SHUTDOWN_ERROR)

    async def _fetch_quotes(self, name: str, backfill_days: int | None = None
                            ) -> list[sources.Quote]:
        settings = self.settings
        now = datetime.now(UTC)
        if name == "demo":
            if backfill_days is not None:
                return demo_history(now.date(), backfill_days)
            return sources.demo_quotes(now, settings.interval_s)
        feed = sources.FEEDS.get(name)
        if feed is None:
            raise sources.SourceError(f"unknown source {name!r}")
        if self.client is None:
            self.client = sources.make_client()
        if backfill_days is None:
            return await sources.fetch_quotes(
                feed, self.client, today=now.date(),
                url_override=settings.source_urls.get(name),
                timeout_s=settings.fetch_timeout_s, attempts=settings.fetch_attempts)
        quotes = await sources.fetch_quotes(
            feed, self.client, today=now.date(), history=True, days=backfill_days,
            url_override=settings.source_urls.get(name),
            history_url_override=settings.history_urls.get(name),
            timeout_s=settings.fetch_timeout_s, attempts=settings.fetch_attempts)
        # Some endpoints give more than asked (ECB's full file since 1999 beyond 90 days, a
        # year file): a backfill of N days stores those N days.
        first = backfill_window(now.date(), backfill_days)[0]
        return [q for q in quotes if q.as_of.astimezone(UTC).date() >= first]

    async def write_rates(self, name: str, quotes: Sequence[sources.Quote]) -> int:
        """Write source ``name``'s current ``quotes`` (no history rows) in one transaction as a
        run does: jump guard, priority, the leader check just before the commit (see
        ``_write``); the number of rows changed.

        Raises LeaderLost, and writes nothing, when this updater does not hold the leader lock
        (any more); JumpRejected when the jump guard rejects the quotes.
        """
        return await self._write(await self._data_conn(), name, quotes)

    async def _write(self, conn: asyncpg.Connection, name: str,
                     quotes: Sequence[sources.Quote],
                     payload: Sequence[sources.Quote] = (), *, backfill: bool = False) -> int:
        """One transaction: read the stored rows, apply the jump guard, bulk upsert, store
        every day of ``payload`` as history, commit.

        A backfill skips the jump guard (it protects the current table, which a backfill
        only moves forward under the as_of rule) and needs no leader lock (an idempotent
        write that any process may make beside the leader's runs). A run the guard
        rejects writes nothing, history included.

        The guard reads without FOR UPDATE on purpose: row locks taken before the upsert's
        INSERT trigger takes its per-key advisory lock would invert the lock order of contract §3
        and deadlock against a concurrent API upsert. The upsert re-checks priority on the
        locked current row, so a concurrent write can only make the guard compare with a value
        a few milliseconds old.
        """
        outranking = outranking_sources(name, self.settings.sources)
        rows = [(q.base, q.quote, q.rate, q.as_of) for q in quotes]
        async with asyncio.timeout(WRITE_TIMEOUT_S), conn.transaction():
            stored = await model.stored_rates(conn, [(q.base, q.quote) for q in quotes])
            if not backfill:
                reason = find_jump(quotes, stored, outranking, self.settings.max_jump)
                if reason is not None:
                    raise JumpRejected(reason)
            changed = await model.upsert_feed_rates(conn, name, rows, outranking)
            # After the current rows: the lock order of the API's writes (rate, then history).
            await model.upsert_feed_history(conn, name, model.history_rows_of(payload))
            if not backfill:
                await self._check_leader(conn)  # losing the lock rolls this back
        return changed


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
    except Exception:
        conn.terminate()


# --------------------------------------------------------------------------- commands
async def check(settings: util.Settings) -> int:
    """--check: 0 if the database answers and some session holds the leader lock, else 1."""
    if settings.database_url:
        url = settings.database_url
    else:  # never start the embedded server just to look at it
        embedded = util.EmbeddedPostgres(settings.data_dir)
        if embedded.running_pid() is None:
            print(f"not ok: embedded PostgreSQL in {settings.data_dir} is not running")
            return 1
        url = embedded.url
    try:
        conn = await util.connect(url, APPLICATION_NAME)
        try:
            holder = await model.leader(conn)
        finally:
            await _close(conn)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        print(f"not ok: database unreachable at {util.redact_url(url)} ({type(exc).__name__})")
        return 1
    if holder is None:
        print("not ok: no updater holds the leader lock")
        return 1
    print(f"ok: leader backend_pid={holder['pid']} application_name={holder['application_name']}")
    return 0


async def backfill(settings: util.Settings, url: str, days: int,
                   names: Sequence[str] | None = None) -> int:
    """``--backfill``: 0 if every source succeeded, 1 otherwise (the run says why)."""
    updater = Updater(settings, url)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, updater.stop, sig.name)
    try:
        run = await updater.run_backfill(days, list(names or settings.sources))
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        log.error("event=backfill_failed error=%r", f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        await updater.close()
    return 0 if run["status"] == "succeeded" else 1


def _backfill_sources(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in util.KNOWN_SOURCES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown source(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(util.KNOWN_SOURCES)}")
    return names


def _backfill_days(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_BACKFILL_DAYS:
        raise argparse.ArgumentTypeError(f"must be a whole number of days, 1-{MAX_BACKFILL_DAYS}")
    return int(text)


async def _serve(settings: util.Settings, url: str, once: bool) -> int:
    updater = Updater(settings, url)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, updater.stop, sig.name)
    log.info("event=updater_started runner=%s sources=%s interval_s=%g database=%s once=%s",
             updater.runner, ",".join(settings.sources), settings.interval_s,
             util.redact_url(url), once)
    try:
        if once:
            try:
                run = await updater.run_once()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError, LeaderLost) as exc:
                log.error("event=once_failed error=%r", f"{type(exc).__name__}: {exc}")
                return 1
            return 0 if run is not None and run["status"] == "succeeded" else 1
        await updater.run()
        return 0
    finally:
        await updater.close()
        log.info("event=updater_stopped runner=%s", updater.runner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python updater.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one run, then exit")
    mode.add_argument("--check", action="store_true", help="health check: is there a leader?")
    mode.add_argument("--backfill", type=_backfill_days, metavar="DAYS",
                      help="fill DAYS days of history from each source's multi-day endpoint")
    parser.add_argument("--sources", type=_backfill_sources, metavar="a,b",
                        help="with --backfill: these sources (default: XRATES_SOURCES)")
    args = parser.parse_args(argv)
    if args.sources is not None and args.backfill is None:
        parser.error("--sources goes with --backfill")
    settings = util.settings_or_exit()
    util.setup_logging(settings)
    if args.check:
        return asyncio.run(check(settings))
    if args.backfill is not None:
        return asyncio.run(backfill(settings, util.database_url(settings), args.backfill,
                                    args.sources))
    return asyncio.run(_serve(settings, util.database_url(settings), args.once))


if __name__ == "__main__":
    sys.exit(main())
