"""A watchdog for hung runs: a thread that dumps every thread's stack and exits the process
when a step takes far longer than usual.

A hung collective, device or input pipeline blocks the training loop forever without an error;
a scheduler then only sees a job that stopped writing metrics. The loop reports progress each
time it fetches metrics (`progress(steps)`: the steps done since the last report, which is
when the host waits for the device, as steps are dispatched asynchronously). Once `warmup`
steps have been timed (the first report, which holds compilation, is never timed), a wait
longer than `multiple` times the median step time, times the most steps one report has
covered (the host waits for `log_every` steps at a time), and never less than `MIN_SECONDS`,
is a hang: stacks go to stderr and the process exits `EXIT_CODE` at once (`os._exit`: a hung
thread would keep a normal exit waiting). Checkpoint saves and checked steps pause it.
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_CODE = 76
MIN_SECONDS = 30.0  # what a healthy step can take in passing (a GC pause, a slow disk read)
_SAMPLES = 100  # recent step times the median is taken over


class Watchdog:
    """Call `progress(steps)` at each metrics fetch; `close()` at the end of the loop.
    `clock` is the time source (seconds)."""

    def __init__(
        self,
        multiple: float,
        warmup: int = 5,
        poll_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.multiple = multiple
        self.warmup = warmup
        self._poll = poll_seconds
        self._clock = clock
        self._times: deque[float] = deque(maxlen=_SAMPLES)  # seconds per step
        self._timed_steps = self._most_steps = 0
        self._last: float | None = None  # None: not timing (before the first report, paused)
        self._untimed = True  # the next report covers compilation or a pause: not a sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def progress(self, steps: int) -> None:
        """`steps` more steps are done; the time since the last report is theirs."""
        now = self._clock()
        with self._lock:
            if not self._untimed:
                self._times.append((now - self._last) / steps)
                self._timed_steps += steps
                self._most_steps = max(self._most_steps, steps)
            self._last, self._untimed = now, False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is not an ordinary step (a checkpoint save, a checked step): not watched,
        and the report after it is not a sample."""
        with self._lock:
            self._last = None
        try:
            yield
        finally:
            with self._lock:
                self._last, self._untimed = self._clock(), True

    def limit(self) -> float | None:
        """Seconds the current wait may last; None while warming up or paused."""
        with self._lock:
            if self._last is None or self._timed_steps < self.warmup:
                return None
            median = statistics.median(self._times)
            return max(self.multiple * median * self._most_steps, MIN_SECONDS)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            limit, last = self.limit(), self._last
            waited = None if last is None else self._clock() - last
            if limit is not None and waited is not None and waited > limit:
                self._fire(waited, limit)

    def _fire(self, waited: float, limit: float) -> None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(
            f"error: watchdog: no step finished for {waited:.1f}s, over the {limit:.1f}s limit "
            f"({self.multiple:g} x the median step time); stacks above; exiting {EXIT_CODE}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
