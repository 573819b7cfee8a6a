"""The pure cache policy (cache.py): unit tests and a property-based model check over
random interleavings of fills, notifications, own writes, deletes, evictions, flushes and
reconnects, against a model of the database."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache import ABSENT_VERSION, Entry, RateCache


def enabled_cache(size: int = 8) -> RateCache:
    cache = RateCache(size)
    cache.enable()
    return cache


def test_disabled_cache_serves_nothing_and_fills_nothing() -> None:
    cache = RateCache(4)
    assert not cache.enabled
    assert cache.lookup("USDEUR") is None
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, 5, "v5") is False
    assert cache.apply("USDEUR", 6, "v6") is False
    assert len(cache) == 0


def test_zero_size_is_read_through() -> None:
    cache = RateCache(0)
    cache.enable()
    assert not cache.enabled
    assert cache.apply("USDEUR", 1, "v1") is False
    assert len(cache) == 0


def test_only_a_higher_version_replaces() -> None:
    cache = enabled_cache()
    assert cache.apply("USDEUR", 5, "v5")
    assert not cache.apply("USDEUR", 4, "v4")
    assert not cache.apply("USDEUR", 5, "v5-again")
    assert cache.lookup("USDEUR") == Entry(5, "v5")
    assert cache.apply("USDEUR", 7, None)  # tombstone
    assert cache.lookup("USDEUR") == Entry(7, None)
    assert not cache.apply("USDEUR", 6, "v6")  # a late older write cannot resurrect it


def test_fill_that_raced_with_a_change_is_dropped_even_after_eviction() -> None:
    cache = enabled_cache(size=1)
    token = cache.begin_fill("USDEUR")  # the read's SELECT returns v1 ...
    assert cache.apply("USDEUR", 2, "v2")  # ... but v2 arrives meanwhile
    assert cache.apply("GBPUSD", 3, "other")  # and evicts USDEUR (size 1)
    assert cache.lookup("USDEUR") is None
    assert cache.finish_fill(token, 1, "v1") is False
    assert cache.lookup("USDEUR") is None


def test_fill_is_dropped_after_a_flush() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    cache.flush()
    assert cache.finish_fill(token, 1, "v1") is False


def test_fill_is_dropped_after_disable_and_reenable() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    cache.disable()
    cache.enable()
    assert cache.finish_fill(token, 1, "v1") is False


def test_change_before_the_read_began_does_not_void_it() -> None:
    cache = enabled_cache(size=1)
    cache.apply("USDEUR", 2, "v2")
    cache.apply("GBPUSD", 3, "x")  # evicts
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, 2, "v2")
    assert cache.lookup("USDEUR") == Entry(2, "v2")


def test_negative_fill_is_cached_and_outranked_by_any_change() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, ABSENT_VERSION, None)
    assert cache.lookup("USDEUR") == Entry(ABSENT_VERSION, None)
    assert cache.apply("USDEUR", 1, "v1")
    assert cache.lookup("USDEUR") == Entry(1, "v1")


def test_concurrent_fills_of_one_key_are_tracked_separately() -> None:
    cache = enabled_cache()
    early = cache.begin_fill("USDEUR")
    cache.apply("USDEUR", 2, "v2")
    late = cache.begin_fill("USDEUR")
    cache.lookup("USDEUR")
    assert cache.finish_fill(early, 1, "v1") is False
    cache.flush()  # the v2 entry is gone; only the late read may fill
    late2 = cache.begin_fill("USDEUR")
    assert cache.finish_fill(late2, 2, "v2")
    assert cache.finish_fill(late, 2, "v2") is False  # begun before the flush


def test_cancelled_fill_releases_tracking() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    cache.cancel_fill(token)
    assert cache.fills_in_flight == 0


def test_size_bound_counts_tombstones() -> None:
    cache = enabled_cache(size=3)
    for version, key in enumerate(["AAABBB", "CCCDDD", "EEEFFF", "GGGHHH", "IIIJJJ"], 1):
        cache.apply(key, version, None)
    assert len(cache) == 3  # the three newest tombstones, and nothing beyond the bound
    assert [cache.lookup(k) for k in ("EEEFFF", "GGGHHH", "IIIJJJ")] == [
        Entry(3, None), Entry(4, None), Entry(5, None)]


def test_own_write_survives_eviction_against_its_late_older_notification() -> None:
    cache = enabled_cache(size=1)
    token = cache.begin_fill("USDEUR")
    assert cache.finish_write(token, 2, "v2", barrier=1)  # ours; v1's NOTIFY still in flight
    cache.apply("GBPUSD", 3, "x")  # evicts USDEUR
    assert cache.apply("USDEUR", 1, "v1") is False  # the late older notification
    assert cache.lookup("USDEUR") is None
    assert cache.apply("USDEUR", 2, "v2")  # its own notification caught up
    assert cache.floors == 0


def test_a_late_own_write_never_replaces_a_newer_evicted_change() -> None:
    cache = enabled_cache(size=1)
    token = cache.begin_fill("USDEUR")  # our write is sent ...
    assert cache.apply("USDEUR", 1, "v1")  # ... commits, and its notification arrives
    assert cache.apply("USDEUR", 2, "v2")  # someone else's newer write
    cache.apply("GBPUSD", 3, "x")  # evicts USDEUR
    assert cache.finish_write(token, 1, "v1", barrier=1) is False  # our write returns late
    assert cache.lookup("USDEUR") is None  # a miss reads v2 from the database


def test_own_write_replaces_a_lower_entry_even_if_the_key_was_touched() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    cache.apply("USDEUR", 1, "v1")  # an older change arrives while our write is out
    assert cache.finish_write(token, 2, "v2", barrier=1)
    assert cache.lookup("USDEUR") == Entry(2, "v2")  # read your own write


def test_own_write_after_a_flush_raises_the_floor_but_inserts_nothing() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    cache.flush()  # TRUNCATE (or a reconnect) while the write was out
    assert cache.finish_write(token, 5, "v5", barrier=1) is False
    assert cache.lookup("USDEUR") is None
    assert cache.apply("USDEUR", 4, "v4") is False  # older than what the client was told


def test_floors_are_dropped_by_the_heartbeat_sent_after_them() -> None:
    cache = enabled_cache(size=1)
    for version, (key, barrier) in enumerate([("AAABBB", 1), ("CCCDDD", 2), ("EEEFFF", 2)], 1):
        cache.finish_write(cache.begin_fill(key), version, f"v{version}", barrier=barrier)
    assert cache.floors == 3
    cache.pass_barrier(1)
    assert cache.floors == 2
    cache.pass_barrier(2)
    assert cache.floors == 0


def test_at_the_floor_cap_fills_are_served_uncached_and_floors_kept() -> None:
    cache = RateCache(8, floor_cap=2)
    cache.enable()
    for version, key in enumerate(["AAABBB", "CCCDDD"], 1):
        assert cache.finish_fill(cache.begin_fill(key), version, "v", barrier=1)
    assert cache.finish_fill(cache.begin_fill("EEEFFF"), 3, "v3", barrier=1) is False
    assert cache.lookup("EEEFFF") is None and cache.floors == 2
    token = cache.begin_fill("GGGHHH")
    assert cache.finish_write(token, 4, "v4", barrier=1)  # own writes keep their floor
    assert cache.floors == 3
    cache.pass_barrier(1)
    assert cache.finish_fill(cache.begin_fill("EEEFFF"), 3, "v3", barrier=2)


def test_negative_fill_waits_for_the_heartbeat_barrier() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, ABSENT_VERSION, None, barrier=7) is False
    assert cache.lookup("USDEUR") is None  # not yet provably current
    assert cache.pass_barrier(6) == 0
    assert cache.pass_barrier(7) == 1
    assert cache.lookup("USDEUR") == Entry(ABSENT_VERSION, None)


def test_negative_fill_is_dropped_if_the_key_changes_before_the_barrier() -> None:
    cache = enabled_cache(size=1)
    token = cache.begin_fill("USDEUR")
    cache.finish_fill(token, ABSENT_VERSION, None, barrier=1)
    cache.apply("USDEUR", 4, "v4")  # an insert committed before the read: still in flight
    cache.apply("GBPUSD", 5, "x")  # evicts it
    assert cache.pass_barrier(1) == 0
    assert cache.lookup("USDEUR") is None


def test_negative_fill_never_hides_a_state_known_ahead_of_the_stream() -> None:
    cache = enabled_cache(size=1)
    cache.finish_write(cache.begin_fill("USDEUR"), 1, "v1", barrier=1)
    cache.apply("GBPUSD", 2, "x")  # evicts USDEUR
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, ABSENT_VERSION, None) is False
    assert cache.lookup("USDEUR") is None


def test_floors_survive_a_flush_until_a_heartbeat_passes() -> None:
    cache = enabled_cache()
    cache.apply("USDEUR", 3, "v3")
    cache.finish_write(cache.begin_fill("USDEUR"), 5, "v5", barrier=1)  # told to the client
    cache.flush()  # a TRUNCATE's flush arrives; v4 (committed before v5) follows it
    assert cache.apply("USDEUR", 4, "v4") is False
    cache.pass_barrier(1)
    assert cache.floors == 0


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        RateCache(-1)


def test_the_least_recently_used_entry_is_evicted_and_a_lookup_is_a_use() -> None:
    cache = enabled_cache(2)
    cache.apply("USDEUR", 1, "a")
    cache.apply("EURGBP", 2, "b")
    assert cache.lookup("USDEUR") == Entry(1, "a")
    cache.apply("GBPJPY", 3, "c")  # evicts EURGBP, used less recently than USDEUR
    assert cache.lookup("EURGBP") is None
    assert cache.lookup("USDEUR") == Entry(1, "a")
    cache.apply("EURGBP", 4, "d")  # evicts GBPJPY
    assert [cache.lookup(key) for key in ("USDEUR", "GBPJPY")] == [Entry(1, "a"), None]


# ------------------------------------------------------------------ the cyclic GC
# A full collection walks every GC-tracked object and stops the event loop meanwhile: with
# 65,536 cached rates and an object or three per entry, 20-100 ms. The cache adds none.
SIZE = 2000
# Pairs of 46 codes, as real tables are (the currency index keeps a set per code, not per pair).
CODES = [f"C{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(46)]
PAIRS = [a + b for a in CODES for b in CODES if a != b][:SIZE]


def test_a_full_cache_under_churn_adds_no_object_for_the_cyclic_gc_to_walk() -> None:
    cache = enabled_cache(SIZE)
    gc.collect()
    before = len(gc.get_objects())
    for version in (1, 2, 3):  # a fill, then every entry replaced twice (one in ten deleted)
        for i, key in enumerate(PAIRS):
            cache.apply(key, version, None if version == 3 and i % 10 == 0 else "v")
    gc.collect()
    assert len(gc.get_objects()) - before < SIZE // 10
    assert not gc.is_tracked(cache.lookup(PAIRS[1]))
    index = cache.index
    assert index is not None  # nothing was evicted
    # A set per currency code: 17,000 of them (the benchmark's table) made the collection
    # after a warm refill take ~15 ms; they only ever hold codes, so they are untracked.
    assert not any(gc.is_tracked(members) for members in
                   [*index.by_base.values(), *index.by_quote.values()])


def test_a_refill_adds_no_object_for_the_cyclic_gc_to_walk() -> None:
    """Every refilled row gets a floor until its heartbeat is back: 65,536 tracked floor tuples
    made the first collection after a warm refill (the collector is off while it runs) take
    ~10 ms. Counted in the youngest generation, without a collection (which would untrack
    plain tuples itself)."""
    cache = enabled_cache(SIZE)
    rows = [(key, 1, "v") for key in PAIRS]
    gc.disable()
    try:
        gc.collect()
        before = len(gc.get_objects(generation=0))
        token = cache.begin_refill()
        assert cache.refill_rows(token, rows, barrier=1) == SIZE
        cache.end_refill(token, whole=True)
        added = len(gc.get_objects(generation=0)) - before
    finally:
        gc.enable()
    assert cache.floors == SIZE
    assert added < SIZE // 10


def test_a_flush_frees_every_entry_without_the_cyclic_gc() -> None:
    """Nothing cyclic is left behind (boltons' LRU left its ring of links): the entries would
    otherwise need a full collection, or leak if someone gc.freeze()s them."""
    cache = enabled_cache(SIZE)
    for i in range(SIZE):
        cache.apply(f"K{i:05d}", 1, "v")
    gc.collect()
    cache.flush()
    while cache.shed(500):
        pass
    assert gc.collect() < SIZE // 10


class Value:
    """A cached value that can tell when it was freed."""


def test_a_flush_serves_nothing_at_once_and_frees_the_old_entries_a_slice_at_a_time() -> None:
    cache = enabled_cache(SIZE)
    values = [Value() for _ in PAIRS]
    for key, value in zip(PAIRS, values, strict=True):
        cache.apply(key, 1, value)
    freed = [weakref.ref(value) for value in values]
    del values, value
    cache.flush()
    assert len(cache) == 0 and not any(cache.lookup(key) for key in PAIRS)
    assert cache.retired == SIZE and not any(ref() is None for ref in freed)
    assert cache.apply(PAIRS[0], 2, "new") and cache.lookup(PAIRS[0]) == Entry(2, "new")
    assert cache.shed(500) is True
    assert cache.retired == SIZE - 500
    assert [ref() is None for ref in freed] == [True] * 500 + [False] * (SIZE - 500)  # oldest
    cache.flush()  # a second flush meanwhile: its entry waits behind the first's
    while cache.shed(500):
        pass
    assert cache.retired == 0 and all(ref() is None for ref in freed)
    assert len(cache) == 0 and cache.lookup(PAIRS[0]) is None


@pytest.mark.parametrize("first", [0, 1, 3, 6, 9, 10])
def test_a_heartbeat_drops_exactly_the_floors_from_before_it_in_order(first: int) -> None:
    """Floors are dropped from the front or, when most of them pass, by keeping the rest in
    a new dict: either way exactly those of earlier barriers go, and the order stays."""
    cache = enabled_cache(size=1)
    keys = [f"K{i:05d}" for i in range(1, 11)]
    for i, key in enumerate(keys, 1):  # key i: version 10 i, floor until heartbeat i
        cache.finish_write(cache.begin_fill(key), 10 * i, "v", barrier=i)
    for barrier in range(first, 11):
        cache.pass_barrier(barrier)
        assert cache.floors == 10 - barrier
    cache = enabled_cache(size=1)
    for i, key in enumerate(keys, 1):
        cache.finish_write(cache.begin_fill(key), 10 * i, "v", barrier=i)
    cache.pass_barrier(first)
    # a key whose floor stays still refuses an older state; one whose floor went takes it
    # (each is evicted but the last: size 1)
    assert [cache.apply(key, 10 * i - 5, "old") for i, key in enumerate(keys[:-1], 1)] == [
        i <= first for i in range(1, 10)]


def test_an_entry_with_a_tracked_value_stays_tracked_so_its_cycles_are_collected() -> None:
    class Marker:
        pass

    cache = enabled_cache(1)
    marker = Marker()
    value: list[object] = [marker]
    cache.apply("USDEUR", 1, value)
    entry = cache.lookup("USDEUR")
    assert gc.is_tracked(entry)
    value.append(entry)  # a cycle through the entry: value -> entry -> value
    gone = weakref.ref(marker)
    del marker, value, entry
    cache.apply("EURGBP", 2, "v")  # evicts it: the cycle is garbage
    gc.collect()
    assert gone() is None


# --------------------------------------------------------------------------- model check
KEYS = ("USDEUR", "EURGBP", "GBPJPY")


class CacheAgainstDatabase(RuleBasedStateMachine):
    """A database (versions from one sequence, notifications in commit order), a listener
    that can disconnect, and every step that can interleave as its own rule: a read begins,
    takes its snapshot, finishes; an own write is sent, commits, returns; a TRUNCATE commits
    and its flush waits in the stream; heartbeats are sent and come back. The cache is smaller
    than the key set (evictions all the time) and so is its floor cap."""

    CACHE_SIZE, FLOOR_CAP = 1, 2

    def __init__(self) -> None:
        super().__init__()
        self.cache = RateCache(self.CACHE_SIZE, floor_cap=self.FLOOR_CAP)
        self.cache.enable()
        self.connected = True
        self.version = 0
        self.db: dict[str, tuple[int, str | None]] = {}
        self.history: dict[tuple[str, int], str | None] = {}
        # the notification stream: (key, version, value); "hb" carries a heartbeat number,
        # "flush" a TRUNCATE
        self.queue: list[tuple[str, int, str | None]] = []
        self.heartbeats_sent = 0
        self.applied_max: dict[str, int] = {}  # newest version the stream has applied
        self.reads: list[dict] = []
        self.writes: list[dict] = []
        # key -> (version the cache gave a negative fill, DB version the read observed)
        self.negative_fills: dict[str, tuple[int, int]] = {}
        # negative results offered but not yet cached: key -> [(barrier, observed version)];
        # the cache stores one when its heartbeat passes with no change of the key meanwhile
        self.pending_negatives: dict[str, list[tuple[int, int]]] = {}
        self.served_max: dict[str, int] = {}  # newest state served or told to a client
        self.refill: dict | None = None  # a warm refill: begun, read, offered in slices, ended
        # model.Store starts a refill after each flush while the listener is up (enable() at
        # startup included); StraddlingWritesAgainstDatabase begins them only then
        self.refill_due = True

    # -- the database ---------------------------------------------------------------
    def _commit(self, key: str, value: str | None) -> int:
        self.version += 1
        self.db[key] = (self.version, value)
        self.history[(key, self.version)] = value
        if self.connected:
            self.queue.append((key, self.version, value))
        return self.version

    def _told(self, key: str, version: int) -> None:
        self.served_max[key] = max(self.served_max.get(key, 0), version)

    @rule(key=st.sampled_from(KEYS), value=st.text("xyz", min_size=1, max_size=2))
    def write_elsewhere(self, key: str, value: str) -> None:
        self._commit(key, value)

    @rule(key=st.sampled_from(KEYS))
    def delete_elsewhere(self, key: str) -> None:
        if key in self.db and self.db[key][1] is not None:
            self._commit(key, None)

    @rule()
    def truncate(self) -> None:
        """TRUNCATE: every key is gone at once; the flush is queued in the stream."""
        self.version += 1
        for key in KEYS:
            self.db[key] = (self.version, None)
            self.history[(key, self.version)] = None
        if self.connected:
            self.queue.append(("flush", self.version, None))

    @precondition(lambda self: self.queue)
    @rule()
    def deliver(self) -> None:
        key, version, value = self.queue.pop(0)
        if key == "hb":
            self.cache.pass_barrier(version)
            self._negatives_settled(version)
        elif key == "flush":
            self.cache.flush()
            self.pending_negatives.clear()
            if self.cache.enabled:
                self.refill_due = True
            for k in KEYS:
                self.applied_max[k] = version
        else:
            self.cache.apply(key, version, value)
            self.pending_negatives.pop(key, None)  # a change: those results are moot
            if self.cache.enabled:
                self.applied_max[key] = max(self.applied_max.get(key, 0), version)

    def _negatives_settled(self, barrier: int) -> None:
        """Heartbeat ``barrier`` passed: the negative results it guarded are current as of
        what their reads observed (and the key's negative entry, if any, with them)."""
        for key, pending in list(self.pending_negatives.items()):
            due = [observed for guard, observed in pending if guard <= barrier]
            if not due:
                continue
            before = self.negative_fills.get(key, (ABSENT_VERSION, 0))[1]
            self.negative_fills[key] = (ABSENT_VERSION, max(before, *due))
            left = [(guard, observed) for guard, observed in pending if guard > barrier]
            if left:
                self.pending_negatives[key] = left
            else:
                del self.pending_negatives[key]

    @rule()
    def send_heartbeat(self) -> None:
        self.heartbeats_sent += 1
        if self.connected:
            self.queue.append(("hb", self.heartbeats_sent, None))

    # -- own writes: sent, committed, returned ----------------------------------------
    @rule(key=st.sampled_from(KEYS), value=st.one_of(st.none(), st.text("xyz", min_size=1,
                                                                          max_size=2)))
    def write_sent(self, key: str, value: str | None) -> None:
        self.writes.append({"token": self.cache.begin_fill(key), "value": value,
                            "version": None})

    @precondition(lambda self: any(w["version"] is None for w in self.writes))
    @rule(pick=st.integers(0, 3))
    def write_commits(self, pick: int) -> None:
        pending = [w for w in self.writes if w["version"] is None]
        write = pending[pick % len(pending)]
        key = write["token"].key
        if write["value"] is None and self.db.get(key, (0, None))[1] is None:
            self.writes.remove(write)  # a DELETE of an absent pair: 404, nothing committed
            self.cache.cancel_fill(write["token"])
            return
        write["version"] = self._commit(key, write["value"])

    def a_write_committed(self) -> bool:
        return any(w["version"] is not None for w in self.writes)

    @precondition(a_write_committed)
    @rule(pick=st.integers(0, 3))
    def write_returns(self, pick: int) -> None:
        done = [w for w in self.writes if w["version"] is not None]
        write = done[pick % len(done)]
        self.writes.remove(write)
        self._return(write)

    def _return(self, write: dict) -> None:
        self.cache.finish_write(write["token"], write["version"], write["value"],
                                barrier=self.heartbeats_sent + 1)
        if self.cache.enabled:
            self._told(write["token"].key, write["version"])  # the client saw it

    @precondition(lambda self: any(w["version"] is None for w in self.writes))
    @rule(pick=st.integers(0, 3))
    def write_fails(self, pick: int) -> None:
        pending = [w for w in self.writes if w["version"] is None]
        write = pending[pick % len(pending)]
        self.writes.remove(write)
        self.cache.cancel_fill(write["token"])

    # -- the listener -----------------------------------------------------------------
    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False
        self.queue.clear()  # whatever was not delivered is lost
        self.pending_negatives.clear()  # the cache drops its pending results with its trust
        self.cache.disable()

    def disconnected(self) -> bool:
        return not self.connected

    @precondition(disconnected)
    @rule()
    def reconnect(self) -> None:
        self.connected = True
        self.cache.enable()
        self.refill_due = True

    # -- reads --------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS))
    def begin_read(self, key: str) -> None:
        if self.cache.enabled and self.cache.lookup(key) is None:
            self.reads.append({"token": self.cache.begin_fill(key), "snapshot": None})

    @precondition(lambda self: self.reads)
    @rule(pick=st.integers(0, 3))
    def read_progresses(self, pick: int) -> None:
        """The pick-th read in flight takes its snapshot, or, if it has one, finishes."""
        read = self.reads[pick % len(self.reads)]
        key = read["token"].key
        if read["snapshot"] is None:
            version, value = self.db.get(key, (ABSENT_VERSION, None))
            read["observed"] = version
            read["snapshot"] = (ABSENT_VERSION, None) if value is None else (version, value)
        else:
            self.reads.remove(read)
            version, value = read["snapshot"]
            # both kinds are guarded by the next heartbeat, as model.Store does
            self.cache.finish_fill(read["token"], version, value,
                                   barrier=self.heartbeats_sent + 1)
            if value is None:
                self.pending_negatives.setdefault(key, []).append(
                    (self.heartbeats_sent + 1, read["observed"]))

    @precondition(lambda self: self.reads)
    @rule(pick=st.integers(0, 3))
    def read_fails(self, pick: int) -> None:
        read = self.reads.pop(pick % len(self.reads))
        self.cache.cancel_fill(read["token"])

    # -- warm refill: begins, reads the table at one snapshot, offers slices, ends ---------
    @precondition(lambda self: self.refill is None)
    @rule()
    def refill_begins(self) -> None:
        self.refill = {"token": self.cache.begin_refill(), "rows": None}
        self.refill_due = False

    def refill_unread(self) -> bool:
        return self.refill is not None and self.refill["rows"] is None

    @precondition(refill_unread)
    @rule()
    def refill_reads(self) -> None:
        """Its one statement: every present row, most recently changed first."""
        rows = [(key, version, value) for key, (version, value) in self.db.items()
                if value is not None]
        assert self.refill is not None
        self.refill["rows"] = sorted(rows, key=lambda row: -row[1])
        self.refill["count"] = len(rows)

    def refill_rows_left(self) -> bool:
        return self.refill is not None and bool(self.refill["rows"])

    @precondition(refill_rows_left)
    @rule(size=st.integers(1, 2))
    def refill_offers_a_slice(self, size: int) -> None:
        assert self.refill is not None
        rows, self.refill["rows"] = self.refill["rows"][:size], self.refill["rows"][size:]
        self.cache.refill_rows(self.refill["token"], rows, barrier=self.heartbeats_sent + 1)

    @precondition(lambda self: self.refill is not None)
    @rule()
    def refill_ends(self) -> None:
        """Done (the whole table when its read found fewer rows than the cache holds, as
        model.Store says), or failed part way: the rest is never offered."""
        assert self.refill is not None
        rows = self.refill["rows"]
        whole = rows == [] and self.refill["count"] < self.cache.max_size
        self.cache.end_refill(self.refill["token"], whole=whole)
        self.refill = None

    # -- guarantees -----------------------------------------------------------------------
    @invariant()
    def bounded(self) -> None:
        assert len(self.cache) <= self.cache.max_size

    @invariant()
    def never_stale_nor_invented(self) -> None:
        for key in KEYS:
            entry = self.cache.lookup(key) if self.cache.enabled else None
            if entry is None:
                continue
            # never older than anything already applied for the key (no stale fill); a
            # negative entry is as new as the database state its read observed
            observed = entry.version
            if entry.value is None and self.negative_fills.get(key, (None,))[0] == entry.version:
                observed = max(entry.version, self.negative_fills[key][1])
            assert observed >= self.applied_max.get(key, 0), (key, entry)
            # monotonic reads: never a state older than one already served or written
            assert observed >= self.served_max.get(key, 0), (key, entry, self.served_max)
            self._told(key, observed)
            if entry.value is not None:
                # a state the database really had
                assert self.history[(key, entry.version)] == entry.value

    @invariant()
    def a_complete_cache_knows_every_row(self) -> None:
        """While complete, a key without an entry has no row: "absent" is a state the key
        really had, no older than anything the stream applied or a client was told (so lists
        and paths built from the entries never drop a row a client has seen). It may be newer
        than the stream: a refill's snapshot is."""
        if not self.cache.complete:
            return
        for key in KEYS:
            if self.cache.lookup(key) is not None:
                continue
            newest = max(self.applied_max.get(key, 0), self.served_max.get(key, 0))
            states = sorted((v, value) for (k, v), value in self.history.items() if k == key)
            as_of_newest = [value for v, value in states if v <= newest][-1:] or [None]
            later = [value for v, value in states if v > newest]
            assert None in as_of_newest + later, (
                f"the complete cache lacks {key}, whose row a client may know: as of version "
                f"{newest} (the newest applied or told) it was {as_of_newest[0]!r}, and the "
                f"database has {self.db.get(key)!r}")

    @invariant()
    def the_index_lists_the_live_entries(self) -> None:
        index = self.cache.index
        if index is None:
            return
        live = {key for key in KEYS if (e := self.cache.peek(key)) is not None
                and e.value is not None}
        assert {b + q for b, quotes in index.by_base.items() for q in quotes} == live
        assert {b + q for q, bases in index.by_quote.items() for b in bases} == live

    def teardown(self) -> None:
        # Convergence: once writes stop and every notification is delivered, every
        # cached entry equals the database.
        for write in list(self.writes):
            self.writes.remove(write)
            if write["version"] is None:
                self.cache.cancel_fill(write["token"])
            else:
                self._return(write)
        if not self.connected:
            self.reconnect()
        self.send_heartbeat()
        while self.queue:
            self.deliver()
        for read in list(self.reads):
            self.reads.remove(read)
            self.cache.cancel_fill(read["token"])
        assert self.cache.fills_in_flight == 0
        for key in KEYS:
            entry = self.cache.lookup(key)
            if entry is None:
                continue
            version, value = self.db.get(key, (ABSENT_VERSION, None))
            assert entry.value == value, (key, entry, self.db.get(key))
            if value is not None:
                assert entry.version == version


CacheAgainstDatabase.TestCase.settings = settings(
    max_examples=2000, stateful_step_count=50, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_against_database = CacheAgainstDatabase.TestCase


class CompleteCacheAgainstDatabase(CacheAgainstDatabase):
    """The same steps with room for the whole table: warm refills make the cache complete."""

    CACHE_SIZE, FLOOR_CAP = 4, 8


CompleteCacheAgainstDatabase.TestCase.settings = settings(
    CacheAgainstDatabase.TestCase.settings, max_examples=1000)
test_complete_cache_against_database = CompleteCacheAgainstDatabase.TestCase


class StraddlingWritesAgainstDatabase(CompleteCacheAgainstDatabase):
    """Own writes across flushes and warm refills, densely. An own write that straddles a flush
    (sent before it, committed after a refill read the table, returned after that refill made
    the cache complete) takes about ten particular steps, which the machines above, picking
    uniformly among twenty rules for 50 steps, almost never string together. Here, each rule
    still one step:
    - a refill begins as model.Store begins one: after each flush while the listener is up
      (not whenever none is in flight), the one that flush voided being cancelled (its
      end_refill is a no-op then, whenever it runs);
    - refill_is_done is refill_ends once every row was offered: the refill succeeding;
    - no reads and no failed writes (the machines above interleave those);
    - weights (``weigh``) on the steps that carry a write across a flush into a complete
      cache, and runs of 150 steps: the cache stays complete for long stretches."""

    def refill_is_due(self) -> bool:
        return self.refill_due and self.connected

    @precondition(refill_is_due)
    @rule()
    def refill_begins(self) -> None:
        if self.refill is not None:  # cancelled by the flush: its token is void
            self.cache.end_refill(self.refill["token"])
        super().refill_begins()

    def refill_offered_every_row(self) -> bool:
        return self.refill is not None and self.refill["rows"] == []

    @precondition(refill_offered_every_row)
    @rule()
    def refill_is_done(self) -> None:
        self.refill_ends()

    # Not rules here: a plain method hides the rule it overrides.
    def begin_read(self, key: str) -> None:
        raise AssertionError("not a step of this machine")

    def read_progresses(self, pick: int) -> None:
        raise AssertionError("not a step of this machine")

    def read_fails(self, pick: int) -> None:
        raise AssertionError("not a step of this machine")

    def write_fails(self, pick: int) -> None:
        raise AssertionError("not a step of this machine")


def weigh(machine: type[RuleBasedStateMachine], step: str, weight: int,
          when: Callable[[Any], bool] | None = None, **arguments: st.SearchStrategy[Any]) -> None:
    """Make ``machine``'s rule ``step`` (its precondition ``when``, its argument strategies
    ``arguments``) ``weight`` times as likely: Hypothesis picks uniformly among the rules that
    may run, so add ``weight - 1`` rules that each run that one step. Each needs a name of its
    own (copies sharing one are not picked more often)."""
    for copy in range(2, weight + 1):
        def again(self: Any, **kwargs: Any) -> None:
            getattr(self, step)(**kwargs)

        again.__name__ = again.__qualname__ = f"{step}_{copy}"
        again = rule(**arguments)(again)
        setattr(machine, again.__name__, again if when is None else precondition(when)(again))


_S = StraddlingWritesAgainstDatabase
weigh(_S, "refill_begins", 8, _S.refill_is_due)
weigh(_S, "refill_reads", 8, _S.refill_unread)
weigh(_S, "refill_offers_a_slice", 8, _S.refill_rows_left, size=st.integers(1, 2))
weigh(_S, "refill_is_done", 8, _S.refill_offered_every_row)
weigh(_S, "reconnect", 8, _S.disconnected)
weigh(_S, "write_returns", 8, _S.a_write_committed, pick=st.integers(0, 3))
weigh(_S, "write_sent", 2, key=st.sampled_from(KEYS),
      value=st.one_of(st.none(), st.text("xyz", min_size=1, max_size=2)))

# No shrinking: a failing 150-step run is reported as found (about a second in), because
# shrinking one took over five minutes (seen with finish_write not marking an unsettled key).
StraddlingWritesAgainstDatabase.TestCase.settings = settings(
    CompleteCacheAgainstDatabase.TestCase.settings, max_examples=100, stateful_step_count=150,
    phases=(Phase.explicit, Phase.reuse, Phase.generate))
test_straddling_writes_against_database = StraddlingWritesAgainstDatabase.TestCase


# --------------------------------------------------------------------------- completeness
def complete_cache(rows: dict[str, tuple[int, str]], size: int = 8) -> RateCache:
    """A cache made complete by a whole refill of ``rows``."""
    cache = enabled_cache(size)
    token = cache.begin_refill()
    cache.refill_rows(token, [(k, v, value) for k, (v, value) in rows.items()], barrier=1)
    cache.end_refill(token, whole=True)
    return cache


def test_a_whole_refill_makes_the_cache_complete_and_indexes_the_rows() -> None:
    cache = complete_cache({"EURUSD": (1, "a"), "EURGBP": (2, "b")})
    assert cache.complete
    index = cache.index
    assert index is not None
    assert index.by_base == {"EUR": {"USD", "GBP"}} and index.neighbours("USD") == {"EUR"}
    cache.apply("EURUSD", 3, None)  # a delete leaves the index
    assert index.by_base == {"EUR": {"GBP"}} and "USD" not in index.by_quote
    assert cache.complete


def test_a_partial_refill_or_an_eviction_leaves_the_cache_incomplete() -> None:
    cache = enabled_cache(4)
    token = cache.begin_refill()
    cache.refill_rows(token, [("EURUSD", 1, "a")], barrier=1)
    cache.end_refill(token, whole=False)  # the read hit its LIMIT: the table may be larger
    assert not cache.complete
    cache = complete_cache({"EURUSD": (1, "a")}, size=2)
    cache.apply("EURGBP", 2, "b")
    assert cache.complete
    cache.apply("EURJPY", 3, "c")  # evicts: some row is no longer cached
    assert not cache.complete and cache.index is None
    cache.flush()
    assert not cache.complete and cache.index is not None  # until the next whole refill


def test_an_own_write_that_straddled_a_flush_keeps_the_cache_incomplete_until_its_barrier() -> None:
    cache = enabled_cache()
    token = cache.begin_fill("EURUSD")  # our INSERT is sent ...
    cache.flush()  # ... a reconnect flushes ...
    refill = cache.begin_refill()  # ... and the refill reads the table before it commits
    cache.end_refill(refill, whole=True)
    assert cache.complete
    assert cache.finish_write(token, 5, "v5", barrier=3) is False  # told to the client
    assert not cache.complete  # a list now would miss EURUSD
    cache.pass_barrier(2)
    assert not cache.complete
    cache.apply("EURUSD", 5, "v5")  # its notification ...
    cache.pass_barrier(3)  # ... and the heartbeat after it
    assert cache.complete and cache.lookup("EURUSD") == Entry(5, "v5")


def test_a_refill_row_older_than_an_uncached_floor_leaves_the_cache_incomplete() -> None:
    cache = enabled_cache()
    cache.finish_write(cache.begin_fill("EURGBP"), 7, "w", barrier=1)  # ours, told
    cache.flush()  # its entry goes, its floor stays
    refill = cache.begin_refill()
    cache.refill_rows(refill, [("EURGBP", 6, "older")], barrier=2)  # an older snapshot
    cache.end_refill(refill, whole=True)
    assert not cache.complete
