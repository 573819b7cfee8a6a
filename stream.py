"""The live change stream of one API worker (``GET /v1/stream``): a ``Hub`` fed by the worker's
one listener, fanning each applied change out to the open streams.

Rules:
- ``model.Store`` calls the hub synchronously right after it applied a change to the cache
  (``rate``, ``delete``); the hub never awaits a client. With nobody subscribed that costs one
  attribute test per payload.
- Each change is encoded once (its SSE frame, ``id:`` = the row's version) and appended to the
  bounded queue of every subscriber whose selection (all, a base, a set of pairs) contains its
  key: O(matching subscribers) per change, through per-base and per-pair indexes.
- Once a stream's snapshot (and anything queued behind it) is sent, its handler hands the hub
  a writer (``go_direct``, ``internals.chunk_writer``): from then on each change is written
  straight to that stream's transport inside ``_publish`` (one write per stream, no task to
  wake), and the handler only sends pings and the final event.
- A subscriber whose queue is full (it is ``queue_size`` events behind), or whose transport
  holds more than ``queue_size * DIRECT_BYTES_PER_EVENT`` unsent bytes, is cut off at once: its
  queue is replaced by one ``event: resync`` (``{"reason":"slow"}``) and its stream ends. If
  its handler is stuck on a client that stopped reading, the connection is aborted after
  ``DROP_GRACE_S``. Nobody else waits for it.
- While the listener is down (``untrusted``) the hub is unavailable: every stream gets
  ``resync`` (``{"reason":"listener"}``) and new ones are refused (503) until ``trusted``. A
  flush (``flushed``) ends every stream with ``{"reason":"flush"}``: only a new snapshot is
  right after it.
- Snapshot consistency: a stream subscribes *before* it reads its snapshot, so no change can
  fall between the two; deltas at or below the snapshot's version of their key are dropped
  (per key, a higher version is the later committed state).
- Shutdown (``close``): every stream ends with its final chunk; the ones whose client does not
  take it within the grace period are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

PING_S = 15.0  # a comment line at least this often: keeps proxies and RESPONSE_TIMEOUT at bay
DROP_GRACE_S = 3.0  # a dropped or shut-down stream's client gets this long to take its last chunk
RETRY_MS = 3000  # the reconnect delay suggested to EventSource clients
PING_FRAME = b": ping\n\n"
DIRECT_BYTES_PER_EVENT = 1024  # a direct stream's unsent-bytes bound, per queue slot
Writer = Callable[[bytes], bool]  # write one event now (False: the client is too far behind)


class StreamUnavailable(Exception):
    """No new stream now (listener down, or the per-worker cap reached): a 503."""


def frame(event: str, data: bytes, event_id: int | None = None) -> bytes:
    """One SSE event. ``data`` is a single line of JSON (no newline), as every payload here."""
    head = b"id: %d\n" % event_id if event_id is not None else b""
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def resync_frame(reason: str) -> bytes:
    return frame("resync", json.dumps({"reason": reason}, separators=(",", ":")).encode())


class Subscriber:
    """One open stream: its selection and its bounded queue of (key, version, frame)."""

    __slots__ = ("_abort_timer", "_wake", "base", "direct", "ended", "floors", "hub", "items",
                 "pairs", "transport")

    def __init__(self, hub: Hub, pairs: frozenset[str] | None, base: str | None,
                 transport: Any = None) -> None:
        self.hub = hub
        self.pairs = pairs  # keys (base + quote), or None
        self.base = base
        self.transport = transport  # aborted if the client will not take its last chunk
        self.items: deque[tuple[str, int, bytes]] = deque()
        self.floors: dict[str, int] | None = None  # key -> snapshot version, once known
        self.ended: str | None = None  # why the stream ends ("slow", "listener", "flush", "shutdown")
        self.direct: Writer | None = None  # set by go_direct: the hub writes events itself
        self._wake = asyncio.Event()
        self._abort_timer: asyncio.TimerHandle | None = None

    def set_snapshot(self, versions: dict[str, int]) -> None:
        """The versions the snapshot showed: queued or later deltas at or below them are old."""
        self.floors = versions

    def go_direct(self, writer: Writer) -> bool:
        """From now on the hub writes this stream's events with ``writer``; only when nothing
        is queued (so nothing can overtake it) and the stream has not ended. The caller, its
        handler, must not await between its last send and this call."""
        if self.items or self.ended is not None or self.floors is None:
            return False
        self.direct = writer
        return True

    def _end(self, reason: str, final: bytes | None) -> None:
        """Stop taking events; leave only ``final`` (if any) to be sent, then the end."""
        self.ended = reason
        self.direct = None
        self.items.clear()
        if final is not None:
            self.items.append(("", 0, final))
        self._wake.set()
        if self.transport is not None:
            # A handler stuck on a client that stopped reading never gets to send the end.
            self._abort_timer = asyncio.get_running_loop().call_later(
                DROP_GRACE_S, self._abort)

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.abort()

    def finished(self) -> None:
        """The handler is done with this stream (sent its end, or the client went)."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    async def next_chunk(self, timeout_s: float = PING_S) -> tuple[bytes, int, bool]:
        """What to send next: (bytes, number of events in them, whether the stream ends after
        them). A ping when nothing came within ``timeout_s``."""
        if not self.items and self.ended is None:
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the wait in a task of its
            # own, so a wake-up would reach this handler two loop iterations late, while the
            # listener applies a slice of a burst per iteration.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
        if not self.items:
            return (b"", 0, True) if self.ended is not None else (PING_FRAME, 0, False)
        floors = self.floors or {}
        chunks = []
        items = self.items
        while items:
            key, version, data = items.popleft()
            if key and version <= floors.get(key, 0):
                continue  # already in the snapshot
            chunks.append(data)
        return b"".join(chunks), len(chunks), self.ended is not None


class Hub:
    """Every open stream of one worker, fed synchronously by model.Store (see module doc)."""

    def __init__(self, queue_size: int = 256, max_streams: int = 1000) -> None:
        self.queue_size = queue_size
        self.direct_buffer_limit = queue_size * DIRECT_BYTES_PER_EVENT
        self.max_streams = max_streams
        self.available = False  # the listener is proven alive (Store.trusted)
        self.closing = False
        self.subscribers = 0
        self.events_total = 0  # events written to clients (counted by the handlers)
        self.dropped_total = 0  # streams closed for being slow
        self._all: set[Subscriber] = set()
        self._by_base: dict[str, set[Subscriber]] = {}
        self._by_pair: dict[str, set[Subscriber]] = {}
        self._open: set[Subscriber] = set()  # every stream not yet finished, indexed or not
        self._all_done: asyncio.Event | None = None  # set when the last stream is gone (close)

    # -- streams ------------------------------------------------------------------------
    def subscribe(self, pairs: Iterable[str] | None = None, base: str | None = None,
                  transport: Any = None) -> Subscriber:
        """A new stream for the pairs (keys) or base given, or all; StreamUnavailable if not now."""
        if self.closing:
            raise StreamUnavailable("the instance is shutting down")
        if not self.available:
            raise StreamUnavailable("listener not connected: the stream cannot be trusted")
        if len(self._open) >= self.max_streams:
            raise StreamUnavailable(f"too many streams on this worker (at most {self.max_streams})")
        sub = Subscriber(self, frozenset(pairs) if pairs is not None else None, base, transport)
        if sub.pairs is not None:
            for key in sub.pairs:
                self._by_pair.setdefault(key, set()).add(sub)
        elif base is not None:
            self._by_base.setdefault(base, set()).add(sub)
        else:
            self._all.add(sub)
        self._open.add(sub)
        self.subscribers = len(self._open)
        return sub

    def _unindex(self, sub: Subscriber) -> None:
        if sub.pairs is not None:
            for key in sub.pairs:
                group = self._by_pair.get(key)
                if group is not None:
                    group.discard(sub)
                    if not group:
                        del self._by_pair[key]
        elif sub.base is not None:
            group = self._by_base.get(sub.base)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._by_base[sub.base]
        else:
            self._all.discard(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        """The stream's handler returned (idempotent)."""
        self._unindex(sub)
        sub.finished()
        self._open.discard(sub)
        self.subscribers = len(self._open)
        if not self._open and self._all_done is not None:
            self._all_done.set()

    # -- changes (synchronous: called from the listener's callbacks, never awaits) -------
    @property
    def listening(self) -> bool:
        """True if any stream takes changes: the Store skips the hub otherwise."""
        return bool(self._all or self._by_base or self._by_pair)

    def rate(self, key: str, version: int, body: bytes) -> None:
        """An applied upsert of ``key`` (base + quote) whose rate object is ``body``."""
        self._publish(key, version, frame("rate", body, version))

    def delete(self, key: str, version: int) -> None:
        """An applied delete of ``key`` with its tombstone ``version``."""
        body = b'{"base":"%s","quote":"%s","version":%d}' % (key[:3].encode(), key[3:].encode(),
                                                             version)
        self._publish(key, version, frame("delete", body, version))

    def _publish(self, key: str, version: int, data: bytes) -> None:
        item = (key, version, data)
        limit = self.queue_size
        slow: list[Subscriber] = []
        for group in (self._all, self._by_base.get(key[:3]), self._by_pair.get(key)):
            if not group:
                continue
            for sub in group:
                direct = sub.direct
                if direct is not None:
                    if version <= sub.floors.get(key, 0):  # type: ignore[union-attr]
                        continue  # already in the snapshot (go_direct needs floors)
                    if direct(data):
                        self.events_total += 1
                    else:
                        slow.append(sub)
                    continue
                items = sub.items
                if len(items) >= limit:
                    slow.append(sub)
                    continue
                items.append(item)
                if len(items) == 1:
                    sub._wake.set()  # once per batch: the handler drains the whole queue
        for sub in slow:
            self.dropped_total += 1
            self._unindex(sub)
            sub._end("slow", resync_frame("slow"))

    def resync_all(self, reason: str) -> None:
        """End every stream with ``event: resync`` (the client reconnects to a new snapshot)."""
        final = resync_frame(reason)
        for sub in list(self._all) + [s for g in self._by_base.values() for s in g] + [
                s for g in self._by_pair.values() for s in g]:
            self._unindex(sub)
            sub._end(reason, final)

    # -- the listener's state (model.Store's sink methods) ----------------------------------
    def listener_up(self) -> None:
        self.available = True

    def listener_down(self) -> None:
        self.available = False
        self.resync_all("listener")

    def flushed(self) -> None:
        self.resync_all("flush")

    # -- shutdown -----------------------------------------------------------------------
    async def close(self, timeout_s: float = DROP_GRACE_S + 1.0) -> None:
        """End every stream (its final chunk) and wait, bounded, until their handlers are done."""
        self.closing = True
        self.available = False
        for sub in list(self._open):
            self._unindex(sub)
            if sub.ended is None:
                sub._end("shutdown", None)
        if self._open:
            self._all_done = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_done.wait(), timeout_s)
