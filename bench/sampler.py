"""A small statistical profiler: a timer signal every millisecond, count the stacks.

cProfile instruments every call, which doubles the cost of call-heavy code such as
SQLAlchemy's and skews the shares; sampling the main thread's stack on a timer
costs little and attributes time fairly. The CPU timer (``ITIMER_PROF``) says where
CPU goes; the wall timer (``ITIMER_REAL``) also sees waiting (on the database, on
HTTP). The kernel's tick may stretch the interval (often to 4 ms); the shares stay
fair. ``inclusive`` counts samples in which a function was anywhere on the stack,
``exclusive`` those where it ran.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

Key = tuple[str, str]  # (file, function)


_TIMERS = {
    "cpu": (signal.ITIMER_PROF, signal.SIGPROF),
    "wall": (signal.ITIMER_REAL, signal.SIGALRM),
}


class Sampler:
    """Samples the main thread's Python stack on the CPU or the wall clock."""

    def __init__(self, interval: float = 0.001, clock: str = "cpu") -> None:
        self.interval = interval
        self.clock = clock
        self._timer, self._signal = _TIMERS[clock]
        self.samples = 0
        self.cpu_seconds = 0.0  # CPU (or wall) seconds sampled, whatever the timer's tick
        self.inclusive: Counter[Key] = Counter()
        self.exclusive: Counter[Key] = Counter()
        self._previous: Any = None
        self._started = 0.0

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        self.samples += 1
        seen: set[Key] = set()
        leaf = True
        while frame is not None:
            code = frame.f_code
            key = (code.co_filename, code.co_name)
            if leaf:
                self.exclusive[key] += 1
                leaf = False
            if key not in seen:
                seen.add(key)
                self.inclusive[key] += 1
            frame = frame.f_back

    def start(self) -> None:
        self._started = self._now()
        self._previous = signal.signal(self._signal, self._sample)
        signal.setitimer(self._timer, self.interval, self.interval)

    def _now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    def stop(self) -> None:
        signal.setitimer(self._timer, 0, 0)
        signal.signal(self._signal, self._previous or signal.SIG_DFL)
        self.cpu_seconds += self._now() - self._started

    def dump(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "interval": self.interval,
                    "samples": self.samples,
                    "clock": self.clock,
                    "cpu_seconds": self.cpu_seconds,
                    "inclusive": [[f, n, c] for (f, n), c in self.inclusive.items()],
                    "exclusive": [[f, n, c] for (f, n), c in self.exclusive.items()],
                }
            )
        )


class Samples:
    """Samples merged from several processes."""

    def __init__(self) -> None:
        self.samples = 0
        self.cpu_seconds = 0.0
        self.clock = "cpu"
        self.interval = 0.001
        self.inclusive: Counter[Key] = Counter()
        self.exclusive: Counter[Key] = Counter()

    @classmethod
    def load(cls, paths: list[Path]) -> Samples:
        merged = cls()
        for path in paths:
            data = json.loads(path.read_text())
            merged.samples += data["samples"]
            merged.cpu_seconds += data["cpu_seconds"]
            merged.clock = data.get("clock", "cpu")
            merged.interval = data["interval"]
            merged.inclusive.update({(f, n): c for f, n, c in data["inclusive"]})
            merged.exclusive.update({(f, n): c for f, n, c in data["exclusive"]})
        return merged

    @classmethod
    def of(cls, sampler: Sampler) -> Samples:
        merged = cls()
        merged.samples, merged.interval = sampler.samples, sampler.interval
        merged.cpu_seconds, merged.clock = sampler.cpu_seconds, sampler.clock
        merged.inclusive, merged.exclusive = sampler.inclusive, sampler.exclusive
        return merged

    def inclusive_of(self, suffix: str, function: str) -> int:
        return sum(
            c for (f, n), c in self.inclusive.items() if n == function and f.endswith(suffix)
        )
