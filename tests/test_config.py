"""Configuration: read once into a frozen Settings; bad values stop a process at start with
one clear line and exit code 2; secrets never appear in its repr."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest
from conftest import ROOT

import util


def test_defaults_match_the_contract() -> None:
    settings = util.load_settings({})
    assert settings.database_url is None
    assert str(settings.data_dir) == ".data"
    assert settings.cache_size == 65536
    assert settings.api_token is None
    assert settings.sources == ("demo",)
    assert settings.interval_s == 600
    assert settings.auto_migrate is True
    assert settings.max_jump == Decimal("0.5")
    assert settings.db_timeout_s == 2.0


def test_settings_are_frozen_and_parsed() -> None:
    settings = util.load_settings({
        "DATABASE_URL": "postgresql://u:pw@db:5432/x", "XRATES_CACHE_SIZE": "0",
        "XRATES_SOURCES": "ECB, nbu", "XRATES_INTERVAL": "30", "XRATES_AUTO_MIGRATE": "0",
        "XRATES_ECB_URL": "http://127.0.0.1:9/ecb.xml", "XRATES_MAX_JUMP": "0.25"})
    assert settings.cache_size == 0
    assert settings.sources == ("ecb", "nbu")
    assert settings.source_urls == {"ecb": "http://127.0.0.1:9/ecb.xml"}
    assert settings.auto_migrate is False
    assert settings.max_jump == Decimal("0.25")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cache_size = 5  # type: ignore[misc]


def test_repr_hides_secrets() -> None:
    settings = util.load_settings({"DATABASE_URL": "postgresql://u:hunter2@db/x",
                                   "XRATES_LISTEN_URL": "postgresql://u:hunter3@db/x",
                                   "XRATES_API_TOKEN": "tok-123"})
    text = repr(settings)
    assert "hunter2" not in text and "hunter3" not in text and "tok-123" not in text
    assert "***" in text and "api_token=set" in text


@pytest.mark.parametrize(("name", "value"), [
    ("DATABASE_URL", "mysql://db/x"),
    ("DATABASE_URL", "postgresql://db:notaport/x"),
    ("XRATES_LISTEN_URL", "http://db/x"),
    ("XRATES_CACHE_SIZE", "-1"),
    ("XRATES_CACHE_SIZE", "lots"),
    ("XRATES_SOURCES", "ecb,nosuch"),
    ("XRATES_SOURCES", "ecb,ecb"),
    ("XRATES_INTERVAL", "0"),
    ("XRATES_INTERVAL", "inf"),
    ("XRATES_MAX_JUMP", "-0.1"),
    ("XRATES_MAX_JUMP", "NaN"),
    ("XRATES_AUTO_MIGRATE", "maybe"),
    ("XRATES_LOG_FORMAT", "xml"),
])
def test_bad_values_are_rejected_with_the_name(name: str, value: str) -> None:
    with pytest.raises(util.ConfigError) as raised:
        util.load_settings({name: value})
    assert name in str(raised.value)


@pytest.mark.parametrize("script", [["sanic_app.py"], ["updater.py", "--once"],
                                    ["admin.py", "migrate"]])
def test_processes_stop_at_start_with_one_line_and_exit_2(script: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    env.update({"XRATES_CACHE_SIZE": "-5", "DATABASE_URL": "postgresql://127.0.0.1:9/x"})
    result = subprocess.run([sys.executable, *script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["xrates: configuration error: XRATES_CACHE_SIZE='-5' must be >= 0"]


async def test_json_logs_are_one_object_per_line(db_url, start_api) -> None:
    api = await start_api(db_url, env={"XRATES_LOG_FORMAT": "json", "XRATES_ACCESS_LOG": "1"})
    await api.client.get("/v1/rates/USD/EUR")
    await api.client.put("/v1/rates/USD/EUR", json={"rate": "NaN"})
    await api.stop()
    records = [json.loads(line) for line in api.log().splitlines() if line.strip()]
    assert {"ts", "level", "logger", "pid", "msg"} <= set(records[0])
    access = [r for r in records if r["logger"] == "sanic.access"]
    assert {(r["request"].split()[0], r["status"]) for r in access} >= {("GET", 404), ("PUT", 422)}
    assert any("event=listener_up" in r["msg"] for r in records)
