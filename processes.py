"""xrates' own server processes, started on free loopback ports and stopped by their PID
(never by name): the one helper behind the benchmark's and the tests' API instances."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import util

ROOT = Path(__file__).resolve().parent


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any XRATES_ setting (so an instance gets only the
    settings it is given) and without a shared metrics directory."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    environment.update(extra or {})
    return environment


class ApiServer:
    """One real `python sanic_app.py` instance on a free port, its output in ``log_path``;
    ``root`` is the tree it runs from (another checkout, for the benchmark's A/B)."""

    def __init__(self, db_url: str, log_dir: Path, env: Mapping[str, str] | None = None,
                 workers: int = 1, host: str = "127.0.0.1", name: str | None = None,
                 prefix: Sequence[str] = (), quiet: bool = True, root: Path = ROOT) -> None:
        self.port = util.free_port()
        self.host = host
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"api-{name or self.port}.log"
        # Tests keep their logs short (no access log); the benchmark passes quiet=False so it
        # measures what a user gets by default.
        quiet_env = {"XRATES_ACCESS_LOG": "0"} if quiet else {}
        environment = clean_environment({"DATABASE_URL": db_url, "XRATES_AUTO_MIGRATE": "0",
                                         **quiet_env, **(env or {})})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "sanic_app.py", "--host", host, "--port", str(self.port),
             "--workers", str(workers)],
            cwd=root, env=environment, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signals reach only what we started
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop_process(self) -> None:
        """SIGTERM to the process we started (Sanic stops its own workers), SIGKILL after
        15 s, then anything left in the process group we created."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

    def server_errors(self) -> list[str]:
        """Lines showing a 500 or an unexpected traceback. asyncpg's pool logs a traceback
        when it cannot refill while PostgreSQL is down: expected, and not an error of ours."""
        errors, previous = [], ""
        for line in self.log().splitlines():
            if "status=500" in line or "event=server_error" in line or (
                    "Traceback" in line and "restore the pool connection floor" not in previous):
                errors.append(line)
            previous = line
        return errors
