"""Recorded upstream payloads (tests/fixtures/upstream) and the local HTTP servers that serve
them on 127.0.0.1, for tests that make real fetches: updater runs, the coverage run."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest

from sources import FEEDS

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
# What `Upstream` serves for the five original feeds until a test says otherwise.
DEFAULT_PAYLOADS = {
    "ecb": "ecb/eurofxref-daily_2024-02-27.xml",
    "nbu": "nbu/statdirectory_exchange_2026-09-25.json",
    "cbr": "cbr/XML_daily_2024-03-28_vunitrate.xml",
    "boc": "boc/FX_RATES_DAILY_start-2026-03-12_vcr.json",
    "privatbank": "privatbank/pubinfo_coursid5-probable_committed-2024-04-01.json",
}


def payload(name: str) -> bytes:
    """The bytes of a recorded payload, by its path under tests/fixtures/upstream."""
    return (FIXTURES / name).read_bytes()


class LocalServer:
    """A threaded HTTP server on a free 127.0.0.1 port, closed by ``close()`` or on leaving a
    ``with`` block. Every GET and POST (its body read first) is answered by ``reply``."""

    def __init__(self) -> None:
        local = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                with contextlib.suppress(OSError):  # the client may have gone
                    reply = local.reply(self.command, self.path)
                    if reply is None:
                        return
                    status, body = reply
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.answer()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reply(self, method: str, path: str) -> tuple[int, bytes] | None:
        """(status, body) for one request; None sends nothing (the handler returns)."""
        raise NotImplementedError

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Upstream(LocalServer):
    """Serves recorded payloads, one switchable route per feed name (the path ``/<name>``).

    A route is a payload, an HTTP status, or a hang (the handler holds the request until
    ``close()``, so a hang outlasts any fetch timeout but never the test).
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, Any]] = {}
        self.hits: dict[str, int] = {}
        self.closing = threading.Event()
        super().__init__()
        for name, path in DEFAULT_PAYLOADS.items():
            self.serve(name, payload(path))

    def reply(self, method: str, path: str) -> tuple[int, bytes] | None:
        name = path.strip("/")
        self.hits[name] = self.hits.get(name, 0) + 1
        kind, value = self.routes.get(name, ("status", 404))
        if kind == "hang":
            self.closing.wait(60)
            return None
        return (value, b"") if kind == "status" else (200, value)

    def url(self, name: str) -> str:
        return f"{self.origin}/{name}"

    def serve(self, name: str, body: bytes) -> None:
        self.routes[name] = ("body", body)

    def fail(self, name: str, status: int = 500) -> None:
        self.routes[name] = ("status", status)

    def hang(self, name: str) -> None:
        self.routes[name] = ("hang", None)

    def env(self) -> dict[str, str]:
        return {f"XRATES_{name.upper()}_URL": self.url(name) for name in FEEDS}

    def close(self) -> None:
        self.closing.set()
        super().close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server
