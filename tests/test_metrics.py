"""metrics.py: what the worker measures about itself."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import Histogram

import metrics


def test_gc_pauses_are_timed_per_generation_and_the_callback_removed() -> None:
    callbacks = len(gc.callbacks)
    pauses = metrics.GcPauses()
    pauses.install()
    assert len(gc.callbacks) == callbacks + 1
    try:
        garbage = [[i] for i in range(50_000)]  # tracked objects: a full collection walks them
        gc.collect(2)
        assert pauses.longest[2] > 0
        assert pauses.longest[2] < 5.0  # seconds: a timer that broke would be absurd
        del garbage
    finally:
        pauses.uninstall()
    assert len(gc.callbacks) == callbacks
    before = pauses.longest[2]
    gc.collect(2)
    assert pauses.longest[2] == before  # uninstalled: no more timing


def test_request_latency_counted_in_bulk_equals_observing_each_request() -> None:
    durations = [0.00005, 0.0001, 0.0003, 0.0009, 0.004, 0.2, 3.0, 0.0001]
    reference = Histogram("reference", "r", ["route", "status"], registry=None,
                          buckets=metrics.LATENCY_BUCKETS_S)
    for seconds in durations:
        metrics.observe_request("test_metrics", 200, seconds)
        reference.labels("test_metrics", "200").observe(seconds)
    metrics.flush_requests()

    def samples(histogram: Histogram) -> dict[tuple[str, str], float]:
        (family,) = histogram.collect()
        return {(s.name.rsplit("_", 1)[-1], s.labels.get("le", "")): s.value
                for s in family.samples
                if s.labels.get("route") == "test_metrics" and not s.name.endswith("_created")}

    ours = samples(metrics.REQUEST_LATENCY)
    theirs = samples(reference)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key
