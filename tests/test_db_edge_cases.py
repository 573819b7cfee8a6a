"""What a user's own SQL can do to an instance: win a deadlock or a serialization conflict
against an API write (the write is retried, not a 503), and store timestamps Python cannot
represent (served as PostgreSQL's text, no 500, no listener reconnect). Real database, real
API processes."""

from __future__ import annotations

import asyncio

import asyncpg
from conftest import ApiProcess, metric, wait_for
from test_guarantees import INSERT, get


async def _api_waits_on_a_lock(sql: asyncpg.Connection) -> bool:
    return bool(await sql.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'xrates-api' AND wait_event_type = 'Lock'"))


async def test_an_api_write_that_loses_a_deadlock_is_retried(db_url, sql, start_api) -> None:
    """A single-statement API write can only be in a wait cycle through the locks of its own
    key: an API DELETE locks the rate row, then its trigger takes the key's rate_floor row.
    A user's transaction takes them in the opposite order (floor row, then rate row).

    Determinism: the user's session waits with deadlock_timeout 20 s, the API's with the default
    1 s, and the user's second statement starts as soon as the API is seen waiting (well within
    that second), so the API's backend runs the deadlock check, finds the cycle and is the
    victim."""
    api = await start_api(db_url, env={"XRATES_DB_TIMEOUT": "5"})
    assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.1"})).status_code == 201
    user = await asyncpg.connect(db_url)
    try:
        transaction = user.transaction()
        await transaction.start()
        await user.execute("SET LOCAL deadlock_timeout = '20s'")
        await user.execute(
            "INSERT INTO rate_floor (base, quote, version) VALUES ('USD', 'EUR', 0) "
            "ON CONFLICT (base, quote) DO UPDATE SET version = rate_floor.version")
        delete = asyncio.create_task(api.client.delete("/v1/rates/USD/EUR"))
        await wait_for(lambda: _api_waits_on_a_lock(sql), 3, 0.01, "the API write to wait")
        await user.execute("UPDATE rate SET rate = 2.2 WHERE base = 'USD' AND quote = 'EUR'")
        await transaction.commit()  # the user's transaction won: the API's was rolled back
        response = await asyncio.wait_for(delete, 10)
    finally:
        await user.close()
    assert response.status_code == 204, response.text  # retried, not 503
    assert await sql.fetchval("SELECT count(*) FROM rate") == 0  # the retry deleted the row
    assert "event=statement_retry attempt=1 error=DeadlockDetectedError" in api.log()
    gone = await get(api, "USD", "EUR")
    assert gone.status_code == 404


async def test_an_api_write_that_hits_a_serialization_failure_is_retried(db_url, sql,
                                                                        start_api) -> None:
    """With default_transaction_isolation = repeatable read (a server setting from the URL),
    an upsert that waited for a concurrent update of its row fails with 40001 once that
    commits: fully deterministic."""
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    url = db_url + "?default_transaction_isolation=repeatable%20read"
    api = await start_api(url, env={"XRATES_DB_TIMEOUT": "5"})
    user = await asyncpg.connect(db_url)
    try:
        transaction = user.transaction()
        await transaction.start()
        await user.execute("UPDATE rate SET rate = 2.2 WHERE base = 'USD' AND quote = 'EUR'")
        put = asyncio.create_task(api.client.put("/v1/rates/USD/EUR", json={"rate": "3.3"}))
        await wait_for(lambda: _api_waits_on_a_lock(sql), 3, 0.01, "the API write to wait")
        await transaction.commit()
        response = await asyncio.wait_for(put, 10)
    finally:
        await user.close()
    assert response.status_code == 200, response.text
    assert response.json()["rate"] == 3.3
    assert await sql.fetchval("SELECT rate::text FROM rate") == "3.3"
    assert "event=statement_retry attempt=1 error=SerializationError" in api.log()


# --------------------------------------------------------------------------- odd timestamps
ODD = [("USD", "EUR", "infinity", "infinity"),
       ("GBP", "USD", "10000-01-01 00:00:00+00", "10000-01-01T00:00:00+00:00"),
       ("CHF", "JPY", "-infinity", "-infinity")]


async def _insert_odd(sql: asyncpg.Connection) -> None:
    for base, quote, as_of, _ in ODD:
        await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                          "VALUES ($1, $2, 1.5, 'manual', $3::text::timestamptz)",
                          base, quote, as_of)


async def _check_served(api: ApiProcess, how: str) -> None:
    for base, quote, _, text in ODD:
        response = await get(api, base, quote)
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == how
        assert response.json()["as_of"] == text
        assert response.json()["rate"] == 1.5
    listing = await api.client.get("/v1/rates")
    assert listing.status_code == 200 and listing.json()["count"] == len(ODD)
    converted = await api.client.get("/v1/convert?from=USD&to=EUR&amount=2")
    assert converted.status_code == 200 and converted.json()["result"] == 3


async def test_timestamps_python_cannot_hold_arrive_by_notification(db_url, sql,
                                                                   start_api) -> None:
    api = await start_api(db_url)
    await _insert_odd(sql)

    async def applied() -> bool:
        return await metric(api, "xrates_notifications_applied_total") >= len(ODD)

    await wait_for(applied, 5, what="the rows pushed")
    misses = await metric(api, "xrates_cache_misses_total")
    await _check_served(api, "hit")  # applied from the payload: no reconnect, no read
    assert await metric(api, "xrates_listener_reconnects_total") == 0
    # the pairs were hits; only convert's look-up of the absent inverse EUR/USD may miss
    assert await metric(api, "xrates_cache_misses_total") <= misses + 1
    assert api.log().count("event=timestamp_unparsed") >= 1


async def test_timestamps_python_cannot_hold_are_read_from_the_database(db_url, sql,
                                                                       start_api) -> None:
    await _insert_odd(sql)  # before the instances start
    api = await start_api(db_url, env={"XRATES_WARM_REFILL": "0"})  # its first reads miss
    await _check_served(api, "miss")
    refilled = await start_api(db_url)  # the warm refill reads them in bulk: hits at once
    await _check_served(refilled, "hit")
    bypass = await start_api(db_url, env={"XRATES_CACHE_SIZE": "0"})
    await _check_served(bypass, "bypass")
    assert await metric(api, "xrates_listener_reconnects_total") == 0


async def test_a_database_that_refuses_new_connections_answers_503_not_500(db_url, pg,
                                                                         start_api) -> None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS false (maintenance, a drop under way): a request
    that needs a new pooled connection is told the database is unavailable."""
    api = await start_api(db_url, env={"XRATES_WARM_REFILL": "0"})
    db = db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND application_name = 'xrates-api'", db)
        for _ in range(3):  # the first may meet the terminated connection, the rest a new one
            response = await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.5"})
            assert response.status_code == 503, response.text
            assert response.json()["error"].startswith("database unavailable"), response.text
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()

    async def writes_again() -> bool:
        return (await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.5"})).status_code in (
            200, 201)

    await wait_for(writes_again, 10, what="writes once connections are allowed again")
