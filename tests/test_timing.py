"""The stage timer: accumulation, nesting by name, and timed iteration."""

from __future__ import annotations

import time

from lens.timing import StageTimer, maybe_iterate, maybe_stage


def test_stages_accumulate_and_nest_at_the_first_slash():
    timer = StageTimer()
    for _ in range(2):
        with timer.stage("passes/pos/orig"):
            time.sleep(0.001)
    with timer.stage("load"):
        pass
    out = timer.as_dict()
    assert list(out) == ["passes", "load", "total"]
    assert list(out["passes"]) == ["pos/orig"]
    assert out["passes"]["pos/orig"] >= 0.002
    assert out["total"] >= out["passes"]["pos/orig"] + out["load"]


def test_start_stop_and_summary():
    timer = StageTimer()
    timer.start("write")
    timer.stop("write")
    assert timer.seconds("write") >= 0 and timer.seconds("never") == 0
    assert timer.summary().startswith("write ") and ", total " in timer.summary()


def test_iterate_times_only_the_producer():
    timer = StageTimer()

    def slow():
        for i in range(3):
            time.sleep(0.002)
            yield i

    seen = []
    for item in timer.iterate("produce", slow()):
        with timer.stage("consume"):
            seen.append(item)
    assert seen == [0, 1, 2]
    assert timer.seconds("produce") >= 0.006 > timer.seconds("consume")


def test_no_timer_is_a_no_op():
    with maybe_stage(None, "x"):
        pass
    assert list(maybe_iterate(None, "x", [1, 2])) == [1, 2]
