"""The history fallback through intermediate currencies (`?date=`, `/history`) and
`/v1/convert?date=`: history inserted with the updater's own SQL, read through a real API
instance over real HTTP and PostgreSQL. No mocks."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from decimal import Decimal
from fractions import Fraction

import asyncpg
import pytest

import convert
import model

PAST = "public, max-age=86400"
MON, TUE, WED = date(2024, 2, 26), date(2024, 2, 27), date(2024, 2, 28)


async def put_history(sql: asyncpg.Connection, source: str, day: date,
                      *rows: tuple[str, str, str]) -> None:
    """(base, quote, rate) rows as ``source``'s history of ``day``."""
    as_of = datetime.combine(day, time(12), tzinfo=UTC)
    await sql.execute(model.UPSERT_FEED_HISTORY, source, [r[0] for r in rows],
                      [r[1] for r in rows], [Decimal(r[2]) for r in rows], [as_of] * len(rows))


def rounded(value: Fraction) -> float:
    return float(convert.plain(value))


@pytest.fixture
async def api(db_url, start_api):
    return await start_api(db_url, env={"XRATES_SOURCES": "ecb,boc"})


async def on_day(api, base: str, quote: str, day: str, **params: str) -> dict:
    response = await api.client.get(f"/v1/rates/{base}/{quote}", params={"date": day, **params})
    assert response.status_code == 200, response.text
    return response.json()


async def test_one_and_two_hops_on_one_day(api, sql) -> None:
    await put_history(sql, "ecb", MON, ("EUR", "USD", "1.08"), ("EUR", "JPY", "162.5"),
                      ("EUR", "GBP", "0.85"))
    await put_history(sql, "boc", MON, ("GBP", "ZAR", "23.9"))
    body = await on_day(api, "USD", "JPY", "2024-02-27")
    assert body == {"base": "USD", "quote": "JPY", "rate": rounded(Fraction("162.5") / Fraction("1.08")),
                    "source": "ecb", "date": "2024-02-26", "via": ["EUR"]}
    # USD -> EUR -> GBP -> ZAR: the boc leg is the lowest-priority one, so boc is reported.
    two = await on_day(api, "USD", "ZAR", "2024-02-26")
    assert two["via"] == ["EUR", "GBP"] and two["source"] == "boc"
    assert two["rate"] == rounded(Fraction("0.85") * Fraction("23.9") / Fraction("1.08"))
    # Only the named source's rows: ecb alone has no path to ZAR.
    response = await api.client.get("/v1/rates/USD/ZAR?date=2024-02-26&source=ecb")
    assert response.status_code == 404 and "error" in response.json()


async def test_legs_on_different_days_are_not_combined(api, sql) -> None:
    await put_history(sql, "ecb", MON, ("EUR", "USD", "1.08"))
    await put_history(sql, "ecb", TUE, ("EUR", "JPY", "162.5"))
    response = await api.client.get("/v1/rates/USD/JPY?date=2024-02-28")
    assert response.status_code == 404 and "error" in response.json()
    history = await api.client.get("/v1/rates/USD/JPY/history?start=2024-02-01&end=2024-02-28")
    assert history.status_code == 404
    converted = await api.client.get("/v1/convert?from=USD&to=JPY&date=2024-02-28")
    assert converted.status_code == 404 and "error" in converted.json()


async def test_the_newest_day_with_a_path_wins(api, sql) -> None:
    await put_history(sql, "ecb", MON, ("EUR", "USD", "1.08"), ("EUR", "JPY", "162.5"))
    await put_history(sql, "ecb", TUE, ("GBP", "USD", "1.26"), ("GBP", "JPY", "190"))
    await put_history(sql, "ecb", WED, ("EUR", "USD", "1.09"))  # half a path: not a day
    body = await on_day(api, "USD", "JPY", "2024-03-01")
    assert (body["date"], body["via"]) == ("2024-02-27", ["GBP"])
    assert body["rate"] == rounded(Fraction(190) / Fraction("1.26"))
    older = await on_day(api, "USD", "JPY", "2024-02-26")
    assert (older["date"], older["via"]) == ("2024-02-26", ["EUR"])
    # Beyond the 14-day lookback nothing is found.
    assert (await api.client.get("/v1/rates/USD/JPY?date=2024-03-12")).status_code == 200
    assert (await api.client.get("/v1/rates/USD/JPY?date=2024-03-13")).status_code == 404
    # A direct quote anywhere in the window beats a newer path.
    await put_history(sql, "boc", MON, ("USD", "JPY", "150"))
    direct = await on_day(api, "USD", "JPY", "2024-03-01")
    assert direct == {"base": "USD", "quote": "JPY", "rate": 150, "source": "boc",
                      "date": "2024-02-26", "via": []}


async def test_priority_between_sources(api, sql) -> None:
    # Via EUR through boc (priority 2), via GBP through ecb (priority 1): priority beats EUR.
    await put_history(sql, "boc", MON, ("EUR", "USD", "1.08"), ("EUR", "JPY", "162.5"))
    await put_history(sql, "ecb", MON, ("GBP", "USD", "1.26"), ("GBP", "JPY", "190"))
    body = await on_day(api, "USD", "JPY", "2024-02-26")
    assert (body["via"], body["source"]) == (["GBP"], "ecb")
    only_boc = await on_day(api, "USD", "JPY", "2024-02-26", source="boc")
    assert (only_boc["via"], only_boc["source"]) == (["EUR"], "boc")
    # One pair quoted by both sources that day: the higher-priority row prices the leg.
    await put_history(sql, "ecb", MON, ("EUR", "USD", "1.5"), ("EUR", "JPY", "150"))
    both = await on_day(api, "USD", "JPY", "2024-02-26")
    assert (both["via"], both["source"], both["rate"]) == (["EUR"], "ecb", 100)
    # manual outranks every feed.
    await put_history(sql, "manual", MON, ("CHF", "USD", "1.1"), ("CHF", "JPY", "170"))
    manual = await on_day(api, "USD", "JPY", "2024-02-26")
    assert (manual["via"], manual["source"]) == (["CHF"], "manual")


async def test_history_fills_a_day_by_a_path(api, sql) -> None:
    await put_history(sql, "ecb", MON, ("USD", "JPY", "150"))
    await put_history(sql, "ecb", TUE, ("EUR", "USD", "1.08"), ("EUR", "JPY", "162"))
    response = await api.client.get("/v1/rates/USD/JPY/history?start=2024-02-25&end=2024-02-28")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "base": "USD", "quote": "JPY", "start_date": "2024-02-26", "end_date": "2024-02-27",
        "rates": [{"date": "2024-02-26", "rate": 150, "source": "ecb", "via": []},
                  {"date": "2024-02-27", "rate": 150, "source": "ecb", "via": ["EUR"]}]}
    assert response.headers["cache-control"] == PAST
    # No lookback in /history: a path-only range gives just its days.
    only = await api.client.get("/v1/rates/JPY/USD/history?start=2024-02-27&end=2024-02-27")
    assert only.json()["rates"] == [{"date": "2024-02-27", "rate": rounded(Fraction("1.08") / 162),
                                     "source": "ecb", "via": ["EUR"]}]


async def test_convert_on_a_day(api, sql) -> None:
    await put_history(sql, "ecb", MON, ("EUR", "USD", "1.08"), ("EUR", "JPY", "162.5"))
    direct = await api.client.get("/v1/convert?from=EUR&to=USD&amount=10&date=2024-02-27")
    assert direct.status_code == 200, direct.text
    assert direct.json() == {"from": "EUR", "to": "USD", "amount": 10, "rate": 1.08,
                             "result": 10.8, "via": [], "date": "2024-02-26"}
    assert direct.headers["cache-control"] == PAST and direct.headers["etag"]
    again = await api.client.get("/v1/convert?from=EUR&to=USD&amount=10&date=2024-02-27",
                                 headers={"If-None-Match": direct.headers["etag"]})
    assert again.status_code == 304
    inverse = (await api.client.get("/v1/convert?from=USD&to=EUR&amount=3&date=2024-02-26")).json()
    assert inverse["rate"] == rounded(1 / Fraction("1.08"))
    assert inverse["result"] == rounded(3 / Fraction("1.08"))  # exact, rounded once
    pivot = (await api.client.get("/v1/convert?from=USD&to=JPY&amount=2&date=2024-02-26")).json()
    assert (pivot["via"], pivot["date"]) == (["EUR"], "2024-02-26")
    assert pivot["result"] == rounded(2 * Fraction("162.5") / Fraction("1.08"))
    # The current table is not read: no current rate exists, and without date= it is a 404.
    assert (await api.client.get("/v1/convert?from=EUR&to=USD")).status_code == 404
    for query, status in (("date=2024-02-10", 404), ("date=2024-02-30", 422),
                          ("date=20240226", 422), ("source=ecb", 422),
                          ("date=2024-02-26&source=Bad!", 422),
                          ("date=2024-02-26&source=boc", 404)):
        response = await api.client.get(f"/v1/convert?from=EUR&to=USD&{query}")
        assert response.status_code == status, (query, response.text)
        assert "error" in response.json()


async def test_convert_on_today_is_not_cached(api, sql) -> None:
    today = datetime.now(UTC).date()
    await put_history(sql, "ecb", today, ("EUR", "USD", "1.08"))
    response = await api.client.get(f"/v1/convert?from=EUR&to=USD&date={today}")
    assert response.status_code == 200, response.text
    assert response.json()["date"] == str(today)
    assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]


async def test_openapi_documents_convert_date(api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/convert"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    day_pattern = re.compile(params["date"]["schema"]["pattern"])
    assert day_pattern.match("2024-02-29") and not day_pattern.match("2024-02-30")
    assert "one day" in operation["description"] and "14 days" in operation["description"]
    for path in ("/v1/rates/{base}/{quote}", "/v1/rates/{base}/{quote}/history"):
        day = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}["date" if "history"
                                                                                 not in path else "start"]
        assert day["schema"]["pattern"] == params["date"]["schema"]["pattern"]
