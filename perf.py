"""Timing helpers and the benchmark of xrates (contract §7).

    python perf.py bench [--json PATH] [--quick]

``aelapsed`` logs how long a coroutine took; ``aprofiler`` is a metaclass that wraps every
coroutine method of a class (a class-based view) with it; ``profile_routes`` wraps every
route handler of a Sanic app. sanic_app.py applies them only when ``XRATES_PROFILE=1``.

The benchmark starts its own PostgreSQL (embedded, in a temporary directory) and its own
API processes on 127.0.0.1, pins the API to one core and the load generator (wrk), the
benchmark driver and PostgreSQL to the other, measures every figure at least three times
and prints the medians as a table of ratios to a ceiling or floor measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import logging
import math
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import processes

log = logging.getLogger("xrates.perf")

ROOT = Path(__file__).resolve().parent
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


# ============================================================================= timing helpers
def aelapsed(func: F | None = None, *, name: str | None = None, logger: logging.Logger | None = None,
             level: int = logging.INFO) -> Any:
    """Decorate a coroutine function so that every call logs its elapsed time.

    Usable bare (``@aelapsed``) or with options (``@aelapsed(name="x", level=logging.DEBUG)``).
    The log line is ``event=elapsed name=<name> ms=<milliseconds>``, also when the call raises.
    """

    def decorate(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"aelapsed needs a coroutine function, not {fn!r}")
        label = name or fn.__qualname__
        target = logger or log

        @functools.wraps(fn)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                target.log(level, "event=elapsed name=%s ms=%.3f", label,
                           (time.perf_counter() - started) * 1000)

        timed.__aelapsed__ = True  # type: ignore[attr-defined]
        return timed  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


class aprofiler(type):
    """Metaclass: every coroutine method defined in the class body is wrapped with aelapsed.

    ``class RatesView(HTTPMethodView, metaclass=aprofiler): async def get(...)`` logs the
    time of each ``get``. Static and class methods are wrapped inside their descriptor.
    Class keyword arguments (``attach=app, uri=...`` of Sanic views) pass through.
    """

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any],
                **kwargs: Any) -> aprofiler:
        for attr, value in list(namespace.items()):
            wrapper_type = type(value) if isinstance(value, staticmethod | classmethod) else None
            function = value.__func__ if wrapper_type is not None else value
            if inspect.iscoroutinefunction(function) and not getattr(function, "__aelapsed__", False):
                timed = aelapsed(function, name=f"{name}.{attr}")
                namespace[attr] = wrapper_type(timed) if wrapper_type is not None else timed
        return super().__new__(mcs, name, bases, namespace, **kwargs)

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any],
                 **kwargs: Any) -> None:
        super().__init__(name, bases, namespace)


def profile_routes(app: Any) -> int:
    """Wrap the handler of every (function-based) route of a Sanic app with aelapsed.

    Call it after the routes are defined, before the server starts. Returns how many
    handlers it wrapped. Handlers already wrapped (or not coroutines) are left alone.
    """
    wrapped = 0
    for route in app.router.routes:
        handler = route.handler
        if inspect.iscoroutinefunction(handler) and not getattr(handler, "__aelapsed__", False):
            route.handler = aelapsed(handler, name=route.name)
            wrapped += 1
    return wrapped


# ============================================================================= statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class PairedRatio:
    """Throughput of a candidate relative to a baseline, from batches run alternately."""

    ratio: float  # median over pairs of baseline_time / candidate_time (>1: candidate faster)
    low: float  # distribution-free 95% confidence interval of that median
    high: float
    pairs: int
    baseline_us: float  # median time per request of each side, microseconds
    candidate_us: float


def paired_ratio(baseline_s: Sequence[float], candidate_s: Sequence[float],
                 per_batch: int = 1) -> PairedRatio:
    """Compare two routes from batch times taken alternately, pair by pair.

    ``baseline_s[i]`` and ``candidate_s[i]`` are the times of two batches run back to back,
    so each pair saw (nearly) the same machine; the ratio of one pair is
    ``baseline / candidate`` (the candidate's throughput relative to the baseline's). Noise
    that moves both sides of a pair together cancels; the median over pairs resists the
    rest. The interval is the order-statistic 95% interval of the median.
    """
    if len(baseline_s) != len(candidate_s):
        raise ValueError("paired_ratio needs the same number of batches on each side")
    ratios = sorted(b / c for b, c in zip(baseline_s, candidate_s, strict=True) if b > 0 and c > 0)
    n = len(ratios)
    if n == 0:
        raise ValueError("paired_ratio needs at least one pair of positive times")
    half_width = 1.96 * math.sqrt(n) / 2
    low_index = max(0, math.floor(n / 2 - half_width))
    high_index = min(n - 1, math.ceil(n / 2 + half_width) - 1)
    return PairedRatio(
        ratio=statistics.median(ratios), low=ratios[low_index], high=ratios[high_index], pairs=n,
        baseline_us=statistics.median(baseline_s) / per_batch * 1e6,
        candidate_us=statistics.median(candidate_s) / per_batch * 1e6,
    )


def control_valid(control: PairedRatio, tolerance: float = 0.02) -> bool:
    """A ceiling-vs-ceiling control must come out 1.00 ± tolerance, or the run is void."""
    return abs(control.ratio - 1.0) <= tolerance


# ============================================================================= HTTP over raw sockets
Response = tuple[int, dict[str, str], bytes]  # status, lower-case headers, body


def request_bytes(host: str, method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request, ready to send (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ResponseParser:
    """Incremental parser of HTTP/1.1 responses with Content-Length (or no body)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk

    def next(self) -> Response | None:
        """The next complete response, or None until more bytes are fed."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(buf) < end + 4 + length:
            return None
        body = bytes(buf[end + 4:end + 4 + length])
        del buf[:end + 4 + length]
        return status, headers, body


class HttpConn:
    """A minimal keep-alive HTTP/1.1 client on one blocking socket (loopback only).

    Requests may be pipelined: ``send`` any number, then ``read`` that many responses.
    Each response is ``(status, headers, body)`` with lower-case header names.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        if not is_loopback(host):
            raise ValueError(f"the benchmark only talks to loopback addresses, not {host!r}")
        self.host = host
        self.port = port
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ResponseParser()

    def close(self) -> None:
        self.sock.close()

    def request_bytes(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> bytes:
        return request_bytes(f"{self.host}:{self.port}", method, path, body, headers)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, count: int) -> list[Response]:
        responses: list[Response] = []
        parser = self.parser
        while len(responses) < count:
            parsed = parser.next()
            if parsed is None:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                parser.feed(chunk)
                continue
            responses.append(parsed)
        return responses

    def call(self, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> Response:
        self.send(self.request_bytes(method, path, body, headers))
        return self.read(1)[0]

    def timed_batch(self, data: bytes, count: int) -> float:
        """Send ``count`` pipelined requests at once; seconds until the last response."""
        started = time.perf_counter()
        self.send(data)
        self.read(count)
        return time.perf_counter() - started


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def version_of(headers: dict[str, str]) -> int:
    """The rate version in an ETag header ('"123"' -> 123); -1 when there is none."""
    etag = headers.get("etag", "").strip('W/"')
    return int(etag) if etag.isdigit() else -1


class AsyncHttpConn:
    """The asyncio twin of HttpConn, for probes that run beside database work."""

    def __init__(self, host: str, port: int) -> None:
        if not is_loopback(host):
            raise ValueError(f"the benchmark only talks to loopback addresses, not {host!r}")
        self.host, self.port = host, port
        self.parser = ResponseParser()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> AsyncHttpConn:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()

    async def batch(self, data: bytes, count: int) -> list[Response]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        responses: list[Response] = []
        while len(responses) < count:
            parsed = self.parser.next()
            if parsed is None:
                chunk = await self.reader.read(1 << 18)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                self.parser.feed(chunk)
                continue
            responses.append(parsed)
        return responses


# Linux socket option: the kernel stamps each received packet (CLOCK_REALTIME, timespec).
SO_TIMESTAMPNS = 35


class StallProbe(threading.Thread):
    """Asks an instance for /health every ``interval_s`` on its own thread and records
    (sent, answered) wall-clock times, the answer timed by the kernel's receive timestamp
    when available: a late answer then means the instance was late, not that this process
    (which shares its core with PostgreSQL) was descheduled before it read the answer."""

    def __init__(self, port: int, interval_s: float) -> None:
        super().__init__(daemon=True, name=f"stall-probe-{port}")
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.kernel_timestamps = True
        self._stop_event = threading.Event()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            self.kernel_timestamps = False
        self._request = request_bytes(f"127.0.0.1:{port}", "GET", HEALTH_PATH)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                sent = time.time()
                self._sock.sendall(self._request)
                answered, buffer = None, b""
                while not buffer.endswith(b'{"status":"ok"}'):
                    data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(16))
                    if not data:
                        return
                    buffer += data
                    for level, kind, payload in ancillary:
                        if answered is None and level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            seconds, nanoseconds = struct.unpack("qq", payload[:16])
                            answered = seconds + nanoseconds / 1e9
                self.samples.append((sent, answered if answered is not None else time.time()))
                self._stop_event.wait(self.interval_s)  # pacing: the probe must not load the core
        finally:
            self._sock.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def stall_after(self, moment: float) -> float:
        """The longest extra wait of an answer due after ``moment`` (wall clock), beyond the
        median round trip before it: how long the instance left a request waiting."""
        before = [answered - sent for sent, answered in self.samples if answered < moment]
        during = [answered - max(sent, moment) for sent, answered in self.samples
                  if answered > moment]
        if not before or not during:
            return 0.0
        return max(0.0, max(during) - statistics.median(before))


# ============================================================================= the benchmark
TARGETS = {
    "history_year_p50_ms": "<= 5 ms",
    "hit_vs_ceiling_alternating": ">= 0.95",
    "convert_pivot_vs_hit_alternating": ">= 0.8",
    "latest_vs_hit_alternating": ">= 0.5",
    "hit_vs_read_through_wrk": ">= 3.0",
    "propagation_p99_ms": "<= 1.0 ms and <= 3x floor p99",
    "bulk_p99_ms": "<= 50 ms",
    "bulk_stall_ms": "<= 5 ms",
    "memory_bytes_per_rate": "<= 1024",
    "gc_pause_ms": "<= 5 ms",
    "refill_hit_share": ">= 99%",
    "stream_p99_ms": "p99 <= 50 ms",
    "miss_p50_ms": "<= 1.0 ms",
    "scale_propagation_p99_ms": "<= 5 ms",  # with SCALE_LISTENERS[-1] listeners
}
PHASES = ("miss", "handler", "wrk", "alternating", "reads", "propagation", "bulk", "history",
          "ryw", "scale", "streams", "refill", "memory")
# The ceiling: a constant answer sent exactly as a hit is (pre-encoded, same middleware), so
# hit / ceiling is the lookup's own cost. /health (Sanic encodes its headers) is a second one.
CEILING_PATH = "/ping"
HEALTH_PATH = "/health"
# Scale: LISTEN connections on the rate channel. The phase's two API instances count (each
# has its feed's one); 2 is the fewest, as the propagation figure needs both. The others are
# ExtraListeners.
SCALE_LISTENERS = (2, 20, 100)
SCALE_WRITERS = 4  # connections committing in parallel for the notifying-commit ceiling
SCALE_KEYS = slice(3000, 3100)  # pairs the ceiling updates (no other phase writes them)
SCALE_LISTENER_NAME = "xrates-bench-listener"  # application_name of the extra listeners
# One row, one statement, one transaction: one commit that sends one NOTIFY (rate triggers).
SCALE_WRITE = "UPDATE rate SET rate = $3 WHERE base = $1 AND quote = $2 RETURNING version"
# Client connections by backend ID, the order in which PostgreSQL signals its listeners.
SCALE_CONNECTIONS = (
    "WITH client AS (SELECT s.id, a.application_name AS app "
    "FROM pg_stat_get_backend_idset() AS s(id) JOIN pg_stat_activity AS a "
    "ON a.pid = pg_stat_get_backend_pid(s.id) WHERE a.backend_type = 'client backend') "
    "SELECT count(*) FILTER (WHERE app = $1) AS api_listeners, count(*) AS clients, "
    "current_setting('max_connections')::int AS max_connections, "
    "coalesce(max(id) FILTER (WHERE app = $1) > max(id) FILTER (WHERE app = $2), true) AS api_last "
    "FROM client"
)
FLOOR_CHANNEL = "xrates_bench_floor"  # a channel no API instance listens on
PROBE_INTERVAL_S = 0.0005  # pace of the event-loop stall probes (bulk rounds, the refill)
BENCH_DB = "xrates_bench"
# Bench fixtures only (the product's statements live in model.py).
SEED_RATES = (
    "INSERT INTO rate (base, quote, rate, source, as_of) "
    "SELECT b, q, r, 'demo', now() FROM unnest($1::text[], $2::text[], $3::numeric[]) AS t(b, q, r)"
)
SELECT_VERSIONS = (
    "SELECT base || quote AS key, version FROM rate "
    "WHERE base || quote = ANY($1::text[])"
)
# Memory: change every row once (in chunks), which pushes it into every instance's cache.
TOUCH_RATES = "UPDATE rate SET rate = rate * 2 WHERE version % $1 = $2"
TOUCH_CHUNKS = 16
# History: 10 years x 30 pairs (EUR/XAA..EUR/XBD) of one source, one row per day, in one
# statement; day is the UTC date of as_of, as the table's CHECK requires.
HISTORY_YEARS, HISTORY_PAIRS, HISTORY_SAMPLES = 10, 30, 200
SEED_HISTORY = (
    "INSERT INTO rate_history (source, base, quote, day, rate, as_of) "
    "SELECT 'bench', 'EUR', 'X' || chr(65 + p / 26) || chr(65 + p % 26), "
    "(d AT TIME ZONE 'UTC')::date, 1 + p / 100.0 + extract(doy FROM d) / 10000.0, d "
    "FROM generate_series(0, $1 - 1) AS p, "
    "generate_series($2::timestamptz, $3::timestamptz, interval '1 day') AS d"
)
HISTORY_SIZE = (
    "SELECT pg_total_relation_size('rate_history') AS bytes, "
    "(SELECT count(*) FROM rate_history) AS rows"
)
# Reads: /v1/convert through one pivot and Frankfurter's /v1/latest, each against the hit.
# Their rows are seeded only when the phase runs, with codes no other phase uses (pair_keys
# gives codes starting with A only; the history phase's quotes start with X): the pivot's
# rows in `rate` (so each convert pair below has no direct or inverse row, only a path
# through READS_PIVOT) and READS_DAYS days of the Frankfurter source's history. The API
# instances get no XRATES_SOURCES, so their Frankfurter source is the default one, demo,
# whose pivot is EUR (sanic_app.FrankfurterSource).
READS_PIVOT = "EUR"
READS_CODES = ("USD", "GBP", "JPY", "CHF", "CAD", "NZD", "SEK", "NOK", "DKK", "PLN", "CZK",
               "HUF", "RON", "BGN", "TRY", "ZAR", "BRL", "MXN", "CNY", "HKD", "SGD", "KRW",
               "INR", "IDR", "THB", "MYR", "PHP", "ILS", "ISK", "CLP")
READS_CONVERT = (("GBP", "JPY"), ("USD", "CHF"), ("SEK", "NOK"), ("JPY", "GBP"))
READS_FK_SOURCE = "demo"
READS_DAYS = 5  # today and the 4 days before
READS_LATEST_PATH = "/v1/latest?base=USD"
READS_CACHE_SIZE = 131072  # the reads phase's instance: larger than the bench's table
SEED_READS_HISTORY = (
    "INSERT INTO rate_history (source, base, quote, day, rate, as_of) "
    "SELECT $1, $2, q, (d AT TIME ZONE 'UTC')::date, r + extract(doy FROM d) / 10000.0, d "
    "FROM unnest($3::text[], $4::numeric[]) AS t(q, r), "
    "generate_series($5::timestamptz, $6::timestamptz, interval '1 day') AS d"
)
# After the phase: the history phase measures the whole table's size per row.
DELETE_READS_HISTORY = "DELETE FROM rate_history WHERE source = $1 AND base = $2 AND quote = ANY($3)"
WRK_SCRIPT = """
local paths = {%s}
local requests = nil
local i = 0
request = function()
  if requests == nil then
    requests = {}
    for k, p in ipairs(paths) do requests[k] = wrk.format("GET", p) end
  end
  i = i + 1
  if i > #requests then i = 1 end
  return requests[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "XRATES_WRK {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"p50_us\\":%%d,\\"p99_us\\":%%d," ..
    "\\"max_us\\":%%d,\\"errors\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.status + e.timeout))
end
"""
WRK_INSTALL_HINT = "install wrk with: apt-get install -y wrk  (Debian/Ubuntu; brew install wrk on macOS)"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and durations of one benchmark run (``--quick`` shrinks the durations)."""

    repeats: int = 3
    # wrk: many short rounds of (ceiling, hit, read-through), rotated, each ratio taken within
    # its round: 5-second rounds, three of them, gave hit/read-through 2.39-3.27 between runs.
    wrk_rounds: int = 9
    wrk_s: float = 2.0
    wrk_connections: int = 32
    alternate_control_s: float = 5.0
    alternate_hit_s: float = 8.0
    reads_control_s: float = 3.0  # reads phase: hit vs hit
    reads_s: float = 4.0  # reads phase: each candidate (convert through a pivot, latest) vs hit
    reads_batch_s: float = 0.05  # reads phase: longest a candidate's batch may take (batch_for)
    batch: int = 64
    hot_keys: int = 128
    miss_samples: int = 200
    propagation_samples: int = 200
    floor_samples: int = 200
    bulk_rounds: int = 20
    bulk_rows: int = 1000
    memory_rates: int = 65536
    memory_instances: int = 3
    streams: int = 1000  # concurrent GET /v1/stream on one worker (its default cap)
    stream_rounds: int = 10
    ryw_samples: int = 200
    scale_ceiling_s: float = 3.0  # each notifying-commit ceiling run

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(wrk_rounds=3, wrk_s=1.0, alternate_control_s=1.5, alternate_hit_s=2.5, reads_control_s=1.5,
                   reads_s=2.0, miss_samples=60,
                   propagation_samples=60, floor_samples=60, bulk_rounds=5, streams=300,
                   stream_rounds=5, ryw_samples=60, scale_ceiling_s=1.5)


class Pinning:
    """API processes on one core; the driver, wrk and PostgreSQL on the others (taskset)."""

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.taskset = shutil.which("taskset")
        self.enabled = len(cpus) >= 2 and self.taskset is not None
        self.api_cpus = cpus[:1] if self.enabled else []
        self.load_cpus = cpus[1:] if self.enabled else []
        if not self.enabled:
            self.reason = ("taskset not found (util-linux)" if self.taskset is None
                           else f"only {len(cpus)} CPU available")
        else:
            self.reason = ""

    def pin_self(self) -> None:
        """Pin this process (and so PostgreSQL, which it starts) to the load cores."""
        if self.enabled:
            os.sched_setaffinity(0, set(self.load_cpus))

    def api_prefix(self) -> list[str]:
        return [self.taskset, "-c", _cpu_list(self.api_cpus)] if self.enabled else []  # type: ignore[list-item]

    def load_prefix(self) -> list[str]:
        return [self.taskset, "-c", _cpu_list(self.load_cpus)] if self.enabled else []  # type: ignore[list-item]

    def move(self, pid: int, cpus: Sequence[int]) -> None:
        """Move every thread of process ``pid`` and of its descendants (an instance: Sanic's
        main process and its worker) to ``cpus``."""
        for task in process_tree_tasks(pid):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(task, set(cpus))

    def describe(self) -> str:
        if not self.enabled:
            return f"not pinned: {self.reason}"
        return (f"API on CPU {_cpu_list(self.api_cpus)}; wrk, driver and PostgreSQL on CPU "
                f"{_cpu_list(self.load_cpus)} (taskset)")


def process_tree_tasks(pid: int) -> list[int]:
    """The thread ids of ``pid`` and of all its descendants (Linux /proc)."""
    tasks, pending = [], [pid]
    while pending:
        proc = Path("/proc") / str(pending.pop())
        try:
            threads = [int(t.name) for t in (proc / "task").iterdir()]
        except FileNotFoundError:  # it exited meanwhile
            continue
        tasks += threads
        for thread in threads:
            with contextlib.suppress(FileNotFoundError):
                pending += [int(c) for c in (proc / "task" / str(thread) / "children").read_text().split()]
    return tasks


def bulk_summary(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run of bulk rounds: propagation percentiles, the longest stall, the write's time."""
    stalls = [r["stall_s"] for r in rounds]
    return {**summary_ms([r["latency_s"] for r in rounds]), "stall_max_ms": max(stalls) * 1000,
            "stall_p50_ms": percentile(stalls, 50) * 1000,
            "write_p50_ms": percentile([r["write_s"] for r in rounds], 50) * 1000,
            "late_verifications": sum(r["late"] for r in rounds)}


def spread_stalls_ms(rounds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The rounds with every instance but the first moved to the load core: the longest stall
    of the first (alone on the API core: the target's figure) and of the moved ones (beside
    PostgreSQL and the driver), in ms. ``stalls_s`` is per instance, in the order of apis."""
    return {"spread_stall_max_ms": max(r["stalls_s"][0] for r in rounds) * 1000,
            "load_core_stall_max_ms": max(max(r["stalls_s"][1:]) for r in rounds) * 1000}


def _cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in cpus)


class Api(processes.ApiServer):
    """One `python sanic_app.py` instance on a free loopback port, stopped by its PID."""

    def __init__(self, name: str, db_url: str, workdir: Path, pinning: Pinning,
                 env: dict[str, str] | None = None, root: Path = ROOT) -> None:
        # Default settings, access log included: what a user gets is what we measure.
        super().__init__(db_url, workdir, env, name=name, prefix=pinning.api_prefix(),
                         quiet=False, root=root)
        self.name = name

    def conn(self) -> HttpConn:
        return HttpConn("127.0.0.1", self.port)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            with contextlib.suppress(OSError, ValueError, IndexError):
                conn = self.conn()
                try:
                    if conn.call("GET", "/ready")[0] == 200:
                        return
                finally:
                    conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"API {self.name} not ready after {timeout_s}s:\n"
                                   + self.log_tail())
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def worker_pid(self) -> int:
        """The PID serving requests: the process we started (Sanic runs a single worker in
        it), or its child when Sanic forked one."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        return int(entry.name)
        return self.proc.pid

    def metric(self, name: str) -> float:
        conn = self.conn()
        try:
            text = conn.call("GET", "/metrics")[2].decode()
        finally:
            conn.close()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise RuntimeError(f"{name} not in /metrics of API {self.name}")

    def stop(self) -> None:
        self.stop_process()


async def served_at(api: Api, path: str, version: int) -> float:
    """When (perf_counter) ``api`` first serves ``version`` (or later) of ``path``: reads it
    again and again, on one connection (bound it with asyncio.wait_for)."""
    client = await AsyncHttpConn("127.0.0.1", api.port).open()
    data = request_bytes(f"127.0.0.1:{api.port}", "GET", path)
    try:
        while True:
            ((_, headers, _),) = await client.batch(data, 1)
            if version_of(headers) >= version:
                return time.perf_counter()
    finally:
        await client.close()


RYW_OUTCOMES = ("cached", "waited", "database")


def _open_streams(port: int, request: bytes, n: int) -> list[socket.socket]:
    """``n`` streams, each read up to the end of its snapshot event, then non-blocking."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(request)
        socks.append(sock)
    for sock in socks:
        seen = b""
        while b"event: snapshot" not in seen or not seen.split(b"event: snapshot", 1)[1].count(
                b"\n\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError("streams: a stream closed before its snapshot")
            seen += chunk
        sock.setblocking(False)
    return socks


def _arrivals(socks: Sequence[socket.socket], marker: bytes, timeout_s: float) -> list[float]:
    """When (perf_counter) ``marker`` arrived on each socket."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ, bytearray())
    arrived: list[float] = []
    deadline = time.perf_counter() + timeout_s
    try:
        while len(arrived) < len(socks):
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"streams: {len(socks) - len(arrived)} streams without {marker!r}")
            for key, _ in selector.select(left):
                seen = key.data
                seen += key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                if marker in seen:
                    arrived.append(time.perf_counter())
                    selector.unregister(key.fileobj)
                elif len(seen) > 4096:
                    del seen[:-64]  # keep a tail: a marker may straddle two reads
    finally:
        selector.close()
    return arrived


def raise_open_files_limit() -> None:
    """Streams hold a socket each, on both sides: lift the soft limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def batch_for(per_request_s: float, batch: int, batch_s: float) -> int:
    """Requests in one pipelined batch: ``batch``, or else the largest power of two (at
    least 1) whose requests, ``per_request_s`` each, take at most ``batch_s`` (powers of
    two, so that a little noise in ``per_request_s`` seldom changes the size)."""
    fits = int(batch_s / per_request_s) if per_request_s > 0 else batch
    if fits >= batch:
        return batch
    return 1 << max(0, fits.bit_length() - 1)


def ratio_text(ratio: float) -> str:
    """A throughput ratio for the table: 3 decimals, or 2 significant digits below 0.1."""
    return f"{ratio:.3f}" if ratio >= 0.1 else f"{ratio:.2g}"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for PID {pid}")


def pair_keys(count: int) -> list[tuple[str, str]]:
    """``count`` distinct currency pairs of three-letter codes, in a fixed order."""
    codes = ["".join(t) for t in itertools.product(string.ascii_uppercase, repeat=3)]
    pairs = []
    for base in codes:
        for quote in codes[:300]:
            if base != quote:
                pairs.append((base, quote))
                if len(pairs) == count:
                    return pairs
    return pairs


def rate_path(pair: tuple[str, str]) -> str:
    return f"/v1/rates/{pair[0]}/{pair[1]}"


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds."""
    return {"p50_ms": percentile(values_s, 50) * 1000, "p99_ms": percentile(values_s, 99) * 1000,
            "max_ms": max(values_s) * 1000, "samples": len(values_s)}


def quartiles(values: Iterable[float]) -> tuple[float, float]:
    """The first and third quartile (the middle half of the values lies between them)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def wrk_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The wrk rounds' figures: each kind's median, and each ratio as the median of the
    rounds' own ratios (taken seconds apart, so drift of the machine between rounds cancels)
    with the quartiles of those."""
    out: dict[str, Any] = {"runs": list(runs)}
    for kind in ("ceiling", "hit", "read_through"):
        out[kind] = {m: statistics.median(run[kind][m] for run in runs)
                     for m in ("rps", "p50_ms", "p99_ms", "max_ms")}
    for ratio in ("hit_vs_ceiling", "hit_vs_read_through"):
        out[ratio] = median_of(runs, ratio)
        out[f"{ratio}_quartiles"] = quartiles(run[ratio] for run in runs)
    return out


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def propagation_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The medians over runs of ``Bench.propagation_run`` (each part's p50, p99 and max)."""

    def med(part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs)

    return {
        "runs": list(runs),
        "floor": {k: med("floor", k) for k in ("p50_ms", "p99_ms", "max_ms")},
        "after_ack": {k: med("after_ack", k) for k in ("p50_ms", "p99_ms", "max_ms")},
        "after_send": {k: med("after_send", k) for k in ("p50_ms", "p99_ms", "max_ms")},
        "write": {k: med("write", k) for k in ("p50_ms", "p99_ms", "max_ms")},
        "p99_vs_floor_p99": median_of(runs, "p99_vs_floor_p99"),
        "first_poll_fraction": median_of(runs, "first_poll_fraction"),
    }


class ExtraListeners:
    """``count`` plain asyncpg connections to the benchmark's database, in a child process
    (its own interpreter: their callbacks never hold the driver's GIL while it times
    something; it inherits the driver's CPUs, the load side's). ``listen(n)`` makes the first
    ``n`` LISTEN on ``channel`` and the others UNLISTEN; a callback only counts. ``close()``
    closes every connection and ends the child (by its PID if it does not answer)."""

    def __init__(self, url: str, channel: str, count: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no copy of the driver's state
        self._pipe, child_end = context.Pipe()
        self.process = context.Process(target=_listeners_main, args=(url, channel, count, child_end),
                                       name="xrates-bench-listeners", daemon=True)
        self.process.start()
        child_end.close()
        self.count = count
        self.listening = 0

    def connected(self, timeout_s: float = 60.0) -> None:
        """Wait until all ``count`` connections are open."""
        self.reply(timeout_s)

    def listen(self, n: int) -> None:
        self.listening = self.call("listen", n)

    def mark(self) -> None:
        """From now on, ``caught_up`` counts notifications."""
        self.call("mark")

    def send(self, command: str, arg: Any = 0) -> None:
        self._pipe.send((command, arg))

    def reply(self, timeout_s: float = 60.0) -> Any:
        if not self._pipe.poll(timeout_s):
            raise RuntimeError(f"scale: the listener process did not answer within {timeout_s:g} s")
        status, value = self._pipe.recv()
        if status != "ok":
            raise RuntimeError(f"scale: the listener process failed: {value}")
        return value

    def call(self, command: str, arg: Any = 0, timeout_s: float = 60.0) -> Any:
        self.send(command, arg)
        return self.reply(timeout_s)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):  # it may have died already
            if self.process.is_alive():
                self.call("stop", timeout_s=15)
        self.process.join(5)
        if self.process.is_alive():  # SIGTERM, then SIGKILL, to its PID: its sockets close
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._pipe.close()


def _listeners_main(url: str, channel: str, count: int, pipe: Any) -> None:
    """The child process of ``ExtraListeners``. Ctrl-C is the parent's to handle: it stops us."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve_listeners(url, channel, count, pipe))


async def _serve_listeners(url: str, channel: str, count: int, pipe: Any) -> None:
    """Open ``count`` connections, answer "ok" and then each command with ("ok", value):
    listen n, mark, wait (expected, timeout_s), until stop (or the parent's end of the pipe
    closes). A failure is answered with ("error", what)."""
    import asyncpg

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:  # the parent is gone
            loop.remove_reader(pipe.fileno())
            commands.put_nowait(("stop", 0))

    loop.add_reader(pipe.fileno(), readable)
    counts = NotificationCounts(count)
    callbacks = [counts.callback(i) for i in range(count)]
    conns: list[Any] = []
    try:
        for _ in range(count):
            conns.append(await asyncpg.connect(
                url, server_settings={"application_name": SCALE_LISTENER_NAME}))
        pipe.send(("ok", count))
        listening = 0
        while (command := await commands.get())[0] != "stop":
            name, arg = command
            if name == "listen":
                for i in range(min(listening, arg), max(listening, arg)):
                    if i < arg:
                        await conns[i].add_listener(channel, callbacks[i])
                    else:
                        await conns[i].remove_listener(channel, callbacks[i])
                listening = arg
                pipe.send(("ok", listening))
            elif name == "mark":
                counts.mark()
                pipe.send(("ok", 0))
            elif name == "wait":
                pipe.send(("ok", await counts.caught_up(listening, *arg)))
            else:
                raise ValueError(f"unknown command {name!r}")
    except Exception as exc:  # told to the parent, which raises it
        with contextlib.suppress(OSError):
            pipe.send(("error", repr(exc)))
        return
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(pipe.fileno())
        for conn in conns:
            try:
                await conn.close(timeout=5)
            except Exception:  # a broken connection: drop its socket
                conn.terminate()
    with contextlib.suppress(OSError):
        pipe.send(("ok", 0))  # stopped: every connection is closed


class NotificationCounts:
    """Notifications received per connection (``callback(i)`` counts connection i's), and a
    wait until each of the first connections has ``expected`` more than at ``mark()``. A
    notification costs one increment and one comparison, whatever the number of connections."""

    def __init__(self, count: int) -> None:
        self.received = [0] * count
        self.baseline = [0] * count
        self._target = [-1] * count  # the count that makes connection i caught up (-1: none)
        self._behind = 0
        self._done = asyncio.Event()

    def callback(self, index: int) -> Callable[..., None]:
        return functools.partial(self._count, index)

    def _count(self, index: int, *_notification: Any) -> None:
        self.received[index] += 1
        if self.received[index] == self._target[index]:
            self._behind -= 1
            if self._behind == 0:
                self._done.set()

    def mark(self) -> None:
        self.baseline = list(self.received)

    def increase(self, listening: int) -> int:
        """The fewest notifications any of the first ``listening`` connections got since the
        mark (0 if there are none)."""
        return min((self.received[i] - self.baseline[i] for i in range(listening)), default=0)

    async def caught_up(self, listening: int, expected: int, timeout_s: float) -> int:
        """Wait (<= ``timeout_s``) until each of the first ``listening`` connections has
        ``expected`` notifications more than at the mark; then ``increase`` (``expected``
        when no connection listens)."""
        self._target = [b + expected if i < listening else -1 for i, b in enumerate(self.baseline)]
        self._behind = sum(self.received[i] < self._target[i] for i in range(listening))
        self._done.clear()
        try:
            if self._behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), timeout_s)
        finally:
            self._target = [-1] * len(self.received)
        return self.increase(listening) if listening else expected


async def commit_until(conn: Any, keys: Sequence[tuple[str, str]], writer: int,
                       stop_at: float) -> tuple[int, tuple[tuple[str, str], int] | None]:
    """Commit SCALE_WRITE on ``keys`` in turn until ``stop_at`` (perf_counter): the number
    of commits and the last (pair, version) written."""
    commits, last = 0, None
    while time.perf_counter() < stop_at:
        pair = keys[commits % len(keys)]
        rate = Decimal(f"3.{writer}{commits % 1_000_000:06d}")
        last = (pair, await conn.fetchval(SCALE_WRITE, pair[0], pair[1], rate))
        commits += 1
    return commits, last


class StreamWatch:
    """This process's own listener on the rate channel: which row of a bulk write arrives last.

    PostgreSQL delivers a transaction's payloads to every listener in the same order, and
    instances apply them in arrival order: once an instance serves the last row of the last
    payload, it has applied all of them.
    """

    def __init__(self) -> None:
        self._expected = 0
        self._rows: list[list[Any]] = []
        self._complete = asyncio.Event()

    def expect(self, rows: int) -> None:
        self._expected, self._rows = rows, []
        self._complete.clear()

    def received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith('{"op":"u"'):
            self._rows += json.loads(payload)["rows"]
            if self._expected and len(self._rows) >= self._expected:
                self._complete.set()

    async def last_row(self) -> tuple[str, int]:
        """(key, version) of the last row, once the expected number of rows has arrived."""
        await self._complete.wait()
        return self._rows[-1][0], self._rows[-1][1]


class Bench:
    """One benchmark run: its PostgreSQL, its API processes, its measurements."""

    def __init__(self, config: BenchConfig, workdir: Path, phases: Iterable[str] = PHASES) -> None:
        self.config = config
        self.phases = set(phases)
        self.workdir = workdir
        self.pinning = Pinning()
        self.wrk = shutil.which("wrk")
        self.apis: list[Api] = []
        self.server: Any = None
        self.url = ""
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.kernel_timestamps = True  # stall probes timed answers by the kernel's stamps
        n_hot, n_miss = config.hot_keys, config.miss_samples * config.repeats
        pairs = pair_keys(max(config.memory_rates + 1000, 20000 + n_miss))
        self.pairs = pairs
        self.hot = pairs[:n_hot]
        self.propagation_pair = pairs[n_hot]
        self.bulk = pairs[1000:1000 + config.bulk_rows]
        self.miss = pairs[10000:10000 + n_miss]

    # -- lifecycle ----------------------------------------------------------------------
    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start_database(self) -> None:
        import util

        self.server = util.EmbeddedPostgres(self.workdir / "pg", durable=False)
        admin_url = self.server.start()
        self.url = admin_url.rsplit("/", 1)[0] + "/" + BENCH_DB
        asyncio.run(self._create_database(admin_url))

    async def _create_database(self, admin_url: str) -> None:
        import asyncpg

        import util

        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
            await conn.execute(f"CREATE DATABASE {BENCH_DB}")
        finally:
            await conn.close()
        await util.migrate(self.url)
        conn = await asyncpg.connect(self.url)
        try:
            # Chunks: the insert trigger takes one advisory lock per row (max_locks_per_transaction).
            # The miss keys first, in a transaction of their own: they are the oldest rows, the
            # ones a warm refill of XRATES_CACHE_SIZE rows leaves out (so they stay misses).
            missing = set(self.miss)
            ordered = self.miss + [p for p in self.pairs if p not in missing]
            chunks = [self.miss] + [ordered[start:start + 2000]
                                    for start in range(len(self.miss), len(ordered), 2000)]
            for number, pairs in enumerate(chunks):
                rates = [Decimal(f"1.{1000 + (number * 2000 + i) % 9000:04d}")
                         for i in range(len(pairs))]
                await conn.execute(SEED_RATES, [b for b, _ in pairs], [q for _, q in pairs], rates)
            if "reads" in self.phases:
                await self._seed_reads(conn)
        finally:
            await conn.close()

    async def _seed_reads(self, conn: Any) -> None:
        """The reads phase's rows: READS_PIVOT -> each of READS_CODES in `rate` (seeded last,
        so they are among the newest rows, which a warm refill holds) and in the Frankfurter
        source's history, today and the READS_DAYS - 1 days before."""
        codes = list(READS_CODES)
        rates = [Decimal(f"{1 + i / 8:.3f}") for i in range(len(codes))]
        await conn.execute(SEED_RATES, [READS_PIVOT] * len(codes), codes, rates)
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        await conn.execute(SEED_READS_HISTORY, READS_FK_SOURCE, READS_PIVOT, codes, rates,
                           today - timedelta(days=READS_DAYS - 1), today)

    def start_apis(self, specs: Sequence[tuple[str, dict[str, str]]], root: Path = ROOT) -> list[Api]:
        started = [Api(name, self.url, self.workdir, self.pinning, env, root)
                   for name, env in specs]
        self.apis += started
        for api in started:
            api.wait_ready()
        return started

    def stop_apis(self, apis: Sequence[Api]) -> None:
        for api in apis:
            api.stop()
            errors = api.server_errors()
            if errors:
                self.notes.append(f"API {api.name} logged server errors: {errors[:3]}")
            self.apis.remove(api)

    def close(self) -> None:
        self.stop_apis(list(self.apis))
        if self.server is not None:
            self.server.stop("immediate")

    # -- phases -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.pinning.pin_self()
        self.say(f"pinning: {self.pinning.describe()}")
        if self.wrk is None:
            self.notes.append(f"wrk not found: wrk figures not measured; {WRK_INSTALL_HINT}")
            self.say(f"wrk not found: {WRK_INSTALL_HINT}; continuing without the wrk figures")
        self.say(f"starting PostgreSQL and seeding {len(self.pairs)} rates")
        self.start_database()
        a, b = self.start_apis([("A", {}), ("B", {})])
        self.say(f"API A :{a.port} and B :{b.port} (cache on)")
        self.warm_hot(a)
        phases = self.phases
        if "miss" in phases:
            self.results["miss"] = self.measure_miss(a)
        if "handler" in phases:
            (p,) = self.start_apis([("P", {"XRATES_PROFILE": "1"})])  # aelapsed on every handler
            self.results["handler"] = self.measure_handler(p)
            self.stop_apis([p])
        if "wrk" in phases and self.wrk is None:
            self.results["wrk_missing"] = WRK_INSTALL_HINT
        if "wrk" in phases and self.wrk is not None:
            (r,) = self.start_apis([("R", {"XRATES_CACHE_SIZE": "0"})])  # only while it is measured
            self.say(f"API R :{r.port} (cache off)")
            self.results["wrk"] = self.measure_wrk(a, r)
            self.stop_apis([r])
        if "alternating" in phases:
            self.results["alternating"] = self.measure_alternating(a)
        if "reads" in phases:
            # The bench's table (66,566 rows) is larger than the default cache, so A and B are
            # never complete and convert from the database; V's cache holds the whole table,
            # as the default one holds a real table (17 feeds: about 1,500 rows).
            (v,) = self.start_apis([("V", {"XRATES_CACHE_SIZE": str(READS_CACHE_SIZE)})])
            self.say(f"API V :{v.port} (XRATES_CACHE_SIZE={READS_CACHE_SIZE}: the table fits)")
            self.results["reads"] = self.measure_reads(v)
            self.results["reads"]["convert_database"] = self.serial_convert(a)
            self.stop_apis([v])
        if "propagation" in phases:
            self.results["propagation"] = self.measure_propagation(a, b)
        if "bulk" in phases:
            self.results["bulk"] = asyncio.run(self.measure_bulk([a, b]))
        if "history" in phases:
            self.results["history"] = self.measure_history(a)
        if "ryw" in phases:
            self.results["ryw"] = self.measure_ryw(a, b)
        self.stop_apis([a, b])
        if "scale" in phases:
            self.results["scale"] = self.measure_scale()
        if "streams" in phases:
            raise_open_files_limit()  # inherited by the instance started next
            (s,) = self.start_apis([("S", {})])
            self.results["streams"] = asyncio.run(self.measure_streams(s))
            self.stop_apis([s])
        if "refill" in phases:
            (w,) = self.start_apis([("W", {})])
            self.results["refill"] = self.measure_refill(w)
            self.stop_apis([w])
        if "memory" in phases:
            self.results["memory"] = self.measure_memory()
        self.results["elapsed_s"] = time.monotonic() - started
        return self.results

    def measure_history(self, api: Api) -> dict[str, Any]:
        """Storage bytes per history row (10 years x 30 pairs, indexes included, after VACUUM
        so the figure is the table's, not its dead tuples') and a one-year daily series of one
        pair through /v1/rates/{b}/{q}/history end to end, serially on one connection."""
        self.say(f"history: seeding {HISTORY_YEARS} years x {HISTORY_PAIRS} pairs")
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        first = today - timedelta(days=round(HISTORY_YEARS * 365.25) - 1)
        size = asyncio.run(self._seed_history(first, today))
        start = (today - timedelta(days=364)).date()
        path = f"/v1/rates/EUR/XAA/history?start={start}&end={today.date()}"
        times, bad = [], 0
        conn = api.conn()
        try:
            days = len(json.loads(conn.call("GET", path)[2])["rates"])  # warm: plans, pool
            for _ in range(HISTORY_SAMPLES):
                data = conn.request_bytes("GET", path)
                t0 = time.perf_counter()
                conn.send(data)
                status, _, _ = conn.read(1)[0]
                times.append(time.perf_counter() - t0)
                bad += status != 200
        finally:
            conn.close()
        if bad:
            self.notes.append(f"history: {bad} series reads were not 200")
        return {**summary_ms(times), "days": days, "rows": size["rows"],
                "bytes_per_row": size["bytes"] / size["rows"], "total_mb": size["bytes"] / 2**20}

    async def _seed_history(self, first: datetime, last: datetime) -> dict[str, int]:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(SEED_HISTORY, HISTORY_PAIRS, first, last)
            await conn.execute("VACUUM ANALYZE rate_history")
            row = await conn.fetchrow(HISTORY_SIZE)
        finally:
            await conn.close()
        return {"bytes": row["bytes"], "rows": row["rows"]}

    def warm_hot(self, api: Api) -> None:
        conn = api.conn()
        try:
            for pair in self.hot:
                conn.call("GET", rate_path(pair))
            statuses = {conn.call("GET", rate_path(pair))[1].get("x-cache") for pair in self.hot}
        finally:
            conn.close()
        if statuses != {"hit"}:
            raise RuntimeError(f"hot keys are not cache hits after warming: {statuses}")

    def measure_miss(self, api: Api) -> dict[str, Any]:
        """First GET of keys never read (nor written since the instance started), serially."""
        self.say("miss: serial first reads")
        n = self.config.miss_samples
        runs, not_miss = [], 0
        conn = api.conn()
        try:
            for run in range(self.config.repeats):
                times = []
                for pair in self.miss[run * n:(run + 1) * n]:
                    data = conn.request_bytes("GET", rate_path(pair))
                    t0 = time.perf_counter()
                    conn.send(data)
                    status, headers, _ = conn.read(1)[0]
                    times.append(time.perf_counter() - t0)
                    not_miss += status != 200 or headers.get("x-cache") != "miss"
                runs.append(summary_ms(times))
        finally:
            conn.close()
        if not_miss:
            self.notes.append(f"miss: {not_miss} first reads were not 200 + X-Cache: miss")
        return {"runs": runs, "p50_ms": median_of(runs, "p50_ms"), "p99_ms": median_of(runs, "p99_ms"),
                "not_miss": not_miss}

    def measure_handler(self, api: Api) -> dict[str, Any]:
        """Handler time (perf.aelapsed via XRATES_PROFILE=1) of a GET's miss, then its hit."""
        self.say("handler: aelapsed of rate_get, first read (miss) then second read (hit)")
        pairs = self.miss[:self.config.miss_samples]
        conn = api.conn()
        try:
            for pair in pairs + pairs:  # never read by this new instance: miss, then hit
                conn.call("GET", rate_path(pair))
        finally:
            conn.close()
        times_ms = [float(line.rsplit("ms=", 1)[1]) for line in api.log_path.read_text().splitlines()
                    if "event=elapsed name=xrates.rate_get " in line]
        if len(times_ms) != 2 * len(pairs):
            raise RuntimeError(f"handler: expected {2 * len(pairs)} timings, got {len(times_ms)}")
        miss_ms, hit_ms = times_ms[:len(pairs)], times_ms[len(pairs):]
        result = {"miss_p50_ms": percentile(miss_ms, 50), "hit_p50_ms": percentile(hit_ms, 50),
                  "miss_p99_ms": percentile(miss_ms, 99), "hit_p99_ms": percentile(hit_ms, 99),
                  "samples": len(pairs)}
        self.say(f"  hit p50 {result['hit_p50_ms']:.4f} ms, miss p50 {result['miss_p50_ms']:.3f} ms")
        return result

    # -- wrk ----------------------------------------------------------------------------
    def wrk_run(self, api: Api, paths: Sequence[str]) -> dict[str, float]:
        script = self.workdir / f"wrk-{len(paths)}.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
        assert self.wrk is not None  # phases needing wrk are skipped without it
        command = [*self.pinning.load_prefix(), self.wrk, "-t1", f"-c{self.config.wrk_connections}",
                   f"-d{self.config.wrk_s:g}s", "--timeout", "2s", "-s", str(script),
                   f"http://127.0.0.1:{api.port}"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=self.config.wrk_s + 30,
                             check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("XRATES_WRK ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result: {out.stdout}\n{out.stderr}")
        data = json.loads(line.split(" ", 1)[1])
        return {"rps": data["requests"] / (data["duration_us"] / 1e6), "p50_ms": data["p50_us"] / 1000,
                "p99_ms": data["p99_us"] / 1000, "max_ms": data["max_us"] / 1000,
                "errors": data["errors"]}

    def measure_wrk(self, a: Api, r: Api) -> dict[str, Any]:
        """Throughput and latency as users see them: ceiling, hit, read-through (rotated)."""
        self.say(f"wrk: {self.config.wrk_rounds} rounds of (ceiling, hit, read-through), rotated, "
                 f"{self.config.wrk_s:g}s each, {self.config.wrk_connections} connections")
        hot_paths = [rate_path(p) for p in self.hot]
        kinds = {"ceiling": (a, [CEILING_PATH]), "hit": (a, hot_paths), "read_through": (r, hot_paths)}
        order = list(kinds)
        runs: list[dict[str, Any]] = []
        for run in range(self.config.wrk_rounds):
            result: dict[str, Any] = {}
            for kind in order[run % 3:] + order[:run % 3]:
                api, paths = kinds[kind]
                result[kind] = self.wrk_run(api, paths)
            result["hit_vs_ceiling"] = result["hit"]["rps"] / result["ceiling"]["rps"]
            result["hit_vs_read_through"] = result["hit"]["rps"] / result["read_through"]["rps"]
            runs.append(result)
            self.say(f"  round {run + 1}: ceiling {result['ceiling']['rps']:.0f}/s, hit "
                     f"{result['hit']['rps']:.0f}/s, read-through {result['read_through']['rps']:.0f}/s")
        errors = sum(run[k]["errors"] for run in runs for k in kinds)
        if errors:
            self.notes.append(f"wrk: {errors} errors or non-2xx responses")
        return {**wrk_summary(runs), "errors": errors}

    # -- alternating pipelined batches ----------------------------------------------------
    def alternate(self, conn: HttpConn, first: list[bytes], second: list[bytes],
                  seconds: float, batch: int | None = None, warm: int = 8) -> PairedRatio:
        """Alternate pipelined batches of two request streams on one connection.

        Pairs run in ABBA order (A first in even pairs, B first in odd ones), so neither side
        always runs right after the other. Returns B's throughput relative to A's. ``batch``
        is the number of requests in each batch (``pipelined``'s; default the config's);
        ``warm`` pairs run first, untimed.
        """
        batch = batch or self.config.batch
        times_a: list[float] = []
        times_b: list[float] = []
        cycle_a, cycle_b = itertools.cycle(first), itertools.cycle(second)
        for _ in range(warm):  # warm both paths
            conn.timed_batch(next(cycle_a), batch)
            conn.timed_batch(next(cycle_b), batch)
        deadline = time.perf_counter() + seconds
        pair = 0
        while time.perf_counter() < deadline:
            if pair % 2 == 0:
                times_a.append(conn.timed_batch(next(cycle_a), batch))
                times_b.append(conn.timed_batch(next(cycle_b), batch))
            else:
                times_b.append(conn.timed_batch(next(cycle_b), batch))
                times_a.append(conn.timed_batch(next(cycle_a), batch))
            pair += 1
        return paired_ratio(times_a, times_b, batch)

    def pipelined(self, conn: HttpConn, paths: Sequence[str], batch: int | None = None) -> list[bytes]:
        """Batches of ``batch`` requests (default the config's) cycling over ``paths``,
        pre-encoded."""
        batch = batch or self.config.batch
        stream = itertools.cycle(paths)
        batches = []
        for _ in range(max(1, math.lcm(len(paths), batch) // batch)):
            batches.append(b"".join(conn.request_bytes("GET", next(stream)) for _ in range(batch)))
        return batches

    def hot_batches(self, conn: HttpConn, phase: str) -> list[bytes]:
        """Pipelined batches over the hot keys, after checking that one batch is all hits."""
        hot = self.pipelined(conn, [rate_path(p) for p in self.hot])
        conn.send(hot[0])
        if {(s, h.get("x-cache")) for s, h, _ in conn.read(self.config.batch)} != {(200, "hit")}:
            raise RuntimeError(f"{phase}: the hot keys are not all 200 hits")
        return hot

    def measure_alternating(self, api: Api) -> dict[str, Any]:
        """hit/ceiling from alternating pipelined batches, beside a ceiling/ceiling control."""
        config = self.config
        self.say(f"alternating batches of {config.batch}: {config.repeats} x (control "
                 f"{config.alternate_control_s:g}s, hit {config.alternate_hit_s:g}s)")
        conn = api.conn()
        runs: list[dict[str, Any]] = []
        try:
            ceiling = self.pipelined(conn, [CEILING_PATH])
            health = self.pipelined(conn, [HEALTH_PATH])
            hot = self.hot_batches(conn, "alternating")
            for run in range(config.repeats):
                control = self.alternate(conn, ceiling, ceiling, config.alternate_control_s)
                hit = self.alternate(conn, ceiling, hot, config.alternate_hit_s)
                versus_health = self.alternate(conn, health, hot, config.alternate_hit_s)
                runs.append({"control": dict(control.__dict__), "hit": dict(hit.__dict__),
                             "health": dict(versus_health.__dict__),
                             "valid": control_valid(control)})
                self.say(f"  run {run + 1}: control {control.ratio:.3f} "
                         f"[{control.low:.3f}, {control.high:.3f}], hit/ceiling {hit.ratio:.3f} "
                         f"[{hit.low:.3f}, {hit.high:.3f}] ({hit.candidate_us:.1f} vs "
                         f"{hit.baseline_us:.1f} us/request, {hit.pairs} pairs); hit/health "
                         f"{versus_health.ratio:.3f}")
        finally:
            conn.close()
        return {
            "runs": runs,
            "control": statistics.median(r["control"]["ratio"] for r in runs),
            "hit_vs_ceiling": statistics.median(r["hit"]["ratio"] for r in runs),
            "ceiling_us": statistics.median(r["hit"]["baseline_us"] for r in runs),
            "hit_us": statistics.median(r["hit"]["candidate_us"] for r in runs),
            "hit_vs_health": statistics.median(r["health"]["ratio"] for r in runs),
            "health_us": statistics.median(r["health"]["baseline_us"] for r in runs),
            "valid": all(r["valid"] for r in runs),
        }

    def compare_trees(self, trees: Mapping[str, Path], runs: int) -> dict[str, list[float]]:
        """hit/ceiling (alternating batches) of an instance of each tree, in interleaved runs
        (ABBA: neither tree always runs first), so drift of the machine hits both alike."""
        self.pinning.pin_self()
        self.say(f"pinning: {self.pinning.describe()}")
        self.start_database()
        apis = {}
        for name, root in trees.items():
            (apis[name],) = self.start_apis([(name, {})], root=root)
            self.warm_hot(apis[name])
        conns = {name: api.conn() for name, api in apis.items()}
        ratios: dict[str, list[float]] = {name: [] for name in trees}
        try:
            batches = {name: (self.pipelined(conn, [CEILING_PATH]), self.hot_batches(conn, "ab"))
                       for name, conn in conns.items()}
            for run in range(runs):
                for name in list(trees)[::1 if run % 2 == 0 else -1]:
                    ceiling, hot = batches[name]
                    hit = self.alternate(conns[name], ceiling, hot, self.config.alternate_hit_s)
                    ratios[name].append(hit.ratio)
                    self.say(f"  run {run + 1}, {name} ({trees[name]}): hit/ceiling {hit.ratio:.3f}")
        finally:
            for conn in conns.values():
                conn.close()
        return ratios

    # -- reads: convert through a pivot, Frankfurter's latest ------------------------------
    def measure_reads(self, api: Api) -> dict[str, Any]:
        """convert-through-a-pivot/hit and Frankfurter's latest/hit from alternating pipelined
        batches (as measure_alternating), beside a hit/hit control.

        The routes' answers are checked first, which also times each serially. A comparison's
        batches hold at most ``batch`` requests, fewer when the candidate's serial time would
        make a batch last more than ``reads_batch_s`` (a route that reads the database on
        every request can take a second: 64 of those would not fit the phase's seconds); both
        sides of the comparison use that size, with 2 warm pairs instead of 8 when it is smaller
        (the control keeps the full batch).
        """
        config = self.config
        self.say(f"reads: {config.repeats} x (control {config.reads_control_s:g}s, convert through "
                 f"{READS_PIVOT} and {READS_LATEST_PATH}, {config.reads_s:g}s each, vs the hit)")
        conn = api.conn()
        runs: list[dict[str, Any]] = []
        try:
            hot_paths = [rate_path(p) for p in self.hot]
            hot = self.hot_batches(conn, "reads")
            checked = {"convert": self._check_convert(conn), "latest": self._check_latest(conn)}
            sizes = {name: batch_for(serial_s, config.batch, config.reads_batch_s)
                     for name, (_, serial_s) in checked.items()}
            streams = {name: (self.pipelined(conn, hot_paths, sizes[name]),
                              self.pipelined(conn, paths, sizes[name]))
                       for name, (paths, _) in checked.items()}
            for run in range(config.repeats):
                control = self.alternate(conn, hot, hot, config.reads_control_s)
                result: dict[str, Any] = {"control": dict(control.__dict__),
                                          "valid": control_valid(control)}
                for name, (baseline, candidate) in streams.items():
                    size = sizes[name]
                    result[name] = dict(self.alternate(conn, baseline, candidate, config.reads_s,
                                                       size, 8 if size == config.batch else 2).__dict__)
                runs.append(result)
                self.say(f"  run {run + 1}: control {control.ratio:.3f} [{control.low:.3f}, "
                         f"{control.high:.3f}]; " + "; ".join(
                             f"{name}/hit {ratio_text(result[name]['ratio'])} "
                             f"({result[name]['candidate_us']:,.1f} vs {result[name]['baseline_us']:.1f} "
                             f"us/request, batches of {sizes[name]}, {result[name]['pairs']} pairs)"
                             for name in streams))
        finally:
            conn.close()
        asyncio.run(self._drop_reads_history())
        out: dict[str, Any] = {
            "runs": runs,
            "control": statistics.median(r["control"]["ratio"] for r in runs),
            "control_us": statistics.median(r["control"]["baseline_us"] for r in runs),
            "valid": all(r["valid"] for r in runs),
        }
        for name, (paths, serial_s) in checked.items():
            out[name] = {"ratio": statistics.median(r[name]["ratio"] for r in runs),
                         "hit_us": statistics.median(r[name]["baseline_us"] for r in runs),
                         "candidate_us": statistics.median(r[name]["candidate_us"] for r in runs),
                         "batch": sizes[name], "serial_ms": serial_s * 1000, "paths": paths}
        return out

    def serial_convert(self, api: Api, samples: int = 40) -> dict[str, float]:
        """READS_CONVERT's paths on ``api``, serially: p50/p99 of one request (on A its cache
        is smaller than the table, so each reads the rows around the path from PostgreSQL)."""
        conn = api.conn()
        times = []
        try:
            for i in range(samples):
                src, dst = READS_CONVERT[i % len(READS_CONVERT)]
                t0 = time.perf_counter()
                status, _, body = conn.call("GET", f"/v1/convert?from={src}&to={dst}")
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"reads: convert on {api.name} answered {status} {body[:200]!r}")
        finally:
            conn.close()
        return summary_ms(times)

    def _check_convert(self, conn: HttpConn) -> tuple[list[str], float]:
        """READS_CONVERT's paths, each checked to answer 200 through a pivot (`via` not empty),
        and the median time of one such request, serially."""
        paths = [f"/v1/convert?from={src}&to={dst}" for src, dst in READS_CONVERT]
        times = []
        for path in paths:
            t0 = time.perf_counter()
            status, _, body = conn.call("GET", path)
            times.append(time.perf_counter() - t0)
            if status != 200 or not json.loads(body).get("via"):
                raise RuntimeError(f"reads: {path} answered {status} {body[:200]!r}, "
                                   "not 200 through a pivot (a non-empty via)")
        return paths, statistics.median(times)

    def _check_latest(self, conn: HttpConn, samples: int = 5) -> tuple[list[str], float]:
        """READS_LATEST_PATH checked to answer 200 with every seeded currency (and the pivot)
        in its rates, and the median time of one such request, serially (after a first one)."""
        expected = (set(READS_CODES) | {READS_PIVOT}) - {"USD"}
        times = []
        for _ in range(samples + 1):
            t0 = time.perf_counter()
            status, _, body = conn.call("GET", READS_LATEST_PATH)
            times.append(time.perf_counter() - t0)
            rates = json.loads(body).get("rates") if status == 200 else None
            if not isinstance(rates, dict) or not expected <= set(rates):
                raise RuntimeError(f"reads: {READS_LATEST_PATH} answered {status} {body[:200]!r}, "
                                   f"not 200 with rates of {', '.join(sorted(expected))}")
        return [READS_LATEST_PATH], statistics.median(times[1:])

    async def _drop_reads_history(self) -> None:
        """The Frankfurter history the phase seeded, gone (the history phase measures the
        whole table's size per row)."""
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            status = await conn.execute(DELETE_READS_HISTORY, READS_FK_SOURCE, READS_PIVOT,
                                        list(READS_CODES))
            await conn.execute("VACUUM rate_history")
        finally:
            await conn.close()
        if int(status.split()[-1]) != len(READS_CODES) * READS_DAYS:
            self.notes.append(f"reads: deleted {status.split()[-1]} history rows, seeded "
                              f"{len(READS_CODES) * READS_DAYS}")

    # -- propagation and its floor --------------------------------------------------------
    def measure_propagation(self, a: Api, b: Api) -> dict[str, Any]:
        """Write on A (PUT); from A's answer (committed and acknowledged) until a read on B
        returns the new version. B is read right after the answer and again until it serves
        the new version, so the figure includes one read's round trip. Beside it, the floor:
        SELECT pg_notify on one raw asyncpg connection -> a raw listener's callback."""
        config = self.config
        self.say(f"propagation: {config.repeats} x ({config.floor_samples} raw NOTIFY, "
                 f"{config.propagation_samples} writes on A read on B)")
        writer, reader = a.conn(), b.conn()
        try:
            runs = [self.propagation_run(writer, reader, run, f"run {run + 1}")
                    for run in range(config.repeats)]
        finally:
            writer.close()
            reader.close()
        if any(r["not_hit"] for r in runs):
            self.notes.append("propagation: some reads on B were not cache hits")
        return propagation_summary(runs)

    def propagation_run(self, writer: HttpConn, reader: HttpConn, serial: int,
                        label: str) -> dict[str, Any]:
        """One run of the propagation figure: the floor, then ``propagation_samples`` PUTs on
        A's connection (``writer``), each read on B's (``reader``) until B serves it. ``serial``
        varies the written rates from run to run; ``label`` names the run in the progress line."""
        config = self.config
        path = rate_path(self.propagation_pair)
        floor = asyncio.run(self._floor(config.floor_samples))
        after_ack, after_send, writes, first_poll, not_hit = [], [], [], 0, 0
        for i in range(config.propagation_samples):
            body = json.dumps({"rate": f"1.{1000 + (serial * 1000 + i) % 9000:04d}"}).encode()
            data = writer.request_bytes("PUT", path, body, {"Content-Type": "application/json"})
            t_send = time.perf_counter()
            writer.send(data)
            status, headers, _ = writer.read(1)[0]
            t_ack = time.perf_counter()
            if status not in (200, 201):
                raise RuntimeError(f"propagation: PUT on A answered {status}")
            version = version_of(headers)
            polls = 0
            while True:
                polls += 1
                _, seen, _ = reader.call("GET", path)
                if version_of(seen) >= version:
                    t_seen = time.perf_counter()
                    break
                if time.perf_counter() - t_ack > 5:
                    raise RuntimeError("propagation: B did not serve the write within 5 s")
            after_ack.append(t_seen - t_ack)
            after_send.append(t_seen - t_send)
            writes.append(t_ack - t_send)
            first_poll += polls == 1
            not_hit += seen.get("x-cache") != "hit"
        result: dict[str, Any] = {
            "floor": summary_ms(floor), "after_ack": summary_ms(after_ack),
            "after_send": summary_ms(after_send), "write": summary_ms(writes),
            "first_poll_fraction": first_poll / len(after_ack), "not_hit": not_hit}
        result["p99_vs_floor_p99"] = result["after_ack"]["p99_ms"] / result["floor"]["p99_ms"]
        self.say(f"  {label}: floor p50/p99 {result['floor']['p50_ms']:.3f}/"
                 f"{result['floor']['p99_ms']:.3f} ms; propagation p50/p99/max "
                 f"{result['after_ack']['p50_ms']:.3f}/{result['after_ack']['p99_ms']:.3f}/"
                 f"{result['after_ack']['max_ms']:.3f} ms after A's ack")
        return result

    async def _floor(self, samples: int) -> list[float]:
        """Raw asyncpg: SELECT pg_notify on one connection -> callback on another."""
        import asyncpg

        import model

        loop = asyncio.get_running_loop()
        listener = await asyncpg.connect(self.url)
        writer = await asyncpg.connect(self.url)
        waiting: dict[str, asyncio.Future[float]] = {}

        def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            future = waiting.pop(payload, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

        try:
            await listener.add_listener(FLOOR_CHANNEL, received)
            for i in range(10):  # warm both connections
                await writer.execute(model.NOTIFY, FLOOR_CHANNEL, f"warm{i}")
            latencies = []
            for i in range(samples):
                future = loop.create_future()
                waiting[str(i)] = future
                started = time.perf_counter()
                await writer.execute(model.NOTIFY, FLOOR_CHANNEL, str(i))
                latencies.append(await asyncio.wait_for(future, 5) - started)
            return latencies
        finally:
            await listener.close()
            await writer.close()

    # -- read your writes on another instance ---------------------------------------------
    def measure_ryw(self, a: Api, b: Api) -> dict[str, Any]:
        """PUT on A, then at once GET on B with X-Xrates-Min-Version = the write's version: how
        often B had to wait for the notification (or read the database), and the read's time."""
        n = self.config.ryw_samples
        self.say(f"ryw: {n} x (PUT on A, then GET on B with its X-Xrates-Version)")
        before = {k: b.metric(f'xrates_min_version_reads_total{{outcome="{k}"}}')
                  for k in RYW_OUTCOMES}
        conn_a, conn_b = a.conn(), b.conn()
        times, older = [], 0
        try:
            for i in range(n):
                pair = self.hot[i % len(self.hot)]
                body = json.dumps({"rate": f"{1 + (i % 97) / 1000:.3f}"}).encode()
                status, headers, _ = conn_a.call("PUT", rate_path(pair), body,
                                                 {"Content-Type": "application/json"})
                version = int(headers["x-xrates-version"])
                t0 = time.perf_counter()
                status, headers, _ = conn_b.call("GET", rate_path(pair),
                                                 headers={"X-Xrates-Min-Version": str(version)})
                times.append(time.perf_counter() - t0)
                older += status != 200 or version_of(headers) < version
        finally:
            conn_a.close()
            conn_b.close()
        after = {k: b.metric(f'xrates_min_version_reads_total{{outcome="{k}"}}')
                 for k in RYW_OUTCOMES}
        outcomes = {k: int(after[k] - before[k]) for k in RYW_OUTCOMES}
        if older:
            self.notes.append(f"ryw: {older} reads on B were older than the write (a bug)")
        self.say(f"  outcomes {outcomes}; read p50/p99 {summary_ms(times)}")
        return {**summary_ms(times), "outcomes": outcomes, "older": older, "samples": n}

    # -- scale: propagation and notifying commits with many listeners -------------------
    def measure_scale(self) -> dict[str, Any]:
        """With each of SCALE_LISTENERS listening connections on the rate channel (the feeds of
        two instances of its own, A and B, then ExtraListeners): one propagation run as in
        ``measure_propagation`` and one run of the notifying-commit ceiling (``_commit_ceiling``).
        The runs alternate the listener counts, so the drift of a busy machine spreads over all
        of them. A and B start after the extra connections: PostgreSQL signals listeners in
        backend-ID order, so B's feed is signalled last."""
        import model

        config = self.config
        self.say(f"scale: {config.repeats} x ({'/'.join(map(str, SCALE_LISTENERS))} listeners: "
                 f"{config.propagation_samples} writes on A read on B, then {SCALE_WRITERS} "
                 f"connections commit single-row UPDATEs for {config.scale_ceiling_s:g} s)")
        extra = ExtraListeners(self.url, model.CHANNEL, max(SCALE_LISTENERS) - 2)
        apis: list[Api] = []
        try:
            extra.connected()
            apis = self.start_apis([("scale-A", {}), ("scale-B", {})])
            self.say(f"  API A :{apis[0].port} and B :{apis[1].port}, started after "
                     f"{extra.count} extra connections")
            connections = asyncio.run(self._scale_connections(len(apis)))
            self.say(f"  {connections['clients']} client connections of max_connections "
                     f"{connections['max_connections']}")
            result = self._scale_runs(apis, extra)
        finally:
            extra.close()
            self.stop_apis(apis)
        return {"writers": SCALE_WRITERS, "ceiling_s": config.scale_ceiling_s, **connections,
                **result}

    def _scale_runs(self, apis: Sequence[Api], extra: ExtraListeners) -> dict[str, Any]:
        """Every propagation run first (no run after a ceiling's thousands of writes and the
        autovacuum they may start), then every ceiling run."""
        config = self.config
        propagation: dict[int, list[dict[str, Any]]] = {n: [] for n in SCALE_LISTENERS}
        ceilings: dict[int, list[dict[str, Any]]] = {n: [] for n in SCALE_LISTENERS}
        writer, reader = apis[0].conn(), apis[1].conn()
        try:
            for conn in (writer, reader):  # open each instance's first pool connection
                conn.call("GET", rate_path(self.propagation_pair))
            for run, (index, n) in itertools.product(range(config.repeats),
                                                     enumerate(SCALE_LISTENERS)):
                extra.listen(n - len(apis))
                serial = config.repeats + run * len(SCALE_LISTENERS) + index
                propagation[n].append(self.propagation_run(
                    writer, reader, serial, f"run {run + 1}, {n} listeners"))
        finally:
            writer.close()
            reader.close()
        for run, n in itertools.product(range(config.repeats), SCALE_LISTENERS):
            extra.listen(n - len(apis))
            ceilings[n].append(ceiling := asyncio.run(self._commit_ceiling(apis, extra)))
            self.say(f"  run {run + 1}, {n} listeners: {ceiling['commits_per_s']:,.0f} notifying "
                     f"commits/s; every listener had them {ceiling['catch_up_ms']:.1f} ms after "
                     "the last")
        if any(r["not_hit"] for runs in propagation.values() for r in runs):
            self.notes.append("scale: some reads on B were not cache hits")
        return {"by_listeners": [
            {"listeners": n, "propagation": propagation_summary(propagation[n]),
             "commits_per_s": median_of(ceilings[n], "commits_per_s"),
             "catch_up_ms": median_of(ceilings[n], "catch_up_ms"), "ceiling_runs": ceilings[n]}
            for n in SCALE_LISTENERS]}

    async def _scale_connections(self, apis: int) -> dict[str, int]:
        """Client connections now and max_connections. Checks that each API instance has one
        listener and notes if an extra listener would hear of a commit after them."""
        import asyncpg

        import listener

        conn = await asyncpg.connect(self.url)
        try:
            row = await conn.fetchrow(SCALE_CONNECTIONS, listener.APPLICATION_NAME,
                                      SCALE_LISTENER_NAME)
        finally:
            await conn.close()
        if row["api_listeners"] != apis:
            raise RuntimeError(f"scale: {row['api_listeners']} API listener connections, not {apis}")
        if not row["api_last"]:
            self.notes.append("scale: an extra listener has a higher backend ID than B's feed, so "
                              "B is not the last listener PostgreSQL signals")
        return {"clients": row["clients"], "max_connections": row["max_connections"]}

    async def _commit_ceiling(self, apis: Sequence[Api], extra: ExtraListeners) -> dict[str, Any]:
        """SCALE_WRITERS connections commit single-row UPDATEs (each its own transaction: one
        NOTIFY per commit, through the rate triggers) on disjoint keys for ``scale_ceiling_s``.
        Then the time from the end until every listener has them all: each extra listener has
        counted every notification, A and B serve each writer's last row."""
        import asyncpg

        keys = self.pairs[SCALE_KEYS]
        conns: list[Any] = []
        try:
            for _ in range(SCALE_WRITERS):
                conns.append(await asyncpg.connect(self.url))
            extra.mark()
            started = time.perf_counter()
            stop_at = started + self.config.scale_ceiling_s
            done = await asyncio.gather(*(commit_until(conn, keys[w::SCALE_WRITERS], w, stop_at)
                                          for w, conn in enumerate(conns)))
            ended = time.perf_counter()
            commits = sum(n for n, _ in done)
            extra.send("wait", (commits, 30.0))

            async def extras_caught_up() -> float:
                got = await asyncio.to_thread(extra.reply, 40.0)
                if got < commits:
                    raise RuntimeError(f"scale: an extra listener had {got} of {commits} "
                                       "notifications 30 s after the last commit")
                return time.perf_counter()

            lasts = [last for _, last in done if last is not None]
            seen = await asyncio.wait_for(asyncio.gather(extras_caught_up(), *(
                served_at(api, rate_path(pair), version) for api in apis for pair, version in lasts)),
                40)
        finally:
            for conn in conns:
                await conn.close()
        return {"commits": commits, "seconds": ended - started,
                "commits_per_s": commits / (ended - started),
                "catch_up_ms": (max(seen) - ended) * 1000}

    # -- change streams -------------------------------------------------------------------
    async def measure_streams(self, api: Api) -> dict[str, Any]:
        """N idle GET /v1/stream on one worker: memory per stream, then the time from a
        change's commit until every stream has its event. The streams are read by one thread
        with a selector over raw sockets (a few microseconds per socket): 1,000 asyncio
        readers would themselves take tens of milliseconds to wake, which is the client's
        cost, not the server's."""
        import asyncpg

        n, rounds = self.config.streams, self.config.stream_rounds
        base, quote = self.hot[0]
        self.say(f"streams: {n} streams of {base}/{quote} on one worker, {rounds} changes")
        worker = api.worker_pid()
        rss_before = rss_bytes(worker)
        request = (f"GET /v1/stream?pairs={base}/{quote} HTTP/1.1\r\n"
                   f"Host: 127.0.0.1:{api.port}\r\nAccept: text/event-stream\r\n\r\n").encode()
        socks = await asyncio.to_thread(_open_streams, api.port, request, n)
        conn = await asyncpg.connect(self.url)
        latencies: list[float] = []
        try:
            bytes_per_stream = (rss_bytes(worker) - rss_before) / n
            for i in range(rounds):
                value = f"{2 + (i + 1) / 1000:.3f}"
                # Watching before the commit, so no arrival waits for the watcher to start;
                # the new value, unique per round, marks the change's event.
                watcher = asyncio.ensure_future(asyncio.to_thread(
                    _arrivals, socks, f'"rate":{value},'.encode(), 30.0))
                await asyncio.sleep(0)  # let the watcher's thread start
                await conn.execute("UPDATE rate SET rate = $3 WHERE base = $1 AND quote = $2",
                                   base, quote, Decimal(value))
                committed = time.perf_counter()
                latencies += [arrived - committed for arrived in await watcher]
        finally:
            await conn.close()
            for sock in socks:
                sock.close()
        result = {**summary_ms(latencies), "streams": n, "rounds": rounds,
                  "bytes_per_stream": bytes_per_stream}
        self.say(f"  {n} streams: change -> event p50 {result['p50_ms']:.1f} ms, p99 "
                 f"{result['p99_ms']:.1f} ms; {bytes_per_stream:,.0f} bytes per idle stream")
        return result

    # -- warm refill ----------------------------------------------------------------------
    def measure_refill(self, api: Api, reads: int = 1000) -> dict[str, Any]:
        """A flush (the path a reconnect after a database restart takes: flush, then refill),
        then: how long until /ready is 200 again, what the refill did (one bulk read), and
        the hit share of the first ``reads`` reads of distinct pairs after it."""
        import model

        # The pairs seeded last: the refill holds the XRATES_CACHE_SIZE most recently changed
        # rows, and the table has 1,000 more than that (those stay misses, by design).
        missing = set(self.miss)
        keys = [p for p in self.pairs if p not in missing][-reads:]
        self.say(f"refill: flush on one instance, then {reads} reads of distinct pairs")
        before = api.log().count("event=refilled")
        misses0 = api.metric("xrates_cache_misses_total")
        probe = StallProbe(api.port, PROBE_INTERVAL_S)  # /health answers while it refills
        probe.start()
        deadline = time.monotonic() + 60
        conn = api.conn()
        try:
            while len(probe.samples) < 20 and time.monotonic() < deadline:
                time.sleep(PROBE_INTERVAL_S)  # round trips before the flush: the baseline
            flushed_at, started = time.time(), time.perf_counter()
            asyncio.run(self._execute(model.FLUSH_CACHES, model.CHANNEL))
            while api.log().count("event=refilled") <= before or conn.call("GET", "/ready")[0] != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("refill: /ready never answered 200 after the flush")
                time.sleep(0.005)  # poll interval, bounded by the deadline above
            ready_ms = (time.perf_counter() - started) * 1000
            probe.stop()
            hits = sum(conn.call("GET", rate_path(pair))[1].get("x-cache") == "hit"
                       for pair in keys)
        finally:
            probe.stop()
            conn.close()
        line = api.log().split("event=refilled")[-1].split("\n")[0]  # " rows=N ms=M"
        fields = dict(part.split("=") for part in line.split())
        result = {"ready_ms": ready_ms, "rows": int(fields["rows"]),
                  "refill_ms": float(fields["ms"]), "hit_share": hits / len(keys),
                  "stall_ms": probe.stall_after(flushed_at) * 1000,
                  "reads": len(keys),
                  "misses": int(api.metric("xrates_cache_misses_total") - misses0)}
        self.say(f"  /ready 200 again after {ready_ms:.0f} ms (refill of {result['rows']:,} rows "
                 f"in {result['refill_ms']:.0f} ms, one bulk read; longest /health stall "
                 f"meanwhile {result['stall_ms']:.1f} ms); first {len(keys)} reads: "
                 f"{hits / len(keys):.1%} hits, {result['misses']} database reads")
        return result

    async def _execute(self, statement: str, *args: Any) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.fetch(statement, *args)
        finally:
            await conn.close()

    # -- bulk -----------------------------------------------------------------------------
    async def measure_bulk(self, apis: Sequence[Api]) -> dict[str, Any]:
        """One transaction upserts N rates (the updater's path); until all instances serve all.

        The API instances share one core, so each instance's answers also wait while the
        scheduler runs the other one (which applies the same rows). So every other round runs
        with every instance but the first moved to the load core, beside PostgreSQL and this
        driver: the first then has the API core to itself, and its stall is its own event
        loop's. The moved instances' stall is reported beside it: it includes waiting for
        PostgreSQL and this driver (which decodes the same notifications) on their shared core.
        The propagation figures are those of the shared-core rounds."""
        import asyncpg

        import model

        config = self.config
        spread = self.pinning.enabled and len(apis) > 1
        self.say(f"bulk: {config.repeats} x {config.bulk_rounds} rounds of {config.bulk_rows} "
                 f"rates in one transaction, on {len(apis)} instances"
                 + (", alternately sharing a core and the first alone on it" if spread else ""))
        conn = await asyncpg.connect(self.url)
        watch = StreamWatch()
        listener = await asyncpg.connect(self.url)
        await listener.add_listener(model.CHANNEL, watch.received)
        keys = [b + q for b, q in self.bulk]
        versions = {r["key"]: r["version"] for r in await conn.fetch(SELECT_VERSIONS, keys)}
        runs = []
        try:
            for run in range(config.repeats):
                shared, own = [], []
                for round_no in range(config.bulk_rounds):
                    serial = run * config.bulk_rounds + round_no
                    if spread and round_no % 2:
                        own.append(await self._spread_round(conn, watch, apis, versions, serial))
                    else:
                        shared.append(await self._bulk_round(conn, watch, apis, versions, serial))
                result = bulk_summary(shared)
                if own:
                    result.update(spread_stalls_ms(own))
                runs.append(result)
                self.say(f"  run {run + 1}: p50/p99 {result['p50_ms']:.1f}/{result['p99_ms']:.1f} ms "
                         f"to all instances, longest stall {result['stall_max_ms']:.2f} ms "
                         f"(write itself {result['write_p50_ms']:.1f} ms)"
                         + (f"; alone on the API core: longest stall "
                            f"{result['spread_stall_max_ms']:.2f} ms (moved beside PostgreSQL: "
                            f"{result['load_core_stall_max_ms']:.2f} ms)" if own else ""))
        finally:
            await conn.close()
            await listener.close()
        summary = {"runs": runs, "p50_ms": median_of(runs, "p50_ms"), "p99_ms": median_of(runs, "p99_ms"),
                   "stall_max_ms": median_of(runs, "stall_max_ms"),
                   "stall_timing": "kernel receive timestamps" if self.kernel_timestamps else "user space",
                   "write_p50_ms": median_of(runs, "write_p50_ms")}
        if spread:
            summary["spread_stall_max_ms"] = median_of(runs, "spread_stall_max_ms")
            summary["load_core_stall_max_ms"] = median_of(runs, "load_core_stall_max_ms")
        return summary

    async def _spread_round(self, conn: Any, watch: StreamWatch, apis: Sequence[Api],
                            versions: dict[str, int], serial: int) -> dict[str, Any]:
        """A bulk round with every instance but the first on the load core (for it only)."""
        pinning = self.pinning
        for api in apis[1:]:
            pinning.move(api.proc.pid, pinning.load_cpus)
        try:
            return await self._bulk_round(conn, watch, apis, versions, serial)
        finally:
            for api in apis[1:]:
                pinning.move(api.proc.pid, pinning.api_cpus)

    async def _write_bulk(self, conn: Any, serial: int) -> None:
        """The updater's write path: one bulk upsert of every bulk pair, each rate changed."""
        import model

        now = datetime.now(UTC)
        rows = [(b, q, Decimal(f"1.{1000 + serial % 9000:04d}{i:04d}"), now)
                for i, (b, q) in enumerate(self.bulk)]
        changed = await model.upsert_feed_rates(conn, "demo", rows, ["manual"])
        if changed != len(rows):
            raise RuntimeError(f"bulk: {changed} of {len(rows)} rates changed")

    async def _bulk_round(self, conn: Any, watch: StreamWatch, apis: Sequence[Api],
                          versions: dict[str, int], serial: int) -> dict[str, Any]:
        """One transaction; then the time until every instance serves the last row of the last
        payload (instances apply payloads in arrival order, the order this process's own
        listener sees), and the longest stall that paced /health probes saw meanwhile."""

        probes = [StallProbe(api.port, PROBE_INTERVAL_S) for api in apis]
        for probe in probes:
            probe.start()
        try:
            deadline = time.monotonic() + 10
            while min(len(p.samples) for p in probes) < 20:  # a baseline before the write
                if time.monotonic() > deadline or not all(p.is_alive() for p in probes):
                    raise RuntimeError("bulk: the stall probes got no answers")
                await asyncio.sleep(PROBE_INTERVAL_S)
            watch.expect(len(self.bulk))
            transaction = conn.transaction()
            t_write = time.perf_counter()
            await transaction.start()
            await self._write_bulk(conn, serial)
            t_commit, t_commit_wall = time.perf_counter(), time.time()
            await transaction.commit()
            key, version = await asyncio.wait_for(watch.last_row(), 10)
            seen = await asyncio.wait_for(asyncio.gather(
                *(served_at(api, f"/v1/rates/{key[:3]}/{key[3:]}", version) for api in apis)), 10)
        finally:
            for probe in probes:
                probe.stop()
        latency = max(seen) - t_commit
        # Only answers due after the commit count: before it, the other core was busy with
        # PostgreSQL's write, which is not the instance's stall.
        stalls = [probe.stall_after(t_commit_wall) for probe in probes]  # in the order of apis
        if not all(probe.kernel_timestamps for probe in probes):
            self.kernel_timestamps = False
        late = not await self._verify_bulk(conn, apis, versions)
        if late:  # the last row was not the last applied: fall back to the verified time
            latency = time.perf_counter() - t_commit
        return {"latency_s": latency, "stall_s": max(stalls), "stalls_s": stalls,
                "write_s": t_commit - t_write, "late": late}

    async def _verify_bulk(self, conn: Any, apis: Sequence[Api], versions: dict[str, int]) -> bool:
        """Every instance serves exactly the database's version of every bulk key (waits <= 5 s).
        Updates ``versions``. False if the first check failed (the probe keys were not enough)."""
        keys = [b + q for b, q in self.bulk]
        current = {r["key"]: r["version"] for r in await conn.fetch(SELECT_VERSIONS, keys)}
        versions.update(current)
        first = True
        deadline = time.perf_counter() + 5
        for api in apis:
            client = await AsyncHttpConn("127.0.0.1", api.port).open()
            host = f"127.0.0.1:{api.port}"
            data = b"".join(request_bytes(host, "GET", rate_path(p)) for p in self.bulk)
            try:
                while True:
                    responses = await client.batch(data, len(self.bulk))
                    if all(version_of(h) == current[p[0] + p[1]]
                           for (_, h, _), p in zip(responses, self.bulk, strict=True)):
                        break
                    first = False
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"bulk: API {api.name} does not serve the new versions")
            finally:
                await client.close()
        return first

    # -- memory ---------------------------------------------------------------------------
    def measure_memory(self) -> dict[str, Any]:
        """RSS of fresh instances before and after every rate is pushed into their caches."""
        config = self.config
        self.say(f"memory: {config.memory_instances} fresh instances, empty vs "
                 f"{config.memory_rates} cached rates")
        # No warm refill here: the figure is what each entry adds to an empty cache.
        apis = self.start_apis([(f"M{i}", {"XRATES_CACHE_SIZE": str(config.memory_rates),
                                           "XRATES_WARM_REFILL": "0"})
                                for i in range(config.memory_instances)])
        try:
            for api in apis:  # the same warm-up traffic for every instance
                conn = api.conn()
                try:
                    for i in range(500):
                        conn.call("GET", CEILING_PATH if i % 2 else rate_path(self.hot[i % 50]))
                finally:
                    conn.close()
            empty = {api.name: (rss_bytes(api.worker_pid()), api.metric("xrates_cache_size"))
                     for api in apis}
            # Every row is changed once, in transactions of TOUCH_CHUNK rows, each applied by every
            # instance before the next: one huge transaction would queue minutes of payloads ahead
            # of the listener's heartbeat on a loaded core.
            deadline = time.monotonic() + 150
            applied0 = {api.name: api.metric("xrates_notifications_applied_total") for api in apis}
            touched = self._touch_every_row(apis, applied0, 0, deadline)
            for api in apis:
                if api.metric("xrates_cache_size") < config.memory_rates:
                    raise RuntimeError(f"memory: API {api.name} holds fewer than {config.memory_rates}")
            full_rss = {api.name: rss_bytes(api.worker_pid()) for api in apis}
            # Churn with a full cache: every entry replaced once more; the workers time their
            # garbage collections meanwhile (xrates_gc_longest_pause_seconds).
            self._touch_every_row(apis, applied0, touched, deadline)
            gc_pauses = {api.name: api.metric('xrates_gc_longest_pause_seconds{generation="2"}')
                         for api in apis}
            runs = []
            for api in apis:
                full = full_rss[api.name]
                rss0, size0 = empty[api.name]
                added = api.metric("xrates_cache_size") - size0
                runs.append({"empty_rss_mb": rss0 / 2**20, "full_rss_mb": full / 2**20,
                             "entries_added": added, "bytes_per_rate": (full - rss0) / added,
                             "gc_pause_ms": gc_pauses[api.name] * 1000})
                self.say(f"  {api.name}: {rss0 / 2**20:.1f} MiB -> {full / 2**20:.1f} MiB, "
                         f"{(full - rss0) / added:.0f} bytes per cached rate; longest full GC "
                         f"pause {gc_pauses[api.name] * 1000:.1f} ms")
        finally:
            self.stop_apis(apis)
        return {"runs": runs, "bytes_per_rate": median_of(runs, "bytes_per_rate"),
                "gc_pause_ms": max(r["gc_pause_ms"] for r in runs),
                "empty_rss_mb": median_of(runs, "empty_rss_mb"),
                "full_rss_mb": median_of(runs, "full_rss_mb")}

    def _touch_every_row(self, apis: Sequence[Api], applied0: dict[str, float], touched: int,
                         deadline: float) -> int:
        """Change every row once, a chunk at a time, each applied by every instance before
        the next; the number of changes applied so far (``touched`` before)."""
        for chunk in range(TOUCH_CHUNKS):
            touched += asyncio.run(self._touch(chunk))
            for api in apis:
                while api.metric("xrates_notifications_applied_total") < applied0[api.name] + touched:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"memory: API {api.name} did not apply every change")
                    time.sleep(0.05)  # poll interval, bounded by the deadline above
        return touched

    async def _touch(self, chunk: int) -> int:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            status = await conn.execute(TOUCH_RATES, TOUCH_CHUNKS, chunk)
        finally:
            await conn.close()
        return int(status.split()[-1])


# ============================================================================= report
def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    return (f"{os.cpu_count()} CPU ({cpu}){memory}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


def build_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, measured, ratio, target, met) for the printed table and the README."""
    rows: list[tuple[str, str, str, str, str]] = []
    wrk, alt = results.get("wrk"), results.get("alternating")
    if wrk:
        rows.append(("ceiling (`/ping`), wrk", f"{wrk['ceiling']['rps']:,.0f} req/s, "
                     f"p99 {wrk['ceiling']['p99_ms']:.2f} ms", "1.00", "", ""))
        rows.append(("cache-hit GET, wrk",
                     f"{wrk['hit']['rps']:,.0f} req/s, p99 {wrk['hit']['p99_ms']:.2f} ms",
                     f"{wrk['hit_vs_ceiling']:.2f} of ceiling", "", ""))
    if alt:
        rows.append(("control: ceiling vs ceiling, alternating batches",
                     f"{alt['ceiling_us']:.1f} us/request", f"{alt['control']:.3f}", "1.00 ± 0.02",
                     verdict(alt["valid"])))
        rows.append(("cache-hit GET vs ceiling, alternating batches", f"{alt['hit_us']:.1f} us/request",
                     f"{alt['hit_vs_ceiling']:.3f}" + ("" if alt["valid"] else " (void: control off)"),
                     TARGETS["hit_vs_ceiling_alternating"],
                     verdict(alt["hit_vs_ceiling"] >= 0.95 if alt["valid"] else None)))
        if "hit_vs_health" in alt:
            rows.append(("cache-hit GET vs `/health` (Sanic-encoded headers), alternating batches",
                         f"{alt['health_us']:.1f} us/request (/health)",
                         f"{alt['hit_vs_health']:.3f}", "", ""))
    if reads := results.get("reads"):
        rows += reads_rows(reads)
    if results.get("wrk_missing"):
        rows.append(("ceiling, cache-hit and read-through GET, wrk",
                     f"not measured: wrk is not installed ({results['wrk_missing']})", "",
                     TARGETS["hit_vs_read_through_wrk"], verdict(None)))
    if wrk:
        rt = wrk["read_through"]
        q1, q3 = wrk.get("hit_vs_read_through_quartiles", (None, None))
        middle = f" (middle half of {len(wrk['runs'])} rounds: {q1:.2f}-{q3:.2f})" if q1 is not None else ""
        rows.append(("read-through GET (`XRATES_CACHE_SIZE=0`), wrk",
                     f"{rt['rps']:,.0f} req/s, p99 {rt['p99_ms']:.2f} ms",
                     f"hit is {wrk['hit_vs_read_through']:.2f}x{middle}",
                     TARGETS["hit_vs_read_through_wrk"], verdict(wrk["hit_vs_read_through"] >= 3.0)))
    if miss := results.get("miss"):
        rows.append(("miss GET (first read, serial)",
                     f"p50 {miss['p50_ms']:.3f} ms, p99 {miss['p99_ms']:.3f} ms", "",
                     TARGETS["miss_p50_ms"], verdict(miss["p50_ms"] <= 1.0)))
    if handler := results.get("handler"):
        rows.append(("handler time of one GET (aelapsed): hit vs miss",
                     f"hit p50 {handler['hit_p50_ms']:.4f} ms, miss p50 {handler['miss_p50_ms']:.3f} ms",
                     f"miss is {handler['miss_p50_ms'] / handler['hit_p50_ms']:.0f}x hit", "", ""))
    if prop := results.get("propagation"):
        floor, after = prop["floor"], prop["after_ack"]
        rows.append(("floor: raw LISTEN/NOTIFY (send -> callback)",
                     f"p50 {floor['p50_ms']:.3f}, p99 {floor['p99_ms']:.3f}, max {floor['max_ms']:.3f} ms",
                     "1.00", "", ""))
        rows.append(("propagation: write acked by A -> B serves it",
                     f"p50 {after['p50_ms']:.3f}, p99 {after['p99_ms']:.3f}, max {after['max_ms']:.3f} ms "
                     f"(B had it at the first read in {prop['first_poll_fraction']:.0%} of writes)",
                     f"p99 {prop['p99_vs_floor_p99']:.2f}x floor", TARGETS["propagation_p99_ms"],
                     verdict(after["p99_ms"] <= 1.0 and prop["p99_vs_floor_p99"] <= 3.0)))
    if bulk := results.get("bulk"):
        rows.append(("bulk: 1,000 rates in one transaction -> all instances serve all",
                     f"p50 {bulk['p50_ms']:.1f} ms, p99 {bulk['p99_ms']:.1f} ms", "",
                     TARGETS["bulk_p99_ms"], verdict(bulk["p99_ms"] <= 50)))
        spread = bulk.get("spread_stall_max_ms")
        rows.append(("bulk: longest stall of an instance's answers, both instances on one core",
                     f"{bulk['stall_max_ms']:.2f} ms", "",
                     "" if spread is not None else TARGETS["bulk_stall_ms"],
                     "" if spread is not None else verdict(bulk["stall_max_ms"] <= 5)))
        if spread is not None:
            rows.append(("bulk: longest event-loop stall of an instance alone on the API core "
                         "(the other moved to the load core)",
                         f"{spread:.2f} ms", "", TARGETS["bulk_stall_ms"], verdict(spread <= 5)))
            rows.append(("bulk: longest stall of the instance moved beside PostgreSQL and the "
                         "driver meanwhile", f"{bulk['load_core_stall_max_ms']:.2f} ms", "", "", ""))
    if ryw := results.get("ryw"):
        outcomes = ryw["outcomes"]
        total = max(1, sum(outcomes.values()))
        rows.append(("read your write on B (PUT on A, GET on B with X-Xrates-Min-Version)",
                     f"p50 {ryw['p50_ms']:.3f}, p99 {ryw['p99_ms']:.3f} ms; cached "
                     f"{outcomes['cached'] / total:.0%}, waited {outcomes['waited'] / total:.0%}, "
                     f"database {outcomes['database'] / total:.0%}; older {ryw['older']}", "",
                     "never older", verdict(ryw["older"] == 0)))
    if scale := results.get("scale"):
        rows += scale_rows(scale)
    if streams := results.get("streams"):
        rows.append((f"change -> event on {streams['streams']:,} streams of one worker",
                     f"p50 {streams['p50_ms']:.1f}, p99 {streams['p99_ms']:.1f} ms; "
                     f"{streams['bytes_per_stream']:,.0f} bytes per idle stream", "",
                     TARGETS["stream_p99_ms"], verdict(streams["p99_ms"] <= 50)))
    if refill := results.get("refill"):
        rows.append(("after a flush: /ready 200 again; the refill (one bulk read)",
                     f"{refill['ready_ms']:.0f} ms; {refill['rows']:,} rows in "
                     f"{refill['refill_ms']:.0f} ms; longest event-loop stall meanwhile "
                     f"{refill['stall_ms']:.1f} ms", "", "", ""))
        rows.append((f"hit share of the first {refill['reads']:,} reads after /ready is 200",
                     f"{refill['hit_share']:.1%} ({refill['misses']} database reads)", "",
                     TARGETS["refill_hit_share"], verdict(refill["hit_share"] >= 0.99)))
    if memory := results.get("memory"):
        rows.append(("memory per cached rate (65,536 vs empty)",
                     f"{memory['bytes_per_rate']:.0f} bytes ({memory['empty_rss_mb']:.0f} -> "
                     f"{memory['full_rss_mb']:.0f} MiB RSS)", "", TARGETS["memory_bytes_per_rate"] + " bytes",
                     verdict(memory["bytes_per_rate"] <= 1024)))
        if "gc_pause_ms" in memory:
            rows.append(("longest full GC pause (CPU time), full cache (65,536 rates) under churn",
                         f"{memory['gc_pause_ms']:.1f} ms (worst of the instances)", "",
                         TARGETS["gc_pause_ms"], verdict(memory["gc_pause_ms"] <= 5)))
    if history := results.get("history"):
        rows.append((f"history: one-year daily series of one pair ({history['days']} days), "
                     "`/history` end to end",
                     f"p50 {history['p50_ms']:.2f} ms, p99 {history['p99_ms']:.2f} ms", "",
                     TARGETS["history_year_p50_ms"], verdict(history["p50_ms"] <= 5)))
        rows.append((f"history storage per (source, pair, day) row ({history['rows']:,} rows: "
                     f"{HISTORY_YEARS} years x {HISTORY_PAIRS} pairs, indexes included)",
                     f"{history['bytes_per_row']:.0f} bytes ({history['total_mb']:.1f} MiB)",
                     "", "", ""))
    return rows


def reads_rows(reads: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The reads phase's rows: its hit/hit control, then each candidate against the hit
    (no verdict when the control is off)."""
    valid = reads["valid"]
    rows = [("control: cache-hit GET vs cache-hit GET, alternating batches (reads)",
             f"{reads['control_us']:.1f} us/request", f"{reads['control']:.3f}", "1.00 ± 0.02",
             verdict(valid))]
    for name, figure, target, floor in (
            ("convert", f"convert through one pivot (`/v1/convert`, via {READS_PIVOT}) vs cache-hit GET "
                        f"(`XRATES_CACHE_SIZE={READS_CACHE_SIZE}`: the bench's table fits)",
             "convert_pivot_vs_hit_alternating", 0.8),
            ("latest", f"Frankfurter `{READS_LATEST_PATH}` vs cache-hit GET",
             "latest_vs_hit_alternating", 0.5)):
        part = reads[name]
        rows.append((f"{figure}, alternating batches",
                     f"{part['candidate_us']:,.1f} vs {part['hit_us']:.1f} us/request "
                     f"(batches of {part['batch']})",
                     ratio_text(part["ratio"]) + ("" if valid else " (void: control off)"),
                     TARGETS[target], verdict(part["ratio"] >= floor if valid else None)))
    if database := reads.get("convert_database"):
        rows.append(("convert through one pivot, default cache (smaller than the bench's table: "
                     "read from PostgreSQL), serial", f"p50 {database['p50_ms']:.3f}, p99 "
                     f"{database['p99_ms']:.3f} ms", "", "", ""))
    return rows


def scale_rows(scale: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The scale phase's rows: propagation, then the notifying-commit ceiling, per listener
    count (the target applies at the largest count)."""
    levels = scale["by_listeners"]
    rows: list[tuple[str, str, str, str, str]] = []
    for level in levels:
        n, prop = level["listeners"], level["propagation"]
        after = prop["after_ack"]
        judged = n == SCALE_LISTENERS[-1]
        rows.append((f"propagation with {n} listeners: write acked by A -> B serves it",
                     f"p50 {after['p50_ms']:.3f}, p99 {after['p99_ms']:.3f}, max {after['max_ms']:.3f} ms "
                     f"(the PUT itself: p50 {prop['write']['p50_ms']:.3f} ms; floor p99 "
                     f"{prop['floor']['p99_ms']:.3f} ms)",
                     f"p99 {prop['p99_vs_floor_p99']:.2f}x floor",
                     TARGETS["scale_propagation_p99_ms"] if judged else "",
                     verdict(after["p99_ms"] <= 5) if judged else ""))
    first = levels[0]
    for level in levels:
        rows.append((f"notifying commits with {level['listeners']} listeners (single-row UPDATEs "
                     f"from {scale['writers']} connections, {scale['ceiling_s']:g} s)",
                     f"{level['commits_per_s']:,.0f} commits/s; every listener had them "
                     f"{level['catch_up_ms']:.1f} ms after the last",
                     f"{level['commits_per_s'] / first['commits_per_s']:.2f} of {first['listeners']} "
                     "listeners", "", ""))
    return rows


def markdown_table(rows: Sequence[tuple[str, ...]]) -> str:
    header = ("figure", "measured (median of runs)", "ratio", "target", "met")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    config = BenchConfig.quick() if args.quick else BenchConfig()
    phases = PHASES if not args.only else tuple(p.strip() for p in args.only.split(","))
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"perf.py: unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="xrates-bench-"))
    runner = Bench(config, workdir, phases)
    interrupted = False

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        results = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        results = {}
    finally:
        runner.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        print("perf.py: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    rows = build_rows(results)
    table = markdown_table(rows)
    report = {
        "command": "python perf.py bench" + (" --quick" if args.quick else "")
                   + (f" --only {args.only}" if args.only else ""),
        "machine": machine_description(),
        "pinning": runner.pinning.describe(),
        "wrk": subprocess.run([runner.wrk, "--version"], capture_output=True, text=True,
                              check=False).stdout.splitlines()[0] if runner.wrk else None,
        "config": config.__dict__,
        "targets": TARGETS,
        "results": results,
        "notes": runner.notes,
        "table": [dict(zip(("figure", "measured", "ratio", "target", "met"), r, strict=True))
                  for r in rows],
    }
    print()
    print(f"xrates benchmark — {report['machine']}")
    print(f"{report['pinning']}; finished in {results['elapsed_s']:.0f} s")
    print()
    print(table)
    for note in runner.notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    return 0


def ab(args: argparse.Namespace) -> int:
    """This tree against another checkout: hit/ceiling of each, interleaved runs."""
    other = Path(args.other).resolve()
    if not (other / "sanic_app.py").is_file():
        print(f"perf.py: {other} is not a checkout of xrates (no sanic_app.py)", file=sys.stderr)
        return 2
    trees = {"this": ROOT, "other": other}
    workdir = Path(tempfile.mkdtemp(prefix="xrates-ab-"))
    runner = Bench(BenchConfig(alternate_hit_s=args.seconds), workdir, ("alternating",))
    try:
        ratios = runner.compare_trees(trees, args.runs)
    finally:
        runner.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"xrates A/B — {machine_description()}; {runner.pinning.describe()}")
    print(f"cache-hit GET vs ceiling (`{CEILING_PATH}`), alternating batches of "
          f"{runner.config.batch}, {args.runs} interleaved runs of {args.seconds:g} s each")
    for name, root in trees.items():
        values = " ".join(f"{r:.3f}" for r in ratios[name])
        print(f"  {name:5} {root}: median {statistics.median(ratios[name]):.3f} ({values})")
    difference = statistics.median(ratios["this"]) - statistics.median(ratios["other"])
    print(f"  this - other: {difference:+.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python perf.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "bench", help="measure xrates on this machine (own PostgreSQL and API processes)",
        description="Start an embedded PostgreSQL and API instances on 127.0.0.1, measure the "
                    "ceiling, hit, read-through, miss, convert through a pivot and Frankfurter's "
                    "latest against the hit, propagation (beside the raw NOTIFY floor), "
                    "propagation and the notifying-commit ceiling with 2, 20 and 100 listeners, "
                    "bulk propagation and memory, print a table and optionally write JSON. Needs "
                    f"wrk for the throughput figures ({WRK_INSTALL_HINT}). Takes under 5 minutes.")
    run.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    run.add_argument("--quick", action="store_true", help="shorter runs (about a minute; noisier)")
    run.add_argument("--only", metavar="PHASES",
                     help=f"comma list of phases to run (default all: {','.join(PHASES)})")
    compare = sub.add_parser(
        "ab", help="this tree's hit/ceiling against another checkout's, in interleaved runs",
        description="Start an embedded PostgreSQL (this tree's schema) and one API instance of "
                    "this tree and one of OTHER (another checkout, e.g. `git worktree add "
                    "/tmp/old HEAD~1`), then measure each one's cache hit against the ceiling "
                    "in alternating batches, the two instances' runs interleaved. The machine's "
                    "drift between runs (a few hundredths here) hits both alike; the same tree "
                    "against itself differs by about 0.005.")
    compare.add_argument("other", help="the other checkout's directory")
    compare.add_argument("--runs", type=int, default=8, help="runs per tree (default 8)")
    compare.add_argument("--seconds", type=float, default=2.5,
                         help="seconds of each run (default 2.5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    sys.path.insert(0, str(ROOT))
    return ab(args) if args.command == "ab" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
