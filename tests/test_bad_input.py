"""Bad input gets its exact 4xx status and a JSON error, never a 5xx, and changes nothing.
Writes are protected (token, or loopback-only). Against real API processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import ApiProcess, fresh_database, serving

JSON = {"Content-Type": "application/json"}
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
async def target(pg, template, tmp_path_factory) -> AsyncIterator[tuple[ApiProcess, str]]:
    url = await fresh_database(pg, template)
    conn = await asyncpg.connect(url)
    await conn.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                       "VALUES ('USD', 'EUR', 0.92, 'manual', now()), "
                       "('EUR', 'GBP', 0.85, 'ecb', now())")
    await conn.close()
    async with serving(url, tmp_path_factory.mktemp("bad")) as api:
        yield api, url


async def snapshot(url: str) -> list[tuple]:
    conn = await asyncpg.connect(url)
    try:
        rates = await conn.fetch("SELECT base, quote, rate::text, source, as_of, version "
                                 "FROM rate ORDER BY 1, 2")
        runs = await conn.fetchval("SELECT count(*) FROM update_run")
        return [tuple(r) for r in rates] + [("runs", runs)]
    finally:
        await conn.close()


def body(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


NESTED = "[" * 100_000 + "]" * 100_000
# (method, path, headers, body, expected status)
CASES: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
    # malformed JSON / not an object -> 400
    ("POST", "/v1/rates", JSON, b"{", 400),
    ("POST", "/v1/rates", JSON, b"", 400),
    ("POST", "/v1/rates", JSON, b"null", 400),
    ("POST", "/v1/rates", JSON, b"[1, 2]", 400),
    ("POST", "/v1/rates", JSON, b'"USD"', 400),
    ("POST", "/v1/rates", JSON, b"\xff\xfe\x00garbage", 400),
    ("PUT", "/v1/rates/USD/EUR", JSON, b"{'rate': 1}", 400),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1,}', 400),
    ("PUT", "/v1/rates/USD/EUR", JSON, body(NESTED[:60_000]), 400),
    ("POST", "/v1/updates", JSON, b"{bad", 400),
    # wrong content type -> 415
    ("POST", "/v1/rates", {"Content-Type": "text/plain"}, b'{"base":"USD","quote":"JPY","rate":1}', 415),
    ("PUT", "/v1/rates/USD/EUR", {}, b'{"rate": 1}', 415),
    ("PUT", "/v1/rates/USD/EUR", {"Content-Type": "application/x-www-form-urlencoded"}, b"rate=1", 415),
    ("POST", "/v1/updates", {"Content-Type": "text/json"}, b"{}", 415),
    # oversized -> 413
    ("POST", "/v1/rates", JSON, b'{"base":"USD","quote":"JPY","rate":1,"x":"' + b"a" * 70_000 + b'"}', 413),
    ("PUT", "/v1/rates/USD/EUR", JSON, b" " * (65 * 1024), 413),
    # invalid fields -> 422
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": NaN}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": Infinity}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": -Infinity}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1e999}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1e12}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1e-13}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 0}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": -1.5}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": "-1.5"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": "1e5"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": "NaN"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": "1.2.3"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": " 1.2"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": "0x10"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1.0000000000000001}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1.00000000000000000000000000000001}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1' + b"1" * 5000 + b"}", 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": true}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": null}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": [1]}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": {"v": 1}}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b"{}", 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "extra": 2}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "source": "Robert\'); DROP TABLE rate;--"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "source": ""}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "source": 7}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "as_of": "yesterday"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "as_of": "2999-01-01"}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "as_of": 1700000000}', 422),
    ("PUT", "/v1/rates/USD/EUR", JSON, b'{"rate": 1, "base": "GBP"}', 422),
    ("PUT", "/v1/rates/USD/USD", JSON, b'{"rate": 1}', 422),
    ("PUT", "/v1/rates/US/EUR", JSON, b'{"rate": 1}', 422),
    ("PUT", "/v1/rates/US1/EUR", JSON, b'{"rate": 1}', 422),
    ("PUT", "/v1/rates/%C3%9CSD/EUR", JSON, b'{"rate": 1}', 422),
    ("PUT", "/v1/rates/USD%27%3B--/EUR", JSON, b'{"rate": 1}', 422),
    ("POST", "/v1/rates", JSON, b'{"base": "USD", "rate": 1}', 422),
    ("POST", "/v1/rates", JSON, b'{"base": "USD", "quote": "usd", "rate": 1}', 422),
    ("POST", "/v1/rates", JSON, b'{"base": "USDX", "quote": "JPY", "rate": 1}', 422),
    ("POST", "/v1/rates", JSON, b'{"base": 840, "quote": "JPY", "rate": 1}', 422),
    ("POST", "/v1/rates", JSON, b'{"base": "USD", "quote": "JPY", "rate": "abc"}', 422),
    ("POST", "/v1/updates", JSON, b'{"sources": "ecb"}', 422),
    ("POST", "/v1/updates", JSON, b'{"sources": []}', 422),
    ("POST", "/v1/updates", JSON, b'{"sources": ["nosuch"]}', 422),
    ("POST", "/v1/updates", JSON, b'{"sources": ["ecb"], "now": true}', 422),
    ("GET", "/v1/rates/USD/E1R", {}, None, 422),
    ("GET", "/v1/rates/EUR/EUR", {}, None, 422),
    ("GET", "/v1/rates?base=12", {}, None, 422),
    ("GET", "/v1/rates?quote=EU", {}, None, 422),
    ("GET", "/v1/convert?from=USD", {}, None, 422),
    ("GET", "/v1/convert?to=USD", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=USD", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=EUR&amount=-1", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=EUR&amount=NaN", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=EUR&amount=1e3", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=EUR&amount=1000000000000", {}, None, 422),
    ("GET", "/v1/convert?from=USD&to=EUR&amount=0.1234567890123456", {}, None, 422),
    ("GET", "/v1/convert?from=US%00&to=EUR", {}, None, 422),
    ("GET", "/v1/updates?limit=0", {}, None, 422),
    ("GET", "/v1/updates?limit=101", {}, None, 422),
    ("GET", "/v1/updates?limit=ten", {}, None, 422),
    ("GET", "/v1/updates?status=done", {}, None, 422),
    ("GET", "/v1/updates/abc", {}, None, 422),
    ("GET", "/v1/updates/-1", {}, None, 422),
    # not found -> 404
    ("GET", "/v1/rates/JPY/CHF", {}, None, 404),
    ("DELETE", "/v1/rates/JPY/CHF", {}, None, 404),
    ("GET", "/v1/nothing", {}, None, 404),
    ("GET", "/v1/rates/USD/EUR/extra", {}, None, 404),
    ("GET", "/v1/updates/424242", {}, None, 404),
    # wrong method -> 405
    ("POST", "/v1/rates/USD/EUR", JSON, b'{"rate": 1}', 405),
    ("PATCH", "/v1/rates/USD/EUR", JSON, b'{"rate": 1}', 405),
    ("DELETE", "/v1/rates", {}, None, 405),
    ("PUT", "/v1/convert", JSON, b"{}", 405),
    ("POST", "/health", JSON, b"{}", 405),
    # conflict -> 409
    ("POST", "/v1/rates", JSON, b'{"base": "usd", "quote": "eur", "rate": 1}', 409),
]


@pytest.mark.parametrize(("method", "path", "headers", "payload", "status"), CASES,
                         ids=[f"{i}-{c[0]}-{c[4]}" for i, c in enumerate(CASES)])
async def test_bad_input_gets_exact_4xx_and_changes_nothing(target, method, path, headers,
                                                            payload, status) -> None:
    api, url = target
    before = await snapshot(url)
    response = await api.client.request(method, path, headers=headers, content=payload)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert response.headers["cache-control"] == "no-store"
    assert await snapshot(url) == before


def test_there_are_at_least_fifty_bad_inputs() -> None:
    assert len(CASES) >= 90  # the README promises at least 90


async def test_unprocessable_errors_name_the_field(target) -> None:
    api, _ = target
    response = await api.client.put("/v1/rates/USD/EUR", json={"rate": 1, "colour": "red"})
    assert "colour" in response.json()["error"]
    response = await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.2.3"})
    assert response.json()["error"].startswith("rate")


# --------------------------------------------------------------------------- authorisation
async def test_token_is_required_when_configured(db_url, start_api) -> None:
    api = await start_api(db_url, env={"XRATES_API_TOKEN": TOKEN})
    before = await snapshot(db_url)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        response = await api.client.put("/v1/rates/USD/EUR", json={"rate": 1},
                                        headers=headers)
        assert response.status_code == 401, headers
        assert "error" in response.json()
    assert (await api.client.post("/v1/updates", headers={"Authorization": "Bearer x"})
            ).status_code == 401
    assert (await api.client.delete("/v1/rates/USD/EUR")).status_code == 401
    assert await snapshot(db_url) == before
    ok = await api.client.put("/v1/rates/USD/EUR", json={"rate": 1},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 201
    # reads need no token
    assert (await api.client.get("/v1/rates/USD/EUR")).status_code == 200
    assert TOKEN not in api.log()


@pytest.fixture
def netns() -> AsyncIterator[tuple[str, str, str]]:
    """A network namespace joined to the host by a veth pair: a real non-loopback client."""
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    name = f"xr{uuid.uuid4().hex[:8]}"
    octet = int(name[2:4], 16)
    host_ip, peer_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    host_dev, peer_dev = f"{name}a", f"{name}b"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_dev, "type", "veth", "peer", "name", peer_dev],
        ["ip", "link", "set", peer_dev, "netns", name],
        ["ip", "addr", "add", f"{host_ip}/30", "dev", host_dev],
        ["ip", "link", "set", host_dev, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{peer_ip}/30", "dev", peer_dev],
        ["ip", "netns", "exec", name, "ip", "link", "set", peer_dev, "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, timeout=10)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        pytest.skip(f"network namespaces unavailable here: {exc}")
    try:
        yield name, host_ip, peer_ip
    finally:
        subprocess.run(["ip", "link", "del", host_dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


async def test_writes_from_non_loopback_are_forbidden_without_token(db_url, netns,
                                                                    start_api) -> None:
    name, host_ip, _peer_ip = netns
    api = await start_api(db_url, host="0.0.0.0")
    before = await snapshot(db_url)
    script = (
        "import urllib.request, urllib.error\n"
        f"req = urllib.request.Request('http://{host_ip}:{api.port}/v1/rates/USD/EUR', "
        "data=b'{\"rate\": 1}', method='PUT', headers={'Content-Type': 'application/json'})\n"
        "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n"
        f"print(urllib.request.urlopen('http://{host_ip}:{api.port}/health', timeout=10).status)\n"
    )
    client = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", name, sys.executable, "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(client.communicate(), 30)
    lines = out.decode().splitlines()
    assert lines and lines[0].startswith("403"), (out, err)
    assert '"error"' in lines[0]
    assert lines[1] == "200"  # reads are open to everyone
    assert await snapshot(db_url) == before
    # the same write from loopback is accepted
    assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": 1})).status_code == 201
