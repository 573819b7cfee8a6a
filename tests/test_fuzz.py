"""A schema-driven fuzzer (schemathesis, every check) against a real API's /openapi.json.

The document must be exact, so the fuzzer finds nothing: no server error and no mismatch of
any kind (it found 23 distinct ones at first). The rules JSON Schema cannot state are applied
to its valid examples by tests/fuzz_hooks.py; everything else is the document's job."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import asyncpg
import pytest

# Fixed, so a run is reproducible and bounded (~30 s on 2 busy cores).
MAX_EXAMPLES = 25
SEED = 20261201


async def seed_rows(url: str) -> None:
    """A few rows, so reads and deletes also reach their 200/204/304 answers."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("INSERT INTO rate (base, quote, rate, source, as_of) VALUES "
                           "('USD', 'EUR', 0.92, 'manual', now()), "
                           "('EUR', 'GBP', 0.85, 'ecb', now())")
    finally:
        await conn.close()


ROOT = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "fuzz_hooks.py"
_FAILURE_LINE = re.compile(r"^\s*\S+\s+(ST\d+|\S+) (.+): (\d+)$")


@pytest.mark.timeout(180)
async def test_the_fuzzer_finds_no_server_error_and_no_new_mismatch(db_url: str, start_api,
                                                                     tmp_path: Path) -> None:
    await seed_rows(db_url)
    api = await start_api(db_url)
    report = tmp_path / "report.json"
    # Kept beside the report: the document the fuzzer read.
    (tmp_path / "openapi.json").write_bytes((await api.client.get("/openapi.json")).content)
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{api.base_url}/openapi.json",
           "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
           "--workers", "1", "--request-timeout", "10", "--no-color",
           # Documented as endless: a fuzzer's request would never finish.
           "--exclude-path", "/v1/stream",
           "--report", "json", "--report-json-path", str(report)]
    # One worker: the order of requests (and so the database state each one meets) is fixed.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=env,
                                                cwd=tmp_path)  # its cache of earlier runs too
    out, _ = await asyncio.wait_for(proc.communicate(), 150)
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert "Test cases:" in text, text[-5000:]  # it ran to its summary
    summary = text[text.rindex("Failures:"):] if "Failures:" in text else ""
    failures = {m.group(2): int(m.group(3)) for line in summary.splitlines()
                if (m := _FAILURE_LINE.match(line))}
    assert not [name for name in failures if "server error" in name.lower()], text[-20000:]
    assert not failures, (failures, text[-20000:])
    assert proc.returncode == 0, text[-20000:]  # no errors either (e.g. a hook rejecting all)
