"""GET /v1/sources against a real API instance, a real PostgreSQL and real updater runs
(in-process Updater objects reading recorded payloads from a local upstream server)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from conftest import wait_for

# the local upstream server and the updater tests' in-process updaters (fixtures, shared)
from recorded_feeds import DEFAULT_PAYLOADS, Upstream, payload, upstream  # noqa: F401
from test_updater import make_updater  # noqa: F401

from sources import FEEDS, FOREIGN_PER_PIVOT, PIVOT_PER_FOREIGN

SECRET_USER, SECRET = "mirror-user", "hunter2-s3cret"
KEYS = {"name", "title", "country", "url", "pivot", "base_direction", "cadence", "currencies",
        "last_success", "last_error", "next_run"}


def secret_env(upstream: Upstream, sources: str) -> dict[str, str]:
    """Overrides that carry credentials (as a paid mirror's would), small fetch timeouts."""
    port = upstream.server.server_port
    urls = {f"XRATES_{name.upper()}_URL": f"http://{SECRET_USER}:{SECRET}@127.0.0.1:{port}/{name}"
            for name in DEFAULT_PAYLOADS}
    return {"XRATES_SOURCES": sources, "XRATES_FETCH_TIMEOUT": "0.3",
            "XRATES_FETCH_ATTEMPTS": "1", "XRATES_AUTO_MIGRATE": "0", **urls}


async def listed(client: httpx.AsyncClient) -> dict[str, dict]:
    response = await client.get("/v1/sources")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["sources"]
    for source in body["sources"]:
        assert set(source) == KEYS, source
    return {source["name"]: source for source in body["sources"]}


def codes_of(name: str) -> list[str]:
    quotes = FEEDS[name].parse(payload(DEFAULT_PAYLOADS[name]))
    return sorted({code for q in quotes for code in (q.base, q.quote)})


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text  # ISO 8601 in UTC
    return moment


# --------------------------------------------------------------------------- before any run
async def test_sources_metadata_before_any_run(db_url, start_api, upstream) -> None:
    api = await start_api(db_url, env=secret_env(upstream, "ecb,demo,nbu,boc"))
    sources = await listed(api.client)
    assert list(sources) == ["ecb", "demo", "nbu", "boc"]  # XRATES_SOURCES order
    for name in ("ecb", "nbu", "boc"):
        feed = FEEDS[name]
        assert sources[name] == {
            "name": name, "title": feed.title, "country": feed.country, "url": feed.url,
            "pivot": feed.pivot, "base_direction": feed.base_direction, "cadence": feed.cadence,
            "currencies": [], "last_success": None, "last_error": None, "next_run": None}
        assert feed.url.startswith("https://")  # the public URL, not the override
    assert sources["ecb"]["base_direction"] == FOREIGN_PER_PIVOT
    assert sources["nbu"]["base_direction"] == PIVOT_PER_FOREIGN
    demo = sources["demo"]
    assert (demo["pivot"], demo["base_direction"], demo["url"]) == ("EUR", FOREIGN_PER_PIVOT, None)
    assert demo["title"] and demo["cadence"]


# --------------------------------------------------------------------------- after real runs
async def test_sources_after_real_runs(db_url, start_api, upstream, make_updater, sql) -> None:
    env = secret_env(upstream, "ecb,nbu,boc,demo")
    upstream.fail("boc", 500)
    run = await make_updater(env).run_once()
    assert run["status"] == "failed"  # boc failed; the others succeeded
    finished = parse_time(run["finished_at"])
    assert run["sources"]["ecb"]["currencies"] == codes_of("ecb")

    api = await start_api(db_url, env=env)
    response = await api.client.get("/v1/sources")
    # Credentials of an override never show; `url` is the public URL, never the override.
    # (An error message may name the override's host, with its credentials redacted, as the
    # run's own error in /v1/updates does.)
    assert SECRET not in response.text and SECRET_USER not in response.text
    sources = await listed(api.client)
    assert all(sources[name]["url"] == FEEDS[name].url for name in ("ecb", "nbu", "boc"))
    assert "***@" in sources["boc"]["last_error"]["message"]
    assert sources["ecb"]["currencies"] == codes_of("ecb") and "EUR" in codes_of("ecb")
    assert sources["nbu"]["currencies"] == codes_of("nbu") and "UAH" in codes_of("nbu")
    assert len(sources["demo"]["currencies"]) == 31 and "EUR" in sources["demo"]["currencies"]
    for name in ("ecb", "nbu", "demo"):
        assert parse_time(sources[name]["last_success"]) == finished
        assert sources[name]["last_error"] is None
    boc = sources["boc"]
    assert boc["last_success"] is None and boc["currencies"] == []
    assert parse_time(boc["last_error"]["at"]) == finished
    assert boc["last_error"]["message"] == run["sources"]["boc"]["error"]
    assert "500" in boc["last_error"]["message"]
    assert all(s["next_run"] is None for s in sources.values())  # --once schedules nothing

    # Next: boc recovers, ecb fails. ecb keeps its last success (and its currencies) and
    # gains an error; boc's old error stays visible next to its newer success.
    upstream.serve("boc", payload(DEFAULT_PAYLOADS["boc"]))
    upstream.serve("ecb", b"<html>maintenance</html>")
    second = await make_updater(env).run_once()
    second_finished = parse_time(second["finished_at"])
    assert second_finished > finished
    sources = await listed(api.client)
    ecb = sources["ecb"]
    assert parse_time(ecb["last_success"]) == finished
    assert ecb["currencies"] == codes_of("ecb")
    assert parse_time(ecb["last_error"]["at"]) == second_finished
    assert ecb["last_error"]["message"] == second["sources"]["ecb"]["error"]
    assert parse_time(sources["boc"]["last_success"]) == second_finished
    assert sources["boc"]["currencies"] == codes_of("boc")
    assert parse_time(sources["boc"]["last_error"]["at"]) == finished
    response = await api.client.get("/v1/sources")
    assert SECRET not in response.text and SECRET_USER not in response.text


async def test_next_run_is_the_leaders_schedule(db_url, start_api, make_updater) -> None:
    env = {"XRATES_SOURCES": "demo", "XRATES_INTERVAL": "600", "XRATES_AUTO_MIGRATE": "0"}
    api = await start_api(db_url, env=env)
    assert (await listed(api.client))["demo"]["next_run"] is None

    updater = make_updater(env)
    task = asyncio.create_task(updater.run())
    try:
        async def scheduled() -> dict | None:
            demo = (await listed(api.client))["demo"]
            return demo if demo["next_run"] and demo["last_success"] else None

        demo = await wait_for(scheduled, 15, what="a scheduled run and its successor's time")
        gap = parse_time(demo["next_run"]) - parse_time(demo["last_success"])
        # XRATES_INTERVAL ± 10 % jitter, counted from the start of the run that just finished.
        assert timedelta(seconds=530) < gap < timedelta(seconds=661), gap
        assert parse_time(demo["next_run"]) > datetime.now(UTC)
    finally:
        updater.stop("test done")
        await asyncio.wait_for(task, 10)
    await updater.close()  # releases the leader lock: no leader, so no promise of a next run

    async def unscheduled() -> bool:
        return (await listed(api.client))["demo"]["next_run"] is None

    await wait_for(unscheduled, 10, what="next_run to turn null without a leader")


async def test_sources_in_openapi_and_errors(db_url, start_api, sql: asyncpg.Connection) -> None:
    from openapi_spec_validator import validate

    api = await start_api(db_url, env={"XRATES_SOURCES": "demo"})
    spec = (await api.client.get("/openapi.json")).json()
    validate(spec)
    operation = spec["paths"]["/v1/sources"]["get"]
    assert set(operation["responses"]) == {"200", "405", "503"}  # 405 with its Allow header
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]["sources"]["items"]["required"]) == KEYS
    assert (await api.client.post("/v1/sources")).status_code == 405
    # An old run recorded before sources carried their currencies: [] rather than an error.
    await sql.execute(
        "INSERT INTO update_run (trigger, status, started_at, finished_at, sources) VALUES "
        "('manual', 'succeeded', now(), now(), '{\"demo\": {\"fetched\": 30, \"changed\": 30, "
        "\"error\": null}}')")
    demo = (await listed(api.client))["demo"]
    assert demo["currencies"] == [] and demo["last_success"] is not None
