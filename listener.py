"""The notification path of one API instance, top to bottom: its one LISTEN connection, the
message format of triggers.sql, the backlog that applies bursts in slices, heartbeats,
barriers and liveness. ``model.Store`` is the only ``Sink``.

Rules (each with its test in tests/test_listener.py unless said):
- One connection per instance LISTENs on the shared ``CHANNEL`` and on the instance's own
  heartbeat channel: heartbeats do not fan out to every other instance.
- Notifications are trusted only while delivery is proven end to end: after (re-)LISTEN a
  heartbeat is sent through the pool (``send``), and the sink is told ``trusted`` only once it
  has come back; then a heartbeat every ``heartbeat_s``.
- Liveness is counted when a heartbeat has been *applied* (has left the backlog), not when it
  reached the socket, and from the moment it was *sent*: an applied heartbeat proves that
  everything committed before its send is in the cache, so the cache is as fresh as the send
  of the last applied heartbeat. A backlog that grows faster than it drains delays
  heartbeats, and once that send is more than ``heartbeat_timeout_s`` ago the feed is down
  (the sink bypasses and flushes) — even while late heartbeats keep leaving the backlog.
- Heartbeat sends are never awaited by the silence check: a send that hangs in the pool
  cannot stretch detection past the timeout.
- Payloads are applied in arrival order, at once unless this event-loop iteration has already
  applied ``slice_rows`` rows (default ``SLICE_ROWS``); the rest waits in the backlog, a slice
  per iteration. A heartbeat waits in the same backlog, so a barrier passes only after
  everything before it.
- When the connection ends or goes silent the backlog is dropped, the sink is told
  ``untrusted`` and the feed reconnects with capped backoff; nothing from before a gap is
  applied after it.

Message format (``CHANNEL``; triggers.sql writes it, every payload unique within a transaction):
- ``{"op":"u","rows":[[key, version, rate_text, source, as_of, updated_at], ...]}``
- ``{"op":"d","rows":[[key, version], ...]}`` (``version``: the delete's tombstone)
- ``{"op":"flush", ...}``: forget everything (TRUNCATE, or ``python admin.py flush``)
On ``HISTORY_CHANNEL`` (same connection, so in commit order with the rest):
- ``{"op":"h","sources":[name, ...]}``: those sources' history changed (``null``: every
  source's, a TRUNCATE)
Heartbeats (own channel): ``{"n": number, "t": unix time sent}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncpg

log = logging.getLogger("xrates.listener")

CHANNEL = "xrates"  # must equal xrates_channel() in triggers.sql (tested)
HISTORY_CHANNEL = "xrates_history"  # rate_history_notify() in triggers.sql (tested)
HEARTBEAT_CHANNEL_PREFIX = "xrates_hb_"
SLICE_ROWS = 100  # notification rows applied per event-loop iteration before yielding
APPLICATION_NAME = "xrates-listener"

UpsertRow = Sequence[Any]  # [key, version, rate_text, source, as_of, updated_at]
DeleteRow = Sequence[Any]  # [key, version]


class Sink(Protocol):
    """What the feed drives (model.Store). Every method is synchronous and never awaits."""

    def upserted(self, rows: Sequence[UpsertRow]) -> None: ...

    def deleted(self, rows: Sequence[DeleteRow]) -> None: ...

    def flushed(self) -> None: ...

    def history_changed(self, sources: Sequence[str] | None) -> None: ...

    def barrier_passed(self, number: int) -> None: ...

    def trusted(self) -> None: ...

    def untrusted(self, reason: str) -> None: ...


class Heartbeat(int):
    """A heartbeat waiting in the backlog (its number), with the time it was sent."""

    sent_at: float


class Feed:
    """The one LISTEN connection of an instance and the protocol on it (see the module doc)."""

    def __init__(self, url: str, sink: Sink, send: Callable[[str, str], Awaitable[None]],
                 heartbeat_s: float, heartbeat_timeout_s: float,
                 connect_timeout_s: float | None = None, slice_rows: int = SLICE_ROWS) -> None:
        self.url = url
        self.slice_rows = slice_rows
        self.sink = sink
        self.send = send  # NOTIFY through the pool: proves the whole path, not just the socket
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.connect_timeout_s = connect_timeout_s or heartbeat_timeout_s * 2
        self.instance_id = uuid.uuid4().hex[:12]
        self.heartbeat_channel = HEARTBEAT_CHANNEL_PREFIX + self.instance_id
        self.heartbeats_sent = 0  # numbers the heartbeats: barriers in the stream
        self.heartbeat_lag_s = 0.0  # send → applied, of the last heartbeat
        self.connected = False
        self.reconnects = 0
        self.rows_applied = 0
        self.backend_pid: int | None = None
        self._alive_at = 0.0  # when the last applied heartbeat was sent (monotonic)
        self._sent_at: dict[int, float] = {}  # sent, not yet applied: number -> monotonic time
        self._first_heartbeat = 0  # number of the heartbeat that proves a new connection
        self._proven = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = asyncio.Event()
        self._backlog: deque[str | Heartbeat] = deque()
        self._slice_rows = 0  # rows applied in this event-loop iteration
        self._drain_scheduled = False
        self._sending: asyncio.Task | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="xrates-listener")

    async def close(self) -> None:
        self._closing.set()
        self._lost.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._cancel_send()
        if self._sending is not None:
            # Let it give its pool connection back before the pool goes away.
            with contextlib.suppress(asyncio.CancelledError):
                await self._sending

    @property
    def next_heartbeat(self) -> int:
        """The number of the next heartbeat to be sent: a barrier for what is known now."""
        return self.heartbeats_sent + 1

    @property
    def backlog_size(self) -> int:
        return len(self._backlog)

    @property
    def idle(self) -> bool:
        """Nothing waits in the backlog and no drain is scheduled."""
        return not self._backlog and not self._drain_scheduled

    # -- receiving (asyncpg callbacks: synchronous, O(rows), never await) --------------------
    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.receive(payload)

    def _on_heartbeat(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.receive_heartbeat(payload)

    def receive_heartbeat(self, payload: str) -> None:
        """One of this instance's heartbeats came back: it waits behind the backlog."""
        try:
            message = json.loads(payload)
            heartbeat = Heartbeat(message["n"])
            heartbeat.sent_at = float(message["t"])
        except (ValueError, TypeError, KeyError):
            log.warning("event=heartbeat_ignored payload=%r", payload[:80])
            return
        self._enqueue(heartbeat)

    def receive(self, payload: str) -> None:
        """One payload from the shared channel, in arrival order."""
        self._enqueue(payload)

    def _enqueue(self, item: str | Heartbeat) -> None:
        if self._backlog or self._slice_rows >= self.slice_rows:
            self._backlog.append(item)
        else:
            try:
                self._slice_rows += self._apply(item)
            except Exception:
                # A payload we cannot apply: the cache can no longer be trusted.
                log.exception("event=notification_failed action=reconnect")
                self._lost.set()
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        """A new event-loop iteration: reset the slice and apply the next slice of the backlog."""
        self._drain_scheduled = False
        self._slice_rows = 0
        backlog = self._backlog
        try:
            while backlog and self._slice_rows < self.slice_rows:
                self._slice_rows += self._apply(backlog.popleft())
        except Exception:
            log.exception("event=notification_failed action=reconnect")
            backlog.clear()
            self._lost.set()
        if backlog or self._slice_rows:
            self._schedule_drain()

    def _apply(self, item: str | Heartbeat) -> int:
        """Apply one backlog item; the number of rows it carried (at least 1)."""
        if isinstance(item, Heartbeat):
            self._heartbeat_applied(item)
            return 1
        message = json.loads(item)
        op = message.get("op") if isinstance(message, dict) else None
        sink = self.sink
        if op == "u":
            rows = message["rows"]
            sink.upserted(rows)
        elif op == "d":
            rows = message["rows"]
            sink.deleted(rows)
        elif op == "flush":
            sink.flushed()
            return 1
        elif op == "h":
            sink.history_changed(message["sources"])
            return 1
        elif op == "hb":
            return 1  # a heartbeat of an older release on the shared channel: not ours
        else:
            raise ValueError(f"unknown notification op {op!r}")
        self.rows_applied += len(rows)
        return len(rows) or 1

    def _heartbeat_applied(self, heartbeat: Heartbeat) -> None:
        # Everything committed before this heartbeat was sent has now been applied: the
        # cache is as fresh as that send, however long the heartbeat waited in the backlog.
        sent_at = self._sent_at.pop(int(heartbeat), None)
        for number in [n for n in self._sent_at if n < heartbeat]:
            del self._sent_at[number]  # their sends failed or were overtaken
        if sent_at is not None:
            self._alive_at = max(self._alive_at, sent_at)
        self.heartbeat_lag_s = max(0.0, time.time() - heartbeat.sent_at)
        if heartbeat >= self._first_heartbeat:
            self._proven.set()
        self.sink.barrier_passed(int(heartbeat))

    # -- heartbeats -------------------------------------------------------------------------
    def _send_heartbeat(self) -> None:
        """Start a heartbeat send unless one is still in flight (it hangs: the silence check
        will notice). Never awaited here."""
        if self._sending is not None and not self._sending.done():
            return
        self.heartbeats_sent += 1
        self._sent_at[self.heartbeats_sent] = time.monotonic()
        payload = json.dumps({"n": self.heartbeats_sent, "t": time.time()}, separators=(",", ":"))
        self._sending = asyncio.get_running_loop().create_task(
            self._send_quietly(payload), name="xrates-heartbeat")

    async def _send_quietly(self, payload: str) -> None:
        with contextlib.suppress(Exception):  # a failed send shows up as a missing heartbeat
            await self.send(self.heartbeat_channel, payload)

    def _cancel_send(self) -> None:
        if self._sending is not None:
            self._sending.cancel()  # kept: close() awaits its end

    # -- the connection -----------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing.is_set():
            conn: asyncpg.Connection | None = None
            reason = "closing"
            try:
                conn = await self._connect()
                if not await self._prove_delivery():
                    raise ConnectionError("first heartbeat not delivered")
                self.connected = True
                self.sink.trusted()
                log.info("event=listener_up backend_pid=%s heartbeat_channel=%s reconnects=%d",
                         self.backend_pid, self.heartbeat_channel, self.reconnects)
                backoff = 0.05
                reason = await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._backlog.clear()  # from the lost connection: never applied after the gap
                self._sent_at.clear()
                self._cancel_send()
                if self.connected:
                    self.connected = False
                    self.sink.untrusted(reason)
                    log.log(logging.INFO if reason == "closing" else logging.WARNING,
                            "event=listener_down reason=%r", reason)
                if conn is not None:
                    conn.terminate()  # never wait on a backend that may be frozen
            if self._closing.is_set():
                break
            self.reconnects += 1
            log.info("event=listener_retry backoff_s=%.2f reason=%r", backoff, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff)
            backoff = min(backoff * 2, 1.0)

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url, timeout=self.connect_timeout_s,
                                     server_settings={"application_name": APPLICATION_NAME})
        self._lost.clear()
        conn.add_termination_listener(lambda _conn: self._lost.set())
        await conn.add_listener(CHANNEL, self._on_notify)
        await conn.add_listener(HISTORY_CHANNEL, self._on_notify)
        await conn.add_listener(self.heartbeat_channel, self._on_heartbeat)
        self.backend_pid = conn.get_server_pid()
        return conn

    async def _prove_delivery(self) -> bool:
        self._proven.clear()
        self._first_heartbeat = self.next_heartbeat
        self._send_heartbeat()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proven.wait(), self.heartbeat_timeout_s)
            return True
        return False

    async def _watch(self) -> str:
        """Heartbeat until the connection is lost or delivery stops; the reason.

        The silence check wakes at the deadline itself, whatever the sends are doing."""
        timeout_s = self.heartbeat_timeout_s
        next_send = time.monotonic() + self.heartbeat_s
        while True:
            now = time.monotonic()
            silent_s = now - self._alive_at
            if silent_s > timeout_s:
                return f"no heartbeat applied for {silent_s:.2f}s"
            if now >= next_send:
                self._send_heartbeat()
                next_send = now + self.heartbeat_s
            wake_s = min(next_send, self._alive_at + timeout_s) - now + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), max(wake_s, 0.001))
            if self._lost.is_set():
                return "closing" if self._closing.is_set() else "connection lost"
