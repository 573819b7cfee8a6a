"""A real Frankfurter v1 client from PyPI against xrates' Frankfurter bodies.

The client is `frankfurter` 2.0.0 (PranavChaturvedi/frankfurter, MIT, stdlib `urllib` only).
It calls `GET /v1/currencies`, `/v1/latest?base=&symbols=`, `/v1/{date}?base=&symbols=` and
`/v1/{start}..{end}?base=&symbols=`, reads `rates`, and validates codes against the keys of
`/currencies`. Its URL is `f"https://{base_url}/{path}?{query}"` with `base_url` the instance
attribute `_FrankfurterEngine__base_url` (default "api.frankfurter.dev/v1"): it is redirected
by setting that attribute to "host:port/v1"; the scheme is always https, so the tests serve
over TLS with a throw-away certificate that the client trusts through SSL_CERT_FILE.

Its top-level package is also called `frankfurter`, like our module, so it is loaded here from
its installed files under another name (`frankfurter_client`), unmodified.

Today the server is a stdlib `http.server` in a thread answering with frankfurter.py over the
ECB hist-90d fixture, which proves shape compatibility now; `test_client_against_xrates` is
the same client against a real xrates instance, for when the routes exist.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from recorded_feeds import upstream  # noqa: F401 - fixture
from test_frankfurter import ecb_history

import frankfurter as fk

TODAY = date(2024, 2, 27)  # the last day of the ECB fixture
Responder = Callable[[str], tuple[int, bytes]]


def load_client() -> ModuleType:
    """The installed `frankfurter` distribution, imported as `frankfurter_client`."""
    if "frankfurter_client" in sys.modules:
        return sys.modules["frankfurter_client"]
    init = Path(str(importlib.metadata.distribution("frankfurter").locate_file("frankfurter/__init__.py")))
    spec = importlib.util.spec_from_file_location(
        "frankfurter_client", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sys.modules["frankfurter_client"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        # Its logger module calls logging.basicConfig() at import: undo that for the suite.
        root.handlers[:], root.level = handlers, level
    return module


def xrates_v1(path_and_query: str) -> tuple[int, bytes]:
    """What the Frankfurter routes answer, straight from frankfurter.py (the lead's routes
    add headers and caching around exactly these bodies)."""
    parts = urlsplit(path_and_query)
    args = parse_qs(parts.query, keep_blank_values=True)
    segment = unquote(parts.path).removeprefix("/v1").strip("/")
    history = ecb_history()
    try:
        if segment == "currencies":
            codes = {code for rates in history.values() for code in rates} | {"EUR"}
            return 200, fk.encode(fk.currency_names(codes))
        if segment in ("latest", "current"):
            body = fk.latest(history, "EUR", fk.parse_query(args), TODAY)
        elif ".." in segment:
            query = fk.parse_query(args, segment)
            start, end = fk.parse_range(segment)
            body = fk.series(history, "EUR", query, start, end, TODAY)
        else:
            query = fk.parse_query(args, segment)
            body = fk.on_day(history, "EUR", query, fk.parse_day(segment))
    except fk.FrankfurterError as error:
        return error.status, fk.encode(error.body())
    return 200, fk.encode(body)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI; the tests skip without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


class TlsServer:
    """`ThreadingHTTPServer` over TLS on a free loopback port, answering GETs with `respond`."""

    def __init__(self, respond: Responder, cert: Path, key: Path) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = respond(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.requests: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> TlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    cert, key = make_certificate(tmp_path)
    # urllib's default context reads the trust store path from here on each connection.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return cert, key


@pytest.fixture
def engine(certificate: tuple[Path, Path]) -> Iterator[object]:
    """The client pointed at a local server of frankfurter.py bodies."""
    with TlsServer(xrates_v1, *certificate) as server:
        client = load_client().FrankfurterEngine(quiet_mode=True)
        client._FrankfurterEngine__base_url = f"127.0.0.1:{server.port}/v1"  # the redirect
        yield client


def test_currencies(engine: object) -> None:
    currencies = engine.fetch_currencies()  # type: ignore[attr-defined]
    assert currencies["USD"] == "US Dollar" and currencies["EUR"] == "Euro"
    assert list(currencies) == sorted(currencies) and len(currencies) == 31


def test_latest_rebased(engine: object) -> None:
    body = engine.fetch_latest_data(base="USD", symbols="EUR,GBP,IDR")  # type: ignore[attr-defined]
    assert body == {
        "amount": 1.0,
        "base": "USD",
        "date": "2024-02-27",
        "rates": {"EUR": 0.92115, "GBP": 0.78869, "IDR": 15637},
    }


def test_historical_day_snaps_to_friday(engine: object) -> None:
    body = engine.fetch_data_for_date("2024-02-25", symbols="USD")  # type: ignore[attr-defined]
    assert body == {"amount": 1.0, "base": "EUR", "date": "2024-02-23", "rates": {"USD": 1.0834}}


def test_time_series(engine: object) -> None:
    body = engine.fetch_time_series_data(  # type: ignore[attr-defined]
        symbols="USD", start_date="2024-02-24", end_date="2024-02-26"
    )
    assert body["start_date"] == "2024-02-23" and body["end_date"] == "2024-02-26"
    assert body["rates"] == {"2024-02-23": {"USD": 1.0834}, "2024-02-26": {"USD": 1.0852}}
    open_ended = engine.fetch_time_series_data(symbols="USD", start_date="2024-02-26")  # type: ignore[attr-defined]
    assert list(open_ended["rates"]) == ["2024-02-26", "2024-02-27"]


def test_convert(engine: object) -> None:
    assert engine.convert_currency(100, "EUR", "USD") == pytest.approx(108.56)  # type: ignore[attr-defined]


def test_errors_reach_the_client_as_failures(engine: object) -> None:
    with pytest.raises(Exception, match="StatusCode : 404"):
        engine.fetch_data_for_date("2024-03-30")  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="StatusCode : 422"):
        engine.fetch_data_for_date("2024-02-30")  # type: ignore[attr-defined]


def test_bodies_are_what_the_client_decodes() -> None:
    # The bytes the routes send decode to exactly the dicts frankfurter.py returned.
    status, raw = xrates_v1("/v1/2024-02-27?from=USD&amount=10")
    assert status == 200
    query = fk.parse_query({"from": ["USD"], "amount": ["10"]})
    assert json.loads(raw) == fk.on_day(ecb_history(), "EUR", query, TODAY)


# --------------------------------------------------------------------------- the real routes


def forward_to(base_url: str) -> Responder:
    """A TLS front for a plain-HTTP xrates instance (the client only speaks https)."""
    import httpx

    def respond(path_and_query: str) -> tuple[int, bytes]:
        response = httpx.get(base_url + path_and_query, timeout=10)
        return response.status_code, response.content

    return respond


async def test_client_against_xrates(
    start_api: Callable[..., object], db_url: str, certificate: tuple[Path, Path],
    upstream: object,
) -> None:
    """The same client against a real instance whose history was backfilled from the ECB
    fixture (served over local HTTP); only its base URL is redirected. Each call runs in a
    thread: the client blocks."""
    import asyncio

    from test_frankfurter_routes import load_ecb_history

    await load_ecb_history(db_url, upstream)
    api = await start_api(db_url, env={"XRATES_SOURCES": "ecb"})  # type: ignore[operator]
    with TlsServer(forward_to(api.base_url), *certificate) as front:  # type: ignore[attr-defined]
        client = load_client().FrankfurterEngine(quiet_mode=True)
        client._FrankfurterEngine__base_url = f"127.0.0.1:{front.port}/v1"
        currencies = await asyncio.to_thread(client.fetch_currencies)
        assert currencies["USD"] == "US Dollar" and len(currencies) == 31
        latest = await asyncio.to_thread(client.fetch_latest_data, "USD", "EUR,GBP,IDR")
        assert latest == {"amount": 1.0, "base": "USD", "date": "2024-02-27",
                          "rates": {"EUR": 0.92115, "GBP": 0.78869, "IDR": 15637}}
        day = await asyncio.to_thread(client.fetch_data_for_date, "2024-02-25", None, "USD")
        assert day == {"amount": 1.0, "base": "EUR", "date": "2024-02-23",
                       "rates": {"USD": 1.0834}}
        series = await asyncio.to_thread(
            client.fetch_time_series_data, None, "USD", "2024-02-24", "2024-02-26"
        )
        assert series["rates"] == {"2024-02-23": {"USD": 1.0834}, "2024-02-26": {"USD": 1.0852}}
        converted = await asyncio.to_thread(client.convert_currency, 100, "EUR", "USD")
        assert converted == pytest.approx(108.56)
        with pytest.raises(Exception, match="StatusCode : 422"):
            await asyncio.to_thread(client.fetch_data_for_date, "2024-02-30")
