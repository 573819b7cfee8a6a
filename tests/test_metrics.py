"""metrics.py: what the worker measures about itself."""

from __future__ import annotations

import gc

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
