"""The README's curl sessions are true: every `$ ` command of its console blocks runs,
verbatim but for the two ports, against a real `python3 dev.py up`, and prints output of
the shape the README shows (same JSON keys, same status codes and header names)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, answers_200, start_up, stop_up, wait_for

import util

MARK = "@@xrates-readme-command@@"


def console_blocks(readme: str) -> list[list[tuple[str, list[str]]]]:
    """Each ```console block as [(command, expected output lines)]."""
    blocks = []
    for body in re.findall(r"```console\n(.*?)```", readme, re.S):
        steps: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif line.strip() and not line.startswith("#") and steps:
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


def same_shape(expected: list[str], actual: list[str]) -> str | None:
    """Why the actual output does not have the README's shape, or None."""
    if not expected:
        return None
    if len(expected) != len(actual):
        return f"{len(actual)} lines, README shows {len(expected)}"
    for want, got in zip(expected, actual, strict=True):
        if want.startswith("{"):
            want_doc, got_doc = json.loads(want), json.loads(got)
            if set(want_doc) != set(got_doc):
                return f"keys {sorted(got_doc)} != {sorted(want_doc)}"
            if "error" in want_doc and want_doc != got_doc:
                return f"error {got_doc} != {want_doc}"
        elif want.startswith("HTTP/") or re.fullmatch(r"\d{3}", want):
            if want != got:
                return f"{got!r} != {want!r}"
        elif ":" in want and want.split(":")[0].lower() != got.split(":")[0].lower():
            return f"header {got!r} != {want!r}"
    return None


def test_console_blocks_are_found() -> None:
    blocks = console_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and sum(len(b) for b in blocks) >= 12


@pytest.mark.slow
async def test_readme_curl_session_runs_verbatim(tmp_path: Path) -> None:
    ports = [util.free_port(), util.free_port()]
    proc = await start_up(tmp_path / "data", ports, tmp_path / "up.log")
    try:
        for port in ports:
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
            await wait_for(lambda c=client: answers_200(c), 60, 0.1, f"instance :{port}")
            await client.aclose()
        for block in console_blocks((ROOT / "README.md").read_text()):
            script = "set -u\n"
            for command, _ in block:
                command = command.replace("localhost:8000", f"localhost:{ports[0]}")
                command = command.replace("localhost:8001", f"localhost:{ports[1]}")
                script += f"echo {MARK}\n{command}\n"
            shell = await asyncio.create_subprocess_exec(
                "bash", "-c", script, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(shell.communicate(), 60)
            assert shell.returncode == 0, err.decode()
            outputs = out.decode().split(MARK + "\n")[1:]
            assert len(outputs) == len(block)
            for (command, expected), actual in zip(block, outputs, strict=True):
                problem = same_shape(expected, actual.splitlines())
                assert problem is None, f"$ {command}\n{problem}\n{actual}"
    finally:
        await stop_up(proc)
        util.EmbeddedPostgres(tmp_path / "data").stop("immediate")
