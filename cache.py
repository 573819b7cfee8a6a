"""The cache policy of one API instance: pure, no I/O, driven by model.py.

Rules (contract §5):
- An entry is replaced only by a strictly higher version; deletes leave versioned tombstones.
- A fill (a value read from the database on a miss) is dropped if any change for its key,
  or a flush, was applied after the read began — even if the newer entry was evicted since.
- While the listener is not proven alive the cache is disabled: reads bypass it, and it is
  flushed before it is trusted again.
- An own write (this instance's write, applied when its statement returns) is guarded like a
  fill: it raises the key's floor (below) and replaces a lower entry, but it inserts a missing
  key only if nothing touched the key and no flush happened since the write began — a newer
  change may have been applied and evicted while the write was on its way back.
- A state known before its notification arrives (an own write, or a fill that read a
  committed row) becomes a *floor* for its key: no older notification replaces it, even after
  an eviction or a flush. A floor is dropped once its own notification (or a newer one)
  arrives, or once a heartbeat sent after it has come back (everything committed before that
  heartbeat has then arrived). At ``floor_cap`` floors, fills are served but not cached, so that no floor
  is ever dropped early.
- A negative result (no row) is cached only once a heartbeat sent after the read has come
  back through the notification stream with no change of the key: provably current.
- The LRU never holds more than ``max_size`` entries (tombstones included).
- A flush swaps in an empty LRU at once and keeps the old one aside, to be freed a slice at
  a time (``shed``): freeing 65,536 entries in one go stopped the event loop for ~40 ms.
- The cache is *complete* (``complete``: every row of the table has its entry, so a key
  without one has no row) once a warm refill read the whole table, while nothing was evicted
  since the last flush and every state this instance learnt ahead of the stream is cached
  (an own write that could not be inserted keeps it incomplete until a heartbeat sent after
  it is back). Lists and conversions are answered from a complete cache (views.py).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

_dict_get = dict.get  # see RateCache.apply
_intern = sys.intern
_is_tracked = gc.is_tracked
_gc_untrack = ctypes.pythonapi.PyObject_GC_UnTrack
_gc_untrack.argtypes = (ctypes.py_object,)
_gc_untrack.restype = None
_T = TypeVar("_T")

# Version of a negative entry from a read that found no row: any real change outranks it.
ABSENT_VERSION = 0
# Floors at which fills stop being cached (see RateCache._floors); own writes still add theirs.
FLOOR_CAP = 65536


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached state of one key. ``value`` is None for a deleted/absent key (tombstone)."""

    version: int
    value: Any


def untracked(obj: _T) -> _T:
    """``obj``, out of the cyclic garbage collector's sight (refcounting still frees it).

    Only for an immutable object that refers to nothing tracked (str, bytes, int, None, other
    untracked objects; its class aside): it can be in no reference cycle, so the collector has
    nothing to find there. CPython untracks exact tuples and dicts of such values itself, but
    never a NamedTuple or a dataclass, and a full collection walks every tracked object: with
    65,536 cached rates, one stopped a worker for tens of ms."""
    if _is_tracked(obj):  # never a non-GC object (str, int...): it has no GC header to clear
        _gc_untrack(obj)
    return obj


class LRU(OrderedDict[str, Entry]):
    """At most ``max_size`` entries; a new key evicts the least recently used (stored or
    looked up). An OrderedDict's links are C structs, not objects the collector walks (boltons'
    LRU kept a list per entry), and an entry whose value is untracked is untracked too (cached
    values are immutable: every reader is handed the same one)."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def get(self, key: str, default: None = None) -> Entry | None:  # type: ignore[override]
        """The entry of ``key`` (now the most recently used), or None."""
        entry = _dict_get(self, key)
        if entry is not None:
            self.move_to_end(key)
        return entry

    def __setitem__(self, key: str, entry: Entry) -> None:
        if key in self:
            self.move_to_end(key)
        elif len(self) >= self.max_size:
            self.popitem(last=False)
        if not _is_tracked(entry.value):
            untracked(entry)
        super().__setitem__(key, entry)


_SERVING_NOTHING = LRU(max_size=0)  # never stored into: a disabled cache serves nothing


@dataclass(frozen=True, slots=True)
class FillToken:
    """Handed out when a miss starts its database read; returned with the result."""

    key: str
    epoch: int
    tick: int


@dataclass(frozen=True, slots=True)
class RefillToken:
    """Handed out when a bulk read of the table (a warm refill) is about to start."""

    epoch: int
    serial: int


def _code_set() -> set[str]:
    """An empty set that will only ever hold currency codes (str), so it can be in no
    reference cycle: untracked, the collector never walks it (a table of 65,536 pairs with
    17,000 quote currencies made a collection after a warm refill walk 17,000 sets: ~15 ms)."""
    members: set[str] = set()
    _gc_untrack(members)
    return members


class CurrencyIndex:
    """The live keys (rows, not tombstones) of the cache by base and by quote currency."""

    def __init__(self) -> None:
        self.by_base: dict[str, set[str]] = {}
        self.by_quote: dict[str, set[str]] = {}

    def set_live(self, key: str, live: bool) -> None:
        # Interned: a few hundred codes shared by every entry, not two new strings per rate.
        base, quote = _intern(key[:3]), _intern(key[3:])
        if live:
            for index, outer, inner in ((self.by_base, base, quote),
                                        (self.by_quote, quote, base)):
                members = index.get(outer)
                if members is None:
                    members = index[outer] = _code_set()
                members.add(inner)
            return
        for index, outer, inner in ((self.by_base, base, quote), (self.by_quote, quote, base)):
            members = index.get(outer)
            if members is not None:
                members.discard(inner)
                if not members:
                    del index[outer]

    def neighbours(self, code: str) -> set[str]:
        """Currencies that ``code`` has a live row with, in either direction."""
        return self.by_base.get(code, set()) | self.by_quote.get(code, set())


class RateCache:
    """Versioned LRU with fill protection. Not thread-safe: one event loop drives it."""

    def __init__(self, max_size: int, floor_cap: int = FLOOR_CAP) -> None:
        if max_size < 0:
            raise ValueError("max_size must be >= 0")
        self.max_size = max_size
        self.floor_cap = floor_cap
        self._lru: LRU | None = LRU(max_size=max_size) if max_size > 0 else None
        self._enabled = False
        # What lookups may be served from: the LRU while enabled, else an empty map (one
        # attribute read on the hit path instead of two tests).
        self._serving: LRU = _SERVING_NOTHING
        self._epoch = 0  # bumped by every flush: fills begun before it are void
        self._tick = 0  # bumped by every applied change
        # key -> [readers in flight, tick of the last change applied to the key]
        self._inflight: dict[str, list[int]] = {}
        # key -> (version, barrier): a state this instance learnt before its notification
        # arrived (an own write, or a fill that read a committed row whose NOTIFY may still be
        # in flight); older notifications for the key must not win, even after an eviction.
        # Kept in insertion order, which is barrier order (barriers never decrease), so that
        # pass_barrier drops the floors it makes safe from the front.
        self._floors: dict[str, tuple[int, int]] = {}
        # key -> heartbeat number a negative result waits for (see finish_fill)
        self._pending_negative: dict[str, int] = {}
        # The refill in flight, if any: (its serial, the keys whose state changed since it
        # began). Its rows never replace those: each is at best as new as its snapshot.
        self._refill: tuple[int, set[str]] | None = None
        self._refill_serial = 0
        # Completeness (module docstring): the index lives while nothing was evicted since the
        # last flush; a whole refill makes the cache complete; _unsettled holds keys (-> the
        # heartbeat that settles them) whose state, known ahead of the stream, is not cached.
        self._index: CurrencyIndex | None = CurrencyIndex() if self._lru is not None else None
        self._whole = False
        self._refill_broken = False
        self._unsettled: dict[str, int] = {}
        self._generation = 0  # bumped whenever the cached content changes (views key on it)
        self._retired: list[LRU] = []  # flushed LRUs, freed a slice at a time by shed()

    # -- state -------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True while lookups may be served from the cache (listener proven alive)."""
        return self._enabled and self._lru is not None

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    @property
    def complete(self) -> bool:
        """True while every row of the table has its entry (module docstring): a key without
        one has no row, and lists and paths may be answered from the index."""
        return (self._whole and self._enabled and self._index is not None
                and not self._unsettled)

    @property
    def generation(self) -> int:
        """Changes whenever any cached entry does (or the cache is flushed)."""
        return self._generation

    @property
    def index(self) -> CurrencyIndex | None:
        """The live keys by currency (None once something was evicted since the flush)."""
        return self._index

    def peek(self, key: str) -> Entry | None:
        """The cached entry of ``key`` without making it recently used (views read many)."""
        if not self._enabled or self._lru is None:
            return None
        return _dict_get(self._lru, key)

    def enable(self) -> None:
        """The listener is (re-)LISTENing and proven alive: flush, then trust the cache."""
        self.flush()
        self._enabled = True
        self._serving = self._lru if self._lru is not None else _SERVING_NOTHING

    def disable(self) -> None:
        """The listener is down: notifications may be missed from now on."""
        self._enabled = False
        self._serving = _SERVING_NOTHING
        self.flush()

    def flush(self) -> None:
        """Forget every entry and void every fill in flight."""
        if self._lru is not None:
            if self._lru:
                self._retired.append(self._lru)  # nothing serves from it any more
                self._lru = LRU(max_size=self.max_size)
                if self._serving is not _SERVING_NOTHING:
                    self._serving = self._lru
            self._index = CurrencyIndex()
        self._whole = False
        self._generation += 1
        # Floors (and unsettled keys) survive: an own write may have returned (and been told
        # to its client) before a TRUNCATE's flush arrived, while older notifications of its
        # key still follow the flush in the stream. Heartbeats drop floors soon enough.
        self._pending_negative.clear()
        self._refill = None  # its snapshot may hold rows the flush removed
        self._epoch += 1
        self._tick += 1

    @property
    def retired(self) -> int:
        """Entries of flushed LRUs not yet freed (see ``shed``)."""
        return sum(len(old) for old in self._retired)

    def shed(self, limit: int) -> bool:
        """Free up to ``limit`` entries of flushed LRUs, oldest first; True while more remain
        (the caller frees the next slice in a later event-loop iteration)."""
        retired = self._retired
        while retired and limit > 0:
            old = retired[0]
            for _ in range(min(limit, len(old))):
                old.popitem(last=False)
                limit -= 1
            if not old:
                retired.pop(0)
        return bool(retired)

    # -- reads -------------------------------------------------------------------------
    def lookup(self, key: str) -> Entry | None:
        """The cached entry for ``key`` (a tombstone is an entry too), or None on a miss;
        a found key is now the most recently used. The hit path: C calls only."""
        serving = self._serving
        entry = _dict_get(serving, key)
        if entry is not None:
            serving.move_to_end(key)
        return entry

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
        (a negative result). ``barrier`` is the number of the next heartbeat, which is sent
        after the read. A negative result is cached only when provably current: once that
        heartbeat has come back through the notification stream (``pass_barrier``) with no
        change of the key in between. A positive one is cached at once and becomes the key's
        floor until that heartbeat is back. Without a barrier the caller vouches that no
        older notification for the key can still be on its way.
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
        floor = self._floors.get(token.key)
        if floor is not None and version < floor[0]:
            return False  # the read began after a newer state was applied: an old snapshot
        current = self._lru.get(token.key)
        if current is not None and current.version >= version:
            return False
        if barrier is not None:
            if floor is None and len(self._floors) >= self.floor_cap:
                return False  # served, not cached: no floor is ever dropped to make room
            self._raise_floor(token.key, version, barrier)
        self._put(token.key, current, version, value)
        self._touched(token.key)
        return True

    def finish_write(self, token: FillToken, version: int, value: Any, barrier: int) -> bool:
        """This instance's own committed write (``value`` None: a delete's tombstone), offered
        when its statement returns; ``token`` was taken before the statement was sent and
        ``barrier`` is the next heartbeat's number. Returns True if the cache changed.

        The write is known ahead of its notification, so it becomes the key's floor. It
        replaces a lower entry (read your own writes), but a missing key is inserted only if
        nothing touched it and no flush happened since the write began: a newer state may
        have been applied and evicted while the write was on its way back, and its
        notification would never come again to correct an older one put over it.
        """
        touched = self._release(token.key)
        lru = self._lru
        if not self._enabled or lru is None:
            return False
        key = token.key
        if self._raise_floor(key, version, barrier) > version:
            return False  # a newer write of ours (told to its client) returned first
        current = lru.get(key)
        if current is not None:
            if current.version >= version:
                return False
        elif touched > token.tick or token.epoch != self._epoch:
            if value is not None:  # a row the client was told of, not cached: not complete
                self._unsettled[key] = barrier
            return False
        self._put(key, current, version, value)
        self._touched(key)
        return True

    def _put(self, key: str, current: Entry | None, version: int, value: Any) -> None:
        """Store an entry over ``current`` (the key's entry, None if missing), keeping the
        index and the completeness rules (``apply`` and ``refill_rows`` inline this)."""
        lru = self._lru
        assert lru is not None  # callers checked
        if current is None and len(lru) >= self.max_size:
            self._evicting()
        lru[key] = Entry(version, value)
        self._generation += 1
        index = self._index
        if index is not None and (current is None or current.value is None) != (value is None):
            index.set_live(key, value is not None)

    def _evicting(self) -> None:
        """The LRU is about to drop its oldest entry: the index and completeness are lost
        until the next flush (the evicted key is not known here)."""
        self._index = None
        self._whole = False

    def _raise_floor(self, key: str, version: int, barrier: int) -> int:
        """Make ``version`` the key's floor unless it has a higher one; the floor's version."""
        floor = self._floors.pop(key, None)
        if floor is not None and floor[0] > version:
            version = floor[0]
        # Re-inserted last: insertion = barrier order. Untracked: a warm refill makes one per
        # row, and the first collection after it walked them all (~5 ms for 65,536).
        self._floors[key] = untracked((version, barrier))
        return version

    @property
    def floors(self) -> int:
        """How many keys have a floor (states known ahead of the stream)."""
        return len(self._floors)

    @property
    def fills_in_flight(self) -> int:
        """How many keys have a database read begun and not yet finished or cancelled."""
        return len(self._inflight)

    def pass_barrier(self, barrier: int) -> int:
        """Heartbeat ``barrier`` came back: everything committed before it was sent has been
        applied. Drop the floors it makes safe and cache the negative results waiting for it;
        returns how many negative results were cached."""
        if self._floors:
            self._drop_floors_up_to(barrier)
        if self._unsettled:  # their notifications have been applied by now
            for key in [k for k, needed in self._unsettled.items() if needed <= barrier]:
                del self._unsettled[key]
        ready = [key for key, needed in self._pending_negative.items() if needed <= barrier]
        stored = 0
        for key in ready:
            del self._pending_negative[key]
            stored += self._store_negative(key)
        return stored

    def _drop_floors_up_to(self, barrier: int) -> None:
        """Drop the floors that ``barrier`` makes safe: a prefix of ``_floors`` (insertion
        order is barrier order). Whichever of the prefix and the rest is shorter is walked in
        Python: the rest is kept in a new dict when it is the shorter (the old one is freed
        in C: a warm refill leaves ~25,000 floors per heartbeat, 8-11 ms one by one, ~2 ms
        so). Never next(iter()) per key: a dict skips the slots of deleted keys from its
        start every time, which made dropping 20,000 floors take 0.9 s."""
        floors = self._floors
        kept: list[tuple[str, tuple[int, int]]] = []
        for key in reversed(floors):
            floor = floors[key]
            if floor[1] <= barrier:
                self._floors = dict(reversed(kept))
                return
            kept.append((key, floor))
            if len(kept) > len(floors) // 2:
                break  # most floors stay: drop the prefix from the front instead
        else:
            return  # none passed
        passed = []
        for key, (_, needed) in floors.items():
            if needed > barrier:
                break
            passed.append(key)
        for key in passed:
            del floors[key]

    def _store_negative(self, key: str) -> bool:
        if not self._enabled or self._lru is None or key in self._floors:
            return False  # a newer state of the key is known (maybe evicted): not current
        if self._lru.get(key) is not None:
            return False
        self._put(key, None, ABSENT_VERSION, None)
        self._touched(key)
        return True

    # -- warm refill: one bulk read after a flush ----------------------------------------
    def begin_refill(self) -> RefillToken:
        """Register a bulk read of the table that is about to start (one at a time: a new
        one voids the last)."""
        self._refill_serial += 1
        self._refill = (self._refill_serial, set())
        self._refill_broken = False
        return RefillToken(self._epoch, self._refill_serial)

    def refill_rows(self, token: RefillToken, rows: Iterable[tuple[str, int, Any]],
                    barrier: int) -> int:
        """Offer rows (key, version, value) of the refill's read, most recently changed
        first; returns how many were cached. A row is skipped if its key changed since the
        refill began, or a newer state of it is known (entry or floor); each cached row
        becomes its key's floor until ``barrier`` (the next heartbeat) is back, as a fill
        does. It stops once the LRU is full or the floor cap is reached: what is left stays
        a miss. A flush since the refill began voids it."""
        refill = self._refill
        lru = self._lru
        if (refill is None or refill[0] != token.serial or token.epoch != self._epoch
                or not self._enabled or lru is None):
            return 0
        touched, floors, index = refill[1], self._floors, self._index
        stored = 0
        for key, version, value in rows:
            current = _dict_get(lru, key)
            if current is None and len(lru) >= self.max_size:
                self._refill_broken = True
                break
            if key in touched or (current is not None and current.version >= version):
                continue
            floor = _dict_get(floors, key)
            if floor is not None and version < floor[0]:
                if current is None:  # a newer state is known but not cached
                    self._refill_broken = True
                continue
            if floor is None and len(floors) >= self.floor_cap:
                self._refill_broken = True
                break
            self._raise_floor(key, version, barrier)
            lru[key] = Entry(version, value)
            if index is not None and (current is None or current.value is None):
                index.set_live(key, True)  # (a refill row is never a tombstone)
            stored += 1
        if stored:
            self._generation += 1
        return stored

    def end_refill(self, token: RefillToken, whole: bool = False) -> None:
        """The refill is done (or failed): stop tracking what changes. ``whole``: every row of
        the table was offered (its read returned fewer than ``max_size`` rows); if each was
        cached or outranked, and nothing was evicted or flushed since, the cache is complete."""
        if self._refill is not None and self._refill[0] == token.serial:
            self._refill = None
            if (whole and not self._refill_broken and token.epoch == self._epoch
                    and self._index is not None):
                self._whole = True

    def _touched(self, key: str) -> None:
        if self._refill is not None:
            self._refill[1].add(key)

    def unchanged_since(self, token: FillToken) -> bool:
        """True if no change of the token's key and no flush has been applied since the read
        began: a read that begins now could not see a newer committed state that this
        instance knows of (so a concurrent miss may share its result)."""
        record = self._inflight.get(token.key)
        return (record is not None and record[1] <= token.tick and token.epoch == self._epoch)

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
    def apply(self, key: str, version: int, value: Any) -> bool:
        """Apply a committed change from the notification stream (``value`` None: deleted).

        Notifications arrive in commit order; only states this instance learnt directly (its
        own writes, its fills) can be ahead of them, and those are the floors. Returns True if
        the cache changed.
        """
        self._tick += 1
        record = self._inflight.get(key)
        if record is not None:
            record[1] = self._tick
        if self._refill is not None:  # _touched, inline: this is the notification hot path
            self._refill[1].add(key)
        if self._pending_negative:
            self._pending_negative.pop(key, None)  # a change: the negative result is moot
        lru = self._lru
        if not self._enabled or lru is None:
            return False
        # The LRU is a dict: the plain dict read skips the Python-level .get() and its
        # reordering (most keys on the notification path are absent), and the store below
        # moves the key to the front anyway.
        floors = self._floors
        if floors:
            floor = _dict_get(floors, key)
            if floor is not None:
                if version < floor[0]:
                    return False  # older than a state already served, maybe since evicted
                del floors[key]  # the stream has caught up with it
        current = _dict_get(lru, key)
        if current is not None and current.version >= version:
            return False
        if current is None and len(lru) >= self.max_size:
            self._evicting()
        lru[key] = Entry(version, value)
        self._generation += 1
        index = self._index  # _put, inline
        if index is not None and (current is None or current.value is None) != (value is None):
            index.set_live(key, value is not None)
        return True
