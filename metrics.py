"""Prometheus metrics of an API instance, aggregated over its worker processes.

The hot path only bumps plain integers (on model.Store, and per-route latency counts here);
``WorkerMetrics`` copies them into the Prometheus values (mmap-backed when several workers
share them) once a second and before each scrape, so a cache hit pays no metrics I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

import internals

# Decided at import, as prometheus_client decides it: values live in files shared by workers.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

CACHE_HITS = Counter("xrates_cache_hits", "GETs of one rate served from the LRU")
CACHE_MISSES = Counter("xrates_cache_misses", "GETs of one rate read from the database, then cached")
CACHE_BYPASSES = Counter("xrates_cache_bypasses", "GETs of one rate read from the database "
                         "without caching (listener down or cache off)")
NOTIFICATIONS = Counter("xrates_notifications_applied", "Changed rows applied from NOTIFY payloads")
LISTENER_RECONNECTS = Counter("xrates_listener_reconnects", "Listener reconnect attempts")
MIN_VERSION_READS = Counter("xrates_min_version_reads", "Single-pair reads with a minimum version "
                            "(read your writes), by how they were answered: cached (at once), "
                            "waited (for the notification), database", ["outcome"])
VIEW_READS = Counter("xrates_view_reads", "Lists (GET /v1/rates), conversions and Frankfurter "
                     "latest reads, by where they were answered: memory (a complete cache) or "
                     "database", ["served"])
STREAM_EVENTS = Counter("xrates_stream_events", "Events written to GET /v1/stream clients "
                        "(snapshots, changes, resyncs)")
STREAM_DROPPED = Counter("xrates_stream_dropped", "Streams closed for being slow (their queue "
                         "was full: XRATES_STREAM_QUEUE events behind)")
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0, 2.5)
REQUEST_LATENCY = Histogram(
    "xrates_request_duration_seconds", "Request handling time", ["route", "status"],
    buckets=LATENCY_BUCKETS_S,
)

# Request latencies are counted per (route, status) in plain lists on the hot path and added
# to REQUEST_LATENCY in bulk by flush_requests() (each WorkerMetrics.sync, so at least once a
# second and before every scrape): a labelled Histogram.observe costs a lock, a label lookup
# and two value updates per request. The bulk add is internals.add_histogram_counts (checked
# against observe() at start-up).
_UPPER_BOUNDS = (*LATENCY_BUCKETS_S, math.inf)  # as prometheus_client: "le", then +Inf
_pending: dict[tuple[str, int], list[float]] = {}


def observe_request(route: str, status: int, seconds: float) -> None:
    """Record one request's handling time (cheap: no lock, no Prometheus value touched)."""
    counts = _pending.get((route, status))
    if counts is None:
        counts = _pending[(route, status)] = [0] * (len(_UPPER_BOUNDS) + 1)
    counts[bisect_left(_UPPER_BOUNDS, seconds)] += 1  # the first bucket with seconds <= le
    counts[-1] += seconds


def flush_requests() -> None:
    """Add the request latencies recorded since the last flush to REQUEST_LATENCY."""
    pending = list(_pending.items())
    _pending.clear()
    for (route, status), counts in pending:
        internals.add_histogram_counts(REQUEST_LATENCY.labels(route, str(status)),
                                       _UPPER_BOUNDS, counts)


def render() -> tuple[bytes, str]:
    """The metrics text: every worker's values when multiprocess mode is on."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class GcPauses:
    """The longest garbage collection of this process per generation (0, 1, 2), timed by a gc
    callback: a full collection stops the worker's event loop for its whole length. Timed in
    the thread's CPU time, so a worker that the OS descheduled meanwhile (several on one core)
    is not charged for it; with a core per worker the two are the same."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # No locks and no allocation worth the name: this runs inside every collection.
        if phase == "start":
            self._started = time.thread_time()
            return
        pause = time.thread_time() - self._started
        generation = info["generation"]
        if pause > self.longest[generation]:
            self.longest[generation] = pause


class WorkerMetrics:
    """Copies one worker's plain counters into the Prometheus values.

    The gauges are created here, in workers only: in multiprocess mode every process that
    creates a gauge writes a value file, and a Sanic manager process's 0 would spoil the
    min/sum over workers.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.cache_size = Gauge("xrates_cache_size", "Entries in the LRU (tombstones "
                                "included), summed over workers", multiprocess_mode="livesum")
        self.listener_connected = Gauge("xrates_listener_connected", "1 if every worker's "
                                        "listener is connected and proven alive",
                                        multiprocess_mode="livemin")
        self.notification_lag = Gauge(
            "xrates_notification_lag_seconds", "Send-to-receipt time of the last heartbeat "
            "NOTIFY (the delivery delay of every change), worst worker", multiprocess_mode="livemax")
        self.queue_usage = Gauge(
            "xrates_notification_queue_usage", "pg_notification_queue_usage() at the last scrape "
            "(fraction of PostgreSQL's NOTIFY queue in use; near 1 means a listener is stuck)",
            multiprocess_mode="livemax")
        self.stream_subscribers = Gauge("xrates_stream_subscribers", "Open GET /v1/stream "
                                        "streams, summed over workers", multiprocess_mode="livesum")
        self.cache_complete = Gauge(
            "xrates_cache_complete", "1 while the cache holds every row of the table (lists "
            "and conversions answered from memory), 0 if any worker's does not",
            multiprocess_mode="livemin")
        self.gc_longest_pause = Gauge(
            "xrates_gc_longest_pause_seconds", "Longest garbage collection (the event loop "
            "stopped; CPU time) since the worker started serving, by generation, worst worker",
            ["generation"], multiprocess_mode="livemax")
        self.gc_pauses = GcPauses()  # installed once the worker serves (watch_gc)
        self._seen = {"hits": 0, "misses": 0, "bypasses": 0, "notifications_applied": 0,
                      "reconnects": 0, "stream_events": 0, "stream_dropped": 0,
                      "min_version_cached": 0, "min_version_waited": 0,
                      "min_version_database": 0, "view_memory": 0, "view_database": 0}
        self._task: asyncio.Task | None = None

    def start(self, period_s: float = 1.0) -> None:
        async def loop() -> None:
            while True:
                self.sync()
                await asyncio.sleep(period_s)

        self._task = asyncio.get_running_loop().create_task(loop(), name="xrates-metrics")

    def watch_gc(self) -> None:
        """Time every collection from now on (after start-up's own full collection)."""
        self.gc_pauses.install()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.gc_pauses.uninstall()
        try:
            flush_requests()
        except FileNotFoundError:
            # Multiprocess: the manager process already exited and removed the shared
            # directory (its atexit), so nobody will read these values any more.
            pass
        if MULTIPROCESS:
            with contextlib.suppress(Exception):  # a gone worker must not count as live
                _multiprocess.mark_process_dead(os.getpid())

    def _delta(self, name: str, now: int) -> int:
        delta = now - self._seen[name]
        self._seen[name] = now
        return delta

    def sync(self) -> None:
        flush_requests()
        store = self.store
        listener = store.listener
        CACHE_HITS.inc(self._delta("hits", store.hits))
        CACHE_MISSES.inc(self._delta("misses", store.misses))
        CACHE_BYPASSES.inc(self._delta("bypasses", store.bypasses))
        NOTIFICATIONS.inc(self._delta("notifications_applied", store.notifications_applied))
        for outcome, count in store.min_version_outcomes.items():
            MIN_VERSION_READS.labels(outcome).inc(self._delta(f"min_version_{outcome}", count))
        for served, count in store.view_outcomes.items():
            VIEW_READS.labels(served).inc(self._delta(f"view_{served}", count))
        reconnects = listener.reconnects if listener is not None else 0
        LISTENER_RECONNECTS.inc(self._delta("reconnects", reconnects))
        self.cache_size.set(len(store.cache))
        self.cache_complete.set(1 if store.cache.complete else 0)
        for generation, pause in enumerate(self.gc_pauses.longest):
            self.gc_longest_pause.labels(str(generation)).set(pause)
        self.listener_connected.set(1 if store.listener_connected else 0)
        if listener is not None:
            self.notification_lag.set(listener.heartbeat_lag_s)
        hub = store.hub
        STREAM_EVENTS.inc(self._delta("stream_events", hub.events_total))
        STREAM_DROPPED.inc(self._delta("stream_dropped", hub.dropped_total))
        self.stream_subscribers.set(hub.subscribers)

    async def sample_database(self) -> None:
        """Values that need a query: read at scrape time only (skipped while unavailable)."""
        with contextlib.suppress(Exception):
            self.queue_usage.set(await self.store.notification_queue_usage())
