"""How much of the machine other processes used while a measurement ran.

On a shared machine a timing means little if something else was running: both stacks slow
down, and not by the same factor (PyTorch's OpenMP threads spin-wait and suffer far more from
oversubscription than XLA's pool). Each timed run therefore records the CPU time that the rest
of the system used during it (system-wide busy time from /proc/stat minus our own), and the
coordinator re-runs pairs measured under contention. Linux only; elsewhere it reports nothing.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

_STAT = Path("/proc/stat")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CORES = os.cpu_count() or 1


def busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (every state but idle and iowait)."""
    try:
        fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / _TICK


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall time, our CPU time, and the share of the machine used by others over a span."""

    def __enter__(self) -> Meter:
        self.busy, self.own, self.wall = busy_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.wall
        self.cpu_s = own_cpu_seconds() - self.own
        busy = busy_seconds()
        foreign = None if busy is None or self.busy is None else busy - self.busy - self.cpu_s
        # fraction of all cores that other processes kept busy (clock ticks are 10 ms coarse)
        self.foreign = None if foreign is None else max(foreign, 0.0) / (wall * CORES)


def wait_for_quiet(max_foreign: float, timeout_s: float, sample_s: float = 2.0) -> bool:
    """Block until other processes use at most `max_foreign` of the machine over `sample_s`,
    or `timeout_s` passes. Returns whether it got quiet."""
    deadline = time.monotonic() + timeout_s
    while True:
        with Meter() as m:
            time.sleep(sample_s)
        if m.foreign is None or m.foreign <= max_foreign:
            return True
        if time.monotonic() >= deadline:
            return False
