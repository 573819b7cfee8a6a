"""The pure cache policy (cache.py): unit tests and a property-based model check over
random interleavings of fills, notifications, own writes, deletes, evictions, flushes and
reconnects, against a model of the database."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
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
    assert cache._inflight == {}


def test_size_bound_counts_tombstones() -> None:
    cache = enabled_cache(size=3)
    for version, key in enumerate(["AAABBB", "CCCDDD", "EEEFFF", "GGGHHH", "IIIJJJ"], 1):
        cache.apply(key, version, None)
        assert len(cache) <= 3


def test_own_write_survives_eviction_against_its_late_older_notification() -> None:
    cache = enabled_cache(size=1)
    cache.apply("USDEUR", 2, "v2", own_write=True)  # our write; v1's NOTIFY still in flight
    cache.apply("GBPUSD", 3, "x")  # evicts USDEUR
    assert cache.apply("USDEUR", 1, "v1") is False  # the late older notification
    assert cache.lookup("USDEUR") is None
    assert cache.apply("USDEUR", 2, "v2")  # its own notification caught up
    assert len(cache._ahead) == 0


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
    cache.apply("USDEUR", 1, "v1", own_write=True)
    cache.apply("GBPUSD", 2, "x")  # evicts USDEUR
    token = cache.begin_fill("USDEUR")
    assert cache.finish_fill(token, ABSENT_VERSION, None) is False
    assert cache.lookup("USDEUR") is None


def test_flush_forgets_own_writes_ahead() -> None:
    cache = enabled_cache()
    cache.apply("USDEUR", 5, "v5", own_write=True)
    cache.disable()  # the listener dropped: v5's notification may never come
    cache.enable()
    assert len(cache._ahead) == 0
    assert cache.apply("USDEUR", 6, "v6")


def test_negative_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        RateCache(-1)


# --------------------------------------------------------------------------- model check
KEYS = ("USDEUR", "EURGBP", "GBPJPY")


class CacheAgainstDatabase(RuleBasedStateMachine):
    """A database (versions from one sequence, notifications in commit order), a listener
    that can disconnect, and reads whose snapshot is taken at some point after they begin."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = RateCache(1)  # smaller than KEYS: evictions happen all the time
        self.cache.enable()
        self.connected = True
        self.version = 0
        self.db: dict[str, tuple[int, str | None]] = {}
        self.history: dict[tuple[str, int], str | None] = {}
        self.queue: list[tuple[str, int, str | None]] = []  # key "hb" carries a heartbeat
        self.heartbeats_sent = 0
        self.applied_max: dict[str, int] = {}  # highest version applied since the last flush
        self.reads: list[dict] = []
        # key -> (version the cache gave a negative fill, DB version the read observed)
        self.negative_fills: dict[str, tuple[int, int]] = {}
        self.served_max: dict[str, int] = {}  # newest state served since the last flush

    # -- the database ---------------------------------------------------------------
    def _commit(self, key: str, value: str | None) -> int:
        self.version += 1
        self.db[key] = (self.version, value)
        self.history[(key, self.version)] = value
        if self.connected:
            self.queue.append((key, self.version, value))
        return self.version

    def _apply(self, key: str, version: int, value: str | None, own: bool = False) -> None:
        self.cache.apply(key, version, value, own_write=own)
        if self.cache.enabled:
            self.applied_max[key] = max(self.applied_max.get(key, 0), version)

    @rule(key=st.sampled_from(KEYS), value=st.text("xyz", min_size=1, max_size=2))
    def write_elsewhere(self, key: str, value: str) -> None:
        self._commit(key, value)

    @rule(key=st.sampled_from(KEYS), value=st.text("xyz", min_size=1, max_size=2))
    def own_write(self, key: str, value: str) -> None:
        version = self._commit(key, value)
        self._apply(key, version, value, own=True)  # read-your-own-writes, ahead of its NOTIFY

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        if key in self.db and self.db[key][1] is not None:
            self._commit(key, None)

    @precondition(lambda self: self.queue)
    @rule()
    def deliver(self) -> None:
        key, version, value = self.queue.pop(0)
        if key == "hb":
            self.cache.pass_barrier(version)
        else:
            self._apply(key, version, value)

    @rule()
    def send_heartbeat(self) -> None:
        self.heartbeats_sent += 1
        if self.connected:
            self.queue.append(("hb", self.heartbeats_sent, None))

    # -- the listener -----------------------------------------------------------------
    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        self.connected = False
        self.queue.clear()  # whatever was not delivered is lost
        self.cache.disable()
        self.applied_max.clear()
        self.served_max.clear()

    @precondition(lambda self: not self.connected)
    @rule()
    def reconnect(self) -> None:
        self.connected = True
        self.cache.enable()
        self.applied_max.clear()
        self.served_max.clear()

    @rule()
    def flush(self) -> None:
        self.cache.flush()
        self.applied_max.clear()
        self.served_max.clear()

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
            if value is None:  # negative: cached when the next heartbeat comes back
                self.cache.finish_fill(read["token"], version, value,
                                       barrier=self.heartbeats_sent + 1)
                self.negative_fills[key] = (ABSENT_VERSION, read["observed"])
            else:
                self.cache.finish_fill(read["token"], version, value)

    @precondition(lambda self: self.reads)
    @rule(pick=st.integers(0, 3))
    def read_fails(self, pick: int) -> None:
        read = self.reads.pop(pick % len(self.reads))
        self.cache.cancel_fill(read["token"])

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
            # monotonic reads: never a state older than one already served
            assert observed >= self.served_max.get(key, 0), (key, entry)
            self.served_max[key] = observed
            if entry.value is not None:
                # a state the database really had
                assert self.history[(key, entry.version)] == entry.value

    def teardown(self) -> None:
        # Convergence: once writes stop and every notification is delivered, every
        # cached entry equals the database.
        if not self.connected:
            self.reconnect()
        self.send_heartbeat()
        while self.queue:
            self.deliver()
        for read in list(self.reads):
            self.reads.remove(read)
            self.cache.cancel_fill(read["token"])
        assert self.cache._inflight == {}
        for key in KEYS:
            entry = self.cache.lookup(key)
            if entry is None:
                continue
            version, value = self.db.get(key, (ABSENT_VERSION, None))
            assert entry.value == value, (key, entry, self.db.get(key))
            if value is not None:
                assert entry.version == version


CacheAgainstDatabase.TestCase.settings = settings(
    max_examples=1000, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_against_database = CacheAgainstDatabase.TestCase
