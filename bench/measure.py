"""Timing helpers: alternating A/B pairs, medians, an RSS sampler."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Pairs:
    """Times of A and B measured in alternating order: AB, BA, AB, ..."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """A / B per pair (each pair ran back to back, so drift cancels)."""
        return [x / y for x, y in zip(self.a, self.b, strict=True)]

    @property
    def ratio(self) -> float:
        return median(self.ratios)

    def as_detail(self) -> dict[str, object]:
        return {"a_seconds": [round(x, 4) for x in self.a],
                "b_seconds": [round(x, 4) for x in self.b],
                "ratios": [round(x, 4) for x in self.ratios],
                "a_median": round(median(self.a), 4), "b_median": round(median(self.b), 4)}


def run_pairs(a: Callable[[], float], b: Callable[[], float], pairs: int,
              log: Callable[[str], None], label: tuple[str, str] = ("A", "B")) -> Pairs:
    """Run ``pairs`` A/B pairs, the order inside a pair alternating. Each
    callable does its own set-up and returns the seconds it measured."""
    out = Pairs()
    for i in range(pairs):
        if i % 2 == 0:
            ta = a()
            tb = b()
        else:
            tb = b()
            ta = a()
        out.a.append(ta)
        out.b.append(tb)
        log(f"pair {i + 1}/{pairs}: {label[0]} {ta:.3f} s, {label[1]} {tb:.3f} s, "
            f"ratio {ta / tb:.3f}")
    return out


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 name: str) -> list[R]:
    """``map`` on a thread pool that drops what is still queued when the
    caller is interrupted (Ctrl-C, SIGTERM) instead of finishing it."""
    ex = ThreadPoolExecutor(workers, thread_name_prefix=name)
    try:
        return list(ex.map(fn, items))
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - start, rss_bytes(self.pid)))
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max((rss for _t, rss in self.samples), default=0)
