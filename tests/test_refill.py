"""The warm refill (XRATES_WARM_REFILL, on by default): after a flush one bulk read refills the
cache, and /ready answers 200 only once it is done. Real PostgreSQL, real API processes."""

from __future__ import annotations

import asyncpg
import pytest
from conftest import metric, wait_for

import model

SEED = ("INSERT INTO rate (base, quote, rate, source, as_of) "
        "SELECT 'Q' || chr(65 + i / 26 % 26) || chr(65 + i % 26), 'USD', 1 + i / 1000.0, "
        "'manual', now() FROM generate_series(0, $1 - 1) AS i")


def pair(i: int) -> tuple[str, str]:
    return f"Q{chr(65 + i // 26 % 26)}{chr(65 + i % 26)}", "USD"


async def served(api, i: int) -> tuple[int, str, float]:
    base, quote = pair(i)
    response = await api.client.get(f"/v1/rates/{base}/{quote}")
    return response.status_code, response.headers["x-cache"], response.json()["rate"]


@pytest.mark.timeout(60)
async def test_an_instance_is_ready_with_every_row_cached(db_url, sql: asyncpg.Connection,
                                                          start_api) -> None:
    await sql.execute(SEED, 600)
    api = await start_api(db_url)  # waits for /ready 200: the refill is done by then
    answers = [await served(api, i) for i in range(600)]
    assert answers == [(200, "hit", round(1 + i / 1000, 3)) for i in range(600)]
    assert await metric(api, "xrates_cache_misses_total") == 0
    assert "event=refilled rows=600" in api.log()


@pytest.mark.timeout(60)
async def test_a_table_larger_than_the_cache_refills_its_most_recent_rows(
        db_url, sql: asyncpg.Connection, start_api) -> None:
    await sql.execute(SEED, 300)
    await sql.execute("UPDATE rate SET rate = rate + 1 WHERE base >= $1", pair(200)[0])
    api = await start_api(db_url, env={"XRATES_CACHE_SIZE": "100"})
    recent = [await served(api, i) for i in range(200, 300)]  # the 100 changed last
    assert recent == [(200, "hit", round(2 + i / 1000, 3)) for i in range(200, 300)]
    older = await served(api, 10)
    assert older == (200, "miss", 1.01)  # not refilled, still right
    assert await metric(api, "xrates_cache_size") <= 100


@pytest.mark.timeout(60)
async def test_a_flush_is_followed_by_a_refill(db_url, sql: asyncpg.Connection,
                                               start_api) -> None:
    await sql.execute(SEED, 50)
    api = await start_api(db_url)
    assert (await served(api, 7))[1] == "hit"
    await sql.execute("UPDATE rate SET rate = rate + 1")  # 50 notifications, then a flush
    await sql.fetchrow(model.FLUSH_CACHES, model.CHANNEL)

    async def refilled_twice() -> bool:
        return api.log().count("event=refilled rows=50") >= 2

    await wait_for(refilled_twice, 10, what="the refill after the flush")
    assert [await served(api, i) for i in range(50)] == [
        (200, "hit", round(2 + i / 1000, 3)) for i in range(50)]


@pytest.mark.timeout(60)
async def test_without_refill_the_cache_fills_by_misses(db_url, sql: asyncpg.Connection,
                                                        start_api) -> None:
    await sql.execute(SEED, 20)
    api = await start_api(db_url, env={"XRATES_WARM_REFILL": "0"})
    assert await served(api, 3) == (200, "miss", 1.003)
    assert await served(api, 3) == (200, "hit", 1.003)
    assert "event=refilled" not in api.log()
