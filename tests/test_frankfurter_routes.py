"""The Frankfurter v1 routes and the xrates history reads through a real API
instance whose history was backfilled from the recorded ECB 90-day file (served over local
HTTP). Golden values come from that fixture, and every v1 body must equal what the pure
frankfurter.py computes over the same file."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from recorded_feeds import payload, upstream  # noqa: F401 - fixture
from test_frankfurter import ecb_history
from test_history import ECB_90D, whole_file_days

import frankfurter as fk
import util
from updater import Updater

PAST = "public, max-age=86400"


async def load_ecb_history(db_url: str, upstream) -> None:
    """`--backfill` of the whole ECB fixture, in-process."""
    upstream.serve("ecb-hist", payload(ECB_90D))
    settings = util.load_settings({"DATABASE_URL": db_url, "XRATES_SOURCES": "ecb",
                                   "XRATES_AUTO_MIGRATE": "0",
                                   "XRATES_ECB_HISTORY_URL": upstream.url("ecb-hist")})
    updater = Updater(settings, db_url)
    try:
        run = await updater.run_backfill(whole_file_days(), ["ecb"])
    finally:
        await updater.close()
    assert run["status"] == "succeeded", run


@pytest.fixture
async def api(db_url, upstream, start_api):
    await load_ecb_history(db_url, upstream)
    return await start_api(db_url, env={"XRATES_SOURCES": "ecb"})


def expected(kind: str, args: dict[str, list[str]], *extra: object) -> dict:
    query = fk.parse_query(args)
    function = {"day": fk.on_day, "latest": fk.latest, "series": fk.series}[kind]
    return function(ecb_history(), "EUR", query, *extra)


async def test_latest_is_the_newest_day_however_old(api) -> None:
    today = datetime.now(UTC).date()
    for path in ("/v1/latest", "/latest", "/v1/current", "/current"):
        response = await api.client.get(path, params={"from": "USD", "to": "EUR,GBP,IDR"})
        assert response.status_code == 200, response.text
        assert response.json() == {"amount": 1.0, "base": "USD", "date": "2024-02-27",
                                   "rates": {"EUR": 0.92115, "GBP": 0.78869, "IDR": 15637}}
        assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = (await api.client.get("/v1/latest")).content
    assert body == fk.encode(expected("latest", {}, today))


async def test_days_snap_and_match_the_pure_core(api) -> None:
    for asked, used in (("2024-02-25", "2024-02-23"), ("2024-01-01", "2023-12-29"),
                        ("2024-03-12", "2024-02-27"), ("2024-02-27", "2024-02-27")):
        for params in ({}, {"from": "USD", "amount": "10"}, {"symbols": "USD,JPY"}):
            response = await api.client.get(f"/v1/{asked}", params=params)
            assert response.status_code == 200, (asked, params, response.text)
            assert response.json()["date"] == used
            args = {k: [v] for k, v in params.items()}
            assert response.content == fk.encode(expected("day", args, fk.parse_day(asked)))
            assert response.headers["cache-control"] == PAST
    unversioned = await api.client.get("/2024-02-25", params={"symbols": "USD"})
    assert unversioned.json() == {"amount": 1.0, "base": "EUR", "date": "2024-02-23",
                                  "rates": {"USD": 1.0834}}


async def test_series(api) -> None:
    today = datetime.now(UTC).date()
    response = await api.client.get("/v1/2024-02-24..2024-02-26", params={"symbols": "USD"})
    assert response.json() == {"amount": 1.0, "base": "EUR", "start_date": "2024-02-23",
                               "end_date": "2024-02-26",
                               "rates": {"2024-02-23": {"USD": 1.0834},
                                         "2024-02-26": {"USD": 1.0852}}}
    assert response.headers["cache-control"] == PAST
    for path, start, end in (("/v1/2023-12-01..2024-02-27", "2023-12-01", "2024-02-27"),
                             ("/2024-02-01..", "2024-02-01", None)):
        response = await api.client.get(path, params={"from": "GBP"})
        assert response.status_code == 200
        body = expected("series", {"from": ["GBP"]}, fk.parse_day(start),
                        fk.parse_day(end) if end else None, today)
        assert response.content == fk.encode(body)
    open_ended = await api.client.get("/v1/2024-02-26..", params={"to": "USD"})
    assert list(open_ended.json()["rates"]) == ["2024-02-26", "2024-02-27"]
    assert open_ended.headers["cache-control"] == "no-cache"  # covers today


async def test_currencies_and_version(api) -> None:
    for path in ("/v1/currencies", "/currencies"):
        body = (await api.client.get(path)).json()
        assert len(body) == 31 and body["EUR"] == "Euro" and body["USD"] == "US Dollar"
        assert list(body) == sorted(body)
    version = await api.client.get("/v1")
    assert version.json()["version"] == "v1" and version.json()["status"] == "frozen"


async def test_errors_are_v1s(api) -> None:
    cases = [("/v1/latest?amount=abc", 422, "invalid amount"),
             ("/v1/latest?amount=", 422, "invalid amount"),
             ("/v1/latest?from=USD&to=USD", 422, "bad currency pair"),
             ("/v1/2024-02-30", 422, "invalid date"),
             ("/v1/2010-31-01", 422, "invalid date"),
             ("/v1/2024-02-01..2024-13-01", 422, "invalid date"),
             ("/v1/1999-01-01", 404, "not found"),
             ("/v1/latest?from=UAH", 404, "not found"),
             ("/v1/latest?to=XXX,YYY", 404, "not found"),
             ("/v1/2999-01-01..", 404, "not found")]
    for path, status, message in cases:
        response = await api.client.get(path)
        assert (response.status_code, response.json()) == (status, {"message": message}), path
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["access-control-allow-origin"] == "*"
    # amount beats date beats pair, as in v1
    response = await api.client.get("/v1/2024-02-30?amount=0&from=USD&to=USD")
    assert response.json() == {"message": "invalid amount"}
    response = await api.client.get("/v1/2024-02-30?from=USD&to=USD")
    assert response.json() == {"message": "invalid date"}


async def test_etags_revalidate(api) -> None:
    first = await api.client.get("/v1/2024-02-23")
    again = await api.client.get("/v1/2024-02-23", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.headers["cache-control"] == PAST
    latest = await api.client.get("/v1/latest")
    same = await api.client.get("/v1/latest", headers={"If-None-Match": latest.headers["etag"]})
    assert same.status_code == 304
    other = await api.client.get("/v1/latest", params={"amount": "2"})
    assert other.headers["etag"] != latest.headers["etag"]


async def test_only_the_frankfurter_source_shows(api) -> None:
    put = await api.client.put("/v1/rates/EUR/USD", json={"rate": "9", "as_of": "2024-02-27"})
    assert put.status_code in (200, 201)
    assert (await api.client.get("/v1/2024-02-27?to=USD")).json()["rates"] == {"USD": 1.0856}


# --------------------------------------------------------------------------- xrates history reads
async def test_rate_on_a_day(api) -> None:
    response = await api.client.get("/v1/rates/EUR/USD", params={"date": "2024-02-25"})
    assert response.status_code == 200, response.text
    assert response.json() == {"base": "EUR", "quote": "USD", "rate": 1.0834, "source": "ecb",
                               "date": "2024-02-23", "via": []}
    assert response.headers["cache-control"] == PAST and response.headers["etag"]
    inverse = (await api.client.get("/v1/rates/usd/eur?date=2024-02-27")).json()
    assert Decimal(str(inverse["rate"])) == Decimal("0.921149594694178")  # 1/1.0856, 15 digits
    assert inverse["date"] == "2024-02-27"
    assert (await api.client.get("/v1/rates/EUR/USD?date=2024-03-12")).status_code == 200
    for query, status in (("date=2024-03-13", 404), ("date=2024-02-30", 422),
                          ("date=20240227", 422), ("date=2024-02-27&source=boc", 404),
                          ("date=2024-02-27&source=Bad!", 422), ("source=ecb", 422)):
        response = await api.client.get(f"/v1/rates/EUR/USD?{query}")
        assert response.status_code == status, (query, response.text)
        assert "error" in response.json() and response.headers["cache-control"] == "no-store"
    # Today's current route is untouched by other query parameters.
    assert (await api.client.get("/v1/rates/EUR/USD?x=1")).json()["version"] > 0


async def test_priority_on_a_day(api) -> None:
    put = await api.client.put("/v1/rates/EUR/USD",
                               json={"rate": "1.5", "as_of": "2024-02-26T12:00:00Z"})
    assert put.status_code == 200  # the backfill wrote the current row
    manual = (await api.client.get("/v1/rates/EUR/USD?date=2024-02-26")).json()
    assert (manual["source"], manual["rate"]) == ("manual", 1.5)
    ecb = (await api.client.get("/v1/rates/EUR/USD?date=2024-02-26&source=ecb")).json()
    assert (ecb["source"], ecb["rate"]) == ("ecb", 1.0852)


async def test_pair_history(api) -> None:
    response = await api.client.get("/v1/rates/EUR/USD/history",
                                    params={"start": "2024-02-24", "end": "2024-02-27"})
    assert response.status_code == 200
    assert response.json() == {
        "base": "EUR", "quote": "USD", "start_date": "2024-02-26", "end_date": "2024-02-27",
        "rates": [{"date": "2024-02-26", "rate": 1.0852, "source": "ecb", "via": []},
                  {"date": "2024-02-27", "rate": 1.0856, "source": "ecb", "via": []}]}
    assert response.headers["cache-control"] == PAST
    open_ended = await api.client.get("/v1/rates/EUR/JPY/history?start=2023-11-01")
    assert len(open_ended.json()["rates"]) == 61
    assert open_ended.headers["cache-control"] == "no-cache"
    etag = open_ended.headers["etag"]
    assert (await api.client.get("/v1/rates/EUR/JPY/history?start=2023-11-01",
                                 headers={"If-None-Match": etag})).status_code == 304
    for query, status in (("start=2024-02-27&end=2024-02-01", 422),
                          ("start=2000-01-01&end=2010-01-01", 422),
                          ("start=2000-01-01&end=2009-12-30", 404),
                          ("start=2024-02-30", 422), ("end=2024-02-01", 422),
                          ("start=2024-02-24&end=2024-02-25", 404)):
        response = await api.client.get(f"/v1/rates/EUR/USD/history?{query}")
        assert response.status_code == status, (query, response.text)
        assert "error" in response.json()
