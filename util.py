"""Configuration (one frozen Settings), connections, logging and the embedded PostgreSQL.

The operator's commands (`python admin.py migrate|up|pg|flush`) are admin.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

import internals
from sources import FEEDS, SOURCE_NAMES

ROOT = Path(__file__).resolve().parent
SCHEMA_PATH = ROOT / "triggers.sql"
SCHEMA_LOCK_KEY = 7_823_011_001  # pg_advisory_lock key serialising schema applies
KNOWN_SOURCES = SOURCE_NAMES  # every name XRATES_SOURCES and POST /v1/updates accept
# Sources with a multi-day endpoint (--backfill), so an XRATES_<SOURCE>_HISTORY_URL.
HISTORY_SOURCES = tuple(name for name, feed in FEEDS.items() if feed.history_requests)

log = logging.getLogger("xrates.util")


# --------------------------------------------------------------------------- settings
class ConfigError(ValueError):
    """Bad configuration: the process stops at start with one clear line (exit 2)."""


@dataclass(frozen=True)
class Settings:
    """Everything read from the environment, once. Build with ``load_settings(environ)``."""

    database_url: str | None = None
    listen_url: str | None = None  # the listener's own URL (direct, past any pooler)
    data_dir: Path = Path(".data")
    cache_size: int = 65536
    warm_refill: bool = True  # after a flush, one bulk read refills the cache before /ready
    api_token: str | None = field(default=None, repr=False)
    sources: tuple[str, ...] = ("demo",)
    interval_s: float = 600.0
    source_urls: Mapping[str, str] = field(default_factory=dict)
    auto_migrate: bool = True
    max_jump: Decimal = Decimal("0.5")
    fetch_timeout_s: float = 10.0
    fetch_attempts: int = 3
    db_timeout_s: float = 2.0
    pool_size: int = 10
    statement_cache_size: int = 100  # asyncpg's default; 0 behind PgBouncer < 1.21 (transaction)
    heartbeat_s: float = 0.4
    heartbeat_timeout_s: float = 1.4
    access_log: bool = False  # as Sanic's own default; /metrics counts every request
    log_format: str = "text"
    profile: bool = False
    # XRATES_<SOURCE>_HISTORY_URL: like source_urls, for backfill requests (omitted from repr:
    # an override may carry credentials).
    history_urls: Mapping[str, str] = field(default_factory=dict)
    frankfurter_source: str = "demo"  # XRATES_FRANKFURTER_SOURCE: behind the Frankfurter routes
    stream_queue: int = 256  # events a stream may fall behind before it is resynced
    stream_max: int = 1000  # open streams per worker (503 beyond)

    def __repr__(self) -> str:  # never print secrets (token, URL password)
        return (
            f"Settings(database_url={redact_url(self.database_url)!r}, "
            f"listen_url={redact_url(self.listen_url)!r}, "
            f"data_dir={str(self.data_dir)!r}, cache_size={self.cache_size}, "
            f"warm_refill={self.warm_refill}, "
            f"api_token={'set' if self.api_token else 'unset'}, sources={self.sources}, "
            f"interval_s={self.interval_s}, auto_migrate={self.auto_migrate}, "
            f"max_jump={self.max_jump}, db_timeout_s={self.db_timeout_s}, "
            f"statement_cache_size={self.statement_cache_size}, "
            f"frankfurter_source={self.frankfurter_source!r})"
        )


def redact_url(url: str | None) -> str | None:
    """The URL with its password replaced by ***."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


Number = TypeVar("Number", int, float)


def _number(env: Mapping[str, str], name: str, default: Number, parse: Callable[[str], Number],
            kind: str, fits: Callable[[Number], bool], bound: str) -> Number:
    """A numeric setting: `default` when unset or blank, else `parse` of it, which must be
    `kind` and satisfy `fits` (described as `bound` in the error)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from None
    if not fits(value):
        raise ConfigError(f"{name}={raw!r} must be {bound}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, int, "an integer", lambda value: value >= minimum,
                   f">= {minimum}")


def _float(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    return _number(env, name, default, float, "a number",
                   lambda value: value >= minimum and value != float("inf"),
                   f"a finite number >= {minimum}")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} must be 0 or 1")


def _database_url(env: Mapping[str, str], name: str = "DATABASE_URL") -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or parts.query):
        raise ConfigError(
            f"{name} must look like postgresql://user:pass@host:port/db "
            f"(got scheme {parts.scheme!r})"
        )
    return raw


def _sources(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("XRATES_SOURCES", "demo")
    names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
    if not names:
        raise ConfigError("XRATES_SOURCES is empty")
    unknown = [n for n in names if n not in KNOWN_SOURCES]
    if unknown:
        raise ConfigError(
            f"XRATES_SOURCES names unknown source(s) {', '.join(unknown)}; "
            f"known: {', '.join(KNOWN_SOURCES)}"
        )
    if len(set(names)) != len(names):
        raise ConfigError("XRATES_SOURCES lists a source twice")
    return names


def _frankfurter_source(env: Mapping[str, str], sources: tuple[str, ...]) -> str:
    """XRATES_FRANKFURTER_SOURCE: any known source (its history may come from a backfill
    alone); default the first of XRATES_SOURCES. Never `manual`."""
    raw = env.get("XRATES_FRANKFURTER_SOURCE", "").strip().lower()
    if not raw:
        return sources[0]
    if raw not in KNOWN_SOURCES:
        raise ConfigError(f"XRATES_FRANKFURTER_SOURCE names unknown source {raw!r}; "
                          f"known: {', '.join(KNOWN_SOURCES)}")
    return raw


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the configuration once. Raises ConfigError with one clear sentence."""
    env = os.environ if env is None else env
    try:
        max_jump = Decimal(env.get("XRATES_MAX_JUMP", "0.5").strip() or "0.5")
    except InvalidOperation:
        raise ConfigError("XRATES_MAX_JUMP is not a number") from None
    if not max_jump.is_finite() or max_jump <= 0:
        raise ConfigError("XRATES_MAX_JUMP must be a positive number")
    token = env.get("XRATES_API_TOKEN", "") or None
    log_format = env.get("XRATES_LOG_FORMAT", "text").strip().lower() or "text"
    if log_format not in ("text", "json"):
        raise ConfigError("XRATES_LOG_FORMAT must be text or json")
    urls = {
        name: env[f"XRATES_{name.upper()}_URL"]
        for name in KNOWN_SOURCES
        if env.get(f"XRATES_{name.upper()}_URL")
    }
    history_urls = {
        name: env[f"XRATES_{name.upper()}_HISTORY_URL"]
        for name in HISTORY_SOURCES
        if env.get(f"XRATES_{name.upper()}_HISTORY_URL")
    }
    sources = _sources(env)
    return Settings(
        history_urls=history_urls,
        frankfurter_source=_frankfurter_source(env, sources),
        database_url=_database_url(env),
        listen_url=_database_url(env, "XRATES_LISTEN_URL"),
        data_dir=Path(env.get("XRATES_DATA_DIR", "").strip() or ".data"),
        cache_size=_int(env, "XRATES_CACHE_SIZE", 65536),
        warm_refill=_bool(env, "XRATES_WARM_REFILL", True),
        api_token=token,
        sources=sources,
        interval_s=_float(env, "XRATES_INTERVAL", 600.0, 0.1),
        source_urls=urls,
        auto_migrate=_bool(env, "XRATES_AUTO_MIGRATE", True),
        max_jump=max_jump,
        fetch_timeout_s=_float(env, "XRATES_FETCH_TIMEOUT", 10.0, 0.01),
        fetch_attempts=_int(env, "XRATES_FETCH_ATTEMPTS", 3, 1),
        db_timeout_s=_float(env, "XRATES_DB_TIMEOUT", 2.0, 0.01),
        pool_size=_int(env, "XRATES_POOL_SIZE", 10, 1),
        statement_cache_size=_int(env, "XRATES_STATEMENT_CACHE_SIZE", 100),
        heartbeat_s=_float(env, "XRATES_HEARTBEAT_INTERVAL", 0.4, 0.01),
        heartbeat_timeout_s=_float(env, "XRATES_HEARTBEAT_TIMEOUT", 1.4, 0.05),
        access_log=_bool(env, "XRATES_ACCESS_LOG", False),
        log_format=log_format,
        profile=_bool(env, "XRATES_PROFILE", False),
        stream_queue=_int(env, "XRATES_STREAM_QUEUE", 256, 1),
        stream_max=_int(env, "XRATES_STREAM_MAX", 1000, 0),
    )


def settings_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    """load_settings, or print the one line that says what is wrong and exit 2."""
    try:
        return load_settings(env)
    except ConfigError as exc:
        print(f"xrates: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line; Sanic's access records keep their fields."""

    ACCESS_FIELDS = ("host", "request", "status", "byte", "duration")

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for name in self.ACCESS_FIELDS:
            if name in record.__dict__:
                doc[name] = record.__dict__[name]
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def sanic_log_config(settings: Settings) -> dict | None:
    """Sanic's own loggers (server, errors, access) in JSON too when XRATES_LOG_FORMAT=json;
    None keeps Sanic's defaults."""
    if settings.log_format != "json":
        return None
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": sys.stderr}
    names = ("sanic.root", "sanic.error", "sanic.access", "sanic.server", "sanic.websockets")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": {name: {"level": "INFO", "handlers": ["json"], "propagate": False}
                    for name in names},
    }


def setup_logging(settings: Settings) -> None:
    """One line per event; ``XRATES_LOG_FORMAT=json`` for machine-readable lines."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s")
        )
    root = logging.getLogger("xrates")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


# --------------------------------------------------------------------------- embedded PostgreSQL
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedPostgresError(RuntimeError):
    """initdb or pg_ctl failed; the message carries what they said."""


class EmbeddedPostgres:
    """A PostgreSQL server from the pip-installed ``pgserver`` binaries, on 127.0.0.1.

    Started with ``pg_ctl`` (so the postmaster outlives no one by accident: ``stop()``
    signals exactly the PID in its own ``postmaster.pid``). As root it runs as the
    unprivileged user ``pgserver``, which PostgreSQL requires.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, durable: bool = True,
                 max_connections: int | None = 300):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.durable = durable
        self.max_connections = max_connections  # None: PostgreSQL's default (and lock table)
        self.bin = internals.postgres_bin_path()
        self._user = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            self._user = "pgserver"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [str(self.bin / args[0]), *args[1:]],
                user=self._user, check=True, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.CalledProcessError as exc:
            # Say why: initdb and pg_ctl explain themselves on stderr/stdout.
            said = (exc.stderr or exc.stdout or "").strip()[-800:]
            raise EmbeddedPostgresError(f"{args[0]} exited with {exc.returncode}: {said}") from exc

    def _prepare_permissions(self) -> None:
        if self._user is None:
            return
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin, 0o055)
        ensure_folder_permissions(self.bin.parent / "lib", 0o044)
        entry = pwd.getpwnam(self._user)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def running_pid(self) -> int | None:
        """The postmaster's PID if this data directory's server is running."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
            return None
        self.port = port
        return pid

    def start(self) -> str:
        """Initialise the data directory if new, start the server unless running; the URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--locale=C")
        if self.running_pid() is not None:
            return self.url
        if self.port is None:
            self.port = free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        if self.max_connections is not None:
            options += f" -c max_connections={self.max_connections}"
        if not self.durable:  # tests: the data is thrown away, speed matters
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-o", options,
                  "-l", str(self.data_dir / "postgres.log"), "start", timeout=90)
        self.running_pid()
        return self.url

    def stop(self, mode: str = "fast") -> None:
        """Stop this data directory's server (by the PID in its postmaster.pid)."""
        if self.running_pid() is None:
            return
        with contextlib.suppress(EmbeddedPostgresError):
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", mode, "stop",
                      timeout=90)


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the embedded server's (started if it is not running)."""
    if settings.database_url:
        return settings.database_url
    return EmbeddedPostgres(settings.data_dir).start()


# --------------------------------------------------------------------------- connections
async def connect(url: str, application_name: str, timeout_s: float = 5.0) -> asyncpg.Connection:
    """One connection that names itself in pg_stat_activity."""
    return await asyncpg.connect(
        url, timeout=timeout_s, server_settings={"application_name": application_name}
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (a round trip on every release): pool
    connections never LISTEN, SET or hold session locks, and one released inside a
    transaction is closed by its user (model.Store._call), not rolled back here."""


async def create_pool(url: str, settings: Settings, application_name: str = "xrates-api"):
    """The instance's pool. Every query is bounded by ``db_timeout_s`` (overload → fast 503).

    No connection is opened up front (min_size 0), so an instance can start while its
    database is still down and answer 503 until it comes. ``statement_cache_size`` 0 makes
    asyncpg use unnamed statements only, which a transaction-pooling PgBouncer older than 1.21
    (no protocol-level prepared statements) needs."""
    return await asyncpg.create_pool(
        url,
        min_size=0,
        max_size=settings.pool_size,
        statement_cache_size=settings.statement_cache_size,
        command_timeout=settings.db_timeout_s,
        timeout=settings.db_timeout_s,
        server_settings={"application_name": application_name},
        reset=_keep_session,
    )


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Apply triggers.sql; concurrent starts serialise on an advisory lock."""
    sql = SCHEMA_PATH.read_text()
    await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK_KEY)
    try:
        await conn.execute(sql)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK_KEY)


async def migrate(url: str) -> None:
    conn = await connect(url, "xrates-migrate")
    try:
        await apply_schema(conn)
    finally:
        await conn.close()
