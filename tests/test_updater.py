"""Tests for updater.py: runs on real recorded payloads served over HTTP, source priority, the jump
guard, the leader lock, queued runs, --once/--check and SIGTERM, against a real PostgreSQL and
real updater processes (no mocks of the database or of HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import ROOT, wait_for

# the local upstream server, its default payloads and its fixture
from recorded_feeds import DEFAULT_PAYLOADS, Upstream, payload, upstream  # noqa: F401

import model
import util
from sources import FEEDS
from updater import ORPHANED_ERROR, SHUTDOWN_ERROR, LeaderLost, Updater, dedupe, outranking_sources

ALL_FEEDS = "ecb,nbu,cbr,boc,privatbank"


def day(year: int, month: int, dom: int) -> datetime:
    return datetime(year, month, dom, tzinfo=UTC)


def feed_env(upstream: Upstream, sources: str = ALL_FEEDS, **extra: str) -> dict[str, str]:
    """Environment for an updater reading the local upstream with small timeouts."""
    return {"XRATES_SOURCES": sources, "XRATES_FETCH_TIMEOUT": "0.3",
            "XRATES_FETCH_ATTEMPTS": "2", "XRATES_AUTO_MIGRATE": "0", **upstream.env(), **extra}


# --------------------------------------------------------------------------- in-process updaters
@pytest.fixture
async def make_updater(db_url: str) -> AsyncIterator[Callable[[dict[str, str]], Updater]]:
    """Factory: an in-process Updater for the test's database; closed after the test."""
    made: list[Updater] = []

    def make(env: dict[str, str]) -> Updater:
        settings = util.load_settings({"DATABASE_URL": db_url, **env})
        made.append(Updater(settings, db_url))
        return made[-1]

    try:
        yield make
    finally:
        for updater in made:
            updater.stop("test teardown")
            await updater.close()


@contextlib.asynccontextmanager
async def running(updater: Updater) -> AsyncIterator[asyncio.Task]:
    """``updater.run()`` in a task, stopped (and awaited) on exit."""
    task = asyncio.create_task(updater.run())
    try:
        yield task
    finally:
        updater.stop("test done")
        await asyncio.wait_for(task, 10)


# --------------------------------------------------------------------------- updater processes
class UpdaterProcess:
    """One real `python updater.py [args]`, in its own process group, stopped by its PID."""

    def __init__(self, db_url: str, log_dir: Path, env: dict[str, str], *args: str) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
        environment.update({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0", **env})
        self.log_path = log_dir / f"updater-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "updater.py", *args], cwd=ROOT, env=environment,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.runner = f"{socket.gethostname()}:{self.proc.pid}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    async def wait_exit(self, timeout_s: float = 15.0) -> int:
        async def exited() -> bool:
            return self.proc.poll() is not None

        await wait_for(exited, timeout_s, 0.02, f"updater {self.proc.pid} to exit:\n{self.log()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@pytest.fixture
async def spawn(db_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., UpdaterProcess]]:
    """Factory: ``spawn(env, *args)`` starts `python updater.py`; all are stopped after the test."""
    started: list[UpdaterProcess] = []

    def start(env: dict[str, str], *args: str) -> UpdaterProcess:
        started.append(UpdaterProcess(db_url, tmp_path, env, *args))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            if process.proc.poll() is None:
                process.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.proc.wait(10)
            process.kill()


async def run_cli(db_url: str, log_dir: Path, env: dict[str, str], *args: str,
                  timeout_s: float = 30.0) -> tuple[int, str]:
    """Run `python updater.py args` to completion; (exit code, output)."""
    process = UpdaterProcess(db_url, log_dir, env, *args)
    try:
        return await process.wait_exit(timeout_s), process.log()
    finally:
        process.kill()


# --------------------------------------------------------------------------- database helpers
async def rates(sql: asyncpg.Connection) -> dict[tuple[str, str], asyncpg.Record]:
    rows = await sql.fetch("SELECT base, quote, rate, source, as_of, version FROM rate")
    return {(r["base"], r["quote"]): r for r in rows}


async def runs(sql: asyncpg.Connection) -> list[asyncpg.Record]:
    return await sql.fetch("SELECT *, sources::text AS sources_json FROM update_run ORDER BY id")


async def run_row(sql: asyncpg.Connection, run_id: int) -> asyncpg.Record:
    return await sql.fetchrow("SELECT * FROM update_run WHERE id = $1", run_id)


def finished_run(sql: asyncpg.Connection, run_id: int) -> Callable[[], Awaitable[Any]]:
    async def check() -> asyncpg.Record | None:
        row = await run_row(sql, run_id)
        return row if row is not None and row["status"] in ("succeeded", "failed") else None

    return check


def counts(result: dict[str, Any]) -> dict[str, Any]:
    """A source result without its currency list."""
    return {k: v for k, v in result.items() if k != "currencies"}


async def insert_rate(sql: asyncpg.Connection, base: str, quote: str, rate: str, source: str,
                      as_of: datetime) -> None:
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1,$2,$3,$4,$5)",
                      base, quote, Decimal(rate), source, as_of)


class Notifications:
    """Everything NOTIFYed on the rate channel, read by a plain LISTEN connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[dict] = asyncio.Queue()

    @classmethod
    async def listen(cls, db_url: str) -> Notifications:
        self = cls(await asyncpg.connect(db_url))
        await self.conn.add_listener(model.CHANNEL, lambda *a: self.queue.put_nowait(json.loads(a[3])))
        return self

    async def changes_until_now(self, sender: asyncpg.Connection) -> int:
        """Rate changes (op u/d rows) notified so far: a sentinel NOTIFY sent now arrives after
        every notification committed before it, so waiting for it bounds the count exactly."""
        sentinel = f"sentinel-{time.monotonic_ns()}"
        await sender.execute("SELECT pg_notify($1, $2)", model.CHANNEL,
                             json.dumps({"op": "hb", "id": sentinel}))
        changed = 0
        while True:
            message = await asyncio.wait_for(self.queue.get(), 5)
            if message.get("id") == sentinel:
                return changed
            if message["op"] in ("u", "d"):
                changed += len(message["rows"])

    async def close(self) -> None:
        await self.conn.close()


# =========================================================================== pure rules
def test_priority_order() -> None:
    configured = ("ecb", "nbu", "cbr")
    assert outranking_sources("ecb", configured) == ["manual"]
    assert outranking_sources("cbr", configured) == ["manual", "ecb", "nbu"]
    # Not configured (e.g. requested through POST /v1/updates): ranks below every configured one.
    assert outranking_sources("boc", configured) == ["manual", "ecb", "nbu", "cbr"]


# =========================================================================== runs
async def test_run_writes_real_feeds_and_records_the_run(make_updater, upstream, sql) -> None:
    updater = make_updater(feed_env(upstream))
    run = await updater.run_once()

    assert run["status"] == "succeeded", run
    assert run["trigger"] == "manual" and run["error"] is None
    assert run["progress"] == {"done": 5, "total": 5}
    assert run["runner"] == f"{socket.gethostname()}:{os.getpid()}"
    # Parsers return every day of a payload; the current table gets the newest day per pair.
    expected = {name: len(dedupe(FEEDS[name].parse(payload(path))))
                for name, path in DEFAULT_PAYLOADS.items()}
    assert expected == {"ecb": 30, "nbu": 45, "cbr": 43, "boc": 23, "privatbank": 2}
    # Feeds overlap: EUR/CAD (ecb and boc) stays ecb's, USD/UAH and EUR/UAH (nbu and privatbank)
    # stay nbu's, as the earlier source in XRATES_SOURCES outranks the later one.
    changed = {**expected, "boc": 22, "privatbank": 0}
    codes = {name: sorted({c for q in FEEDS[name].parse(payload(path)) for c in (q.base, q.quote)})
             for name, path in DEFAULT_PAYLOADS.items()}
    assert run["sources"] == {
        name: {"fetched": n, "changed": changed[name], "error": None, "currencies": codes[name]}
        for name, n in expected.items()
    }
    assert "EUR" in codes["ecb"] and "UAH" in codes["nbu"]  # the pivot is one of the codes
    stored = await rates(sql)
    assert len(stored) == sum(changed.values())
    assert stored[("EUR", "CAD")]["source"] == "ecb"
    exact = {
        ("EUR", "USD"): ("1.0856", "ecb", day(2024, 2, 27)),
        ("EUR", "GBP"): ("0.85620", "ecb", day(2024, 2, 27)),  # trailing zero kept
        ("USD", "UAH"): ("44.9729", "nbu", day(2026, 9, 25)),
        ("HUF", "UAH"): ("0.139594", "nbu", day(2026, 9, 25)),
        ("AMD", "RUB"): ("0.234582", "cbr", day(2024, 3, 28)),  # Value 23,4582 per Nominal 100
        ("GBP", "RUB"): ("116.9251", "cbr", day(2024, 3, 28)),
        ("USD", "CAD"): ("1.3706", "boc", day(2026, 3, 18)),
    }
    for pair, (rate, source, as_of) in exact.items():
        row = stored[pair]
        assert (str(row["rate"]), row["source"], row["as_of"]) == (rate, source, as_of), pair

    db_run = (await runs(sql))[-1]
    assert db_run["started_at"] is not None and db_run["finished_at"] >= db_run["started_at"]


async def test_identical_second_run_changes_nothing(make_updater, upstream, sql, db_url) -> None:
    updater = make_updater(feed_env(upstream))
    listener = await Notifications.listen(db_url)
    try:
        first = await updater.run_once()
        assert first["status"] == "succeeded"
        assert await listener.changes_until_now(sql) == 30 + 45 + 43 + 22
        before = await rates(sql)

        second = await updater.run_once()
        assert second["status"] == "succeeded"
        assert {n: s["changed"] for n, s in second["sources"].items()} == dict.fromkeys(
            ALL_FEEDS.split(","), 0)
        assert await listener.changes_until_now(sql) == 0
        assert await rates(sql) == before  # same rates, sources, as_of and versions
    finally:
        await listener.close()


async def test_failing_sources_fail_alone_and_keep_their_rates(make_updater, upstream, sql) -> None:
    updater = make_updater(feed_env(upstream, "ecb,nbu,cbr,boc"))
    assert (await updater.run_once())["status"] == "succeeded"
    before = await rates(sql)

    upstream.serve("ecb", payload("ecb/eurofxref-daily_2017-03-08.xml"))  # still a good feed
    upstream.fail("nbu", 500)
    upstream.serve("cbr", b"\x00\xffgarbage, not a feed\r\n")
    upstream.hang("boc")
    hits = dict(upstream.hits)
    started = time.monotonic()
    run = await updater.run_once()
    assert time.monotonic() - started < 5
    # 5xx and timeouts are retried (XRATES_FETCH_ATTEMPTS=2); a 200 with garbage is not.
    assert {n: upstream.hits[n] - hits[n] for n in ("nbu", "cbr", "boc")} == {"nbu": 2, "cbr": 1, "boc": 2}

    assert run["status"] == "failed"
    assert run["progress"] == {"done": 4, "total": 4}
    result = run["sources"]
    assert result["ecb"]["error"] is None and result["ecb"]["fetched"] == 31
    assert "HTTP 500" in result["nbu"]["error"]
    assert "cbr" in result["cbr"]["error"] and "not XML" in result["cbr"]["error"]
    assert "timed out" in result["boc"]["error"]
    for name in ("nbu", "cbr", "boc"):
        assert result[name]["changed"] == 0
        assert f"{name}: " in run["error"]
    assert run["error"].startswith("3 source(s) failed")
    after = await rates(sql)
    for pair, row in before.items():
        if row["source"] != "ecb":
            assert after[pair] == row, pair  # untouched, not erased


async def test_once_cli_exit_codes(db_url, upstream, sql, tmp_path) -> None:
    env = feed_env(upstream, "ecb,nbu")
    code, output = await run_cli(db_url, tmp_path, env, "--once")
    assert code == 0, output
    assert "event=run_started" in output and "event=source_done source=ecb" in output

    upstream.fail("nbu", 500)
    code, output = await run_cli(db_url, tmp_path, env, "--once")
    assert code == 1, output
    assert "event=source_failed source=nbu" in output
    statuses = [(r["trigger"], r["status"]) for r in await runs(sql)]
    assert statuses == [("manual", "succeeded"), ("manual", "failed")]

    async def updater_sessions_gone() -> bool:  # every connection closed on exit
        return await sql.fetchval("SELECT count(*) FROM pg_stat_activity "
                                  "WHERE application_name = 'xrates-updater'") == 0

    await wait_for(updater_sessions_gone, 5, what="the updater's sessions to end")


async def test_bad_configuration_exits_2_with_one_line(db_url, tmp_path) -> None:
    code, output = await run_cli(db_url, tmp_path, {"XRATES_SOURCES": "ecb,nosuch"}, "--once")
    assert code == 2
    assert output.strip().count("\n") == 0 and "nosuch" in output


# =========================================================================== priority and guard
async def test_source_priority_and_as_of(make_updater, upstream, sql) -> None:
    await insert_rate(sql, "EUR", "USD", "5", "manual", day(2020, 1, 1))  # manual outranks all
    await insert_rate(sql, "USD", "UAH", "40", "ecb", day(2020, 1, 1))  # ecb outranks nbu
    await insert_rate(sql, "EUR", "GBP", "0.8", "ecb", day(2030, 1, 1))  # newer as_of wins
    await insert_rate(sql, "EUR", "JPY", "150", "nbu", day(2020, 1, 1))  # nbu ranks below ecb
    await insert_rate(sql, "EUR", "CHF", "0.9", "boc", day(2020, 1, 1))  # not configured: lowest
    await insert_rate(sql, "EUR", "UAH", "45", "privatbank", day(2020, 1, 1))
    updater = make_updater(feed_env(upstream, "ecb,nbu"))

    run = await updater.run_once()
    # EUR/USD would be a 78 % jump: the guard must not look at rows the feed may not touch.
    assert run["status"] == "succeeded", run
    assert counts(run["sources"]["ecb"]) == {"fetched": 30, "changed": 28, "error": None}
    assert counts(run["sources"]["nbu"]) == {"fetched": 45, "changed": 44, "error": None}
    stored = await rates(sql)

    def summary(pair: tuple[str, str]) -> tuple[str, str]:
        return str(stored[pair]["rate"]), stored[pair]["source"]

    assert summary(("EUR", "USD")) == ("5", "manual")
    assert summary(("USD", "UAH")) == ("40", "ecb")
    assert summary(("EUR", "GBP")) == ("0.8", "ecb")
    assert stored[("EUR", "GBP")]["as_of"] == day(2030, 1, 1)
    assert summary(("EUR", "JPY")) == ("163.04", "ecb")
    assert summary(("EUR", "CHF")) == ("0.9544", "ecb")
    assert summary(("EUR", "UAH")) == ("51.122", "nbu")

    # An older feed day never replaces a newer one; only pairs new to the table are inserted
    # (and TRY's 2017 rate, 8x lower, is no jump: that row will not be touched).
    upstream.serve("ecb", payload("ecb/eurofxref-daily_2017-03-08.xml"))
    before = await rates(sql)
    run = await updater.run_once()
    assert run["status"] == "succeeded", run
    after = await rates(sql)
    new_pairs = set(after) - set(before)
    assert new_pairs == {("EUR", "RUB"), ("EUR", "HRK")}
    assert run["sources"]["ecb"]["changed"] == len(new_pairs)
    assert all(after[pair] == row for pair, row in before.items())


async def test_jump_guard_rejects_a_whole_source(make_updater, upstream, sql, db_url) -> None:
    updater = make_updater(feed_env(upstream, "cbr"))
    assert (await updater.run_once())["status"] == "succeeded"
    before = await rates(sql)
    assert str(before[("AMD", "RUB")]["rate"]) == "0.234582"

    # The next day's real bytes as a parser that missed <Nominal> would read them: AMD's price of
    # 100 dram taken as the price of one (100x), plus an ordinary +0.9 % move of AUD.
    good = payload(DEFAULT_PAYLOADS["cbr"])
    buggy = good.replace(b'Date="28.03.2024"', b'Date="29.03.2024"')
    amd_before = (b"<CharCode>AMD</CharCode><Nominal>100</Nominal>", b"<VunitRate>0,234582</VunitRate>")
    amd_after = (b"<CharCode>AMD</CharCode><Nominal>1</Nominal>", b"<VunitRate>23,4582</VunitRate>")
    for old, new in zip(amd_before, amd_after, strict=True):
        assert buggy.count(old) == 1
        buggy = buggy.replace(old, new)
    aud = b"<Value>60,4533</Value><VunitRate>60,4533</VunitRate>"
    assert buggy.count(aud) == 1
    buggy = buggy.replace(aud, b"<Value>61,0000</Value><VunitRate>61,0000</VunitRate>")
    upstream.serve("cbr", buggy)

    listener = await Notifications.listen(db_url)
    try:
        run = await updater.run_once()
        assert await listener.changes_until_now(sql) == 0
    finally:
        await listener.close()
    assert run["status"] == "failed"
    error = run["sources"]["cbr"]["error"]
    assert "AMD/RUB" in error and "0.234582 -> 23.4582" in error, error
    assert run["sources"]["cbr"]["changed"] == 0
    assert "AMD/RUB" in run["error"]
    assert await rates(sql) == before  # nothing written, not even AUD

    # The same move within the guard is written.
    upstream.serve("cbr", good.replace(b'Date="28.03.2024"', b'Date="29.03.2024"').replace(
        aud, b"<Value>61,0000</Value><VunitRate>61,0000</VunitRate>"))
    run = await updater.run_once()
    assert run["status"] == "succeeded"
    assert str((await rates(sql))[("AUD", "RUB")]["rate"]) == "61.0000"


# =========================================================================== queued runs
async def test_queued_run_waits_for_an_updater_and_runs_requested_sources(
        make_updater, upstream, sql) -> None:
    # Queued while no updater runs; asks for a source that is not configured and an unknown one.
    queued = await model.queue_manual_run(sql, ["cbr", "nosuch"])
    await insert_rate(sql, "EUR", "RUB", "90", "ecb", day(2020, 1, 1))  # ecb is configured
    updater = make_updater(feed_env(upstream, "ecb", XRATES_INTERVAL="60"))

    async with running(updater):
        run = await wait_for(finished_run(sql, queued["id"]), 10, what="the queued run")
        assert run["status"] == "failed" and run["trigger"] == "manual"
        assert (run["progress_done"], run["progress_total"]) == (2, 2)
        result = json.loads(run["sources"])
        assert counts(result["cbr"]) == {"fetched": 43, "changed": 42, "error": None}
        assert result["nosuch"]["error"] == "unknown source 'nosuch'"
        # cbr is not configured, so it ranks below ecb: EUR/RUB stays ecb's.
        assert (await rates(sql))[("EUR", "RUB")]["source"] == "ecb"

        async def scheduled() -> list[asyncpg.Record]:
            return [r for r in await runs(sql) if r["trigger"] == "schedule" and r["finished_at"]]

        [schedule] = await wait_for(scheduled, 10, what="the first scheduled run")
        assert schedule["status"] == "succeeded" and schedule["id"] > queued["id"]


async def test_post_updates_starts_within_a_second(db_url, upstream, sql, spawn, start_api) -> None:
    leader = spawn({"XRATES_SOURCES": "demo", "XRATES_INTERVAL": "60"})

    async def first_run() -> asyncpg.Record | None:
        done = [r for r in await runs(sql) if r["status"] == "succeeded"]
        return done[0] if done else None

    first = await wait_for(first_run, 15, what=f"the first scheduled run:\n{leader.log()}")
    assert (first["trigger"], first["runner"]) == ("schedule", leader.runner)

    api = await start_api(db_url)
    response = await api.client.post("/v1/updates", json={"sources": ["demo"]})
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]

    async def finished() -> dict | None:
        body = (await api.client.get(f"/v1/updates/{run_id}")).json()
        return body if body["status"] in ("succeeded", "failed") else None

    body = await wait_for(finished, 5, what="the posted run")
    assert body["status"] == "succeeded" and body["trigger"] == "manual"
    assert body["sources"]["demo"]["error"] is None and body["progress"] == {"done": 1, "total": 1}
    row = await run_row(sql, run_id)
    assert row["runner"] == leader.runner
    assert (row["started_at"] - row["created_at"]).total_seconds() < 1.0


# =========================================================================== leader lock
async def test_leader_takeover_after_sigkill(db_url, upstream, sql, spawn) -> None:
    # ecb hangs far beyond the test, so the leader is always mid-run when it is killed.
    upstream.hang("ecb")
    env = feed_env(upstream, "demo,ecb", XRATES_FETCH_TIMEOUT="60", XRATES_FETCH_ATTEMPTS="1",
                   XRATES_INTERVAL="60")
    first, second = spawn(env), spawn(env)
    by_runner = {first.runner: first, second.runner: second}

    async def mid_run() -> asyncpg.Record | None:
        active = [r for r in await runs(sql) if r["status"] == "running" and r["progress_done"] == 1]
        return active[0] if active else None

    run = await wait_for(mid_run, 15, what="a run past demo, hanging on ecb")
    leader = by_runner[run["runner"]]
    follower = second if leader is first else first
    holder = await model.leader(sql)
    assert holder["application_name"] == "xrates-updater"
    assert await sql.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = "
                              "($1::bigint & 4294967295)::oid AND granted", model.LEADER_LOCK_KEY) == 1

    async def follower_waiting() -> bool:
        return "event=leader_waiting" in follower.log()

    await wait_for(follower_waiting, 10, what=f"the follower to wait:\n{follower.log()}")
    assert len(await runs(sql)) == 1  # the follower runs nothing

    leader.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    async def taken_over() -> asyncpg.Record | None:
        active = [r for r in await runs(sql) if r["status"] == "running"]
        return active[0] if active and active[0]["runner"] == follower.runner else None

    new_run = await wait_for(taken_over, 10, what=f"the takeover:\n{follower.log()}")
    assert time.monotonic() - killed_at < 5
    orphan = await run_row(sql, run["id"])
    assert (orphan["status"], orphan["error"]) == ("failed", ORPHANED_ERROR)
    assert orphan["finished_at"] is not None
    assert (await model.leader(sql))["pid"] != holder["pid"]
    assert "event=leader_acquired" in follower.log() and "event=run_orphaned" in follower.log()

    # SIGTERM mid-run: the hanging fetch is abandoned, the run failed, the lock released, exit 0.
    follower.signal(signal.SIGTERM)
    assert await follower.wait_exit(10) == 0, follower.log()
    interrupted = await run_row(sql, new_run["id"])
    assert (interrupted["status"], interrupted["error"]) == ("failed", SHUTDOWN_ERROR)
    assert await model.leader(sql) is None
    assert [r for r in await runs(sql) if r["status"] == "running"] == []


async def test_sigterm_releases_the_lock_and_check_reports_it(db_url, sql, spawn, tmp_path) -> None:
    process = spawn({"XRATES_SOURCES": "demo", "XRATES_INTERVAL": "60"})

    async def first_done() -> bool:
        return any(r["status"] == "succeeded" for r in await runs(sql))

    await wait_for(first_done, 15, what=f"the first run:\n{process.log()}")
    code, output = await run_cli(db_url, tmp_path, {}, "--check")
    assert code == 0 and output.startswith("ok: leader"), output
    assert output.strip().count("\n") == 0

    process.signal(signal.SIGTERM)
    assert await process.wait_exit(10) == 0, process.log()
    assert "event=leader_released" in process.log()
    assert await model.leader(sql) is None
    assert await model.try_leader_lock(sql)  # another session can take it at once
    assert await model.release_leader_lock(sql)
    assert [r["status"] for r in await runs(sql)] == ["succeeded"]

    code, output = await run_cli(db_url, tmp_path, {}, "--check")
    assert code == 1 and "no updater holds the leader lock" in output, output
    code, output = await run_cli("postgresql://postgres@127.0.0.1:1/nope", tmp_path, {}, "--check")
    assert code == 1 and "database unreachable" in output, output


async def test_once_while_another_leads_queues_and_waits(db_url, sql, spawn, tmp_path) -> None:
    leader = spawn({"XRATES_SOURCES": "demo", "XRATES_INTERVAL": "60"})

    async def leading() -> bool:
        return any(r["status"] == "succeeded" for r in await runs(sql))

    await wait_for(leading, 15, what=f"the leader's first run:\n{leader.log()}")
    code, output = await run_cli(db_url, tmp_path, {"XRATES_SOURCES": "demo"}, "--once")
    assert code == 0, output
    assert "event=run_queued" in output and "event=run_outcome" in output
    manual = [r for r in await runs(sql) if r["trigger"] == "manual"]
    assert len(manual) == 1
    assert (manual[0]["status"], manual[0]["runner"]) == ("succeeded", leader.runner)


async def test_losing_the_lock_aborts_the_run_and_the_updater_retries(
        make_updater, upstream, sql) -> None:
    upstream.hang("ecb")
    updater = make_updater(feed_env(upstream, "ecb", XRATES_FETCH_TIMEOUT="30",
                                    XRATES_FETCH_ATTEMPTS="1"))
    async with running(updater):
        async def mid_run() -> asyncpg.Record | None:
            active = [r for r in await runs(sql) if r["status"] == "running"]
            return active[0] if active else None

        run = await wait_for(mid_run, 10, what="a run hanging on ecb")
        holder = await model.leader(sql)
        assert holder["pid"] == updater.lock_pid
        await sql.execute("SELECT pg_terminate_backend($1)", holder["pid"])

        lost = await wait_for(finished_run(sql, run["id"]), 5, what="the run to fail")
        assert lost["status"] == "failed" and lost["error"].startswith("leader lock lost")

        async def leading_again() -> asyncpg.Record | None:
            current = await model.leader(sql)
            return current if current is not None and current["pid"] != holder["pid"] else None

        await wait_for(leading_again, 5, what="the updater to take the lock again")
        await wait_for(mid_run, 5, what="the new leader's run")
    assert await rates(sql) == {}
    assert [r["status"] for r in await runs(sql)] == ["failed", "failed"]


async def test_no_commit_after_the_lock_is_lost(make_updater, upstream, sql) -> None:
    updater = make_updater(feed_env(upstream, "ecb"))
    assert await updater.try_lead()
    await sql.execute("SELECT pg_terminate_backend($1)", updater.lock_pid)
    async def lost() -> bool:
        return not updater.leading

    await wait_for(lost, 5, what="the lock connection's termination")
    quotes = FEEDS["ecb"].parse(payload(DEFAULT_PAYLOADS["ecb"]))
    with pytest.raises(LeaderLost):
        await updater.write_rates("ecb", quotes)
    assert await rates(sql) == {}


# =========================================================================== history
async def test_run_history_keeps_the_newest_thousand(make_updater, upstream, sql) -> None:
    queued = await model.queue_manual_run(sql)  # an unanswered request is never pruned
    await sql.execute(
        "INSERT INTO update_run (trigger, status, started_at, finished_at) "
        "SELECT 'schedule', 'succeeded', now(), now() FROM generate_series(1, 1100)")
    updater = make_updater(feed_env(upstream, "ecb"))
    run = await updater.run_once()
    assert run["status"] == "succeeded"

    ids = [r["id"] for r in await sql.fetch("SELECT id FROM update_run ORDER BY id DESC")]
    assert ids[0] == run["id"]
    assert ids[:1000] == list(range(run["id"], run["id"] - 1000, -1))
    assert ids[1000:] == [queued["id"]]
