"""The next batches built on a background thread while the device runs the current step.

`prefetched(batches, start, depth)` iterates a step-indexed grain `MapDataset` from
`start`, in order, `depth` batches ahead (grain's threaded read; one thread: the order
and the values are those of `batches[step]`). `BatchTimes` counts what it costs: the
time each batch took to build (on the thread) and the time the loop waited for one,
which with prefetching is near zero once building a batch is faster than a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grain

DEPTH = 2  # batches built ahead: enough to hide one slow batch, little host memory


@dataclass
class BatchTimes:
    """Seconds spent building batches (`built`, `build_s`) and waiting for them in the
    loop (`waited`, `wait_s`); updated from the builder thread and the loop."""

    built: int = 0
    build_s: float = 0.0
    waited: int = 0
    wait_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def timed(self, make: Callable[[int], Any]) -> Callable[[int], Any]:
        """`make`, its time added to the build counters."""

        def run(step: int) -> Any:
            start = time.perf_counter()
            out = make(step)
            with self._lock:
                self.built += 1
                self.build_s += time.perf_counter() - start
            return out

        return run

    def summary(self) -> str:
        """One line: the mean build time per batch and the mean wait per step."""
        build = 1e3 * self.build_s / max(self.built, 1)
        wait = 1e3 * self.wait_s / max(self.waited, 1)
        return (f"batches: {build:.1f} ms each to build, ahead of the steps on a background thread; "
                f"the steps waited {wait:.1f} ms for one on average ({self.waited} steps)")


def prefetched(batches: grain.MapDataset, start: int, times: BatchTimes | None = None,
               depth: int = DEPTH) -> Iterator[Any]:
    """`batches[start]`, `batches[start + 1]`, ... built `depth` ahead on one thread;
    the time each `next` waits is added to `times`."""
    import grain  # lazy: grain takes ~1 s to import, and only the train loop's prefetch needs it

    it = iter(batches.slice(slice(start, None)).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=depth)))
    while True:
        begin = time.perf_counter()
        item = next(it)
        if times is not None:
            with times._lock:
                times.waited += 1
                times.wait_s += time.perf_counter() - begin
        yield item
