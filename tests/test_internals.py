"""internals.py: the private library internals xrates relies on, and the start-up check."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

import internals


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    env.update(extra)
    return env


def test_the_installed_libraries_pass_the_check() -> None:
    internals.check()


def test_rate_responses_send_the_header_lines_sanic_would() -> None:
    script = textwrap.dedent("""
        import json, model, sanic_app
        from sanic.response import HTTPResponse
        rate = model.make_rate("USD", "EUR", "0.9213", "ecb", "2026-11-21T16:00:00+00:00",
                               "2026-11-21T16:00:01+00:00", 123)
        out = []
        for how in ("hit", "miss", "bypass"):
            fast = sanic_app.rate_response(rate, how)
            fast.headers["content-length"] = len(rate.body)
            fast.headers["connection"] = "keep-alive"
            plain = HTTPResponse(rate.body, status=200, headers=dict(fast.headers),
                                 content_type=sanic_app.JSON_TYPE)
            out.append([sorted(fast.processed_headers) == sorted(plain.processed_headers),
                        fast.body == plain.body, fast.status])
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=_env())
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1]) == [[True, True, 200]] * 3


def test_an_api_refuses_to_start_when_sanic_encodes_headers_otherwise(tmp_path: Path) -> None:
    # Simulate a Sanic release that sends one more header line on every response.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        from sanic.response import HTTPResponse
        _original = HTTPResponse.processed_headers
        HTTPResponse.processed_headers = property(
            lambda self: [*_original.fget(self), (b"x-new", b"1")])
    """))
    run = subprocess.run([sys.executable, "sanic_app.py", "--port", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env=_env(PYTHONPATH=str(tmp_path), DATABASE_URL="postgresql://x@127.0.0.1:1/x"))
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("xrates: refusing to start: sanic:"), lines


def test_the_check_notices_a_histogram_that_counts_otherwise(monkeypatch) -> None:
    from prometheus_client.metrics import Histogram

    original = Histogram.observe
    monkeypatch.setattr(Histogram, "observe",
                        lambda self, amount, exemplar=None: original(self, amount * 2))
    with pytest.raises(internals.InternalsMismatch, match="prometheus_client"):
        internals.check()


def test_the_check_notices_sanic_framing_stream_chunks_otherwise(monkeypatch) -> None:
    from sanic.http.http1 import Http

    async def framed_otherwise(self, data: bytes, end_stream: bool) -> None:
        await self._send(b"%d\r\n%b\r\n" % (len(data), data))  # decimal, not hex

    monkeypatch.setattr(Http, "http1_response_chunked", framed_otherwise)
    with pytest.raises(internals.InternalsMismatch, match="chunks"):
        internals.check()


def test_a_chunk_writer_is_only_given_for_a_chunked_http11_stream() -> None:
    assert internals.chunk_writer(object(), 1024) is None  # not a streaming response


def test_the_check_refuses_an_interpreter_where_untracking_does_nothing(monkeypatch) -> None:
    import cache

    monkeypatch.setattr(cache, "untracked", lambda obj: obj)  # as if the C call had no effect
    with pytest.raises(internals.InternalsMismatch, match="PyObject_GC_UnTrack"):
        internals.check()


def test_the_check_notices_sanic_no_longer_stamping_the_handler_start(monkeypatch) -> None:
    from sanic.http.http1 import Http

    monkeypatch.setattr(Http, "__slots__", [s for s in Http.__slots__ if s != "perft0"])
    with pytest.raises(internals.InternalsMismatch, match="perft0"):
        internals.check()
    monkeypatch.undo()
    internals.check()
