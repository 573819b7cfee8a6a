"""`python admin.py flush`: the operator's way to empty every cache after writes that bypassed
the notify triggers (a real subprocess against a real instance)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from conftest import ROOT, ApiProcess, metric, wait_for
from test_guarantees import INSERT, get

import model


async def _serves(api: ApiProcess, rate: float, how: str | None = None) -> bool:
    response = await get(api, "USD", "EUR")
    return (response.status_code == 200 and response.json()["rate"] == rate
            and (how is None or response.headers["x-cache"] == how))


def _flush(db_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    env["DATABASE_URL"] = db_url
    return subprocess.run([sys.executable, "admin.py", "flush"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


async def test_flush_command_empties_a_cache_left_stale_by_a_write_past_the_triggers(
        db_url, sql, start_api) -> None:
    api = await start_api(db_url)
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    await wait_for(lambda: _serves(api, 1.1, "hit"), 5, what="the row pushed")

    # A write with the triggers off: no version drawn, no notification sent.
    async with sql.transaction():
        await sql.execute("SET LOCAL session_replication_role = replica")
        await sql.execute("UPDATE rate SET rate = 2.2 WHERE base = 'USD' AND quote = 'EUR'")
    # A normal write after it: once its notification is applied, the stream has gone past the
    # bypassing write, so what the cache serves now is its lasting state, not a delay.
    applied = await metric(api, "xrates_notifications_applied_total")
    await sql.execute(INSERT, "GBP", "USD", "1.3")

    async def later_applied() -> bool:
        return await metric(api, "xrates_notifications_applied_total") > applied

    await wait_for(later_applied, 5, what="the later write applied")
    assert await _serves(api, 1.1, "hit")  # stale: the hazard this command exists for

    seen: asyncio.Queue = asyncio.Queue()
    await sql.add_listener(model.CHANNEL, lambda _c, _p, _ch, payload: seen.put_nowait(payload))
    done = await asyncio.to_thread(_flush, db_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flush sent"), done.stdout
    payload = await asyncio.wait_for(seen.get(), 5)
    assert payload.startswith('{"op":"flush","version":') and '"reason":"operator"' in payload

    await wait_for(lambda: _serves(api, 2.2), 5, what="the database state after the flush")
    assert await metric(api, "xrates_listener_reconnects_total") == 0  # a flush, not a gap
