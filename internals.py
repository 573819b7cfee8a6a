"""Every use of a library's private internals, fenced in one place and checked at start-up.

- Sanic: ``PreEncodedResponse`` sends a response whose header lines are constant except its
  ETag and length with those lines encoded once per process (Sanic sanitises and encodes every
  header line of every response, about 1 us each: measured on the hit path, see README). It
  uses ``HTTPResponse._sanitize_header_value`` and overrides ``processed_headers``.
- Sanic: ``handler_started_at`` reads ``Http.perft0`` (when the handler began), so request
  latency is timed without a request middleware.
- prometheus_client: ``add_histogram_counts`` adds request latencies to a histogram in bulk
  through its children's ``_buckets``/``_sum``/``_upper_bounds`` (there is no public bulk API,
  and a labelled ``observe`` per request costs a lock and a label lookup on the hit path).
- Sanic: ``chunk_writer`` lets the change-stream hub write an event straight to a streaming
  response's transport, framed as Sanic frames an HTTP/1.1 chunk (``Http.response_func`` is
  ``http1_response_chunked``; ``Http.protocol.transport``): one synchronous write per stream
  per change instead of waking every stream's handler task (measured: the 1,000-stream
  fan-out, README "Live").
- CPython: ``cache.untracked`` hides immutable cached values from the cyclic garbage
  collector through the C API's ``PyObject_GC_UnTrack`` (via ctypes; public, but outside
  Python's own API): with 65,536 cached rates a full collection stopped a worker for about
  100 ms, now well under 5 ms (README "GC pauses"). Checked on a throw-away object.
- pgserver: ``postgres_bin_path`` reads where its PostgreSQL binaries are
  (``pgserver._commands.POSTGRES_BIN_PATH``; the package has no public accessor).

``check()`` compares each with the library's own public behaviour (the bytes Sanic's own
``HTTPResponse`` sends, the samples ``Histogram.observe`` produces) and raises
``InternalsMismatch`` with one clear sentence, so a process refuses to start on a library
version that behaves otherwise rather than send wrong bytes or wrong metrics.
"""

from __future__ import annotations

import gc
import math
import platform
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import Histogram
from sanic.compat import Header
from sanic.http.http1 import Http
from sanic.response import HTTPResponse

import cache


class InternalsMismatch(RuntimeError):
    """An installed library no longer behaves as this module assumes."""


# ----------------------------------------------------------------------------- Sanic
_sanitise = HTTPResponse._sanitize_header_value
_CONSTANT_LINES: dict[tuple[str, Any], tuple[bytes, bytes]] = {
    ("connection", value): (b"connection", value.encode()) for value in ("keep-alive", "close")
}
_TEMPLATES: list[Header] = []


def constant_headers(headers: Mapping[str, str]) -> Header:
    """A header template for ``PreEncodedResponse``; its lines are encoded once, here."""
    template = Header(headers)
    for name, value in template.items():
        _CONSTANT_LINES[(name, value)] = (_sanitise(name).encode("ascii"),
                                          _sanitise(value).encode())
    _TEMPLATES.append(template)
    return template


def _header_line(name: str, value: Any) -> tuple[bytes, bytes]:
    line = _CONSTANT_LINES.get((name, value))
    if line is not None:
        return line
    if name == "ETag":  # '"<version>"' or a quoted hex digest: nothing to sanitise
        return b"ETag", value.encode()
    if name == "content-length" and type(value) is int:
        return b"content-length", b"%d" % value
    # anything else: as Sanic does it
    return _sanitise(name).encode("ascii"), _sanitise(f"{value}").encode(errors="surrogateescape")


class PreEncodedResponse(HTTPResponse):
    """200 with a pre-encoded body, an ETag and a template's constant headers."""

    __slots__ = ()

    def __init__(self, body: bytes, etag: str, template: Header,
                 content_type: str = "application/json") -> None:
        # HTTPResponse.__init__ minus its throw-away header map; the same attributes.
        self.asgi = False
        self.stream = None
        self._cookies = None
        self.body = body
        self.status = 200
        self.content_type = content_type
        self.headers = headers = Header(template)
        headers["ETag"] = etag

    @property
    def processed_headers(self) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        headers = self.headers
        if "content-type" not in headers:
            headers["content-type"] = self.content_type
        return [_header_line(name, value) for name, value in headers.items()]


def handler_started_at(request: Any) -> float | None:
    """``perf_counter()`` when Sanic began this request's handler (its head read), None when
    it never got that far: ``Http.perft0``, which Sanic sets for its own access log. Read
    instead of a request middleware stamping the time (measured: Sanic's middleware machinery
    cost ~7% of a constant route's time, README "Performance")."""
    return getattr(request.stream, "perft0", None)


def _check_sanic() -> None:
    if "perft0" not in Http.__slots__:
        raise InternalsMismatch(
            "sanic: Http no longer keeps perft0 (a request's start time) on this Sanic "
            "version; pin the tested version (see requirements.txt)")
    for template in _TEMPLATES or [constant_headers({"X-Check": "1"})]:
        fast = PreEncodedResponse(b'{"check":1}', '"123"', template)
        fast.headers["content-length"] = len(b'{"check":1}')
        fast.headers["connection"] = "keep-alive"
        plain = HTTPResponse(fast.body, status=200, headers=dict(fast.headers),
                             content_type=fast.content_type)
        if sorted(fast.processed_headers) != sorted(plain.processed_headers):
            raise InternalsMismatch(
                "sanic: PreEncodedResponse's header bytes differ from HTTPResponse's on this "
                "Sanic version; pin the tested version (see requirements.txt)")


ChunkWriter = Callable[[bytes], bool]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_writer(response: Any, buffer_limit: int) -> ChunkWriter | None:
    """For a started HTTP/1.1 chunked streaming ``response``: a function writing ``data`` as
    one chunk straight to its transport (True), or refusing when more than ``buffer_limit``
    bytes wait unsent there (False: the client is that far behind). None when the response
    is framed otherwise (HTTP/1.0, HEAD): the caller keeps using ``response.send``."""
    http = getattr(response, "stream", None)
    if not isinstance(http, Http) or http.response_func != http.http1_response_chunked:
        return None
    transport = http.protocol.transport
    if transport is None:
        return None

    def write(data: bytes) -> bool:
        if transport.is_closing():
            return True  # the client went: its handler is being cancelled
        if transport.get_write_buffer_size() > buffer_limit:
            return False
        transport.write(_chunk(data))
        return True
    return write


def _check_chunk_framing() -> None:
    sent: list[bytes] = []

    class _Capture:
        async def _send(self, data: bytes) -> None:
            sent.append(data)

    data = b"id: 1\nevent: rate\ndata: {}\n\n"
    step = Http.http1_response_chunked(_Capture(), data, False)  # type: ignore[arg-type]
    try:
        step.send(None)
    except StopIteration:
        pass
    else:  # pragma: no cover - it never suspends on a capture
        step.close()
    if sent != [_chunk(data)] or "protocol" not in Http.__slots__:
        raise InternalsMismatch(
            "sanic: Http.http1_response_chunked frames chunks otherwise than chunk_writer on "
            "this Sanic version; pin the tested version (see requirements.txt)")


# ----------------------------------------------------------------------------- prometheus_client
def add_histogram_counts(child: Any, upper_bounds: Sequence[float], counts: Sequence[float]) -> None:
    """Add bucket counts (one per bound, then the sum of the observed values) to a histogram
    child in one go, as ``observe`` once per value would."""
    if tuple(child._upper_bounds) != tuple(upper_bounds):
        raise InternalsMismatch("prometheus_client: a histogram's buckets are not the ones "
                                "its counts were taken for")
    child._sum.inc(counts[-1])
    for bucket, count in zip(child._buckets, counts[:-1], strict=True):
        if count:
            bucket.inc(count)


def _check_prometheus() -> None:
    bounds = (0.001, 0.01, math.inf)
    values = (0.0005, 0.002, 0.002, 5.0)
    try:
        bulk = Histogram("xrates_check_bulk", "check", buckets=bounds[:-1], registry=None)
        each = Histogram("xrates_check_each", "check", buckets=bounds[:-1], registry=None)
        counts = [0.0] * (len(bounds) + 1)
        for value in values:
            each.observe(value)
            counts[next(i for i, bound in enumerate(bounds) if value <= bound)] += 1
        counts[-1] = sum(values)
        add_histogram_counts(bulk, bounds, counts)
        same = _samples(bulk, "bulk") == _samples(each, "each")
    except (AttributeError, TypeError, ValueError) as exc:
        raise InternalsMismatch(f"prometheus_client: bulk histogram counts do not work on this "
                                f"version ({type(exc).__name__}: {exc})") from exc
    if not same:
        raise InternalsMismatch("prometheus_client: bulk histogram counts differ from observe() "
                                "on this version")


def _samples(histogram: Histogram, name: str) -> list[tuple[str, float]]:
    [metric] = list(histogram.collect())
    return [(s.name.replace(name, ""), s.value) for s in metric.samples
            if not s.name.endswith("_created")]


# ----------------------------------------------------------------------------- pgserver
def postgres_bin_path() -> Path:
    """The directory of the PostgreSQL binaries that the pgserver package ships."""
    with warnings.catch_warnings():  # pgserver warns about XDG_RUNTIME_DIR on import
        warnings.simplefilter("ignore")
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError as exc:
            raise InternalsMismatch("pgserver: no _commands.POSTGRES_BIN_PATH on this version; "
                                    "set DATABASE_URL or pin the tested pgserver") from exc
    path = Path(POSTGRES_BIN_PATH)
    if not (path / "pg_ctl").exists():
        raise InternalsMismatch(f"pgserver: no pg_ctl in {path}")
    return path


# ----------------------------------------------------------------------------- CPython
def _check_untracking() -> None:
    probe = Probe("a", 1)
    if not gc.is_tracked(probe) or gc.is_tracked(cache.untracked(probe)):
        raise InternalsMismatch("CPython: PyObject_GC_UnTrack did not untrack a NamedTuple "
                                f"({platform.python_implementation()} {platform.python_version()})")


class Probe(NamedTuple):
    text: str
    number: int


# ----------------------------------------------------------------------------- all
def check() -> None:
    """Raise InternalsMismatch if Sanic, prometheus_client or CPython behave otherwise than
    assumed."""
    _check_sanic()
    _check_chunk_framing()
    _check_prometheus()
    _check_untracking()
