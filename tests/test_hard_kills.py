"""SIGKILL of PostgreSQL's postmaster under API load, and of the updater in the middle of a
source's transaction: real processes, deadlines on every wait."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import answers_200, serves_row, wait_for
from recorded_feeds import Upstream, upstream  # noqa: F401 - fixture
from test_updater import UpdaterProcess, feed_env

import util
from updater import ORPHANED_ERROR

pytestmark = pytest.mark.slow
KEYS = [("USD", "EUR"), ("GBP", "USD"), ("EUR", "JPY")]


def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10)
    return [int(p) for p in done.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigkill_of_postgres_under_load(tmp_path: Path, start_api) -> None:
    # Its own durable server (fsync, synchronous commit): an acknowledged commit survives.
    server = util.EmbeddedPostgres(tmp_path / "pg-kill", durable=True)
    url = server.start()
    try:
        await util.migrate(url)
        api = await start_api(url, env={"XRATES_DB_TIMEOUT": "1"})
        acked: dict[str, dict[int, int]] = {}  # key -> {rate acknowledged: its version}
        for base, quote in KEYS:
            put = await api.client.put(f"/v1/rates/{base}/{quote}", json={"rate": "1"})
            assert put.status_code == 201
            acked[base + quote] = {1: put.json()["version"]}
        attempted: dict[str, set[int]] = {b + q: {1} for b, q in KEYS}
        reads: list[tuple[str, int, int]] = []
        statuses: Counter = Counter()
        stop = asyncio.Event()

        async def writer(base: str, quote: str) -> None:  # one writer per key: states in order
            for i in range(2, 3000):
                if stop.is_set():
                    return
                attempted[base + quote].add(i)
                try:
                    response = await api.client.put(f"/v1/rates/{base}/{quote}",
                                                    json={"rate": str(i)})
                except httpx.TransportError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code in (200, 201):
                    acked[base + quote][i] = response.json()["version"]
                await asyncio.sleep(0.005)  # pacing: a bounded load, not a flood

        async def reader() -> None:
            for n in range(20000):
                if stop.is_set():
                    return
                base, quote = KEYS[n % len(KEYS)]
                try:
                    response = await api.client.get(f"/v1/rates/{base}/{quote}")
                except httpx.TransportError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    body = response.json()
                    reads.append((base + quote, int(body["rate"]), body["version"]))
                await asyncio.sleep(0.003)

        load = [asyncio.create_task(writer(b, q)) for b, q in KEYS] + [
            asyncio.create_task(reader()) for _ in range(2)]

        async def acks_at_least(n: int) -> bool:
            return sum(len(v) for v in acked.values()) >= n

        await wait_for(lambda: acks_at_least(20), 10, what="writes acknowledged before the kill")
        postmaster = server.running_pid()
        assert postmaster is not None
        backends = _children(postmaster)
        os.kill(postmaster, signal.SIGKILL)

        async def all_gone() -> bool:  # the orphaned backends notice and exit
            return not _alive(postmaster) and not any(_alive(p) for p in backends)

        await wait_for(all_gone, 15, 0.05, "the killed server's processes to exit")
        ready = await api.client.get("/ready")

        async def answering_503() -> bool:
            return statuses[503] > 0 and (await api.client.get("/ready")).status_code == 503

        await wait_for(answering_503, 10, what="503s while the database is down")
        assert ready.status_code in (200, 503)
        acks_before_restart = sum(len(v) for v in acked.values())
        server.start()  # same data directory and port: crash recovery
        await wait_for(lambda: answers_200(api.client), 20, 0.05, "the API to recover without a restart")
        await wait_for(lambda: acks_at_least(acks_before_restart + 10), 10,
                       what="writes acknowledged after recovery")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 15)

        assert set(statuses) <= {200, 201, 503}, statuses  # never a 500, no dropped request
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT base || quote AS key, rate::text AS rate, version "
                                    "FROM rate")
        finally:
            await conn.close()
        final = {r["key"]: (int(r["rate"]), r["version"]) for r in rows}
        for key, by_rate in acked.items():
            last = max(by_rate, default=1)
            assert final[key][0] >= last, (key, final[key], last)  # no acknowledged write lost
            if final[key][0] in by_rate:
                assert by_rate[final[key][0]] == final[key][1]
        for key, rate, version in reads:  # every 200 is a state some write committed
            assert rate in attempted[key] and rate <= final[key][0], (key, rate)
            if rate in acked[key]:
                assert acked[key][rate] == version, (key, rate, version)

        async def serves_database() -> bool:
            for key, (_rate, version) in final.items():
                if not await serves_row(api, key[:3], key[3:], version):
                    return False
            return True

        await wait_for(serves_database, 10, what="the database state served after recovery")
    finally:
        server.stop("immediate")


# --------------------------------------------------------------------------- the updater
async def _updater_backends(sql: asyncpg.Connection) -> list[asyncpg.Record]:
    return await sql.fetch("SELECT pid, wait_event_type FROM pg_stat_activity "
                           "WHERE datname = current_database() AND application_name = 'xrates-updater'")


async def test_sigkill_of_the_updater_inside_a_source_transaction(db_url, sql, tmp_path: Path,
                                                                   upstream: Upstream) -> None:
    # A stored ECB row the run will update (older as_of, a rate within the jump guard) ...
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('EUR', 'USD', 1.08, 'ecb', '2024-02-01')")
    locker = await asyncpg.connect(db_url)
    started: list[UpdaterProcess] = []
    try:
        # ... locked by us, so the run's bulk upsert blocks inside its transaction.
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("SELECT 1 FROM rate WHERE base = 'EUR' AND quote = 'USD' FOR UPDATE")
        first = UpdaterProcess(db_url, tmp_path, feed_env(upstream, "ecb"))
        started.append(first)

        async def blocked_in_its_write() -> bool:
            return any(r["wait_event_type"] == "Lock" for r in await _updater_backends(sql))

        await wait_for(blocked_in_its_write, 15, 0.02, "the updater's write to block")
        run = await sql.fetchrow("SELECT id, status FROM update_run ORDER BY id DESC LIMIT 1")
        assert run["status"] == "running"
        first.signal(signal.SIGKILL)
        assert await first.wait_exit(10) == -signal.SIGKILL
        killed_at = time.monotonic()
        # Nothing of the killed transaction is visible, before or after its backend goes.
        assert await sql.fetchval("SELECT count(*) FROM rate") == 1
        await transaction.rollback()

        async def backends_gone() -> bool:
            return not await _updater_backends(sql)

        await wait_for(backends_gone, 15, 0.05, "the killed updater's sessions to end")
        stored = await sql.fetch("SELECT base, quote, rate::text AS rate FROM rate")
        assert [tuple(r) for r in stored] == [("EUR", "USD", "1.08")]  # nothing partial

        upstream.fail("ecb")  # the successor's own run writes nothing either
        second = UpdaterProcess(db_url, tmp_path, feed_env(upstream, "ecb"))
        started.append(second)

        async def marked_failed() -> asyncpg.Record | None:
            row = await sql.fetchrow("SELECT status, error FROM update_run WHERE id = $1", run["id"])
            return row if row["status"] == "failed" else None

        failed = await wait_for(marked_failed, 15, 0.05, "the next leader to fail the run")
        assert failed["error"] == ORPHANED_ERROR
        assert time.monotonic() - killed_at < 30
        assert await sql.fetchval("SELECT count(*) FROM rate") == 1
    finally:
        for proc in started:
            proc.kill()
        await locker.close()
