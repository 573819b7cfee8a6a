"""The operator's commands: schema, the whole service in one terminal, the embedded server, a
fleet-wide cache flush.

    python admin.py migrate     apply triggers.sql (idempotent, under an advisory lock)
    python admin.py up          embedded PostgreSQL + updater + API on :8000 and :8001
    python admin.py pg          start the embedded PostgreSQL and print its URL
    python admin.py flush       make every API instance drop its cache (one NOTIFY)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys

import asyncpg

import model
import updater
from util import (
    ROOT,
    SCHEMA_PATH,
    EmbeddedPostgres,
    Settings,
    connect,
    database_url,
    migrate,
    redact_url,
    settings_or_exit,
    setup_logging,
)

log = logging.getLogger("xrates.admin")
DEMO_INTERVAL_S = 10  # `up` with only the demo source and no XRATES_INTERVAL


async def flush_caches(url: str) -> int:
    """Send one flush notification: every API instance drops its cache. Its version."""
    conn = await connect(url, "xrates-admin")
    try:
        row = await conn.fetchrow(model.FLUSH_CACHES, model.CHANNEL)
    finally:
        await conn.close()
    return row["version"]


# --------------------------------------------------------------------------- demo history
DEMO_BACKFILL_DAYS = 90


async def backfill_demo_once(url: str, settings: Settings) -> None:
    """`up`: give the offline demo a deterministic 90-day history the first time (when it has
    none), so the history and Frankfurter routes answer offline from the first minute."""
    conn = await connect(url, updater.APPLICATION_NAME)
    try:
        if await model.has_history(conn, "demo"):
            return
    finally:
        await conn.close()
    log.info("event=demo_backfill days=%d", DEMO_BACKFILL_DAYS)
    await updater.backfill(dataclasses.replace(settings, auto_migrate=False), url,
                           DEMO_BACKFILL_DAYS, ["demo"])


# --------------------------------------------------------------------------- supervisor
def _up(args: argparse.Namespace) -> int:
    """Run the whole service in the foreground; Ctrl-C stops everything."""
    settings = settings_or_exit()
    setup_logging(settings)
    embedded = None
    if settings.database_url:
        url = settings.database_url
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        url = embedded.start()
        log.info("event=embedded_postgres_up data_dir=%s port=%s", embedded.data_dir,
                 embedded.port)
    asyncio.run(migrate(url))
    if "demo" in settings.sources:
        asyncio.run(backfill_demo_once(url, settings))
    env = {**os.environ, "DATABASE_URL": url, "XRATES_AUTO_MIGRATE": "0"}
    if settings.sources == ("demo",) and not os.environ.get("XRATES_INTERVAL"):
        # The offline demo walks one step per interval: move visibly while you watch.
        env["XRATES_INTERVAL"] = str(DEMO_INTERVAL_S)
    commands = [[sys.executable, "updater.py"]] if (ROOT / "updater.py").exists() else []
    commands += [[sys.executable, "sanic_app.py", "--host", args.host, "--port", str(port)]
                 for port in args.ports]
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(_signum=None, _frame=None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for command in commands:
            # Own process group: Ctrl-C reaches only us; we stop the children in order.
            children.append(subprocess.Popen(command, cwd=ROOT, env=env,
                                             start_new_session=True))
            log.info("event=started pid=%d command=%r", children[-1].pid, " ".join(command[1:]))
        while not stopping and all(child.poll() is None for child in children):
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[0].wait(0.2)
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if embedded is not None:
            embedded.stop()
            log.info("event=embedded_postgres_down")
    failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python admin.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply triggers.sql")
    up = sub.add_parser("up", help="run the whole service in the foreground")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--ports", type=int, nargs="+", default=[8000, 8001])
    sub.add_parser("pg", help="start the embedded PostgreSQL and print its URL")
    sub.add_parser("flush", help="make every API instance drop its cache (after writes that "
                                 "bypassed the triggers)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _up(args)
    settings = settings_or_exit()
    setup_logging(settings)
    if args.command == "pg":
        print(EmbeddedPostgres(settings.data_dir).start())
        return 0
    if args.command == "flush":
        url = database_url(settings)
        try:
            version = asyncio.run(flush_caches(url))
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            print(f"xrates: flush not sent: {type(exc).__name__}: {exc} "
                  f"(database {redact_url(url)})", file=sys.stderr)
            return 1
        print(f"flush sent: every API instance drops its cache (version {version})")
        return 0
    asyncio.run(migrate(database_url(settings)))
    log.info("event=migrated schema=%s", SCHEMA_PATH.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
