"""Lists and conversion paths from a complete cache (views.py): a property test against the
brute-force answers over the same rows, and the HTTP routes on a real instance (answered
from memory, right after changes, with ETags; from the database when the cache is not
complete)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from conftest import metric, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

import convert
import model
import views
from cache import RateCache

CODES = ("EUR", "USD", "GBP", "JPY", "CHF", "SEK")
SOURCES = ("ecb", "boc")


def a_rate(base: str, quote: str, rate: str, source: str, version: int) -> model.Rate:
    return model.make_rate(base, quote, rate, source, "2026-01-01T00:00:00+00:00",
                           "2026-01-01T00:00:00+00:00", version)


def complete_views(size: int = 64) -> tuple[RateCache, views.MemoryViews]:
    cache = RateCache(size)
    cache.enable()
    refill = cache.begin_refill()
    cache.end_refill(refill, whole=True)  # an empty table, read whole
    return cache, views.MemoryViews(cache, convert.Priority(SOURCES), model.rate_source)


changes = st.lists(st.tuples(
    st.sampled_from(CODES), st.sampled_from(CODES),
    st.one_of(st.none(), st.sampled_from(["0.5", "2", "3.25", "150"])),
    st.sampled_from(("manual", "ecb", "boc", "other"))), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(changes=changes, src=st.sampled_from(CODES), dst=st.sampled_from(CODES),
       base=st.one_of(st.none(), st.sampled_from(CODES)),
       quote=st.one_of(st.none(), st.sampled_from(CODES)))
def test_views_answer_as_the_whole_table_would(changes, src, dst, base, quote) -> None:
    """Changes (upserts and deletes, read between them so memos are exercised) applied to a
    complete cache: every list and path equals the brute-force answer over the live rows."""
    cache, memory = complete_views()
    table: dict[str, model.Rate] = {}
    version = 0
    for b, q, rate, source in changes:
        if b == q:
            continue
        version += 1
        if rate is None:
            table.pop(b + q, None)
        else:
            table[b + q] = a_rate(b, q, rate, source, version)
        # the unfiltered list's answer, remembered at the generation before this change
        listed = memory.rates(None, None)
        assert listed is not None
        memory.remember_all(cache.generation, b",".join(r.body for r in listed), "etag")
        cache.apply(b + q, version, table.get(b + q))
        memory.path(src, dst)  # memoised at this generation; must not outlive it
        memory.rates(None, None)
    assert cache.complete
    remembered = memory.all_answer()  # never an answer from before a change
    assert remembered is None or remembered[0] == b",".join(table[k].body for k in sorted(table))
    expected = [table[k] for k in sorted(table)
                if (base is None or k[:3] == base) and (quote is None or k[3:] == quote)]
    assert memory.rates(base, quote) == expected
    if src == dst:
        return
    rows = [(r.base, r.quote, r.decimal, model.rate_source(r)) for r in table.values()]
    best = convert.find_path(rows, src, dst, SOURCES)
    answer = memory.path(src, dst)
    assert answer is not None
    assert answer.path == best
    if best is not None:
        assert answer.rate == best.rate
        assert answer.versions == tuple(table[leg.row.base + leg.row.quote].version
                                        for leg in best.legs)


def test_an_incomplete_cache_answers_nothing_from_memory() -> None:
    cache = RateCache(2)
    cache.enable()
    memory = views.MemoryViews(cache, convert.Priority(SOURCES), model.rate_source)
    cache.apply("EURUSD", 1, a_rate("EUR", "USD", "1.1", "ecb", 1))
    assert memory.rates(None, None) is None and memory.path("EUR", "USD") is None
    memory.remember_all(cache.generation, b"[]", "etag")
    assert memory.all_answer() is None


# --------------------------------------------------------------------------- over HTTP
async def put(api: httpx.AsyncClient, base: str, quote: str, rate: str,
              source: str = "manual") -> httpx.Response:
    response = await api.put(f"/v1/rates/{base}/{quote}", json={"rate": rate, "source": source})
    assert response.status_code in (200, 201), response.text
    return response


@pytest.mark.timeout(60)
async def test_lists_and_pivot_conversions_are_answered_from_memory(
        db_url: str, sql: asyncpg.Connection, start_api) -> None:
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) VALUES "
                      "('EUR', 'GBP', 0.85, 'manual', now()), ('EUR', 'JPY', 160, 'manual', now())")
    api = await start_api(db_url)
    assert await metric(api, "xrates_cache_complete") == 1
    client = api.client
    pivot = await client.get("/v1/convert", params={"from": "GBP", "to": "JPY", "amount": "2"})
    assert pivot.json()["via"] == ["EUR"] and pivot.json()["rate"] == pytest.approx(160 / 0.85)
    listed = await client.get("/v1/rates", params={"base": "EUR"})
    assert [r["quote"] for r in listed.json()["rates"]] == ["GBP", "JPY"]
    absent = await client.get("/v1/rates/GBP/CHF")
    assert (absent.status_code, absent.headers["x-cache"]) == (404, "hit")
    # A change committed elsewhere shows once its notification is applied: never an old path.
    await sql.execute("UPDATE rate SET rate = 170 WHERE base = 'EUR' AND quote = 'JPY'")

    async def repriced() -> bool:
        answer = await client.get("/v1/convert", params={"from": "GBP", "to": "JPY"})
        return answer.json()["rate"] == pytest.approx(170 / 0.85)

    await wait_for(repriced, 5, what="the pivot conversion to follow the new EUR/JPY")
    await put(client, "GBP", "JPY", "199")  # our own write: a direct row, read at once
    direct = (await client.get("/v1/convert", params={"from": "GBP", "to": "JPY"})).json()
    assert (direct["rate"], direct["via"]) == (199, [])
    assert await metric(api, 'xrates_view_reads_total{served="database"}') == 0
    assert await metric(api, 'xrates_view_reads_total{served="memory"}') >= 4


@pytest.mark.timeout(60)
async def test_list_and_conversion_etags_change_with_the_rows_they_depend_on(
        db_url: str, start_api) -> None:
    api = await start_api(db_url)
    client = api.client
    await put(client, "EUR", "GBP", "0.85")
    await put(client, "EUR", "JPY", "160")
    for path, params in (("/v1/rates", {}), ("/v1/convert", {"from": "GBP", "to": "JPY"})):
        first = await client.get(path, params=params)
        etag = first.headers["etag"]
        again = await client.get(path, params=params, headers={"If-None-Match": etag})
        assert (again.status_code, again.content) == (304, b"")
        # Same value from another source: the rounded answer may not change, the ETag does.
        await put(client, "EUR", "JPY", "160", source="boc")
        changed = await client.get(path, params=params, headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag


@pytest.mark.timeout(60)
async def test_a_table_larger_than_the_cache_is_listed_and_converted_from_the_database(
        db_url: str, sql: asyncpg.Connection, start_api) -> None:
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT 'EUR', code, 1 + i, 'manual', now() FROM unnest($1::text[]) "
                      "WITH ORDINALITY AS t(code, i)", ["USD", "GBP", "JPY", "CHF", "SEK"])
    api = await start_api(db_url, env={"XRATES_CACHE_SIZE": "3"})
    assert await metric(api, "xrates_cache_complete") == 0
    listed = (await api.client.get("/v1/rates", params={"base": "EUR"})).json()
    assert [r["quote"] for r in listed["rates"]] == ["CHF", "GBP", "JPY", "SEK", "USD"]
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "VALUES ('NOK', 'SEK', 0.9, 'manual', now())")
    pivot = (await api.client.get("/v1/convert", params={"from": "USD", "to": "SEK"})).json()
    assert pivot["via"] == ["EUR"] and pivot["rate"] == pytest.approx(6 / 2)
    two = (await api.client.get("/v1/convert", params={"from": "USD", "to": "NOK"})).json()
    assert two["via"] == ["EUR", "SEK"] and two["rate"] == pytest.approx(0.5 * 6 / 0.9)
    none = await api.client.get("/v1/convert", params={"from": "USD", "to": "PLN"})
    assert none.status_code == 404
    assert await metric(api, 'xrates_view_reads_total{served="database"}') == 4


async def test_the_rows_around_a_path_are_found_by_index_not_by_reading_the_table(
        sql: asyncpg.Connection) -> None:
    """A conversion on a table larger than the cache reads the rows of its two currencies as
    base and as quote: both by index (the bench's 66k-row table: p50 37 -> 2.8 ms)."""
    await sql.execute("SET enable_seqscan = off")  # a plan that must scan says "Seq Scan"
    plan = "\n".join(r[0] for r in await sql.fetch(
        "EXPLAIN " + model.SELECT_PATH_ROWS_AROUND.replace("$1", "'USD'").replace("$2", "'SEK'")))
    assert "Seq Scan" not in plan, plan
    assert "rate_quote" in plan and "rate_pkey" in plan, plan


# --------------------------------------------------------------------------- Frankfurter latest
FK_ROW = ("INSERT INTO rate_history (source, base, quote, day, rate, as_of) "
          "SELECT 'ecb', 'EUR', quote, $1::date, rate, $1::date + time '16:00' AT TIME ZONE 'UTC' "
          "FROM unnest($2::text[], $3::numeric[]) AS t(quote, rate)")


@pytest.mark.timeout(60)
async def test_frankfurter_latest_is_answered_from_memory_and_follows_history_changes(
        db_url: str, sql: asyncpg.Connection, start_api) -> None:
    today = datetime.now(UTC).date()
    await sql.execute(FK_ROW, today - timedelta(days=1), ["USD", "GBP"], [1.25, 0.8])
    api = await start_api(db_url, env={"XRATES_SOURCES": "ecb"})
    client = api.client
    # The refill copied the source's newest days (/ready waited for it): no request reads them.
    loaded = await metric(api, 'xrates_view_reads_total{served="database"}')
    assert loaded == 0
    for _ in range(3):
        latest = await client.get("/v1/latest", params={"base": "USD"})
        assert latest.json() == {"amount": 1.0, "base": "USD",
                                 "date": (today - timedelta(days=1)).isoformat(),
                                 "rates": {"EUR": 0.8, "GBP": 0.64}}
    currencies = (await client.get("/v1/currencies")).json()
    assert set(currencies) == {"EUR", "GBP", "USD"}
    assert await metric(api, 'xrates_view_reads_total{served="database"}') == loaded
    etag = latest.headers["etag"]
    again = await client.get("/v1/latest", params={"base": "USD"}, headers={"If-None-Match": etag})
    assert again.status_code == 304
    # A new day written elsewhere (the updater's statement) reaches the copy by notification.
    await sql.execute(FK_ROW, today, ["USD", "GBP"], [1.6, 0.8])

    async def new_day() -> bool:
        body = (await client.get("/v1/latest", params={"base": "USD"})).json()
        return body["date"] == today.isoformat() and body["rates"]["EUR"] == 0.625

    await wait_for(new_day, 5, what="latest to show the new day")
    changed = await client.get("/v1/latest", params={"base": "USD"}, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert await metric(api, 'xrates_view_reads_total{served="database"}') == loaded + 1
