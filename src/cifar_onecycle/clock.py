"""The time left of repeated work (a run's epochs, the runs of a set of seeds or a sweep), shown in
the lines they print: on a CPU the seed's 24 epochs take over an hour, and tqdm's bar knows only its
own epoch.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence


class Laps:
    """The wall-clock seconds of each piece of work this process has done, from the clock's start
    (or the previous lap) to each ``lap``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = time.perf_counter()

    def lap(self) -> list[float]:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now
        return self.seconds

    def restart(self) -> None:
        """Start the next lap now, recording none: work of another kind took the time since the last."""
        self._last = time.perf_counter()


def time_left(seconds: Sequence[float], left: int, at_once: int = 1) -> float | None:
    """Seconds until ``left`` more pieces of work are done, ``at_once`` at a time, each taking the
    median of ``seconds`` (those done so far). The first is left out once there are others: it
    carries the start's costs (compilation and CUDA-graph capture took 14 of a compiled GPU run's
    23 s of training, all in its first epoch). None when nothing is done yet or nothing is left."""
    if not seconds or left <= 0:
        return None
    return statistics.median(seconds[1:] or seconds) * math.ceil(left / max(1, at_once))


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 12 min, 1 h 06 min."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def about_left(seconds: Sequence[float], left: int, at_once: int = 1) -> str:
    """"about 12 min left" (for a line that a run or a sweep prints), or "" before anything is done."""
    estimate = time_left(seconds, left, at_once)
    return "" if estimate is None else f"about {format_seconds(estimate)} left"
