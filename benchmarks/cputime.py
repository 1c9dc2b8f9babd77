"""CPU-seconds of a run across this process and every process it starts (pool workers,
a local Ray's raylet, workers and actors), for rates that hold up on a shared machine:
wall-clock time grows with the other users' load, CPU time much less.

Processes are sampled every ``interval`` seconds (psutil). A child of this process that
ends (pool workers) is counted exactly, by the kernel's account of reaped children
(``RUSAGE_CHILDREN``); a process that ends further down (a Ray actor, whose parent is
the raylet) loses at most its last interval. The sampler's own CPU time is left out.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


class ProcessTreeCPU:
    """``with ProcessTreeCPU() as cpu: ...`` then ``cpu.seconds`` (user + system), and
    ``cpu.driver_seconds``, this process's own part of it."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.me = psutil.Process(os.getpid())
        self.first: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU-seconds
        self.last: dict[tuple[int, float], float] = {}
        self.parents: dict[tuple[int, float], int] = {}
        self.sampler_seconds = 0.0
        self.seconds = self.driver_seconds = 0.0

    def _sample(self, into: dict[tuple[int, float], float]) -> None:
        processes = [self.me]
        try:
            processes += self.me.children(recursive=True)
        except psutil.Error:
            pass
        for process in processes:
            try:
                with process.oneshot():
                    times, key = process.cpu_times(), (process.pid, process.create_time())
                    self.parents.setdefault(key, process.ppid())
            except psutil.Error:  # ended since the listing
                continue
            into[key] = times.user + times.system

    def _run(self) -> None:
        started = time.thread_time()
        while not self.stop.wait(self.interval):
            self._sample(self.last)
        self.sampler_seconds = time.thread_time() - started

    @staticmethod
    def _reaped() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self) -> ProcessTreeCPU:
        self.reaped_before = self._reaped()
        self._sample(self.first)
        self.last = dict(self.first)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        final: dict[tuple[int, float], float] = {}
        self._sample(final)
        ended = {k: v for k, v in self.last.items() if k not in final}
        mine = {k for k in ended if self.parents.get(k) == self.me.pid}  # reaped here
        self.seconds = (sum(v - self.first.get(k, 0.0) for k, v in final.items())
                        + sum(v - self.first.get(k, 0.0) for k, v in ended.items() if k not in mine)
                        + self._reaped() - self.reaped_before
                        - sum(self.first.get(k, 0.0) for k in mine)
                        - self.sampler_seconds)
        me = next(k for k in final if k[0] == self.me.pid)
        self.driver_seconds = final[me] - self.first[me] - self.sampler_seconds


def timed(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU-seconds of the process tree, result) of ``function(...)``."""
    wall, cpu, _, result = timed_with_driver(function, *args, **kwargs)
    return wall, cpu, result


def timed_with_driver(function: Callable[..., Any], *args: Any,
                      **kwargs: Any) -> tuple[float, float, float, Any]:
    """(wall seconds, CPU-seconds of the process tree, of this process alone, result)."""
    with ProcessTreeCPU() as cpu:
        started = time.perf_counter()
        result = function(*args, **kwargs)
        wall = time.perf_counter() - started
    return wall, cpu.seconds, cpu.driver_seconds, result


def marginal(small: list[tuple[float, float]], full: list[tuple[float, float]],
             small_amount: float, full_amount: float) -> dict[str, Any]:
    """Rates of the work the full run adds to the small one (fixed costs cancel), from
    the median wall and CPU seconds of the repeats of each: per wall second and per
    CPU-second. None where the difference is under a tenth of the full run (noise)."""
    wall = [statistics.median(w for w, _ in runs) for runs in (small, full)]
    cpu = [statistics.median(c for _, c in runs) for runs in (small, full)]
    amount = full_amount - small_amount

    def rate(seconds: list[float]) -> float | None:
        extra = seconds[1] - seconds[0]
        return None if extra < 0.1 * seconds[1] else round(amount / extra, 1)

    return {"small_wall_s": [round(w, 2) for w, _ in small],
            "full_wall_s": [round(w, 2) for w, _ in full],
            "small_cpu_s": [round(c, 2) for _, c in small],
            "full_cpu_s": [round(c, 2) for _, c in full],
            "per_wall_s": rate(wall), "per_cpu_s": rate(cpu)}
