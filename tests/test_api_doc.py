"""The OpenAPI document's own rules (api_doc.py), checked against the rules the server applies."""

from __future__ import annotations

import re
from datetime import date

import httpx
import pytest
from test_api import api, shared  # noqa: F401  (fixtures)

import api_doc
import frankfurter

# Every year a calendar can trip on: leap and not, centuries, 0000 and 0001, the last.
YEARS = [*range(0, 30), *range(96, 105), *range(1896, 1905), *range(1996, 2105, 1),
         *range(100, 10000, 100), 9996, 9997, 9998, 9999]
DAYS = [f"{y:04d}-{m:02d}-{d:02d}" for y in YEARS for m in range(0, 14) for d in range(0, 33)]


def _python_day(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _frankfurter_day(text: str) -> bool:
    try:
        frankfurter.parse_day(text)
    except frankfurter.FrankfurterError:
        return False
    return True


def test_the_day_pattern_accepts_exactly_the_days_the_server_reads() -> None:
    pattern = re.compile(api_doc.DAY["pattern"])
    mismatches = [day for day in DAYS if bool(pattern.match(day)) != _python_day(day)]
    assert not mismatches, mismatches[:10]


def test_the_frankfurter_day_pattern_accepts_exactly_v1s_days_year_zero_included() -> None:
    pattern = re.compile(api_doc.FK_WHEN["pattern"])
    mismatches = [day for day in DAYS if bool(pattern.match(day)) != _frankfurter_day(day)]
    assert not mismatches, mismatches[:10]
    assert pattern.match("0000-02-29") and not pattern.match("1900-02-29")
    assert pattern.match("2024-01-01..2024-02-29") and pattern.match("2024-01-01..")
    assert not pattern.match("2024-01-01..2023-02-29") and not pattern.match("openapi.json")


@pytest.mark.parametrize("amount", ["1", " +2.5", "0_1", ".5", "3abc", "\t7e2", "0.0001"])
def test_an_amount_the_pattern_keeps_out_is_one_v1_refuses_and_back(amount: str) -> None:
    pattern = re.compile(api_doc.FK_AMOUNT["pattern"])
    assert pattern.match(amount) and frankfurter.ruby_to_f(amount) > 0
    for refused in ("", "-1", "0", "0.0", "abc", "+-1", "0_0", " ", "e5"):
        assert not pattern.match(refused) and not frankfurter.ruby_to_f(refused) > 0, refused


def test_the_update_sources_pattern_takes_any_case_of_a_known_name_only() -> None:
    pattern = re.compile(api_doc.UPDATES_CREATE["properties"]["sources"]["items"]["pattern"])
    assert pattern.match("ecb") and pattern.match("ECB") and pattern.match("eCb")
    assert not pattern.match("ecbx") and not pattern.match("xecb") and not pattern.match("")


async def test_docs_is_a_swagger_page_on_the_finished_document(api: httpx.AsyncClient) -> None:
    page = await api.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'url: "/openapi.json"' in page.text
    spec = (await api.get("/openapi.json")).json()
    # finished: 204/304 without a body, 405 with Allow on every operation
    delete = spec["paths"]["/v1/rates/{base}/{quote}"]["delete"]["responses"]
    assert "content" not in delete["204"] and "Allow" in delete["405"]["headers"]
    assert (await api.get("/v1/openapi.json")).json() == spec
    assert (await api.get("/v1")).json()["openapi"] == "/v1/openapi.json"
    assert spec["paths"]["/docs"]["get"]["responses"]["200"]["content"].keys() == {"text/html"}
