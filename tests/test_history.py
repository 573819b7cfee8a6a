"""History storage: the schema and its upgrade, the updater's writes of every day of a
payload, the API's writes and deletes, and `updater.py --backfill` on the recorded ECB 90-day
file served over local HTTP. Real PostgreSQL, real HTTP, no mocks."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from conftest import ROOT
from recorded_feeds import payload, upstream  # noqa: F401 - fixture
from test_updater import make_updater  # noqa: F401 - fixture

import admin
import model
import util
from updater import backfill_window, demo_history

ECB_90D = "ecb/eurofxref-hist-90d_2023-12-01_to_2024-02-27.xml"
FIRST_DAY, LAST_DAY = date(2023, 11, 30), date(2024, 2, 27)
ECB_DAYS = 61  # business days in the file
ECB_CODES = 30


def whole_file_days() -> int:
    """A backfill of this many days ending today covers the whole (old) fixture."""
    return (datetime.now(UTC).date() - FIRST_DAY).days + 1


def ecb_env(upstream, **extra: str) -> dict[str, str]:
    upstream.serve("ecb-hist", payload(ECB_90D))
    return {"XRATES_SOURCES": "ecb", "XRATES_AUTO_MIGRATE": "0", "XRATES_FETCH_TIMEOUT": "2",
            "XRATES_FETCH_ATTEMPTS": "1", **upstream.env(),
            "XRATES_ECB_HISTORY_URL": upstream.url("ecb-hist"), **extra}


async def history(sql: asyncpg.Connection, source: str | None = None) -> list[asyncpg.Record]:
    return await sql.fetch(
        "SELECT source, base, quote, day, rate, as_of, updated_at FROM rate_history "
        "WHERE $1::text IS NULL OR source = $1 ORDER BY source, base, quote, day", source)


# --------------------------------------------------------------------------- schema
async def test_schema_upgrade_keeps_data_and_is_idempotent(sql: asyncpg.Connection) -> None:
    # The previous schema: no rate_history, update_run.trigger limited to schedule/manual.
    await sql.execute("DROP TABLE rate_history")
    await sql.execute("ALTER TABLE update_run DROP CONSTRAINT update_run_trigger_check")
    await sql.execute("ALTER TABLE update_run ADD CONSTRAINT update_run_trigger_check "
                      "CHECK (trigger IN ('schedule', 'manual'))")
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('EUR', 'USD', 1.0856, 'ecb', '2024-02-27')")
    await sql.execute("INSERT INTO update_run (trigger) VALUES ('manual')")
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("INSERT INTO update_run (trigger) VALUES ('backfill')")
    before = await sql.fetch("SELECT * FROM rate")
    for _ in range(2):  # upgrade, then apply again: nothing changes the second time
        await util.apply_schema(sql)
    assert await sql.fetch("SELECT * FROM rate") == before
    assert await sql.fetchval("SELECT count(*) FROM update_run") == 1
    await sql.execute("INSERT INTO update_run (trigger) VALUES ('backfill')")
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("INSERT INTO update_run (trigger) VALUES ('other')")
    assert await sql.fetchval("SELECT count(*) FROM rate_history") == 0
    indexes = {r["indexname"] for r in await sql.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'rate_history'")}
    assert {"rate_history_pkey", "rate_history_pair_day", "rate_history_source_day"} <= indexes
    # The constraint text is checked once: a second apply takes no lock on update_run.
    constraints = await sql.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'update_run'::regclass "
        "AND conname = 'update_run_trigger_check'")
    assert constraints == 1


async def test_day_is_the_utc_date_of_as_of(sql: asyncpg.Connection) -> None:
    await sql.execute("SET TimeZone = 'Pacific/Auckland'")  # the session's zone does not matter
    await sql.execute(model.UPSERT_FEED_HISTORY, "ecb", ["EUR"], ["USD"], [Decimal("1.1")],
                      [datetime(2024, 2, 27, 23, 30, tzinfo=UTC)])
    assert (await history(sql))[0]["day"] == date(2024, 2, 27)


# --------------------------------------------------------------------------- updater
async def test_every_day_of_a_payload_is_history(make_updater, upstream, sql) -> None:
    upstream.serve("ecb", payload(ECB_90D))  # the daily URL answering with 61 days
    run = await make_updater(ecb_env(upstream)).run_once()
    assert run["status"] == "succeeded", run
    rows = await history(sql, "ecb")
    assert len(rows) == ECB_DAYS * ECB_CODES
    assert {r["day"] for r in rows} == {r["day"] for r in rows if r["day"] >= FIRST_DAY}
    assert min(r["day"] for r in rows) == FIRST_DAY and max(r["day"] for r in rows) == LAST_DAY
    usd = {r["day"]: r["rate"] for r in rows if r["quote"] == "USD"}
    assert usd[date(2024, 2, 23)] == Decimal("1.0834") and usd[LAST_DAY] == Decimal("1.0856")
    current = await sql.fetchrow("SELECT rate, as_of FROM rate WHERE base='EUR' AND quote='USD'")
    assert current["rate"] == Decimal("1.0856") and current["as_of"].date() == LAST_DAY
    # Identical again: no history row is rewritten.
    stamps = {(r["quote"], r["day"]): r["updated_at"] for r in rows}
    assert (await make_updater(ecb_env(upstream)).run_once())["status"] == "succeeded"
    assert {(r["quote"], r["day"]): r["updated_at"] for r in await history(sql)} == stamps


async def test_outranked_and_older_days_are_history_too(make_updater, upstream, sql) -> None:
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('EUR', 'USD', 2, 'manual', now())")
    upstream.serve("ecb", payload(ECB_90D))
    assert (await make_updater(ecb_env(upstream)).run_once())["status"] == "succeeded"
    assert await sql.fetchval("SELECT rate FROM rate WHERE quote = 'USD'") == 2  # manual wins
    assert await sql.fetchval("SELECT count(*) FROM rate_history WHERE source = 'ecb' "
                              "AND quote = 'USD'") == ECB_DAYS


async def test_a_day_keeps_the_newest_value(sql: asyncpg.Connection) -> None:
    noon, evening = (datetime(2024, 2, 27, h, tzinfo=UTC) for h in (12, 18))
    for rate, as_of in (("1.1", noon), ("1.2", evening), ("1.3", noon)):  # the last is older
        await sql.execute(model.UPSERT_FEED_HISTORY, "demo", ["EUR"], ["USD"], [Decimal(rate)],
                          [as_of])
    [row] = await history(sql)
    assert (row["rate"], row["as_of"]) == (Decimal("1.2"), evening)
    stamp = row["updated_at"]
    await sql.execute(model.UPSERT_FEED_HISTORY, "demo", ["EUR"], ["USD"], [Decimal("1.20")],
                      [evening + timedelta(minutes=1)])  # the same value: nothing changes
    assert (await history(sql))[0]["updated_at"] == stamp


async def test_a_rejected_run_writes_no_history(make_updater, upstream, sql) -> None:
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('EUR', 'USD', 5, 'ecb', '2020-01-01')")
    upstream.serve("ecb", payload(ECB_90D))
    run = await make_updater(ecb_env(upstream)).run_once()
    assert run["status"] == "failed" and "jump guard" in run["sources"]["ecb"]["error"]
    assert await history(sql) == []


# --------------------------------------------------------------------------- API writes
async def test_api_writes_and_deletes_history(db_url, sql, start_api) -> None:
    api = await start_api(db_url)
    put = await api.client.put("/v1/rates/EUR/USD", json={"rate": "1.25",
                                                          "as_of": "2024-02-27T10:00:00Z"})
    assert put.status_code == 201
    post = await api.client.post("/v1/rates", json={"base": "EUR", "quote": "GBP", "rate": 0.85,
                                                    "source": "ecb", "as_of": "2024-02-26"})
    assert post.status_code == 201
    rows = [(r["source"], r["quote"], r["day"], r["rate"]) for r in await history(sql)]
    assert rows == [("ecb", "GBP", date(2024, 2, 26), Decimal("0.85")),
                    ("manual", "USD", date(2024, 2, 27), Decimal("1.25"))]
    # A 409 writes nothing, history included.
    again = await api.client.post("/v1/rates", json={"base": "EUR", "quote": "GBP", "rate": 9})
    assert again.status_code == 409 and len(await history(sql)) == 2
    # A manual entry of another day survives the delete of today's row.
    await sql.execute(model.UPSERT_FEED_HISTORY, "manual", ["EUR"], ["USD"], [Decimal("1.2")],
                      [datetime(2024, 2, 20, tzinfo=UTC)])
    await sql.execute(model.UPSERT_FEED_HISTORY, "ecb", ["EUR"], ["USD"], [Decimal("1.08")],
                      [datetime(2024, 2, 27, tzinfo=UTC)])
    assert (await api.client.delete("/v1/rates/EUR/USD")).status_code == 204
    left = [(r["source"], r["quote"], r["day"]) for r in await history(sql)]
    assert left == [("ecb", "GBP", date(2024, 2, 26)), ("ecb", "USD", date(2024, 2, 27)),
                    ("manual", "USD", date(2024, 2, 20))]
    assert (await api.client.delete("/v1/rates/EUR/USD")).status_code == 404
    # A feed-sourced row's delete leaves its feed history alone.
    assert (await api.client.delete("/v1/rates/EUR/GBP")).status_code == 204
    assert len(await history(sql, "ecb")) == 2


# --------------------------------------------------------------------------- backfill
async def run_backfill(db_url: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    environment = {"PATH": "/usr/bin:/bin", "DATABASE_URL": db_url, **env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "updater.py", *args, cwd=ROOT, env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(errors="replace")


async def test_backfill_cli_on_the_ecb_90_day_file(db_url, upstream, sql) -> None:
    env = ecb_env(upstream)
    upstream.fail("ecb", 500)  # the daily URL is not what a backfill reads
    code, out = await run_backfill(db_url, env, "--backfill", str(whole_file_days()),
                                   "--sources", "ecb")
    assert code == 0, out
    assert upstream.hits.get("ecb-hist") == 1 and not upstream.hits.get("ecb")
    rows = await history(sql, "ecb")
    assert len(rows) == ECB_DAYS * ECB_CODES
    run = await sql.fetchrow("SELECT * FROM update_run ORDER BY id DESC LIMIT 1")
    assert (run["trigger"], run["status"], list(run["requested"])) == ("backfill", "succeeded",
                                                                       ["ecb"])
    current = await sql.fetchrow("SELECT rate, as_of FROM rate WHERE quote = 'USD'")
    assert current["rate"] == Decimal("1.0856") and current["as_of"].date() == LAST_DAY
    # Idempotent: again, nothing changes.
    stamps = [r["updated_at"] for r in rows]
    code, out = await run_backfill(db_url, env, "--backfill", str(whole_file_days()))
    assert code == 0, out
    assert [r["updated_at"] for r in await history(sql, "ecb")] == stamps


async def test_backfill_never_moves_the_current_table_back_nor_jump_guards(
        db_url, upstream, sql) -> None:
    newer = datetime(2025, 1, 2, tzinfo=UTC)
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('EUR', 'USD', 5, 'ecb', $1), ('EUR', 'JPY', 999, 'ecb', "
                      "'2020-01-01')", newer)
    code, out = await run_backfill(db_url, ecb_env(upstream), "--backfill",
                                   str(whole_file_days()))
    assert code == 0, out
    current = {r["quote"]: r for r in await sql.fetch("SELECT * FROM rate")}
    assert current["USD"]["rate"] == 5 and current["USD"]["as_of"] == newer  # not moved back
    assert current["JPY"]["rate"] == Decimal("163.04")  # a jump, but backfills are not guarded


async def test_backfill_window_and_errors(db_url, upstream, sql) -> None:
    days = (datetime.now(UTC).date() - date(2024, 2, 1)).days + 1
    code, out = await run_backfill(db_url, ecb_env(upstream), "--backfill", str(days))
    assert code == 0, out
    assert await sql.fetchval("SELECT min(day) FROM rate_history") == date(2024, 2, 1)
    # A source without a multi-day endpoint fails alone; the run records it.
    code, out = await run_backfill(db_url, ecb_env(upstream), "--backfill", "5",
                                   "--sources", "privatbank")
    assert code == 1
    run = await sql.fetchrow("SELECT * FROM update_run ORDER BY id DESC LIMIT 1")
    assert "cannot backfill" in json.loads(run["sources"])["privatbank"]["error"]
    for bad in (["--backfill", "0"], ["--backfill", "x"], ["--backfill", "3", "--sources", "nope"],
                ["--sources", "ecb"]):
        code, out = await run_backfill(db_url, ecb_env(upstream), *bad)
        assert code == 2, (bad, out)


def test_demo_history_is_deterministic_daily() -> None:
    today = date(2026, 3, 1)
    quotes = demo_history(today, 90)
    assert quotes == demo_history(today, 90)
    days = {q.as_of for q in quotes}
    assert len(days) == 90 and all(d.hour == d.minute == 0 for d in days)
    assert min(days).date() == backfill_window(today, 90)[0] and max(days).date() == today


async def test_up_backfills_the_demo_once(db_url, sql) -> None:
    settings = util.load_settings({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0"})
    await admin.backfill_demo_once(db_url, settings)
    rows = await history(sql, "demo")
    assert len({r["day"] for r in rows}) == 90
    await admin.backfill_demo_once(db_url, settings)  # has history: no second run
    assert await sql.fetchval("SELECT count(*) FROM update_run WHERE trigger = 'backfill'") == 1


async def test_demo_history_serves_the_history_route(db_url, sql, start_api) -> None:
    settings = util.load_settings({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0"})
    await admin.backfill_demo_once(db_url, settings)
    api = await start_api(db_url)
    today = datetime.now(UTC).date()
    response = await api.client.get("/v1/rates/USD/EUR/history",
                                    params={"start": str(today - timedelta(days=89))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["rates"]) == 90 and body["rates"][0]["source"] == "demo"
    assert (await api.client.get("/v1/latest")).json()["date"] == str(today)
