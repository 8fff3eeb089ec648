"""The train batches built ahead on a thread (`mmpo_jax.data.prefetch`): the same batches
in the same order as indexing them, and a loop that no longer waits for a batch whose
building is slower than nothing but faster than a step."""

from __future__ import annotations

import time

import grain
import numpy as np

from mmpo_jax.data.prefetch import BatchTimes, prefetched


def _slow_batches(times: BatchTimes, build_s: float) -> grain.MapDataset:
    def make(step: int) -> np.ndarray:
        time.sleep(build_s)  # stands for collation; a sleep leaves the 2 cores to the consumer
        return np.full((2, 3), step, np.int32)

    return grain.MapDataset.range(10_000).map(times.timed(make))


def test_prefetched_batches_are_the_indexed_ones_in_order():
    times = BatchTimes()
    ds = _slow_batches(times, 0.0)
    feed = prefetched(ds, 7, times)
    for step in range(7, 17):
        np.testing.assert_array_equal(next(feed), ds[step])


def test_the_loop_stops_waiting_for_batches_built_ahead():
    """Building a batch takes 40 ms and a step 80 ms: indexed in the loop, each step
    waits the whole 40 ms; prefetched, only the first does (the counters say so)."""
    build, step = 0.04, 0.08
    direct = BatchTimes()
    ds = _slow_batches(direct, build)
    for i in range(8):
        begin = time.perf_counter()
        ds[i]
        direct.waited += 1
        direct.wait_s += time.perf_counter() - begin
        time.sleep(step)
    ahead = BatchTimes()
    feed = prefetched(_slow_batches(ahead, build), 0, ahead)
    next(feed)  # the first batch is waited for either way
    ahead.waited, ahead.wait_s = 0, 0.0
    for _ in range(8):
        next(feed)
        time.sleep(step)
    assert direct.wait_s / direct.waited > 0.9 * build
    assert ahead.wait_s / ahead.waited < 0.25 * build, ahead.summary()
    assert ahead.build_s / ahead.built > 0.9 * build  # the batches still cost what they cost
    assert "ms each to build" in ahead.summary()
