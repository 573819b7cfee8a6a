"""Property-based fuzz of every route's bodies and query strings against a real API: every
answer is < 500, a 4xx is JSON with `error` (Frankfurter routes: `message`), and a rejected
write changes nothing in the database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import quote as urlquote

import asyncpg
import httpx
import pytest
from conftest import ApiProcess, fresh_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

JSON_HEADERS = {"Content-Type": "application/json"}
# Bounded and reproducible: a fixed number of examples, derandomised, no deadline (a real
# server on 2 busy cores); the two fuzz files stay under ~90 s together.
FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# Numbers of any length and exponent, as raw JSON text (json.dumps cannot write 1e999).
number_text = st.one_of(
    st.integers().map(str),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-10**30, 10**30), st.integers(-10**6, 10**6)),
    st.text("0123456789", min_size=1, max_size=400).map(lambda d: "0." + d),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e-12", "1e12", "0.000000000001", "-0"]),
)
scalar_text = st.one_of(number_text, st.sampled_from(["null", "true", "false", '""', '"USD"',
                                                      '"1.5"', '"ecb"', '"2024-01-01"']),
                        st.text(max_size=20).map(json.dumps))
json_text = st.recursive(
    scalar_text,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.sampled_from(["base", "quote", "rate", "source", "as_of", "sources",
                                         "x"]), inner, max_size=5).map(
            lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}")),
    max_leaves=12)

WRITES = [("POST", "/v1/rates"), ("PUT", "/v1/rates/USD/EUR"), ("PUT", "/v1/rates/usd/jpy"),
          ("POST", "/v1/updates")]
READS = ["/v1/rates", "/v1/rates/USD/EUR", "/v1/rates/USD/EUR/history", "/v1/convert",
         "/v1/updates", "/v1/updates/1", "/v1/sources", "/health", "/v1/latest", "/latest",
         "/v1/2024-01-02", "/v1/2024-01-01..2024-01-05", "/v1/2024-01-01..", "/v1/currencies",
         "/v1", "/v1/instance"]
FRANKFURTER = {"/latest", "/v1/latest", "/v1/currencies", "/v1"}
PARAM_NAMES = ["base", "quote", "from", "to", "amount", "limit", "status", "date", "source",
               "start", "end", "min_version", "symbols", "pairs"]
query_text = st.lists(st.tuples(st.sampled_from(PARAM_NAMES),
                                st.one_of(number_text, st.text(max_size=12))),
                      max_size=4).map(lambda kv: "&".join(
                          f"{k}={urlquote(v, safe='')}" for k, v in kv))


async def state(url: str) -> tuple[list[tuple[object, ...]], int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT * FROM rate ORDER BY base, quote")
        runs = await conn.fetchval("SELECT count(*) FROM update_run")
        return [tuple(r) for r in rows], runs
    finally:
        await conn.close()


def check_answer(path: str, response: httpx.Response) -> None:
    assert response.status_code < 500, (path, response.status_code, response.text[:300])
    if 400 <= response.status_code < 500:
        frankfurter = path in FRANKFURTER or path.startswith("/v1/2")
        body = response.json()
        assert isinstance(body, dict), (path, response.text[:300])
        assert isinstance(body.get("message" if frankfurter else "error"), str), \
            (path, response.text[:300])


@pytest.mark.timeout(150)
async def test_random_bodies_and_query_strings(pg, template, tmp_path: Path) -> None:
    url = await fresh_database(pg, template)
    conn = await asyncpg.connect(url)
    await conn.execute("INSERT INTO rate (base, quote, rate, source, as_of) VALUES "
                       "('USD', 'EUR', 0.92, 'manual', now()), ('EUR', 'GBP', 0.85, 'ecb', now())")
    await conn.close()
    api = ApiProcess(url, tmp_path)
    loop = asyncio.get_running_loop()
    try:
        await api.wait_ready()
        client = httpx.Client(base_url=api.base_url, timeout=10)

        @FUZZ
        @given(st.sampled_from(WRITES), json_text)
        def bodies(write: tuple[str, str], text: str) -> None:
            method, path = write
            before = asyncio.run_coroutine_threadsafe(state(url), loop).result()
            response = client.request(method, path, content=text.encode(), headers=JSON_HEADERS)
            check_answer(path, response)
            if response.status_code >= 400:
                after = asyncio.run_coroutine_threadsafe(state(url), loop).result()
                assert after == before, (method, path, text, response.text)

        @FUZZ
        @given(st.sampled_from(READS), query_text)
        def queries(path: str, query: str) -> None:
            check_answer(path, client.get(f"{path}?{query}"))

        await loop.run_in_executor(None, bodies)
        await loop.run_in_executor(None, queries)
        await loop.run_in_executor(None, client.close)
    finally:
        await api.stop()
        assert not api.server_errors(), "\n".join(api.server_errors())
