"""Read your writes on any instance: a write's X-Xrates-Version, given back as
X-Xrates-Min-Version (or ?min_version) to another instance, never yields an older state —
whether that instance's listener is alive, delayed, or cut off."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from conftest import ApiProcess, metric, wait_for

ROUNDS = 40


async def read_at_least(api: ApiProcess, path: str, version: int, *, query: bool = False
                        ) -> httpx.Response:
    if query:
        return await api.client.get(f"{path}?min_version={version}")
    return await api.client.get(path, headers={"X-Xrates-Min-Version": str(version)})


def state_version(response: httpx.Response) -> int:
    """The version a read answered with: the rate's, or for a 404 the tombstone's is not
    shown, so a 404 counts as 'absent'."""
    return response.json()["version"] if response.status_code == 200 else -1


async def test_every_write_carries_its_version(db_url, start_api) -> None:
    api = await start_api(db_url)
    created = await api.client.post("/v1/rates", json={"base": "USD", "quote": "EUR", "rate": 1})
    assert created.headers["x-xrates-version"] == str(created.json()["version"])
    put = await api.client.put("/v1/rates/USD/EUR", json={"rate": 2})
    assert put.headers["x-xrates-version"] == str(put.json()["version"])
    assert int(put.headers["x-xrates-version"]) > int(created.headers["x-xrates-version"])
    deleted = await api.client.delete("/v1/rates/USD/EUR")
    assert deleted.status_code == 204
    assert int(deleted.headers["x-xrates-version"]) > int(put.headers["x-xrates-version"])


async def test_min_version_is_validated(db_url, start_api) -> None:
    api = await start_api(db_url)
    put = await api.client.put("/v1/rates/USD/EUR", json={"rate": 2})
    version = int(put.headers["x-xrates-version"])
    for bad in ("0", "-1", "abc", "1.5", "9" * 19, ""):
        for query in (False, True):
            response = await api.client.get(
                f"/v1/rates/USD/EUR?min_version={bad}" if query else "/v1/rates/USD/EUR",
                headers={} if query else {"X-Xrates-Min-Version": bad})
            if bad == "" and query:
                continue  # a blank query value is no value
            assert response.status_code == 422, (bad, query, response.text)
            assert "min_version" in response.json()["error"]
    # Above what the sequence ever issued: 422 (not a wait, not a 404).
    too_new = await read_at_least(api, "/v1/rates/USD/EUR", version + 1000)
    assert too_new.status_code == 422 and "above the last version" in too_new.json()["error"]
    assert (await read_at_least(api, "/v1/rates/GBP/JPY", version + 1000)).status_code == 422
    both = await api.client.get(f"/v1/rates/USD/EUR?min_version={version}",
                                headers={"X-Xrates-Min-Version": str(version - 1)})
    assert both.status_code == 422
    ok = await read_at_least(api, "/v1/rates/USD/EUR", version, query=True)
    assert ok.status_code == 200 and ok.json()["version"] == version


async def _write_then_read_elsewhere(a: ApiProcess, b: ApiProcess, rounds: int) -> dict[str, int]:
    """Write through A, read through B with the token at once; count B's X-Cache answers."""
    how: dict[str, int] = {}
    for i in range(rounds):
        if i % 5 == 4:
            write = await a.client.delete("/v1/rates/USD/EUR")
            assert write.status_code == 204
        else:
            write = await a.client.put("/v1/rates/USD/EUR", json={"rate": f"1.{i + 1}"})
            assert write.status_code in (200, 201)
        version = int(write.headers["x-xrates-version"])
        read = await read_at_least(b, "/v1/rates/USD/EUR", version, query=bool(i % 2))
        if write.status_code == 204:
            assert read.status_code == 404, (i, read.text)  # never the deleted row
        else:
            assert read.status_code == 200, (i, read.text)
            assert read.json()["version"] >= version, (i, read.json(), version)
            assert read.json()["rate"] == float(f"1.{i + 1}")
        how[read.headers["x-cache"]] = how.get(read.headers["x-cache"], 0) + 1
    return how


async def test_read_your_writes_through_another_instance(db_url, start_api) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    # B's cache holds the key first, so an older state is there to be (wrongly) served.
    await a.client.put("/v1/rates/USD/EUR", json={"rate": "1.0"})
    await wait_for(lambda: _hit(b), 5, what="B caches the key")
    how = await _write_then_read_elsewhere(a, b, ROUNDS)
    assert sum(how.values()) == ROUNDS and set(how) <= {"hit", "bypass"}, how
    print(f"\nlistener alive: X-Cache counts {how}")
    # /metrics says how each was answered: at once, after a wait, or from the database
    outcomes = {k: await metric(b, f'xrates_min_version_reads_total{{outcome="{k}"}}')
                for k in ("cached", "waited", "database")}
    assert sum(outcomes.values()) == ROUNDS, outcomes
    assert outcomes["cached"] + outcomes["waited"] == how.get("hit", 0), (outcomes, how)


async def _hit(api: ApiProcess) -> bool:
    return (await api.client.get("/v1/rates/USD/EUR")).headers.get("x-cache") == "hit"


async def test_read_your_writes_while_the_other_listener_is_cut_off(db_url, pg, start_api) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    await a.client.put("/v1/rates/USD/EUR", json={"rate": "1.0"})
    await wait_for(lambda: _hit(b), 5, what="B caches the key")
    # The pools open connections lazily (min_size 0), and none can be opened once the database
    # refuses them: open a few on each instance first, so a write that meets a heartbeat send
    # in flight finds a second one (else a 503 that has nothing to do with the listener).
    for api in (a, b):
        await _open_pool_connections(api, 4)
    db = db_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg.url)
    try:
        # Terminate B's listener and keep it from reconnecting (pools keep their connections).
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        pids = {r["pid"] for r in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
            "AND application_name = 'xrates-listener'", db)}
        b_listener = int((await b.client.get("/v1/instance")).json()["listener"]["backend_pid"])
        assert b_listener in pids
        await admin.fetchval("SELECT pg_terminate_backend($1)", b_listener)
        # Straight away, before B may even have noticed: its cache still holds the old value.
        how = await _write_then_read_elsewhere(a, b, ROUNDS)
        assert sum(how.values()) == ROUNDS, how
        print(f"\nlistener cut off: X-Cache counts {how}")
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()
    await wait_for(lambda: _ready(b), 10, what="B's listener back")
    how = await _write_then_read_elsewhere(a, b, 10)
    assert sum(how.values()) == 10


async def _open_pool_connections(api: ApiProcess, count: int) -> None:
    """Concurrent writes (each takes a pool connection of its own) of keys no check reads."""
    writes = await asyncio.gather(*(api.client.put(f"/v1/rates/GBP/X{chr(65 + i)}{chr(65 + i)}",
                                                   json={"rate": "1"}) for i in range(count)))
    assert all(w.status_code in (200, 201) for w in writes), [w.text for w in writes]


async def _ready(api: ApiProcess) -> bool:
    return (await api.client.get("/ready")).status_code == 200
