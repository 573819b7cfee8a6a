"""Test harness: a real PostgreSQL (embedded, started here), a template database per
session with a fresh copy per test, and real API processes on free ports that are
stopped by PID. Conditions are awaited with deadlines, never with bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import processes  # noqa: E402
import util  # noqa: E402

TEMPLATE_DB = "xrates_template"
_db_counter = itertools.count()


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout_s: float = 10.0,
                   interval_s: float = 0.02, what: str = "condition") -> Any:
    """Poll an async predicate until it returns a truthy value, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last={last!r}")
        await asyncio.sleep(interval_s)


async def answers_200(client: httpx.AsyncClient, path: str = "/ready") -> bool:
    """True if ``path`` answers 200; False on another status or no connection (yet)."""
    try:
        return (await client.get(path)).status_code == 200
    except httpx.TransportError:
        return False


# --------------------------------------------------------------------------- loop hygiene
@pytest.fixture(autouse=True)
async def no_unhandled_loop_errors() -> AsyncIterator[None]:
    """Fail a test that leaves an error its event loop had to report unhandled (a task's
    exception never retrieved, a callback that raised): such errors are bugs, not noise."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
    assert not errors, "unhandled event-loop errors: " + "; ".join(
        f"{c.get('message')} {c.get('exception')!r}" for c in errors)


# --------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[util.EmbeddedPostgres]:
    server = util.EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")


def _db_url(server: util.EmbeddedPostgres, name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{server.port}/{name}"


def db_name(url: str) -> str:
    """The database name of a test database's URL."""
    return url.rsplit("/", 1)[1]


async def create_database(pg: util.EmbeddedPostgres, name: str, template: str | None = None, *,
                          replace: bool = False) -> str:
    """A new database ``name`` on the session's server, empty or a copy of ``template``; its
    URL. ``replace``: drop a database of that name first."""
    conn = await asyncpg.connect(pg.url)
    try:
        if replace:
            await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    finally:
        await conn.close()
    return _db_url(pg, name)


@pytest.fixture(scope="session")
async def template(pg: util.EmbeddedPostgres) -> str:
    await util.migrate(await create_database(pg, TEMPLATE_DB, replace=True))
    return TEMPLATE_DB


async def fresh_database(pg: util.EmbeddedPostgres, template: str) -> str:
    """A new database copied from the migrated template; its URL."""
    return await create_database(pg, f"xrates_test_{os.getpid()}_{next(_db_counter)}", template)


@pytest.fixture
async def db_url(pg: util.EmbeddedPostgres, template: str) -> str:
    return await fresh_database(pg, template)


@pytest.fixture
async def sql(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database (writes 'straight through SQL')."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


# --------------------------------------------------------------------------- in-process stores
def store_settings(db_url: str, **env: str) -> util.Settings:
    """Settings for an in-process model.Store on ``db_url`` with fast heartbeats."""
    return util.load_settings({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0",
                               "XRATES_HEARTBEAT_INTERVAL": "0.2",
                               "XRATES_HEARTBEAT_TIMEOUT": "1.0", **env})


@contextlib.asynccontextmanager
async def running(store: Any, db_url: str) -> AsyncIterator[Any]:
    """Start a model.Store (or subclass), wait until its listener is up, close it after."""
    await store.start(db_url)
    try:
        await wait_for(lambda: _is(store.listener_connected), 10, what="listener up")
        yield store
    finally:
        await store.close()


async def _is(value: object) -> bool:
    return bool(value)


# --------------------------------------------------------------------------- API processes
FAST_HEARTBEAT = {"XRATES_HEARTBEAT_INTERVAL": "0.2", "XRATES_HEARTBEAT_TIMEOUT": "1.0"}


class ApiProcess(processes.ApiServer):
    """One real `python sanic_app.py` instance on a free port, with an HTTP client."""

    def __init__(self, db_url: str, log_dir: Path, env: dict[str, str] | None = None,
                 workers: int = 1, host: str = "127.0.0.1") -> None:
        super().__init__(db_url, log_dir, {**FAST_HEARTBEAT, **(env or {})}, workers, host)
        self.workers = workers
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=10.0)

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"API exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return (await self.client.get("/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(ready, timeout_s, 0.05, f"{self.base_url}/ready")
        if self.workers > 1:
            # Every worker serving: Sanic's manager has their start-up acknowledgements (a
            # SIGTERM while it still waits for them ends in a traceback inside Sanic).
            pids: set[int] = set()

            async def all_serving() -> bool:
                async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0) as fresh:
                    pids.add((await fresh.get("/v1/instance")).json()["pid"])
                return len(pids) >= self.workers

            await wait_for(all_serving, timeout_s, 0.01, f"{self.workers} workers serving")

    async def stop(self) -> None:
        await self.client.aclose()
        self.stop_process()


@contextlib.asynccontextmanager
async def serving(db_url: str, log_dir: Path) -> AsyncIterator[ApiProcess]:
    """One API instance on ``db_url`` for the block (a module's, say): ready on entry, stopped
    by PID on exit, which fails if the instance logged a server error."""
    api = ApiProcess(db_url, log_dir)
    try:
        await api.wait_ready()
        yield api
    finally:
        await api.stop()
        errors = api.server_errors()
        assert not errors, "server errors logged:\n" + "\n".join(errors)


async def serves_row(api: ApiProcess, base: str, quote: str, version: int | None) -> bool:
    """True if the instance answers the pair as the database holds it: 200 with ``version``,
    or 404 when ``version`` is None (no row). False while it cannot be reached."""
    try:
        response = await api.client.get(f"/v1/rates/{base}/{quote}")
    except httpx.TransportError:
        return False
    if version is None:
        return response.status_code == 404
    return response.status_code == 200 and response.json()["version"] == version


async def metric(api: ApiProcess, name: str) -> float:
    """One value of an instance's /metrics (the first sample of that name)."""
    text = (await api.client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
async def start_api(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ApiProcess]]]:
    """Factory: `api = await start_api(db_url, env={...})`; stopped (by PID) after the test,
    which fails if any instance logged a server error."""
    started: list[ApiProcess] = []

    async def start(db_url: str, env: dict[str, str] | None = None, workers: int = 1,
                    wait: bool = True, host: str = "127.0.0.1") -> ApiProcess:
        api = ApiProcess(db_url, tmp_path, env, workers, host)
        started.append(api)
        if wait:
            await api.wait_ready()
        return api

    try:
        yield start
    finally:
        errors = []
        for api in started:
            await api.stop()
            errors += api.server_errors()
        assert not errors, "server errors logged:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- `dev.py up`
async def start_up(data_dir: Path, ports: list[int], log: Path,
                   env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """The README's run command, `python3 dev.py up`, on the given ports."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    environment.pop("DATABASE_URL", None)
    environment.update({"XRATES_DATA_DIR": str(data_dir), **(env or {})})
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "dev.py", "up", "--ports", *map(str, ports), cwd=ROOT,
            env=environment, stdout=output, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)


async def stop_up(proc: asyncio.subprocess.Process) -> int:
    """Ctrl-C: SIGINT to the process we started, then wait (bounded); its exit code."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise AssertionError("dev.py up did not stop within 30 s of SIGINT") from None
    return proc.returncode
