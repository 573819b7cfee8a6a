"""perf.py's helpers (timing decorators, paired-batch statistics, the CLI), and the contracts
of the hot-path optimisations it measures. Fast, and no timed assertions: the benchmark
(`python perf.py bench`) is where speed is judged."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import perf

PROBE = logging.getLogger("test_perf.elapsed")  # propagates to caplog (xrates.* may not)


def elapsed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=elapsed" in r.getMessage()]


# --------------------------------------------------------------------------- aelapsed
async def test_aelapsed_logs_the_elapsed_time_and_keeps_the_result(caplog) -> None:
    caplog.set_level(logging.INFO, logger=PROBE.name)

    @perf.aelapsed(logger=PROBE)
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    assert await double(21) == 42
    assert double.__name__ == "double"  # functools.wraps: Sanic and OpenAPI see the handler
    (line,) = elapsed_lines(caplog)
    assert line.startswith("event=elapsed name=") and "double" in line
    assert float(line.rsplit("ms=", 1)[1]) >= 0


async def test_aelapsed_logs_also_when_the_call_raises(caplog) -> None:
    caplog.set_level(logging.INFO, logger=PROBE.name)

    @perf.aelapsed(name="boom", logger=PROBE)
    async def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await boom()
    assert [line.split(" ms=")[0] for line in elapsed_lines(caplog)] == ["event=elapsed name=boom"]


def test_aelapsed_refuses_a_plain_function() -> None:
    with pytest.raises(TypeError):
        perf.aelapsed(lambda: None)


# --------------------------------------------------------------------------- aprofiler
async def test_aprofiler_wraps_every_coroutine_method_and_nothing_else(caplog) -> None:
    caplog.set_level(logging.INFO, logger="xrates.perf")
    seen: dict[str, object] = {}

    class Base:
        def __init_subclass__(cls, **kwargs: object) -> None:  # like HTTPMethodView(attach=...)
            seen.update(kwargs)

    class View(Base, metaclass=perf.aprofiler, uri="/x"):
        async def get(self, request: object) -> str:
            return "got"

        @staticmethod
        async def ping() -> str:
            return "pong"

        def helper(self) -> str:
            return "plain"

    assert seen == {"uri": "/x"}  # class keyword arguments pass through
    assert getattr(View.get, "__aelapsed__", False)
    assert getattr(View.ping, "__aelapsed__", False)
    assert not hasattr(View.helper, "__aelapsed__")
    assert await View().get(None) == "got"
    assert await View.ping() == "pong"
    assert View().helper() == "plain"


def test_aprofiler_works_on_a_sanic_class_based_view() -> None:
    from sanic.views import HTTPMethodView

    class RatesView(HTTPMethodView, metaclass=perf.aprofiler):
        async def get(self, request: object) -> str:
            return "ok"

    assert getattr(RatesView.get, "__aelapsed__", False)
    assert callable(RatesView.as_view())


def test_sanic_app_profiles_its_handlers_only_when_xrates_profile_is_set() -> None:
    script = ("import sanic_app, util; app = sanic_app.create_app(util.load_settings()); "
              "print(sum(bool(getattr(r.handler, '__aelapsed__', False)) "
              "for r in app.router.routes))")
    counts = {}
    for value in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=_env(XRATES_PROFILE=value))
        assert out.returncode == 0, out.stderr
        counts[value] = int(out.stdout.split()[-1])
    assert counts["0"] == 0
    assert counts["1"] >= 10  # every route of ours


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("XRATES_")}
    return {**env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **extra}


# --------------------------------------------------------------------------- statistics
def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert perf.percentile(values, 0) == 1.0
    assert perf.percentile(values, 50) == 3.0
    assert perf.percentile(values, 100) == 5.0
    assert perf.percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_paired_ratio_cancels_noise_shared_by_the_two_batches_of_a_pair() -> None:
    # The machine's speed swings 3x from pair to pair, but within a pair both sides see the
    # same speed: the candidate is exactly 10% slower, so its throughput ratio is 1/1.1.
    swings = [1.0, 3.0, 0.5, 2.0, 1.5] * 40
    ceiling = [64e-6 * s for s in swings]
    hit = [64e-6 * 1.1 * s for s in swings]
    result = perf.paired_ratio(ceiling, hit, per_batch=64)
    assert result.ratio == pytest.approx(1 / 1.1)
    assert result.low <= result.ratio <= result.high
    assert result.pairs == 200
    assert result.baseline_us == pytest.approx(1.5)
    assert result.candidate_us == pytest.approx(1.65)


def test_paired_ratio_interval_brackets_the_median_of_noisy_pairs() -> None:
    import random

    rng = random.Random(7)
    a = [1.0 + rng.uniform(-0.05, 0.05) for _ in range(501)]
    b = [x * 0.95 * (1 + rng.uniform(-0.05, 0.05)) for x in a]  # candidate ~5% faster
    result = perf.paired_ratio(a, b)
    assert 1.03 < result.low <= result.ratio <= result.high < 1.08


def test_control_is_valid_only_within_two_percent_of_one() -> None:
    same = [1.0, 1.1, 0.9] * 10
    control = perf.paired_ratio(same, same)
    assert control.ratio == 1.0 and perf.control_valid(control)
    off = perf.paired_ratio(same, [x / 1.03 for x in same])
    assert off.ratio == pytest.approx(1.03) and not perf.control_valid(off)


def test_paired_ratio_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError):
        perf.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        perf.paired_ratio([], [])


def test_pair_keys_are_distinct_valid_pairs() -> None:
    pairs = perf.pair_keys(5000)
    assert len(set(pairs)) == 5000
    assert all(len(b) == len(q) == 3 and b.isupper() and q.isupper() and b != q for b, q in pairs)


def test_the_benchmark_talks_to_loopback_only() -> None:
    with pytest.raises(ValueError):
        perf.HttpConn("10.0.0.1", 80)


def _propagation_run(floor_p99: float, after_p99: float, first_poll: float) -> dict[str, object]:
    part = {"p50_ms": after_p99 / 2, "p99_ms": after_p99, "max_ms": after_p99 * 2}
    return {"floor": {"p50_ms": floor_p99 / 2, "p99_ms": floor_p99, "max_ms": floor_p99 * 2},
            "after_ack": part, "after_send": part, "write": part, "not_hit": 0,
            "first_poll_fraction": first_poll, "p99_vs_floor_p99": after_p99 / floor_p99}


def test_propagation_summary_takes_the_median_of_each_figure_over_runs() -> None:
    runs = [_propagation_run(0.2, 0.6, 0.9), _propagation_run(0.1, 0.5, 0.7),
            _propagation_run(0.4, 2.0, 0.8)]
    summary = perf.propagation_summary(runs)
    assert summary["floor"] == {"p50_ms": 0.1, "p99_ms": 0.2, "max_ms": 0.4}
    assert summary["after_ack"]["p99_ms"] == 0.6  # the median run, not the mean (1.03)
    assert summary["first_poll_fraction"] == 0.8
    assert summary["p99_vs_floor_p99"] == pytest.approx(5.0)
    assert summary["runs"] == runs


def test_the_wrk_ratios_are_the_median_of_each_rounds_own_ratio_with_quartiles() -> None:
    """A round's kinds run seconds apart: the machine drifting between rounds (the hit rounds
    fast, the read-through ones slow) must not make a ratio of medians from different rounds."""
    def kind(rps: float) -> dict[str, float]:
        return {"rps": rps, "p50_ms": 1000 / rps, "p99_ms": 4000 / rps, "max_ms": 9000 / rps}

    runs = []
    for i, ratio in enumerate([2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2]):
        speed = 1.0 + 0.2 * ((i * 5) % 9)  # each round on a differently fast machine
        hit = 9000 * speed
        runs.append({"ceiling": kind(hit / 0.9), "hit": kind(hit),
                     "read_through": kind(hit / ratio), "hit_vs_ceiling": 0.9,
                     "hit_vs_read_through": ratio})
    summary = perf.wrk_summary(runs)
    assert summary["hit_vs_read_through"] == 2.8
    assert summary["hit_vs_read_through_quartiles"] == (2.6, 3.0)
    assert summary["hit_vs_ceiling"] == pytest.approx(0.9)
    assert summary["hit"]["rps"] == statistics.median(run["hit"]["rps"] for run in runs)
    rows = {row[0]: row for row in perf.build_rows({"wrk": {**summary, "errors": 0}})}
    read_through = rows["read-through GET (`XRATES_CACHE_SIZE=0`), wrk"]
    assert "hit is 2.80x (middle half of 9 rounds: 2.60-3.00)" == read_through[2]
    assert read_through[4] == "NO"


# --------------------------------------------------------------------------- CLI
def test_bench_help_runs() -> None:
    out = subprocess.run([sys.executable, "perf.py", "bench", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--json", "--quick", "--only", "wrk"):
        assert option in out.stdout


def test_bench_rejects_an_unknown_phase() -> None:
    out = subprocess.run([sys.executable, "perf.py", "bench", "--only", "nonsense"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown phase" in out.stderr


def test_ab_refuses_a_directory_that_is_no_checkout(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "perf.py", "ab", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not a checkout of xrates" in out.stderr


def test_table_of_a_partial_run_names_what_was_measured() -> None:
    results = {"miss": {"p50_ms": 0.3, "p99_ms": 0.9}, "memory": {
        "bytes_per_rate": 700.0, "empty_rss_mb": 50.0, "full_rss_mb": 95.0}}
    table = perf.markdown_table(perf.build_rows(results))
    assert "miss GET" in table and "memory per cached rate" in table
    assert "bulk" not in table  # not measured: not shown


def test_the_bulk_stall_target_is_judged_on_the_instance_alone_on_its_core() -> None:
    # In a spread round the first instance has the API core to itself; the others share the
    # load core with PostgreSQL and the driver, so their longer stall is reported beside it.
    rounds = [{"stalls_s": [0.004, 0.009]}, {"stalls_s": [0.0045, 0.003]}]
    figures = perf.spread_stalls_ms(rounds)
    assert figures == pytest.approx({"spread_stall_max_ms": 4.5, "load_core_stall_max_ms": 9.0})
    rows = perf.build_rows({"bulk": {"p50_ms": 30.0, "p99_ms": 40.0, "stall_max_ms": 12.0,
                                     **figures}})
    judged = [row for row in rows if row[3] == perf.TARGETS["bulk_stall_ms"]]
    assert [(row[1], row[4]) for row in judged] == [("4.50 ms", "yes")]
    assert any(row[1] == "9.00 ms" and row[3] == "" for row in rows)


def test_batch_for_shrinks_a_batch_of_slow_requests_to_the_time_allowed() -> None:
    assert perf.batch_for(0.0002, 64, 0.05) == 64  # fast: the full batch
    assert perf.batch_for(0.004, 64, 0.05) == 8  # 12 x 4 ms fit in 50 ms: 8, a power of two
    assert perf.batch_for(0.003, 64, 0.05) == perf.batch_for(0.002, 64, 0.05) == 16
    assert perf.batch_for(0.001, 48, 0.05) == 48  # the full batch, a power of two or not
    assert perf.batch_for(0.8, 64, 0.05) == 1  # never fewer than one request
    assert perf.batch_for(0.0, 64, 0.05) == 64


def test_the_reads_phase_seeds_codes_no_other_phase_uses_and_pairs_only_a_pivot_joins(
        tmp_path) -> None:
    assert perf.PHASES.index("reads") == perf.PHASES.index("alternating") + 1
    bench_codes = {code for pair in perf.Bench(perf.BenchConfig(), tmp_path).pairs for code in pair}
    history_codes = {"X" + chr(65 + p // 26) + chr(65 + p % 26) for p in range(perf.HISTORY_PAIRS)}
    seeded = set(perf.READS_CODES) | {perf.READS_PIVOT}
    assert len(perf.READS_CODES) == len(set(perf.READS_CODES)) and perf.READS_PIVOT not in perf.READS_CODES
    assert not seeded & (bench_codes | history_codes)
    assert "USD" in perf.READS_CODES  # the latest route's base
    for src, dst in perf.READS_CONVERT:  # only READS_PIVOT -> code rows: no direct or inverse row
        assert src != dst and {src, dst} <= set(perf.READS_CODES)


def _reads(control: float, convert: float, latest: float) -> dict[str, object]:
    def part(ratio: float, batch: int) -> dict[str, object]:
        return {"ratio": ratio, "hit_us": 100.0, "candidate_us": 100.0 / ratio, "batch": batch}

    return {"control": control, "control_us": 50.0, "valid": perf.control_valid(
        perf.paired_ratio([1.0], [1.0 / control])), "convert": part(convert, 1),
        "latest": part(latest, 64)}


def test_reads_rows_judge_each_candidate_against_its_target_unless_the_control_is_off() -> None:
    rows = perf.reads_rows(_reads(1.01, 0.00081, 0.62))
    assert [r[3] for r in rows] == ["1.00 ± 0.02", ">= 0.8", ">= 0.5"]
    assert [r[4] for r in rows] == ["yes", "NO", "yes"]
    assert "/v1/convert" in rows[1][0] and "/v1/latest?base=USD" in rows[2][0]
    assert rows[1][1] == "123,456.8 vs 100.0 us/request (batches of 1)"
    assert [r[2] for r in rows] == ["1.010", "0.00081", "0.620"]
    assert perf.reads_rows(_reads(0.99, 0.85, 0.4))[1:] == [
        (rows[1][0], "117.6 vs 100.0 us/request (batches of 1)", "0.850", ">= 0.8", "yes"),
        (rows[2][0], "250.0 vs 100.0 us/request (batches of 64)", "0.400", ">= 0.5", "NO")]
    void = perf.reads_rows(_reads(1.05, 0.9, 0.9))
    assert [r[4] for r in void] == ["NO", "n/a", "n/a"]
    assert all(r[2].endswith("(void: control off)") for r in void[1:])
    assert perf.build_rows({"reads": _reads(1.0, 0.9, 0.9)}) == perf.reads_rows(_reads(1.0, 0.9, 0.9))
    assert perf.TARGETS["convert_pivot_vs_hit_alternating"] == ">= 0.8"
    assert perf.TARGETS["latest_vs_hit_alternating"] == ">= 0.5"


def _scale_level(listeners: int, p99_ms: float, commits_per_s: float) -> dict[str, object]:
    return {"listeners": listeners, "commits_per_s": commits_per_s, "catch_up_ms": 12.0,
            "propagation": perf.propagation_summary([_propagation_run(0.5, p99_ms, 1.0)])}


def test_scale_rows_give_propagation_then_the_commit_ceiling_per_listener_count() -> None:
    scale = {"writers": 4, "ceiling_s": 3.0, "clients": 103, "max_connections": 300,
             "by_listeners": [_scale_level(2, 1.0, 2500.0), _scale_level(20, 2.0, 1000.0),
                              _scale_level(100, 6.0, 250.0)]}
    rows = perf.scale_rows(scale)
    assert [r[0].split(":")[0].split(" (")[0] for r in rows] == [
        "propagation with 2 listeners", "propagation with 20 listeners",
        "propagation with 100 listeners", "notifying commits with 2 listeners",
        "notifying commits with 20 listeners", "notifying commits with 100 listeners"]
    assert [r[3:] for r in rows[:3]] == [("", ""), ("", ""), ("<= 5 ms", "NO")]  # judged at 100
    assert "p99 6.000" in rows[2][1] and rows[2][2] == "p99 12.00x floor"
    assert rows[3][1].startswith("2,500 commits/s") and rows[3][2] == "1.00 of 2 listeners"
    assert rows[5][2] == "0.10 of 2 listeners"
    assert all(r[3:] == ("", "") for r in rows[3:])
    fast = {**scale, "by_listeners": [_scale_level(n, 4.0, 100.0) for n in (2, 20, 100)]}
    assert perf.scale_rows(fast)[2][4] == "yes"
    assert perf.build_rows({"scale": scale}) == rows


async def test_notification_counts_wait_for_each_listening_connection() -> None:
    counts = perf.NotificationCounts(3)
    callbacks = [counts.callback(i) for i in range(3)]
    callbacks[0](None, 1, "xrates", "before the mark")
    counts.mark()
    loop = asyncio.get_running_loop()
    for delay, index in ((0.001, 0), (0.002, 1), (0.003, 0), (0.004, 1)):
        loop.call_later(delay, callbacks[index], None, 1, "xrates", "{}")
    # The first two connections listen; the third's count does not matter.
    assert await counts.caught_up(2, expected=2, timeout_s=10) == 2
    assert counts.received == [3, 2, 0]
    callbacks[0](None, 1, "xrates", "{}")
    assert await counts.caught_up(2, expected=3, timeout_s=0.01) == 2  # connection 1 is behind
    assert await counts.caught_up(0, expected=5, timeout_s=10) == 5  # no listener: nothing to wait for


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="moving processes between CPUs needs Linux and two CPUs")
def test_pinning_moves_every_thread_of_a_process_and_of_its_children() -> None:
    """The bulk phase moves an instance (Sanic's main process, its worker, their threads)."""
    # A parent with a thread of its own and a child process; both wait on stdin.
    script = ("import subprocess, sys, threading; threading.Thread(target=sys.stdin.read).start(); "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print(child.pid, flush=True); sys.stdin.read(); child.kill()")
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        tasks = perf.process_tree_tasks(parent.pid)
        assert child in tasks and parent.pid in tasks and len(tasks) >= 3  # the thread too
        target = max(os.sched_getaffinity(0))
        perf.Pinning().move(parent.pid, [target])
        assert all(os.sched_getaffinity(task) == {target} for task in tasks)
    finally:
        parent.communicate("", timeout=30)
