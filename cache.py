"""The cache policy of one API instance: pure, no I/O, driven by model.py.

Rules (SPEC §5):
- An entry is replaced only by a strictly higher version; deletes leave versioned tombstones.
- A fill (a value read from the database on a miss) is dropped if any change for its key,
  or a flush, was applied after the read began — even if the newer entry was evicted since.
- While the listener is not proven alive the cache is disabled: reads bypass it, and it is
  flushed before it is trusted again.
- A state known before its notification arrives (this instance's own write, or a fill that
  read a newer committed row) is not replaced by an older notification, even after an eviction.
- A negative result (no row) is cached only once a heartbeat sent after the read has come
  back through the notification stream with no change of the key: provably current.
- The LRU never holds more than ``max_size`` entries (tombstones included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from boltons.cacheutils import LRI, LRU

_dict_get = dict.get  # see RateCache.apply

# Version of a negative entry from a read that found no row: any real change outranks it.
ABSENT_VERSION = 0
# States known ahead of the notification stream that are remembered (see RateCache._ahead).
AHEAD_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached state of one key. ``value`` is None for a deleted/absent key (tombstone)."""

    version: int
    value: Any


@dataclass(frozen=True, slots=True)
class FillToken:
    """Handed out when a miss starts its database read; returned with the result."""

    key: str
    epoch: int
    tick: int


class RateCache:
    """Versioned LRU with fill protection. Not thread-safe: one event loop drives it."""

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self._lru: LRU | None = LRU(max_size=max_size) if max_size > 0 else None
        self._enabled = False
        self._epoch = 0  # bumped by every flush: fills begun before it are void
        self._tick = 0  # bumped by every applied change
        # key -> [readers in flight, tick of the last change applied to the key]
        self._inflight: dict[str, list[int]] = {}
        # key -> version of a state this instance learnt before its notification arrived
        # (its own write, or a fill that read a committed row whose NOTIFY is still in
        # flight); older notifications for the key must not win, even after an eviction.
        # Entries leave when the stream catches up; the bound only ages out stale ones.
        self._ahead: LRI = LRI(max_size=AHEAD_SIZE)
        # key -> heartbeat number a negative result waits for (see finish_fill)
        self._pending_negative: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True while lookups may be served from the cache (listener proven alive)."""
        return self._enabled and self._lru is not None

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    def enable(self) -> None:
        """The listener is (re-)LISTENing and proven alive: flush, then trust the cache."""
        self.flush()
        self._enabled = True

    def disable(self) -> None:
        """The listener is down: notifications may be missed from now on."""
        self._enabled = False
        self.flush()

    def flush(self) -> None:
        """Forget every entry and void every fill in flight."""
        if self._lru is not None:
            self._lru.clear()
        self._ahead.clear()  # notifications from before a flush never arrive after it
        self._pending_negative.clear()
        self._epoch += 1
        self._tick += 1

    # -- reads -------------------------------------------------------------------------
    def lookup(self, key: str) -> Entry | None:
        """The cached entry for ``key`` (a tombstone is an entry too), or None on a miss."""
        if not self._enabled or self._lru is None:
            return None
        return self._lru.get(key)

    def begin_fill(self, key: str) -> FillToken:
        """Register a database read of ``key`` that is about to start."""
        record = self._inflight.get(key)
        if record is None:
            self._inflight[key] = [1, 0]
        else:
            record[0] += 1
        return FillToken(key, self._epoch, self._tick)

    def finish_fill(self, token: FillToken, version: int, value: Any,
                    barrier: int | None = None) -> bool:
        """Offer the read's result; returns True if it was cached now.

        ``version`` is the row's version; a read that found no row passes value None
        (a negative result). A negative result is cached only when provably current: once
        heartbeat number ``barrier``, sent after the read, has come back through the
        notification stream (``pass_barrier``) with no change of the key in between —
        then no older notification for the key can still be on its way. Without a
        barrier the caller vouches for that itself.
        """
        touched = self._release(token.key)
        if (
            touched > token.tick
            or token.epoch != self._epoch
            or not self._enabled
            or self._lru is None
        ):
            return False
        if value is None:
            if barrier is not None:
                if len(self._pending_negative) < self.max_size:
                    self._pending_negative[token.key] = barrier
                return False
            return self._store_negative(token.key)
        ahead = self._ahead.get(token.key)
        if ahead is not None and version < ahead:
            return False  # the read began after a newer state was applied: an old snapshot
        current = self._lru.get(token.key)
        if current is not None and current.version >= version:
            return False
        self._lru[token.key] = Entry(version, value)
        self._ahead[token.key] = version  # its notification may still be on the way
        return True

    def pass_barrier(self, barrier: int) -> int:
        """Heartbeat ``barrier`` came back: cache the negative results waiting for it."""
        ready = [key for key, needed in self._pending_negative.items() if needed <= barrier]
        stored = 0
        for key in ready:
            del self._pending_negative[key]
            stored += self._store_negative(key)
        return stored

    def _store_negative(self, key: str) -> bool:
        if not self._enabled or self._lru is None or key in self._ahead:
            return False  # a newer state of the key is known (maybe evicted): not current
        if self._lru.get(key) is not None:
            return False
        self._lru[key] = Entry(ABSENT_VERSION, None)
        return True

    def cancel_fill(self, token: FillToken) -> None:
        """The read failed or was cancelled: just stop tracking it."""
        self._release(token.key)

    def _release(self, key: str) -> int:
        record = self._inflight[key]
        record[0] -= 1
        if record[0] == 0:
            del self._inflight[key]
        return record[1]

    # -- changes -----------------------------------------------------------------------
    def apply(self, key: str, version: int, value: Any, own_write: bool = False) -> bool:
        """Apply a committed change: a notification, or (``own_write``) this instance's
        own write, applied before its notification arrives (read your own writes).

        Notifications arrive in commit order; only states this instance learnt directly (its
        own writes, its fills) can be ahead of them, and those are remembered in ``_ahead``.
        ``value`` None means deleted. Returns True if the cache changed.
        """
        self._tick += 1
        record = self._inflight.get(key)
        if record is not None:
            record[1] = self._tick
        if self._pending_negative:
            self._pending_negative.pop(key, None)  # a change: the negative result is moot
        lru = self._lru
        if not self._enabled or lru is None:
            return False
        # boltons' LRI/LRU are dicts holding the same values as their linked lists. Their
        # .get() raises and catches KeyError on a miss (slow on the notification path, where
        # most keys are absent); the plain dict read answers the same without reordering, and
        # the store below moves the key to the front anyway.
        ahead = _dict_get(self._ahead, key)
        if own_write:
            if ahead is None or version > ahead:
                self._ahead[key] = version
        elif ahead is not None:
            if version < ahead:
                return False  # older than a state already served, which may have been evicted
            del self._ahead[key]  # the stream has caught up
        current = _dict_get(lru, key)
        if current is not None and current.version >= version:
            return False
        lru[key] = Entry(version, value)
        return True
