"""The README's run command, for real: `python3 dev.py up` starts embedded PostgreSQL,
the updater and two API instances; Ctrl-C (SIGINT) stops all of it; a second run reuses
the data."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import ROOT, answers_200, start_up, stop_up, wait_for

import util


@pytest.mark.slow
async def test_run_command_serves_two_instances_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir, log = tmp_path / "data", tmp_path / "up.log"
    ports = [util.free_port(), util.free_port()]
    a = httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=10)
    b = httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", timeout=10)
    proc = await start_up(data_dir, ports, log, {"XRATES_INTERVAL": "2"})
    try:
        await wait_for(lambda: answers_200(a), 60, 0.1, "instance A")
        await wait_for(lambda: answers_200(b), 60, 0.1, "instance B")
        written = await a.put("/v1/rates/USD/EUR", json={"rate": "0.9213"})
        assert written.status_code in (200, 201)
        version = written.json()["version"]

        async def b_serves_it() -> bool:
            response = await b.get("/v1/rates/USD/EUR")
            return response.status_code == 200 and response.json()["version"] >= version

        await wait_for(b_serves_it, 5, what="B serves A's write")
        if (ROOT / "updater.py").exists():  # the demo source fills the table
            async def demo_rates() -> bool:
                body = (await b.get("/v1/rates", params={"base": "EUR"})).json()
                return body["count"] >= 20
            await wait_for(demo_rates, 60, 0.2, "the updater's demo rates")
        assert await stop_up(proc) == 0
        assert util.EmbeddedPostgres(data_dir).running_pid() is None  # PostgreSQL stopped too
        for client in (a, b):
            with pytest.raises(httpx.TransportError):
                await client.get("/health")

        # A second run reuses the data.
        proc = await start_up(data_dir, ports, log, {"XRATES_INTERVAL": "2"})
        await wait_for(lambda: answers_200(a), 60, 0.1, "instance A again")
        again = await a.get("/v1/rates/USD/EUR")
        assert again.status_code == 200 and again.json()["rate"] == 0.9213
        assert await stop_up(proc) == 0
    finally:
        if proc.returncode is None:
            await stop_up(proc)
        await a.aclose()
        await b.aclose()
        util.EmbeddedPostgres(data_dir).stop("immediate")
