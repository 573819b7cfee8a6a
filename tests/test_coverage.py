"""Coverage: every source through a real updater and a real PostgreSQL, fed the recorded
payloads by a local HTTP server, quotes at least 150 distinct ISO 4217 currencies.

Each source's XRATES_<SOURCE>_URL is the local server's origin, so the updater makes the
requests each source publishes (path, query and method unchanged, dated by today) and the
server answers them by path with the recorded files. The fixtures come from different
dates; in one run on an empty table every pair is new, so neither the jump guard nor the
as_of rule holds anything back.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from recorded_feeds import FIXTURES, LocalServer

import util
from sources import FEEDS
from updater import Updater

RUN_DEADLINE_S = 60.0

# The README's recommended XRATES_SOURCES order (all 17).
RECOMMENDED = ("ecb,bdi,nbu,cbr,boc,nbp,cnb,mnb,nb,rba,boe,sarb,nbg,nbk,nbrb,hkma,privatbank")

# (path prefix, recorded file): the first matching prefix answers a request.
ROUTES: list[tuple[str, str]] = [
    ("/stats/eurofxref/eurofxref-daily.xml", "ecb/eurofxref-daily_2024-02-27.xml"),
    ("/NBUStatService/v1/statdirectory/exchange", "nbu/statdirectory_exchange_2026-09-25.json"),
    ("/scripts/XML_daily.asp", "cbr/XML_daily_2026-04-25_saturday_vcr.xml"),
    ("/p24api/pubinfo", "privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json"),
    ("/valet/observations/group/FX_RATES_DAILY/json", "boc/FX_RATES_DAILY_start-2026-03-12_vcr.json"),
    ("/terzevalute-wf-web/rest/v1.0/dailyRates", "bdi/dailyRates_currencyIsoCode-EUR_2026-02-11_vcr.csv"),
    ("/api/exchangerates/tables/A/", "nbp/exchangerates_tables-A_2026-03-01_to_2026-03-05_vcr.json"),
    ("/api/exchangerates/tables/B/", "nbp/exchangerates_tables-B_2026-03-01_to_2026-03-05_vcr.json"),
    ("/api/cenyzlota/", "nbp/cenyzlota_gold_2026-03-01_to_2026-03-05_vcr.json"),
    ("/cnbapi/exrates/daily-year", "cnb/exrates_daily-year_2026_lang-EN_recorded-2026-04-02_vcr.json"),
    ("/arfolyamok.asmx", "mnb/GetExchangeRates_soap_2025-03-24_to_2025-03-28_vcr.xml"),
    ("/api/data/EXR/B..NOK.SP", "nb/EXR_B-NOK-SP_csvdata_2026-03-16_to_2026-03-24_vcr.csv"),
    ("/statistics/tables/csv/f11.1-data.csv", "rba/f11.1-data_publication-2026-03-20_vcr.csv"),
    ("/gw/api/ct/monetarypolicy/currencies/", "nbg/currencies_date-2026-03-03_vcr.json"),
    ("/rss/get_rates.cfm", "nbk/get_rates_fdate-03.04.2026_vcr.xml"),
    ("/exrates/rates", "nbrb/rates_periodicity-0_2026-03-17_vcr.json"),
    ("/boeapps/database/_iadb-fromshowcolumns.asp",
     "boe/iadb-fromshowcolumns_26-XUDL-series_2026-03-17_to_2026-03-20_vcr.csv"),
    ("/public/market-data-and-statistics/monthly-statistical-bulletin/er-ir/er-eeri-daily",
     "hkma/er-eeri-daily_end_of_day_2026-02-25_to_2026-02-28_vcr.json"),
]
# SARB: one series per request, named by its code in the path.
SARB_PREFIX = "/SarbWebApi/WebIndicators/Shared/GetTimeseriesObservations/"


def recorded_file(path: str) -> str | None:
    """The recorded payload answering a request path (query ignored), or None (404)."""
    if path.startswith(SARB_PREFIX):
        series = path[len(SARB_PREFIX):].split("/", 1)[0]
        matches = sorted((FIXTURES / "sarb").glob(f"GetTimeseriesObservations_{series}_*.json"))
        return f"sarb/{matches[0].name}" if len(matches) == 1 else None
    return next((name for prefix, name in ROUTES if path.startswith(prefix)), None)


class Recorded(LocalServer):
    """Serves the recorded payloads by request path and counts the requests per source file."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.misses: list[str] = []
        super().__init__()

    def reply(self, method: str, path: str) -> tuple[int, bytes]:
        name = recorded_file(urlsplit(path).path)
        if name is None:
            self.misses.append(f"{method} {path}")
            return 404, b"not recorded"
        self.hits[name] = self.hits.get(name, 0) + 1
        return 200, (FIXTURES / name).read_bytes()


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    with Recorded() as server:
        yield server


def test_every_route_names_a_recorded_file() -> None:
    for _, name in ROUTES:
        assert (FIXTURES / name).is_file(), name
    assert set(RECOMMENDED.split(",")) == set(FEEDS)


@pytest.mark.timeout(RUN_DEADLINE_S + 30)
async def test_all_sources_quote_at_least_150_iso_currencies(db_url: str, recorded: Recorded,
                                                              sql: asyncpg.Connection) -> None:
    env = {"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0", "XRATES_SOURCES": RECOMMENDED,
           "XRATES_FETCH_TIMEOUT": "5", "XRATES_FETCH_ATTEMPTS": "1",
           **{f"XRATES_{name.upper()}_URL": recorded.origin for name in FEEDS}}
    updater = Updater(util.load_settings(env), db_url)
    try:
        run = await asyncio.wait_for(updater.run_once(), RUN_DEADLINE_S)
    finally:
        updater.stop("test done")
        await updater.close()

    assert recorded.misses == []
    assert run["status"] == "succeeded", run["error"]
    assert run["progress"] == {"done": 17, "total": 17}
    failed = {name: result["error"] for name, result in run["sources"].items() if result["error"]}
    assert failed == {}
    assert all(result["fetched"] > 0 for result in run["sources"].values()), run["sources"]
    # Every request of every source was made: all recorded files of a daily run were served.
    assert {name.split("/")[0] for name in recorded.hits} == set(FEEDS)
    assert sum(1 for name in recorded.hits if name.startswith("sarb/")) == 23

    rows = await sql.fetch("SELECT base, quote, source FROM rate")
    codes = {row["base"] for row in rows} | {row["quote"] for row in rows}
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in codes)
    assert not {"SDR", "TWI", "I44", "RUR", "BTC"} & codes  # mapped or dropped, never stored
    print(f"distinct ISO 4217 codes in the rate table: {len(codes)}")
    assert len(codes) >= 150, sorted(codes)
    # Sources whose pairs nobody else quotes own their rows (priority order only decides
    # overlaps, e.g. EUR/X of ecb before bdi).
    owners = {row["source"] for row in rows}
    assert owners >= set(FEEDS) - {"privatbank"}
