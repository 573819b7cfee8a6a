"""triggers.sql against a real PostgreSQL: contract §3's version order and lock order under every
transaction shape, big and odd writes, and notification payloads (§5.1).

Every test here failed on the triggers.sql that took a per-key advisory lock in its BEFORE
INSERT trigger (deadlocks, "out of shared memory", "payload string too long", a folded flush).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from conftest import create_database, serves_row, wait_for

import model
import util

KEYS = [("EUR", "GBP"), ("USD", "EUR"), ("USD", "GBP")]  # sorted: multi-key shapes go in this order
COLUMNS = ["base", "quote", "rate", "source", "as_of"]
PAYLOAD_LIMIT = 8000  # PostgreSQL rejects a NOTIFY payload of 8000 bytes or more
BARRIER_PREFIX = '{"op":"hb","id":"test-barrier"'  # ignored by every instance's listener
SESSION = {"deadlock_timeout": "50ms", "statement_timeout": "20s"}  # find deadlocks fast


def insert_sql(table: str, rows: int = 1, conflict: str = "") -> str:
    values = ", ".join(f"(${4 * i + 1}, ${4 * i + 2}, ${4 * i + 3}::numeric, 'manual', ${4 * i + 4})"
                       for i in range(rows))
    return f"INSERT INTO {table} (base, quote, rate, source, as_of) VALUES {values} {conflict}"


UPSERT = "ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate, as_of = EXCLUDED.as_of"


# --------------------------------------------------------------------------- the listener
@dataclass
class Stream:
    """Every notification on the xrates channel, in arrival (= commit) order."""

    payloads: list[str] = field(default_factory=list)
    barriers: set[str] = field(default_factory=set)

    def on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        if payload.startswith(BARRIER_PREFIX):
            self.barriers.add(json.loads(payload)["n"])
        elif not payload.startswith('{"op":"hb"'):
            self.payloads.append(payload)

    def messages(self) -> list[dict]:
        return [json.loads(p) for p in self.payloads]

    def rows(self) -> list[tuple[str, list]]:
        """(op, row) per notified row; a flush as ("flush", [])."""
        out: list[tuple[str, list]] = []
        for message in self.messages():
            if message["op"] == "flush":
                out.append(("flush", []))
            out.extend((message["op"], row) for row in message.get("rows", []))
        return out

    def check_payloads(self) -> None:
        sizes = [len(p.encode()) for p in self.payloads]
        assert not sizes or max(sizes) < PAYLOAD_LIMIT, max(sizes)
        assert len(set(self.payloads)) == len(self.payloads), "a payload was sent twice"


@contextlib.asynccontextmanager
async def listening(db_url: str):
    conn = await asyncpg.connect(db_url)
    stream = Stream()
    await conn.add_listener(model.CHANNEL, stream.on_notify)
    try:
        yield stream, conn
    finally:
        await conn.close()


async def caught_up(stream: Stream, sql: asyncpg.Connection) -> None:
    """Wait until everything committed so far has reached the listener: NOTIFY a barrier
    (delivered in commit order) and wait for it."""
    n = f"{time.monotonic_ns()}"
    await sql.execute("SELECT pg_notify($1, $2)", model.CHANNEL, f'{BARRIER_PREFIX},"n":"{n}"}}')
    await wait_for(lambda: _true(n in stream.barriers), 10, what="barrier notification")


async def _true(value: bool) -> bool:
    return value


async def wait_until_blocked(sql: asyncpg.Connection, conn: asyncpg.Connection) -> None:
    """Wait until ``conn``'s backend waits on a lock."""
    pid = conn.get_server_pid()

    async def blocked() -> bool:
        return bool(await sql.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid))

    await wait_for(blocked, 10, what=f"backend {pid} waiting on a lock")


def final_states(rows: list[tuple[str, list]]) -> dict[str, tuple]:
    """The last notified state per key: ("d", version) or ("u", version, rate, source)."""
    last: dict[str, tuple] = {}
    for op, row in rows:
        if op == "u":
            last[row[0]] = ("u", row[1], row[2], row[3])
        elif op == "d":
            last[row[0]] = ("d", row[1])
    return last


def check_order_and_final(rows: list[tuple[str, list]], table: list[asyncpg.Record],
                          only_notified: bool = False) -> None:
    """Per key, versions strictly increase in the stream, and the table equals the last
    notification per key (a tombstone: absent); ``only_notified``: ignore rows never notified."""
    per_key: dict[str, list[int]] = defaultdict(list)
    for op, row in rows:
        if op in ("u", "d"):
            per_key[row[0]].append(row[1])
    for key, versions in per_key.items():
        bad = [(a, b) for a, b in itertools.pairwise(versions) if b <= a]
        assert not bad, f"{key}: versions not increasing in the stream: {bad[:5]}"
    stored = {r["key"]: ("u", r["version"], r["rate"], r["source"]) for r in table}
    last = final_states(rows)
    if only_notified:
        stored = {key: state for key, state in stored.items() if key in last}
    for key in set(stored) | set(last):
        state = last.get(key)
        if state is None or state[0] == "d":
            assert key not in stored, f"{key}: notified {state}, stored {stored[key]}"
        else:
            assert stored.get(key) == state, f"{key}: notified {state}, stored {stored.get(key)}"


async def table_rows(sql: asyncpg.Connection, table: str = "rate") -> list[asyncpg.Record]:
    return await sql.fetch(f"SELECT base || quote AS key, version, rate::text AS rate, source "
                           f"FROM {table} ORDER BY 1")


# --------------------------------------------------------------------------- one deadlock, step by step
async def delete_reinsert_against_upsert(db_url: str, sql: asyncpg.Connection,
                                         isolation: str = "read committed") -> None:
    """A: BEGIN; DELETE k; INSERT k. B: INSERT k ... ON CONFLICT DO UPDATE (waits on A, with
    a version drawn now). A: DELETE k (a tombstone above B's draw); COMMIT. No deadlock, and
    B's row commits with a version above that tombstone, which its notification carries."""
    now = datetime.now(UTC)
    await sql.execute(insert_sql("rate"), "USD", "EUR", "1.0", now)
    async with listening(db_url) as (stream, _):
        a = await asyncpg.connect(db_url, server_settings=SESSION)
        b = await asyncpg.connect(db_url, server_settings=SESSION)
        try:
            tx = a.transaction()
            await tx.start()
            await a.execute("DELETE FROM rate WHERE base = 'USD' AND quote = 'EUR'")
            b_tx = b.transaction(isolation=isolation.replace(" ", "_"))
            await b_tx.start()  # B's snapshot: taken by its upsert, before A commits
            upsert = asyncio.ensure_future(
                b.fetchval(insert_sql("rate", conflict=UPSERT) + " RETURNING version",
                           "USD", "EUR", "3.0", now))
            await wait_until_blocked(sql, b)
            await a.execute(insert_sql("rate"), "USD", "EUR", "2.0", now)
            tombstone = await a.fetchval("SELECT rate_delete('USD', 'EUR')")
            await tx.commit()
            drawn = await asyncio.wait_for(upsert, 10)
            await b_tx.commit()
            # B drew before the tombstone (RETURNING shows that first draw): its row was re-drawn.
            assert drawn < tombstone
        finally:
            await a.close()
            await b.close()
        await caught_up(stream, sql)
        stream.check_payloads()
        rows = stream.rows()
    final = await sql.fetchrow("SELECT version, rate::text AS rate FROM rate "
                               "WHERE base = 'USD' AND quote = 'EUR'")
    assert final["rate"] == "3.0" and final["version"] > tombstone
    assert [(op, row[1]) for op, row in rows][-2:] == [("d", tombstone), ("u", final["version"])]
    check_order_and_final(rows, await table_rows(sql), only_notified=True)


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read", "serializable"])
async def test_delete_and_reinsert_in_one_transaction_against_an_upsert(db_url, sql,
                                                                        isolation) -> None:
    # REPEATABLE READ and SERIALIZABLE: B cannot see A's floor (committed after B's snapshot).
    await delete_reinsert_against_upsert(db_url, sql, isolation)


# --------------------------------------------------------------------------- the stress test
@dataclass
class Load:
    committed: int = 0
    unique_violations: int = 0
    deadlocks: int = 0
    shapes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)


def _shapes(table: str) -> dict[str, Callable[..., Awaitable[None]]]:
    """Every transaction shape of the load. Within one transaction keys are taken in KEYS
    order, so the load itself cannot deadlock (the control run on a plain table proves it)."""
    one = "WHERE base = $1 AND quote = $2"
    locked = (f"SELECT base, quote FROM {table} WHERE base || quote = ANY($1::text[]) "
              f"ORDER BY base, quote FOR UPDATE")

    async def delete_insert(conn, k, r, now):
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {table} {one}", *k)
            await conn.execute(insert_sql(table), *k, r, now)

    async def upsert(conn, k, r, now):
        await conn.execute(insert_sql(table, conflict=UPSERT), *k, r, now)

    async def delete(conn, k, r, now):
        await conn.execute(f"DELETE FROM {table} {one}", *k)

    async def insert(conn, k, r, now):
        await conn.execute(insert_sql(table), *k, r, now)

    async def update_twice(conn, k, r, now):
        async with conn.transaction():
            await conn.execute(f"UPDATE {table} SET rate = $3::numeric {one}", *k, r)
            await conn.execute(f"UPDATE {table} SET rate = rate + 1 {one}", *k)

    async def savepoint(conn, k, r, now):
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {table} {one}", *k)
            await conn.execute("SAVEPOINT s")
            await conn.execute(insert_sql(table, conflict=UPSERT), *k, "999", now)
            await conn.execute(f"DELETE FROM {table} {one}", *k)
            await conn.execute("ROLLBACK TO SAVEPOINT s")
            await conn.execute(insert_sql(table, conflict=UPSERT), *k, r, now)

    async def multi_upsert(conn, k, r, now):
        args = [v for key in KEYS for v in (*key, r, now)]
        await conn.execute(insert_sql(table, len(KEYS), UPSERT), *args)

    async def multi_update(conn, k, r, now):
        await conn.execute(f"UPDATE {table} t SET rate = $2::numeric FROM ({locked}) s "
                           f"WHERE t.base = s.base AND t.quote = s.quote",
                           ["".join(key) for key in KEYS], r)

    async def multi_delete(conn, k, r, now):
        await conn.execute(f"DELETE FROM {table} t USING ({locked}) s "
                           f"WHERE t.base = s.base AND t.quote = s.quote",
                           ["".join(key) for key in KEYS[1:]])

    async def delete_copy(conn, k, r, now):  # one key: the DELETE may lock nothing
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {table} {one}", *k)
            await conn.copy_records_to_table(table, columns=COLUMNS,
                                             records=[(*k, Decimal(r), "manual", now)])

    async def copy(conn, k, r, now):  # several keys, nothing held before: in KEYS order
        await conn.copy_records_to_table(
            table, columns=COLUMNS, records=[(*key, Decimal(r), "manual", now) for key in KEYS[1:]])

    return {f.__name__: f for f in (delete_insert, upsert, delete, insert, update_twice,
                                    savepoint, multi_upsert, multi_update, multi_delete,
                                    delete_copy, copy)}


async def run_load(db_url: str, table: str, seconds: float, workers: int = 7,
                   seed: int = 3) -> Load:
    load = Load()
    shapes = _shapes(table)
    names = sorted(shapes)
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        conn = await asyncpg.connect(db_url, server_settings=SESSION)
        try:
            while time.monotonic() < deadline:
                name = rng.choice(names)
                key = rng.choice(KEYS)
                rate = f"{rng.randint(1, 10**6)}.{rng.randint(0, 999):03d}"
                try:
                    await shapes[name](conn, key, rate, datetime.now(UTC))
                    load.committed += 1
                    load.shapes[name] += 1
                except asyncpg.UniqueViolationError:
                    load.unique_violations += 1  # a plain INSERT over a live row: expected
                except asyncpg.DeadlockDetectedError:
                    load.deadlocks += 1
                except asyncpg.PostgresError as exc:
                    load.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            await conn.close()

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return load


def report(label: str, load: Load) -> str:
    line = (f"{label}: deadlocks={load.deadlocks} committed={load.committed} "
            f"unique_violations={load.unique_violations} errors={len(load.errors)} "
            f"shapes={dict(sorted(load.shapes.items()))}")
    print(line)
    return line


async def test_mixed_transaction_shapes_never_deadlock(db_url, sql) -> None:
    await sql.execute("CREATE TABLE rate_plain (LIKE rate INCLUDING DEFAULTS INCLUDING "
                      "CONSTRAINTS INCLUDING INDEXES)")  # the control: no triggers
    control = await run_load(db_url, "rate_plain", 4.0)
    async with listening(db_url) as (stream, _):
        load = await run_load(db_url, "rate", 6.0)
        await caught_up(stream, sql)
        stream.check_payloads()
        rows = stream.rows()
    summary = report("control (no triggers)", control) + "\n" + report("triggers", load)
    assert control.deadlocks == 0 and not control.errors, summary  # the load is deadlock-free
    assert load.deadlocks == 0, summary
    assert not load.errors, summary + "\n" + "\n".join(load.errors[:10])
    assert all(load.shapes[name] > 0 for name in _shapes("rate")), summary
    check_order_and_final(rows, await table_rows(sql))
    # Retention: a floor lives only until its key's next insert, so no live key has one.
    assert await sql.fetchval("SELECT count(*) FROM rate_floor JOIN rate USING (base, quote)") == 0
    assert await sql.fetchval("SELECT count(*) FROM rate_floor") <= len(KEYS)


async def test_a_floor_lives_until_its_keys_next_insert(db_url, sql) -> None:
    now = datetime.now(UTC)

    async def floors() -> dict[str, int]:
        return {r["key"]: r["version"] for r in await sql.fetch(
            "SELECT base || quote AS key, version FROM rate_floor")}

    await sql.execute(insert_sql("rate", 3), *[v for k in KEYS for v in (*k, "1.5", now)])
    tombstone = await sql.fetchval("SELECT rate_delete('USD', 'EUR')")
    assert await floors() == {"USDEUR": tombstone}
    await sql.execute("DELETE FROM rate WHERE base = 'USD' AND quote = 'GBP'")
    assert set(await floors()) == {"USDEUR", "USDGBP"}
    kept = await floors()
    tx = sql.transaction()  # an insert that rolls back takes the floor's drop back with it
    await tx.start()
    await sql.execute(insert_sql("rate"), "USD", "EUR", "2", now)
    assert set(await floors()) == {"USDGBP"}
    await tx.rollback()
    assert await floors() == kept
    await sql.copy_records_to_table("rate", columns=COLUMNS,
                                    records=[("USD", "EUR", Decimal(2), "manual", now)])
    assert set(await floors()) == {"USDGBP"}
    await sql.execute(insert_sql("rate", conflict=UPSERT), "USD", "GBP", "3", now)
    assert await floors() == {}


async def test_api_instances_converge_during_the_sql_load(db_url, sql, start_api) -> None:
    apis = [await start_api(db_url), await start_api(db_url)]
    statuses: dict[int, int] = defaultdict(int)
    deadline = time.monotonic() + 4.0

    async def writer(api, n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < deadline:
            base, quote = rng.choice(KEYS)
            if rng.random() < 0.6:
                response = await api.client.put(f"/v1/rates/{base}/{quote}",
                                                json={"rate": f"{rng.randint(1, 9999)}.5"})
            else:
                response = await api.client.delete(f"/v1/rates/{base}/{quote}")
            statuses[response.status_code] += 1

    load, *_ = await asyncio.gather(run_load(db_url, "rate", 4.0, workers=5),
                                    *(writer(api, n) for n, api in enumerate(apis)))
    summary = report("triggers + 2 API instances", load) + f" api_statuses={dict(statuses)}"
    assert load.deadlocks == 0 and not load.errors, summary
    assert set(statuses) <= {200, 201, 204, 404}, summary

    async def every_instance_serves_the_database() -> bool:
        for base, quote in KEYS:
            version = await sql.fetchval("SELECT version FROM rate WHERE base = $1 AND quote = $2",
                                         base, quote)
            for api in apis:
                if not await serves_row(api, base, quote, version):
                    return False
        return True

    await wait_for(every_instance_serves_the_database, 10, what="instances equal the database")


# --------------------------------------------------------------------------- big and odd writes
def code(n: int) -> str:
    """The n-th three-letter code (AAA, AAB, ...); n < 10,000 never starts with Z."""
    return chr(65 + n // 676) + chr(65 + n % 676 // 26) + chr(65 + n % 26)


async def test_big_inserts_and_copy_on_a_server_with_default_lock_settings(tmp_path: Path) -> None:
    """No per-row advisory locks: 20,000 rows in one INSERT ... SELECT, one COPY and one DELETE
    fit the stock lock table (max_connections=100, max_locks_per_transaction=64)."""
    server = util.EmbeddedPostgres(tmp_path / "stock", durable=False, max_connections=None)
    url = server.start()
    try:
        conn = await asyncpg.connect(url)
        try:
            await util.apply_schema(conn)
            assert await conn.fetchval("SHOW max_locks_per_transaction") == "64"
            async with listening(url) as (stream, _):
                insert_select = (
                    "INSERT INTO rate (base, quote, rate, source, as_of) "
                    "SELECT chr(65 + i % 10000 / 676) || chr(65 + i % 676 / 26) || chr(65 + i % 26), "
                    "CASE WHEN i < 10000 THEN 'ZZA' ELSE 'ZZB' END, 1 + i / 1000.0, 'manual', now() "
                    "FROM generate_series(0, 19999) i")
                await conn.execute(insert_select)
                await conn.copy_records_to_table("rate", columns=COLUMNS, records=[
                    (code(i % 10000), "ZZC" if i < 10000 else "ZZD", Decimal(i + 1), "manual",
                     datetime.now(UTC)) for i in range(20000)])
                assert await conn.fetchval("SELECT count(*) FROM rate") == 40000
                # 20,000 deletes write 20,000 floors (row locks live in the rows, not in the
                # lock table); inserting the keys again drops them.
                await conn.execute("DELETE FROM rate WHERE quote IN ('ZZA', 'ZZB')")
                assert await conn.fetchval("SELECT count(*) FROM rate_floor") == 20000
                await conn.execute(insert_select)
                assert await conn.fetchval("SELECT count(*) FROM rate_floor") == 0
                await caught_up(stream, conn)
                stream.check_payloads()
                rows = stream.rows()
                assert len(rows) == 80000
                check_order_and_final(rows, await table_rows(conn))
        finally:
            await conn.close()
    finally:
        server.stop("immediate")
    assert server.running_pid() is None


async def test_payloads_are_chunked_by_bytes(db_url, sql) -> None:
    """Long numerics written by plain SQL (still within the CHECK) never make a payload of
    8000 bytes or more, and every row arrives with its exact text."""
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT 'AA' || chr(65 + i), 'ZZZ', 1.5, 'manual', now() "
                      "FROM generate_series(0, 11) i")
    async with listening(db_url) as (stream, _):
        for _ in range(25):  # each step adds three digits: the text grows to ~80 bytes
            await sql.execute("UPDATE rate SET rate = rate * 1.001")
        # A jump: ~2,500-digit rates, so three rows no longer fit in one payload ...
        await sql.execute("UPDATE rate SET rate = rate * (1 + 1e-2500)")
        # ... and one row of ~6,000 digits, close to the limit on its own.
        await sql.execute("UPDATE rate SET rate = rate * (1 + 1e-3400) WHERE base = 'AAA'")
        await caught_up(stream, sql)
        stream.check_payloads()
        rows = stream.rows()
    stored = await table_rows(sql)
    assert max(len(r["rate"]) for r in stored) > 5900
    assert len(rows) == 25 * 12 + 12 + 1
    check_order_and_final(rows, stored)


async def test_a_row_too_big_for_any_payload_flushes_instead_of_failing(db_url, sql) -> None:
    await sql.execute(insert_sql("rate"), "USD", "EUR", "1.5", datetime.now(UTC))
    async with listening(db_url) as (stream, _):
        await sql.execute("UPDATE rate SET rate = rate * (1 + 1e-9000)")  # ~9,000 digits
        await caught_up(stream, sql)
        stream.check_payloads()
        messages = stream.messages()
    assert len(await sql.fetchval("SELECT rate::text FROM rate")) > 9000
    assert [m["op"] for m in messages] == ["flush"]  # every cache drops the pair and re-reads


async def test_every_payload_is_unique_so_none_is_folded(db_url, sql) -> None:
    """PostgreSQL delivers identical payloads of one transaction once: two flushes in one
    transaction must differ, or caches would keep a row the second TRUNCATE removed."""
    now = datetime.now(UTC)
    async with listening(db_url) as (stream, _):
        async with sql.transaction():
            await sql.execute("TRUNCATE rate")
            await sql.execute(insert_sql("rate"), "USD", "EUR", "1.1", now)
            await sql.execute("TRUNCATE rate")
            await sql.execute(insert_sql("rate"), "USD", "GBP", "1.2", now)
        await caught_up(stream, sql)
        stream.check_payloads()
        rows = stream.rows()
    assert [(op, row[:1]) for op, row in rows] == [
        ("flush", []), ("u", ["USDEUR"]), ("flush", []), ("u", ["USDGBP"])]
    flushes = [m["version"] for m in stream.messages() if m["op"] == "flush"]
    versions = [flushes[0], rows[1][1][1], flushes[1], rows[3][1][1]]
    assert versions == sorted(versions), versions  # each flush carries a fresh version


# --------------------------------------------------------------------------- upgrade
# triggers.sql as it was before the version floor (the per-key advisory lock), a frozen
# fixture: an upgrade from it must keep the data.
OLD_SCHEMA = Path(__file__).parent / "fixtures" / "triggers_v1.sql"


async def test_upgrading_a_database_of_the_old_schema_keeps_its_data(pg) -> None:
    url = await create_database(pg, f"xrates_upgrade_{time.monotonic_ns()}")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(OLD_SCHEMA.read_text())
        await conn.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                           "SELECT 'AA' || chr(65 + i), 'ZZZ', 1 + i, 'ecb', now() "
                           "FROM generate_series(0, 25) i")
        await conn.execute("DELETE FROM rate WHERE base = 'AAZ'")
        before = await table_rows(conn)
        last_version = await conn.fetchval("SELECT last_value FROM rate_version_seq")
        await util.apply_schema(conn)
        await util.apply_schema(conn)  # applied at every start: idempotent
        assert await table_rows(conn) == before
        assert await conn.fetchval("SELECT last_value FROM rate_version_seq") == last_version
        await delete_reinsert_against_upsert(url, conn)  # the new lock order is in place
        assert len(await table_rows(conn)) == len(before) + 1
    finally:
        await conn.close()
