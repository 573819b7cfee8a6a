"""GET /v1/stream against real processes, read with a real SSE client (httpx-sse) and, for
the misbehaving clients, with raw sockets: cross-instance delivery, selection, a stalled client
dropped without delaying anyone, the listener's loss, flush, Last-Event-ID, the cap, and
SIGTERM with many open streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from conftest import ApiProcess, metric, wait_for
from httpx_sse import ServerSentEvent, aconnect_sse

import stream

INSERT = ("INSERT INTO rate (base, quote, rate, source, as_of) VALUES ($1, $2, $3, 'manual', now()) "
          "ON CONFLICT (base, quote) DO UPDATE SET rate = EXCLUDED.rate, as_of = EXCLUDED.as_of")
EVENT_TIMEOUT_S = 5.0


class Events:
    """An open SSE stream read by httpx-sse in a task; events arrive in ``queue``."""

    def __init__(self, api: ApiProcess, path: str, headers: dict[str, str] | None = None) -> None:
        self.client = httpx.AsyncClient(base_url=api.base_url, timeout=httpx.Timeout(10, read=30))
        self.path, self.headers = path, headers or {}
        self.queue: asyncio.Queue[ServerSentEvent | None] = asyncio.Queue()
        self.status: int | None = None
        self.content_type = ""
        self._opened = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def open(self) -> Events:
        self._task = asyncio.create_task(self._read())
        await asyncio.wait_for(self._opened.wait(), EVENT_TIMEOUT_S)
        return self

    async def _read(self) -> None:
        try:
            async with aconnect_sse(self.client, "GET", self.path, headers=self.headers) as source:
                self.status = source.response.status_code
                self.content_type = source.response.headers.get("content-type", "")
                self._opened.set()
                if self.status != 200:
                    return
                async for event in source.aiter_sse():
                    await self.queue.put(event)
        finally:
            self._opened.set()
            await self.queue.put(None)  # the stream ended

    async def next(self, timeout_s: float = EVENT_TIMEOUT_S) -> ServerSentEvent | None:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def next_change(self, timeout_s: float = EVENT_TIMEOUT_S) -> ServerSentEvent | None:
        event = await self.next(timeout_s)
        assert event is None or event.event != "snapshot", event
        return event

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task
        await self.client.aclose()


@pytest.fixture
async def streams() -> AsyncIterator[list[Events]]:
    opened: list[Events] = []
    try:
        yield opened
    finally:
        for events in opened:
            await events.close()


async def open_stream(streams: list[Events], api: ApiProcess, path: str = "/v1/stream",
                      headers: dict[str, str] | None = None) -> Events:
    events = Events(api, path, headers)
    streams.append(events)
    return await events.open()


async def raw_stream(api: ApiProcess, path: str = "/v1/stream",
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A stream read by hand: the bytes received up to and including the snapshot."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = b""
    async with asyncio.timeout(EVENT_TIMEOUT_S * 2):
        while b"event: snapshot" not in received or not received.endswith(b"\r\n"):
            chunk = await reader.read(65536)
            assert chunk, received
            received += chunk
    return reader, writer, received


# --------------------------------------------------------------------------- delivery
async def test_a_write_on_one_instance_reaches_a_stream_on_another(db_url, sql, start_api,
                                                                   streams) -> None:
    a, b = await start_api(db_url), await start_api(db_url)
    await sql.execute(INSERT, "GBP", "USD", "1.27")
    await sql.execute(INSERT, "EUR", "USD", "1.08")
    events = await open_stream(streams, b, "/v1/stream?pairs=USD/EUR,GBP/USD")
    assert events.status == 200 and events.content_type.startswith("text/event-stream")
    snapshot = await events.next()
    assert snapshot.event == "snapshot" and snapshot.id == ""
    expected = (await b.client.get("/v1/rates?base=GBP")).json()
    assert json.loads(snapshot.data) == expected  # the /v1/rates body for the selection

    put = await a.client.put("/v1/rates/USD/EUR", json={"rate": "0.9213"})
    assert put.status_code == 201
    await a.client.put("/v1/rates/EUR/USD", json={"rate": "1.09"})  # not selected
    change = await events.next_change()
    assert (change.event, change.id) == ("rate", str(put.json()["version"]))
    assert json.loads(change.data) == put.json()  # the rate object, as served

    deleted = await a.client.delete("/v1/rates/GBP/USD")
    assert deleted.status_code == 204
    gone = await events.next_change()
    assert gone.event == "delete" and json.loads(gone.data) == {
        "base": "GBP", "quote": "USD", "version": int(deleted.headers["x-xrates-version"])}
    assert gone.id == deleted.headers["x-xrates-version"]

    by_base = await open_stream(streams, b, "/v1/stream?base=EUR")
    first = json.loads((await by_base.next()).data)
    assert [(r["base"], r["quote"], r["rate"]) for r in first["rates"]] == [("EUR", "USD", 1.09)]
    assert first["count"] == 1
    await sql.execute(INSERT, "EUR", "JPY", "160.5")
    await sql.execute(INSERT, "USD", "EUR", "0.95")  # for the pairs stream only
    assert json.loads((await by_base.next_change()).data)["quote"] == "JPY"
    assert json.loads((await events.next_change()).data)["rate"] == 0.95
    assert await metric(b, "xrates_stream_subscribers") == 2
    assert await metric(b, "xrates_stream_events_total") >= 6


async def test_selection_is_validated(db_url, start_api) -> None:
    api = await start_api(db_url)
    for query in ("pairs=USD/EUR&base=EUR", "base=EURO", "pairs=USD-EUR", "pairs=USD/USD",
                  "pairs=", "base=E1R", "pairs=USD/EUR&pairs=GBP/USD"):
        response = await api.client.get(f"/v1/stream?{query}")
        assert response.status_code == 422, (query, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]


async def test_snapshot_is_consistent_with_the_deltas(db_url, sql, start_api, streams) -> None:
    """Writes racing the subscription: every delta after the snapshot is newer than the
    snapshot's state of its key, and replaying them gives the database's state."""
    api = await start_api(db_url)
    await sql.execute(INSERT, "USD", "EUR", "1.0")
    writer = await asyncpg.connect(db_url)

    async def write(n: int) -> None:
        for i in range(n):
            await writer.execute(INSERT, "USD", "EUR", f"1.{i + 1}")

    try:
        for _ in range(3):  # bounded
            task = asyncio.create_task(write(40))
            events = await open_stream(streams, api, "/v1/stream?pairs=USD/EUR")
            snapshot = json.loads((await events.next()).data)["rates"][0]
            await task
            final = await sql.fetchrow("SELECT rate::text, version FROM rate")
            seen = snapshot["version"]
            while seen < final["version"]:
                change = await events.next_change()
                assert int(change.id) > seen  # never a state at or before the snapshot's
                seen = int(change.id)
            assert seen == final["version"]
    finally:
        await writer.close()


# --------------------------------------------------------------------------- slow clients
async def test_a_stalled_client_is_dropped_without_delaying_another(db_url, sql, start_api,
                                                                    streams) -> None:
    api = await start_api(db_url)
    # Bursts stay below the queue bound (256): a healthy client that reads as fast as this
    # test can may lag a whole burst without being "behind" by the contract's measure.
    bases = [f"X{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(200)]
    await sql.execute("INSERT INTO rate (base, quote, rate, source, as_of) "
                      "SELECT b, 'USD', 1, 'manual', now() FROM unnest($1::text[]) AS b", bases)
    await sql.execute(INSERT, "GBP", "USD", "1.0")
    healthy = await open_stream(streams, api, "/v1/stream?pairs=GBP/USD")
    assert (await healthy.next()).event == "snapshot"
    # And one that takes everything, read as fast as it comes: bursts of 200 changes in one
    # statement do not put it behind (the listener applies them in slices).
    everything = await open_stream(streams, api, "/v1/stream")
    assert (await everything.next()).event == "snapshot"

    # A raw socket with a tiny receive buffer that reads the snapshot, then stops reading.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stalled.settimeout(10)
    stalled.connect(("127.0.0.1", api.port))
    try:
        stalled.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"event: snapshot" not in head:
            head += stalled.recv(65536)
        await wait_for(lambda: _subscribers(api, 3), 5, what="the streams open")

        async def dropped() -> bool:
            return await metric(api, "xrates_stream_dropped_total") >= 1

        marker = 1
        for _ in range(300):  # bounded: 200 changes per statement until the stalled one is behind
            await sql.execute("UPDATE rate SET rate = rate + 0.0001 WHERE quote = 'USD' "
                              "AND base LIKE 'X%'")
            # The healthy stream is not slowed down meanwhile: each marker arrives promptly.
            marker += 1
            started = time.monotonic()
            await sql.execute(INSERT, "GBP", "USD", f"1.{marker}")
            change = await healthy.next_change(2.0)
            assert json.loads(change.data)["rate"] == float(f"1.{marker}")
            assert time.monotonic() - started < 2.0
            for _ in range(len(bases) + 1):
                change = await everything.next_change()
                assert change.event == "rate", change
            if await dropped():
                print(f"\nstalled stream dropped after {marker - 1} rounds of 200 changes")
                break
        assert await dropped(), "the stalled stream was never dropped"

        # The client reads again (within the grace period): what the server had sent ends
        # with the resync and the final chunk.
        tail = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = await asyncio.to_thread(stalled.recv, 1 << 20)
            if not chunk:
                break
            tail += chunk
            if tail.endswith(b"0\r\n\r\n"):
                break
        assert b'event: resync\ndata: {"reason":"slow"}' in tail[-400:], tail[-400:]
        await wait_for(lambda: _subscribers(api, 2), 5, what="the stalled stream to be gone")
        assert await metric(api, "xrates_stream_dropped_total") == 1  # only the stalled one
    finally:
        stalled.close()
    marker += 1
    await sql.execute(INSERT, "GBP", "USD", f"1.{marker}")
    assert json.loads((await healthy.next_change()).data)["rate"] == float(f"1.{marker}")


async def test_a_direct_stream_gets_each_new_change_written_once_and_is_cut_off_when_behind(
        ) -> None:
    hub = stream.Hub(queue_size=4)
    hub.listener_up()
    sub = hub.subscribe(["USDEUR"])
    sub.set_snapshot({"USDEUR": 5})
    written: list[bytes] = []
    room = True

    def writer(data: bytes) -> bool:
        if room:
            written.append(data)
        return room

    hub.rate("USDEUR", 6, b'{"queued":1}')  # before the handler hands over: queued
    assert not sub.go_direct(writer)  # something is queued: it must be sent first
    data, events, final = await sub.next_chunk(0.01)
    assert events == 1 and not final and b'"queued"' in data
    assert sub.go_direct(writer)
    hub.rate("USDEUR", 5, b'{"old":1}')  # at or below the snapshot's version: already shown
    hub.rate("USDEUR", 7, b'{"new":1}')
    hub.rate("GBPUSD", 8, b'{"other":1}')  # not selected
    assert written == [stream.frame("rate", b'{"new":1}', 7)] and not sub.items
    room = False  # the client is too far behind
    hub.rate("USDEUR", 9, b'{"late":1}')
    assert sub.ended == "slow" and hub.dropped_total == 1
    data, events, final = await sub.next_chunk(0.01)
    assert final and b'"reason":"slow"' in data
    room = True
    hub.rate("USDEUR", 10, b'{"after":1}')
    assert len(written) == 1  # an ended stream is written no more
    hub.unsubscribe(sub)


async def _subscribers(api: ApiProcess, count: int) -> bool:
    return await metric(api, "xrates_stream_subscribers") == count


# --------------------------------------------------------------------------- listener, flush
async def test_listener_loss_resyncs_every_stream_and_refuses_new_ones(db_url, sql, pg, start_api,
                                                                       streams) -> None:
    api = await start_api(db_url)
    db = db_url.rsplit("/", 1)[1]
    events = await open_stream(streams, api)
    assert (await events.next()).event == "snapshot"
    admin = await asyncpg.connect(pg.url)
    try:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        [pid] = [r["pid"] for r in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 "
            "AND application_name = 'xrates-listener'", db)]
        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        resync = await events.next_change()
        assert (resync.event, json.loads(resync.data)) == ("resync", {"reason": "listener"})
        assert await events.next() is None  # and the stream ended
        refused = await api.client.get("/v1/stream")
        assert refused.status_code == 503 and "listener" in refused.json()["error"]
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()

    async def back() -> bool:
        async with api.client.stream("GET", "/v1/stream") as response:
            return response.status_code == 200

    await wait_for(back, 10, 0.1, "streams accepted again")


async def test_a_flush_resyncs_every_stream(db_url, sql, start_api, streams) -> None:
    api = await start_api(db_url)
    events = await open_stream(streams, api, "/v1/stream?base=USD")
    assert (await events.next()).event == "snapshot"
    await sql.execute("TRUNCATE rate")
    resync = await events.next_change()
    assert (resync.event, json.loads(resync.data)) == ("resync", {"reason": "flush"})


# --------------------------------------------------------------------------- reconnects, cap
async def test_last_event_id_reconnect_gets_a_fresh_snapshot(db_url, sql, start_api,
                                                             streams) -> None:
    api = await start_api(db_url)
    await sql.execute(INSERT, "USD", "EUR", "1.1")
    first = await open_stream(streams, api)
    await first.next()
    await sql.execute(INSERT, "USD", "EUR", "1.2")
    change = await first.next_change()
    await sql.execute(INSERT, "USD", "EUR", "1.3")  # missed while "disconnected"
    again = await open_stream(streams, api, headers={"Last-Event-ID": change.id})
    snapshot = await again.next()
    assert snapshot.event == "snapshot"
    assert json.loads(snapshot.data)["rates"][0]["rate"] == 1.3


async def test_streams_are_capped_per_worker(db_url, start_api, streams) -> None:
    api = await start_api(db_url, env={"XRATES_STREAM_MAX": "2"})
    one, _two = await open_stream(streams, api), await open_stream(streams, api)
    await wait_for(lambda: _subscribers(api, 2), 5, what="two streams")
    over = await api.client.get("/v1/stream")
    assert over.status_code == 503 and "too many streams" in over.json()["error"]
    await one.close()
    await wait_for(lambda: _subscribers(api, 1), 5, what="a slot freed")
    third = await open_stream(streams, api)
    assert third.status == 200


# --------------------------------------------------------------------------- many streams, shutdown
STREAMS = 500


async def test_many_streams_get_one_change_then_end_cleanly_on_sigterm(db_url, sql,
                                                                       start_api) -> None:
    api = await start_api(db_url)
    opened = []
    try:
        for start in range(0, STREAMS, 50):  # in batches: bounded accept backlog
            opened += await asyncio.gather(*(raw_stream(api) for _ in range(start, start + 50)))
        await wait_for(lambda: _subscribers(api, STREAMS), 10, what=f"{STREAMS} streams")

        async def receive(reader: asyncio.StreamReader, until: bytes) -> tuple[float, bytes]:
            data = b""
            while until not in data:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
            return time.monotonic(), data

        waiting = [asyncio.create_task(receive(r, b"event: rate")) for r, _w, _ in opened]
        await asyncio.sleep(0)  # every reader is waiting before the write
        t0 = time.monotonic()
        await sql.execute(INSERT, "USD", "EUR", "1.5")
        done = await asyncio.wait_for(asyncio.gather(*waiting), 20)
        latencies = sorted((t - t0) * 1000 for t, data in done if b"event: rate" in data)
        assert len(latencies) == STREAMS
        p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
        print(f"\n{STREAMS} streams, one change: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"(commit to receipt, one worker)")

        # SIGTERM: every stream gets the final chunk and the process exits within the
        # graceful timeout.
        ends = [asyncio.create_task(receive(r, b"0\r\n\r\n")) for r, _w, _ in opened]
        t0 = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        finished = await asyncio.wait_for(asyncio.gather(*ends), 15)
        assert all(data.endswith(b"0\r\n\r\n") for _t, data in finished)
        await wait_for(lambda: _exited(api), 15, 0.05, "the API to exit")
        elapsed = time.monotonic() - t0
        print(f"SIGTERM with {STREAMS} open streams: exited in {elapsed:.2f} s")
        assert elapsed < 15
    finally:
        for _r, writer, _ in opened:
            writer.close()


async def _exited(api: ApiProcess) -> bool:
    return api.proc.poll() is not None
