"""The API's pool through a real PgBouncer (Debian's package) in ``pool_mode = transaction``,
the listener direct (XRATES_LISTEN_URL), migrations direct: the push, stale-fill race and
convergence guarantees of tests/test_guarantees.py, run with their own bodies.

Debian bookworm's PgBouncer (1.18) has no protocol-level prepared statements, so the pool runs
with XRATES_STATEMENT_CACHE_SIZE=0 (unnamed statements only).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import debian
import pytest
import test_guarantees as guarantees
from conftest import ApiProcess, db_name, wait_for

import util

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def pgbouncer_bin() -> str:
    """Debian's pgbouncer, installed here if missing (once per session; skipped only where it
    cannot be installed)."""
    return debian.binary("pgbouncer", ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"), "these tests")


@dataclass
class Bouncer:
    port: int
    pg_port: int
    version: str

    def url(self, direct_url: str) -> str:
        """The same database through PgBouncer."""
        return direct_url.replace(f"@127.0.0.1:{self.pg_port}/", f"@127.0.0.1:{self.port}/", 1)


@pytest.fixture(scope="session")
def bouncer(pgbouncer_bin: str, pg: util.EmbeddedPostgres) -> Iterator[Bouncer]:
    """PgBouncer on a free port in front of the session's PostgreSQL (every database), trust
    auth, transaction pooling; stopped by its PID."""
    # Its own world-readable directory: as root PgBouncer refuses to run, so it runs as the
    # unprivileged user the embedded PostgreSQL already uses, which must read the config.
    workdir = Path(tempfile.mkdtemp(prefix="xrates-pgbouncer-"))
    workdir.chmod(0o755)
    port = util.free_port()
    (workdir / "userlist.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={pg.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'userlist.txt'}\n"
        "pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 20\n"
        "admin_users = postgres\nignore_startup_parameters = extra_float_digits\n"
        "server_reset_query =\nlogfile =\npidfile =\n")
    for path in workdir.iterdir():
        path.chmod(0o644)
    version = subprocess.run([pgbouncer_bin, "--version"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
    log = (workdir / "pgbouncer.log").open("wb")
    proc = subprocess.Popen([pgbouncer_bin, str(workdir / "pgbouncer.ini")],
                            user="pgserver" if os.geteuid() == 0 else None,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def accepting() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited: {(workdir / 'pgbouncer.log').read_text()}")
        return subprocess.run(
            [str(pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "-At", "-c", "SELECT 1", "postgres"], capture_output=True, timeout=10,
        ).returncode == 0

    try:
        deadline = time.monotonic() + 15
        while not accepting():  # a poll with a deadline (sync: a session fixture, no loop)
            assert time.monotonic() < deadline, "pgbouncer did not accept within 15 s"
            time.sleep(0.05)
        yield Bouncer(port, pg.port, version)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # by the PID we started
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def show_clients(pg: util.EmbeddedPostgres, bouncer: Bouncer) -> list[list[str]]:
    """PgBouncer's SHOW CLIENTS (its console speaks the simple protocol only: psql)."""
    done = subprocess.run(
        [str(pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(bouncer.port), "-U", "postgres",
         "-At", "-F", "|", "-c", "SHOW CLIENTS", "pgbouncer"],
        capture_output=True, text=True, timeout=10, check=True)
    return [line.split("|") for line in done.stdout.splitlines()]


StartApi = Callable[..., Awaitable[ApiProcess]]


@pytest.fixture
def pooled_api(start_api: StartApi, db_url: str, bouncer: Bouncer) -> StartApi:
    """``start_api`` with the pool through PgBouncer and the listener direct; the guarantee
    tests call it with the test's direct URL, as they call start_api."""

    async def start(url: str, env: dict[str, str] | None = None, **kwargs) -> ApiProcess:
        assert url == db_url
        return await start_api(bouncer.url(url), env={
            "XRATES_LISTEN_URL": url, "XRATES_STATEMENT_CACHE_SIZE": "0", **(env or {})}, **kwargs)

    return start


async def test_the_pool_goes_through_pgbouncer_and_the_listener_does_not(
        db_url, pg, bouncer, pooled_api) -> None:
    api = await pooled_api(db_url)
    assert (await api.client.put("/v1/rates/USD/EUR", json={"rate": "1.1"})).status_code == 201
    db = db_name(db_url)
    names = {row[-1] for row in show_clients(pg, bouncer) if row[2] == db}
    assert "xrates-api" in names and "xrates-listener" not in names, (bouncer.version, names)
    assert bouncer.version.startswith("PgBouncer 1.")


# --------------------------------------------------------------------------- the guarantees
async def test_push_refresh_through_pgbouncer(db_url, pooled_api) -> None:
    await guarantees.test_push_refresh_reaches_an_instance_that_never_read_the_key(db_url,
                                                                                  pooled_api)


async def test_sql_writes_and_deletes_are_pushed_through_pgbouncer(db_url, sql, pooled_api) -> None:
    await guarantees.test_sql_writes_and_deletes_are_pushed(db_url, sql, pooled_api)


async def test_convergence_through_pgbouncer(db_url, sql, pooled_api) -> None:
    await guarantees.test_concurrent_writers_and_readers_converge_on_every_instance(
        db_url, sql, pooled_api)


@pytest.fixture
async def gated_pooled(db_url: str, bouncer: Bouncer) -> AsyncIterator[guarantees.GatedStore]:
    """The race test's gated in-process store, its pool through PgBouncer."""
    pooled = bouncer.url(db_url)
    settings = util.load_settings({
        "DATABASE_URL": pooled, "XRATES_LISTEN_URL": db_url, "XRATES_STATEMENT_CACHE_SIZE": "0",
        "XRATES_CACHE_SIZE": "2", "XRATES_AUTO_MIGRATE": "0",
        "XRATES_HEARTBEAT_INTERVAL": "0.2", "XRATES_HEARTBEAT_TIMEOUT": "1.0"})
    store = guarantees.GatedStore(settings)
    await store.start(pooled)

    async def connected() -> bool:
        return store.listener_connected

    await wait_for(connected, 10, what="listener up")
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("evict", [False, True], ids=["newer-entry-cached", "newer-entry-evicted"])
async def test_stale_fill_race_through_pgbouncer(gated_pooled, sql, evict) -> None:
    await guarantees.test_a_read_that_raced_with_a_newer_change_never_overwrites_it(
        gated_pooled, sql, evict)

